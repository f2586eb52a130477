//! Rows of the result table: samples on both sides, medians, ratios, goals; the table people read
//! and the JSON scripts read. Pure: no I/O but the caller's printing.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{json, Value};

/// How a row's figures are shown. Samples are stored in the base unit named here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Samples in seconds.
    Seconds,
    /// Samples in milliseconds.
    Millis,
    /// Samples in megabytes (10^6 bytes) per second.
    MegabytesPerSec,
    /// Samples in mebibytes.
    Mebibytes,
    /// Samples in percent of one core.
    Percent,
}

impl Unit {
    pub fn show(self, v: f64) -> String {
        match self {
            Unit::Seconds if v < 1.0 => format!("{:.0} ms", v * 1000.0),
            Unit::Seconds => format!("{v:.2} s"),
            Unit::Millis if v < 10.0 => format!("{v:.2} ms"),
            Unit::Millis => format!("{v:.1} ms"),
            Unit::MegabytesPerSec => format!("{v:.0} MB/s"),
            Unit::Mebibytes => format!("{v:.1} MiB"),
            Unit::Percent => format!("{v:.1} %"),
        }
    }

    pub fn suffix(self) -> &'static str {
        match self {
            Unit::Seconds => "s",
            Unit::Millis => "ms",
            Unit::MegabytesPerSec => "MB/s",
            Unit::Mebibytes => "MiB",
            Unit::Percent => "%",
        }
    }
}

/// What a row must show to meet its goal (on medians).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Goal {
    None,
    /// farm / baseline at most this.
    RatioAtMost(f64),
    /// farm / baseline at least this.
    RatioAtLeast(f64),
    /// farm's figure at most this (in the row's unit).
    AtMost(f64),
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub id: String,
    pub title: String,
    pub unit: Unit,
    /// What the farm column measures.
    pub farm_label: String,
    pub farm: Vec<f64>,
    /// What the baseline column measures; empty when the row has none.
    pub baseline_label: String,
    pub baseline: Vec<f64>,
    pub goal: Goal,
    pub notes: Vec<String>,
    /// Where farm's time goes: phase → median seconds (from `farm build --progress json`).
    pub breakdown: BTreeMap<String, f64>,
    /// Phases of the baseline, likewise.
    pub baseline_breakdown: BTreeMap<String, f64>,
    /// The row could not be measured.
    pub error: Option<String>,
}

impl Row {
    pub fn new(id: &str, title: &str, unit: Unit, goal: Goal) -> Row {
        Row {
            id: id.into(),
            title: title.into(),
            unit,
            farm_label: String::new(),
            farm: vec![],
            baseline_label: String::new(),
            baseline: vec![],
            goal,
            notes: vec![],
            breakdown: BTreeMap::new(),
            baseline_breakdown: BTreeMap::new(),
            error: None,
        }
    }

    pub fn failed(mut self, error: impl std::fmt::Display) -> Row {
        self.error = Some(format!("{error:#}"));
        self
    }

    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    pub fn farm_median(&self) -> Option<f64> {
        median(&self.farm)
    }

    pub fn baseline_median(&self) -> Option<f64> {
        median(&self.baseline)
    }

    pub fn ratio(&self) -> Option<f64> {
        let (f, b) = (self.farm_median()?, self.baseline_median()?);
        (b > 0.0).then(|| f / b)
    }

    /// Whether the goal is met; `None` when the row has no goal or no figures.
    pub fn met(&self) -> Option<bool> {
        match self.goal {
            Goal::None => None,
            Goal::RatioAtMost(g) => self.ratio().map(|r| r <= g),
            Goal::RatioAtLeast(g) => self.ratio().map(|r| r >= g),
            Goal::AtMost(g) => self.farm_median().map(|f| f <= g),
        }
    }

    pub fn goal_text(&self) -> String {
        match self.goal {
            Goal::None => "-".into(),
            Goal::RatioAtMost(g) => format!("<= {g:.2}x"),
            Goal::RatioAtLeast(g) => format!(">= {g:.2}x"),
            Goal::AtMost(g) => format!("<= {}", self.unit.show(g)),
        }
    }
}

/// The median of `xs` (mean of the middle two for an even count).
pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// The nearest-rank percentile `p` (0..=100) of `xs`.
pub fn percentile(xs: &[f64], p: f64) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// The medians of several runs' phase maps, phase by phase.
pub fn median_phases(runs: &[BTreeMap<String, f64>]) -> BTreeMap<String, f64> {
    let mut all: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for run in runs {
        for (k, v) in run {
            all.entry(k.clone()).or_default().push(*v);
        }
    }
    all.into_iter().filter_map(|(k, v)| median(&v).map(|m| (k, m))).collect()
}

/// The table: ROW, FARM, BASELINE, RATIO, GOAL, MET?, then the notes and baselines by row.
pub fn table(rows: &[Row]) -> String {
    let header = ["ROW", "FARM", "BASELINE", "RATIO", "GOAL", "MET?", "N"];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let show = |m: Option<f64>| m.map(|v| r.unit.show(v)).unwrap_or_else(|| "-".into());
            let met = match (&r.error, r.met()) {
                (Some(_), _) => "ERROR".to_string(),
                (None, Some(true)) => "yes".into(),
                (None, Some(false)) => "NO".into(),
                (None, None) => "-".into(),
            };
            let n = if r.baseline.is_empty() {
                r.farm.len().to_string()
            } else {
                format!("{}/{}", r.farm.len(), r.baseline.len())
            };
            [
                format!("{} {}", r.id, r.title),
                show(r.farm_median()),
                show(r.baseline_median()),
                r.ratio().map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into()),
                r.goal_text(),
                met,
                n,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for c in &cells {
        for (w, s) in widths.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, c: &[String]| {
        let mut l = String::new();
        for (i, (s, w)) in c.iter().zip(widths).enumerate() {
            let pad = w - s.chars().count();
            if i == 0 {
                let _ = write!(l, "{s}{}", " ".repeat(pad));
            } else {
                let _ = write!(l, "  {}{s}", " ".repeat(pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, &header.map(String::from));
    for c in &cells {
        line(&mut out, c);
    }
    out.push_str("\nFARM and BASELINE are medians; RATIO = FARM / BASELINE; N = samples (farm/baseline).\n");
    for r in rows {
        let mut said = vec![];
        if !r.farm_label.is_empty() {
            said.push(format!("FARM = {}", r.farm_label));
        }
        if !r.baseline_label.is_empty() {
            said.push(format!("BASELINE = {}", r.baseline_label));
        }
        said.extend(r.notes.iter().cloned());
        if let Some(e) = &r.error {
            said.push(format!("ERROR: {}", e.lines().next().unwrap_or("")));
        }
        if said.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{}: {}", r.id, said.join("; "));
    }
    out
}

/// "Where the time goes" for rows with a breakdown.
pub fn breakdowns(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows.iter().filter(|r| !r.breakdown.is_empty() || !r.baseline_breakdown.is_empty()) {
        let show = |m: &BTreeMap<String, f64>| {
            m.iter().map(|(k, v)| format!("{} {}", k, Unit::Seconds.show(*v))).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(out, "{} {}", r.id, r.title);
        if !r.breakdown.is_empty() {
            let _ = writeln!(out, "    farm:     {}", show(&r.breakdown));
        }
        if !r.baseline_breakdown.is_empty() {
            let _ = writeln!(out, "    baseline: {}", show(&r.baseline_breakdown));
        }
    }
    out
}

pub fn row_json(r: &Row) -> Value {
    json!({
        "id": r.id,
        "title": r.title,
        "unit": r.unit.suffix(),
        "farm_label": r.farm_label,
        "farm_median": r.farm_median(),
        "farm_samples": r.farm,
        "baseline_label": r.baseline_label,
        "baseline_median": r.baseline_median(),
        "baseline_samples": r.baseline,
        "ratio": r.ratio(),
        "goal": r.goal,
        "goal_text": r.goal_text(),
        "met": r.met(),
        "notes": r.notes,
        "breakdown_s": r.breakdown,
        "baseline_breakdown_s": r.baseline_breakdown,
        "error": r.error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), Some(50.0));
        assert_eq!(percentile(&xs, 99.0), Some(99.0));
        assert_eq!(percentile(&xs, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
    }

    #[test]
    fn goals_on_medians() {
        let mut r = Row::new("1", "one platform", Unit::Seconds, Goal::RatioAtMost(1.10));
        r.farm = vec![10.0, 11.0, 50.0];
        r.baseline = vec![10.0, 10.0, 10.0];
        assert_eq!(r.ratio(), Some(1.1));
        assert_eq!(r.met(), Some(true));
        r.goal = Goal::RatioAtLeast(1.2);
        assert_eq!(r.met(), Some(false));
        r.goal = Goal::AtMost(10.5);
        assert_eq!(r.met(), Some(false));
        r.goal = Goal::None;
        assert_eq!(r.met(), None);
        let t = table(&[r.clone()]);
        assert!(t.lines().next().unwrap().starts_with("ROW"), "{t}");
        assert!(t.contains("1 one platform"), "{t}");
        assert!(t.contains("11.00 s") && t.contains("1.10x"), "{t}");
        assert_eq!(row_json(&r)["farm_median"], 11.0);
    }

    #[test]
    fn phase_medians() {
        let a: BTreeMap<String, f64> = [("build".to_string(), 1.0), ("push".to_string(), 3.0)].into();
        let b: BTreeMap<String, f64> = [("build".to_string(), 2.0)].into();
        let c: BTreeMap<String, f64> = [("build".to_string(), 3.0), ("push".to_string(), 5.0)].into();
        let m = median_phases(&[a, b, c]);
        assert_eq!(m["build"], 2.0);
        assert_eq!(m["push"], 4.0);
    }

    #[test]
    fn units_read_well() {
        assert_eq!(Unit::Seconds.show(0.25), "250 ms");
        assert_eq!(Unit::Seconds.show(12.345), "12.35 s");
        assert_eq!(Unit::Millis.show(1.234), "1.23 ms");
        assert_eq!(Unit::MegabytesPerSec.show(812.4), "812 MB/s");
    }
}
