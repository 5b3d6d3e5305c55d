//! Benchmarks and the synthetic Debezium events they run on.
//!
//! - [`synthetic`]: a seeded generator of realistic Debezium messages (the
//!   real connector's shapes, schemas on and off) for the four tables, and a
//!   producer that writes them straight into Kafka topics
//!   (`etl-tools produce`).
//! - [`core`]: decode + aggregate on one thread, against a naive
//!   `serde_json::Value` baseline (`etl-tools bench core`).
//! - [`pipeline`]: the whole processor, from a preloaded topic to flushed
//!   aggregates in ClickHouse, against a bare consumer reading the same
//!   topics (`etl-tools bench pipeline`).
//! - [`freshness`]: Postgres commit -> visible in ClickHouse under steady
//!   load, through the real stack (`etl-tools bench freshness`).
//! - [`memory`]: resident memory with 1,000,000 live keys and while
//!   ClickHouse is down (cut by the [`outage`] relay) (`bench memory`).
//! - [`history`]: restart time, memory and rates in front of a year of
//!   stored aggregates, against an empty history (`bench history`).
//!
//! Each bench prints a progress line to stderr about once a second
//! ([`Progress`]) and its figures as a small aligned table to stdout
//! ([`print_table`]), and returns its [`Verdict`]s on the goals;
//! [`all`] (`etl-tools bench all`) runs every bench and ends with them.

pub mod core;
pub mod freshness;
pub mod history;
pub mod memory;
pub mod outage;
pub mod pipeline;
pub mod synthetic;

use std::io::Write as _;
use std::time::{Duration, Instant};

use etl::config::Config;

/// One performance goal as a bench measured it.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub goal: String,
    pub measured: String,
    /// None where the run was too small to judge (e.g. fewer keys).
    pub met: Option<bool>,
}

impl Verdict {
    pub fn new(goal: impl Into<String>, measured: impl Into<String>, met: Option<bool>) -> Self {
        Verdict {
            goal: goal.into(),
            measured: measured.into(),
            met,
        }
    }
}

pub fn print_verdicts(verdicts: &[Verdict]) {
    let rows: Vec<Vec<String>> = verdicts
        .iter()
        .map(|v| {
            let met = match v.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "n/a",
            };
            vec![v.goal.clone(), v.measured.clone(), met.to_owned()]
        })
        .collect();
    print_table(&["goal", "measured", "met"], &rows);
}

#[derive(Debug, Clone, clap::Args)]
pub struct AllArgs {
    /// Every bench at a small size: checks that they run and agree with
    /// ClickHouse, in about half a minute; its figures are not measurements.
    #[arg(long)]
    pub smoke: bool,
}

/// Every bench in one run, each with its defaults (the pipeline with one
/// process besides the in-process run), then the goals they measured.
/// Needs the whole stack, as `bench freshness` does.
pub fn all(args: &AllArgs, config: &Config) -> anyhow::Result<Vec<Verdict>> {
    // The flags of a smoke run; none (the defaults) otherwise.
    let sizes = |smoke: &[&'static str]| -> Vec<&'static str> {
        if args.smoke {
            smoke.to_vec()
        } else {
            Vec::new()
        }
    };
    let mut verdicts = Vec::new();
    section("core");
    verdicts.extend(core::run(parsed(&sizes(&[
        "--events",
        "20000",
        "--repeats",
        "1",
    ])))?);
    section("pipeline");
    let mut pipeline_args = vec!["--instances", "1"];
    pipeline_args.extend(sizes(&["--events", "40000", "--partitions", "8"]));
    verdicts.extend(pipeline::run(parsed(&pipeline_args), config)?);
    section("freshness");
    let freshness_args: freshness::FreshnessArgs = parsed(&sizes(&["--seconds", "5"]));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let measured = runtime.block_on(freshness::run(&freshness_args, config))?;
    drop(runtime);
    measured.print(&freshness_args);
    verdicts.push(measured.verdict());
    section("memory");
    verdicts.extend(memory::run(
        parsed(&sizes(&[
            "--keys",
            "5000",
            "--partitions",
            "8",
            "--outage-secs",
            "3",
        ])),
        config,
    )?);
    section("history");
    verdicts.extend(history::run(
        parsed(&sizes(&[
            "--months",
            "1",
            "--events",
            "20000",
            "--steady-events",
            "20000",
            "--late-events",
            "5000",
        ])),
        config,
    )?);
    section("goals");
    print_verdicts(&verdicts);
    Ok(verdicts)
}

fn section(name: &str) {
    println!("\n== bench {name}");
    eprintln!("bench all: {name}");
}

/// A bench's arguments: its defaults, then `flags`.
fn parsed<T: clap::Args + clap::FromArgMatches>(flags: &[&str]) -> T {
    let command = T::augment_args(clap::Command::new("bench"));
    let matches = command
        .try_get_matches_from(std::iter::once("bench").chain(flags.iter().copied()))
        .expect("bench all passes valid flags");
    T::from_arg_matches(&matches).expect("bench all passes valid flags")
}

/// A progress line on stderr, at most about once a second, while a bench
/// phase runs: `[phase] 1,234,567 events, 456,789/s`.
pub struct Progress {
    phase: String,
    started: Instant,
    last_print: Instant,
    /// Events done at the last print, for the rate since then.
    last_done: u64,
    printed: bool,
}

const PROGRESS_EVERY: Duration = Duration::from_secs(1);

impl Progress {
    pub fn new(phase: impl Into<String>) -> Progress {
        let now = Instant::now();
        Progress {
            phase: phase.into(),
            started: now,
            last_print: now,
            last_done: 0,
            printed: false,
        }
    }

    /// Cheap to call per event: it only reads the clock every 4096 calls
    /// unless `done` jumps by more.
    pub fn tick(&mut self, done: u64) {
        if done.wrapping_sub(self.last_done) < 4096 && done % 4096 != 0 {
            return;
        }
        let now = Instant::now();
        let since = now.duration_since(self.last_print);
        if since < PROGRESS_EVERY {
            return;
        }
        let rate = (done.saturating_sub(self.last_done)) as f64 / since.as_secs_f64();
        eprintln!(
            "[{}] {} events, {}/s",
            self.phase,
            thousands(done),
            thousands(rate as u64)
        );
        self.last_print = now;
        self.last_done = done;
        self.printed = true;
    }

    /// A last line with the whole phase's rate, if anything was printed
    /// (short phases stay quiet).
    pub fn finish(&self, done: u64) {
        if !self.printed {
            return;
        }
        let took = self.started.elapsed();
        eprintln!(
            "[{}] done: {} events in {:.2} s, {}/s",
            self.phase,
            thousands(done),
            took.as_secs_f64(),
            thousands((done as f64 / took.as_secs_f64()) as u64)
        );
    }
}

/// `1234567` -> `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints `rows` under `header` with every column padded to its widest
/// cell: the first column left-aligned, the others right-aligned.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let columns = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i > 0 {
                out.push_str("  ");
            }
            if i == 0 {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad));
            } else {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            }
        }
        out.trim_end().to_owned()
    };
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", line(header.to_vec()));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    let _ = writeln!(
        stdout,
        "{}",
        line(rule.iter().map(String::as_str).collect())
    );
    for row in rows {
        let _ = writeln!(stdout, "{}", line(row.iter().map(String::as_str).collect()));
    }
    let _ = stdout.flush();
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` has them
/// (`n/a` where it cannot be read): benches share the machine.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "n/a".to_owned())
}

/// The CPUs this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The median of a few measurements (the upper one of the middle two).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn bench_all_gives_each_bench_its_defaults_and_its_flags() {
        let core: core::Args = parsed(&["--events", "20000"]);
        assert_eq!((core.events, core.repeats, core.keys), (20_000, 3, 10_000));
        let pipeline: pipeline::Args = parsed(&["--instances", "1"]);
        assert_eq!((pipeline.instances, pipeline.events), (vec![1], 1_000_000));
        let history: history::HistoryArgs = parsed(&["--months", "1"]);
        assert_eq!(
            (
                history.months,
                history.events,
                history.steady_events,
                history.late_events,
                history.products,
                history.timeout_secs,
                history.processor
            ),
            (1, 100_000, 400_000, 40_000, 10_000, 600, None)
        );
    }

    #[test]
    fn the_median_of_three_is_the_middle_one() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[5.0]), 5.0);
    }
}
