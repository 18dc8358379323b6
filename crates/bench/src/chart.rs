//! The PNG chart for BENCHMARKS.md, drawn from a results JSON file with plotters
//! (bitmap backend; text through ab_glyph with an embedded font, so no system
//! fonts or fontconfig are needed).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use serde_json::Value;

pub fn draw(input: &Path, output: &Path) -> anyhow::Result<()> {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(input)?)?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        epaint_default_fonts::HACK_REGULAR,
    )
    .map_err(|_| anyhow::anyhow!("font"))?;
    if let Some(p) = output.parent() {
        std::fs::create_dir_all(p)?;
    }
    let root = BitMapBackend::new(output, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(520);
    let (tl, tr) = top.split_horizontally(700);
    let (bl, br) = bottom.split_horizontally(700);
    latency(&tl, &doc)?;
    fan_out(&tr, &doc)?;
    routing(&bl, &doc)?;
    throughput(&br, &doc)?;
    root.present()?;
    println!("wrote {}", output.display());
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

const PCTS: [(&str, &str); 4] = [
    ("p50", "p50"),
    ("p95", "p95"),
    ("p99", "p99"),
    ("p999", "p99.9"),
];

/// Live latency: percentiles (log ms) per (subscribers, rate) configuration.
fn latency(area: &Area, doc: &Value) -> anyhow::Result<()> {
    let rows: Vec<&Value> = doc["live-latency"]["rows"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let labels: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{}s@{}k",
                r["subscribers"],
                r["write"]["target_rate"].as_f64().unwrap_or(0.0) / 1000.0
            )
        })
        .collect();
    let maxv = rows
        .iter()
        .filter_map(|r| r["latency_ms"]["p999"].as_f64())
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "live-latency: commit -> subscriber (ms, log)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(0usize..rows.len().max(1), (0.1f64..maxv * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(rows.len().max(1))
        .x_label_formatter(&|i| labels.get(*i).cloned().unwrap_or_default())
        .x_desc("subscribers @ commits/s")
        .y_label_formatter(&|v| format!("{v}"))
        .y_desc("ms")
        .draw()?;
    for (k, (key, name)) in PCTS.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let pts: Vec<(usize, f64)> = rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r["latency_ms"][key].as_f64().map(|v| (i, v.max(0.1))))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    // PostgreSQL's own limit at the same rate (pg_recvlogical reference steps): crosses.
    for (key, name, k) in [
        ("p50", "pg_recvlogical p50", 0),
        ("p99", "pg_recvlogical p99", 2),
    ] {
        let color = Palette99::pick(k).to_rgba();
        let pts: Vec<(usize, f64)> = rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                r["postgres_reference_ms"][key]
                    .as_f64()
                    .map(|v| (i, v.max(0.1)))
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        chart
            .draw_series(pts.iter().map(|&p| Cross::new(p, 7, color.stroke_width(2))))?
            .label(name)
            .legend(move |(x, y)| Cross::new((x + 10, y), 5, color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

/// Fan-out: last-subscriber p50/p99 against the change rate.
fn fan_out(area: &Area, doc: &Value) -> anyhow::Result<()> {
    let rows: Vec<&Value> = doc["fan-out"]["rows"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let conns = doc["fan-out"]["connections"].as_u64().unwrap_or(0);
    let maxx = rows
        .iter()
        .filter_map(|r| r["rate"].as_f64())
        .fold(1.0f64, f64::max);
    let maxy = rows
        .iter()
        .filter_map(|r| r["last_subscriber_ms"]["p99"].as_f64())
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("fan-out: last of {conns} subscribers (ms)"),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((0.8f64..maxx * 1.3).log_scale(), 0f64..maxy * 1.2)?;
    chart
        .configure_mesh()
        .x_labels(8)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("changes per second (log)")
        .y_desc("ms")
        .draw()?;
    for (k, key) in ["p50", "p99"].iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|r| Some((r["rate"].as_f64()?, r["last_subscriber_ms"][key].as_f64()?)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(format!("last subscriber {key}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

/// Filtered routing: Aether CPU µs per change against the subscription count.
fn routing(area: &Area, doc: &Value) -> anyhow::Result<()> {
    let rows: Vec<(f64, f64)> = doc["filtered-routing"]["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            Some((
                r["subscriptions"].as_f64()?.max(10.0),
                r["aether_cpu_us_per_change"].as_f64()?,
            ))
        })
        .collect();
    let maxx = rows.iter().map(|r| r.0).fold(100.0f64, f64::max);
    let maxy = rows.iter().map(|r| r.1).fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "filtered-routing: Aether CPU per change (µs)",
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((5f64..maxx * 2.0).log_scale(), 0f64..maxy * 1.3)?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("subscriptions (log; 10 = none)")
        .y_desc("CPU µs / change")
        .draw()?;
    let color = Palette99::pick(2).to_rgba();
    chart.draw_series(LineSeries::new(rows.clone(), color.stroke_width(2)))?;
    chart.draw_series(rows.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    Ok(())
}

/// Throughput: events/s of the catch-up and decode measurements.
fn throughput(area: &Area, doc: &Value) -> anyhow::Result<()> {
    let bars: Vec<(String, f64)> = [
        (
            "pg_recvlogical",
            &doc["catch-up"]["pg_recvlogical"]["events_per_s"],
        ),
        (
            "aether catch-up",
            &doc["catch-up"]["aether"]["events_per_s"],
        ),
        (
            "decode+assemble",
            &doc["decode"]["decode_assemble_events_per_s"],
        ),
        ("big-tx", &doc["big-tx"]["events_per_s_after_first"]),
    ]
    .into_iter()
    .filter_map(|(n, v)| Some((n.to_owned(), v.as_f64()? / 1000.0)))
    .collect();
    let maxy = bars.iter().map(|b| b.1).fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption("throughput (thousand events/s)", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((0..bars.len().max(1)).into_segmented(), 0f64..maxy * 1.15)?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .x_labels(bars.len().max(1))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc("k events/s")
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let color = Palette99::pick(i).to_rgba();
        let mut r = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), b.1),
            ],
            color.filled(),
        );
        r.set_margin(0, 0, 20, 20);
        r
    }))?;
    Ok(())
}
