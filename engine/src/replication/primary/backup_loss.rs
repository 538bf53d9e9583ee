//! Losing the backup: hold, fence, then release (or pause, or continue unsafely), per
//! `--on-backup-loss` (invariant 3).

use super::*;

impl Primary<'_> {
    /// The backup is gone. Output the backup has not acknowledged may leave only once the
    /// backup can no longer promote (invariant 3): by default (`--on-backup-loss fence`)
    /// the guest runs on while its output stays held, the backup is fenced with
    /// `--fence-cmd`, and only on success is the output released and the guest left to run
    /// unprotected. Without a fence command the output stays held until the primary is
    /// stopped. `pause` stops the guest; `continue` releases at once (unsafe: a backup that
    /// was only stalled may promote a state older than what clients saw).
    pub(super) fn without_backup(&mut self, why: BackupLoss) -> Result<ProtectEnd, PrimaryError> {
        let has_output = self.output.is_some();
        if let BackupLoss::Left { .. } = why {
            let what = why.to_string();
            return self.backup_left(why, what);
        }
        if self.epoch == 0 {
            // No epoch was captured, so no EpochCommit ever left: the backup holds no
            // committed epoch and can never promote; there is nothing to fence.
            let what = format!(
                "backup lost ({why}) before epoch 1: it holds no committed epoch and can \
                 never promote"
            );
            return self.backup_left(why, what);
        }
        let what = match (self.opts.on_backup_loss, &self.opts.fence) {
            (OnBackupLoss::Pause, _) => "PAUSING the guest (--on-backup-loss pause): it stays paused until this process is stopped (SIGTERM, ctl stop)".to_string(),
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
        let held = has_output && self.opts.on_backup_loss != OnBackupLoss::Continue;
        status::role_change(
            Role::Primary,
            if held {
                Protection::UnprotectedHeld
            } else {
                Protection::Unprotected
            },
            GuestState::Running,
            format!("backup lost ({why}) after epoch {}", self.epoch),
        );
        if self.opts.on_backup_loss == OnBackupLoss::Pause {
            self.machine.pause()?;
            status::update(|s| s.guest = GuestState::Paused);
            while !stop_requested() {
                std::thread::sleep(Duration::from_millis(50));
            }
            return Err(PrimaryError::BackupLost(why));
        }
        if !self.machine.is_running() {
            self.machine.resume()?;
        }
        let fencing = match (self.opts.on_backup_loss, &self.opts.fence) {
            (OnBackupLoss::Continue, _) => {
                if let Some(o) = &self.output {
                    o.unprotect();
                }
                None
            }
            (_, Some(agent)) if has_output => {
                let cfg = FenceConfig::Agent(agent.clone());
                let (tx, rx) = crossbeam_channel::bounded(1);
                std::thread::Builder::new()
                    .name("fence".into())
                    .spawn(move || {
                        let _ = tx.send(fence_until_done(&cfg, "the backup").map(|_| ()));
                    })
                    .expect("spawn the fencing thread");
                Some(rx)
            }
            // Nothing to hold (no network device), or nothing to fence with: no fencing.
            _ => None,
        };
        Ok(ProtectEnd::BackupLost(Unprotected {
            output: self.output.clone(),
            fencing,
            deadline: self.opts.seconds.map(|s| self.started + s),
        }))
    }
}

impl Primary<'_> {
    /// The backup cannot promote (it stopped in order with `Leave` and dropped its
    /// replica, or it was lost before it held any committed epoch), so nothing need be
    /// fenced; the held output leaves and the guest runs on unprotected, whatever
    /// `--on-backup-loss` says for a lost backup (`pause` still pauses). `what` says which.
    fn backup_left(&mut self, why: BackupLoss, what: String) -> Result<ProtectEnd, PrimaryError> {
        if self.opts.on_backup_loss == OnBackupLoss::Pause {
            warn!(
                "ROLE CHANGE: {what}; PAUSING the guest (--on-backup-loss pause): it stays \
                 paused until this process is stopped (SIGTERM, ctl stop)"
            );
            status::role_change(
                Role::Primary,
                Protection::Unprotected,
                GuestState::Paused,
                what.clone(),
            );
            self.machine.pause()?;
            while !stop_requested() {
                std::thread::sleep(Duration::from_millis(50));
            }
            return Err(PrimaryError::BackupLost(why));
        }
        warn!(
            "ROLE CHANGE: {what}; output released, the guest continues UNPROTECTED (no \
             fencing needed)"
        );
        status::role_change(
            Role::Primary,
            Protection::Unprotected,
            GuestState::Running,
            what.clone(),
        );
        if !self.machine.is_running() {
            self.machine.resume()?;
        }
        if let Some(o) = &self.output {
            o.unprotect();
        }
        Ok(ProtectEnd::BackupLost(Unprotected {
            output: self.output.clone(),
            fencing: None,
            deadline: self.opts.seconds.map(|s| self.started + s),
        }))
    }
}

impl Unprotected {
    /// Looks at the fencing of the lost backup: once it succeeded, the held output is
    /// released and the guest's output flows unprotected. Call it often (every few tens
    /// of ms) while the guest runs.
    pub fn poll(&mut self) {
        let Some(Ok(result)) = self.fencing.as_ref().map(|rx| rx.try_recv()) else {
            return;
        };
        self.fencing = None;
        match result {
            Ok(()) => {
                if let Some(o) = &self.output {
                    o.unprotect();
                }
                status::set_protection(Protection::Unprotected, "the backup is fenced");
                warn!("the backup is fenced: output released, the guest continues UNPROTECTED");
            }
            Err(e) => warn!("{e}: output stays held"),
        }
    }

    /// SIGTERM/SIGINT or `POST /stop` arrived, or the primary's `--seconds` are over.
    pub fn is_over(&self) -> bool {
        stop_requested() || self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}
