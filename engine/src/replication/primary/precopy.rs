//! Pre-copy: the whole memory while the guest runs, then rounds of what it dirtied
//! meanwhile, until what is left fits in one epoch (it goes with epoch 1), with QEMU-style
//! auto-converge throttling.

use super::*;
use crate::replication::events::{self, SyncFigures};
use crate::vstate::pagemap::PageMap;

impl Primary<'_> {
    /// Pre-copy: the whole memory while the guest runs, then rounds of what it dirtied
    /// meanwhile, until that fits in one epoch; it goes with epoch 1. Each step splits its
    /// pages with the page map: the pages known to hold only zeros go as zero pages
    /// without being read, the others are copied and encoded.
    ///
    /// Auto-converge: each round may leave at most a quarter of what it sends (or half an
    /// epoch) dirty. After a step (at most every 2 ms) the dirty set is counted (without
    /// harvesting it) and the share of time the vCPUs are held is set so that the rest of
    /// the round stays within that budget: from the guest's dirty rate this round (pages
    /// per second it ran) and the link's pace, the guest may run `budget left / rate`
    /// more, out of the time the round still takes (at most 99% held). A round at 99% that
    /// still does not shrink is followed by one with the guest paused (the final pause then
    /// lasts one round of what is left). Without a dirty count (dirty ring), a round whose
    /// guest dirtied more than half of what it sent raises the share (50%, then halving
    /// what it runs). When the run is to end during pre-copy, the guest is paused for good
    /// and the rounds finish without it running.
    pub(super) fn initial_sync(&mut self) -> Result<(), PrimaryError> {
        let mem_pages = (ram_size(self.machine.memory()) / PAGE_SIZE as u64) as usize;
        let cap = self.opts.max_epoch_pages;
        let start = Instant::now();
        self.sync_began = Some(start);
        // Everything counts as dirty for round 0: forget what the boot dirtied.
        self.machine.harvest(&mut self.pfns)?;
        let mut round_pfns = RoundPages::All(mem_pages as u64);
        let mut step_buf = Vec::new();
        let mut sent_bytes = 0u64;
        let mut synced = 0u64;
        let mut ending = false;
        let mut stop_and_copy = false;
        let mut max_throttle = 0;
        let mut last_dirty = usize::MAX;
        let mut pagemap = PageMap::open();
        let (mut data, mut zero) = (Vec::new(), Vec::new());
        // Pages sent as zero pages without being read (the page map showed them zero).
        let mut unread = 0u64;
        for round in 0.. {
            let total = (round_pfns.len() * PAGE_SIZE) as u64;
            let budget = (cap / 2).max(round_pfns.len() / 4) as f64;
            let mut done = 0u64;
            let mut last_report = Instant::now();
            let round_start = Instant::now();
            // Seconds the guest ran this round (as far as the throttle lets it).
            let mut ran = 0f64;
            let mut step_start = Instant::now();
            let mut last_count = Instant::now();
            for step in 0..round_pfns.len().div_ceil(SYNC_CHUNK_PAGES) {
                let chunk = round_pfns.step(step, SYNC_CHUNK_PAGES, &mut step_buf);
                self.heartbeats.check_in(0);
                if !ending && self.end_requested()? {
                    // The end comes with the final epoch; the guest runs no more.
                    ending = true;
                    self.machine.set_throttle(0);
                    if self.machine.is_running() {
                        self.machine.pause()?;
                        status::update(|s| s.guest = GuestState::Paused);
                    }
                }
                // Pages the page map shows to be zeros go as zero pages unread; the
                // others are copied and encoded.
                data.clear();
                zero.clear();
                pagemap.split(self.machine.memory(), chunk, &mut data, &mut zero);
                let mut bytes = 0;
                if !zero.is_empty() {
                    let mut link = self.link();
                    bytes +=
                        send_sync_zeros(&mut link.tx, &self.encoder, &zero, done, total)?.bytes;
                    link.sent();
                    done += (zero.len() * PAGE_SIZE) as u64;
                    unread += zero.len() as u64;
                }
                if !data.is_empty() {
                    memory::copy_pages(self.machine.memory(), &data, &mut self.buf)?;
                    let staged = StagedPages::new(&data, &self.buf)?;
                    let mut link = self.link();
                    bytes += send_sync(&mut link.tx, &self.encoder, &staged, done, total)?.bytes;
                    link.sent();
                    done += (data.len() * PAGE_SIZE) as u64;
                }
                synced += (chunk.len() * PAGE_SIZE) as u64;
                sent_bytes += bytes;
                metrics::sync_sent(bytes);
                if !ending && !stop_and_copy && last_count.elapsed() >= SYNC_COUNT_EVERY {
                    last_count = Instant::now();
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
                    let round_pace = done as f64 / round_start.elapsed().as_secs_f64().max(1e-6);
                    let f = SyncFigures {
                        round,
                        bytes_done: done,
                        bytes_total: total,
                        mib_per_s: synced as f64 / secs / (1 << 20) as f64,
                        seconds_left: events::seconds_left(total - done, round_pace),
                    };
                    info!(
                        "initial sync round {round}: {} of {} MiB ({:.0}%), {:.0} MiB/s of guest \
                         memory, {:.1} s left, {} MiB on the wire, guest held {}%",
                        done >> 20,
                        total >> 20,
                        done as f64 * 100.0 / total.max(1) as f64,
                        f.mib_per_s,
                        f.seconds_left.unwrap_or(0.0),
                        sent_bytes >> 20,
                        if ending || stop_and_copy {
                            100
                        } else {
                            self.machine.throttle()
                        }
                    );
                    events::sync_progress("primary", &f);
                }
                self.drain_acks()?;
            }
            // What the guest dirtied since this round began (including pages of this
            // round it wrote again after they were sent).
            self.machine.harvest(&mut self.pfns)?;
            let sent = round_pfns.len();
            let dirtied = std::mem::take(&mut self.pfns);
            let dirty = dirtied.len();
            if dirty <= cap {
                self.carry = dirtied;
                break;
            }
            round_pfns = RoundPages::Dirty(dirtied);
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
            "initial sync done in {:.3} s ({:.0} MiB/s of guest memory, {} MiB of it zero pages \
             found so without reading them, guest held up to {}% of the time); {} pages go \
             with epoch 1; continuous epochs every {:?}",
            start.elapsed().as_secs_f64(),
            synced as f64 / start.elapsed().as_secs_f64().max(1e-6) / (1 << 20) as f64,
            (unread * PAGE_SIZE as u64) >> 20,
            if stop_and_copy { 100 } else { max_throttle },
            self.carry.len(),
            self.opts.interval
        );
        Ok(())
    }
}

/// The pages of one pre-copy round: the whole RAM (round 0, not listed: a list of every
/// page of 8 GiB would take 16 MiB, built page fault by page fault), or what the guest
/// dirtied during the round before.
enum RoundPages {
    All(u64),
    Dirty(DirtySet),
}

impl RoundPages {
    fn len(&self) -> usize {
        match self {
            RoundPages::All(pages) => *pages as usize,
            RoundPages::Dirty(set) => set.len(),
        }
    }

    /// The pages of step `i`, `n` pages a step (the last may have fewer), in order; round
    /// 0's are listed into `buf`.
    fn step<'a>(&'a self, i: usize, n: usize, buf: &'a mut Vec<u64>) -> &'a [u64] {
        match self {
            RoundPages::All(pages) => {
                let first = (i * n) as u64;
                buf.clear();
                buf.extend(first..(first + n as u64).min(*pages));
                buf
            }
            RoundPages::Dirty(set) => {
                let pfns = set.as_slice();
                &pfns[(i * n).min(pfns.len())..((i + 1) * n).min(pfns.len())]
            }
        }
    }
}

/// The share of time (%) to hold the guest for the rest of a pre-copy round: it may
/// dirty `budget_left` more pages, dirties `rate` pages a second while it runs, and the
/// round takes `left` more seconds.
pub(super) fn converge_throttle(budget_left: f64, rate: f64, left: f64) -> u32 {
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
pub(super) fn throttle_up(pct: u32) -> u32 {
    if pct < 50 {
        50
    } else {
        (pct + (100 - pct).div_ceil(2)).min(THROTTLE_MAX)
    }
}
