//! The backup: receives epochs into staging, verifies each whole, applies it in one step
//! and acknowledges it. Its guest memory plus the last committed state blob are always a
//! runnable machine (hot standby); `--run-after-end` runs it once replication ends cleanly.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use checkpoint::protocol::{Hello, MemoryRegion, Message};
use checkpoint::staging::{Staging, Step};
use checkpoint::tls::LinkSecurity;
use checkpoint::transport::{Connection, TransportError};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use thiserror::Error;

use super::control::{self, Request};
use super::disks::BackupDisks;
use super::fence::{fence_attempts, FenceConfig, FenceError};
use super::metrics;
use super::status::{self, GuestState, Protection, Role};
use super::{guest_id, install_stop_handler, stop_requested};
use crate::devices::disk::{DiskConfig, DiskError};
use crate::devices::serial::Console;
use crate::devices::NetConfig;
use crate::machine::MachineError;
use crate::persist::state::MachineState;
use crate::persist::PersistError;
use crate::vstate::memory::{self, GuestMemory, MemoryError};
use crate::{info, warn};
use crossbeam_channel::Receiver;

/// The backup could not replicate, or replication ended without a clean end.
#[derive(Debug, Error)]
pub enum BackupError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: String,
        /// The error from the socket.
        source: std::io::Error,
    },
    /// The connection from the primary failed.
    #[error("connection from the primary failed: {0}")]
    Transport(#[from] TransportError),
    /// No link security was configured (neither TLS nor `--insecure`).
    #[error(
        "no replication link configured: give --tls-cert, --tls-key and --tls-ca (or \
         --insecure, unsafe)"
    )]
    NoLink,
    /// The primary's first message was not `Hello` (its kind).
    #[error("expected the primary's Hello, got {0:?}")]
    NoHello(checkpoint::protocol::MessageKind),
    /// The primary sent something else than heartbeats while it waited for the disks'
    /// chunk sums (its kind).
    #[error("expected only heartbeats from the primary while reading the disk images, got {0:?}")]
    NotAHeartbeat(checkpoint::protocol::MessageKind),
    /// The primary's guest does not fit this backup (the differences, as sent to the
    /// primary in `Refuse`).
    #[error("refused the primary: {0}")]
    Refused(String),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The final digests differ: replication diverged.
    #[error("digest mismatch at final epoch {epoch}: primary {primary}, backup {local}")]
    DigestMismatch {
        /// The final epoch.
        epoch: u64,
        /// The primary's digest.
        primary: String,
        /// The backup's digest.
        local: String,
    },
    /// The primary went away before the clean end.
    #[error("lost the primary ({why}); the backup holds committed epoch {committed}")]
    PrimaryLost {
        /// Why it counts as lost.
        why: PrimaryLoss,
        /// The last committed epoch.
        committed: u64,
    },
    /// The primary was lost, but this backup cannot run the guest (`cause`): it did not
    /// fence the primary and does not promote.
    #[error(
        "lost the primary ({why}) at committed epoch {committed}, but cannot take over: \
         {cause}; the primary was NOT fenced"
    )]
    CannotTakeOver {
        /// Why the primary counts as lost.
        why: PrimaryLoss,
        /// The last committed epoch.
        committed: u64,
        /// Why the guest cannot run here.
        cause: String,
    },
    /// SIGTERM or SIGINT before the clean end; the last committed epoch.
    #[error("stopped before the primary ended replication; the backup holds committed epoch {0}")]
    Stopped(u64),
    /// The committed state blob is unreadable.
    #[error("committed state: {0}")]
    State(#[from] PersistError),
    /// The machine could not be restored or run.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// Fencing the primary failed.
    #[error(transparent)]
    Fence(#[from] FenceError),
    /// The staging area (pages received but not committed) failed.
    #[error("digest: {0}")]
    Staging(#[from] checkpoint::staging::StagingError),
    /// A disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The backup's disk failed: it left replication (the primary was told).
    #[error("{0}; the backup left replication (the primary goes on without it)")]
    DiskFailed(String),
}

/// Options of `lockstep backup`.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// Address to listen on for the primary (`host:port`).
    pub listen: String,
    /// How the link is secured: only a primary that passes its TLS handshake is read.
    /// `None`: not configured, and the backup role refuses to start.
    pub link: Option<LinkSecurity>,
    /// Bytes of guest RAM to expect; by default what the primary's `Hello` says.
    pub mem: Option<u64>,
    /// vCPUs to expect; by default what the primary's `Hello` says.
    pub vcpus: Option<u32>,
    /// The guest's name; both sides must agree on it.
    pub name: String,
    /// After the primary's clean end, resume the committed guest here and run it to its exit.
    pub run_after_end: bool,
    /// Where the resumed guest's serial console writes.
    pub console: Console,
    /// The network device the resumed guest gets (its state comes from the primary).
    pub net: Option<NetConfig>,
    /// The images the backup keeps the guest's disks in (`--disk path=FILE`), in the
    /// primary's order; the promoted guest runs on them.
    pub disks: Vec<DiskConfig>,
    /// How long the primary may stay silent before it counts as lost.
    pub heartbeat_timeout: Duration,
    /// Test-only: after epoch 1 commits, send no ack for this long (then one cumulative
    /// ack). Shows output commit: the primary's clients see nothing meanwhile.
    pub withhold_acks: Option<Duration>,
    /// How an operator's failover (`POST /failover`) fences the primary: while
    /// replication goes on, so that a fencing that fails leaves the pair as it was.
    pub fence: Option<FenceConfig>,
}

/// The state blob may not exceed this (a few vCPUs' state is ~30 KiB).
const MAX_STATE_LEN: usize = 4 << 20;
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// How replication ended.
pub enum Outcome {
    /// The primary ended it cleanly (final epoch, equal digests).
    Ended(Committed),
    /// The primary handed the guest over (planned switchover): promote the final epoch,
    /// no fencing needed (the primary stopped its guest for good before it said so).
    HandedOver {
        /// The final epoch.
        committed: Committed,
        /// Where the old primary now listens as the new backup, if it does.
        new_backup: Option<String>,
    },
    /// The primary went silent or away after at least one committed epoch.
    PrimaryLost {
        /// Why the primary counts as lost.
        why: PrimaryLoss,
        /// The last committed epoch.
        committed: Committed,
    },
}

/// Why the backup counts its primary as lost.
#[derive(Debug, Error)]
pub enum PrimaryLoss {
    /// Not a byte from the primary for this long: a stalled primary, a lost host or a cut
    /// link; the primary may be alive, so it gets a head start before it is fenced.
    #[error("no data for {0:?}")]
    Silent(Duration),
    /// The connection failed or closed: the primary's process is gone, or the link broke.
    #[error("{0}")]
    Link(TransportError),
    /// An operator asked for failover (`POST /failover`); the primary may be alive.
    #[error("failover requested by the operator")]
    Operator,
}

impl PrimaryLoss {
    /// Whether the primary may still be alive, and so gets a head start before it is
    /// fenced: it went silent (a stall, a cut link), or its stream arrived damaged (a TLS
    /// record or a frame that fails its check: something between the two corrupts it,
    /// while the primary runs on). A connection closed or reset is the primary's process
    /// gone (its kernel closed the socket): no head start.
    pub fn primary_may_be_alive(&self) -> bool {
        matches!(
            self,
            PrimaryLoss::Silent(_)
                | PrimaryLoss::Link(TransportError::Tls { .. } | TransportError::Protocol(_))
        )
    }
}

/// A heartbeat goes to the primary whenever nothing was sent to it for this long (or a
/// quarter of the heartbeat timeout, if shorter): during the initial sync, while a large
/// epoch arrives, between epochs. They come from the receive loop, so they also say that
/// the backup is making progress.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(100);

/// What a finished replication left: the committed machine.
pub struct Committed {
    /// The last committed epoch.
    pub epoch: u64,
    /// Guest RAM as of that epoch.
    pub memory: GuestMemory,
    /// The machine state as of that epoch.
    pub state: MachineState,
    /// The images holding the guest's disks as of that epoch, in order.
    pub disks: Vec<DiskConfig>,
    /// The guest's network output of the committed epochs that the primary may not have
    /// let out yet, in the order the guest sent it (see
    /// [`Staging::committed_output`]); a failover sends it before the guest runs.
    pub output: Vec<bytes::Bytes>,
    /// The epochs `output` belongs to.
    pub output_epochs: Vec<u64>,
}

/// Runs `lockstep backup` until replication ends (see [`Outcome`]).
pub fn run(opts: BackupOptions) -> Result<Outcome, BackupError> {
    run_on(opts, None)
}

/// [`run`] on `listener` when it is given (bound already, for `opts.listen`), else on a
/// listener bound to `opts.listen`.
pub fn run_on(
    mut opts: BackupOptions,
    listener: Option<TcpListener>,
) -> Result<Outcome, BackupError> {
    install_stop_handler();
    status::start_role(Role::Backup);
    status::watch_output(None);
    status::update(|s| {
        s.name = opts.name.clone();
        s.guest = GuestState::Paused;
        s.protection = Protection::Unprotected;
    });
    let listener = match listener {
        Some(l) => l,
        None => TcpListener::bind(&opts.listen).map_err(|source| BackupError::Listen {
            addr: opts.listen.clone(),
            source,
        })?,
    };
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| opts.listen.clone());
    let link = opts.link.clone().ok_or(BackupError::NoLink)?;
    // The images are opened (locked, journal completed, blocks reserved) before any
    // primary is heard: a bad image is a start-up error.
    let disks = BackupDisks::open(&opts.disks)?;
    match &link {
        LinkSecurity::Tls(id) => info!(
            "listening on {local} (TLS: only a primary with a certificate for pair '{}' from \
             the pair's CA is read)",
            id.name()
        ),
        LinkSecurity::Insecure => warn!(
            "listening on {local} with --insecure: UNSAFE, anyone who reaches this port can \
             feed this backup a guest, and the guest's memory crosses the network in clear"
        ),
    }
    let Some(mut conn) = accept(&listener, &link)? else {
        return Err(BackupError::Stopped(0));
    };
    let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    // One primary per backup: any other that connects is refused at once, by name.
    let _refuser = Refuser::start(&listener, &peer, &link);
    let hello = match conn.recv(Some(HELLO_TIMEOUT))? {
        Message::Hello(h) => h,
        other => return Err(BackupError::NoHello(other.kind())),
    };
    let mem_size = opts
        .mem
        .unwrap_or_else(|| hello.regions.iter().map(|r| r.len).sum());
    let ours = Hello::new(
        opts.vcpus.unwrap_or(hello.vcpu_count),
        vec![MemoryRegion {
            gpa: 0,
            len: mem_size,
        }],
        guest_id(&opts.name),
    )
    .with_disks(disks.infos());
    let diffs = ours.differences(&hello, "backup", "primary");
    if !diffs.is_empty() {
        let reason = diffs.join("; ");
        let _ = conn.send(&Message::Refuse {
            reason: reason.clone(),
        });
        return Err(BackupError::Refused(reason));
    }
    let memory = memory::create(mem_size)?;
    conn.send(&Message::HelloOk)?;
    status::set_protection(Protection::Syncing, "the primary connected: initial sync");
    info!(
        "replicating from {peer}: {} MiB, {} vCPUs",
        mem_size >> 20,
        hello.vcpu_count
    );

    send_disk_sums(&mut conn, &disks, opts.heartbeat_timeout)?;
    let sizes = disks.infos().iter().map(|d| d.size).collect();
    // Fresh anonymous memory is all zeros: zero pages for it need not be written.
    let mut staging = Staging::new(&memory, MAX_STATE_LEN)
        .with_zeroed_memory(&memory)
        .with_disks(sizes, Box::new(disks));
    let result = replicate(&mut conn, &memory, &mut staging, &mut opts);
    let disk_configs = opts.disks.clone();
    let committed = |staging: &Staging, memory: GuestMemory| -> Result<Committed, BackupError> {
        Ok(Committed {
            epoch: staging.committed_epoch(),
            memory,
            state: MachineState::from_blob(staging.committed_state())?,
            disks: disk_configs.clone(),
            output: staging.committed_output().cloned().collect(),
            output_epochs: staging.committed_output_epochs(),
        })
    };
    match result {
        Ok(None) => Ok(Outcome::Ended(committed(&staging, memory)?)),
        Ok(Some(new_backup)) => Ok(Outcome::HandedOver {
            committed: committed(&staging, memory)?,
            new_backup: Some(new_backup).filter(|a| !a.is_empty()),
        }),
        Err(BackupError::PrimaryLost {
            why,
            committed: epoch,
        }) if epoch >= 1 => {
            staging.abort();
            warn!("ROLE CHANGE: primary lost ({why}); the backup holds committed epoch {epoch}");
            status::role_change(
                Role::Backup,
                Protection::Unprotected,
                GuestState::Paused,
                format!("primary lost ({why}) at committed epoch {epoch}"),
            );
            Ok(Outcome::PrimaryLost {
                why,
                committed: committed(&staging, memory)?,
            })
        }
        Err(e) => Err(e),
    }
}

/// Receives, verifies, applies and acknowledges epochs until the primary ends cleanly
/// (`Ok(None)`), hands the guest over (`Ok(Some(new backup's address or ""))`) or is lost
/// (`PrimaryLost`, also on an operator's failover request).
fn replicate(
    conn: &mut Connection,
    memory: &GuestMemory,
    staging: &mut Staging,
    opts: &mut BackupOptions,
) -> Result<Option<String>, BackupError> {
    let mut last_report = Instant::now();
    let mut progress = super::events::SyncProgress::new("backup");
    // When each disk's sync data began to arrive (for its rate).
    let mut disk_sync_began: std::collections::HashMap<u32, Instant> = Default::default();
    let mut rejected = 0u64;
    let mut withheld_since: Option<Instant> = None;
    let every = HEARTBEAT_EVERY.min(opts.heartbeat_timeout / 4);
    let mut last_sent = Instant::now();
    // A switchover this backup took: where the old primary will listen ("" if nowhere).
    let mut handover: Option<String> = None;
    // An operator's failover fencing the primary while replication goes on.
    let mut fencing: Option<Receiver<Result<u32, FenceError>>> = None;
    let mut silence_record = Duration::ZERO;
    loop {
        if stop_requested() {
            // An orderly end: the primary learns that this replica is dropped and can
            // never promote, so it goes on without fencing (best effort: a primary that
            // does not hear it fences, as for any lost backup).
            staging.abort();
            let _ = conn.send(&Message::Leave {
                epoch: staging.committed_epoch(),
                reason: String::new(),
            });
            return Err(BackupError::Stopped(staging.committed_epoch()));
        }
        let failover = fencing.is_none() && control::take(|r| *r == Request::Failover).is_some();
        let cannot = failover
            .then(|| runnable_here(staging, opts).err())
            .flatten();
        if let Some(why) = cannot {
            // Fencing the primary for a guest this backup cannot run would leave it running
            // nowhere: the request fails and nothing changes.
            warn!("failover requested: refused, this backup cannot take over: {why}");
            control::finish(Err(format!(
                "this backup cannot take over ({why}); the primary was not fenced, nothing \
                 changed"
            )));
        } else if failover {
            match &opts.fence {
                Some(FenceConfig::Agent(_)) => {
                    info!("failover requested: fencing the primary while replication goes on");
                    fencing = Some(fence_in_background(
                        opts.fence.clone().unwrap_or(FenceConfig::None),
                    ));
                }
                // The cluster fenced it already; --fence none acts without.
                _ => {
                    info!("failover requested on the control socket");
                    return Err(operator_failover(staging));
                }
            }
        }
        if let Some(Ok(result)) = fencing.as_ref().map(|rx| rx.try_recv()) {
            fencing = None;
            match result {
                Ok(_) => return Err(operator_failover(staging)),
                Err(e) => {
                    warn!("failover: fencing the primary failed ({e}); staying the backup");
                    control::finish(Err(format!(
                        "fencing the primary failed: {e}; still the backup, nothing changed"
                    )));
                }
            }
        }
        if last_sent.elapsed() >= every {
            let beat = Message::Heartbeat {
                epoch: staging.committed_epoch(),
            };
            send(conn, &beat, staging)?;
            last_sent = Instant::now();
        }
        // The primary is lost after `heartbeat_timeout` without a byte from it; meanwhile
        // wake up in time for our own heartbeats.
        // Past it, one last look without waiting (a zero timeout) at what already arrived:
        // a backup that was itself stopped or starved must not call the primary silent
        // while its bytes wait in the socket.
        let quiet = conn.last_activity().elapsed();
        let left = opts.heartbeat_timeout.saturating_sub(quiet);
        let mut timeout = left.min(every.saturating_sub(last_sent.elapsed()).max(every / 4));
        if let (Some(d), Some(since)) = (opts.withhold_acks, withheld_since) {
            if since.elapsed() >= d {
                // The withholding is over: one cumulative ack for everything committed.
                send(
                    conn,
                    &Message::Ack {
                        epoch: staging.committed_epoch(),
                    },
                    staging,
                )?;
                last_sent = Instant::now();
                info!(
                    "acks withheld for {d:?}; acknowledged epoch {}",
                    staging.committed_epoch()
                );
                withheld_since = None;
                opts.withhold_acks = None;
            } else {
                timeout = timeout.min(d - since.elapsed());
            }
        }
        let msg = match conn.recv(Some(timeout)) {
            Ok(m) => {
                super::near_miss(
                    "primary",
                    conn.longest_silence(),
                    opts.heartbeat_timeout,
                    &mut silence_record,
                );
                m
            }
            Err(TransportError::Timeout(_))
                if conn.last_activity().elapsed() >= opts.heartbeat_timeout =>
            {
                staging.abort();
                return Err(fenced_or_lost(
                    fencing,
                    PrimaryLoss::Silent(opts.heartbeat_timeout),
                    staging,
                ));
            }
            // Silence so far: the loop checks how long it has lasted.
            Err(TransportError::Timeout(_)) => continue,
            Err(e) => {
                staging.abort();
                return Err(fenced_or_lost(fencing, PrimaryLoss::Link(e), staging));
            }
        };
        if let Message::Handover { epoch, new_backup } = &msg {
            let answer = match can_take_over(staging, *epoch, opts) {
                Ok(()) => {
                    info!("the primary hands the guest over at epoch {epoch} (planned switchover): taken");
                    handover = Some(new_backup.clone());
                    Message::Handover {
                        epoch: *epoch,
                        new_backup: String::new(),
                    }
                }
                Err(reason) => {
                    warn!("the primary offers the guest at epoch {epoch}: refused: {reason}");
                    Message::Refuse { reason }
                }
            };
            send(conn, &answer, staging)?;
            last_sent = Instant::now();
            continue;
        }
        let kind = msg.kind();
        match staging.handle(memory, msg) {
            Ok(Step::Continue) | Ok(Step::Heartbeat { .. }) => {}
            Ok(Step::DiskSync {
                disk,
                bytes_done,
                bytes_total,
            }) => {
                let began = *disk_sync_began.entry(disk).or_insert_with(Instant::now);
                if last_report.elapsed() >= Duration::from_millis(500) || bytes_done >= bytes_total
                {
                    last_report = Instant::now();
                    let rate = bytes_done as f64 / began.elapsed().as_secs_f64().max(1e-6);
                    info!(
                        "disk {disk} initial sync: {} of {} MiB received ({:.0} MiB/s, {:.1} s \
                         left)",
                        bytes_done >> 20,
                        bytes_total >> 20,
                        rate / (1 << 20) as f64,
                        bytes_total.saturating_sub(bytes_done) as f64 / rate.max(1.0)
                    );
                }
            }
            Ok(Step::Sync {
                bytes_done,
                bytes_total,
            }) => {
                if let Some(f) = progress.step(bytes_done, bytes_total) {
                    let round = match f.round {
                        0 => String::new(),
                        r => format!(" round {r}"),
                    };
                    info!(
                        "initial sync{round}: {} of {} MiB received{}",
                        f.bytes_done >> 20,
                        f.bytes_total >> 20,
                        f.pace(),
                    );
                }
            }
            Ok(Step::Committed { epoch }) => {
                if epoch == 1 {
                    if let Err(reason) = check_runnable(staging, opts) {
                        staging.abort();
                        warn!("{reason}: leaving replication");
                        let _ = conn.send(&Message::Leave {
                            epoch: 0,
                            reason: reason.clone(),
                        });
                        return Err(BackupError::Refused(reason));
                    }
                }
                // Committed, whether or not the ack goes out now (the withholding hook).
                status::update(|s| {
                    s.committed_epoch = Some(epoch);
                });
                if let Some(d) = opts.withhold_acks {
                    let since = *withheld_since.get_or_insert_with(Instant::now);
                    if epoch > 1 && since.elapsed() < d {
                        continue;
                    }
                }
                send(conn, &Message::Ack { epoch }, staging)?;
                last_sent = Instant::now();
                metrics::committed(None);
                status::set_protection(Protection::Protected, "the first epoch committed");
                if epoch == 1 {
                    let since = match progress.began() {
                        Some(t) => format!(
                            ", {:.1} ms after the first pre-copy pages arrived",
                            t.elapsed().as_secs_f64() * 1000.0
                        ),
                        None => String::new(),
                    };
                    info!(
                        "epoch 1 committed: the backup holds a runnable copy{since} ({} zero \
                         pages needed no write)",
                        staging.skipped_zero_pages()
                    );
                }
            }
            Ok(Step::End {
                epoch,
                primary,
                local,
            }) => {
                println!("final epoch={epoch} digest={local}");
                if primary != local {
                    return Err(BackupError::DigestMismatch {
                        epoch,
                        primary: primary.to_string(),
                        local: local.to_string(),
                    });
                }
                info!(
                    "replication ended cleanly at epoch {epoch} ({rejected} epochs rejected; \
                     the primary's longest silence {} ms)",
                    conn.longest_silence().as_millis()
                );
                if handover.is_some() {
                    info!(
                        "the primary HANDED OVER the guest at epoch {epoch} (planned switchover)"
                    );
                }
                return Ok(handover);
            }
            Err(e) if e.is_fatal() => {
                // The disks cannot follow: this replica can never be promoted. Leaving
                // tells the primary so (it goes on per --on-backup-loss, without fencing).
                staging.abort();
                warn!("{e}: leaving replication");
                let _ = conn.send(&Message::Leave {
                    epoch: staging.committed_epoch(),
                    reason: e.to_string(),
                });
                return Err(BackupError::DiskFailed(e.to_string()));
            }
            Err(e) => {
                rejected += 1;
                let epoch = staging.committed_epoch() + 1;
                warn!(
                    "rejected {kind:?} of epoch {epoch}: {e}; staying on committed epoch {}",
                    staging.committed_epoch()
                );
                let nack = Message::Nack {
                    epoch,
                    reason: e.to_string(),
                };
                send(conn, &nack, staging)?;
                last_sent = Instant::now();
            }
        }
    }
}

/// Sends the primary the chunk sums of each disk image (the initial disk sync sends only
/// the chunks that differ), with heartbeats meanwhile: reading a large image takes a
/// while.
fn send_disk_sums(
    conn: &mut Connection,
    disks: &BackupDisks,
    heartbeat_timeout: Duration,
) -> Result<(), BackupError> {
    let every = HEARTBEAT_EVERY.min(heartbeat_timeout / 4);
    let lost = |e| BackupError::PrimaryLost {
        why: PrimaryLoss::Link(e),
        committed: 0,
    };
    for (d, path) in disks.paths().iter().enumerate() {
        let t = Instant::now();
        let mut last = Instant::now();
        let mut last_report = Instant::now();
        let mut beat_failed = None;
        let size = disks.infos()[d].size;
        let sums = disks
            .sums(d, |read| {
                if last.elapsed() >= every && beat_failed.is_none() {
                    last = Instant::now();
                    beat_failed = conn
                        .send(&Message::Heartbeat { epoch: 0 })
                        .map_err(lost)
                        .and_then(|()| drain_heartbeats(conn))
                        .err();
                }
                if last_report.elapsed() >= Duration::from_secs(1) {
                    last_report = Instant::now();
                    let rate = read as f64 / t.elapsed().as_secs_f64().max(1e-6);
                    info!(
                        "disk {d}: {} of {} MiB of the image read for its chunk sums \
                         ({:.0} MiB/s, {:.1} s left)",
                        read >> 20,
                        size >> 20,
                        rate / (1 << 20) as f64,
                        size.saturating_sub(read) as f64 / rate.max(1.0)
                    );
                }
            })
            .map_err(|e| {
                BackupError::DiskFailed(format!(
                    "disk {}: cannot read the image: {e}",
                    path.display()
                ))
            })?;
        if let Some(e) = beat_failed {
            return Err(e);
        }
        info!(
            "disk {d} ({}): {} chunk sums read in {} ms, sent to the primary",
            path.display(),
            sums.len(),
            t.elapsed().as_millis()
        );
        for m in checkpoint::disk::sums_messages(d as u32, &sums) {
            conn.send(&m).map_err(lost)?;
        }
    }
    Ok(())
}

/// Takes the heartbeats the primary sent while the disk images were read, without
/// waiting: they are all it sends before the sums, and a backup that stopped reading for
/// the minutes a large image takes would fill the link's buffers, and the primary's sends
/// give up after the heartbeat timeout.
fn drain_heartbeats(conn: &mut Connection) -> Result<(), BackupError> {
    loop {
        match conn.recv(Some(Duration::ZERO)) {
            Ok(Message::Heartbeat { .. }) => {}
            Ok(other) => return Err(BackupError::NotAHeartbeat(other.kind())),
            Err(TransportError::Timeout(_)) => return Ok(()),
            Err(e) => {
                return Err(BackupError::PrimaryLost {
                    why: PrimaryLoss::Link(e),
                    committed: 0,
                })
            }
        }
    }
}

/// An operator's failover: the primary is fenced (or the cluster or `--fence none` says
/// it need not be); the last committed epoch is promoted.
fn operator_failover(staging: &mut Staging) -> BackupError {
    staging.abort();
    BackupError::PrimaryLost {
        why: PrimaryLoss::Operator,
        committed: staging.committed_epoch(),
    }
}

/// The link to the primary failed while an operator's failover was fencing it (the
/// fencing's doing, most likely): once the fencing succeeded it is that failover, else a
/// primary lost as any other.
fn fenced_or_lost(
    fencing: Option<Receiver<Result<u32, FenceError>>>,
    why: PrimaryLoss,
    staging: &Staging,
) -> BackupError {
    let fenced = fencing.is_some_and(|rx| matches!(rx.recv(), Ok(Ok(_))));
    BackupError::PrimaryLost {
        why: if fenced { PrimaryLoss::Operator } else { why },
        committed: staging.committed_epoch(),
    }
}

/// Fences the primary on a thread (a few attempts); the result comes on the channel.
fn fence_in_background(cfg: FenceConfig) -> Receiver<Result<u32, FenceError>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("fence".into())
        .spawn(move || {
            let _ = tx.send(fence_attempts(&cfg, "the primary", OPERATOR_FENCE_TRIES));
        })
        .expect("spawn the fencing thread");
    rx
}

/// Fencing attempts of an operator's failover before it reports failure.
const OPERATOR_FENCE_TRIES: u32 = 3;

/// Whether this backup can run the guest at `epoch` (a switchover's `Handover`): the
/// epoch is its committed one, none is open, and the machine's devices fit its own (a
/// guest with a network device needs `--net`).
fn can_take_over(staging: &Staging, epoch: u64, opts: &BackupOptions) -> Result<(), String> {
    if epoch != staging.committed_epoch() {
        return Err(format!(
            "Handover of epoch {epoch}, but the committed epoch is {}",
            staging.committed_epoch()
        ));
    }
    runnable_here(staging, opts)
}

/// Whether this backup can run a guest in `state`: a guest with a network device needs
/// `--net`, and `--net` needs a guest with one. The error says which is missing.
pub(crate) fn devices_fit(state: &MachineState, opts: &BackupOptions) -> Result<(), String> {
    match (state.virtio.is_empty(), opts.net.is_some()) {
        (false, false) => Err(
            "the guest has a network device and this backup has no --net tap=NAME to give it"
                .into(),
        ),
        (true, true) => Err("the guest has no network device and this backup has --net".into()),
        _ => Ok(()),
    }
}

/// Whether this backup can run the guest of its committed epoch (see [`devices_fit`]).
fn runnable_here(staging: &Staging, opts: &BackupOptions) -> Result<(), String> {
    let state = MachineState::from_blob(staging.committed_state()).map_err(|e| e.to_string())?;
    devices_fit(&state, opts)
}

/// Epoch 1 just committed: whether this backup could ever run the guest. With
/// `--run-after-end` it could not do what it was asked: it leaves at once (the primary goes
/// on without fencing it) rather than fail at the end. Otherwise it replicates on and says
/// that it cannot take over (a failover fails before fencing, see `take_over`).
fn check_runnable(staging: &Staging, opts: &BackupOptions) -> Result<(), String> {
    let Err(why) = runnable_here(staging, opts) else {
        return Ok(());
    };
    if opts.run_after_end {
        return Err(format!(
            "this backup could not run the guest after the end (--run-after-end): {why}"
        ));
    }
    warn!(
        "this backup CANNOT TAKE OVER: {why}; it replicates, but a failover or switchover \
         to it will fail (without fencing the primary)"
    );
    Ok(())
}

/// Sends to the primary; a failure means the primary is gone, and the error says which
/// epoch the backup holds.
fn send(conn: &mut Connection, msg: &Message, staging: &Staging) -> Result<(), BackupError> {
    conn.send(msg).map_err(|e| BackupError::PrimaryLost {
        why: PrimaryLoss::Link(e),
        committed: staging.committed_epoch(),
    })
}

/// Refuses every further primary on the backup's listener, while it lives: `Refuse`
/// naming the primary this backup serves, so that a second `lockstep primary` (or a
/// `protect` aimed at a busy backup) fails at once with a clear reason instead of waiting
/// out its handshake timeout.
struct Refuser {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Refuser {
    fn start(listener: &TcpListener, serving: &str, link: &LinkSecurity) -> Option<Refuser> {
        let link = link.clone();
        let listener = listener.try_clone().ok()?;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let reason = format!("this backup already replicates the primary at {serving}");
        std::thread::Builder::new()
            .name("refuser".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    if !incoming(&listener, 200) {
                        continue;
                    }
                    // Over TLS only an authenticated peer hears whom this backup serves.
                    let other = link.accept(&listener);
                    if let Err(TransportError::Tls { peer, cause }) = &other {
                        warn!("refused a connection from {peer}: {cause}");
                    }
                    if let Ok(mut other) = other {
                        // Its Hello first (a peer that closes at once is not waited for).
                        let _ = other.recv(Some(Duration::from_secs(2)));
                        warn!(
                            "refused a second primary from {}: {reason}",
                            other
                                .peer_addr()
                                .map_or_else(|| "?".into(), |a| a.to_string())
                        );
                        let _ = other.send(&Message::Refuse {
                            reason: reason.clone(),
                        });
                    }
                }
            })
            .ok()?;
        Some(Refuser { done })
    }
}

impl Drop for Refuser {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Whether a connection waits on `listener`, looking for up to `for_ms` (the loops that
/// call it check their stop condition in between).
fn incoming(listener: &TcpListener, for_ms: i64) -> bool {
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    let slice = Timespec {
        tv_sec: 0,
        tv_nsec: for_ms * 1_000_000,
    };
    poll(&mut fds, Some(&slice)).unwrap_or(0) > 0
}

/// Most TLS handshakes the waiting backup runs at once.
const MAX_HANDSHAKES: usize = 16;

/// Waits for the primary, giving up on SIGTERM/SIGINT. Each connection's handshake runs
/// on a thread of its own, so that peers that connect and say nothing (or slowly) cannot
/// keep the primary out: the first that passes is the primary. A peer that fails (no or a
/// wrong certificate, TLS against `--insecure` or the reverse, silence, a reset) is
/// refused with a warning naming the cause, and the wait goes on: nothing of it was read.
fn accept(listener: &TcpListener, link: &LinkSecurity) -> Result<Option<Connection>, BackupError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (tx, rx) = crossbeam_channel::unbounded::<Connection>();
    let running = std::sync::Arc::new(AtomicUsize::new(0));
    loop {
        if stop_requested() {
            // A primary admitted meanwhile hears that this backup stopped, rather than
            // seeing it lost.
            if let Ok(mut conn) = rx.try_recv() {
                let _ = conn.send(&Message::Leave {
                    epoch: 0,
                    reason: String::new(),
                });
            }
            return Ok(None);
        }
        if let Ok(conn) = rx.try_recv() {
            return Ok(Some(conn));
        }
        if !incoming(listener, 20) {
            continue;
        }
        let (stream, peer) = listener
            .accept()
            .map_err(|e| BackupError::Transport(TransportError::Accept(e)))?;
        if running.load(Ordering::SeqCst) >= MAX_HANDSHAKES {
            warn!(
                "refused a connection from {peer}: {MAX_HANDSHAKES} handshakes already under way"
            );
            continue;
        }
        running.fetch_add(1, Ordering::SeqCst);
        let (link, tx, done) = (link.clone(), tx.clone(), running.clone());
        let spawned = std::thread::Builder::new()
            .name("handshake".into())
            .spawn(move || {
                match link.admit(stream, peer) {
                    // A primary that passes after another won is dropped with the channel.
                    Ok(conn) => drop(tx.send(conn)),
                    Err(TransportError::Tls { peer, cause }) => {
                        warn!("refused a connection from {peer}: {cause}")
                    }
                    Err(e) => warn!("refused a connection from {peer}: {e}"),
                }
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            running.fetch_sub(1, Ordering::SeqCst);
            warn!("refused a connection from {peer}: cannot start a thread for it: {e}");
        }
    }
}
