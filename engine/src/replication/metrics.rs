//! Prometheus metrics: one process-wide registry of `prometheus-client` metrics that the
//! roles feed, encoded by [`encode`] in the Prometheus text format (version 0.0.4) for the
//! `lockstep` binary's `--metrics ADDR:PORT` endpoint. Each metric, its type, unit and
//! meaning is in `docs/metrics.md`.
//!
//! Nothing here runs inside a checkpoint pause, and recording takes no lock and allocates
//! nothing: counters and gauges are `prometheus-client`'s atomics, and the histograms the
//! epoch loop records into are [`AtomicHistogram`]s (`prometheus-client`'s own histogram
//! keeps its buckets behind a mutex). The primary records a checkpoint's pause and dirty
//! pages right after the guest runs again ([`checkpoint`]), commit latencies as it drains
//! acks ([`committed`]), bytes as the sender reports an epoch sent ([`epoch_sent`]), and
//! its throttling once a second with its status figures ([`throttle_totals`]). What the
//! status already knows (role, protection, epochs, replication lag, held output) is read
//! from it at each scrape.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use netbuffer::HoldHistogram;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::status::{self, GuestState, Protection, Role};

/// The `Content-Type` of what [`encode`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Checkpoint pauses, in µs: 0.1 ms to 100 ms.
const PAUSE_BUCKETS_US: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
];
/// Pause start to ack, in µs: 0.5 ms to 1 s.
const COMMIT_BUCKETS_US: &[u64] = &[
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
];
/// Dirty pages of an epoch (the default cap is 4096).
const PAGES_BUCKETS: &[u64] = &[
    0, 16, 64, 256, 512, 1_024, 2_048, 4_096, 8_192, 16_384, 65_536,
];
/// The output hold times are counted by the egress buffer in log2 buckets of µs; these are
/// the ones exported (their bounds are 2^i µs): 128 µs to about 8.4 s.
const HOLD_EXPORTED: std::ops::RangeInclusive<usize> = 7..=23;
/// Bytes of a page.
const PAGE_BYTES: u64 = 4096;

/// A label set of one label.
type Label = [(&'static str, &'static str); 1];
/// A gauge of seconds or a ratio.
type FloatGauge = Gauge<f64, AtomicU64>;
/// A counter of seconds.
type FloatCounter = Counter<f64, AtomicU64>;

/// A histogram of integer observations (µs, pages) whose recording is a few atomic adds,
/// exported in base units: the observed ones divided by `per_unit` (1e6 for µs to
/// seconds; a division, so that 100 µs is written 0.0001).
/// `_count` is the sum of the buckets, so a scrape always sees them agree.
#[derive(Clone, Debug)]
pub struct AtomicHistogram(Arc<HistogramInner>);

#[derive(Debug)]
struct HistogramInner {
    bounds: Vec<u64>,
    per_unit: f64,
    /// One per bound, and the last for what is above them all.
    counts: Vec<AtomicU64>,
    sum: AtomicU64,
}

impl AtomicHistogram {
    /// A histogram with these upper bounds (inclusive, ascending, in the observed unit).
    pub fn new(bounds: &[u64], per_unit: f64) -> AtomicHistogram {
        AtomicHistogram(Arc::new(HistogramInner {
            bounds: bounds.to_vec(),
            per_unit,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }))
    }

    /// Records `v`: no lock, no allocation.
    pub fn observe(&self, v: u64) {
        let h = &self.0;
        let i = h.bounds.partition_point(|&b| b < v);
        h.counts[i].fetch_add(1, Ordering::Relaxed);
        h.sum.fetch_add(v, Ordering::Relaxed);
    }

    /// Replaces every count and the sum (a histogram kept elsewhere, copied at a scrape).
    fn store(&self, counts: &[u64], sum: u64) {
        for (c, &n) in self.0.counts.iter().zip(counts) {
            c.store(n, Ordering::Relaxed);
        }
        self.0.sum.store(sum, Ordering::Relaxed);
    }

    /// The observations so far.
    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// The sum of the observations, in base units.
    pub fn sum(&self) -> f64 {
        self.0.sum.load(Ordering::Relaxed) as f64 / self.0.per_unit
    }
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = &self.0;
        let mut buckets = Vec::with_capacity(h.counts.len());
        let mut count = 0;
        for (i, c) in h.counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            count += n;
            let bound = h
                .bounds
                .get(i)
                .map_or(f64::INFINITY, |&b| b as f64 / h.per_unit);
            buckets.push((bound, n));
        }
        encoder.encode_histogram::<NoLabelSet>(self.sum(), count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

struct Metrics {
    registry: Registry,
    role: Family<Label, Gauge>,
    protection: Family<Label, Gauge>,
    guest_running: Gauge,
    epochs_committed: Counter,
    last_committed_epoch: Gauge,
    last_acked_epoch: Gauge,
    pause: AtomicHistogram,
    commit: AtomicHistogram,
    dirty_pages: AtomicHistogram,
    wire_bytes: Counter,
    compression_ratio: FloatGauge,
    /// Page bytes and wire bytes of the epochs sent, for the compression ratio.
    epoch_page_bytes: AtomicU64,
    epoch_wire_bytes: AtomicU64,
    output_held_packets: Gauge,
    output_held_bytes: Gauge,
    output_hold: AtomicHistogram,
    output_packets: Counter,
    throttle_episodes: Counter,
    throttle_seconds: FloatCounter,
    /// The primary's throttle totals last seen (episodes, µs held), see [`throttle_totals`].
    throttle_seen: (AtomicU64, AtomicU64),
    lag_epochs: Gauge,
    lag_seconds: FloatGauge,
    fence_attempts: Family<Label, Counter>,
    role_changes: Counter,
    last_role_change: FloatGauge,
}

const ROLES: [Role; 4] = [
    Role::Primary,
    Role::Backup,
    Role::Promoted,
    Role::Standalone,
];
const PROTECTIONS: [Protection; 4] = [
    Protection::Protected,
    Protection::Syncing,
    Protection::UnprotectedHeld,
    Protection::Unprotected,
];
const FENCE_RESULTS: [&str; 2] = ["fenced", "failed"];

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::with_prefix("lockstep"),
            role: Family::default(),
            protection: Family::default(),
            guest_running: Gauge::default(),
            epochs_committed: Counter::default(),
            last_committed_epoch: Gauge::default(),
            last_acked_epoch: Gauge::default(),
            pause: AtomicHistogram::new(PAUSE_BUCKETS_US, 1e6),
            commit: AtomicHistogram::new(COMMIT_BUCKETS_US, 1e6),
            dirty_pages: AtomicHistogram::new(PAGES_BUCKETS, 1.0),
            wire_bytes: Counter::default(),
            compression_ratio: FloatGauge::default(),
            epoch_page_bytes: AtomicU64::new(0),
            epoch_wire_bytes: AtomicU64::new(0),
            output_held_packets: Gauge::default(),
            output_held_bytes: Gauge::default(),
            output_hold: AtomicHistogram::new(
                &HOLD_EXPORTED.map(|i| 1u64 << i).collect::<Vec<_>>(),
                1e6,
            ),
            output_packets: Counter::default(),
            throttle_episodes: Counter::default(),
            throttle_seconds: FloatCounter::default(),
            throttle_seen: (AtomicU64::new(0), AtomicU64::new(0)),
            lag_epochs: Gauge::default(),
            lag_seconds: FloatGauge::default(),
            fence_attempts: Family::default(),
            role_changes: Counter::default(),
            last_role_change: FloatGauge::default(),
        };
        // Every label value is there from the start, at 0.
        for r in ROLES {
            let _ = m.role.get_or_create(&[("role", r.as_str())]);
        }
        for p in PROTECTIONS {
            let _ = m.protection.get_or_create(&[("state", p.as_str())]);
        }
        for r in FENCE_RESULTS {
            let _ = m.fence_attempts.get_or_create(&[("result", r)]);
        }
        m.register()
    }

    fn register(mut self) -> Metrics {
        let r = &mut self.registry;
        r.register(
            "role",
            "The process's role: 1 for the current one (primary, backup, promoted, standalone), 0 for the others",
            self.role.clone(),
        );
        r.register(
            "protection",
            "Whether the guest is protected: 1 for the current state (protected, syncing, unprotected-held, unprotected), 0 for the others",
            self.protection.clone(),
        );
        r.register(
            "guest_running",
            "1 while this process's guest runs, 0 otherwise",
            self.guest_running.clone(),
        );
        r.register(
            "epochs_committed",
            "Epochs committed: acknowledged by the backup (primary), committed (backup)",
            self.epochs_committed.clone(),
        );
        r.register(
            "last_committed_epoch",
            "The backup's last committed epoch (backup; 0 before the first)",
            self.last_committed_epoch.clone(),
        );
        r.register(
            "last_acked_epoch",
            "The last epoch the backup acknowledged (primary; 0 before the first)",
            self.last_acked_epoch.clone(),
        );
        r.register_with_unit(
            "checkpoint_pause",
            "How long the guest was paused for each checkpoint",
            Unit::Seconds,
            self.pause.clone(),
        );
        r.register_with_unit(
            "commit_latency",
            "Checkpoint pause start to the backup's ack of the epoch",
            Unit::Seconds,
            self.commit.clone(),
        );
        r.register(
            "epoch_dirty_pages",
            "Dirty pages (4 KiB) each epoch carried",
            self.dirty_pages.clone(),
        );
        r.register_with_unit(
            "wire",
            "Bytes sent to the backup for pages and state: epochs and the initial sync",
            Unit::Bytes,
            self.wire_bytes.clone(),
        );
        r.register(
            "compression_ratio",
            "Bytes of the epochs' dirty pages per byte sent for the epochs (0 before the first)",
            self.compression_ratio.clone(),
        );
        r.register(
            "output_held_packets",
            "Guest output frames held now until the backup acknowledges their epoch",
            self.output_held_packets.clone(),
        );
        r.register_with_unit(
            "output_held",
            "Bytes of the guest output frames held now",
            Unit::Bytes,
            self.output_held_bytes.clone(),
        );
        r.register_with_unit(
            "output_hold",
            "How long each released guest output frame was held",
            Unit::Seconds,
            self.output_hold.clone(),
        );
        r.register(
            "output_packets",
            "Guest output frames sent to the tap",
            self.output_packets.clone(),
        );
        r.register(
            "throttle_episodes",
            "Times the primary held the guest because the backup fell behind",
            self.throttle_episodes.clone(),
        );
        r.register_with_unit(
            "throttle",
            "Time the primary held the guest because the backup fell behind",
            Unit::Seconds,
            self.throttle_seconds.clone(),
        );
        r.register(
            "replication_lag_epochs",
            "Epochs sent and not acknowledged yet (primary)",
            self.lag_epochs.clone(),
        );
        r.register_with_unit(
            "replication_lag",
            "How long the oldest unacknowledged epoch has waited (primary)",
            Unit::Seconds,
            self.lag_seconds.clone(),
        );
        r.register(
            "fence_attempts",
            "Fencing attempts by result (fenced, failed)",
            self.fence_attempts.clone(),
        );
        r.register(
            "role_changes",
            "Role changes (promotion, backup lost, protection, switchover)",
            self.role_changes.clone(),
        );
        r.register_with_unit(
            "last_role_change_timestamp",
            "When the role last changed, in seconds since the Unix epoch (0: never)",
            Unit::Seconds,
            self.last_role_change.clone(),
        );
        self
    }

    /// Copies what the status and the output know into the gauges and counters read from
    /// them.
    fn refresh(&self) {
        let s = status::report();
        for r in ROLES {
            self.role
                .get_or_create(&[("role", r.as_str())])
                .set(i64::from(r == s.role));
        }
        for p in PROTECTIONS {
            self.protection
                .get_or_create(&[("state", p.as_str())])
                .set(i64::from(p == s.protection));
        }
        self.guest_running
            .set(i64::from(s.guest == GuestState::Running));
        let epoch = |e: Option<u64>| e.map_or(0, |e| i64::try_from(e).unwrap_or(i64::MAX));
        self.last_committed_epoch.set(epoch(s.committed_epoch));
        self.last_acked_epoch.set(epoch(s.acked_epoch));
        self.lag_epochs.set(epoch(s.lag_epochs));
        self.lag_seconds
            .set(s.lag_ms.map_or(0.0, |ms| ms as f64 / 1000.0));

        let page_bytes = self.epoch_page_bytes.load(Ordering::Relaxed);
        let wire = self.epoch_wire_bytes.load(Ordering::Relaxed);
        self.compression_ratio.set(if wire > 0 {
            page_bytes as f64 / wire as f64
        } else {
            0.0
        });

        let out = status::output_figures();
        self.output_held_packets
            .set(i64::try_from(out.held_packets).unwrap_or(i64::MAX));
        self.output_held_bytes
            .set(i64::try_from(out.held_bytes).unwrap_or(i64::MAX));
        // The count lives in the egress path; the counter shows it as it is now (it only
        // grows: see `status::watch_output`).
        self.output_packets
            .inner()
            .store(out.sent, Ordering::Relaxed);
        let (counts, sum) = hold_buckets(&out.hold);
        self.output_hold.store(&counts, sum);
    }
}

/// The egress buffer's hold times in the exported buckets (bounds 2^i µs for i in
/// [`HOLD_EXPORTED`], then the rest) and their sum in µs. The buffer's bucket i counts
/// holds under 2^i µs, so each exported bucket is the sum of the buffer's buckets up to it.
fn hold_buckets(h: &HoldHistogram) -> (Vec<u64>, u64) {
    let mut counts = vec![0u64; HOLD_EXPORTED.count() + 1];
    for (i, &n) in h.buckets().iter().enumerate() {
        let slot = HOLD_EXPORTED
            .clone()
            .position(|e| i <= e)
            .unwrap_or(counts.len() - 1);
        counts[slot] += n;
    }
    (counts, h.sum().as_micros() as u64)
}

/// Every metric now, in the Prometheus text format (version 0.0.4; [`CONTENT_TYPE`]).
pub fn encode() -> String {
    let m = &*METRICS;
    m.refresh();
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &m.registry)
        .expect("writing to a String does not fail");
    text
}

/// A checkpoint: the guest was paused `pause` and the epoch carries `pages` dirty pages.
/// Called after the guest runs again.
pub fn checkpoint(pause: Duration, pages: u64) {
    let m = &*METRICS;
    m.pause.observe(pause.as_micros() as u64);
    m.dirty_pages.observe(pages);
}

/// The backup acknowledged an epoch whose pause began `latency` ago (primary), or an
/// epoch was committed (backup, `None`).
pub fn committed(latency: Option<Duration>) {
    let m = &*METRICS;
    m.epochs_committed.inc();
    if let Some(l) = latency {
        m.commit.observe(l.as_micros() as u64);
    }
}

/// An epoch of `pages` dirty pages went to the backup in `bytes` bytes.
pub fn epoch_sent(pages: u64, bytes: u64) {
    let m = &*METRICS;
    m.wire_bytes.inc_by(bytes);
    m.epoch_page_bytes
        .fetch_add(pages * PAGE_BYTES, Ordering::Relaxed);
    m.epoch_wire_bytes.fetch_add(bytes, Ordering::Relaxed);
}

/// A step of the initial sync went to the backup in `bytes` bytes.
pub fn sync_sent(bytes: u64) {
    METRICS.wire_bytes.inc_by(bytes);
}

/// The primary's running totals of times it held the guest for the backup and of the time
/// held (since its role began): what is new since the last call is added. Totals lower
/// than the last ones come from a new primary role, and count from zero.
pub fn throttle_totals(episodes: u64, held: Duration) {
    let m = &*METRICS;
    let held_us = held.as_micros() as u64;
    let (seen_episodes, seen_us) = &m.throttle_seen;
    let mut was = (
        seen_episodes.swap(episodes, Ordering::Relaxed),
        seen_us.swap(held_us, Ordering::Relaxed),
    );
    if episodes < was.0 || held_us < was.1 {
        was = (0, 0);
    }
    m.throttle_episodes.inc_by(episodes - was.0);
    m.throttle_seconds.inc_by((held_us - was.1) as f64 / 1e6);
}

/// A fencing attempt ended: `fenced` or not.
pub fn fence_attempt(fenced: bool) {
    let result = FENCE_RESULTS[usize::from(!fenced)];
    METRICS
        .fence_attempts
        .get_or_create(&[("result", result)])
        .inc();
}

/// The role changed (see [`status::role_change`]).
pub fn role_changed() {
    let m = &*METRICS;
    m.role_changes.inc();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    m.last_role_change.set(now);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `name` (with its labels, as written) in `text`.
    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn atomic_histogram_counts_into_inclusive_buckets() {
        let h = AtomicHistogram::new(&[10, 100], 1e6);
        for v in [0, 10, 11, 100, 101, 5000] {
            h.observe(v);
        }
        assert_eq!(h.count(), 6);
        assert!((h.sum() - 5222e-6).abs() < 1e-12, "{}", h.sum());
        let mut r = Registry::default();
        r.register_with_unit("x", "x", Unit::Seconds, h);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &r).unwrap();
        assert_eq!(
            sample(&text, "x_seconds_bucket{le=\"1e-05\"}"),
            2.0,
            "{text}"
        );
        assert_eq!(sample(&text, "x_seconds_bucket{le=\"0.0001\"}"), 4.0);
        assert_eq!(sample(&text, "x_seconds_bucket{le=\"+Inf\"}"), 6.0);
        assert_eq!(sample(&text, "x_seconds_count"), 6.0);
        assert!(text.contains("# TYPE x_seconds histogram"), "{text}");
    }

    #[test]
    fn hold_times_are_exported_in_cumulative_bounds() {
        let mut h = HoldHistogram::default();
        // Under 128 µs, under 256 µs, past the last exported bound.
        h.record(Duration::from_micros(100));
        h.record(Duration::from_micros(200));
        h.record(Duration::from_secs(60));
        let (counts, sum) = hold_buckets(&h);
        assert_eq!(counts.len(), HOLD_EXPORTED.count() + 1);
        assert_eq!((counts[0], counts[1]), (1, 1));
        assert_eq!(counts[counts.len() - 1], 1);
        assert_eq!(counts.iter().sum::<u64>(), 3);
        assert_eq!(sum, 60_000_300);
    }

    #[test]
    fn the_registry_has_every_metric_with_conventional_names() {
        checkpoint(Duration::from_micros(300), 20);
        committed(Some(Duration::from_millis(3)));
        epoch_sent(20, 4096 * 10);
        fence_attempt(false);
        let text = encode();
        for name in [
            "lockstep_role{role=\"standalone\"}",
            "lockstep_protection{state=\"unprotected-held\"}",
            "lockstep_guest_running",
            "lockstep_last_committed_epoch",
            "lockstep_last_acked_epoch",
            "lockstep_output_held_packets",
            "lockstep_output_held_bytes",
            "lockstep_output_packets_total",
            "lockstep_output_hold_seconds_count",
            "lockstep_replication_lag_epochs",
            "lockstep_replication_lag_seconds",
            "lockstep_throttle_episodes_total",
            "lockstep_throttle_seconds_total",
            "lockstep_fence_attempts_total{result=\"fenced\"}",
            "lockstep_role_changes_total",
            "lockstep_last_role_change_timestamp_seconds",
        ] {
            sample(&text, name);
        }
        // Other tests of this process may record too: these only grow.
        assert!(sample(&text, "lockstep_checkpoint_pause_seconds_count") >= 1.0);
        assert!(
            sample(
                &text,
                "lockstep_checkpoint_pause_seconds_bucket{le=\"+Inf\"}"
            ) >= 1.0
        );
        assert!(sample(&text, "lockstep_commit_latency_seconds_count") >= 1.0);
        assert!(sample(&text, "lockstep_epoch_dirty_pages_sum") >= 20.0);
        assert!(sample(&text, "lockstep_epochs_committed_total") >= 1.0);
        assert!(sample(&text, "lockstep_wire_bytes_total") >= 40960.0);
        assert!(sample(&text, "lockstep_compression_ratio") > 0.0);
        assert!(sample(&text, "lockstep_fence_attempts_total{result=\"failed\"}") >= 1.0);
        assert!(
            text.contains("# TYPE lockstep_wire_bytes_total counter"),
            "{text}"
        );
        assert!(text.contains("# TYPE lockstep_role gauge"), "{text}");
        // Exactly one role and one protection state is 1.
        let ones = |prefix: &str| {
            text.lines()
                .filter(|l| l.starts_with(prefix) && l.ends_with(" 1"))
                .count()
        };
        assert_eq!(ones("lockstep_role{"), 1, "{text}");
        assert_eq!(ones("lockstep_protection{"), 1, "{text}");
    }

    #[test]
    fn throttle_totals_of_a_new_role_count_from_zero() {
        let before = METRICS.throttle_episodes.get();
        throttle_totals(1000, Duration::from_secs(1));
        throttle_totals(1001, Duration::from_secs(1));
        // A new role: totals start again.
        throttle_totals(2, Duration::from_millis(5));
        assert_eq!(METRICS.throttle_episodes.get(), before + 1003);
        assert!(METRICS.throttle_seconds.get() >= 1.005);
    }
}
