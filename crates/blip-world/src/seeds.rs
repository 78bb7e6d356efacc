//! The experiment over several seeds: mean ± 95 % interval of every metric of every row,
//! with the seeds that failed named rather than silently left out of the averages.

use serde_json::Value;

/// Two-sided 95 % quantiles of Student's t for 1 to 30 degrees of freedom (R's
/// `qt(0.975, df)`), so that a handful of seeds gets an honest interval; the normal 1.96
/// beyond.
const T_975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// A mean and its 95 % confidence interval, `mean ± half_width`.
///
/// ```
/// use blip_world::Interval;
///
/// let i = Interval::of(&[1.0, 2.0, 3.0]).unwrap();
/// assert_eq!((i.mean, i.n), (2.0, 3));
/// assert!((i.half_width - 4.303 / 3f64.sqrt()).abs() < 1e-12); // t(0.975, 2) · s / √n, s = 1
/// assert!(i.overlaps(&Interval::of(&[4.0, 4.5, 5.0]).unwrap())); // 2 ± 2.48 meets 4.5 ± 1.24
/// assert!(Interval::of(&[]).is_none());
/// assert!(Interval::of(&[7.0]).unwrap().half_width.is_infinite()); // one run: no interval
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    /// The sample mean.
    pub mean: f64,
    /// Student's t quantile times the standard error (infinite for one value).
    pub half_width: f64,
    /// Values averaged.
    pub n: usize,
}

impl Interval {
    /// The t-interval of `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Self> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let half_width = if n == 1 {
            f64::INFINITY
        } else {
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            let t = T_975.get(n - 2).copied().unwrap_or(1.96);
            t * (var / n as f64).sqrt()
        };
        Some(Self {
            mean,
            half_width,
            n,
        })
    }

    /// Lower end.
    pub fn low(&self) -> f64 {
        self.mean - self.half_width
    }

    /// Upper end.
    pub fn high(&self) -> f64 {
        self.mean + self.half_width
    }

    /// Whether the two intervals share a point.
    pub fn overlaps(&self, other: &Interval) -> bool {
        self.low() <= other.high() && other.low() <= self.high()
    }

    /// `mean ± half_width` to `decimals` places; the mean alone for a single value.
    ///
    /// ```
    /// use blip_world::Interval;
    ///
    /// assert_eq!(Interval::of(&[1.0, 2.0, 3.0]).unwrap().render(1), "2.0 ± 2.5");
    /// assert_eq!(Interval::of(&[7.0]).unwrap().render(2), "7.00");
    /// ```
    pub fn render(&self, decimals: usize) -> String {
        if self.half_width.is_finite() {
            format!("{:.d$} ± {:.d$}", self.mean, self.half_width, d = decimals)
        } else {
            format!("{:.d$}", self.mean, d = decimals)
        }
    }
}

/// One seed of a multi-seed run: its `results.json`, or why it has none.
#[derive(Clone, Debug, PartialEq)]
pub struct SeedRun {
    /// The seed (world sample, initialisation and data order).
    pub seed: u64,
    /// The seed's `results.json`, or the reason it failed.
    pub outcome: Result<Value, String>,
}

/// The columns of a row: a label and where the value sits in the row's JSON. The
/// synthetic captions' attributes are read against each web image's scene: what a
/// bootstrapped model learns from, before and after the filter.
pub const ROW_METRICS: [(&str, &str); 9] = [
    ("synthetic texts removed (%)", "/synthetic_noise_ratio"),
    (
        "synthetic captions with every attribute right (%)",
        "/synthetic/exact",
    ),
    (
        "kept synthetic captions with every attribute right (%)",
        "/synthetic/kept_exact",
    ),
    ("TR@1", "/retrieval/tr@1"),
    ("TR@5", "/retrieval/tr@5"),
    ("IR@1", "/retrieval/ir@1"),
    ("IR@5", "/retrieval/ir@5"),
    (
        "captions with every attribute right (%)",
        "/captioning/exact_attributes",
    ),
    ("CIDEr", "/captioning/cider"),
];

/// Run-level figures: a label and where the value sits in `results.json`. The filter's
/// AUC is how often it ranks a clean web text above a noisy one, threshold aside (see
/// [`crate::ranking_auc`]).
pub const RUN_METRICS: [(&str, &str); 9] = [
    (
        "filter precision against the noise labels (%)",
        "/filter_vs_labels/precision",
    ),
    (
        "filter recall against the noise labels (%)",
        "/filter_vs_labels/recall",
    ),
    ("filter AUC, clean above noisy (%)", "/filter_vs_labels/auc"),
    (
        "filter AUC, clean above another image's caption (%)",
        "/filter_vs_labels/auc_by_kind/other_image",
    ),
    (
        "filter AUC, clean above a caption with one attribute wrong (%)",
        "/filter_vs_labels/auc_by_kind/wrong_attribute",
    ),
    (
        "filter AUC, clean above unrelated text (%)",
        "/filter_vs_labels/auc_by_kind/unrelated",
    ),
    (
        "filter AUC, clean above a truncated caption (%)",
        "/filter_vs_labels/auc_by_kind/truncated",
    ),
    ("web texts removed (%)", "/noise_ratio/web_removed"),
    ("minutes per seed", "/seconds"),
];

/// Fractions stored as 0–1 that the tables show as percentages, and seconds as minutes.
fn scaled(pointer: &str, value: f64) -> f64 {
    match pointer {
        "/synthetic_noise_ratio" | "/noise_ratio/web_removed" => 100.0 * value,
        p if p.starts_with("/filter_vs_labels/auc") => 100.0 * value,
        "/seconds" => value / 60.0,
        _ => value,
    }
}

/// Every seed's value at `pointer` (scaled for display), over the seeds that completed.
/// `(metric, interval)` of each of `metrics` (`(name, JSON pointer)`) over `done`, for
/// the metrics that have values.
fn intervals(metrics: &[(&str, &str)], done: &[&Value]) -> Vec<(String, Interval)> {
    metrics
        .iter()
        .filter_map(|(name, pointer)| {
            Interval::of(&values(done, pointer)).map(|i| (name.to_string(), i))
        })
        .collect()
}

fn values(done: &[&Value], pointer: &str) -> Vec<f64> {
    done.iter().filter_map(|r| value_at(r, pointer)).collect()
}

/// The number at `pointer` in `v`, scaled for display.
fn value_at(v: &Value, pointer: &str) -> Option<f64> {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .map(|x| scaled(pointer, x))
}

/// The rows (`models`) of one seed's `results.json`.
fn rows(result: &Value) -> impl Iterator<Item = &Value> {
    result["models"].as_array().into_iter().flatten()
}

/// Those rows of one seed's `results.json` whose pre-training data is `label`.
fn rows_labelled<'a>(result: &'a Value, label: &'a str) -> impl Iterator<Item = &'a Value> {
    rows(result).filter(move |row| row["pre-training data"].as_str() == Some(label))
}

/// The interval of the per-seed difference `row − baseline` in `metric` (a name from
/// [`ROW_METRICS`]), over the seeds that completed with a value in both rows; `None` when
/// there is no such seed or no such metric.
///
/// Each seed's world and initialisation move every row together, so the paired
/// difference can lie clear of 0 while the two rows' own intervals overlap.
///
/// ```
/// use blip_world::{SeedRun, paired_gap};
/// use serde_json::json;
///
/// let run = |seed, base: f64, capfilt: f64| SeedRun {
///     seed,
///     outcome: Ok(json!({"models": [
///         {"pre-training data": "no CapFilt", "retrieval": {"tr@1": base}},
///         {"pre-training data": "CapFilt", "retrieval": {"tr@1": capfilt}},
///     ]})),
/// };
/// // The rows overlap (2–8 against 4–10), but CapFilt is 2 ahead in every seed.
/// let runs = [run(1, 2.0, 4.0), run(2, 5.0, 7.0), run(3, 8.0, 10.0)];
/// let gap = paired_gap(&runs, "CapFilt", "no CapFilt", "TR@1").unwrap();
/// assert_eq!((gap.mean, gap.half_width, gap.n), (2.0, 0.0, 3));
/// assert!(paired_gap(&runs, "CapFilt", "no CapFilt", "CIDEr").is_none());
/// assert!(paired_gap(&runs, "CapFilt", "no CapFilt", "no such metric").is_none());
/// ```
pub fn paired_gap(runs: &[SeedRun], row: &str, baseline: &str, metric: &str) -> Option<Interval> {
    let (_, pointer) = ROW_METRICS.iter().find(|(name, _)| *name == metric)?;
    let value =
        |result: &Value, label: &str| value_at(rows_labelled(result, label).next()?, pointer);
    let gaps: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.outcome.as_ref().ok())
        .filter_map(|result| Some(value(result, row)? - value(result, baseline)?))
        .collect();
    Interval::of(&gaps)
}

/// The summary of a multi-seed run.
///
/// ```
/// use blip_world::{SeedRun, SeedSummary};
/// use serde_json::json;
///
/// let run = |seed, tr1: f64| SeedRun {
///     seed,
///     outcome: Ok(json!({"models": [{"pre-training data": "no CapFilt", "retrieval": {"tr@1": tr1}}]})),
/// };
/// let runs = [run(1, 4.0), run(2, 6.0), SeedRun { seed: 3, outcome: Err("exit status 1".into()) }];
/// let summary = SeedSummary::of(&runs);
/// let tr1 = summary.row_interval("no CapFilt", "TR@1").unwrap();
/// assert_eq!((tr1.mean, tr1.n), (5.0, 2));
/// assert_eq!(summary.failed, [(3, "exit status 1".to_string())]);
/// assert!(summary.markdown().contains("seed 3 failed (exit status 1)"));
/// ```
#[derive(Clone, Debug)]
pub struct SeedSummary {
    /// Seeds attempted.
    pub seeds: Vec<u64>,
    /// Seeds that failed and why.
    pub failed: Vec<(u64, String)>,
    /// Row labels in order, each with `(metric, interval)` for the metrics some seed has.
    pub rows: Vec<(String, Vec<(String, Interval)>)>,
    /// Run-level `(metric, interval)`.
    pub run: Vec<(String, Interval)>,
}

impl SeedSummary {
    /// Averages the seeds that completed and lists those that did not.
    pub fn of(runs: &[SeedRun]) -> Self {
        let done: Vec<&Value> = runs
            .iter()
            .filter_map(|r| r.outcome.as_ref().ok())
            .collect();
        let failed = runs
            .iter()
            .filter_map(|r| r.outcome.as_ref().err().map(|e| (r.seed, e.clone())))
            .collect();
        let mut labels: Vec<String> = Vec::new();
        for r in &done {
            for row in rows(r) {
                if let Some(label) = row["pre-training data"].as_str()
                    && !labels.iter().any(|l| l == label)
                {
                    labels.push(label.to_string());
                }
            }
        }
        let rows = labels
            .into_iter()
            .map(|label| {
                let of_label: Vec<&Value> =
                    done.iter().flat_map(|r| rows_labelled(r, &label)).collect();
                let metrics = intervals(&ROW_METRICS, &of_label);
                (label, metrics)
            })
            .collect();
        let run = intervals(&RUN_METRICS, &done);
        Self {
            seeds: runs.iter().map(|r| r.seed).collect(),
            failed,
            rows,
            run,
        }
    }

    /// The interval of `metric` (a name from [`ROW_METRICS`]) in the row `label`.
    pub fn row_interval(&self, label: &str, metric: &str) -> Option<Interval> {
        let (_, metrics) = self.rows.iter().find(|(l, _)| l == label)?;
        metrics.iter().find(|(m, _)| m == metric).map(|(_, i)| *i)
    }

    /// The interval of a run-level `metric` (a name from [`RUN_METRICS`]).
    pub fn run_interval(&self, metric: &str) -> Option<Interval> {
        self.run.iter().find(|(m, _)| m == metric).map(|(_, i)| *i)
    }

    /// The tables of `results.md`: one row per pre-training data set, mean ± 95 % interval
    /// per metric, the run-level figures, and every failed seed.
    pub fn markdown(&self) -> String {
        let completed = self.seeds.len() - self.failed.len();
        let mut md = format!(
            "{completed} of {} seeds completed ({}). Each cell: mean ± 95 % interval \
             (Student's t over the completed seeds; no interval for a single seed).\n\n",
            self.seeds.len(),
            self.seeds
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (seed, why) in &self.failed {
            md += &format!("**seed {seed} failed ({why})**: it is in no average below.\n");
        }
        if !self.failed.is_empty() {
            md.push('\n');
        }
        md += "| pre-training data |";
        for (name, _) in ROW_METRICS {
            md += &format!(" {name} |");
        }
        md += "\n|---|";
        md += &"---|".repeat(ROW_METRICS.len());
        md.push('\n');
        for (label, metrics) in &self.rows {
            md += &format!("| {label} |");
            for (name, _) in ROW_METRICS {
                let cell = metrics
                    .iter()
                    .find(|(m, _)| m == name)
                    .map_or("n/a".to_string(), |(_, i)| i.render(1));
                md += &format!(" {cell} |");
            }
            md.push('\n');
        }
        md.push('\n');
        for (name, interval) in &self.run {
            md += &format!("- {name}: {}\n", interval.render(1));
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seed(seed: u64, tr1: f64, removed: f64) -> SeedRun {
        SeedRun {
            seed,
            outcome: Ok(json!({
                "models": [
                    {"pre-training data": "a", "retrieval": {"tr@1": tr1}, "synthetic_noise_ratio": null},
                    {"pre-training data": "b", "retrieval": {"tr@1": tr1 + 1.0}, "synthetic_noise_ratio": removed,
                     "synthetic": {"exact": 100.0 * (1.0 - removed), "kept_exact": 90.0}},
                ],
                "seconds": 600.0,
                "filter_vs_labels": {"auc": 0.75, "auc_by_kind": {"truncated": 0.5}},
            })),
        }
    }

    #[test]
    fn intervals_average_the_completed_seeds_per_row() {
        let runs = [seed(1, 1.0, 0.5), seed(2, 3.0, 0.7)];
        let s = SeedSummary::of(&runs);
        let a = s.row_interval("a", "TR@1").unwrap();
        assert_eq!((a.mean, a.n), (2.0, 2));
        // s = √2, t(0.975, 1) = 12.706.
        assert!((a.half_width - 12.706 * (2f64).sqrt() / 2f64.sqrt()).abs() < 1e-9);
        assert_eq!(s.row_interval("b", "TR@1").unwrap().mean, 3.0);
        // A null (row a has no synthetic texts) is not a value.
        assert!(s.row_interval("a", "synthetic texts removed (%)").is_none());
        let removed = s.row_interval("b", "synthetic texts removed (%)").unwrap();
        assert!((removed.mean - 60.0).abs() < 1e-9);
        // Already percentages: not scaled again.
        let right = s.row_interval("b", "synthetic captions with every attribute right (%)");
        assert!((right.unwrap().mean - 40.0).abs() < 1e-9);
        let kept = s.row_interval(
            "b",
            "kept synthetic captions with every attribute right (%)",
        );
        assert_eq!(kept.unwrap().half_width, 0.0);
        assert!(md_row_b(&s).contains("| 60.0 ± 127.1 | 40.0 ± 127.1 | 90.0 ± 0.0 |"));
        assert_eq!(s.run_interval("minutes per seed").unwrap().mean, 10.0);
        // AUCs are fractions shown as percentages.
        let auc = s.run_interval("filter AUC, clean above noisy (%)").unwrap();
        assert_eq!((auc.mean, auc.n), (75.0, 2));
        let truncated = s.run_interval("filter AUC, clean above a truncated caption (%)");
        assert_eq!(truncated.unwrap().mean, 50.0);
        assert!(
            s.run_interval("filter AUC, clean above unrelated text (%)")
                .is_none()
        );
        let md = s.markdown();
        assert!(md.starts_with("2 of 2 seeds completed (1, 2)"), "{md}");
        assert!(md.contains("| a | n/a | n/a | n/a | 2.0 ± 12.7 |"), "{md}");
    }

    fn md_row_b(s: &SeedSummary) -> String {
        let md = s.markdown();
        md.lines()
            .find(|l| l.starts_with("| b |"))
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn failed_seeds_are_named_and_counted() {
        let runs = [
            seed(1, 1.0, 0.5),
            SeedRun {
                seed: 2,
                outcome: Err("killed by signal 9".into()),
            },
        ];
        let s = SeedSummary::of(&runs);
        assert_eq!(s.row_interval("a", "TR@1").unwrap().n, 1);
        let md = s.markdown();
        assert!(md.starts_with("1 of 2 seeds completed"), "{md}");
        assert!(
            md.contains("**seed 2 failed (killed by signal 9)**"),
            "{md}"
        );
        // One seed: the mean alone, no interval pretending otherwise.
        assert!(md.contains("| a | n/a | n/a | n/a | 1.0 |"), "{md}");
    }

    #[test]
    fn t_quantiles_fall_to_the_normal() {
        let i = |n: usize| {
            let v: Vec<f64> = (0..n).map(|k| (k % 2) as f64).collect();
            Interval::of(&v).unwrap()
        };
        let (five, forty) = (i(5), i(40));
        let sd5 = 0.3f64.sqrt(); // sample variance of 0, 1, 0, 1, 0
        assert!((five.half_width - 2.776 * sd5 / 5f64.sqrt()).abs() < 1e-9);
        let sd40 = (0.25f64 * 40.0 / 39.0).sqrt();
        assert!((forty.half_width - 1.96 * sd40 / 40f64.sqrt()).abs() < 1e-9);
    }
}
