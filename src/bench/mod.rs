//! `crmsync bench`: how fast a remote is ready and how soon a change arrives, each figure
//! beside the raw limit of NATS and redb measured in the same run on the same machine.
//!
//! Everything runs for real: a nats-server of its own, the main and the remote as separate
//! `crmsync` processes (so their memory can be read), driven through their HTTP APIs. The
//! figures are medians of `--runs` runs. Nothing here asserts a timing; the output says where
//! a target is met or missed.

mod commit;
mod data_set;
mod raw;
mod report;
mod scale;
mod services;

use anyhow::Context;
use serde_json::{Value as J, json};

use commit::{commit_figures, routing_figures};
use data_set::data_set_figures;
use report::{Figures, machine, print_table, targets};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Contacts at the main, one data set each (companies, groups, notes and memberships come with them).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    pub contacts: Vec<usize>,
    /// Runs per figure; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Changes committed per commit figure.
    #[arg(long, default_value_t = 4000)]
    pub commit_changes: usize,
    /// Changes timed from the main's API to the remote's.
    #[arg(long, default_value_t = 1000)]
    pub latency_changes: usize,
    /// Concurrent HTTP clients writing to the main.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// A tiny run that only shows the benchmark works (for CI).
    #[arg(long)]
    pub smoke: bool,
    /// Only the commit and routing figures (no data sets).
    #[arg(long)]
    pub commit_only: bool,
    /// Only the scale simulation: --scale-sets sets and --scale-remotes remotes on one
    /// nats-server and one main.
    #[arg(long)]
    pub scale: bool,
    /// Sets of the scale simulation.
    #[arg(long, default_value_t = 1000)]
    pub scale_sets: usize,
    /// Remotes of the scale simulation (each with its consumer).
    #[arg(long, default_value_t = 10000)]
    pub scale_remotes: usize,
    /// Run nats-server with `sync_interval: always` (every message on disk before its
    /// acknowledgement), to measure what that costs.
    #[arg(long)]
    pub nats_sync_always: bool,
}

impl BenchArgs {
    fn effective(mut self) -> BenchArgs {
        if self.smoke {
            self.contacts = vec![1000];
            self.runs = 1;
            self.commit_changes = 200;
            self.latency_changes = 50;
            self.clients = 8;
            self.scale_sets = 20;
            self.scale_remotes = 100;
        }
        self.runs = self.runs.max(1);
        self
    }
}

pub async fn run(args: BenchArgs, as_json: bool) -> anyhow::Result<()> {
    let args = args.effective();
    let mut report = serde_json::Map::new();
    report.insert("machine".into(), machine());
    report.insert("runs".into(), args.runs.into());
    report.insert("seed".into(), args.seed.into());
    report.insert("nats_sync_always".into(), args.nats_sync_always.into());
    if args.scale {
        let mut figures = Figures::new();
        scale::scale_figures(&args, &mut figures).await.context("the scale simulation")?;
        routing_figures(&mut figures, args.scale_sets);
        if as_json {
            println!("{}", J::Object(figures.json));
        } else {
            print_table(&format!("scale: {} sets, {} remotes", args.scale_sets, args.scale_remotes), &figures);
        }
        return Ok(());
    }
    let mut sizes = Vec::new();
    let data_sets = if args.commit_only { &[][..] } else { &args.contacts[..] };
    for &n in data_sets {
        eprintln!("bench: {n} contacts …");
        let mut figures = Figures::new();
        data_set_figures(&args, n, &mut figures).await.with_context(|| format!("benchmarking {n} contacts"))?;
        if !as_json {
            print_table(&format!("{n} contacts"), &figures);
        }
        figures.json.insert("contacts".into(), n.into());
        sizes.push(J::Object(figures.json));
    }
    report.insert("sizes".into(), sizes.into());
    eprintln!("bench: commit …");
    let mut figures = Figures::new();
    commit_figures(&args, &mut figures).await.context("benchmarking commits")?;
    routing_figures(&mut figures, 100);
    if !as_json {
        print_table("commit and routing", &figures);
    }
    report.insert("commit".into(), J::Object(figures.json));
    let verdicts = targets(&report);
    if as_json {
        report.insert(
            "targets".into(),
            verdicts.iter().map(|v| json!({ "target": v.0, "value": v.1, "met": v.2 })).collect(),
        );
        println!("{}", J::Object(report));
    } else {
        println!();
        println!("targets (2 cores, nats-server on the same machine)");
        for (target, value, met) in &verdicts {
            println!("  {:<7} {target:<68} {value}", if *met { "met" } else { "MISSED" });
        }
    }
    Ok(())
}
