//! Counters of the egress buffer and the histogram of how long packets were held.
//!
//! The hold time of a packet is the time from its `push` to its release, measured with the
//! `Instant`s the caller passes in (so tests are deterministic). Under output commit it is
//! the latency that protection adds to each packet: about one pause plus one round trip to
//! the backup when the engine is healthy, a whole epoch or more when it is not.

use std::time::Duration;

/// Number of buckets of [`HoldHistogram`].
pub const HOLD_BUCKETS: usize = 32;

/// Hold times in fixed log2 buckets of microseconds.
///
/// Bucket 0 counts hold times under 1 µs; bucket `i >= 1` counts hold times in
/// `[2^(i-1), 2^i)` µs. The last bucket also takes everything longer (from 2^30 µs, about
/// 18 minutes). Recording is O(1) and the histogram never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldHistogram {
    buckets: [u64; HOLD_BUCKETS],
    count: u64,
    sum: Duration,
    max: Duration,
}

impl Default for HoldHistogram {
    fn default() -> Self {
        Self {
            buckets: [0; HOLD_BUCKETS],
            count: 0,
            sum: Duration::ZERO,
            max: Duration::ZERO,
        }
    }
}

impl HoldHistogram {
    /// Index of the bucket that counts `hold`.
    pub fn bucket_of(hold: Duration) -> usize {
        let micros = hold.as_micros();
        if micros == 0 {
            return 0;
        }
        // micros in [2^(i-1), 2^i) -> i = bit length of micros.
        let bits = (u128::BITS - micros.leading_zeros()) as usize;
        bits.min(HOLD_BUCKETS - 1)
    }

    /// Exclusive upper bound of bucket `index` (`None` for the open-ended last bucket).
    pub fn bucket_upper_bound(index: usize) -> Option<Duration> {
        (index < HOLD_BUCKETS - 1).then(|| Duration::from_micros(1u64 << index))
    }

    /// Counts one hold time.
    pub fn record(&mut self, hold: Duration) {
        self.buckets[Self::bucket_of(hold)] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(hold);
        self.max = self.max.max(hold);
    }

    /// Adds the hold times counted by `other` (e.g. an earlier buffer's, to keep totals
    /// over several).
    pub fn merge(&mut self, other: &HoldHistogram) {
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum = self.sum.saturating_add(other.sum);
        self.max = self.max.max(other.max);
    }

    /// The per-bucket counts (see the type's docs for the bucket bounds).
    pub fn buckets(&self) -> &[u64; HOLD_BUCKETS] {
        &self.buckets
    }

    /// Number of hold times recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Total of the hold times recorded.
    pub fn sum(&self) -> Duration {
        self.sum
    }

    /// Longest hold time recorded (zero when nothing was recorded).
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Upper estimate of the `q`-quantile (`q` in `0.0..=1.0`, clamped): the upper bound of
    /// the bucket holding the value of rank `ceil(q * count)`, capped by the longest hold
    /// time seen. The true quantile is at most this and at least half of it (for values of
    /// 1 µs and more). `None` when nothing was recorded.
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let q = if q.is_nan() { 1.0 } else { q.clamp(0.0, 1.0) };
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (index, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let bound = Self::bucket_upper_bound(index).unwrap_or(self.max);
                return Some(bound.min(self.max));
            }
        }
        unreachable!("bucket counts add up to count")
    }

    /// Upper estimate of the median hold time.
    pub fn p50(&self) -> Option<Duration> {
        self.percentile(0.50)
    }

    /// Upper estimate of the 99th percentile of hold times.
    pub fn p99(&self) -> Option<Duration> {
        self.percentile(0.99)
    }
}

/// Counters of an [`EgressBuffer`](crate::EgressBuffer). Byte counts are packet lengths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets held right now.
    pub held_packets: u64,
    /// Bytes held right now.
    pub held_bytes: u64,
    /// Most packets ever held at once.
    pub peak_held_packets: u64,
    /// Most bytes ever held at once.
    pub peak_held_bytes: u64,
    /// Packets taken into the buffer (protected mode) since creation.
    pub pushed_packets: u64,
    /// Bytes taken into the buffer (protected mode) since creation.
    pub pushed_bytes: u64,
    /// Packets that left the buffer (acked or released on the switch to pass-through).
    pub released_packets: u64,
    /// Bytes that left the buffer.
    pub released_bytes: u64,
    /// Of `released_packets`, those released without an ack because protection was dropped
    /// (`release_all` / switch to pass-through).
    pub released_unacked_packets: u64,
    /// Packets handed straight back for transmission in pass-through mode.
    pub passed_through_packets: u64,
    /// Bytes handed straight back for transmission in pass-through mode.
    pub passed_through_bytes: u64,
    /// Times a push was refused because the buffer was full (backpressure applied).
    pub full_hits: u64,
    /// Time from push to release of every released packet.
    pub hold_time: HoldHistogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn bucket_bounds() {
        assert_eq!(HoldHistogram::bucket_of(Duration::ZERO), 0);
        assert_eq!(HoldHistogram::bucket_of(Duration::from_nanos(999)), 0);
        assert_eq!(HoldHistogram::bucket_of(us(1)), 1);
        assert_eq!(HoldHistogram::bucket_of(us(2)), 2);
        assert_eq!(HoldHistogram::bucket_of(us(3)), 2);
        assert_eq!(HoldHistogram::bucket_of(us(4)), 3);
        assert_eq!(HoldHistogram::bucket_of(us(1023)), 10);
        assert_eq!(HoldHistogram::bucket_of(us(1024)), 11);
        assert_eq!(
            HoldHistogram::bucket_of(Duration::from_secs(1 << 40)),
            HOLD_BUCKETS - 1
        );
        for i in 0..HOLD_BUCKETS - 1 {
            let upper = HoldHistogram::bucket_upper_bound(i).unwrap();
            assert_eq!(HoldHistogram::bucket_of(upper), i + 1);
            assert_eq!(HoldHistogram::bucket_of(upper - Duration::from_nanos(1)), i);
        }
        assert_eq!(HoldHistogram::bucket_upper_bound(HOLD_BUCKETS - 1), None);
    }

    #[test]
    fn percentiles() {
        let mut h = HoldHistogram::default();
        assert_eq!(h.p50(), None);
        // 98 holds of 100 µs (bucket [64, 128)), 2 of 5 ms (bucket [4096, 8192) µs).
        for _ in 0..98 {
            h.record(us(100));
        }
        h.record(us(5000));
        h.record(us(5000));
        assert_eq!(h.count(), 100);
        assert_eq!(h.sum(), us(98 * 100 + 2 * 5000));
        assert_eq!(h.max(), us(5000));
        assert_eq!(h.buckets()[7], 98);
        assert_eq!(h.buckets()[13], 2);
        assert_eq!(h.p50(), Some(us(128)));
        assert_eq!(h.percentile(0.98), Some(us(128)));
        // Rank 99 falls in the 5 ms bucket, whose bound (8192 µs) is capped by the max.
        assert_eq!(h.p99(), Some(us(5000)));
        assert_eq!(h.percentile(0.0), Some(us(128)));
        assert_eq!(h.percentile(7.0), Some(us(5000)));
    }

    #[test]
    fn merge_adds_up_two_histograms() {
        let (mut a, mut b) = (HoldHistogram::default(), HoldHistogram::default());
        a.record(us(100));
        b.record(us(100));
        b.record(us(5000));
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.sum(), us(5200));
        assert_eq!(a.max(), us(5000));
        assert_eq!((a.buckets()[7], a.buckets()[13]), (2, 1));
    }

    #[test]
    fn open_last_bucket_reports_max() {
        let mut h = HoldHistogram::default();
        let long = Duration::from_secs(3600);
        h.record(long);
        assert_eq!(h.buckets()[HOLD_BUCKETS - 1], 1);
        assert_eq!(h.p50(), Some(long));
    }
}
