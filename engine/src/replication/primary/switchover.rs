//! Planned switchover (`POST /switchover`): the guest moves to the backup with nothing
//! lost, and the backup confirms before this side lets it go.
//!
//! ```text
//! primary                                              backup
//!   final epoch E (guest paused), its ack  ----------->  commits E
//!   output of E released (acked)
//!   Handover {E, where this side will listen} -------->  can it run E? (its --net)
//!   <---------------- Handover {E, ""}: taken, or Refuse {why}
//!   taken:   End {E, digest}, the guest dropped ----->  promotes E (no fencing: the
//!            (its tap closed), then the new backup       primary said it stopped), and
//!            or the end                                  protects it to the listener
//!   refused: the guest resumes here, epochs go on (the pair stays protected)
//! ```
//!
//! Until the backup takes the guest, every failure leaves it here: a backup lost before it
//! answers is a backup lost (hold, fence, run on). Once it has taken it, this side never
//! resumes the guest: if `End` cannot be sent, the backup's failover (with fencing) takes
//! over, and two running copies are never possible.

use std::net::{SocketAddr, TcpListener};

use super::*;

impl Primary<'_> {
    /// Takes up a switchover request: with `then` = become the backup at `listen`, the
    /// listener is bound now, so that an address in use fails the request with nothing
    /// changed. Returns whether the switchover goes ahead.
    pub(super) fn prepare_switchover(&mut self, then: AfterSwitchover) -> bool {
        if let AfterSwitchover::Backup { listen } = &then {
            match TcpListener::bind(listen) {
                Ok(l) => self.handover_listener = Some(l),
                Err(e) => {
                    warn!("switchover refused: cannot listen on {listen}: {e}");
                    control::finish(Err(format!(
                        "cannot listen on {listen}: {e}; nothing changed"
                    )));
                    return false;
                }
            }
        }
        info!("switchover requested: final epoch, then the backup takes the guest");
        self.handover = Some(then);
        true
    }

    /// The switchover: final epoch, `Handover`, the backup's answer. Returns true once
    /// the backup has taken the guest (this side's guest stays paused for good), false
    /// when it refused (the guest runs here again, still protected). A backup lost on
    /// the way is the error, as in any epoch.
    pub(super) fn switch_over(&mut self) -> Result<bool, PrimaryError> {
        let epoch = self.final_epoch()?;
        // Every frame of the final epoch leaves before the guest does (its ack released
        // them; the ack reader may still be writing them to the tap).
        let drained = Instant::now() + Duration::from_secs(1);
        while self.output.as_ref().is_some_and(|o| o.held_frames() > 0) && Instant::now() < drained
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let new_backup = match &self.handover {
            Some(AfterSwitchover::Backup { listen }) => self.reachable(listen),
            _ => String::new(),
        };
        self.handover_reply = None;
        {
            let mut link = self.link();
            link.tx.send(&Message::Handover {
                epoch,
                new_backup: new_backup.clone(),
            })?;
            link.sent();
        }
        let reply = loop {
            self.heartbeats.check_in(epoch);
            self.drain_acks()?;
            if let Some(r) = self.handover_reply.take() {
                break r;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        if let Err(reason) = reply {
            warn!("the backup refused the switchover: {reason}; the guest runs on here");
            control::finish(Err(format!(
                "the backup refused the switchover: {reason}; the guest runs on here, protected"
            )));
            self.handover = None;
            self.handover_listener = None;
            self.machine.resume()?;
            status::update(|s| s.guest = GuestState::Running);
            return Ok(false);
        }
        // Taken: from here on the guest never runs here again.
        self.handed = true;
        info!(
            "HANDED OVER: the backup promotes epoch {epoch}{}; the guest no longer runs here",
            if new_backup.is_empty() {
                String::new()
            } else {
                format!(" and protects it to {new_backup}")
            }
        );
        if let Err(e) = self.end(epoch) {
            warn!("End not sent ({e}): the backup takes the guest over by failover");
        }
        Ok(true)
    }

    /// `listen` as the backup reaches it: an unspecified host (`0.0.0.0`, `::`) is this
    /// side's address of the replication link.
    fn reachable(&self, listen: &str) -> String {
        match (listen.parse::<SocketAddr>(), self.local_addr) {
            (Ok(a), Some(local)) if a.ip().is_unspecified() => {
                SocketAddr::new(local.ip(), a.port()).to_string()
            }
            _ => listen.to_string(),
        }
    }
}
