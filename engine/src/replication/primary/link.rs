//! The primary's link to the backup: the sending half shared with the heartbeat thread,
//! the thread that encodes and sends epochs, the thread that reads acks (and commits
//! output as they arrive), and the epoch loop's waits on them.

use super::*;

pub(super) enum AckEvent {
    Ack {
        epoch: u64,
        at: Instant,
    },
    Nack {
        epoch: u64,
        reason: String,
    },
    Lost(BackupLoss),
    /// The backup's answer to `Handover`: taken, or refused and why.
    Handover(Result<(), String>),
    /// The backup's sums of a disk's chunks (the initial disk sync).
    DiskSums {
        disk: u32,
        first: u64,
        sums: Vec<checkpoint::disk::ChunkSum>,
    },
}

/// The sending half, shared by the epoch loop and the heartbeat thread.
pub(super) struct Link {
    pub(super) tx: FrameSender,
    pub(super) last_send: Instant,
}

impl Link {
    pub(super) fn sent(&mut self) {
        self.last_send = Instant::now();
    }
}

/// A thread that sends heartbeats whenever the link has been idle for a while, so that
/// the backup hears from us while the epoch loop is busy elsewhere (a pause, a wait for
/// acks, the final digest). It never waits behind a send in progress (data is flowing
/// then). It vouches only for an epoch loop that checked in recently: a primary whose
/// loop is stuck must go silent, or the backup would never take over.
pub(super) struct Heartbeats {
    pub(super) stop: Arc<AtomicBool>,
    /// The epoch loop's last check-in, ms after `base`, and its epoch.
    pub(super) alive: Arc<AtomicU64>,
    pub(super) epoch: Arc<AtomicU64>,
    pub(super) base: Instant,
    pub(super) thread: Option<JoinHandle<()>>,
}

impl Heartbeats {
    pub(super) fn start(
        link: Arc<Mutex<Link>>,
        every: Duration,
        vouch_for: Duration,
    ) -> Heartbeats {
        let stop = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicU64::new(0));
        let epoch = Arc::new(AtomicU64::new(0));
        let base = Instant::now();
        let (s, a, e) = (stop.clone(), alive.clone(), epoch.clone());
        let thread = std::thread::Builder::new()
            .name("heartbeats".into())
            .spawn(move || {
                // On time even on a busy host, as the epoch loop: a heartbeat that waits
                // for a CPU is a silence the backup may take for a dead primary.
                let _realtime = super::epochs::Realtime::try_enter();
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
    pub(super) fn check_in(&self, epoch: u64) {
        self.alive
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.epoch.store(epoch, Ordering::Relaxed);
    }

    pub(super) fn stop(&mut self) {
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

/// An epoch handed to the sender thread: its pages (copied out while the guest was
/// paused) and state blob. The buffers come back in [`EpochSent`] for the next epoch.
pub(super) struct EpochJob {
    pub(super) epoch: u64,
    pub(super) pfns: Vec<u64>,
    pub(super) data: Vec<u8>,
    /// Pages copied while the epoch ran and not written again before its pause (pfns,
    /// data): merged into `pfns`/`data` by the sender, those win.
    pub(super) early: Option<(Vec<u64>, Vec<u8>)>,
    pub(super) blob: Vec<u8>,
    /// The epoch's disk writes, per disk: `(byte offset, data)` in completion order.
    pub(super) disks: Vec<Vec<(u64, bytes::Bytes)>>,
    /// The guest's network frames of the epoch, and the last epoch whose output was let
    /// out when it was taken (see [`checkpoint::encode::EpochOutput`]).
    pub(super) released: u64,
    pub(super) output: Vec<bytes::Bytes>,
}

pub(super) struct EpochSent {
    pub(super) job: EpochJob,
    pub(super) result: Result<checkpoint::encode::EncodeSummary, checkpoint::encode::EncodeError>,
}

/// Encodes and sends epochs on a thread of its own, so that the epoch loop keeps
/// counting the dirty set (and holds the guest at the cap) while an epoch is on its way.
/// One epoch at a time: the loop hands over the next only once the last is sent.
pub(super) fn spawn_sender(
    link: Arc<Mutex<Link>>,
    encoder: EpochEncoder,
) -> (Sender<EpochJob>, Receiver<EpochSent>) {
    let (jobs, rx) = crossbeam_channel::bounded::<EpochJob>(1);
    let (tx, sent) = crossbeam_channel::bounded::<EpochSent>(1);
    std::thread::Builder::new()
        .name("epoch-sender".into())
        .spawn(move || {
            let (mut merged_pfns, mut merged_data) = (Vec::new(), Vec::new());
            for mut job in rx {
                if let Some((early_pfns, early_data)) = job.early.take() {
                    crate::vstate::dirty::merge_copies(
                        (&job.pfns, &job.data),
                        (&early_pfns, &early_data),
                        &mut merged_pfns,
                        &mut merged_data,
                    );
                    std::mem::swap(&mut job.pfns, &mut merged_pfns);
                    std::mem::swap(&mut job.data, &mut merged_data);
                }
                let result = StagedPages::new(&job.pfns, &job.data).and_then(|staged| {
                    let mut l = link.lock().unwrap_or_else(|e| e.into_inner());
                    let output = checkpoint::encode::EpochOutput {
                        released: job.released,
                        frames: &job.output,
                    };
                    let r = send_epoch(
                        &mut l.tx, &encoder, job.epoch, &staged, &job.disks, &job.blob, output,
                    );
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

/// Reads acks on its own thread so that sending never waits for them; each releases the
/// output of its epochs, for `output`'s protection session only (this thread may outlive
/// the protection when the backup is given up on for another reason than its acks).
pub(super) fn spawn_ack_reader(
    mut rx: FrameReceiver,
    inflight: Arc<SharedInFlight>,
    events: Sender<AckEvent>,
    timeout: Duration,
    output: Option<(OutputCommit, Arc<AtomicU64>)>,
) {
    std::thread::Builder::new()
        .name("acks".into())
        .spawn(move || {
            let mut silence_record = Duration::ZERO;
            loop {
                let got = rx.recv(Some(timeout));
                if got.is_ok() {
                    crate::replication::near_miss(
                        "backup",
                        rx.longest_silence(),
                        timeout,
                        &mut silence_record,
                    );
                }
                let ev = match got {
                    Ok(Message::Ack { epoch }) => match inflight.acked(epoch) {
                        Ok(_) => {
                            // Output commit: what the guest sent up to this epoch may leave now.
                            if let Some((o, session)) = &output {
                                let session = session.load(Ordering::SeqCst);
                                if session != NO_SESSION {
                                    o.commit(session, epoch);
                                }
                            }
                            AckEvent::Ack {
                                epoch,
                                at: Instant::now(),
                            }
                        }
                        Err(e) => AckEvent::Lost(BackupLoss::Ack(e)),
                    },
                    Ok(Message::Nack { epoch, reason }) => AckEvent::Nack { epoch, reason },
                    Ok(Message::Heartbeat { .. }) => continue,
                    Ok(Message::DiskSums { disk, first, sums }) => {
                        AckEvent::DiskSums { disk, first, sums }
                    }
                    // The backup's answer to a switchover's Handover.
                    Ok(Message::Handover { .. }) => AckEvent::Handover(Ok(())),
                    Ok(Message::Refuse { reason }) => AckEvent::Handover(Err(reason)),
                    Ok(Message::Leave { epoch, reason }) => {
                        AckEvent::Lost(BackupLoss::Left { epoch, reason })
                    }
                    Ok(other) => AckEvent::Lost(BackupLoss::Unexpected(other.kind())),
                    Err(TransportError::Timeout(t)) => AckEvent::Lost(BackupLoss::Silent(t)),
                    Err(e) => AckEvent::Lost(BackupLoss::Receive(e)),
                };
                let last = !matches!(
                    ev,
                    AckEvent::Ack { .. } | AckEvent::Handover(_) | AckEvent::DiskSums { .. }
                );
                if events.send(ev).is_err() || last {
                    return;
                }
            }
        })
        .expect("spawn the ack reader thread");
}

impl Primary<'_> {
    /// The backup committed its first epoch: the guest is protected from now on.
    fn first_ack(&mut self, epoch: u64, at: Instant) {
        let took = at.saturating_duration_since(self.began);
        self.protected_at = Some(at);
        status::set_protection(
            Protection::Protected,
            "the backup committed its first epoch",
        );
        let sync = match self.sync_began {
            Some(t) => format!(
                " ({:.1} ms after the initial sync of memory began)",
                at.saturating_duration_since(t).as_secs_f64() * 1000.0
            ),
            None => String::new(),
        };
        info!(
            "PROTECTED: the backup at {} committed epoch {epoch}, {} ms after protection \
             began{sync}",
            self.opts.peer,
            took.as_millis()
        );
        if control::last().is_some_and(|r| r.kind == "protect" && r.state == RequestState::Running)
        {
            control::finish(Ok(format!(
                "protected by the backup at {} in {} ms (first committed epoch)",
                self.opts.peer,
                took.as_millis()
            )));
        }
    }

    pub(super) fn drain_acks(&mut self) -> Result<(), PrimaryError> {
        while let Ok(ev) = self.acks.try_recv() {
            match ev {
                AckEvent::Ack { epoch, at } => {
                    // Acks are cumulative: every epoch up to `epoch` is committed.
                    status::update(|s| s.acked_epoch = Some(epoch));
                    if self.protected_at.is_none() {
                        self.first_ack(epoch, at);
                    }
                    let done: Vec<u64> = self
                        .pause_start
                        .keys()
                        .copied()
                        .filter(|&e| e <= epoch)
                        .collect();
                    for e in done {
                        if let Some(t) = self.pause_start.remove(&e) {
                            let commit = at.saturating_duration_since(t);
                            self.stats.commit_us.push_duration(commit);
                            self.stats.recent_commit_us.push_duration(commit);
                            metrics::committed(Some(commit));
                        }
                    }
                }
                AckEvent::Nack { epoch, reason } => {
                    return Err(PrimaryError::Rejected { epoch, reason })
                }
                AckEvent::Lost(why) => return Err(PrimaryError::BackupLost(why)),
                AckEvent::Handover(r) => self.handover_reply = Some(r),
                AckEvent::DiskSums { .. } => {
                    return Err(PrimaryError::BackupLost(BackupLoss::Protocol(
                        "disk sums after the initial sync".into(),
                    )))
                }
            }
        }
        Ok(())
    }

    /// Takes the sender thread's report on the epoch it was sending, waiting at most
    /// `timeout` for it: the figures go to the stats, the buffers back for reuse.
    pub(super) fn collect_sent(&mut self, timeout: Duration) -> Result<(), PrimaryError> {
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
        let pages = job.pfns.len() as u64;
        self.pfns.reuse(job.pfns);
        let summary = result?;
        self.stats.wire_bytes.push(summary.bytes);
        self.stats.output_bytes += summary.output_bytes;
        metrics::epoch_sent(pages, summary.bytes);
        for (i, n) in summary.by_encoding.iter().enumerate() {
            self.stats.encodings[i] += n;
        }
        Ok(())
    }

    /// Waits until the sender thread has sent its epoch, for as long as the backup
    /// answers.
    pub(super) fn wait_sent(&mut self) -> Result<(), PrimaryError> {
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
    pub(super) fn wait_for_room(&mut self, bytes: u64) -> Result<(), PrimaryError> {
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
    pub(super) fn wait_acked(&mut self, epoch: u64) -> Result<(), PrimaryError> {
        while !self.inflight.wait_acked(epoch, WAIT_SLICE) {
            self.heartbeats.check_in(epoch);
            self.drain_acks()?;
        }
        self.drain_acks()
    }
}
