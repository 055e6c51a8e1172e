//! `factum-sim`: run chaos scenarios against a simulated factum cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use factum_sim::scenario::{self, Scenario};
use factum_sim::Backend;

/// Run factum chaos scenarios in a deterministic simulation.
#[derive(Debug, Parser)]
#[command(name = "factum-sim", version)]
struct Cli {
    /// The simulator: turmoil, or madsim in a build made with RUSTFLAGS="--cfg madsim" (see CI.md), where it is
    /// the default.
    #[arg(long, global = true, value_enum, default_value_t = Backend::default())]
    backend: Backend,
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
    /// Run every scenario in a directory over many seeds; prints failures with their seeds, and progress on stderr.
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
        /// Summary format: text, or json (one object on stdout, for tooling; failures still go to stderr).
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
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
        /// Summary format: text, or json (one object on stdout, for tooling; failures still go to stderr).
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// How `sweep` and `swarm` print their summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// Lines for people.
    Text,
    /// One JSON object.
    Json,
}

/// What a sweep or swarm found, as `-o json` prints it.
#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    runs: usize,
    failed: usize,
    seconds: f64,
    seeds_per_second: f64,
    simulated_per_real: f64,
    /// Each failure with the command that replays it (and, for a swarm, the failing scenario shrunk).
    failures: Vec<FailureSummary>,
    /// Fault point → runs it was reached in, times it fired.
    fault_points: BTreeMap<String, PointSummary>,
    /// Sometimes-goal → runs that reached it.
    sometimes: BTreeMap<String, usize>,
}

#[derive(Debug, Default, serde::Serialize)]
struct PointSummary {
    reached_in: u64,
    fired: u64,
}

#[derive(Debug, serde::Serialize)]
struct FailureSummary {
    message: String,
    replay: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    shrunk: Option<String>,
}

/// One run of a sweep.
struct Job {
    /// The command that runs this job alone.
    replay: String,
    scenario: Scenario,
    seed: u64,
    backend: Backend,
}

/// What a sweep keeps of a passed run until its summary: its fault-point coverage and the sometimes-goals it
/// reached. Kept whole, outcomes (timelines mostly) grew a 26,000-run sweep by 1.6 GB.
struct Passed {
    coverage: BTreeMap<String, factum_sim::buggify::PointCoverage>,
    goals: BTreeSet<&'static str>,
}

impl From<factum_sim::Outcome> for Passed {
    fn from(outcome: factum_sim::Outcome) -> Self {
        Passed { goals: factum_sim::sometimes::reached(&outcome.timeline), coverage: outcome.coverage }
    }
}

/// Runs `jobs` on `workers` threads (each simulation is single-threaded and deterministic on its own); returns
/// the results in job order.
fn run_parallel(
    jobs: &[Job],
    workers: usize,
    deadline: Option<Instant>,
    progress: Option<&Progress>,
) -> Vec<Result<Passed, scenario::Failure>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<Option<Result<Passed, scenario::Failure>>>> =
        std::sync::Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..workers.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return;
                }
                let Some(job) = jobs.get(i) else { return };
                let result = scenario::run_on(&job.scenario, job.seed, job.backend).map(Passed::from);
                if let Err(e) = &result {
                    eprintln!("FAILED: {e}\n  replay: {}", job.replay);
                }
                if let Some(progress) = progress {
                    progress.ran(result.is_err());
                }
                if let Some(slot) = results.lock().unwrap_or_else(|p| p.into_inner()).get_mut(i) {
                    *slot = Some(result);
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|p| p.into_inner()).into_iter().flatten().collect()
}

/// A long run's progress on stderr: a line each time another twentieth of the runs is done, so an hour-long
/// sweep shows it is moving and how it fares.
struct Progress {
    total: usize,
    began: Instant,
    done: std::sync::atomic::AtomicUsize,
    failed: std::sync::atomic::AtomicUsize,
}

impl Progress {
    fn new(total: usize) -> Self {
        Progress { total, began: Instant::now(), done: Default::default(), failed: Default::default() }
    }

    /// One run ended.
    fn ran(&self, failed: bool) {
        use std::sync::atomic::Ordering::SeqCst;
        let failed = self.failed.fetch_add(usize::from(failed), SeqCst) + usize::from(failed);
        let done = self.done.fetch_add(1, SeqCst) + 1;
        if done.is_multiple_of((self.total / 20).max(1)) || done == self.total {
            let secs = self.began.elapsed().as_secs_f64();
            eprintln!("{done}/{} runs, {failed} failed, {secs:.0} s, {:.1} runs/s", self.total, done as f64 / secs);
        }
    }
}

/// Throughput, failures, fault-point coverage and the sometimes-goals reached by a finished sweep (`results`
/// are the first runs of `jobs`).
fn summarize(jobs: &[Job], results: &[Result<Passed, scenario::Failure>], secs: f64) -> Summary {
    let jobs = jobs.get(..results.len()).unwrap_or(jobs);
    let simulated: f64 = jobs.iter().map(|j| j.scenario.duration.as_secs_f64()).sum();
    let mut summary = Summary {
        runs: jobs.len(),
        failed: results.iter().filter(|r| r.is_err()).count(),
        seconds: secs,
        seeds_per_second: jobs.len() as f64 / secs,
        simulated_per_real: simulated / secs,
        ..Summary::default()
    };
    for (job, result) in jobs.iter().zip(results) {
        match result {
            Ok(passed) => {
                for (point, c) in &passed.coverage {
                    let entry = summary.fault_points.entry(point.clone()).or_default();
                    entry.reached_in += 1;
                    entry.fired += c.fired;
                }
                for goal in &passed.goals {
                    *summary.sometimes.entry((*goal).to_string()).or_default() += 1;
                }
            }
            Err(e) => summary.failures.push(FailureSummary {
                message: e.message.clone(),
                replay: job.replay.clone(),
                shrunk: None,
            }),
        }
    }
    for goal in factum_sim::sometimes::GOALS {
        summary.sometimes.entry(goal.name.to_string()).or_default();
    }
    summary
}

/// Prints `summary` as `output` asks; the exit code says whether anything failed.
fn report(summary: &Summary, output: Output) -> ExitCode {
    match output {
        Output::Json => match serde_json::to_string_pretty(summary) {
            Ok(json) => println!("{json}"),
            Err(e) => eprintln!("error: cannot print the summary: {e}"),
        },
        Output::Text => {
            println!(
                "{} runs, {} failed, {:.1} s, {:.1} seeds/s, simulated/real time {:.0}x",
                summary.runs, summary.failed, summary.seconds, summary.seeds_per_second, summary.simulated_per_real
            );
            for (point, PointSummary { reached_in, fired }) in &summary.fault_points {
                println!("  fault point {point:<28} reached in {reached_in:>5} runs, fired {fired:>6} times");
            }
            for (goal, runs) in &summary.sometimes {
                let mark = if *runs == 0 { "  (never reached)" } else { "" };
                println!("  sometimes {goal:<32} reached in {runs:>5} runs{mark}");
            }
            for failure in summary.failures.iter().filter_map(|f| f.shrunk.as_ref().map(|s| (f, s))) {
                println!(
                    "# {}\n# shrunk; save as a .toml and run with `factum-sim replay FILE --seed <seed>`",
                    failure.0.message
                );
                println!("{}", failure.1);
            }
        }
    }
    if summary.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_one(path: &std::path::Path, seed: u64, trace: bool, backend: Backend) -> ExitCode {
    let scenario = match Scenario::load(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match scenario::run_on(&scenario, seed, backend) {
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
            eprintln!("replay: factum-sim{} replay {} --seed {seed}", flag(backend), path.display());
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    let cli = Cli::parse();
    let backend = cli.backend;
    if let Err(e) = backend.check() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match cli.command {
        Command::Run { scenario, seed, trace } => run_one(&scenario, seed, trace, backend),
        Command::Replay { scenario, seed } => run_one(&scenario, seed, true, backend),
        Command::Sweep { dir, seeds, start, jobs, output } => {
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
                        replay: format!("factum-sim{} replay {path} --seed {seed}", flag(backend)),
                        scenario: scenario.clone(),
                        seed,
                        backend,
                    })
                })
                .collect();
            let began = Instant::now();
            let results = run_parallel(&work, jobs, None, Some(&Progress::new(work.len())));
            report(&summarize(&work, &results, began.elapsed().as_secs_f64()), output)
        }
        Command::Swarm { seeds, time_box, start, agents, duration, jobs, output } => {
            if let Some(limit) = time_box.filter(|_| output == Output::Text) {
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
                            "factum-sim{} swarm --seeds 1 --agents {agents} --duration {duration} --start {seed}",
                            flag(backend)
                        ),
                        scenario: Scenario::swarm(seed, agents, *duration),
                        seed,
                        backend,
                    })
                    .collect();
                let ran = run_parallel(&chunk, jobs, deadline, None);
                work.extend(chunk.into_iter().take(ran.len()));
                results.extend(ran);
                next = end;
            }
            let mut summary = summarize(&work, &results, began.elapsed().as_secs_f64());
            let failed = work.iter().zip(&results).filter(|(_, r)| r.is_err()).map(|(job, _)| job);
            for (failure, job) in summary.failures.iter_mut().zip(failed) {
                let shrunk = job.scenario.shrink(job.seed, job.backend);
                failure.shrunk = Some(format!(
                    "# seed {} shrunk from {} to {} steps\n{}",
                    job.seed,
                    job.scenario.steps.len(),
                    shrunk.steps.len(),
                    shrunk.to_toml()
                ));
            }
            report(&summary, output)
        }
    }
}

/// The `--backend` flag that replays a run on `backend`: none only for turmoil in a build where it is the
/// default, so a printed replay line means the same run in a madsim build.
fn flag(backend: Backend) -> String {
    if backend == Backend::Turmoil && backend == Backend::default() {
        String::new()
    } else {
        format!(" --backend {backend}")
    }
}
