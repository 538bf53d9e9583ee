//! Failover, in one place: what the backup does once replication is over. A primary that
//! ended cleanly leaves a machine to resume (`--run-after-end`) or nothing; a lost primary
//! is fenced, then the last committed epoch is promoted (invariant 3: fence, then promote,
//! never the other way round). Without fencing configured the backup does not promote.

use std::time::{Duration, Instant};

use checkpoint::PAGE_SIZE;

use super::backup::{BackupError, BackupOptions, Committed, Outcome, PrimaryLoss};
use super::control::{self, Request};
use super::fence::{fence_until_done, FenceConfig, FenceError};
use super::status::{self, GuestState, Protection, Role};
use super::stop_requested;
use crate::devices::serial::Console;
use crate::devices::NetConfig;
use crate::info;
use crate::machine::Machine;
use crate::vstate::memory;

/// The backup's head start for a primary that may be alive behind a cut link: how long it
/// waits before fencing a primary that went silent (see [`fail_over`]).
pub const DEFAULT_FENCE_DELAY: Duration = Duration::from_millis(1000);

/// The machine a backup runs after replication, and whom to protect it with next.
pub struct TakenOver {
    /// The running guest.
    pub machine: Machine,
    /// After a switchover whose old primary became the new backup: its address; the
    /// guest should be protected to it at once.
    pub protect_to: Option<String>,
}

/// Decides what follows `outcome` (what [`super::backup::run`] returned): the running
/// machine the backup now drives, or `None` when there is nothing to run.
///
/// - The primary ended replication cleanly: the guest is resumed when
///   `opts.run_after_end` asks for it.
/// - The primary handed the guest over (switchover): it is promoted without fencing (the
///   primary stopped it for good before it said so).
/// - The primary was lost (or the operator asked for failover): with `fence` configured,
///   [`fail_over`] fences it and promotes; without, the loss is the error
///   [`BackupError::PrimaryLost`] and nothing runs.
pub fn take_over(
    outcome: Outcome,
    opts: &BackupOptions,
    fence: Option<&FenceConfig>,
    fence_delay: Duration,
) -> Result<Option<TakenOver>, BackupError> {
    let running = |machine| {
        Some(TakenOver {
            machine,
            protect_to: None,
        })
    };
    match outcome {
        Outcome::Ended(c) if opts.run_after_end => {
            let epoch = c.epoch;
            let machine = resume(c, &opts.console, opts.net.as_ref())?;
            status::role_change(
                Role::Standalone,
                Protection::Unprotected,
                GuestState::Running,
                format!("the primary ended replication at epoch {epoch}; resumed here"),
            );
            Ok(running(machine))
        }
        Outcome::Ended(_) => Ok(None),
        Outcome::HandedOver {
            committed,
            new_backup,
        } => {
            let epoch = committed.epoch;
            if fence == Some(&FenceConfig::Cluster) {
                // Under a cluster manager the hand-over is a demote: the cluster decides
                // where the guest runs next and promotes this backup if it chooses it.
                status::role_change(
                    Role::Backup,
                    Protection::Unprotected,
                    GuestState::Paused,
                    format!(
                        "switchover: the primary handed over epoch {epoch}; waiting for the \
                         cluster to promote this backup"
                    ),
                );
                wait_for_the_cluster(epoch)?;
            }
            let handed = Instant::now();
            // The primary let out all output before it handed over: nothing to send again.
            let committed = Committed {
                output: Vec::new(),
                output_epochs: Vec::new(),
                ..committed
            };
            let machine = promote(committed, &opts.console, opts.net.as_ref())?;
            info!(
                "PROMOTED: guest running from epoch {epoch}, handed over by the primary ({} ms)",
                handed.elapsed().as_millis()
            );
            status::role_change(
                Role::Promoted,
                Protection::Unprotected,
                GuestState::Running,
                format!("switchover: the primary handed over epoch {epoch}"),
            );
            Ok(Some(TakenOver {
                machine,
                protect_to: new_backup,
            }))
        }
        Outcome::PrimaryLost { why, committed } => {
            let Some(fence) = fence else {
                return Err(BackupError::PrimaryLost {
                    why,
                    committed: committed.epoch,
                });
            };
            // A guest this backup cannot run is not worth fencing its primary for.
            if let Err(e) = super::backup::devices_fit(&committed.state, opts) {
                return Err(BackupError::CannotTakeOver {
                    why,
                    committed: committed.epoch,
                    cause: e,
                });
            }
            if *fence == FenceConfig::Cluster && !matches!(why, PrimaryLoss::Operator) {
                wait_for_the_cluster(committed.epoch)?;
            }
            let epoch = committed.epoch;
            let machine = if matches!(why, PrimaryLoss::Operator) {
                // The operator's failover fenced the primary while replicating (or the
                // cluster did, or --fence none said not to).
                let machine = promote(committed, &opts.console, opts.net.as_ref())?;
                info!("PROMOTED: guest running from committed epoch {epoch} (operator's failover)");
                machine
            } else {
                fail_over(
                    committed,
                    why.primary_may_be_alive(),
                    fence,
                    fence_delay,
                    &opts.console,
                    opts.net.as_ref(),
                )?
            };
            status::role_change(
                Role::Promoted,
                Protection::Unprotected,
                GuestState::Running,
                format!("primary lost ({why}); promoted from committed epoch {epoch}"),
            );
            Ok(running(machine))
        }
    }
}

/// `--fence cluster`: the primary is lost, and the cluster decides. The backup keeps its
/// committed epoch, unpromoted, until `POST /failover` (the cluster fenced the old
/// primary's node and promotes this one) or SIGTERM (the cluster stops it).
fn wait_for_the_cluster(epoch: u64) -> Result<(), BackupError> {
    info!(
        "waiting for the cluster to promote this backup (--fence cluster: POST /failover) \
         with committed epoch {epoch}"
    );
    control::set_failover_refusal(None);
    loop {
        if stop_requested() {
            return Err(BackupError::Stopped(epoch));
        }
        if control::take(|r| *r == Request::Failover).is_some() {
            info!("the cluster promotes this backup (POST /failover)");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Turns a finished replication into a running machine.
pub fn resume(
    committed: Committed,
    console: &Console,
    net: Option<&NetConfig>,
) -> Result<Machine, BackupError> {
    info!(
        "resuming the guest from committed epoch {} ({} pages of RAM)",
        committed.epoch,
        memory::ram_size(&committed.memory) / PAGE_SIZE as u64
    );
    Ok(Machine::restore(
        &committed.state,
        console,
        net,
        &committed.disks,
        committed.memory,
    )?)
}

/// Failover: fences the primary, then promotes (invariant 3: never the other way round).
///
/// When the primary may be alive (lost by silence behind a cut link, or its stream
/// damaged on the way: [`PrimaryLoss::primary_may_be_alive`]), it fences the backup before
/// it releases any output; the backup waits `delay` first (its head start, as Pacemaker's
/// `priority-fencing-delay` gives the node running the resource), so that exactly one side
/// wins the race. A closed connection means the primary's process is gone, and fencing
/// starts at once. Returns the running machine.
pub fn fail_over(
    committed: Committed,
    may_be_alive: bool,
    fence: &FenceConfig,
    delay: Duration,
    console: &Console,
    net: Option<&NetConfig>,
) -> Result<Machine, BackupError> {
    let lost = Instant::now();
    if may_be_alive && !delay.is_zero() && matches!(fence, FenceConfig::Agent(_)) {
        info!("waiting {delay:?} before fencing (--fence-delay-ms): a primary alive behind a cut or damaged link fences this backup first");
        while lost.elapsed() < delay {
            if stop_requested() {
                return Err(BackupError::Fence(FenceError::Stopped));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    fence_until_done(fence, "the old primary")?;
    let epoch = committed.epoch;
    let machine = promote(committed, console, net)?;
    info!(
        "PROMOTED: guest running from committed epoch {epoch}, {} ms after the primary was declared lost",
        lost.elapsed().as_millis()
    );
    Ok(machine)
}

/// Promotion: the last committed epoch becomes the running VM — vCPUs and devices loaded,
/// the tap attached, the guest's MAC announced (RARP, as after a live migration so
/// switches learn where it is now), the committed output the old primary may still have
/// held sent, running.
///
/// That output is what the guest sent during committed epochs after the last one the
/// primary said it had let out: the backup acknowledged them, but the primary may have
/// died before the ack reached it. The guest's state says those frames were sent, so it
/// would send them again only when its retransmission timer fires (a second or more for
/// TCP, never for UDP). Sending them now costs a duplicate at most: TCP drops a segment it
/// has already received; a UDP client may see a datagram twice.
pub fn promote(
    mut committed: Committed,
    console: &Console,
    net: Option<&NetConfig>,
) -> Result<Machine, BackupError> {
    let output = std::mem::take(&mut committed.output);
    let epochs = std::mem::take(&mut committed.output_epochs);
    let mut machine = resume(committed, console, net)?;
    if let Some(n) = machine.net() {
        n.announce();
        if !output.is_empty() {
            let sent = n.replay(&output);
            let bytes: usize = output.iter().map(bytes::Bytes::len).sum();
            info!(
                "sent {sent} of {} frames ({bytes} bytes) of committed output the old primary \
                 may not have let out (epochs {})",
                output.len(),
                epoch_list(&epochs)
            );
        }
    }
    machine.resume()?;
    Ok(machine)
}

/// `3, 5, 6` as "3, 5, 6"; long lists shortened to the first and last.
fn epoch_list(epochs: &[u64]) -> String {
    match epochs {
        [] => "none".into(),
        [a, .., b] if epochs.len() > 4 => format!("{a} to {b}, {} of them", epochs.len()),
        _ => epochs
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}
