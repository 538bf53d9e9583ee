//! The primary: runs the guest and, every interval, pauses it, harvests the dirty pages,
//! copies them to staging, captures the vCPU and device state, resumes it, and ships the
//! epoch to the backup (encoded on worker threads after the guest runs again).
//!
//! ```text
//! boot (paused) -> connect + handshake -> resume -> initial sync (pre-copy rounds while the
//! guest runs) -> epoch 1, 2, ... -> clean end: final epoch, End{digest}
//! ```
//!
//! Memory and pauses stay bounded whatever the guest's dirty rate and however slow the
//! backup (DESIGN.md invariant 4):
//!
//! - An epoch holds at most about `max_epoch_pages` pages: while an epoch runs, the dirty
//!   set is counted (without harvesting it) every 1-5 ms, and the epoch ends early once it
//!   reaches the cap. So one checkpoint pause copies at most the cap plus what the guest
//!   dirtied since the last count.
//! - At most `window` epochs are unacknowledged. When the window is full the guest runs on
//!   until its dirty set reaches the cap, then stays paused until the backup acknowledges
//!   an epoch (throttling): a backup slower than the guest's writes slows the guest to the
//!   backup's pace, one held stretch at most as long as the backup takes to commit one
//!   epoch. The primary never gives up on a backup that still answers.
//! - Pre-copy rounds go on until what the guest dirtied during a round fits in one epoch.
//!   A guest that dirties faster than the link carries is throttled as QEMU's
//!   auto-converge does: its vCPUs are held for a share of the time (up to 99%, in 2 ms
//!   run slices) set after every 8 MiB step so that each round leaves at most a quarter of
//!   what it sent; if even 99% does not make a round shrink, the last round goes with the
//!   guest paused.
//!
//! A peer is lost only after it has been silent for the heartbeat timeout: any bytes
//! count as life (see the transport), the primary sends heartbeats from a thread of its
//! own whenever the link has been idle for a while, and the backup from its receive loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use checkpoint::delta_cache::DeltaCache;
use checkpoint::digest::digest_guest_memory;
use checkpoint::encode::{send_epoch, send_sync, EncoderConfig, EpochEncoder, StagedPages};
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
use crate::devices::OutputCommit;
use crate::machine::{BootConfig, Machine, MachineError};
use crate::vstate::dirty::DirtySet;
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
    /// End an epoch early when the guest's output waits for it and the epoch has run at
    /// least `min_interval` (so a reply waits about one pause plus one round trip).
    pub early_checkpoint: bool,
    pub min_interval: Duration,
    /// An epoch ends early when the guest has dirtied this many pages, which bounds the
    /// checkpoint pause (the pages are copied while the guest is paused).
    pub max_epoch_pages: usize,
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
/// Default cap on the pages of one epoch (16 MiB): see `PrimaryOptions::max_epoch_pages`.
pub const DEFAULT_MAX_EPOCH_PAGES: usize = 4 << 10;
/// Pages copied and sent per pre-copy step (8 MiB): auto-converge looks at the dirty set
/// after each.
const SYNC_CHUNK_PAGES: usize = 2 << 10;
/// Pre-copy's auto-converge holds the guest for at most this share of the time (%).
const THROTTLE_MAX: u32 = 99;
/// How often the dirty set is counted while an epoch runs: halfway to when the cap would
/// be reached at the epoch's rate so far, within these bounds.
const DIRTY_POLL_MIN: Duration = Duration::from_millis(1);
const DIRTY_POLL_MAX: Duration = Duration::from_millis(5);
/// Room the state blob may take in the in-flight window next to an epoch's pages (the
/// backup refuses larger blobs).
const STATE_ALLOWANCE: u64 = 4 << 20;
/// A checkpoint pause this long is logged with its parts.
const LONG_PAUSE: Duration = Duration::from_millis(50);
/// Waits for the backup look at its answers (and at the ack reader's verdict) this often.
const WAIT_SLICE: Duration = Duration::from_millis(20);
/// A heartbeat goes out when nothing was sent for this long (or a quarter of the
/// heartbeat timeout, if that is shorter).
const HEARTBEAT_EVERY: Duration = Duration::from_millis(100);
/// The running figures go to the log this often (a SIGKILLed primary leaves them behind).
const STATS_EVERY: Duration = Duration::from_secs(2);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

enum AckEvent {
    Ack { epoch: u64, at: Instant },
    Nack { epoch: u64, reason: String },
    Lost(String),
}

/// The sending half, shared by the epoch loop and the heartbeat thread.
struct Link {
    tx: FrameSender,
    last_send: Instant,
}

impl Link {
    fn sent(&mut self) {
        self.last_send = Instant::now();
    }
}

/// A thread that sends heartbeats whenever the link has been idle for a while, so that
/// the backup hears from us while the epoch loop is busy elsewhere (a pause, a wait for
/// acks, the final digest). It never waits behind a send in progress (data is flowing
/// then). It vouches only for an epoch loop that checked in recently: a primary whose
/// loop is stuck must go silent, or the backup would never take over.
struct Heartbeats {
    stop: Arc<AtomicBool>,
    /// The epoch loop's last check-in, ms after `base`, and its epoch.
    alive: Arc<AtomicU64>,
    epoch: Arc<AtomicU64>,
    base: Instant,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeats {
    fn start(link: Arc<Mutex<Link>>, every: Duration, vouch_for: Duration) -> Heartbeats {
        let stop = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicU64::new(0));
        let epoch = Arc::new(AtomicU64::new(0));
        let base = Instant::now();
        let (s, a, e) = (stop.clone(), alive.clone(), epoch.clone());
        let thread = std::thread::Builder::new()
            .name("heartbeats".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(every / 2);
                    let silent = (base.elapsed().as_millis() as u64)
                        .saturating_sub(a.load(Ordering::Relaxed));
                    if silent > vouch_for.as_millis() as u64 {
                        continue;
                    }
                    let mut l = match link.try_lock() {
                        Ok(l) => l,
                        Err(TryLockError::WouldBlock) => continue,
                        Err(TryLockError::Poisoned(_)) => return,
                    };
                    if l.last_send.elapsed() < every {
                        continue;
                    }
                    let beat = Message::Heartbeat {
                        epoch: e.load(Ordering::Relaxed),
                    };
                    if l.tx.send(&beat).is_err() {
                        // The epoch loop sees the broken link on its next send.
                        return;
                    }
                    l.sent();
                }
            })
            .expect("spawn the heartbeat thread");
        Heartbeats {
            stop,
            alive,
            epoch,
            base,
            thread: Some(thread),
        }
    }

    /// The epoch loop is alive (at `epoch`).
    fn check_in(&self, epoch: u64) {
        self.alive
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.epoch.store(epoch, Ordering::Relaxed);
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// While it lives, the calling thread (the epoch loop) runs at real-time priority,
/// `SCHED_FIFO` 1, where the system allows it. The loop mostly sleeps, but when it wakes
/// to count the dirty set or to end an epoch it must not queue behind the guest's vCPU
/// threads for a CPU. Measured here with a guest writing as fast as it can on both cores
/// of the machine: at normal priority (even at nice -10) the loop woke 3-8 ms late and
/// epochs overshot the cap by half; at `SCHED_FIFO` it woke on time and 9 epochs in 10
/// stayed within 11% of the cap. The thread's previous policy returns on drop.
struct Realtime {
    previous: Option<(libc::c_int, libc::sched_param)>,
    /// Not Send: it restores the policy of the thread that created it.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Realtime {
    fn enter() -> Realtime {
        let mut param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; no pointer is passed.
        let policy = unsafe { libc::sched_getscheduler(0) };
        // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param to fill.
        let got = unsafe { libc::sched_getparam(0, &mut param) };
        let rt = libc::sched_param { sched_priority: 1 };
        let set = if policy >= 0 && got == 0 {
            // SAFETY: pid 0 is the calling thread; `rt` is a valid sched_param for
            // SCHED_FIFO that outlives the call.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &rt) }
        } else {
            -1
        };
        if set != 0 {
            info!(
                "the epoch loop keeps its normal priority (real-time scheduling refused: {}); \
                 on a busy host epochs may overshoot --max-epoch-pages",
                std::io::Error::last_os_error()
            );
            return Realtime {
                previous: None,
                _thread: std::marker::PhantomData,
            };
        }
        Realtime {
            previous: Some((policy, param)),
            _thread: std::marker::PhantomData,
        }
    }
}

impl Drop for Realtime {
    fn drop(&mut self) {
        if let Some((policy, param)) = self.previous.take() {
            // SAFETY: restores the calling thread's own policy and parameters as read in
            // `enter`; the guard is not Send, so this is the thread that created it.
            unsafe { libc::sched_setscheduler(0, policy, &param) };
        }
    }
}

/// An epoch handed to the sender thread: its pages (copied out while the guest was
/// paused) and state blob. The buffers come back in [`EpochSent`] for the next epoch.
struct EpochJob {
    epoch: u64,
    pfns: Vec<u64>,
    data: Vec<u8>,
    blob: Vec<u8>,
}

struct EpochSent {
    job: EpochJob,
    result: Result<checkpoint::encode::EncodeSummary, checkpoint::encode::EncodeError>,
}

/// Encodes and sends epochs on a thread of its own, so that the epoch loop keeps
/// counting the dirty set (and holds the guest at the cap) while an epoch is on its way.
/// One epoch at a time: the loop hands over the next only once the last is sent.
fn spawn_sender(
    link: Arc<Mutex<Link>>,
    encoder: EpochEncoder,
) -> (Sender<EpochJob>, Receiver<EpochSent>) {
    let (jobs, rx) = crossbeam_channel::bounded::<EpochJob>(1);
    let (tx, sent) = crossbeam_channel::bounded::<EpochSent>(1);
    std::thread::Builder::new()
        .name("epoch-sender".into())
        .spawn(move || {
            for job in rx {
                let result = StagedPages::new(&job.pfns, &job.data).and_then(|staged| {
                    let mut l = link.lock().unwrap_or_else(|e| e.into_inner());
                    let r = send_epoch(&mut l.tx, &encoder, job.epoch, &staged, &job.blob);
                    l.sent();
                    r
                });
                if tx.send(EpochSent { job, result }).is_err() {
                    return;
                }
            }
        })
        .expect("spawn the epoch sender thread");
    (jobs, sent)
}

struct Primary {
    machine: Machine,
    /// Output commit on the guest's network device, if it has one.
    output: Option<OutputCommit>,
    link: Arc<Mutex<Link>>,
    heartbeats: Heartbeats,
    encoder: EpochEncoder,
    jobs: Sender<EpochJob>,
    sent: Receiver<EpochSent>,
    /// The epoch the sender thread is busy with.
    sending: Option<u64>,
    inflight: Arc<SharedInFlight>,
    acks: Receiver<AckEvent>,
    opts: PrimaryOptions,
    stats: PrimaryStats,
    pfns: DirtySet,
    /// Pages dirtied during pre-copy but not sent yet: they go with epoch 1.
    carry: DirtySet,
    buf: Vec<u8>,
    epoch: u64,
    pause_start: HashMap<u64, Instant>,
    /// The state blob of the final epoch, for the digest.
    last_state: Option<Vec<u8>>,
    /// The guest's exit status, once it exited.
    exit_status: Option<u32>,
    started: Instant,
    /// When the dirty set is counted next, and whether it had reached the cap.
    next_dirty_count: Instant,
    dirty_full: bool,
}

/// Runs `lockstep primary` to the end; returns the guest's exit status.
pub fn run(guest: BootConfig, opts: PrimaryOptions) -> Result<u8, PrimaryError> {
    install_stop_handler();
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
    let output = machine.net().map(|n| n.output());
    if let Some(o) = &output {
        o.protect(1);
    }
    spawn_ack_reader(
        rx,
        Arc::clone(&inflight),
        ack_tx,
        opts.backup_timeout,
        output.clone(),
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
    let link = Arc::new(Mutex::new(Link {
        tx,
        last_send: Instant::now(),
    }));
    let heartbeats = Heartbeats::start(
        Arc::clone(&link),
        HEARTBEAT_EVERY.min(opts.backup_timeout / 4),
        (opts.backup_timeout * 10).max(Duration::from_secs(10)),
    );
    let (jobs, sent) = spawn_sender(Arc::clone(&link), encoder.clone());
    let mut p = Primary {
        machine,
        output,
        link,
        heartbeats,
        encoder,
        jobs,
        sent,
        sending: None,
        inflight,
        acks,
        opts,
        stats: PrimaryStats::default(),
        pfns: DirtySet::default(),
        carry: DirtySet::default(),
        buf: Vec::new(),
        epoch: 0,
        pause_start: HashMap::new(),
        last_state: None,
        exit_status: None,
        started: Instant::now(),
        next_dirty_count: Instant::now(),
        dirty_full: false,
    };
    p.machine.resume()?;
    match p.initial_sync().and_then(|()| p.epochs()) {
        Ok(status) => {
            p.finish()?;
            Ok(status)
        }
        Err(PrimaryError::BackupLost(why)) => {
            p.heartbeats.stop();
            p.without_backup(why)
        }
        // A send that fails is the backup going away mid-epoch.
        Err(e @ (PrimaryError::Send(_) | PrimaryError::Transport(_))) => {
            p.heartbeats.stop();
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
    output: Option<OutputCommit>,
) {
    std::thread::Builder::new()
        .name("acks".into())
        .spawn(move || loop {
            let ev = match rx.recv(Some(timeout)) {
                Ok(Message::Ack { epoch }) => match inflight.acked(epoch) {
                    Ok(_) => {
                        // Output commit: what the guest sent up to this epoch may leave now.
                        if let Some(o) = &output {
                            o.commit(epoch);
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

    /// Whether the run should end: the guest exited, `--seconds` (counted from the
    /// guest's start, pre-copy included) are over, or SIGTERM/SIGINT arrived.
    fn end_requested(&mut self) -> Result<bool, PrimaryError> {
        if self.exit_status.is_none() {
            self.exit_status = self.check_guest()?;
        }
        Ok(self.exit_status.is_some()
            || stop_requested()
            || self
                .opts
                .seconds
                .is_some_and(|s| self.started.elapsed() >= s))
    }

    /// Pre-copy: the whole memory while the guest runs, then rounds of what it dirtied
    /// meanwhile, until that fits in one epoch; it goes with epoch 1.
    ///
    /// Auto-converge: each round may leave at most a quarter of what it sends (or half an
    /// epoch) dirty. After every step the dirty set is counted (without harvesting it) and
    /// the share of time the vCPUs are held is set so that the rest of the round stays
    /// within that budget: from the guest's dirty rate this round (pages per second it
    /// ran) and the link's pace, the guest may run `budget left / rate` more, out of the
    /// time the round still takes (at most 99% held). A round at 99% that still does not
    /// shrink is followed by one with the guest paused (the final pause then lasts one
    /// round of what is left). Without a dirty count (dirty ring), a round whose guest
    /// dirtied more than half of what it sent raises the share (50%, then halving what it
    /// runs). When the run is to end during pre-copy, the guest is paused for good and the
    /// rounds finish without it running.
    fn initial_sync(&mut self) -> Result<(), PrimaryError> {
        let mem_pages = (ram_size(self.machine.memory()) / PAGE_SIZE as u64) as usize;
        let cap = self.opts.max_epoch_pages;
        // Everything counts as dirty for round 0: forget what the boot dirtied.
        self.machine.harvest(&mut self.pfns)?;
        let mut round_pfns = DirtySet::all(mem_pages as u64);
        let start = Instant::now();
        let mut sent_bytes = 0u64;
        let mut synced = 0u64;
        let mut ending = false;
        let mut stop_and_copy = false;
        let mut max_throttle = 0;
        let mut last_dirty = usize::MAX;
        for round in 0.. {
            let total = (round_pfns.len() * PAGE_SIZE) as u64;
            let budget = (cap / 2).max(round_pfns.len() / 4) as f64;
            let mut done = 0u64;
            let mut last_report = Instant::now();
            let round_start = Instant::now();
            // Seconds the guest ran this round (as far as the throttle lets it).
            let mut ran = 0f64;
            let mut step_start = Instant::now();
            for chunk in round_pfns.chunks(SYNC_CHUNK_PAGES) {
                self.heartbeats.check_in(0);
                if !ending && self.end_requested()? {
                    // The end comes with the final epoch; the guest runs no more.
                    ending = true;
                    self.machine.set_throttle(0);
                    if self.machine.is_running() {
                        self.machine.pause()?;
                    }
                }
                memory::copy_pages(self.machine.memory(), chunk, &mut self.buf)?;
                let staged = StagedPages::new(chunk, &self.buf)?;
                let s = {
                    let mut link = self.link();
                    let s = send_sync(&mut link.tx, &self.encoder, &staged, done, total)?;
                    link.sent();
                    s
                };
                done += (chunk.len() * PAGE_SIZE) as u64;
                synced += (chunk.len() * PAGE_SIZE) as u64;
                sent_bytes += s.bytes;
                if !ending && !stop_and_copy {
                    let held = f64::from(self.machine.throttle()) / 100.0;
                    ran += step_start.elapsed().as_secs_f64() * (1.0 - held);
                    step_start = Instant::now();
                    if let Some(dirty) = self.machine.dirty_count()? {
                        let pct = converge_throttle(
                            budget - dirty as f64,
                            dirty as f64 / ran.max(1e-6),
                            round_start.elapsed().as_secs_f64() * (total - done) as f64
                                / done as f64,
                        );
                        self.machine.set_throttle(pct);
                        max_throttle = max_throttle.max(pct);
                    }
                }
                if last_report.elapsed() >= Duration::from_millis(500) || done == total {
                    last_report = Instant::now();
                    let secs = start.elapsed().as_secs_f64().max(1e-6);
                    info!(
                        "initial sync round {round}: {} of {} MiB ({:.0}%), {:.0} MiB/s of guest memory, {} MiB on the wire, guest held {}%",
                        done >> 20,
                        total >> 20,
                        done as f64 * 100.0 / total.max(1) as f64,
                        synced as f64 / secs / (1 << 20) as f64,
                        sent_bytes >> 20,
                        if ending || stop_and_copy { 100 } else { self.machine.throttle() }
                    );
                }
                self.drain_acks()?;
            }
            // What the guest dirtied since this round began (including pages of this
            // round it wrote again after they were sent).
            self.machine.harvest(&mut self.pfns)?;
            let sent = round_pfns.len();
            round_pfns = std::mem::take(&mut self.pfns);
            let dirty = round_pfns.len();
            if dirty <= cap {
                self.carry = round_pfns;
                break;
            }
            if !ending && !stop_and_copy {
                let t = self.machine.throttle();
                if self.machine.dirty_count()?.is_none() && dirty * 2 > sent {
                    // Nothing to count during the round: judge it by its end.
                    self.machine.set_throttle(throttle_up(t));
                } else if t >= THROTTLE_MAX && dirty * 10 >= last_dirty * 9 {
                    stop_and_copy = true;
                    self.machine.set_throttle(0);
                    self.machine.pause()?;
                    warn!(
                        "initial sync: the guest still dirties faster than the link carries \
                         at {THROTTLE_MAX}% held; it stays paused while the last {} MiB go",
                        (dirty * PAGE_SIZE) >> 20
                    );
                }
                max_throttle = max_throttle.max(self.machine.throttle());
            }
            last_dirty = dirty;
            info!(
                "initial sync round {round} done: the guest dirtied {dirty} pages meanwhile \
                 (more than the {cap} of one epoch); guest held {}%",
                if ending || stop_and_copy {
                    100
                } else {
                    self.machine.throttle()
                }
            );
        }
        self.machine.set_throttle(0);
        if !ending && !self.machine.is_running() {
            self.machine.resume()?;
        }
        info!(
            "initial sync done in {:.2} s ({:.0} MiB/s of guest memory, guest held up to {}% of the time); \
             {} pages go with epoch 1; continuous epochs every {:?}",
            start.elapsed().as_secs_f64(),
            synced as f64 / start.elapsed().as_secs_f64().max(1e-6) / (1 << 20) as f64,
            if stop_and_copy { 100 } else { max_throttle },
            self.carry.len(),
            self.opts.interval
        );
        Ok(())
    }

    /// The link to the backup (the heartbeat thread shares it).
    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
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
        let mut next = Instant::now();
        if let Some(status) = self.exit_status {
            return Ok(u8::try_from(status).unwrap_or(u8::MAX));
        }
        if self.end_requested()? {
            return Ok(self
                .exit_status
                .map_or(0, |s| u8::try_from(s).unwrap_or(u8::MAX)));
        }
        let early = self.opts.early_checkpoint && self.output.is_some();
        let _realtime = Realtime::enter();
        let mut last_stats = Instant::now();
        let mut last_start = Instant::now();
        self.next_dirty_count = Instant::now();
        loop {
            self.heartbeats.check_in(self.epoch);
            let mut deadline = next.min(self.next_dirty_count);
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
            self.collect_sent(Duration::ZERO)?;
            if stop_requested()
                || self
                    .opts
                    .seconds
                    .is_some_and(|s| self.started.elapsed() >= s)
            {
                return Ok(0);
            }
            if last_stats.elapsed() >= STATS_EVERY {
                last_stats = Instant::now();
                info!("{}", self.stats.summary());
            }
            let now = Instant::now();
            let output_waits = early
                && now >= last_start + self.opts.min_interval
                && self.output.as_ref().is_some_and(OutputCommit::output_waits);
            let full = self.dirty_set_full(last_start)?;
            if now < next && !output_waits && !full {
                continue;
            }
            let pacing = self.inflight.lock().pacing();
            // One slot left: give the backup one more interval before the next epoch,
            // unless the epoch is full already.
            if pacing == Pacing::Lengthen
                && !full
                && self.inflight.lock().last_sent() == self.epoch
                && next.elapsed() < self.opts.interval
            {
                next += self.opts.interval / 2;
                continue;
            }
            if pacing == Pacing::Throttle || self.sending.is_some() {
                if !full && self.next_dirty_count != far_future() {
                    // The window is full or the last epoch is still on its way, but the
                    // guest has not dirtied an epoch's worth yet: it runs on meanwhile.
                    if self.sending.is_some() {
                        self.collect_sent(DIRTY_POLL_MIN)?;
                    } else {
                        self.inflight.wait_for_room(0, DIRTY_POLL_MIN);
                    }
                    continue;
                }
                self.throttle()?;
            }
            if now < next {
                if full {
                    self.stats.capped += 1;
                } else {
                    self.stats.early += 1;
                }
            }
            let t0 = Instant::now();
            self.checkpoint(false)?;
            last_start = t0;
            next = t0 + self.opts.interval;
        }
    }

    /// Whether the guest has dirtied an epoch's worth of pages (`max_epoch_pages`) since
    /// the epoch began at `since`. Counts the dirty set when due: halfway to when the cap
    /// would be reached at the rate so far, every 1 to 5 ms.
    fn dirty_set_full(&mut self, since: Instant) -> Result<bool, PrimaryError> {
        let now = Instant::now();
        if now < self.next_dirty_count {
            return Ok(self.dirty_full);
        }
        let Some(count) = self.machine.dirty_count()? else {
            // Not countable here (dirty ring): the ring's size bounds the epoch instead.
            self.next_dirty_count = far_future();
            return Ok(false);
        };
        let count = count + self.carry.len() as u64;
        let cap = self.opts.max_epoch_pages as u64;
        self.dirty_full = count >= cap;
        let ran = now.saturating_duration_since(since).max(DIRTY_POLL_MIN);
        let eta = match count {
            0 => DIRTY_POLL_MAX,
            n => ran.mul_f64(cap.saturating_sub(n) as f64 / n as f64),
        };
        self.next_dirty_count = now + (eta / 2).clamp(DIRTY_POLL_MIN, DIRTY_POLL_MAX);
        Ok(self.dirty_full)
    }

    /// The backup is gone. Output the backup has not acknowledged may leave only once the
    /// backup can no longer promote (invariant 3): by default (`--on-backup-loss fence`)
    /// the guest runs on while its output stays held, the backup is fenced with
    /// `--fence-cmd`, and only on success is the output released and the guest left to run
    /// unprotected. Without a fence command the output stays held until the primary is
    /// stopped. `pause` stops the guest; `continue` releases at once (unsafe: a backup that
    /// was only stalled may promote a state older than what clients saw).
    fn without_backup(&mut self, why: String) -> Result<u8, PrimaryError> {
        let has_output = self.output.is_some();
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
        let release = |o: &Option<OutputCommit>| {
            if let Some(o) = o {
                o.unprotect();
            }
        };
        let fencing = match (self.opts.on_backup_loss, &self.opts.fence) {
            (OnBackupLoss::Continue, _) => {
                release(&self.output);
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
                        release(&self.output);
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

    /// The guest has dirtied an epoch's worth, but the window is full or the last epoch
    /// is still being sent: keep it paused until the backup acknowledges an epoch and the
    /// sender is free. It is left paused for the checkpoint that follows.
    fn throttle(&mut self) -> Result<(), PrimaryError> {
        self.stats.throttled += 1;
        let t = Instant::now();
        self.machine.pause()?;
        let r = self.wait_sent().and_then(|()| self.wait_for_room(0));
        // The guest stays paused: the checkpoint that follows takes it from here.
        self.stats.throttle_time += t.elapsed();
        self.stats.held_us.push_duration(t.elapsed());
        r
    }

    /// Takes the sender thread's report on the epoch it was sending, waiting at most
    /// `timeout` for it: the figures go to the stats, the buffers back for reuse.
    fn collect_sent(&mut self, timeout: Duration) -> Result<(), PrimaryError> {
        if self.sending.is_none() {
            return Ok(());
        }
        let Ok(done) = self.sent.recv_timeout(timeout) else {
            return Ok(());
        };
        self.sending = None;
        let EpochSent { mut job, result } = done;
        // Keep the larger buffers.
        if job.data.capacity() > self.buf.capacity() {
            job.data.clear();
            self.buf = job.data;
        }
        self.pfns.reuse(job.pfns);
        let summary = result?;
        self.stats.wire_bytes.push(summary.bytes);
        for (i, n) in summary.by_encoding.iter().enumerate() {
            self.stats.encodings[i] += n;
        }
        Ok(())
    }

    /// Waits until the sender thread has sent its epoch, for as long as the backup
    /// answers.
    fn wait_sent(&mut self) -> Result<(), PrimaryError> {
        while self.sending.is_some() {
            self.collect_sent(WAIT_SLICE)?;
            self.heartbeats.check_in(self.epoch);
            self.drain_acks()?;
        }
        Ok(())
    }

    /// Waits until an epoch of `bytes` fits in the window, for as long as the backup
    /// answers: the ack reader reports it lost after the heartbeat timeout of silence.
    /// Returns early on SIGTERM/SIGINT (the end waits again).
    fn wait_for_room(&mut self, bytes: u64) -> Result<(), PrimaryError> {
        while !self.inflight.wait_for_room(bytes, WAIT_SLICE) {
            self.heartbeats.check_in(self.epoch);
            self.drain_acks()?;
            if stop_requested() {
                break;
            }
        }
        Ok(())
    }

    /// Waits until `epoch` is acknowledged, for as long as the backup answers.
    fn wait_acked(&mut self, epoch: u64) -> Result<(), PrimaryError> {
        while !self.inflight.wait_acked(epoch, WAIT_SLICE) {
            self.heartbeats.check_in(epoch);
            self.drain_acks()?;
        }
        self.drain_acks()
    }

    /// One epoch. The guest is paused from the capture until the dirty pages are copied;
    /// with `last`, it stays paused (the end of the run).
    fn checkpoint(&mut self, last: bool) -> Result<(), PrimaryError> {
        let t0 = Instant::now();
        let (state, timing) = self.machine.pause_and_capture()?;
        // Output from now on belongs to the next epoch.
        // (The checkpoint being taken is epoch `self.epoch + 1`.)
        if let Some(o) = &self.output {
            o.begin_epoch(self.epoch + 2);
        }
        self.machine.harvest(&mut self.pfns)?;
        self.pfns.merge(&mut self.carry);
        let harvested = t0.elapsed();
        self.pfns.copy_out(self.machine.memory(), &mut self.buf)?;
        let copied = t0.elapsed();
        // Where the dirty set cannot be counted while the guest runs, an epoch may not fit
        // next to those in flight: the guest stays paused until it does.
        let room = self.buf.len() as u64 + STATE_ALLOWANCE;
        if !self.inflight.lock().has_room(room) {
            self.stats.throttled += 1;
            let t = Instant::now();
            self.wait_for_room(room)?;
            self.stats.throttle_time += t.elapsed();
            self.stats.held_us.push_duration(t.elapsed());
        }
        if !last {
            self.machine.resume_nowait()?;
        }
        let pause = t0.elapsed();
        self.dirty_full = false;
        self.next_dirty_count = self.next_dirty_count.min(Instant::now() + DIRTY_POLL_MIN);
        self.epoch += 1;
        let epoch = self.epoch;
        let blob = state.to_blob();
        let bytes = (self.buf.len() + blob.len()) as u64;
        self.inflight.lock().sent(epoch, bytes)?;
        self.pause_start.insert(epoch, t0);
        if pause >= LONG_PAUSE {
            info!(
                "epoch {epoch}: the guest was paused {} ms (parked {} ms, state captured {} ms, \
                 dirty set harvested {} ms, {} pages copied {} ms)",
                pause.as_millis(),
                timing.parked.as_millis(),
                timing.captured.as_millis(),
                harvested.as_millis(),
                self.pfns.len(),
                copied.as_millis()
            );
        }
        let st = &mut self.stats;
        st.pause_us.push_duration(pause);
        st.parked_us.push_duration(timing.parked);
        st.captured_us.push_duration(timing.captured);
        st.harvested_us.push_duration(harvested);
        st.copied_us.push_duration(copied);
        st.pages.push(self.pfns.len() as u64);
        if last {
            self.last_state = Some(blob.clone());
        }
        let job = EpochJob {
            epoch,
            pfns: self.pfns.take_vec(),
            data: std::mem::take(&mut self.buf),
            blob,
        };
        // The sender is idle (callers wait for it), so this does not block.
        self.jobs
            .send(job)
            .map_err(|_| PrimaryError::BackupLost("the epoch sender thread is gone".into()))?;
        self.sending = Some(epoch);
        Ok(())
    }

    /// The clean end: the guest paused for good, every epoch in flight acknowledged, a
    /// final epoch and its ack, and `End` with the digest of RAM and state that both sides
    /// print. The waits last as long as the backup answers (a backup still busy with a
    /// large pre-copy keeps sending heartbeats), not a fixed time.
    fn finish(&mut self) -> Result<(), PrimaryError> {
        if self.machine.is_running() {
            self.machine.pause()?;
        }
        let in_flight = self.epoch;
        self.wait_sent()
            .and_then(|()| self.wait_acked(in_flight))
            .map_err(|e| final_not_acked(in_flight + 1, e))?;
        self.checkpoint(true)?;
        let epoch = self.epoch;
        self.wait_sent()
            .and_then(|()| self.wait_acked(epoch))
            .map_err(|e| final_not_acked(epoch, e))?;
        let state = self.last_state.take().unwrap_or_default();
        let digest = digest_guest_memory(self.machine.memory(), &state)?;
        {
            let mut link = self.link();
            link.tx.send(&Message::End {
                epoch,
                digest: digest.0,
            })?;
            link.sent();
        }
        self.heartbeats.stop();
        self.machine.flush_console();
        println!("final epoch={epoch} digest={digest}");
        info!("{}", self.stats.summary());
        info!("{}", self.stats.pause_breakdown());
        if let Some(o) = &self.output {
            let (p50, p99, held) = o.hold_times();
            let c = o.counters();
            info!(
                "output commit: {held} frames held, hold time p50={p50} us p99={p99} us, \
                 {} frames sent, {} tap errors, {} early checkpoints",
                c.sent, c.tap_errors, self.stats.early
            );
        }
        if self.stats.throttled > 0 {
            warn!(
                "the backup fell behind {} times; the guest was held for {:.1} ms in all, {:.1} ms at most at once",
                self.stats.throttled,
                self.stats.throttle_time.as_secs_f64() * 1000.0,
                self.stats.held_us.max() as f64 / 1000.0
            );
        }
        Ok(())
    }
}

/// The final epoch could not be acknowledged: the backup went silent at the end.
fn final_not_acked(epoch: u64, e: PrimaryError) -> PrimaryError {
    match e {
        PrimaryError::BackupLost(why) => {
            PrimaryError::BackupLost(format!("final epoch {epoch} not acknowledged: {why}"))
        }
        e => e,
    }
}

/// The share of time (%) to hold the guest for the rest of a pre-copy round: it may
/// dirty `budget_left` more pages, dirties `rate` pages a second while it runs, and the
/// round takes `left` more seconds.
fn converge_throttle(budget_left: f64, rate: f64, left: f64) -> u32 {
    if budget_left <= 0.0 {
        return THROTTLE_MAX;
    }
    if rate <= 0.0 || left <= 0.0 {
        return 0;
    }
    let may_run = budget_left / rate;
    let held = 1.0 - may_run / left;
    ((held * 100.0).ceil().max(0.0) as u32).min(THROTTLE_MAX)
}

/// A larger share of time the guest is held: 50%, then half of the share it still runs.
fn throttle_up(pct: u32) -> u32 {
    if pct < 50 {
        50
    } else {
        (pct + (100 - pct).div_ceil(2)).min(THROTTLE_MAX)
    }
}

/// "Never", for a dirty set that cannot be counted.
fn far_future() -> Instant {
    static FAR: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *FAR.get_or_init(|| Instant::now() + Duration::from_secs(365 * 24 * 3600))
}
