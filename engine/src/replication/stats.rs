//! Figures a replication run reports: pause times, epoch sizes, commit latency.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Percentiles over recorded samples (kept whole: runs are minutes, epochs are ms).
#[derive(Default, Clone, Debug)]
pub struct Samples {
    values: Vec<u64>,
}

impl Samples {
    /// Records one sample.
    pub fn push(&mut self, v: u64) {
        self.values.push(v);
    }

    /// Records a duration in µs.
    pub fn push_duration(&mut self, d: Duration) {
        self.values.push(d.as_micros() as u64);
    }

    /// How many samples.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether there is no sample.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The sum of the samples.
    pub fn sum(&self) -> u64 {
        self.values.iter().sum()
    }

    /// The `p`-th percentile (nearest rank), 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        nearest_rank(self.values.clone(), p)
    }

    /// The largest sample, 0 when empty.
    pub fn max(&self) -> u64 {
        self.values.iter().copied().max().unwrap_or(0)
    }
}

/// The `p`-th percentile of `v` by nearest rank, 0 when empty.
fn nearest_rank(mut v: Vec<u64>, p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// How far back [`RecentSamples`] look by default: the control socket's figures are
/// those of the last minute.
pub const RECENT_WINDOW: Duration = Duration::from_secs(60);

/// The most samples [`RecentSamples`] keep by default: a minute of 7 ms epochs (at the
/// default 25 ms interval a minute is 2400); when epochs come faster, the oldest go first.
pub const RECENT_CAP: usize = 8192;

/// Percentiles over the samples of a recent window (by default the last minute, at most
/// [`RECENT_CAP`] samples): what the pair does now, not since the start. Samples are
/// pushed in time order; older ones fall out as new ones come.
#[derive(Clone, Debug)]
pub struct RecentSamples {
    window: Duration,
    cap: usize,
    samples: VecDeque<(Instant, u64)>,
}

impl Default for RecentSamples {
    fn default() -> Self {
        RecentSamples::new(RECENT_WINDOW, RECENT_CAP)
    }
}

impl RecentSamples {
    /// Samples of the last `window`, at most `cap` (at least 1) of them.
    pub fn new(window: Duration, cap: usize) -> Self {
        RecentSamples {
            window,
            cap: cap.max(1),
            samples: VecDeque::new(),
        }
    }

    /// Records `v`, taken at `at` (not earlier than the samples before it).
    pub fn push_at(&mut self, at: Instant, v: u64) {
        if let Some(oldest) = at.checked_sub(self.window) {
            while self.samples.front().is_some_and(|&(t, _)| t < oldest) {
                self.samples.pop_front();
            }
        }
        if self.samples.len() >= self.cap {
            self.samples.pop_front();
        }
        self.samples.push_back((at, v));
    }

    /// Records a duration in µs, taken now.
    pub fn push_duration(&mut self, d: Duration) {
        self.push_at(Instant::now(), d.as_micros() as u64);
    }

    /// The values of the window that ends at `now`.
    fn values_at(&self, now: Instant) -> Vec<u64> {
        let oldest = now.checked_sub(self.window);
        self.samples
            .iter()
            .filter(|&&(t, _)| oldest.is_none_or(|o| t >= o))
            .map(|&(_, v)| v)
            .collect()
    }

    /// How many samples the window ending at `now` holds.
    pub fn len_at(&self, now: Instant) -> usize {
        self.values_at(now).len()
    }

    /// The `p`-th percentile (nearest rank) of the window that ends at `now`, 0 when empty.
    pub fn percentile_at(&self, now: Instant, p: f64) -> u64 {
        nearest_rank(self.values_at(now), p)
    }

    /// The `p`-th percentile (nearest rank) of the window that ends now, 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        self.percentile_at(Instant::now(), p)
    }
}

/// What the primary measured.
#[derive(Default, Clone, Debug)]
pub struct PrimaryStats {
    /// Pause per epoch (µs): request until the guest runs again.
    pub pause_us: Samples,
    /// Dirty pages per epoch.
    pub pages: Samples,
    /// Bytes on the wire per epoch.
    pub wire_bytes: Samples,
    /// Bytes of `Output` frames (the guest's network output shipped with its epochs), part
    /// of `wire_bytes`.
    pub output_bytes: u64,
    /// Parts of the pause (µs): until every vCPU parked, until the state was captured,
    /// until the dirty set was harvested, until the pages were copied.
    pub parked_us: Samples,
    /// Until the state was captured (µs).
    pub captured_us: Samples,
    /// Until the dirty set was harvested (µs).
    pub harvested_us: Samples,
    /// Until the pages were copied (µs).
    pub copied_us: Samples,
    /// The early copy of an epoch's pages while the guest ran (µs), and its pages
    /// (`epoch_precopy_pct`); the guest is not paused for it.
    pub early_copy_us: Samples,
    /// Pages of each early copy.
    pub early_pages: Samples,
    /// Pause start until the backup's ack (µs).
    pub commit_us: Samples,
    /// The pauses of the last minute (µs), for the control socket.
    pub recent_pause_us: RecentSamples,
    /// Pause start until the backup's ack, for the last minute (µs), for the control socket.
    pub recent_commit_us: RecentSamples,
    /// Encoded pages by encoding (zero, delta, lz4, raw).
    pub encodings: [u64; 8],
    /// Epochs ended early because output waited for them.
    pub early: u64,
    /// Epochs where the window told us to wait for the backup.
    pub throttled: u64,
    /// Time the guest spent paused because the backup was behind.
    pub throttle_time: Duration,
    /// Each stretch the guest was held for the backup (µs).
    pub held_us: Samples,
    /// Epochs ended early because the dirty set reached the cap.
    pub capped: u64,
}

impl PrimaryStats {
    /// Where the pause goes, p50 of the cumulative times.
    pub fn pause_breakdown(&self) -> String {
        format!(
            "pause p50 (cumulative, us): parked={} captured={} harvested={} copied={} resumed={}; \
             copied while running: {} epochs, p50 {} pages in {} us",
            self.parked_us.percentile(50.0),
            self.captured_us.percentile(50.0),
            self.harvested_us.percentile(50.0),
            self.copied_us.percentile(50.0),
            self.pause_us.percentile(50.0),
            self.early_pages.len(),
            self.early_pages.percentile(50.0),
            self.early_copy_us.percentile(50.0),
        )
    }

    /// One line for the log at the end of a run.
    pub fn summary(&self) -> String {
        let pages = self.pages.sum();
        let bytes = self.wire_bytes.sum();
        let per_page = if pages > 0 {
            bytes as f64 / pages as f64
        } else {
            0.0
        };
        let ratio = if bytes > 0 {
            (pages * 4096) as f64 / bytes as f64
        } else {
            0.0
        };
        format!(
            "epochs={} pause_us p50={} p99={} max={} commit_us p50={} p99={} dirty_pages={} \
             wire_bytes={} output_bytes={} bytes_per_dirty_page={:.0} compression={:.2}x \
             throttled={} held_us max={} capped={}",
            self.pause_us.len(),
            self.pause_us.percentile(50.0),
            self.pause_us.percentile(99.0),
            self.pause_us.max(),
            self.commit_us.percentile(50.0),
            self.commit_us.percentile(99.0),
            pages,
            bytes,
            self.output_bytes,
            per_page,
            ratio,
            self.throttled,
            self.held_us.max(),
            self.capped,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut s = Samples::default();
        assert_eq!(s.percentile(50.0), 0);
        for v in 1..=100 {
            s.push(v);
        }
        assert_eq!(s.percentile(50.0), 50);
        assert_eq!(s.percentile(99.0), 99);
        assert_eq!(s.percentile(100.0), 100);
        assert_eq!(s.percentile(0.0), 1);
        assert_eq!(s.max(), 100);
        assert_eq!(s.sum(), 5050);
    }

    #[test]
    fn recent_samples_forget_what_is_older_than_the_window() {
        let mut r = RecentSamples::new(Duration::from_secs(60), 1000);
        let t0 = Instant::now();
        assert_eq!(r.percentile_at(t0, 50.0), 0);
        // A slow first minute, then a fast one.
        for i in 0..60 {
            r.push_at(t0 + Duration::from_secs(i), 10_000);
        }
        for i in 60..120 {
            r.push_at(t0 + Duration::from_secs(i), 100 + i);
        }
        let now = t0 + Duration::from_millis(119_500);
        assert_eq!(r.len_at(now), 60, "the samples of 60..=119 s");
        assert_eq!(r.percentile_at(now, 50.0), 189);
        assert_eq!(r.percentile_at(now, 99.0), 219);
        // Nothing new for a while: the window empties without a push.
        assert_eq!(r.len_at(now + Duration::from_secs(30)), 30);
        assert_eq!(r.percentile_at(now + Duration::from_secs(61), 50.0), 0);
        // What fell out is dropped on the next push.
        r.push_at(now + Duration::from_secs(200), 7);
        assert_eq!(r.samples.len(), 1);
        assert_eq!(r.percentile_at(now + Duration::from_secs(200), 99.0), 7);
    }

    #[test]
    fn recent_samples_are_bounded() {
        let mut r = RecentSamples::new(Duration::from_secs(60), 100);
        let t0 = Instant::now();
        for i in 0..10_000u64 {
            r.push_at(t0 + Duration::from_micros(i), i);
        }
        assert_eq!(r.samples.len(), 100);
        let now = t0 + Duration::from_millis(10);
        // The newest 100: 9900..=9999.
        assert_eq!(r.percentile_at(now, 0.0), 9900);
        assert_eq!(r.percentile_at(now, 100.0), 9999);
        let d = RecentSamples::default();
        assert_eq!((d.window, d.cap), (RECENT_WINDOW, RECENT_CAP));
    }
}
