//! The primary's `--stats-json FILE`: its figures at the end of the primary role, with a
//! histogram per figure.
//!
//! ```text
//! {"version":1,"epochs":N,
//!  "histograms":{"pause_us":H,"commit_us":H,"pages":H,...},
//!  "counters":{"output_bytes":n,"early":n,"throttled":n,"throttle_us":n,"capped":n}}
//! ```
//!
//! with `H = {"count":n,"sum":n,"min":n,"max":n,"p50":n,"p99":n,"buckets":[[low,high,count],...]}`:
//! the non-empty buckets in increasing order, `low` inclusive, `high` exclusive.

use serde_json::Value;

/// One histogram of the file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    pub count: u64,
    pub sum: u64,
    pub min: u64,
    pub max: u64,
    pub p50: u64,
    pub p99: u64,
    /// `(low, high, count)`, increasing.
    pub buckets: Vec<(u64, u64, u64)>,
}

impl Histogram {
    fn from_json(name: &str, v: &Value) -> Result<Histogram, String> {
        let field = |f: &str| {
            v.get(f)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("histogram {name}: no number '{f}'"))
        };
        let buckets = v
            .get("buckets")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("histogram {name}: no 'buckets' list"))?
            .iter()
            .map(|b| {
                let n = |i: usize| b.get(i).and_then(Value::as_u64);
                match (b.as_array().map(Vec::len), n(0), n(1), n(2)) {
                    (Some(3), Some(low), Some(high), Some(count)) if low < high => {
                        Ok((low, high, count))
                    }
                    _ => Err(format!(
                        "histogram {name}: bucket {b} is not [low, high, count] with low < high"
                    )),
                }
            })
            .collect::<Result<Vec<_>, String>>()?;
        if buckets.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(format!(
                "histogram {name}: buckets overlap or are out of order"
            ));
        }
        Ok(Histogram {
            count: field("count")?,
            sum: field("sum")?,
            min: field("min")?,
            max: field("max")?,
            p50: field("p50")?,
            p99: field("p99")?,
            buckets,
        })
    }

    /// The mean, 0 without samples.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The CDF as steps: for each bucket, `(high, fraction of the samples below high)`.
    /// A sample of a bucket may be anywhere in `[low, high)`: the fraction is exact at each
    /// `high` and the step is taken there (a CDF that errs late, by less than a bucket).
    pub fn cdf_steps(&self) -> Vec<(f64, f64)> {
        let total: u64 = self.buckets.iter().map(|b| b.2).sum();
        if total == 0 {
            return Vec::new();
        }
        let mut below = 0u64;
        self.buckets
            .iter()
            .map(|&(_, high, count)| {
                below += count;
                (high as f64, below as f64 / total as f64)
            })
            .collect()
    }
}

/// The figures the report uses.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub epochs: u64,
    pub pause_us: Histogram,
    pub commit_us: Histogram,
    pub pages: Histogram,
    /// The pause's steps, cumulative from the pause request: every vCPU parked, the state
    /// captured, the dirty set harvested, the pages copied.
    pub parked_us: Histogram,
    pub captured_us: Histogram,
    pub harvested_us: Histogram,
    pub copied_us: Histogram,
    pub capped: u64,
    pub throttled: u64,
}

impl Stats {
    pub fn parse(text: &str) -> Result<Stats, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        match v.get("version").and_then(Value::as_u64) {
            Some(1) => {}
            other => return Err(format!("version {other:?}, expected 1")),
        }
        let histograms = v
            .get("histograms")
            .ok_or_else(|| "no 'histograms'".to_string())?;
        let h = |name: &str| {
            Histogram::from_json(
                name,
                histograms
                    .get(name)
                    .ok_or_else(|| format!("no histogram '{name}'"))?,
            )
        };
        let counter = |name: &str| {
            v.get("counters")
                .and_then(|c| c.get(name))
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("no counter '{name}'"))
        };
        Ok(Stats {
            epochs: v
                .get("epochs")
                .and_then(Value::as_u64)
                .ok_or_else(|| "no 'epochs'".to_string())?,
            pause_us: h("pause_us")?,
            commit_us: h("commit_us")?,
            pages: h("pages")?,
            parked_us: h("parked_us")?,
            captured_us: h("captured_us")?,
            harvested_us: h("harvested_us")?,
            copied_us: h("copied_us")?,
            capped: counter("capped")?,
            throttled: counter("throttled")?,
        })
    }

    /// The p50 of the pause's cumulative steps (µs): parked, captured, harvested, copied.
    pub fn steps_p50(&self) -> [u64; 4] {
        [
            self.parked_us.p50,
            self.captured_us.p50,
            self.harvested_us.p50,
            self.copied_us.p50,
        ]
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A histogram in the file's format.
    pub(crate) fn histogram_json(buckets: &[(u64, u64, u64)]) -> String {
        let count: u64 = buckets.iter().map(|b| b.2).sum();
        let sum: u64 = buckets.iter().map(|b| b.0 * b.2).sum();
        let list: Vec<String> = buckets
            .iter()
            .map(|(l, h, c)| format!("[{l},{h},{c}]"))
            .collect();
        format!(
            r#"{{"count":{count},"sum":{sum},"min":{},"max":{},"p50":{},"p99":{},"buckets":[{}]}}"#,
            buckets.first().map_or(0, |b| b.0),
            buckets.last().map_or(0, |b| b.1 - 1),
            buckets.first().map_or(0, |b| b.1),
            buckets.last().map_or(0, |b| b.0),
            list.join(",")
        )
    }

    /// A whole file whose pauses are `pause` and whose epochs have `pages` pages each.
    pub(crate) fn stats_json(pause: &[(u64, u64, u64)], pages: u64) -> String {
        let epochs: u64 = pause.iter().map(|b| b.2).sum();
        let h = histogram_json(pause);
        let steps = |f: u64| histogram_json(&[(f, f + 1, epochs)]);
        format!(
            r#"{{"version":1,"epochs":{epochs},
 "histograms":{{"pause_us":{h},"commit_us":{h},"pages":{},"wire_bytes":{h},
 "parked_us":{},"captured_us":{},"harvested_us":{},"copied_us":{},"early_copy_us":{h},
 "early_pages":{h},"held_us":{h}}},
 "counters":{{"output_bytes":0,"early":0,"throttled":2,"throttle_us":0,"capped":3}}}}"#,
            histogram_json(&[(pages, pages + 1, epochs)]),
            steps(80),
            steps(160),
            steps(200),
            steps(300),
        )
    }

    #[test]
    fn parses_the_file() {
        let s = Stats::parse(&stats_json(&[(100, 110, 3), (200, 220, 1)], 1000)).unwrap();
        assert_eq!(s.epochs, 4);
        assert_eq!(s.pause_us.count, 4);
        assert_eq!(s.pause_us.buckets, vec![(100, 110, 3), (200, 220, 1)]);
        assert_eq!(s.pages.mean(), 1000.0);
        assert_eq!(s.steps_p50(), [81, 161, 201, 301]);
        assert_eq!((s.capped, s.throttled), (3, 2));
    }

    #[test]
    fn refuses_what_is_not_the_format() {
        let good = stats_json(&[(100, 110, 3)], 10);
        assert!(Stats::parse("nope").unwrap_err().contains("not JSON"));
        assert!(
            Stats::parse(&good.replace(r#""version":1"#, r#""version":2"#))
                .unwrap_err()
                .contains("version")
        );
        assert!(Stats::parse(&good.replace("pause_us", "pause"))
            .unwrap_err()
            .contains("pause_us"));
        assert!(Stats::parse(&good.replace("[100,110,3]", "[110,100,3]"))
            .unwrap_err()
            .contains("low < high"));
        assert!(Stats::parse(&good.replace("[100,110,3]", "[100,110]"))
            .unwrap_err()
            .contains("bucket"));
        let overlapping = format!(
            r#"{{"version":1,"epochs":2,"histograms":{{"pause_us":{}}}}}"#,
            histogram_json(&[(100, 120, 1), (110, 130, 1)])
        );
        assert!(Stats::parse(&overlapping).unwrap_err().contains("overlap"));
        // Extra fields are fine (the format may grow).
        let extra = good.replace(r#""epochs""#, r#""new_field":[1,2],"epochs""#);
        assert!(Stats::parse(&extra).is_ok());
    }

    #[test]
    fn cdf_steps_at_each_high() {
        let h = Histogram {
            buckets: vec![(0, 10, 1), (10, 20, 3), (40, 50, 4)],
            ..Histogram::default()
        };
        assert_eq!(h.cdf_steps(), vec![(10.0, 0.125), (20.0, 0.5), (50.0, 1.0)]);
        // The last step reaches 1 exactly, whatever the counts.
        let h = Histogram {
            buckets: vec![(1, 2, 1), (2, 3, 1), (3, 4, 1)],
            ..Histogram::default()
        };
        let steps = h.cdf_steps();
        assert_eq!(steps.last(), Some(&(4.0, 1.0)));
        assert!((steps[0].1 - 1.0 / 3.0).abs() < 1e-12);
        assert!(steps
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        assert!(Histogram::default().cdf_steps().is_empty());
        assert!(Histogram {
            buckets: vec![(1, 2, 0)],
            ..Histogram::default()
        }
        .cdf_steps()
        .is_empty());
    }
}
