//! `aether-bench`: the benchmark instrument (issue 7).
//!
//! `cargo run --release -p aether-bench -- <scenario> [--quick]` starts its own
//! PostgreSQL (the embedded launcher, `fsync=off`), runs the release `aether` binary as
//! a separate process (so its CPU and RSS are read from `/proc/<pid>` apart from the
//! load), and drives the workload from a third process: this binary re-executed with
//! the hidden `load` subcommand. Each scenario prints a table and a JSON document;
//! the reference of a scenario (pg_recvlogical for catch-up) is measured in the same run.
//!
//! This is an instrument, not a test: nothing here asserts on timings.
// A benchmark stops with a message on a broken setup; it answers no client.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod chart;
mod cluster;
mod env;
mod http;
mod load;
mod logbench;
mod proc;
mod report;
mod rest;
mod row_security;
mod scenarios;
mod soak;
mod stats;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Aether benchmarks: see BENCHMARKS.md")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    /// Small sizes: each scenario finishes in about a minute.
    #[arg(long)]
    pub quick: bool,
    /// Also write the scenario's JSON result to this file (merged by scenario name).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where clusters and logs go (must be reachable by the postgres account).
    #[arg(long, default_value = "/tmp")]
    pub work_dir: PathBuf,
    /// Keep the cluster directory and logs after the run.
    #[arg(long)]
    pub keep: bool,
    /// WS_QUEUE_CAPACITY for the catch-up and big-tx runs (Aether's default).
    #[arg(long, default_value_t = 1024)]
    pub ws_queue_capacity: usize,
    /// catch-up: number of 1,000-row transactions (default 1,000; 100 with --quick).
    #[arg(long)]
    pub catch_up_txs: Option<u64>,
    /// Put Aether's DATA_DIR (and so its change log) under this directory instead of
    /// next to the cluster: e.g. /dev/shm, where fsync costs nothing, to isolate the
    /// log's disk cost.
    #[arg(long)]
    pub aether_data_dir: Option<PathBuf>,
    /// The `aether` binary to measure (default: the one next to aether-bench), e.g.
    /// an older build for before/after numbers on the same machine.
    #[arg(long)]
    pub aether_bin: Option<PathBuf>,
    /// catch-up, big-tx: run Aether with ENABLE_METRICS and report the change log's
    /// append and fsync histograms and the hot tail's bytes (Prometheus).
    #[arg(long)]
    pub metrics: bool,
    /// catch-up, big-tx: an extra Aether setting, `KEY=VALUE` (repeatable), e.g.
    /// `--aether-env RESUME_MEMORY_BYTES=4294967296`.
    #[arg(long = "aether-env", value_parser = key_value)]
    pub aether_env: Vec<(String, String)>,
    /// soak: the seed of the kill schedule (default: from the clock; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// soak: number of kills (default 40; 8 with --quick).
    #[arg(long)]
    pub kills: Option<usize>,
    /// fan-out: the change rates to step through, e.g. `1,2,5` (default: the
    /// scenario's whole ladder).
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<f64>,
    /// fan-out: seconds at each rate (default 10; 4 with --quick). At 1 change/s
    /// ten changes make the p99 the maximum; 100 s gives a p99 of its own.
    #[arg(long)]
    pub seconds: Option<f64>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

impl RunArgs {
    /// Aether settings for the catch-up and big-tx runs: the queue capacity, the
    /// `--aether-env` ones, and the metrics port with `--metrics`.
    #[allow(clippy::type_complexity)]
    pub fn aether_settings(&self) -> anyhow::Result<(Option<u16>, Vec<(&str, String)>)> {
        let mut v: Vec<(&str, String)> =
            vec![("WS_QUEUE_CAPACITY", self.ws_queue_capacity.to_string())];
        v.extend(self.aether_env.iter().map(|(k, x)| (k.as_str(), x.clone())));
        let mut port = None;
        if self.metrics {
            let (p, m) = env::metrics_settings()?;
            port = Some(p);
            v.extend(m);
        }
        Ok((port, v))
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Backlog committed while Aether is stopped, then drained: Aether vs pg_recvlogical.
    CatchUp(RunArgs),
    /// One-row commits at fixed rates; latency from send time to receipt.
    LiveLatency(RunArgs),
    /// Many connections on one table; one change per second, then rising.
    FanOut(RunArgs),
    /// 100 to 100,000 subscriptions on distinct equality filters; CPU per change.
    FilteredRouting(RunArgs),
    /// One big UPDATE; time to first and last event and peak RSS.
    BigTx(RunArgs),
    /// Sign-ins per second (argon2-bound) and a 1 GiB upload and download.
    Rest(RunArgs),
    /// In-process: pgoutput decode + Assembler on real pgoutput messages.
    Decode(RunArgs),
    /// In-process: the local change log alone (append + fsync, recovery, reads).
    Changelog(RunArgs),
    /// Aether killed (SIGKILL, SIGTERM) and restarted under a steady writer; a
    /// resuming follower must get every row exactly once, in order.
    Soak(RunArgs),
    /// Three nodes on one nats-server (JetStream): the leader's CPU per change
    /// with 1 and 3 nodes, fan-out across the nodes, leader failover (SIGKILL).
    Cluster(RunArgs),
    /// 100 to 10,000 users, a connection each, on tables authorized by RLS:
    /// CPU per change for a compiled policy, for one PostgreSQL evaluates, and
    /// for one query per subscriber per change.
    RowSecurity(RunArgs),
    /// Every scenario in turn (not `cluster` or `changelog`), results merged
    /// into one JSON file.
    All(RunArgs),
    /// Draws the PNG chart from a results JSON file.
    Chart {
        #[arg(long, default_value = "docs/bench/results.json")]
        input: PathBuf,
        #[arg(long, default_value = "docs/bench/latency.png")]
        output: PathBuf,
    },
    /// The load process (internal).
    #[command(hide = true)]
    Load {
        #[arg(long)]
        spec: String,
    },
    /// fan-out's bare-socket floor: a server that only writes (internal).
    #[command(hide = true)]
    NullServer {
        #[arg(long)]
        frame_bytes: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BENCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    proc::raise_nofile();
    match cli.command {
        Cmd::Load { spec } => load::main(&spec),
        Cmd::NullServer { frame_bytes } => load::null_server(frame_bytes),
        Cmd::Chart { input, output } => chart::draw(&input, &output),
        Cmd::CatchUp(a) => scenarios::run("catch-up", &a),
        Cmd::LiveLatency(a) => scenarios::run("live-latency", &a),
        Cmd::FanOut(a) => scenarios::run("fan-out", &a),
        Cmd::FilteredRouting(a) => scenarios::run("filtered-routing", &a),
        Cmd::BigTx(a) => scenarios::run("big-tx", &a),
        Cmd::Rest(a) => scenarios::run("rest", &a),
        Cmd::Decode(a) => scenarios::run("decode", &a),
        Cmd::Changelog(a) => logbench::run(&a),
        Cmd::Soak(a) => scenarios::run("soak", &a),
        Cmd::Cluster(a) => scenarios::run("cluster", &a),
        Cmd::RowSecurity(a) => scenarios::run("row-security", &a),
        Cmd::All(a) => {
            for name in [
                "decode",
                "catch-up",
                "live-latency",
                "filtered-routing",
                "big-tx",
                "fan-out",
                "rest",
                "soak",
            ] {
                scenarios::run(name, &a)?;
            }
            Ok(())
        }
    }
}
