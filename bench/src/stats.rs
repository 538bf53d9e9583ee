//! Summaries of latency samples: percentiles (nearest rank), max, mean.

use std::time::Duration;

/// A summary of a set of samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub count: usize,
    pub min: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub mean: Duration,
}

impl Summary {
    /// Summarizes `samples`; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let total: Duration = sorted.iter().sum();
        Some(Summary {
            count: sorted.len(),
            min: sorted[0],
            p50: percentile(&sorted, 50.0),
            p99: percentile(&sorted, 99.0),
            max: sorted[sorted.len() - 1],
            mean: total / sorted.len() as u32,
        })
    }
}

/// The `p`-th percentile (0 < p <= 100) of sorted samples, by the nearest-rank method: the
/// smallest sample that at least `p` percent of the samples are less than or equal to.
///
/// Panics if `sorted` is empty or `p` is out of range.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    assert!(!sorted.is_empty(), "percentile of no samples");
    assert!(
        p > 0.0 && p <= 100.0,
        "percentile {p} out of range (0, 100]"
    );
    debug_assert!(
        sorted.windows(2).all(|w| w[0] <= w[1]),
        "samples not sorted"
    );
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Microseconds with one decimal, for tables.
pub fn micros(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&x| Duration::from_micros(x)).collect()
    }

    #[test]
    fn nearest_rank_percentiles() {
        let s = us(&(1..=100).collect::<Vec<_>>());
        assert_eq!(percentile(&s, 50.0), Duration::from_micros(50));
        assert_eq!(percentile(&s, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&s, 100.0), Duration::from_micros(100));
        assert_eq!(percentile(&s, 0.5), Duration::from_micros(1));

        let s = us(&[10, 20, 30]);
        assert_eq!(percentile(&s, 50.0), Duration::from_micros(20));
        assert_eq!(percentile(&s, 99.0), Duration::from_micros(30));

        let one = us(&[7]);
        assert_eq!(percentile(&one, 50.0), Duration::from_micros(7));
        assert_eq!(percentile(&one, 99.0), Duration::from_micros(7));
    }

    #[test]
    fn p99_of_a_tail() {
        // 990 fast samples and 10 slow ones: p99 is still fast, the max is not.
        let mut v = vec![100u64; 990];
        v.extend([5000; 10]);
        let s = Summary::of(&us(&v)).unwrap();
        assert_eq!(s.p99, Duration::from_micros(100));
        assert_eq!(s.max, Duration::from_micros(5000));
        // One more slow sample moves p99 into the tail.
        v.push(5000);
        v.push(5000);
        let s = Summary::of(&us(&v)).unwrap();
        assert_eq!(s.p99, Duration::from_micros(5000));
    }

    #[test]
    fn summary_of_unsorted_samples() {
        let s = Summary::of(&us(&[30, 10, 20, 40])).unwrap();
        assert_eq!(s.count, 4);
        assert_eq!(s.min, Duration::from_micros(10));
        assert_eq!(s.p50, Duration::from_micros(20));
        assert_eq!(s.max, Duration::from_micros(40));
        assert_eq!(s.mean, Duration::from_micros(25));
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn percentile_range_is_checked() {
        percentile(&us(&[1]), 0.0);
    }

    #[test]
    fn micros_format() {
        assert_eq!(micros(Duration::from_nanos(1_234_567)), "1234.6");
        assert_eq!(micros(Duration::ZERO), "0.0");
    }
}
