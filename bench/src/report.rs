//! The results: one row per Keyward figure with its baseline, the ratio, the target and
//! PASS/MISS; latency percentiles of both sides; notes (machine, peak RSS, fill time). Printed
//! as Markdown tables (what BENCHMARKS.md shows) and optionally written as JSON for later
//! comparisons.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::measure::{quantile, Compared, Stats};

/// What a ratio (Keyward / baseline) must satisfy.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// Throughput-like: higher is better.
    AtLeast(f64),
    /// Time- or size-like: lower is better.
    AtMost(f64),
    /// No target: a figure for information (a peer's, or a load no target speaks of). Never a
    /// miss.
    Info,
}

impl Goal {
    fn met(self, ratio: f64) -> bool {
        match self {
            Goal::AtLeast(x) => ratio >= x,
            Goal::AtMost(x) => ratio <= x,
            Goal::Info => true,
        }
    }

    pub fn text(self) -> String {
        match self {
            Goal::AtLeast(x) => format!(">= {x}"),
            Goal::AtMost(x) => format!("<= {x}x"),
            Goal::Info => "—".into(),
        }
    }
}

/// How a figure is shown.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Requests per second.
    PerSec,
    /// Seconds, shown in ms or µs.
    Secs,
    /// Bytes, shown in MiB.
    Bytes,
    /// A plain count (open file descriptors).
    Count,
}

fn show(unit: Unit, v: f64) -> String {
    match unit {
        Unit::PerSec => format!("{}/s", thousands(v.round() as u64)),
        Unit::Secs => secs(v),
        Unit::Bytes => format!("{:.1} MiB", v / (1024.0 * 1024.0)),
        Unit::Count => thousands(v.round() as u64),
    }
}

/// Seconds with about three significant digits, in the unit that suits them.
pub fn secs(v: f64) -> String {
    let sig = |x: f64, unit: &str| {
        if x >= 100.0 {
            format!("{x:.0} {unit}")
        } else if x >= 10.0 {
            format!("{x:.1} {unit}")
        } else {
            format!("{x:.2} {unit}")
        }
    };
    if v >= 1.0 {
        sig(v, "s")
    } else if v >= 1e-3 {
        sig(v * 1e3, "ms")
    } else {
        sig(v * 1e6, "µs")
    }
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One Keyward figure next to its baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub path: String,
    pub measure: String,
    pub baseline_name: String,
    pub unit: Unit,
    pub baseline: f64,
    pub keyward: f64,
    /// Keyward / baseline: of the medians of paired measurements where there are pairs, else
    /// of the two figures.
    pub ratio: f64,
    /// The interquartile range of the paired ratios, where there are pairs.
    pub spread: Option<(f64, f64)>,
    pub goal: Goal,
    pub pass: bool,
}

impl Row {
    /// PASS, MISS, or `info` for a figure without a target.
    fn verdict(&self) -> &'static str {
        match (self.goal, self.pass) {
            (Goal::Info, _) => "info",
            (_, true) => "PASS",
            (_, false) => "MISS",
        }
    }

    fn ratio_text(&self) -> String {
        match self.spread {
            Some((lo, hi)) => format!("{:.2} ({lo:.2}–{hi:.2})", self.ratio),
            None => format!("{:.2}", self.ratio),
        }
    }
}

/// Latency percentiles of one side of one comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub path: String,
    pub side: String,
    pub stats: Stats,
}

/// Everything one run measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub quick: bool,
    pub machine: Vec<(String, String)>,
    pub rows: Vec<Row>,
    pub latencies: Vec<Latency>,
    pub notes: Vec<String>,
}

impl Report {
    /// Record a figure. The ratio is the median of `pairs` (Keyward / baseline of measurements
    /// taken back to back) when there are any, else `keyward / baseline`.
    #[allow(clippy::too_many_arguments)]
    pub fn row(
        &mut self,
        path: &str,
        measure: &str,
        baseline_name: &str,
        unit: Unit,
        (baseline, keyward): (f64, f64),
        pairs: &[f64],
        goal: Goal,
    ) {
        let (ratio, spread) = if pairs.is_empty() {
            let ratio = if baseline > 0.0 {
                keyward / baseline
            } else {
                f64::NAN
            };
            (ratio, None)
        } else {
            (
                quantile(pairs, 0.5),
                Some((quantile(pairs, 0.25), quantile(pairs, 0.75))),
            )
        };
        let row = Row {
            path: path.into(),
            measure: measure.into(),
            baseline_name: baseline_name.into(),
            unit,
            baseline,
            keyward,
            ratio,
            spread,
            goal,
            pass: goal.met(ratio),
        };
        eprintln!(
            "  {:<44} {:<22} {:>14} {:>14} {:>18} {:<8} {}",
            row.path,
            row.measure,
            show(unit, baseline),
            show(unit, keyward),
            row.ratio_text(),
            goal.text(),
            row.verdict()
        );
        self.rows.push(row);
    }

    /// A comparison's throughput and p99 rows (against `goals`), and both sides' latencies,
    /// the baseline's under `side`; returns the two sides' figures.
    pub fn rate_and_p99(
        &mut self,
        path: &str,
        baseline_name: &str,
        side: &str,
        c: Compared,
        (rate, p99): (Goal, Goal),
    ) -> (Stats, Stats) {
        let (b, k) = (c.base.stats(), c.keyward.stats());
        let name = baseline_name;
        self.row(
            path,
            "throughput",
            name,
            Unit::PerSec,
            (b.rate, k.rate),
            &c.pairs,
            rate,
        );
        self.row(
            path,
            "p99 latency",
            name,
            Unit::Secs,
            (b.p99, k.p99),
            &[],
            p99,
        );
        self.latency(path, side, b, k);
        (b, k)
    }

    /// Record both sides' latency percentiles (the second side is Keyward).
    pub fn latency(&mut self, path: &str, baseline_name: &str, base: Stats, keyward: Stats) {
        self.latency_sides(path, (baseline_name, base), ("keyward", keyward));
    }

    /// Record two named sides' latency percentiles.
    pub fn latency_sides(&mut self, path: &str, first: (&str, Stats), second: (&str, Stats)) {
        for (side, stats) in [first, second] {
            self.latencies.push(Latency {
                path: path.into(),
                side: side.into(),
                stats,
            });
        }
    }

    /// A free-form line under the tables.
    pub fn note(&mut self, line: String) {
        eprintln!("  {line}");
        self.notes.push(line);
    }

    /// The figures that missed their targets (`--strict` fails on any).
    pub fn missed(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| !r.pass).collect()
    }

    /// The Markdown tables.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "| machine | |\n|---|---|");
        for (k, v) in &self.machine {
            let _ = writeln!(out, "| {k} | {v} |");
        }
        let _ = writeln!(
            out,
            "\n| path | measure | baseline (same run) | baseline | keyward | ratio (IQR of pairs) | target | |\n\
             |---|---|---|---:|---:|---:|---|---|"
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.path,
                r.measure,
                r.baseline_name,
                show(r.unit, r.baseline),
                show(r.unit, r.keyward),
                r.ratio_text(),
                r.goal.text(),
                if r.pass { r.verdict() } else { "**MISS**" }
            );
        }
        let missed = self.missed();
        let targets = self
            .rows
            .iter()
            .filter(|r| !matches!(r.goal, Goal::Info))
            .count();
        if targets == 0 {
            let _ = writeln!(out, "\nNo figure here has a target.");
        } else if missed.is_empty() {
            let _ = writeln!(out, "\nAll {targets} figures with a target met it.");
        } else {
            let _ = writeln!(
                out,
                "\n{} of {targets} figures with a target missed it:",
                missed.len()
            );
            for r in missed {
                let _ = writeln!(out, "- {} ({}): {}", r.path, r.measure, r.ratio_text());
            }
        }
        let _ = writeln!(
            out,
            "\n| path | side | requests | p50 | p99 | p99.9 |\n|---|---|---:|---:|---:|---:|"
        );
        for l in &self.latencies {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                l.path,
                l.side,
                thousands(l.stats.n),
                secs(l.stats.p50),
                secs(l.stats.p99),
                secs(l.stats.p999)
            );
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }

    /// Write the whole report as JSON.
    ///
    /// # Errors
    /// The file can't be written.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rows: &[(&str, f64, Goal)]) -> Report {
        let mut r = Report::default();
        for (path, ratio, goal) in rows {
            r.row(
                path,
                "throughput",
                "base",
                Unit::PerSec,
                (1.0, *ratio),
                &[],
                *goal,
            );
        }
        r
    }

    #[test]
    fn a_figure_without_a_target_never_misses() {
        let r = report(&[
            ("peer", 0.01, Goal::Info),
            ("fast", 0.95, Goal::AtLeast(0.9)),
        ]);
        assert!(r.missed().is_empty());
        let text = r.markdown();
        assert!(text.contains("| — | info |"), "{text}");
        assert!(
            text.contains("All 1 figures with a target met it."),
            "{text}"
        );
    }

    #[test]
    fn the_report_names_each_missed_figure() {
        let r = report(&[
            ("slow", 0.5, Goal::AtLeast(0.9)),
            ("fat", 1.3, Goal::AtMost(1.1)),
            ("fine", 1.0, Goal::AtMost(1.1)),
            ("peer", 9.0, Goal::Info),
        ]);
        let missed: Vec<&str> = r.missed().iter().map(|r| r.path.as_str()).collect();
        assert_eq!(missed, ["slow", "fat"]);
        let text = r.markdown();
        assert!(
            text.contains("2 of 3 figures with a target missed it:"),
            "{text}"
        );
        assert!(text.contains("- slow (throughput): 0.50"), "{text}");
        assert!(text.contains("- fat (throughput): 1.30"), "{text}");
        assert!(text.contains("| **MISS** |"), "{text}");
    }
}
