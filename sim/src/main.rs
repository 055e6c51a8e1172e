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
        /// Parallel workers.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
    },
    /// Swarm testing: a random scenario per seed (faults, starts, revokes), checked for safety and
    /// convergence; a failure is shrunk to fewer steps and printed as a scenario file to replay.
    Swarm {
        /// Number of seeds.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// Stop starting new seeds after this much real time (a time-boxed sweep; `--seeds` is then an upper
        /// bound). Every run started is finished.
        #[arg(long = "for")]
        time_box: Option<humantime::Duration>,
        /// First seed.
        #[arg(long, default_value_t = 1)]
        start: u64,
        /// Agents per cluster.
        #[arg(long, default_value_t = 3)]
        agents: usize,
        /// Simulated duration of each run.
        #[arg(long, default_value = "40s")]
        duration: humantime::Duration,
        /// Parallel workers.
        #[arg(long, default_value_t = 2)]
        jobs: usize,
    },
}

/// One run of a sweep.
struct Job {
    /// The command that runs this job alone.
    replay: String,
    scenario: Scenario,
    seed: u64,
}

/// Runs `jobs` on `workers` threads (each simulation is single-threaded and deterministic on its own); returns
/// the results in job order.
fn run_parallel(
    jobs: &[Job],
    workers: usize,
    deadline: Option<Instant>,
) -> Vec<Result<factum_sim::Outcome, scenario::Failure>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<Option<Result<factum_sim::Outcome, scenario::Failure>>>> =
        std::sync::Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..workers.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return;
                }
                let Some(job) = jobs.get(i) else { return };
                let result = scenario::run(&job.scenario, job.seed);
                if let Err(e) = &result {
                    eprintln!("FAILED: {e}\n  replay: {}", job.replay);
                }
                if let Some(slot) = results.lock().unwrap_or_else(|p| p.into_inner()).get_mut(i) {
                    *slot = Some(result);
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|p| p.into_inner()).into_iter().flatten().collect()
}

/// Prints throughput, fault-point coverage and the sometimes-goals reached by a finished sweep (`results` are
/// the first runs of `jobs`); returns the number of failures.
fn summarize(jobs: &[Job], results: &[Result<factum_sim::Outcome, scenario::Failure>], secs: f64) -> usize {
    let jobs = jobs.get(..results.len()).unwrap_or(jobs);
    let simulated: f64 = jobs.iter().map(|j| j.scenario.duration.as_secs_f64()).sum();
    let failures = results.iter().filter(|r| r.is_err()).count();
    println!(
        "{} runs, {failures} failed, {secs:.1} s, {:.1} seeds/s, simulated/real time {:.0}x",
        jobs.len(),
        jobs.len() as f64 / secs,
        simulated / secs
    );
    let mut coverage: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for outcome in results.iter().flatten() {
        for (point, c) in &outcome.coverage {
            let entry = coverage.entry(point.clone()).or_default();
            entry.0 += 1;
            entry.1 += c.fired;
        }
    }
    for (point, (reached_in, fired)) in &coverage {
        println!("  fault point {point:<28} reached in {reached_in:>5} runs, fired {fired:>6} times");
    }
    let mut goals: std::collections::BTreeMap<&str, usize> = Default::default();
    for outcome in results.iter().flatten() {
        for goal in factum_sim::sometimes::reached(&outcome.timeline) {
            *goals.entry(goal).or_default() += 1;
        }
    }
    for goal in factum_sim::sometimes::GOALS {
        let runs = goals.get(goal.name).copied().unwrap_or(0);
        let mark = if runs == 0 { "  (never reached)" } else { "" };
        println!("  sometimes {:<32} reached in {runs:>5} runs{mark}", goal.name);
    }
    failures
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
        Command::Sweep { dir, seeds, start, jobs } => {
            let scenarios = match scenario::load_dir(&dir) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let work: Vec<Job> = scenarios
                .iter()
                .flat_map(|(path, scenario)| {
                    (start..start + seeds).map(move |seed| Job {
                        replay: format!("factum-sim replay {path} --seed {seed}"),
                        scenario: scenario.clone(),
                        seed,
                    })
                })
                .collect();
            let began = Instant::now();
            let results = run_parallel(&work, jobs, None);
            let failures = summarize(&work, &results, began.elapsed().as_secs_f64());
            if failures == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Swarm { seeds, time_box, start, agents, duration, jobs } => {
            if let Some(limit) = time_box {
                println!("swarm from seed {start} for {limit} (at most {seeds} seeds)");
            }
            let began = Instant::now();
            let deadline = time_box.map(|limit| began + *limit);
            // Drawn in chunks, so a large `--seeds` under `--for` never builds more scenarios than it runs.
            let (mut work, mut results) = (Vec::new(), Vec::new());
            let mut next = start;
            while next < start.saturating_add(seeds) && deadline.is_none_or(|d| Instant::now() < d) {
                let end = next.saturating_add(64).min(start.saturating_add(seeds));
                let chunk: Vec<Job> = (next..end)
                    .map(|seed| Job {
                        replay: format!(
                            "factum-sim swarm --seeds 1 --agents {agents} --duration {duration} --start {seed}"
                        ),
                        scenario: Scenario::swarm(seed, agents, *duration),
                        seed,
                    })
                    .collect();
                let ran = run_parallel(&chunk, jobs, deadline);
                work.extend(chunk.into_iter().take(ran.len()));
                results.extend(ran);
                next = end;
            }
            let failures = summarize(&work, &results, began.elapsed().as_secs_f64());
            for (job, result) in work.iter().zip(&results) {
                if result.is_err() {
                    let shrunk = job.scenario.shrink(job.seed);
                    println!(
                        "# seed {} shrunk from {} to {} steps; save as a .toml and run with `factum-sim replay FILE --seed {}`",
                        job.seed,
                        job.scenario.steps.len(),
                        shrunk.steps.len(),
                        job.seed
                    );
                    println!("{}", shrunk.to_toml());
                }
            }
            if failures == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
