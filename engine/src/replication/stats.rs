//! Figures a replication run reports: pause times, epoch sizes, commit latency.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use thiserror::Error;

/// Values below this are counted exactly, one bucket each.
const EXACT: u64 = 1 << EXACT_BITS;
const EXACT_BITS: u32 = 6;
/// Above [`EXACT`], each power of two `[2^e, 2^(e+1))` is split into `2^SUB_BITS` buckets
/// of equal width `2^(e - SUB_BITS)`.
const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;

/// The buckets of a [`Histogram`]: 64 exact ones, then 32 for each power of two from 2^6
/// to 2^63, so every `u64` has one.
pub const BUCKETS: usize = EXACT as usize + (u64::BITS - EXACT_BITS) as usize * SUB;

/// The bucket that counts `v`.
fn bucket_of(v: u64) -> usize {
    if v < EXACT {
        return v as usize;
    }
    let e = u64::BITS - 1 - v.leading_zeros();
    let sub = (v >> (e - SUB_BITS)) as usize & (SUB - 1);
    EXACT as usize + (e - EXACT_BITS) as usize * SUB + sub
}

/// The smallest and the largest value bucket `i` counts.
fn bucket_range(i: usize) -> (u64, u64) {
    if i < EXACT as usize {
        return (i as u64, i as u64);
    }
    let k = i - EXACT as usize;
    let shift = (k / SUB) as u32 + EXACT_BITS - SUB_BITS;
    let low = ((SUB + k % SUB) as u64) << shift;
    (low, low + ((1u64 << shift) - 1))
}

/// A bounded record of a figure's values, as HDR histograms keep them: a fixed array of
/// [`BUCKETS`] counters (15 KiB, allocated once), whatever the number of values, so a
/// primary that runs for weeks keeps its figures since the start in the same memory.
///
/// Values below 64 are counted exactly; above, each power of two is split into 32 buckets
/// of equal width, so a bucket is at most 1/32 of its lowest value wide. A percentile is
/// the largest value of the bucket that holds the nearest-rank value, no more than the
/// largest value recorded: never below the exact answer, and above it by less than 1/32
/// (3.125%) of it. The count, sum, minimum and maximum are exact (the sum saturates at
/// `u64::MAX`). Recording takes a few instructions and never allocates.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    count: u64,
    sum: u64,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        let counts: Box<[u64]> = vec![0; BUCKETS].into_boxed_slice();
        Histogram {
            counts: counts.try_into().expect("BUCKETS counters"),
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count)
            .field("sum", &self.sum)
            .field("min", &self.min())
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Histogram {
    /// Records one value.
    pub fn push(&mut self, v: u64) {
        self.counts[bucket_of(v)] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Records a duration in µs.
    pub fn push_duration(&mut self, d: Duration) {
        self.push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// How many values.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether there is no value.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The sum of the values (exact, saturating at `u64::MAX`).
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// The `p`-th percentile by nearest rank, 0 when empty: the largest value of the
    /// bucket that holds it, at most [`Histogram::max`] (see the type's docs for the error).
    pub fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = (((p / 100.0) * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return bucket_range(i).1.min(self.max);
            }
        }
        self.max
    }

    /// The smallest value (exact), 0 when empty.
    pub fn min(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min
        }
    }

    /// The largest value (exact), 0 when empty.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The buckets that counted a value, lowest first: `(low, high, count)` with `low`
    /// inclusive and `high` exclusive (the top bucket's high, 2^64, is given as
    /// `u64::MAX`).
    pub fn buckets(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.counts
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .map(|(i, &n)| {
                let (low, last) = bucket_range(i);
                (low, last.saturating_add(1), n)
            })
    }

    /// The histogram as `--stats-json` writes it: `{"count", "sum", "min", "max", "p50",
    /// "p99", "buckets": [[low, high, count], ...]}` (see [`Histogram::buckets`]).
    pub fn to_json(&self) -> Value {
        let buckets: Vec<Value> = self
            .buckets()
            .map(|(low, high, n)| json!([low, high, n]))
            .collect();
        json!({
            "count": self.count,
            "sum": self.sum,
            "min": self.min(),
            "max": self.max,
            "p50": self.percentile(50.0),
            "p99": self.percentile(99.0),
            "buckets": buckets,
        })
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

/// What the primary measured, since its role began. Every figure takes a fixed amount of
/// memory however long the role lasts: the histograms about 170 KiB in all, the recent
/// samples at most [`RECENT_CAP`] each.
#[derive(Default, Clone, Debug)]
pub struct PrimaryStats {
    /// Pause per epoch (µs): request until the guest runs again.
    pub pause_us: Histogram,
    /// Dirty pages per epoch.
    pub pages: Histogram,
    /// Bytes on the wire per epoch.
    pub wire_bytes: Histogram,
    /// Bytes of `Output` frames (the guest's network output shipped with its epochs), part
    /// of `wire_bytes`.
    pub output_bytes: u64,
    /// Parts of the pause (µs): until every vCPU parked, until the state was captured,
    /// until the dirty set was harvested, until the pages were copied.
    pub parked_us: Histogram,
    /// Until the state was captured (µs).
    pub captured_us: Histogram,
    /// Until the dirty set was harvested (µs).
    pub harvested_us: Histogram,
    /// Until the pages were copied (µs).
    pub copied_us: Histogram,
    /// The early copy of an epoch's pages while the guest ran (µs), and its pages
    /// (`epoch_precopy_pct`); the guest is not paused for it.
    pub early_copy_us: Histogram,
    /// Pages of each early copy.
    pub early_pages: Histogram,
    /// Pause start until the backup's ack (µs).
    pub commit_us: Histogram,
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
    pub held_us: Histogram,
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

    /// The figures as `--stats-json` writes them (README, "Metrics"):
    /// `{"version": 1, "epochs": N, "histograms": {NAME: H, ...}, "counters": {NAME: n,
    /// ...}}`, each `H` as [`Histogram::to_json`] gives it, in the histogram's unit (µs,
    /// pages or bytes).
    pub fn to_json(&self) -> Value {
        let histograms: serde_json::Map<String, Value> = [
            ("pause_us", &self.pause_us),
            ("commit_us", &self.commit_us),
            ("pages", &self.pages),
            ("wire_bytes", &self.wire_bytes),
            ("parked_us", &self.parked_us),
            ("captured_us", &self.captured_us),
            ("harvested_us", &self.harvested_us),
            ("copied_us", &self.copied_us),
            ("early_copy_us", &self.early_copy_us),
            ("early_pages", &self.early_pages),
            ("held_us", &self.held_us),
        ]
        .into_iter()
        .map(|(name, h)| (name.to_string(), h.to_json()))
        .collect();
        json!({
            "version": STATS_JSON_VERSION,
            "epochs": self.pause_us.len(),
            "histograms": histograms,
            "counters": {
                "output_bytes": self.output_bytes,
                "early": self.early,
                "throttled": self.throttled,
                "throttle_us": u64::try_from(self.throttle_time.as_micros()).unwrap_or(u64::MAX),
                "capped": self.capped,
            },
        })
    }

    /// Writes [`PrimaryStats::to_json`] to `path`, one line: into a temporary file in the
    /// same directory, then renamed over `path`, so a reader sees the old file or the
    /// new one, never a part.
    pub fn write_json(&self, path: &Path) -> io::Result<()> {
        let mut text = serde_json::to_vec(&self.to_json()).map_err(io::Error::other)?;
        text.push(b'\n');
        let tmp = temp_path(path).ok_or_else(|| io::Error::other("not a file name"))?;
        let written = File::create(&tmp).and_then(|mut f| {
            f.write_all(&text)?;
            f.sync_all()
        });
        match written.and_then(|()| std::fs::rename(&tmp, path)) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

/// The `version` of the `--stats-json` format; it changes when a field changes meaning or
/// goes (new fields may come without).
pub const STATS_JSON_VERSION: u32 = 1;

/// `--stats-json FILE` cannot be written.
#[derive(Debug, Error)]
pub enum StatsFileError {
    /// The path names no file (empty, `/`, ending in `..`).
    #[error("not a file name")]
    NoFileName,
    /// The path is a directory.
    #[error("is a directory")]
    IsDirectory,
    /// The path exists and is not a regular file: a symbolic link, a device, a FIFO or a
    /// socket would be replaced by the file.
    #[error("exists and is not a regular file (a symbolic link, device, FIFO or socket would be replaced)")]
    NotRegular,
    /// No new file can be made in the file's directory.
    #[error("cannot write in directory {dir}: {source}")]
    Directory {
        /// The directory.
        dir: PathBuf,
        /// Why not.
        source: io::Error,
    },
}

/// The temporary file [`PrimaryStats::write_json`] writes before renaming it to `path`:
/// `.NAME.PID.tmp` beside it (`None`: `path` names no file).
fn temp_path(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_string_lossy();
    Some(path.with_file_name(format!(".{name}.{}.tmp", std::process::id())))
}

/// Checks at start-up that the figures can be written to `path` when the role ends: it
/// names a file, not a directory, and its directory takes a new file (the temporary file
/// is made and removed).
pub fn check_json_path(path: &Path) -> Result<(), StatsFileError> {
    let tmp = temp_path(path).ok_or(StatsFileError::NoFileName)?;
    if path.is_dir() {
        return Err(StatsFileError::IsDirectory);
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_file() {
            return Err(StatsFileError::NotRegular);
        }
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp);
    match created {
        Ok(_) => {
            let _ = std::fs::remove_file(&tmp);
            Ok(())
        }
        Err(source) => Err(StatsFileError::Directory {
            dir: dir.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_that_is_not_a_regular_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("lockstep-stats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("target.json");
        std::fs::write(&target, b"{}").unwrap();
        let link = dir.join("link.json");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            check_json_path(&link),
            Err(StatsFileError::NotRegular)
        ));
        assert!(matches!(
            check_json_path(Path::new("/dev/null")),
            Err(StatsFileError::NotRegular)
        ));
        assert!(
            check_json_path(&target).is_ok(),
            "an existing file is replaced"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A deterministic stream of pseudo-random numbers (splitmix64).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }

    const PERCENTILES: [f64; 13] = [
        0.0, 0.1, 1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 99.0, 99.9, 99.99, 100.0, 150.0,
    ];

    /// `h`'s percentiles against the exact nearest-rank ones of `values`: never below,
    /// and above by at most 1/32 of the exact value.
    fn assert_within_bound(h: &Histogram, values: &[u64], what: &str) {
        for p in PERCENTILES {
            let exact = nearest_rank(values.to_vec(), p);
            let got = h.percentile(p);
            assert!(
                got >= exact && u128::from(got - exact) * 32 <= u128::from(exact),
                "{what}: p{p} = {got}, exactly {exact}"
            );
        }
        assert_eq!(h.len(), values.len(), "{what}");
        assert_eq!(h.max(), values.iter().copied().max().unwrap_or(0), "{what}");
        assert_eq!(h.min(), values.iter().copied().min().unwrap_or(0), "{what}");
        let sum = values.iter().map(|&v| u128::from(v)).sum::<u128>();
        assert_eq!(h.sum(), u64::try_from(sum).unwrap_or(u64::MAX), "{what}");
        assert_eq!(
            h.buckets().map(|(_, _, n)| n).sum::<u64>(),
            values.len() as u64,
            "{what}: the buckets hold every value"
        );
    }

    fn histogram_of(values: &[u64]) -> Histogram {
        let mut h = Histogram::default();
        for &v in values {
            h.push(v);
        }
        h
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut s = Histogram::default();
        assert_eq!(s.percentile(50.0), 0);
        assert_eq!((s.len(), s.sum(), s.min(), s.max()), (0, 0, 0, 0));
        assert!(s.is_empty() && s.buckets().next().is_none());
        for v in 1..=100 {
            s.push(v);
        }
        assert_eq!(s.percentile(50.0), 50);
        assert_eq!(s.percentile(99.0), 99);
        assert_eq!(s.percentile(100.0), 100);
        assert_eq!(s.percentile(0.0), 1);
        assert_eq!(s.max(), 100);
        assert_eq!(s.min(), 1);
        assert_eq!(s.sum(), 5050);
        assert_eq!(s.len(), 100);
        s.push_duration(Duration::from_millis(3));
        assert_eq!(s.max(), 3000);
    }

    #[test]
    fn the_buckets_tile_every_u64_at_most_a_32nd_wide() {
        let mut next = 0u64;
        for i in 0..BUCKETS {
            let (low, last) = bucket_range(i);
            assert_eq!(low, next, "bucket {i} starts where the one before ended");
            assert!(low <= last);
            assert_eq!((bucket_of(low), bucket_of(last)), (i, i), "bucket {i}");
            if low < EXACT {
                assert_eq!(low, last, "below {EXACT} each value has its bucket");
            } else {
                assert!((last - low + 1) * 32 <= low, "bucket {i}: {low}..={last}");
            }
            next = last.wrapping_add(1);
        }
        assert_eq!(bucket_range(BUCKETS - 1).1, u64::MAX);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_of_random_values_are_within_a_32nd() {
        let mut rng = Rng(7);
        for (n, what) in [(1, "one"), (2, "two"), (100, "100"), (10_001, "10001")] {
            // Spread over every magnitude: a random value shifted right by 0 to 63 bits.
            let values: Vec<u64> = (0..n).map(|_| rng.next() >> (rng.next() % 64)).collect();
            assert_within_bound(&histogram_of(&values), &values, what);
            // Latencies as they come: mostly 100 µs to 10 ms, a few far above.
            let values: Vec<u64> = (0..n)
                .map(|_| match rng.next() % 100 {
                    0 => 1_000_000 + rng.next() % 50_000_000,
                    _ => 100 + rng.next() % 10_000,
                })
                .collect();
            assert_within_bound(&histogram_of(&values), &values, what);
        }
    }

    #[test]
    fn percentiles_of_adversarial_values_are_within_a_32nd() {
        // All equal: every percentile is the value itself (the bucket's top is clamped to
        // the maximum).
        for v in [
            0,
            1,
            63,
            64,
            65,
            127,
            128,
            1000,
            (1 << 40) + 12_345,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let values = vec![v; 1000];
            let h = histogram_of(&values);
            for p in PERCENTILES {
                assert_eq!(h.percentile(p), v, "all {v}: p{p}");
            }
            assert_within_bound(&h, &values, &format!("all {v}"));
        }
        // Powers of two (the lowest value of a bucket), and one below each (its highest).
        let powers: Vec<u64> = (0..64).map(|e| 1u64 << e).collect();
        assert_within_bound(&histogram_of(&powers), &powers, "powers of two");
        let below: Vec<u64> = (1..64).map(|e| (1u64 << e) - 1).collect();
        assert_within_bound(&histogram_of(&below), &below, "powers of two less one");
        // The two ends, alternating; and zeros with a single huge value.
        let ends: Vec<u64> = (0..1001)
            .map(|i| if i % 2 == 0 { 0 } else { u64::MAX })
            .collect();
        let h = histogram_of(&ends);
        assert_within_bound(&h, &ends, "0 and u64::MAX");
        assert_eq!(h.sum(), u64::MAX, "the sum saturates");
        let mut spike = vec![0; 999];
        spike.push(u64::MAX - 5);
        assert_within_bound(&histogram_of(&spike), &spike, "zeros and one spike");
    }

    #[test]
    fn a_histogram_does_not_grow_with_its_values() {
        let mut h = Histogram::default();
        let size = std::mem::size_of_val(&*h.counts);
        assert_eq!(size, BUCKETS * 8);
        assert_eq!(BUCKETS, 1920, "15 KiB of counters");
        let mut rng = Rng(11);
        let mut sum = 0u64;
        let mut max = 0u64;
        const N: u64 = 10_000_000;
        for _ in 0..N {
            let v = rng.next() >> 40;
            sum += v;
            max = max.max(v);
            h.push(v);
        }
        assert_eq!(std::mem::size_of_val(&*h.counts), size);
        assert_eq!(h.counts.len(), BUCKETS);
        assert_eq!((h.len() as u64, h.sum(), h.max()), (N, sum, max));
        assert_eq!(h.buckets().map(|(_, _, n)| n).sum::<u64>(), N);
    }

    #[test]
    fn a_histogram_as_json_lists_its_nonempty_buckets_in_order() {
        let values = [0, 0, 5, 64, 65, 1000, 1001, 70_000, u64::MAX];
        let h = histogram_of(&values);
        let j = h.to_json();
        assert_eq!(j["count"], 9);
        assert_eq!(j["sum"], u64::MAX, "saturated");
        assert_eq!(
            (j["min"].as_u64(), j["max"].as_u64()),
            (Some(0), Some(u64::MAX))
        );
        assert_eq!(j["p50"], h.percentile(50.0));
        assert_eq!(j["p99"], u64::MAX);
        let buckets: Vec<(u64, u64, u64)> = j["buckets"]
            .as_array()
            .expect("buckets")
            .iter()
            .map(|b| {
                (
                    b[0].as_u64().unwrap(),
                    b[1].as_u64().unwrap(),
                    b[2].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            buckets,
            [
                (0, 1, 2),
                (5, 6, 1),
                (64, 66, 2),
                (992, 1008, 2),
                (69_632, 71_680, 1),
                (63 << 58, u64::MAX, 1),
            ]
        );
        let empty = Histogram::default().to_json();
        assert_eq!(
            empty,
            json!({"count": 0, "sum": 0, "min": 0, "max": 0, "p50": 0, "p99": 0, "buckets": []})
        );
    }

    /// A primary's figures after a few epochs.
    fn some_figures() -> PrimaryStats {
        let mut s = PrimaryStats::default();
        let mut rng = Rng(3);
        for _ in 0..500 {
            s.pause_us.push(200 + rng.next() % 5000);
            s.commit_us.push(1000 + rng.next() % 20_000);
            s.pages.push(rng.next() % 4096);
            s.wire_bytes.push(rng.next() % (16 << 20));
            for h in [
                &mut s.parked_us,
                &mut s.captured_us,
                &mut s.harvested_us,
                &mut s.copied_us,
            ] {
                h.push(rng.next() % 3000);
            }
        }
        s.early_copy_us.push(700);
        s.early_pages.push(1200);
        s.held_us.push(40_000);
        s.output_bytes = 12_345;
        s.early = 17;
        s.throttled = 1;
        s.throttle_time = Duration::from_micros(40_000);
        s.capped = 2;
        s
    }

    #[test]
    fn the_figures_as_json_round_trip_through_serde_json() {
        let s = some_figures();
        let text = serde_json::to_string(&s.to_json()).expect("serializes");
        let j: Value = serde_json::from_str(&text).expect("parses");
        assert_eq!(j, s.to_json());
        assert_eq!(j["version"], 1);
        assert_eq!(j["epochs"], 500);
        let histograms = j["histograms"].as_object().expect("histograms");
        let mut names: Vec<&str> = histograms.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "captured_us",
                "commit_us",
                "copied_us",
                "early_copy_us",
                "early_pages",
                "harvested_us",
                "held_us",
                "pages",
                "parked_us",
                "pause_us",
                "wire_bytes",
            ]
        );
        for (name, h) in histograms {
            let count = h["count"].as_u64().expect("count");
            let buckets = h["buckets"].as_array().expect("buckets");
            let mut in_buckets = 0;
            let mut from = 0;
            for b in buckets {
                let [low, high, n] = [0, 1, 2].map(|i| b[i].as_u64().expect("a number"));
                assert!(from <= low && low < high && n > 0, "{name}: {b}");
                from = high;
                in_buckets += n;
            }
            assert_eq!(in_buckets, count, "{name}: the buckets sum to the count");
            let [min, p50, p99, max] = ["min", "p50", "p99", "max"].map(|k| h[k].as_u64().unwrap());
            assert!(min <= p50 && p50 <= p99 && p99 <= max, "{name}: {h}");
        }
        assert_eq!(j["histograms"]["pause_us"]["count"], j["epochs"]);
        assert_eq!(j["histograms"]["held_us"]["sum"], 40_000);
        assert_eq!(
            j["counters"],
            json!({"output_bytes": 12_345, "early": 17, "throttled": 1, "throttle_us": 40_000, "capped": 2})
        );
    }

    #[test]
    fn the_figures_are_written_whole_and_the_path_checked_first() {
        let dir = std::env::temp_dir().join(format!("lockstep-stats-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let file = dir.join("stats.json");
        check_json_path(&file).expect("a writable directory");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "the check leaves nothing"
        );
        std::fs::write(&file, "old").expect("written");
        let s = some_figures();
        s.write_json(&file).expect("written");
        let text = std::fs::read_to_string(&file).expect("read back");
        assert!(text.ends_with("}\n") && text.lines().count() == 1, "{text}");
        let j: Value = serde_json::from_str(&text).expect("parses");
        assert_eq!(j, s.to_json());
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );

        let missing = dir.join("no-such-dir").join("x.json");
        let e = check_json_path(&missing).expect_err("no directory");
        assert!(
            matches!(&e, StatsFileError::Directory { dir: d, .. } if *d == dir.join("no-such-dir")),
            "{e}"
        );
        assert!(e.to_string().contains("No such file"), "{e}");
        assert!(matches!(
            check_json_path(&dir),
            Err(StatsFileError::IsDirectory)
        ));
        assert!(matches!(
            check_json_path(Path::new("/")),
            Err(StatsFileError::NoFileName)
        ));
        assert!(s.write_json(&missing).is_err());
        std::fs::remove_dir_all(&dir).expect("cleaned up");
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
