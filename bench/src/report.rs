//! Figures and how they are printed: one line per figure with its baseline,
//! the ratio and whether the target was met. Also the small statistics helpers
//! (percentiles over durations). Nothing here measures anything.

use std::time::Duration;

use serde::Serialize;

/// One measured figure, with the physical baseline it is compared against.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Short name, e.g. `latency.p50.h100`.
    pub name: String,
    /// The measured value.
    pub value: f64,
    /// Unit of `value` and `baseline`.
    pub unit: String,
    /// The baseline in the same unit, and what it is.
    pub baseline: Option<(f64, String)>,
    /// The target, in words.
    pub target: String,
    /// Whether the target was met (`None`: no target, reported for information).
    pub met: Option<bool>,
}

impl Figure {
    /// A figure without baseline or target.
    pub fn info(name: impl Into<String>, value: f64, unit: &str) -> Self {
        Self { name: name.into(), value, unit: unit.into(), baseline: None, target: "-".into(), met: None }
    }

    /// Adds the baseline.
    pub fn baseline(mut self, value: f64, what: impl Into<String>) -> Self {
        self.baseline = Some((value, what.into()));
        self
    }

    /// Adds a target and whether it was met.
    pub fn target(mut self, target: impl Into<String>, met: bool) -> Self {
        self.target = target.into();
        self.met = Some(met);
        self
    }

    /// `value / baseline`, if there is a non-zero baseline.
    pub fn ratio(&self) -> Option<f64> {
        self.baseline.as_ref().and_then(|(b, _)| ratio(self.value, *b))
    }

    /// The printed line: `name: value unit | baseline: … | ratio: … | target: … | met`.
    pub fn line(&self) -> String {
        let baseline = match &self.baseline {
            Some((b, what)) => format!("{} {} ({what})", num(*b), self.unit),
            None => "-".into(),
        };
        let ratio = self.ratio().map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into());
        let met = match self.met {
            Some(true) => "met",
            Some(false) => "missed",
            None => "info",
        };
        format!(
            "{}: {} {} | baseline: {baseline} | ratio: {ratio} | target: {} | {met}",
            self.name,
            num(self.value),
            self.unit,
            self.target
        )
    }
}

/// `a / b`, or `None` when `b` is zero.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b != 0.0).then(|| a / b)
}

/// A number with as many decimals as make sense for its size.
fn num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// The `p`-th percentile (0–100, nearest rank) of `samples`; zero if empty.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A duration in microseconds.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&samples, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&samples, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&samples, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn a_line_shows_value_baseline_ratio_and_verdict() {
        let f = Figure::info("x", 3.0, "ms").baseline(1.5, "in-process").target("≤ 2×", false);
        assert_eq!(f.ratio(), Some(2.0));
        assert_eq!(f.line(), "x: 3.00 ms | baseline: 1.50 ms (in-process) | ratio: 2.00 | target: ≤ 2× | missed");
        assert_eq!(Figure::info("y", 0.5, "B").line(), "y: 0.500 B | baseline: - | ratio: - | target: - | info");
        assert_eq!(ratio(1.0, 0.0), None);
    }
}
