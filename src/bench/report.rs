//! The figures of a run: what is printed, what goes into the JSON report, and the verdict on
//! each target.

use serde_json::{Value as J, json};

pub(super) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    if xs.is_empty() { 0.0 } else { xs[xs.len() / 2] }
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub(super) struct Figures {
    pub(super) json: serde_json::Map<String, J>,
    lines: Vec<(String, String, String, String)>,
}

impl Figures {
    pub(super) fn new() -> Figures {
        Figures { json: serde_json::Map::new(), lines: Vec::new() }
    }

    pub(super) fn line(&mut self, figure: &str, crmsync: String, raw: String, ratio: String) {
        self.lines.push((figure.to_owned(), crmsync, raw, ratio));
    }

    pub(super) fn set(&mut self, key: &str, value: J) {
        self.json.insert(key.to_owned(), value);
    }
}

pub(super) fn rate(n: f64, secs: f64) -> f64 {
    if secs > 0.0 { n / secs } else { 0.0 }
}

pub(super) fn fmt_rate(r: f64) -> String {
    let r = r.round() as u64;
    let s = r.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(super) fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// Each target of the benchmark beside what this run measured: (target, measured, met).
pub(super) fn targets(report: &serde_json::Map<String, J>) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    let f = |v: &J, path: &str| v.pointer(path).and_then(J::as_f64).unwrap_or(0.0);
    for size in report.get("sizes").and_then(J::as_array).cloned().unwrap_or_default() {
        let n = size["contacts"].as_u64().unwrap_or(0);
        for (key, label) in [("rebuild_100", "100 %"), ("rebuild_10", "10 %")] {
            let ratio = f(&size, &format!("/{key}/ratio"));
            let gap = if ratio < 0.8 { format!(" ({:.0} points short)", (0.8 - ratio) * 100.0) } else { String::new() };
            out.push((
                format!("rebuild of a {label} set at {n} contacts >= 80 % of raw"),
                format!("{}{gap}", pct(ratio)),
                ratio >= 0.8,
            ));
        }
        if n >= 1_000_000 {
            let secs = f(&size, "/rebuild_100/seconds");
            let raw = f(&size, "/rebuild_100/raw_seconds");
            out.push((
                format!("rebuild of {n} contacts < 10 s"),
                format!("{secs:.1} s (the raw baseline alone: {raw:.1} s)"),
                secs < 10.0,
            ));
            let mem = f(&size, "/memory_bytes/remote_peak") / 1e6;
            out.push((
                "remote memory while rebuilding 1,000,000 contacts < 100 MB".into(),
                format!("{mem:.0} MB"),
                mem < 100.0,
            ));
            let p99 = f(&size, "/rebuild_100/read_p99_ms");
            out.push((
                "remote API p99 while rebuilding 1,000,000 contacts < 50 ms".into(),
                format!("{p99:.1} ms"),
                p99 < 50.0,
            ));
        }
        let (p50, p99) = (f(&size, "/latency_ms/p50"), f(&size, "/latency_ms/p99"));
        out.push((
            format!("change-to-remote latency at {n} contacts, 1,000/s: p50 < 3 ms, p99 < 15 ms"),
            format!("{p50:.2} / {p99:.2} ms"),
            p50 < 3.0 && p99 < 15.0,
        ));
    }
    if let Some(commit) = report.get("commit") {
        let path = f(commit, "/sets_10/write_path_per_second") / f(commit, "/sets_10/raw_publish_per_second").max(1.0);
        let http = f(commit, "/sets_10/http_per_second") / f(commit, "/sets_10/raw_publish_per_second").max(1.0);
        out.push(("commit with 10 sets >= 50 % of bare publish (write path)".into(), pct(path), path >= 0.5));
        out.push(("commit with 10 sets >= 50 % of bare publish (HTTP)".into(), pct(http), http >= 0.5));
    }
    out
}

pub(super) fn machine() -> J {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    json!({ "cores": cores, "cpu": cpu })
}

pub(super) fn print_table(title: &str, figures: &Figures) {
    println!();
    println!("{title}");
    println!("{:<44} {:>22} {:>26} {:>8}", "figure", "crmsync", "raw baseline (same run)", "ratio");
    for (figure, crmsync, raw, ratio) in &figures.lines {
        println!("{figure:<44} {crmsync:>22} {raw:>26} {ratio:>8}");
    }
}
