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
//!   run slices) set after 8 MiB steps (at most every 2 ms) so that each round leaves at
//!   most a quarter of what it sent; if even 99% does not make a round shrink, the last
//!   round goes with the guest paused.
//! - Pages the kernel's page map shows to hold only zeros (never written, see
//!   [`crate::vstate::pagemap`]) are sent as zero pages without being read: a mostly
//!   untouched guest's initial sync costs a few bytes a page on each side.
//!
//! A peer is lost only after it has been silent for the heartbeat timeout: any bytes
//! count as life (see the transport), the primary sends heartbeats from a thread of its
//! own whenever the link has been idle for a while, and the backup from its receive loop.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use checkpoint::delta_cache::DeltaCache;
use checkpoint::digest::digest_guest_memory;
use checkpoint::encode::{
    send_epoch, send_sync, send_sync_zeros, EncoderConfig, EpochEncoder, StagedPages,
};
use checkpoint::handshake::{primary_handshake, HandshakeError};
use checkpoint::inflight::{InFlight, Pacing, SharedInFlight};
use checkpoint::protocol::{DiskInfo, Hello, MemoryRegion, Message};
use checkpoint::tls::LinkSecurity;
use checkpoint::transport::{Connection, FrameReceiver, FrameSender, TransportError};
use checkpoint::PAGE_SIZE;
use crossbeam_channel::{unbounded, Receiver, Sender};
use thiserror::Error;

use super::control::{self, AfterSwitchover, Request, RequestState};
use super::fence::{fence_until_done, FenceAgent, FenceConfig, FenceError};
use super::metrics;
use super::stats::PrimaryStats;
use super::status::{self, GuestState, Protection, Role};
use super::{guest_id, install_stop_handler, stop_requested};
use crate::devices::OutputCommit;
use crate::machine::{Machine, MachineError};
use crate::vstate::dirty::DirtySet;
use crate::vstate::memory::{self, ram_size};
use crate::vstate::vcpu::VcpuEvent;
use crate::{info, warn};

mod backup_loss;
mod disks;
mod epochs;
mod link;
mod precopy;
mod switchover;

use link::{spawn_ack_reader, spawn_sender, AckEvent, EpochJob, EpochSent, Heartbeats, Link};

/// The primary could not replicate, or the run ended in a failure.
#[derive(Debug, Error)]
pub enum PrimaryError {
    /// The machine failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The backup could not be reached in time.
    #[error("cannot reach the backup at {peer} within {timeout:?}: {source}")]
    Connect {
        /// The backup's address.
        peer: String,
        /// How long the primary tried.
        timeout: Duration,
        /// The last error.
        source: TransportError,
    },
    /// The backup was reached but the link's TLS handshake failed.
    #[error("the link to the backup failed its TLS handshake: {0}")]
    Link(#[source] TransportError),
    /// No link security was configured (neither TLS nor `--insecure`).
    #[error(
        "no replication link configured: give --tls-cert, --tls-key and --tls-ca (or \
         --insecure, unsafe)"
    )]
    NoLink,
    /// The backup refused the handshake.
    #[error(transparent)]
    Handshake(#[from] checkpoint::handshake::HandshakeError),
    /// Encoding or sending an epoch failed.
    #[error("sending to the backup failed: {0}")]
    Send(#[from] checkpoint::encode::EncodeError),
    /// The link to the backup failed.
    #[error("sending to the backup failed: {0}")]
    Transport(#[from] TransportError),
    /// The primary's bookkeeping of epochs in flight found an inconsistency.
    #[error("epoch bookkeeping: {0}")]
    InFlight(#[from] checkpoint::inflight::InFlightError),
    /// The backup refused an epoch.
    #[error("the backup rejected epoch {epoch}: {reason}")]
    Rejected {
        /// The epoch.
        epoch: u64,
        /// The backup's reason.
        reason: String,
    },
    /// The backup went silent or away.
    #[error("lost the backup: {0}")]
    BackupLost(BackupLoss),
    /// A dirty page lies outside guest memory.
    #[error(transparent)]
    Copy(#[from] memory::PageOutOfRange),
    /// The final digest could not be computed.
    #[error("digest: {0}")]
    Digest(#[from] checkpoint::digest::DigestError),
    /// A disk image could not be read for its initial sync.
    #[error("{0}")]
    Disk(String),
    /// A vCPU crashed (the guest cannot go on).
    #[error("vCPU {vcpu}: {message}")]
    Crashed {
        /// The vCPU.
        vcpu: u32,
        /// Why it stopped.
        message: String,
    },
}

/// Why the primary counts the backup as lost.
#[derive(Debug, Error)]
pub enum BackupLoss {
    /// The backup sent nothing, not even a heartbeat, for this long.
    #[error("no word from the backup for {0:?}")]
    Silent(Duration),
    /// Reading from the backup failed (a closed or broken connection).
    #[error(transparent)]
    Receive(TransportError),
    /// Sending to the backup failed.
    #[error("sending to the backup failed: {0}")]
    Send(TransportError),
    /// Encoding or sending an epoch failed.
    #[error("sending to the backup failed: {0}")]
    Epoch(checkpoint::encode::EncodeError),
    /// The backup acknowledged an epoch that was not in flight.
    #[error(transparent)]
    Ack(checkpoint::inflight::InFlightError),
    /// The backup sent a message that has no place on the ack stream.
    #[error("unexpected {0:?} from the backup")]
    Unexpected(checkpoint::protocol::MessageKind),
    /// The backup's messages do not fit what was asked (the reason).
    #[error("{0}")]
    Protocol(String),
    /// The backup stopped in order (`Leave`): its replica is dropped, it never promotes.
    #[error(
        "the backup stopped in order after committed epoch {epoch} (it dropped its replica){}",
        if reason.is_empty() { String::new() } else { format!(": {reason}") }
    )]
    Left {
        /// Its last committed epoch.
        epoch: u64,
        /// Why, if not an operator's stop.
        reason: String,
    },
    /// The thread that sends epochs ended.
    #[error("the epoch sender thread is gone")]
    SenderGone,
    /// The backup was lost while the primary waited for the final epoch's ack.
    #[error("final epoch {epoch} not acknowledged: {why}")]
    FinalNotAcked {
        /// The final epoch.
        epoch: u64,
        /// Why the backup counts as lost.
        why: Box<BackupLoss>,
    },
}

/// Options of `lockstep primary` besides the guest's.
#[derive(Clone, Debug)]
pub struct PrimaryOptions {
    /// The backup's address (`host:port`).
    pub peer: String,
    /// Time between two checkpoints (the epoch interval).
    pub interval: Duration,
    /// End the run after this long (pre-copy included); `None`: until the guest exits or a signal.
    pub seconds: Option<Duration>,
    /// How long to keep trying to reach the backup.
    pub connect_timeout: Duration,
    /// The guest's name; both sides must agree on it.
    pub name: String,
    /// Unacknowledged epochs allowed in flight.
    pub window: usize,
    /// How long the backup may stay silent before it counts as lost.
    pub backup_timeout: Duration,
    /// What to do when the backup is lost.
    pub on_backup_loss: OnBackupLoss,
    /// How to fence the backup before releasing output it has not acknowledged.
    pub fence: Option<FenceAgent>,
    /// End an epoch early when the guest's output waits for it and the epoch has run at
    /// least `min_interval` (so a reply waits about one pause plus one round trip).
    pub early_checkpoint: bool,
    /// The shortest epoch an early checkpoint may end.
    pub min_interval: Duration,
    /// An epoch ends early when the guest has dirtied this many pages, which bounds the
    /// checkpoint pause (the pages are copied while the guest is paused).
    pub max_epoch_pages: usize,
    /// How the link to the backup is secured (mutual TLS, or explicitly none); `None`: not
    /// configured, and the process cannot protect its guest.
    pub link: Option<LinkSecurity>,
    /// At this share of the interval (%), the pages dirtied so far are harvested and copied
    /// while the guest runs; the pause then copies only the pages written since (0: all
    /// in the pause). Pre-copy inside the epoch, as live migration's rounds do before
    /// its stop-and-copy.
    pub epoch_precopy_pct: u32,
    /// Where the role's figures go as JSON when it ends (`--stats-json`; see
    /// [`PrimaryStats::to_json`]); `None`: only to the log.
    pub stats_json: Option<PathBuf>,
}

impl PrimaryOptions {
    /// The defaults of `lockstep primary` for the pair `name` and the backup at `peer`
    /// (no fence agent: a lost backup's output stays held).
    pub fn new(peer: String, name: String) -> PrimaryOptions {
        PrimaryOptions {
            peer,
            interval: DEFAULT_INTERVAL,
            seconds: None,
            connect_timeout: Duration::from_secs(10),
            name,
            window: DEFAULT_WINDOW,
            backup_timeout: super::DEFAULT_HEARTBEAT_TIMEOUT,
            on_backup_loss: OnBackupLoss::Fence,
            fence: None,
            early_checkpoint: true,
            min_interval: Duration::from_micros(500),
            max_epoch_pages: DEFAULT_MAX_EPOCH_PAGES,
            link: None,
            epoch_precopy_pct: DEFAULT_EPOCH_PRECOPY_PCT,
            stats_json: None,
        }
    }
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

/// No output commit session yet (see `Primary::session`).
pub(super) const NO_SESSION: u64 = u64::MAX;

/// Default epoch interval; see README ("Choosing the interval").
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(25);
/// Default share of the interval after which an epoch's dirty pages so far are copied
/// while the guest runs (%); see README ("Choosing the interval").
pub const DEFAULT_EPOCH_PRECOPY_PCT: u32 = 75;
/// Default number of unacknowledged epochs in flight.
pub const DEFAULT_WINDOW: usize = 4;
/// Bytes of unacknowledged epochs allowed in flight.
const MAX_INFLIGHT_BYTES: u64 = 512 << 20;
/// XOR bases the primary keeps (64 MiB).
const DELTA_CACHE_PAGES: usize = 16 << 10;
/// Default cap on the pages of one epoch (16 MiB): see `PrimaryOptions::max_epoch_pages`.
pub const DEFAULT_MAX_EPOCH_PAGES: usize = 4 << 10;
/// Pages copied and sent per pre-copy step (8 MiB): auto-converge looks at the dirty set
/// after each, if it last did [`SYNC_COUNT_EVERY`] ago or more.
const SYNC_CHUNK_PAGES: usize = 2 << 10;
/// Pre-copy counts the dirty set at most this often: a step of zero pages found so without
/// reading them takes a few tens of µs, and counting the dirty set of a large guest about
/// as long (8 GiB: a 256 KiB bitmap copied out and counted).
const SYNC_COUNT_EVERY: Duration = Duration::from_millis(2);
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

/// How often the pause and commit figures go to the control socket's status.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// How long one handshake attempt waits for the backup's answer before the connection is
/// made again (within `--connect-timeout-s`).
const HANDSHAKE_ATTEMPT: Duration = Duration::from_secs(2);

struct Primary<'m> {
    machine: &'m mut Machine,
    /// Output commit on the guest's network device, if it has one.
    output: Option<OutputCommit>,
    /// A message whenever output starts to wait for a checkpoint (see
    /// [`OutputCommit::wake_on_output`]): the epoch loop sleeps until then.
    output_wake: Receiver<()>,
    /// The output commit session of this protection ([`NO_SESSION`] until the output is
    /// held: a re-protected guest's output is held from epoch 1's capture on).
    session: Arc<AtomicU64>,
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
    /// The pages of the running epoch copied while it ran (`epoch_precopy_pct`), and their
    /// data; the pause copies what was written since, which wins over these.
    early: DirtySet,
    early_buf: Vec<u8>,
    /// Whether this epoch's early copy is done.
    early_done: bool,
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
    /// A switchover under way: what this side does once the backup has the guest, the
    /// listener of the backup it becomes (bound when the request was taken), the
    /// backup's answer to `Handover`, and whether it took the guest.
    handover: Option<AfterSwitchover>,
    handover_listener: Option<std::net::TcpListener>,
    handover_reply: Option<Result<(), String>>,
    handed: bool,
    /// This side's address of the replication link.
    local_addr: Option<std::net::SocketAddr>,
    /// When protection began (before connecting), and when the first epoch was committed.
    began: Instant,
    protected_at: Option<Instant>,
    /// When the initial sync of memory began (after the disks' sync).
    sync_began: Option<Instant>,
}

/// How a protected run ended (see [`protect`]).
pub enum ProtectEnd {
    /// The guest exited, with this status; replication ended cleanly (final epoch, `End`).
    Exited(u8),
    /// The run was ended from outside (SIGTERM, `--seconds`, `POST /stop`): final epoch
    /// and `End` sent, the guest paused.
    Stopped,
    /// A planned switchover is done: the backup took the final epoch and promotes it.
    /// This side's guest is paused for good and must be dropped (its tap is the
    /// backup's now); then it does what `then` says (as the backup, on `listener`, bound
    /// before the hand-over).
    HandedOver {
        /// What this side does now.
        then: AfterSwitchover,
        /// The new backup's listener, with `then` = backup.
        listener: Option<std::net::TcpListener>,
    },
    /// The backup was lost; the guest runs on unprotected (`--on-backup-loss fence` or
    /// `continue`).
    BackupLost(Unprotected),
}

/// A guest left running without its backup: whether its output is still held, and the
/// fencing that releases it.
pub struct Unprotected {
    /// The guest's output commit, if it has a network device.
    pub output: Option<OutputCommit>,
    /// The fencing under way; its success releases the held output. `None`: nothing is
    /// held, or nothing fences the backup (the output then stays held).
    pub fencing: Option<Receiver<Result<(), FenceError>>>,
    /// When the run ends (`--seconds`), if it does.
    pub deadline: Option<Instant>,
}

/// Protects `machine` (paused after boot, or running: a promoted or standalone guest) with
/// the backup at `opts.peer`: handshake, pre-copy while the guest runs, then epochs with
/// output commit until the guest exits, the run is ended, a switchover hands the guest
/// over, or the backup is lost (see [`ProtectEnd`]). The guest runs when this returns,
/// except after `Exited`, `Stopped` and `HandedOver`.
///
/// Errors before the first epoch is acknowledged (no backup, a refused handshake) leave
/// the guest as it was: running when it ran, unprotected, its output flowing.
pub fn protect(machine: &mut Machine, opts: PrimaryOptions) -> Result<ProtectEnd, PrimaryError> {
    let began = Instant::now();
    install_stop_handler();
    // A guest booted for protection is the primary's from the start; a running one (a
    // re-protect) becomes it once the backup accepted it.
    let running = machine.is_running();
    if !running {
        status::start_role(Role::Primary);
        status::update(|s| {
            s.name = opts.name.clone();
            s.protection = Protection::Unprotected;
        });
    }
    let link = opts.link.as_ref().ok_or(PrimaryError::NoLink)?;
    let mem_size = ram_size(machine.memory());
    let disks: Vec<DiskInfo> = machine
        .disks()
        .iter()
        .map(|d| DiskInfo {
            size: d.image().1,
            readonly: !d.writable(),
        })
        .collect();
    let hello = Hello::new(
        machine.vcpu_count() as u32,
        vec![MemoryRegion {
            gpa: 0,
            len: mem_size,
        }],
        guest_id(&opts.name),
    )
    .with_disks(disks);
    let conn = connect_and_greet(link, &opts.peer, opts.connect_timeout, &hello)?;
    match link {
        LinkSecurity::Tls(_) => info!(
            "the link to the backup at {} is mutual TLS 1.3 (the pair's certificates)",
            opts.peer
        ),
        LinkSecurity::Insecure => warn!(
            "the link to the backup at {} runs with --insecure: UNSAFE, neither authenticated \
             nor encrypted (the guest's memory is readable on the way)",
            opts.peer
        ),
    }
    if running {
        status::start_role(Role::Primary);
        status::role_change(
            Role::Primary,
            Protection::Unprotected,
            GuestState::Running,
            format!(
                "protect: syncing the running guest to the backup at {}",
                opts.peer
            ),
        );
    }
    info!(
        "backup at {} accepted the guest ({} MiB, {} vCPUs)",
        opts.peer,
        mem_size >> 20,
        hello.vcpu_count
    );
    let local_addr = conn.local_addr();
    let (mut tx, rx) = conn.split();
    // A send that the backup takes nothing of for the heartbeat timeout fails: the backup
    // is then as silent as the ack reader would find it, and no thread (the initial sync,
    // the epoch sender, the heartbeats, which hold the link meanwhile) waits on it forever.
    tx.set_timeout(Some(opts.backup_timeout));
    let inflight = Arc::new(SharedInFlight::new(InFlight::new(
        opts.window,
        MAX_INFLIGHT_BYTES,
        0,
    )));
    let (ack_tx, acks) = unbounded();
    let output = machine.net().map(|n| n.output());
    let (wake_tx, output_wake) = crossbeam_channel::bounded(1);
    if let Some(o) = &output {
        o.wake_on_output(wake_tx);
    }
    // Output commit's session (see OutputCommit::protect), shared with the ack reader.
    // A guest booted for protection holds its output from its first instruction: no
    // client ever sees a reply of an unprotected guest. A running guest (re-protect) was
    // unprotected until now and stays so until epoch 1 is captured: before the backup
    // commits epoch 1 it cannot take over, so output released during the initial sync
    // is never contradicted (the guest is as unprotected as before), and clients do not
    // wait out a whole initial copy.
    let session = Arc::new(AtomicU64::new(NO_SESSION));
    let hold_now = !machine.is_running();
    if let (Some(o), true) = (&output, hold_now) {
        session.store(o.protect(1), Ordering::SeqCst);
    }
    status::watch_output(output.clone());
    status::watch_inflight(Some(Arc::clone(&inflight)));
    status::update(|s| {
        s.guest = GuestState::Running;
    });
    status::set_protection(Protection::Syncing, "initial sync started");
    spawn_ack_reader(
        rx,
        Arc::clone(&inflight),
        ack_tx,
        opts.backup_timeout,
        output.clone().map(|o| (o, Arc::clone(&session))),
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
        output_wake,
        session,
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
        early: DirtySet::default(),
        early_buf: Vec::new(),
        early_done: false,
        epoch: 0,
        pause_start: HashMap::new(),
        last_state: None,
        exit_status: None,
        started: Instant::now(),
        next_dirty_count: Instant::now(),
        dirty_full: false,
        handover: None,
        handover_listener: None,
        handover_reply: None,
        handed: false,
        local_addr,
        began,
        protected_at: None,
        sync_began: None,
    };
    if !p.machine.is_running() {
        p.machine.resume()?;
    }
    let ran = p
        .sync_disks()
        .and_then(|()| p.initial_sync())
        .and_then(|()| p.finish_disk_sync())
        .and_then(|()| loop {
            let exit = p.epochs()?;
            if p.handover.is_none() || p.switch_over()? {
                break Ok(exit);
            }
        });
    let end = match ran {
        Ok(_) if p.handed => {
            p.publish_figures();
            status::update(|s| s.guest = GuestState::Paused);
            Ok(ProtectEnd::HandedOver {
                then: p.handover.take().unwrap_or(AfterSwitchover::Stop),
                listener: p.handover_listener.take(),
            })
        }
        Ok(exit) => {
            let finished = p.finish();
            p.publish_figures();
            finished?;
            if p.exit_status.is_some() {
                status::update(|s| s.guest = GuestState::Exited);
                Ok(ProtectEnd::Exited(exit))
            } else {
                status::update(|s| s.guest = GuestState::Paused);
                Ok(ProtectEnd::Stopped)
            }
        }
        Err(PrimaryError::BackupLost(why)) => {
            p.heartbeats.stop();
            p.without_backup(why)
        }
        // A send that fails is the backup going away mid-epoch.
        Err(PrimaryError::Send(e)) => {
            p.heartbeats.stop();
            p.without_backup(BackupLoss::Epoch(e))
        }
        Err(PrimaryError::Transport(e)) => {
            p.heartbeats.stop();
            p.without_backup(BackupLoss::Send(e))
        }
        Err(e) => Err(e),
    };
    // The role's figures, however it ended: a primary that goes on unprotected or hands
    // the guest over starts afresh if it protects again.
    if let Some(path) = &p.opts.stats_json {
        match p.stats.write_json(path) {
            Ok(()) => info!("the figures of this protection are in {}", path.display()),
            Err(e) => warn!(
                "--stats-json {}: cannot write the figures: {e}",
                path.display()
            ),
        }
    }
    // No epoch takes the disks' writes any more: a guest that runs on unprotected must not
    // pile them up (a later protect starts its own disk sync).
    for d in p.machine.disks() {
        d.record_writes(false);
    }
    end
}

/// Connects to the backup and runs the handshake. A backup that closes the connection or
/// goes silent during the handshake (it was stopped or restarted meanwhile) is tried
/// again until `timeout` has passed since the first try, as one that is not listening
/// yet; a refusal (its answer, or TLS) is final.
fn connect_and_greet(
    link: &LinkSecurity,
    peer: &str,
    timeout: Duration,
    hello: &Hello,
) -> Result<Connection, PrimaryError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut conn = connect(link, peer, left.max(Duration::from_millis(100)))?;
        // Under TLS 1.3 the backup's verdict on this side's certificate arrives after the
        // client's handshake completed: with the answer to the hello.
        // A backup answers the hello in milliseconds: a silent one is tried again within
        // the deadline rather than waited for until it has passed.
        let attempt = left.clamp(Duration::from_millis(500), HANDSHAKE_ATTEMPT);
        match primary_handshake(&mut conn, hello, attempt) {
            Ok(()) => return Ok(conn),
            Err(HandshakeError::Transport(t @ TransportError::Tls { .. })) => {
                return Err(PrimaryError::Link(t))
            }
            Err(HandshakeError::Transport(t)) if Instant::now() < deadline && !stop_requested() => {
                warn!("the handshake with the backup at {peer} failed ({t}); trying again");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn connect(link: &LinkSecurity, peer: &str, timeout: Duration) -> Result<Connection, PrimaryError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match link.connect(peer, left.max(Duration::from_millis(100))) {
            Ok(c) => return Ok(c),
            // Reached, but refused: a wrong key or certificate does not heal with time. (A
            // handshake that timed out, a busy backup, is tried again below.)
            Err(e @ TransportError::Tls { .. }) => return Err(PrimaryError::Link(e)),
            // The backup may still be starting: try again until the deadline, or a stop.
            Err(_) if Instant::now() < deadline && !stop_requested() => {
                std::thread::sleep(Duration::from_millis(50))
            }
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

impl Primary<'_> {
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
        Ok(self.exit_status.is_some() || self.run_is_over())
    }

    /// SIGTERM/SIGINT arrived, or `--seconds` have passed since the guest started.
    fn run_is_over(&self) -> bool {
        stop_requested()
            || self
                .opts
                .seconds
                .is_some_and(|s| self.started.elapsed() >= s)
    }

    /// The pause and commit percentiles to the control socket's status (outside the
    /// pause: sorting the samples takes a while on a long run).
    fn publish_figures(&self) {
        let pause = (
            self.stats.recent_pause_us.percentile(50.0),
            self.stats.recent_pause_us.percentile(99.0),
        );
        let commit = (
            self.stats.recent_commit_us.percentile(50.0),
            self.stats.recent_commit_us.percentile(99.0),
        );
        super::events::throttle_totals(self.stats.throttled, self.stats.throttle_time);
        metrics::throttle_totals(self.stats.throttled, self.stats.throttle_time);
        status::update(|s| {
            s.pause_us = pause;
            s.commit_us = commit;
        });
    }

    /// The link to the backup (the heartbeat thread shares it).
    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The final epoch could not be acknowledged: the backup went silent at the end.
fn final_not_acked(epoch: u64, e: PrimaryError) -> PrimaryError {
    match e {
        PrimaryError::BackupLost(why) => PrimaryError::BackupLost(BackupLoss::FinalNotAcked {
            epoch,
            why: Box::new(why),
        }),
        e => e,
    }
}

/// "Never", for a dirty set that cannot be counted.
fn far_future() -> Instant {
    static FAR: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *FAR.get_or_init(|| Instant::now() + Duration::from_secs(365 * 24 * 3600))
}
