//! Figures a replication run reports: pause times, epoch sizes, commit latency.

use std::time::Duration;

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
        if self.values.is_empty() {
            return 0;
        }
        let mut v = self.values.clone();
        v.sort_unstable();
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    /// The largest sample, 0 when empty.
    pub fn max(&self) -> u64 {
        self.values.iter().copied().max().unwrap_or(0)
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
    /// Parts of the pause (µs): until every vCPU parked, until the state was captured,
    /// until the dirty set was harvested, until the pages were copied.
    pub parked_us: Samples,
    /// Until the state was captured (µs).
    pub captured_us: Samples,
    /// Until the dirty set was harvested (µs).
    pub harvested_us: Samples,
    /// Until the pages were copied (µs).
    pub copied_us: Samples,
    /// Pause start until the backup's ack (µs).
    pub commit_us: Samples,
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
            "pause p50 (cumulative, us): parked={} captured={} harvested={} copied={} resumed={}",
            self.parked_us.percentile(50.0),
            self.captured_us.percentile(50.0),
            self.harvested_us.percentile(50.0),
            self.copied_us.percentile(50.0),
            self.pause_us.percentile(50.0),
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
             wire_bytes={} bytes_per_dirty_page={:.0} compression={:.2}x throttled={} \
             held_us max={} capped={}",
            self.pause_us.len(),
            self.pause_us.percentile(50.0),
            self.pause_us.percentile(99.0),
            self.pause_us.max(),
            self.commit_us.percentile(50.0),
            self.commit_us.percentile(99.0),
            pages,
            bytes,
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
}
