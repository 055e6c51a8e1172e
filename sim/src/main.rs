//! `factum-sim`: run chaos scenarios against a simulated factum cluster.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use factum_sim::scenario::{self, Scenario};

/// Run factum chaos scenarios in a deterministic simulation.
#[derive(Debug, Parser)]
#[command(name = "factum-sim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one scenario from one seed; prints the trace hash.
    Run {
        /// Scenario file.
        scenario: PathBuf,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print the timeline of events.
        #[arg(long)]
        trace: bool,
    },
    /// Replay a seed and print its timeline (same as `run --trace`).
    Replay {
        /// Scenario file.
        scenario: PathBuf,
        /// Seed.
        #[arg(long)]
        seed: u64,
    },
    /// Run every scenario in a directory over many seeds; prints failures with their seeds.
    Sweep {
        /// Directory of `*.toml` scenarios.
        #[arg(default_value = "scenarios")]
        dir: PathBuf,
        /// Seeds per scenario.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// First seed.
        #[arg(long, default_value_t = 1)]
        start: u64,
    },
}

fn run_one(path: &std::path::Path, seed: u64, trace: bool) -> ExitCode {
    let scenario = match Scenario::load(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match scenario::run(&scenario, seed) {
        Ok(outcome) => {
            if trace {
                for line in &outcome.timeline {
                    println!("{line}");
                }
            }
            println!("ok: {} seed {seed}: {} events, trace hash {}", scenario.name, outcome.events, outcome.trace_hash);
            for (point, c) in &outcome.coverage {
                println!(
                    "  fault point {point:<28} enabled {:<5} reached {:>5} fired {:>4}",
                    c.enabled, c.reached, c.fired
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if trace {
                for line in &e.timeline {
                    println!("{line}");
                }
            }
            eprintln!("FAILED: {e}");
            eprintln!("replay: factum-sim replay {} --seed {seed}", path.display());
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    match Cli::parse().command {
        Command::Run { scenario, seed, trace } => run_one(&scenario, seed, trace),
        Command::Replay { scenario, seed } => run_one(&scenario, seed, true),
        Command::Sweep { dir, seeds, start } => {
            let scenarios = match scenario::load_dir(&dir) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let began = Instant::now();
            let mut runs = 0u64;
            let mut failures = 0u64;
            let mut simulated = std::time::Duration::ZERO;
            // point -> (runs that reached it, total fired)
            let mut coverage: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
            for (path, scenario) in &scenarios {
                for seed in start..start + seeds {
                    runs += 1;
                    simulated += scenario.duration;
                    match scenario::run(scenario, seed) {
                        Ok(outcome) => {
                            for (point, c) in outcome.coverage {
                                let entry = coverage.entry(point).or_default();
                                entry.0 += 1;
                                entry.1 += c.fired;
                            }
                        }
                        Err(e) => {
                            failures += 1;
                            eprintln!("FAILED: {e}\n  replay: factum-sim replay {path} --seed {seed}");
                        }
                    }
                }
            }
            let secs = began.elapsed().as_secs_f64();
            println!(
                "{runs} runs, {failures} failed, {secs:.1} s, {:.1} seeds/s, simulated/real time {:.0}x",
                runs as f64 / secs,
                simulated.as_secs_f64() / secs
            );
            for (point, (reached_in, fired)) in &coverage {
                println!("  fault point {point:<28} reached in {reached_in:>5} runs, fired {fired:>6} times");
            }
            if failures == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
