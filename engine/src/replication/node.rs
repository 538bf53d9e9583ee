//! A lockstep process over its whole life: the roles it goes through one after the other,
//! as failovers, re-protects and switchovers move the guest between hosts.
//!
//! ```text
//!            protect (POST /protect)                 backup lost
//!  Running ---------------------------> Protecting -------------> Running (unprotected)
//!  (run, promoted)  <-- guest exits / stop --|  |
//!                                            |  | switchover (POST /switchover)
//!  Backup --- primary lost: fence, promote --+  v
//!     |   --- handover: promote (and protect     Backup (then=backup) or the end
//!     |       to the old primary, now backup;
//!     |       under --fence cluster only once the cluster promotes it)
//! ```
//!
//! `lockstep run` starts as Running, `primary` as Protecting, `backup` as Backup; every
//! state can lead to another, so a promoted backup can be protected again (re-protect,
//! COLO's procedure after a failover) and an old primary can come back as the new backup
//! (failback).

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::backup::{self, BackupError, BackupOptions};
use super::control::{self, AfterSwitchover, FenceTarget, Request, RequestState};
use super::failover::{self, TakenOver};
use super::fence::FenceConfig;
use super::primary::{self, OnBackupLoss, PrimaryError, PrimaryOptions, ProtectEnd, Unprotected};
use super::status::{self, GuestState, Protection, Role};
use super::stop_requested;
use crate::devices::disk::DiskConfig;
use crate::devices::serial::Console;
use crate::devices::NetConfig;
use crate::machine::{Machine, MachineError};
use crate::snapshot::{self, SnapshotError};
use crate::vstate::vcpu::VcpuEvent;
use crate::{info, warn};

/// A role failed.
#[derive(Debug, Error)]
pub enum NodeError {
    /// The primary failed.
    #[error(transparent)]
    Primary(#[from] PrimaryError),
    /// The backup failed.
    #[error(transparent)]
    Backup(#[from] BackupError),
    /// The machine failed.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The snapshot could not be written.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A vCPU crashed (the guest cannot go on).
    #[error("vCPU {vcpu}: {message}")]
    Crashed {
        /// The vCPU.
        vcpu: u32,
        /// Why it stopped.
        message: String,
    },
}

/// What stays the same across the roles of one process: the guest's devices on this
/// host, the pair, how to fence the peer, and the replication settings a re-protect uses.
#[derive(Clone, Debug)]
pub struct Node {
    /// The console of any guest this process runs.
    pub console: Console,
    /// The tap of any guest this process runs.
    pub net: Option<NetConfig>,
    /// The disks of any guest this process runs (`--disk`), in order: the guest's own on
    /// a primary, the images a backup keeps them in.
    pub disks: Vec<DiskConfig>,
    /// How to fence the peer, whichever role this process has: the backup fences the
    /// primary before it promotes, the primary fences the backup before it releases
    /// output (`None`: not configured).
    pub fence: Option<FenceConfig>,
    /// The backup's head start (see [`failover::fail_over`]).
    pub fence_delay: Duration,
    /// The settings of the primary role; `peer` is replaced by each protect's.
    pub primary: PrimaryOptions,
    /// `lockstep run --snapshot-after-ms/--snapshot-to`: when, and where.
    pub snapshot: Option<(Duration, PathBuf)>,
}

/// Where a process starts.
pub enum Start {
    /// A running guest, unprotected (`lockstep run`, `restore`).
    Run(Machine),
    /// A booted guest to protect with `opts.peer` (`lockstep primary`).
    Protect(Machine),
    /// A backup (`lockstep backup`).
    Backup(BackupOptions),
}

enum State {
    Run(Machine, Option<Unprotected>),
    Protect {
        machine: Machine,
        peer: String,
        /// The fence agent's target for this backup, when not the configured one.
        fence: FenceTarget,
        /// A failed first protect is the process's error; a failed re-protect leaves the
        /// guest running unprotected.
        first: bool,
    },
    /// A backup, on a listener bound already (the old primary of a switchover) or not.
    Backup(BackupOptions, Option<TcpListener>),
}

/// What [`Node::drive`] ended with.
enum Driven {
    /// The guest exited (its status) or the run was ended (0).
    Ended(u8),
    /// `POST /protect`: protect the guest with the backup at this address, fencing it as
    /// the target says.
    Protect(String, FenceTarget),
}

impl Node {
    /// Runs the process from `start` to its end; returns the guest's exit status (0 when
    /// the run was ended from outside, or there was no guest to run).
    pub fn run(&self, start: Start) -> Result<u8, NodeError> {
        let started = Instant::now();
        control::set_fence_agent(self.primary.fence.is_some());
        control::set_protect_refusal(if self.primary.link.is_none() {
            Some(
                "this process has no replication link configured: start it with --tls-cert, \
                 --tls-key and --tls-ca (or --insecure, unsafe)"
                    .to_string(),
            )
        } else {
            (self.net.is_some()
                && self.primary.fence.is_none()
                && self.primary.on_backup_loss == OnBackupLoss::Fence)
                .then(|| {
                    "this process has no fence agent (--fence-cmd or --fence cluster): should \
                     the new backup be lost, the guest's output would stay held until the \
                     guest is stopped (or choose --on-backup-loss continue, unsafe)"
                        .to_string()
                })
        });
        let mut state = match start {
            Start::Run(m) => State::Run(m, None),
            Start::Protect(m) => State::Protect {
                machine: m,
                peer: self.primary.peer.clone(),
                fence: FenceTarget::default(),
                first: true,
            },
            Start::Backup(opts) => State::Backup(opts, None),
        };
        loop {
            // A request accepted for the role that just ended (a switchover the lost
            // backup never saw through, a failover the primary's clean end overtook).
            control::drop_pending("the process changed role before it was carried out");
            state = match state {
                State::Backup(opts, listener) => match self.back_up(opts, listener)? {
                    None => return Ok(0),
                    Some(TakenOver {
                        machine,
                        protect_to: Some(peer),
                    }) => State::Protect {
                        machine,
                        peer,
                        fence: FenceTarget::default(),
                        first: false,
                    },
                    Some(TakenOver { machine, .. }) => State::Run(machine, None),
                },
                State::Run(mut machine, unprotected) => {
                    match self.drive(&mut machine, unprotected, started)? {
                        Driven::Ended(status) => return Ok(status),
                        Driven::Protect(peer, fence) => State::Protect {
                            machine,
                            peer,
                            fence,
                            first: false,
                        },
                    }
                }
                State::Protect {
                    mut machine,
                    peer,
                    fence,
                    first,
                } => {
                    let was = status::report().role;
                    if !first {
                        info!("protecting the running guest with the backup at {peer}");
                    }
                    let opts = PrimaryOptions {
                        peer: peer.clone(),
                        seconds: if first { self.primary.seconds } else { None },
                        fence: self.primary.fence.clone().map(|mut agent| {
                            if let Some(node) = fence.peer_node {
                                agent.victim = node;
                            }
                            if let Some(args) = fence.args {
                                agent.args = args;
                            }
                            agent
                        }),
                        ..self.primary.clone()
                    };
                    let ended = primary::protect(&mut machine, opts);
                    // A request still under way did not happen: a protect whose backup
                    // never committed an epoch, a switchover overtaken by the guest's exit,
                    // a stop or the backup's loss.
                    let running = control::last().filter(|r| r.state == RequestState::Running);
                    if let Some(r) = running {
                        let handed = matches!(ended, Ok(ProtectEnd::HandedOver { .. }));
                        if !(r.kind == "switchover" && handed) {
                            control::finish(Err(match &ended {
                                Err(e) => e.to_string(),
                                Ok(ProtectEnd::BackupLost(_)) => {
                                    format!("the backup at {peer} was lost")
                                }
                                Ok(_) => "the run ended first".into(),
                            }));
                            // A re-protect whose backup never committed an epoch: the
                            // process is what it was before (its output as the loss left it).
                            if r.kind == "protect" && matches!(ended, Ok(ProtectEnd::BackupLost(_)))
                            {
                                let p = status::report().protection;
                                status::role_change(
                                    was,
                                    p,
                                    GuestState::Running,
                                    format!("protect to {peer} failed: the backup was lost before it committed an epoch"),
                                );
                            }
                        }
                    }
                    match ended {
                        Ok(ProtectEnd::Exited(status)) => return Ok(status),
                        Ok(ProtectEnd::Stopped) => return Ok(0),
                        Ok(ProtectEnd::HandedOver { then, listener }) => {
                            control::finish(Ok(format!("handed over to {peer}")));
                            // Closes the tap: the promoted backup attaches to it. The
                            // status counts held frames through the guest's output, which
                            // holds the tap too: let go of it first.
                            status::watch_output(None);
                            drop(machine);
                            match then {
                                AfterSwitchover::Stop => {
                                    status::role_change(
                                        Role::Primary,
                                        Protection::Unprotected,
                                        GuestState::Paused,
                                        format!("switchover: handed the guest to {peer}; stopping"),
                                    );
                                    // A moment for a `ctl switchover` that polls the
                                    // status to see the request done before the socket goes.
                                    std::thread::sleep(Duration::from_millis(300));
                                    return Ok(0);
                                }
                                AfterSwitchover::Backup { listen } => {
                                    status::role_change(
                                        Role::Backup,
                                        Protection::Unprotected,
                                        GuestState::Paused,
                                        format!("switchover: handed the guest to {peer}; now its backup on {listen}"),
                                    );
                                    State::Backup(self.backup_options(listen), listener)
                                }
                            }
                        }
                        Ok(ProtectEnd::BackupLost(u)) => State::Run(machine, Some(u)),
                        Err(e) if !first && before_first_epoch(&e) => {
                            warn!("protect to {peer} failed: {e}; the guest runs on unprotected");
                            status::role_change(
                                was,
                                Protection::Unprotected,
                                GuestState::Running,
                                format!("protect to {peer} failed: {e}"),
                            );
                            State::Run(machine, None)
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            };
        }
    }

    /// The backup role, then what the backup's end leaves to run.
    fn back_up(
        &self,
        opts: BackupOptions,
        listener: Option<TcpListener>,
    ) -> Result<Option<TakenOver>, NodeError> {
        control::set_failover_refusal(match &self.fence {
            Some(_) => None,
            None => Some(
                "this backup has no fencing configured (--fence-cmd, or --fence none): it \
                 cannot promote"
                    .into(),
            ),
        });
        let opts = BackupOptions {
            fence: self.fence.clone(),
            ..opts
        };
        let outcome = backup::run_on(opts.clone(), listener);
        control::set_failover_refusal(Some("this process is no longer a backup".into()));
        let taken = outcome
            .and_then(|o| failover::take_over(o, &opts, self.fence.as_ref(), self.fence_delay));
        if control::last().is_some_and(|r| r.kind == "failover" && r.state == RequestState::Running)
        {
            control::finish(match &taken {
                Ok(_) => Ok(match self.fence {
                    Some(FenceConfig::Agent(_)) => "promoted after fencing the primary",
                    Some(FenceConfig::Cluster) => "promoted by the cluster",
                    _ => "promoted WITHOUT fencing the primary (--fence none)",
                }
                .into()),
                Err(e) => Err(e.to_string()),
            });
        }
        Ok(taken?)
    }

    /// The options of the backup an old primary becomes after a switchover.
    fn backup_options(&self, listen: String) -> BackupOptions {
        BackupOptions {
            listen,
            link: self.primary.link.clone(),
            mem: None,
            vcpus: None,
            name: self.primary.name.clone(),
            run_after_end: false,
            console: self.console.clone(),
            net: self.net.clone(),
            disks: self.disks.clone(),
            heartbeat_timeout: self.primary.backup_timeout,
            withhold_acks: None,
            fence: self.fence.clone(),
        }
    }

    /// Runs the guest unprotected until it exits, the run is ended, or a protect request
    /// comes; takes the snapshot on the way if asked. `unprotected`: what a lost backup
    /// left (output held until it is fenced).
    fn drive(
        &self,
        machine: &mut Machine,
        mut unprotected: Option<Unprotected>,
        started: Instant,
    ) -> Result<Driven, NodeError> {
        let mut snapshot = self.snapshot.clone();
        if !machine.is_running() {
            // A guest that starts here (a boot, a restore) may have run elsewhere before:
            // its MAC is announced, as after a failover, so that switches forward to this
            // host at once.
            if let Some(n) = machine.net() {
                n.announce();
            }
            machine.resume()?;
        }
        status::update(|s| s.guest = GuestState::Running);
        loop {
            let timeout = match &snapshot {
                Some((at, _)) => at.saturating_sub(started.elapsed()),
                None => Duration::from_secs(3600),
            };
            let over = unprotected.as_ref().is_some_and(Unprotected::is_over);
            // Roles that install the stop handler end on SIGTERM/SIGINT with the guest
            // stopped; `run` and `restore` keep the default (they end at once).
            if stop_requested() || over {
                machine.pause()?;
                status::update(|s| s.guest = GuestState::Paused);
                machine.flush_console();
                info!(
                    "stopped by {}",
                    if stop_requested() {
                        "request"
                    } else {
                        "--seconds"
                    }
                );
                return Ok(Driven::Ended(0));
            }
            match machine.wait_event(timeout.min(Duration::from_millis(20))) {
                Some(VcpuEvent::GuestExit { status, .. }) => {
                    machine.pause()?;
                    status::update(|s| s.guest = GuestState::Exited);
                    machine.flush_console();
                    return Ok(Driven::Ended(u8::try_from(status).unwrap_or(u8::MAX)));
                }
                Some(VcpuEvent::Crashed { vcpu, message }) => {
                    let _ = machine.pause();
                    machine.flush_console();
                    return Err(NodeError::Crashed { vcpu, message });
                }
                None => {}
            }
            if let Some(u) = &mut unprotected {
                u.poll();
            }
            if let Some(Request::Protect { peer, fence }) =
                control::take(|r| matches!(r, Request::Protect { .. }))
            {
                return Ok(Driven::Protect(peer, fence));
            }
            let due = snapshot
                .as_ref()
                .is_some_and(|(at, _)| started.elapsed() >= *at);
            if let Some((_, dir)) = snapshot.take_if(|_| due) {
                let (state, timing) = machine.pause_and_capture()?;
                let images: Vec<PathBuf> = machine.disks().iter().map(|d| d.image().0).collect();
                let written = snapshot::write(&dir, &state, machine.memory(), &images)?;
                machine.resume()?;
                info!(
                    "snapshot written to {} ({} KiB of non-zero memory, {} disk image copies; \
                     pause {} us)",
                    dir.display(),
                    written >> 10,
                    images.len(),
                    timing.captured.as_micros()
                );
            }
        }
    }
}

/// Whether a protect failed before the backup committed anything: the guest is as it was.
fn before_first_epoch(e: &PrimaryError) -> bool {
    matches!(e, PrimaryError::Connect { .. } | PrimaryError::Handshake(_))
}
