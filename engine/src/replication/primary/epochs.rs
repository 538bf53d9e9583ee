//! Continuous epochs: the loop that decides when an epoch ends (interval, dirty-set cap,
//! output waiting, window full), the checkpoint itself, and the clean end.

use super::*;

/// While it lives, the calling thread (the epoch loop) runs at real-time priority,
/// `SCHED_FIFO` 1, where the system allows it. The loop mostly sleeps, but when it wakes
/// to count the dirty set or to end an epoch it must not queue behind the guest's vCPU
/// threads for a CPU. Measured here with a guest writing as fast as it can on both cores
/// of the machine: at normal priority (even at nice -10) the loop woke 3-8 ms late and
/// epochs overshot the cap by half; at `SCHED_FIFO` it woke on time and 9 epochs in 10
/// stayed within 11% of the cap. The thread's previous policy returns on drop.
///
/// `sched_getscheduler`, `sched_getparam` and `sched_setscheduler` come from libc: rustix
/// has no wrapper for scheduling policies.
pub(super) struct Realtime {
    pub(super) previous: Option<(libc::c_int, libc::sched_param)>,
    /// Not Send: it restores the policy of the thread that created it.
    pub(super) _thread: std::marker::PhantomData<*const ()>,
}

impl Realtime {
    /// [`try_enter`](Self::try_enter), saying in the log when the system refuses.
    pub(super) fn enter() -> Realtime {
        match Realtime::try_enter() {
            Ok(r) => r,
            Err(e) => {
                info!(
                    "the epoch loop keeps its normal priority (real-time scheduling refused: \
                     {e}); on a busy host epochs may overshoot --max-epoch-pages"
                );
                Realtime {
                    previous: None,
                    _thread: std::marker::PhantomData,
                }
            }
        }
    }

    /// The calling thread at `SCHED_FIFO` 1 while the guard lives, or why not.
    pub(super) fn try_enter() -> Result<Realtime, std::io::Error> {
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
            return Err(std::io::Error::last_os_error());
        }
        Ok(Realtime {
            previous: Some((policy, param)),
            _thread: std::marker::PhantomData,
        })
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

impl Primary<'_> {
    /// Continuous epochs until the guest exits, `--seconds` pass, or SIGTERM/SIGINT.
    /// Returns the guest's exit status (0 when the run was ended from outside).
    pub(super) fn epochs(&mut self) -> Result<u8, PrimaryError> {
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
        let mut last_published = Instant::now();
        let mut last_start = Instant::now();
        self.next_dirty_count = Instant::now();
        loop {
            self.heartbeats.check_in(self.epoch);
            let mut deadline = next.min(self.next_dirty_count);
            // Output that waits ends the epoch once `min_interval` has passed. Until some
            // does, the loop sleeps: the first frame held wakes it (`output_wake`).
            if early && self.output.as_ref().is_some_and(OutputCommit::output_waits) {
                deadline = deadline.min(last_start + self.opts.min_interval);
            }
            if self.opts.epoch_precopy_pct > 0 && !self.early_done {
                deadline = deadline
                    .min(last_start + self.opts.interval * self.opts.epoch_precopy_pct / 100);
            }
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50));
            match self.machine.wait_event_or(&self.output_wake, wait) {
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
            if self.run_is_over() {
                return Ok(0);
            }
            if let Some(Request::Switchover { then }) =
                control::take(|r| matches!(r, Request::Switchover { .. }))
            {
                if self.prepare_switchover(then) {
                    return Ok(0);
                }
            }
            if last_stats.elapsed() >= STATS_EVERY {
                last_stats = Instant::now();
                info!("{}", self.stats.summary());
            }
            if last_published.elapsed() >= STATUS_EVERY {
                last_published = Instant::now();
                self.publish_figures();
            }
            self.copy_early(last_start)?;
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
                // Output waiting would end the wait at once, again and again: until the
                // next ack (or a slice of the loop's time), there is nothing to do.
                let acked = self.inflight.lock().last_acked();
                self.inflight.wait_acked(acked + 1, DIRTY_POLL_MIN);
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
    pub(super) fn dirty_set_full(&mut self, since: Instant) -> Result<bool, PrimaryError> {
        let now = Instant::now();
        if now < self.next_dirty_count {
            return Ok(self.dirty_full);
        }
        let Some(count) = self.machine.dirty_count()? else {
            // Not countable here (dirty ring): the ring's size bounds the epoch instead.
            self.next_dirty_count = far_future();
            return Ok(false);
        };
        let count = count + self.carry.len() as u64 + self.early.len() as u64;
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

    /// Pre-copy inside the epoch: once `epoch_precopy_pct` of the interval has passed since
    /// the epoch began at `since`, the pages dirtied so far are harvested and copied while
    /// the guest runs. A page written after its harvest is dirty again at the pause and
    /// copied there; that copy wins (`merge_copies`), so the epoch is exactly the memory
    /// at the pause. Skipped for epochs that end before that point (early checkpoints).
    pub(super) fn copy_early(&mut self, since: Instant) -> Result<(), PrimaryError> {
        let pct = self.opts.epoch_precopy_pct;
        if pct == 0 || self.early_done || since.elapsed() < self.opts.interval * pct / 100 {
            return Ok(());
        }
        self.early_done = true;
        let t = Instant::now();
        self.machine.harvest(&mut self.early)?;
        self.early
            .copy_out(self.machine.memory(), &mut self.early_buf)?;
        self.stats.early_copy_us.push_duration(t.elapsed());
        self.stats.early_pages.push(self.early.len() as u64);
        Ok(())
    }

    /// The guest has dirtied an epoch's worth, but the window is full or the last epoch
    /// is still being sent: keep it paused until the backup acknowledges an epoch and the
    /// sender is free. It is left paused for the checkpoint that follows.
    pub(super) fn throttle(&mut self) -> Result<(), PrimaryError> {
        self.stats.throttled += 1;
        let t = Instant::now();
        self.machine.pause()?;
        let r = self.wait_sent().and_then(|()| self.wait_for_room(0));
        // The guest stays paused: the checkpoint that follows takes it from here.
        self.stats.throttle_time += t.elapsed();
        self.stats.held_us.push_duration(t.elapsed());
        r
    }

    /// One epoch. The guest is paused from the capture until the dirty pages are copied;
    /// with `last`, it stays paused (the end of the run).
    pub(super) fn checkpoint(&mut self, last: bool) -> Result<(), PrimaryError> {
        let t0 = Instant::now();
        let (state, timing) = self.machine.pause_and_capture()?;
        // Output from now on belongs to the next epoch.
        // (The checkpoint being taken is epoch `self.epoch + 1`.)
        if let Some(o) = &self.output {
            if self.session.load(Ordering::SeqCst) == NO_SESSION {
                // A re-protected guest: its output is held from this capture on.
                self.session
                    .store(o.protect(self.epoch + 2), Ordering::SeqCst);
            } else {
                o.begin_epoch(self.epoch + 2);
            }
        }
        self.machine.harvest(&mut self.pfns)?;
        self.pfns.merge(&mut self.carry);
        // The devices are frozen: these are exactly the disk writes of this epoch.
        let disks: Vec<Vec<(u64, bytes::Bytes)>> = self
            .machine
            .disks()
            .iter()
            .map(|d| {
                d.take_writes()
                    .into_iter()
                    .map(|w| (w.offset, w.data))
                    .collect()
            })
            .collect();
        let disk_bytes: u64 = disks
            .iter()
            .flatten()
            .map(|(_, data)| data.len() as u64)
            .sum();
        let harvested = t0.elapsed();
        self.pfns.copy_out(self.machine.memory(), &mut self.buf)?;
        let copied = t0.elapsed();
        // Where the dirty set cannot be counted while the guest runs, an epoch may not fit
        // next to those in flight: the guest stays paused until it does.
        let room = (self.buf.len() + self.early_buf.len()) as u64 + disk_bytes + STATE_ALLOWANCE;
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
        // The epoch's output is complete (frames sent from the capture on belong to the
        // next one) and held until its ack: it goes to the backup with the epoch, so that
        // a promoted backup can send what this process still held when it died.
        let (released, output) = match &self.output {
            Some(o) => o.held_of(self.session.load(Ordering::SeqCst), epoch),
            None => (0, Vec::new()),
        };
        let blob = state.to_blob();
        // The early copy's pages that were not written again since (the pause's copy of
        // the others wins when the sender merges them).
        let early = std::mem::take(&mut self.early_done)
            .then(|| (self.early.take_vec(), std::mem::take(&mut self.early_buf)));
        let early_pages = early.as_ref().map_or(0, |(p, _)| p.len());
        let bytes = (self.buf.len() + blob.len() + early_pages * PAGE_SIZE) as u64 + disk_bytes;
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
        st.recent_pause_us.push_duration(pause);
        st.parked_us.push_duration(timing.parked);
        st.captured_us.push_duration(timing.captured);
        st.harvested_us.push_duration(harvested);
        st.copied_us.push_duration(copied);
        // Pages of the epoch: the union of the two copies (a page in both is sent once).
        let pages = match &early {
            Some((e, _)) => crate::vstate::dirty::union_len(self.pfns.as_slice(), e),
            None => self.pfns.len(),
        };
        st.pages.push(pages as u64);
        metrics::checkpoint(pause, pages as u64);
        if last {
            self.last_state = Some(blob.clone());
        }
        let job = EpochJob {
            epoch,
            pfns: self.pfns.take_vec(),
            data: std::mem::take(&mut self.buf),
            early,
            blob,
            disks,
            released,
            output,
        };
        // The sender is idle (callers wait for it), so this does not block.
        self.jobs
            .send(job)
            .map_err(|_| PrimaryError::BackupLost(BackupLoss::SenderGone))?;
        self.sending = Some(epoch);
        Ok(())
    }

    /// The clean end: the guest paused for good, every epoch in flight acknowledged, a
    /// final epoch and its ack, and `End` with the digest of RAM and state that both sides
    /// print. The waits last as long as the backup answers (a backup still busy with a
    /// large pre-copy keeps sending heartbeats), not a fixed time.
    pub(super) fn finish(&mut self) -> Result<(), PrimaryError> {
        let epoch = self.final_epoch()?;
        self.end(epoch)
    }

    /// The guest paused for good, every epoch in flight acknowledged, a final epoch and
    /// its ack; returns the final epoch.
    pub(super) fn final_epoch(&mut self) -> Result<u64, PrimaryError> {
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
        Ok(epoch)
    }

    /// `End` with the digest after the final `epoch`, and the run's figures.
    pub(super) fn end(&mut self, epoch: u64) -> Result<(), PrimaryError> {
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
