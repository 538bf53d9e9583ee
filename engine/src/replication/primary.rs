//! The primary: runs the guest and, every interval, pauses it, harvests the dirty pages,
//! copies them to staging, captures the vCPU and device state, resumes it, and ships the
//! epoch to the backup (encoded on worker threads after the guest runs again).
//!
//! ```text
//! boot (paused) -> connect + handshake -> resume -> initial sync (pre-copy rounds while the
//! guest runs) -> epoch 1, 2, ... -> clean end: final epoch, End{digest}
//! ```
//!
//! Memory stays bounded: at most `window` epochs are unacknowledged; when the window is
//! full the guest stays paused until the backup catches up (throttling), and the dirty set
//! keeps accumulating in KVM's bitmap, whose size is fixed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpoint::delta_cache::DeltaCache;
use checkpoint::digest::digest_guest_memory;
use checkpoint::encode::{
    copy_pages, send_epoch, send_sync, EncoderConfig, EpochEncoder, StagedPages,
};
use checkpoint::handshake::primary_handshake;
use checkpoint::inflight::{InFlight, Pacing, SharedInFlight};
use checkpoint::protocol::{Hello, MemoryRegion, Message};
use checkpoint::transport::{Connection, FrameReceiver, FrameSender, TransportError};
use checkpoint::PAGE_SIZE;
use crossbeam_channel::{unbounded, Receiver, Sender};
use thiserror::Error;

use super::fence::{fence_until_done, FenceAgent, FenceConfig};
use super::stats::PrimaryStats;
use super::{guest_id, install_stop_handler, stop_requested};
use crate::cli::GuestOptions;
use crate::devices::egress::Egress;
use crate::devices::virtio::net::NetTransport;
use crate::machine::{Machine, MachineError};
use crate::vstate::memory::{self, ram_size};
use crate::vstate::vcpu::VcpuEvent;
use crate::{info, warn};

#[derive(Debug, Error)]
pub enum PrimaryError {
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error("cannot reach the backup at {peer} within {timeout:?}: {source}")]
    Connect {
        peer: String,
        timeout: Duration,
        source: TransportError,
    },
    #[error(transparent)]
    Handshake(#[from] checkpoint::handshake::HandshakeError),
    #[error("sending to the backup failed: {0}")]
    Send(#[from] checkpoint::encode::EncodeError),
    #[error("sending to the backup failed: {0}")]
    Transport(#[from] TransportError),
    #[error("epoch bookkeeping: {0}")]
    InFlight(#[from] checkpoint::inflight::InFlightError),
    #[error("the backup rejected epoch {epoch}: {reason}")]
    Rejected { epoch: u64, reason: String },
    #[error("lost the backup: {0}")]
    BackupLost(String),
    #[error("cannot write the pid file {0}")]
    PidFile(String),
    #[error(transparent)]
    Copy(#[from] memory::PageOutOfRange),
    #[error("digest: {0}")]
    Digest(#[from] checkpoint::digest::DigestError),
    #[error("vCPU {vcpu}: {message}")]
    Crashed { vcpu: u32, message: String },
}

/// Options of `lockstep primary` besides the guest's.
#[derive(Clone, Debug)]
pub struct PrimaryOptions {
    pub peer: String,
    pub interval: Duration,
    pub seconds: Option<Duration>,
    pub connect_timeout: Duration,
    pub name: String,
    /// Unacknowledged epochs allowed in flight.
    pub window: usize,
    /// How long the backup may stay silent before it counts as lost.
    pub backup_timeout: Duration,
    pub on_backup_loss: OnBackupLoss,
    /// How to fence the backup before releasing output it has not acknowledged.
    pub fence: Option<FenceAgent>,
    /// Written with this process's pid (for fence agents on a single host).
    pub pid_file: Option<std::path::PathBuf>,
    /// End an epoch early when the guest's output waits for it and the epoch has run at
    /// least `min_interval` (so a reply waits about one pause plus one round trip).
    pub early_checkpoint: bool,
    pub min_interval: Duration,
}

/// What the primary does when the backup is lost (`--on-backup-loss`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnBackupLoss {
    /// Hold the output, fence the backup, then release and run unprotected (the default).
    Fence,
    /// Stop the guest; nothing more leaves.
    Pause,
    /// Release at once and run unprotected, without fencing (unsafe).
    Continue,
}

/// Default epoch interval; see README ("Choosing the interval").
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(25);
pub const DEFAULT_WINDOW: usize = 4;
/// Bytes of unacknowledged epochs allowed in flight.
const MAX_INFLIGHT_BYTES: u64 = 512 << 20;
/// XOR bases the primary keeps (64 MiB).
const DELTA_CACHE_PAGES: usize = 16 << 10;
/// Pages copied and sent per pre-copy step (32 MiB).
const SYNC_CHUNK_PAGES: usize = 8 << 10;
/// Pre-copy ends when a round's dirty set is this small, stops shrinking, or after
/// MAX_SYNC_ROUNDS.
const SYNC_DONE_PAGES: usize = 4 << 10;
const MAX_SYNC_ROUNDS: usize = 8;
/// The running figures go to the log this often (a SIGKILLed primary leaves them behind).
const STATS_EVERY: Duration = Duration::from_secs(2);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

enum AckEvent {
    Ack { epoch: u64, at: Instant },
    Nack { epoch: u64, reason: String },
    Lost(String),
}

struct Primary {
    machine: Machine,
    tx: FrameSender,
    encoder: EpochEncoder,
    inflight: Arc<SharedInFlight>,
    acks: Receiver<AckEvent>,
    opts: PrimaryOptions,
    stats: PrimaryStats,
    pfns: Vec<u64>,
    /// Pages dirtied during pre-copy but not sent yet: they go with epoch 1.
    carry: Vec<u64>,
    buf: Vec<u8>,
    epoch: u64,
    pause_start: HashMap<u64, Instant>,
    /// The state blob of the final epoch, for the digest.
    last_state: Option<Vec<u8>>,
    /// The guest's exit status, once it exited.
    exit_status: Option<u32>,
    started: Instant,
    last_send: Instant,
}

/// Runs `lockstep primary` to the end; returns the guest's exit status.
pub fn run(guest: GuestOptions, opts: PrimaryOptions) -> Result<u8, PrimaryError> {
    install_stop_handler();
    if let Some(path) = &opts.pid_file {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .map_err(|e| PrimaryError::PidFile(format!("{}: {e}", path.display())))?;
    }
    let machine = Machine::boot(&guest.machine, &guest.image, &guest.guest_args)?;
    let mut conn = connect(&opts.peer, opts.connect_timeout)?;
    let mem_size = ram_size(machine.memory());
    let hello = Hello::new(
        machine.vcpu_count() as u32,
        vec![MemoryRegion {
            gpa: 0,
            len: mem_size,
        }],
        guest_id(&opts.name),
    );
    primary_handshake(&mut conn, &hello, HANDSHAKE_TIMEOUT)?;
    info!(
        "backup at {} accepted the guest ({} MiB, {} vCPUs)",
        opts.peer,
        mem_size >> 20,
        hello.vcpu_count
    );
    let (tx, rx) = conn.split();
    let inflight = Arc::new(SharedInFlight::new(InFlight::new(
        opts.window,
        MAX_INFLIGHT_BYTES,
        0,
    )));
    let (ack_tx, acks) = unbounded();
    let output = machine.net().map(|n| {
        n.egress.set_open_epoch(1);
        n.egress.protect();
        (Arc::clone(&n.egress), Arc::clone(&n.transport))
    });
    spawn_ack_reader(
        rx,
        Arc::clone(&inflight),
        ack_tx,
        opts.backup_timeout,
        output,
    );
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    let encoder = EpochEncoder::new(
        EncoderConfig {
            workers,
            ..EncoderConfig::default()
        },
        Some(Arc::new(DeltaCache::new(DELTA_CACHE_PAGES, workers))),
    );
    let mut p = Primary {
        machine,
        tx,
        encoder,
        inflight,
        acks,
        opts,
        stats: PrimaryStats::default(),
        pfns: Vec::new(),
        carry: Vec::new(),
        buf: Vec::new(),
        epoch: 0,
        pause_start: HashMap::new(),
        last_state: None,
        exit_status: None,
        started: Instant::now(),
        last_send: Instant::now(),
    };
    p.machine.resume()?;
    match p.initial_sync().and_then(|()| p.epochs()) {
        Ok(status) => {
            p.finish()?;
            Ok(status)
        }
        Err(PrimaryError::BackupLost(why)) => p.without_backup(why),
        // A send that fails is the backup going away mid-epoch.
        Err(e @ (PrimaryError::Send(_) | PrimaryError::Transport(_))) => {
            p.without_backup(e.to_string())
        }
        Err(e) => Err(e),
    }
}

fn connect(peer: &str, timeout: Duration) -> Result<Connection, PrimaryError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match Connection::connect(peer, left.max(Duration::from_millis(100))) {
            Ok(c) => return Ok(c),
            // The backup may still be starting: try again until the deadline.
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(source) => {
                return Err(PrimaryError::Connect {
                    peer: peer.to_string(),
                    timeout,
                    source,
                })
            }
        }
    }
}

/// Reads acks on its own thread so that sending never waits for them.
fn spawn_ack_reader(
    mut rx: FrameReceiver,
    inflight: Arc<SharedInFlight>,
    events: Sender<AckEvent>,
    timeout: Duration,
    output: Option<(Arc<Egress>, NetTransport)>,
) {
    std::thread::Builder::new()
        .name("acks".into())
        .spawn(move || loop {
            let ev = match rx.recv(Some(timeout)) {
                Ok(Message::Ack { epoch }) => match inflight.acked(epoch) {
                    Ok(_) => {
                        // Output commit: what the guest sent up to this epoch may leave now.
                        if let Some((egress, net)) = &output {
                            egress.release(epoch);
                            let mut t = crate::devices::lock(net);
                            if t.device.tx_blocked {
                                t.kick(1);
                            }
                        }
                        AckEvent::Ack {
                            epoch,
                            at: Instant::now(),
                        }
                    }
                    Err(e) => AckEvent::Lost(e.to_string()),
                },
                Ok(Message::Nack { epoch, reason }) => AckEvent::Nack { epoch, reason },
                Ok(Message::Heartbeat { .. }) => continue,
                Ok(other) => {
                    AckEvent::Lost(format!("unexpected {:?} from the backup", other.kind()))
                }
                Err(TransportError::Timeout(t)) => {
                    AckEvent::Lost(format!("no word from the backup for {t:?}"))
                }
                Err(e) => AckEvent::Lost(e.to_string()),
            };
            let last = !matches!(ev, AckEvent::Ack { .. });
            if events.send(ev).is_err() || last {
                return;
            }
        })
        .expect("spawn the ack reader thread");
}

impl Primary {
    fn check_guest(&self) -> Result<Option<u32>, PrimaryError> {
        match self.machine.wait_event(Duration::ZERO) {
            Some(VcpuEvent::GuestExit { status, .. }) => Ok(Some(status)),
            Some(VcpuEvent::Crashed { vcpu, message }) => {
                Err(PrimaryError::Crashed { vcpu, message })
            }
            None => Ok(None),
        }
    }

    /// Pre-copy: the whole memory while the guest runs, then rounds of what it dirtied
    /// meanwhile, until the dirty set is small. What is left goes with epoch 1.
    fn initial_sync(&mut self) -> Result<(), PrimaryError> {
        let mem_pages = (ram_size(self.machine.memory()) / PAGE_SIZE as u64) as usize;
        // Everything counts as dirty for round 0: forget what the boot dirtied.
        self.machine.harvest(&mut self.pfns)?;
        let mut round_pfns: Vec<u64> = (0..mem_pages as u64).collect();
        let start = Instant::now();
        let mut sent_bytes = 0u64;
        let mut synced = 0u64;
        for round in 0..MAX_SYNC_ROUNDS {
            if round > 0 {
                self.machine.harvest(&mut self.pfns)?;
                let previous = round_pfns.len();
                round_pfns = std::mem::take(&mut self.pfns);
                // Small enough for one epoch, or not shrinking any more (the guest dirties
                // as fast as we send): the rest goes with epoch 1.
                if round_pfns.len() <= SYNC_DONE_PAGES || round_pfns.len() * 10 > previous * 9 {
                    self.carry = round_pfns;
                    break;
                }
            }
            let total = (round_pfns.len() * PAGE_SIZE) as u64;
            let mut done = 0u64;
            let mut last_report = Instant::now();
            for chunk in round_pfns.chunks(SYNC_CHUNK_PAGES) {
                copy_pages(self.machine.memory(), chunk, &mut self.buf)?;
                let staged = StagedPages::new(chunk, &self.buf)?;
                let s = send_sync(&mut self.tx, &self.encoder, &staged, done, total)?;
                done += (chunk.len() * PAGE_SIZE) as u64;
                synced += (chunk.len() * PAGE_SIZE) as u64;
                sent_bytes += s.bytes;
                if last_report.elapsed() >= Duration::from_millis(500) || done == total {
                    last_report = Instant::now();
                    let secs = start.elapsed().as_secs_f64().max(1e-6);
                    info!(
                        "initial sync round {round}: {} of {} MiB ({:.0}%), {:.0} MiB/s of guest memory, {} MiB on the wire",
                        done >> 20,
                        total >> 20,
                        done as f64 * 100.0 / total as f64,
                        synced as f64 / secs / (1 << 20) as f64,
                        sent_bytes >> 20
                    );
                }
                self.drain_acks()?;
                if let Some(status) = self.check_guest()? {
                    self.exit_status = Some(status);
                }
                if self.exit_status.is_some() || stop_requested() {
                    // The end comes with the final epoch, which carries every page
                    // dirtied since the harvest that began this round.
                    self.carry = round_pfns;
                    return Ok(());
                }
            }
            if round == MAX_SYNC_ROUNDS - 1 {
                self.carry.clear();
            }
        }
        info!(
            "initial sync done in {:.2} s; continuous epochs every {:?}",
            start.elapsed().as_secs_f64(),
            self.opts.interval
        );
        Ok(())
    }

    fn drain_acks(&mut self) -> Result<(), PrimaryError> {
        while let Ok(ev) = self.acks.try_recv() {
            match ev {
                AckEvent::Ack { epoch, at } => {
                    // Acks are cumulative: every epoch up to `epoch` is committed.
                    let done: Vec<u64> = self
                        .pause_start
                        .keys()
                        .copied()
                        .filter(|&e| e <= epoch)
                        .collect();
                    for e in done {
                        if let Some(t) = self.pause_start.remove(&e) {
                            self.stats
                                .commit_us
                                .push_duration(at.saturating_duration_since(t));
                        }
                    }
                }
                AckEvent::Nack { epoch, reason } => {
                    return Err(PrimaryError::Rejected { epoch, reason })
                }
                AckEvent::Lost(why) => return Err(PrimaryError::BackupLost(why)),
            }
        }
        Ok(())
    }

    /// Continuous epochs until the guest exits, `--seconds` pass, or SIGTERM/SIGINT.
    /// Returns the guest's exit status (0 when the run was ended from outside).
    fn epochs(&mut self) -> Result<u8, PrimaryError> {
        let start = Instant::now();
        let mut next = Instant::now();
        if let Some(status) = self.exit_status {
            return Ok(u8::try_from(status).unwrap_or(u8::MAX));
        }
        let early = self.opts.early_checkpoint && self.machine.net().is_some();
        let mut last_stats = Instant::now();
        let mut last_start = Instant::now();
        loop {
            let mut deadline = next;
            if early {
                deadline = deadline.min(last_start + self.opts.min_interval);
            }
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50));
            match self.machine.wait_event(wait) {
                Some(VcpuEvent::GuestExit { status, .. }) => {
                    return Ok(u8::try_from(status).unwrap_or(u8::MAX))
                }
                Some(VcpuEvent::Crashed { vcpu, message }) => {
                    return Err(PrimaryError::Crashed { vcpu, message })
                }
                None => {}
            }
            self.drain_acks()?;
            if stop_requested() || self.opts.seconds.is_some_and(|s| start.elapsed() >= s) {
                return Ok(0);
            }
            if last_stats.elapsed() >= STATS_EVERY {
                last_stats = Instant::now();
                info!("{}", self.stats.summary());
            }
            // Long intervals: tell the backup we are alive between epochs.
            if self.last_send.elapsed() >= self.opts.backup_timeout / 4 {
                self.tx.send(&Message::Heartbeat { epoch: self.epoch })?;
                self.last_send = Instant::now();
            }
            let now = Instant::now();
            let output_waits = early
                && now >= last_start + self.opts.min_interval
                && self.machine.net().is_some_and(|n| n.egress.open_output());
            if now < next && !output_waits {
                continue;
            }
            if output_waits && now < next {
                self.stats.early += 1;
            }
            let pacing = self.inflight.lock().pacing();
            match pacing {
                Pacing::Normal => {}
                Pacing::Lengthen => {
                    // One slot left: give the backup one more interval before the next epoch.
                    if self.inflight.lock().last_sent() == self.epoch
                        && next.elapsed() < self.opts.interval
                    {
                        next += self.opts.interval / 2;
                        continue;
                    }
                }
                Pacing::Throttle => self.throttle()?,
            }
            let t0 = Instant::now();
            self.checkpoint(false)?;
            last_start = t0;
            next = t0 + self.opts.interval;
        }
    }

    /// The backup is gone. Output the backup has not acknowledged may leave only once the
    /// backup can no longer promote (invariant 3): by default (`--on-backup-loss fence`)
    /// the guest runs on while its output stays held, the backup is fenced with
    /// `--fence-cmd`, and only on success is the output released and the guest left to run
    /// unprotected. Without a fence command the output stays held until the primary is
    /// stopped. `pause` stops the guest; `continue` releases at once (unsafe: a backup that
    /// was only stalled may promote a state older than what clients saw).
    fn without_backup(&mut self, why: String) -> Result<u8, PrimaryError> {
        let has_output = self.machine.net().is_some();
        let what = match (self.opts.on_backup_loss, &self.opts.fence) {
            (OnBackupLoss::Pause, _) => "PAUSING the guest (--on-backup-loss pause)".to_string(),
            (OnBackupLoss::Continue, _) => {
                "UNSAFE: the guest continues UNPROTECTED without fencing the backup \
                 (--on-backup-loss continue); a stalled backup may still promote"
                    .to_string()
            }
            (OnBackupLoss::Fence, _) if !has_output => {
                "the guest continues UNPROTECTED (no network device: no output to hold)".to_string()
            }
            (OnBackupLoss::Fence, Some(agent)) => format!(
                "output HELD until the backup '{}' is fenced; the guest runs on",
                agent.victim
            ),
            (OnBackupLoss::Fence, None) => "output stays HELD: no --fence-cmd to fence the \
                 backup with, so it could still promote (stop the primary, or choose \
                 --on-backup-loss continue, unsafe)"
                .to_string(),
        };
        warn!(
            "ROLE CHANGE: backup lost ({why}) after epoch {}; {what}",
            self.epoch
        );
        if self.opts.on_backup_loss == OnBackupLoss::Pause {
            self.machine.pause()?;
            while !stop_requested() {
                std::thread::sleep(Duration::from_millis(50));
            }
            return Err(PrimaryError::BackupLost(why));
        }
        if !self.machine.is_running() {
            self.machine.resume()?;
        }
        let release = |m: &Machine| {
            if let Some(n) = m.net() {
                n.egress.unprotect();
                n.retry_tx();
            }
        };
        let fencing = match (self.opts.on_backup_loss, &self.opts.fence) {
            (OnBackupLoss::Continue, _) => {
                release(&self.machine);
                None
            }
            (_, _) if !has_output => None,
            (_, Some(agent)) => {
                let cfg = FenceConfig::Agent(agent.clone());
                let (tx, rx) = crossbeam_channel::bounded(1);
                std::thread::Builder::new()
                    .name("fence".into())
                    .spawn(move || {
                        let _ = tx.send(fence_until_done(&cfg, "the backup"));
                    })
                    .expect("spawn the fencing thread");
                Some(rx)
            }
            (_, None) => None,
        };
        let mut fencing = fencing;
        loop {
            match self.machine.wait_event(Duration::from_millis(20)) {
                Some(VcpuEvent::GuestExit { status, .. }) => {
                    return Ok(u8::try_from(status).unwrap_or(u8::MAX))
                }
                Some(VcpuEvent::Crashed { vcpu, message }) => {
                    return Err(PrimaryError::Crashed { vcpu, message })
                }
                None => {}
            }
            if let Some(Ok(result)) = fencing.as_ref().map(|rx| rx.try_recv()) {
                fencing = None;
                match result {
                    Ok(_) => {
                        release(&self.machine);
                        warn!("the backup is fenced: output released, the guest continues UNPROTECTED");
                    }
                    Err(e) => warn!("{e}: output stays held"),
                }
            }
            if stop_requested()
                || self
                    .opts
                    .seconds
                    .is_some_and(|s| self.started.elapsed() >= s)
            {
                return Ok(0);
            }
        }
    }

    /// The window is full: keep the guest paused until the backup acknowledges.
    fn throttle(&mut self) -> Result<(), PrimaryError> {
        self.stats.throttled += 1;
        let t = Instant::now();
        self.machine.pause()?;
        let room = self.inflight.wait_for_room(0, self.opts.backup_timeout);
        self.machine.resume()?;
        self.stats.throttle_time += t.elapsed();
        if !room {
            return Err(PrimaryError::BackupLost(format!(
                "no ack for {:?} with {} epochs in flight",
                self.opts.backup_timeout, self.opts.window
            )));
        }
        Ok(())
    }

    /// One epoch. The guest is paused from the capture until the dirty pages are copied;
    /// with `last`, it stays paused (the end of the run).
    fn checkpoint(&mut self, last: bool) -> Result<(), PrimaryError> {
        let t0 = Instant::now();
        let (state, timing) = self.machine.pause_and_capture()?;
        // Output from now on belongs to the next epoch.
        if let Some(n) = self.machine.net() {
            n.egress.set_open_epoch(self.epoch + 2);
        }
        self.machine.harvest(&mut self.pfns)?;
        let mem = self.machine.memory();
        if !self.carry.is_empty() {
            self.pfns.append(&mut self.carry);
            self.pfns.sort_unstable();
            self.pfns.dedup();
        }
        let harvested = t0.elapsed();
        memory::copy_pages(mem, &self.pfns, &mut self.buf)?;
        let copied = t0.elapsed();
        if !last {
            self.machine.resume_nowait()?;
        }
        let pause = t0.elapsed();
        self.epoch += 1;
        let epoch = self.epoch;
        let blob = state.to_blob();
        let bytes = (self.buf.len() + blob.len()) as u64;
        self.inflight.lock().sent(epoch, bytes)?;
        self.pause_start.insert(epoch, t0);
        let staged = StagedPages::new(&self.pfns, &self.buf)?;
        let summary = send_epoch(&mut self.tx, &self.encoder, epoch, &staged, &blob)?;
        self.last_send = Instant::now();
        let st = &mut self.stats;
        st.pause_us.push_duration(pause);
        st.parked_us.push_duration(timing.parked);
        st.captured_us.push_duration(timing.captured);
        st.harvested_us.push_duration(harvested);
        st.copied_us.push_duration(copied);
        st.pages.push(self.pfns.len() as u64);
        st.wire_bytes.push(summary.bytes);
        for (i, n) in summary.by_encoding.iter().enumerate() {
            st.encodings[i] += n;
        }
        if last {
            self.last_state = Some(blob);
        }
        Ok(())
    }

    /// The clean end: a final epoch with the guest paused, its ack, and `End` with the
    /// digest of RAM and state that both sides print.
    fn finish(&mut self) -> Result<(), PrimaryError> {
        self.checkpoint(true)?;
        let epoch = self.epoch;
        if !self.inflight.wait_acked(epoch, self.opts.backup_timeout) {
            self.drain_acks()?;
            return Err(PrimaryError::BackupLost(format!(
                "final epoch {epoch} not acknowledged"
            )));
        }
        self.drain_acks()?;
        let state = self.last_state.take().unwrap_or_default();
        let digest = digest_guest_memory(self.machine.memory(), &state)?;
        self.tx.send(&Message::End {
            epoch,
            digest: digest.0,
        })?;
        self.machine.flush_console();
        println!("final epoch={epoch} digest={digest}");
        info!("{}", self.stats.summary());
        info!("{}", self.stats.pause_breakdown());
        if let Some(n) = self.machine.net() {
            let (p50, p99, held) = n.egress.hold_times();
            let c = n.egress.counters();
            info!(
                "output commit: {held} frames held, hold time p50={p50} us p99={p99} us, \
                 {} frames sent, {} tap errors, {} early checkpoints",
                c.sent, c.tap_errors, self.stats.early
            );
        }
        if self.stats.throttled > 0 {
            warn!(
                "the backup fell behind {} times; the guest was held for {:.1} ms in all",
                self.stats.throttled,
                self.stats.throttle_time.as_secs_f64() * 1000.0
            );
        }
        Ok(())
    }
}
