//! Output: the stdout table, the JSON rows and the SVG chart of ratios.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use serde::Serialize;

use crate::harness::{Row, System};
use crate::workloads::Report;

/// One JSON row, exactly as the issue specifies it.
#[derive(Serialize)]
struct JsonRow<'a> {
    workload: &'a str,
    system: &'a str,
    median_ns: f64,
    p99_ns: f64,
}

/// Writes the rows as a JSON array to `path`.
pub fn write_json(rows: &[Row], path: &Path) -> io::Result<()> {
    let json: Vec<JsonRow<'_>> = rows
        .iter()
        .map(|r| JsonRow {
            workload: &r.workload,
            system: r.system.name(),
            median_ns: finite(r.median_ns),
            p99_ns: finite(r.p99_ns),
        })
        .collect();
    let text = serde_json::to_string_pretty(&json)?;
    std::fs::write(path, text + "\n")
}

/// JSON has no NaN; a missing measurement is written as -1.
fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        -1.0
    }
}

/// The workloads in order of first appearance, each with its rows.
fn by_workload(rows: &[Row]) -> Vec<(&str, Vec<&Row>)> {
    let mut out: Vec<(&str, Vec<&Row>)> = Vec::new();
    for r in rows {
        match out.iter_mut().find(|(w, _)| *w == r.workload) {
            Some((_, v)) => v.push(r),
            None => out.push((&r.workload, vec![r])),
        }
    }
    out
}

/// aioctx's median divided by `r`'s median, if both exist.
fn ratio(aioctx: Option<&Row>, r: &Row) -> Option<f64> {
    let a = aioctx?.median_ns;
    let q = a / r.median_ns;
    q.is_finite().then_some(q)
}

/// One ratio for the chart and the summary.
pub struct Ratio {
    /// Workload name.
    pub workload: String,
    /// The system aioctx is compared with.
    pub system: System,
    /// aioctx median / that system's median (lower is better for aioctx).
    pub ratio: f64,
}

/// Every aioctx / other ratio, in table order.
pub fn ratios(rows: &[Row]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for (w, rs) in by_workload(rows) {
        let a = rs.iter().copied().find(|r| r.system == System::Aioctx);
        for r in rs.iter().filter(|r| r.system != System::Aioctx) {
            if let Some(q) = ratio(a, r) {
                out.push(Ratio {
                    workload: w.to_string(),
                    system: r.system,
                    ratio: q,
                });
            }
        }
    }
    out
}

fn fmt_ns(ns: f64) -> String {
    if !ns.is_finite() {
        "-".into()
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e4 {
        format!("{:.1} us", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

/// Renders the table, the goal summary and the notes as text.
pub fn table(report: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<48} {:<11} {:>11} {:>11} {:>12} {:>8}",
        "workload", "system", "median", "p99", "aioctx/this", "samples"
    );
    let _ = writeln!(s, "{}", "-".repeat(106));
    let mut summary = Vec::new();
    for (w, rs) in by_workload(&report.rows) {
        let a = rs.iter().copied().find(|r| r.system == System::Aioctx);
        for r in &rs {
            let q = match r.system {
                System::Aioctx => String::new(),
                _ => ratio(a, r).map_or("-".into(), |q| format!("{q:.2}")),
            };
            let _ = writeln!(
                s,
                "{:<48} {:<11} {:>11} {:>11} {:>12} {:>8}",
                w,
                r.system.name(),
                fmt_ns(r.median_ns),
                fmt_ns(r.p99_ns),
                q,
                r.samples
            );
        }
        let best = rs
            .iter()
            .filter(|r| r.system.is_peer() && r.median_ns.is_finite())
            .min_by(|x, y| x.median_ns.total_cmp(&y.median_ns));
        if let (Some(a), Some(b)) = (a, best) {
            let q = a.median_ns / b.median_ns;
            let verdict = if q <= 1.0 { "met" } else { "NOT met" };
            summary.push(format!(
                "{w}: aioctx / best peer ({}) = {q:.2}  [goal <= 1.0: {verdict}]",
                b.system
            ));
        }
        if let Some(f) = rs.iter().find(|r| r.system == System::Floor) {
            if let Some(q) = ratio(a, f) {
                let verdict = if q <= 1.3 { "met" } else { "NOT met" };
                summary.push(format!(
                    "{w}: aioctx / floor = {q:.2}  [goal <= 1.3: {verdict}]"
                ));
            }
        }
    }
    let _ = writeln!(s, "\nGoals (ratios of medians; lower is better):");
    for line in summary {
        let _ = writeln!(s, "  {line}");
    }
    if !report.notes.is_empty() {
        let _ = writeln!(s, "\nNotes:");
        for n in &report.notes {
            let _ = writeln!(s, "  {n}");
        }
    }
    s
}

/// Draws a horizontal bar chart of every aioctx / other ratio, with the 1.0
/// line, as an SVG file at `path`.
pub fn write_chart(rows: &[Row], path: &Path) -> io::Result<()> {
    use plotters::prelude::*;

    let ratios = ratios(rows);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let colors: BTreeMap<System, RGBColor> = [
        (System::Floor, RGBColor(120, 120, 120)),
        (System::Tokio, RGBColor(214, 96, 77)),
        (System::Calloop, RGBColor(67, 147, 195)),
        (System::Mio, RGBColor(146, 197, 222)),
        (System::Glib, RGBColor(90, 174, 97)),
        (System::AioctxPoll, RGBColor(178, 120, 200)),
        (System::Spin, RGBColor(60, 60, 60)),
    ]
    .into_iter()
    .collect();

    let bar_h = 18u32;
    let height = 90 + bar_h * ratios.len().max(1) as u32;
    let max = ratios
        .iter()
        .map(|r| r.ratio)
        .fold(1.5f64, f64::max)
        .min(20.0)
        * 1.1;
    let to_io = |e: DrawingAreaErrorKind<_>| io::Error::other(e.to_string());

    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(to_io)?;
    let n = ratios.len().max(1) as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "aioctx / peer (ratio of medians, lower is better for aioctx)",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(420)
        .build_cartesian_2d(0f64..max, (0..n).into_segmented())
        .map_err(to_io)?;
    // Row i of the table is drawn top-down: segment n - 1 - i.
    let label = |seg: i32| {
        let i = (n - 1 - seg) as usize;
        ratios
            .get(i)
            .map(|r| format!("{} vs {}", r.workload, r.system))
            .unwrap_or_default()
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n as usize)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(seg) => label(*seg),
            _ => String::new(),
        })
        .x_desc("aioctx median / peer median")
        .draw()
        .map_err(to_io)?;
    chart
        .draw_series(ratios.iter().enumerate().map(|(i, r)| {
            let seg = n - 1 - i as i32;
            let color = colors.get(&r.system).copied().unwrap_or(BLACK);
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(seg)),
                    (r.ratio.min(max), SegmentValue::Exact(seg + 1)),
                ],
                color.filled(),
            );
            bar.set_margin(2, 2, 0, 0);
            bar
        }))
        .map_err(to_io)?;
    chart
        .draw_series(ratios.iter().enumerate().map(|(i, r)| {
            let seg = n - 1 - i as i32;
            Text::new(
                format!("{:.2}", r.ratio),
                (r.ratio.min(max) + max * 0.005, SegmentValue::CenterOf(seg)),
                ("sans-serif", 12),
            )
        }))
        .map_err(to_io)?;
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Exact(n))],
            BLACK.stroke_width(2),
        )))
        .map_err(to_io)?;
    root.present().map_err(to_io)?;
    Ok(())
}
