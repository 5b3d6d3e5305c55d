//! `etl-tools bench all --smoke`: every bench runs end to end against the
//! real stack and ends with a verdict on each goal. The sizes are small and
//! the build is a debug one, so the figures are not judged here; what is
//! checked is that each bench ran to its end, which includes the benches' own
//! checks (the pipeline's and memory runs' totals in ClickHouse equal the
//! events' totals, every partition committed, freshness markers seen), and
//! the history bench's exactness verdict.

use std::process::{Command as StdCommand, Stdio};
use std::time::Duration;

use tokio::process::Command;

#[tokio::test]
#[ignore = "needs the real stack: run scripts/test"]
async fn bench_all_runs_every_bench_and_judges_every_goal() {
    let stack = etl_testkit::Stack::load();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_etl-tools"));
    cmd.args(["bench", "all", "--smoke"])
        .envs(stack.vars())
        .env("ETL_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
        .await
        .expect("bench all --smoke did not finish in 10 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    println!("{stdout}");

    // The sections, in order, each with its own table.
    let mut at = 0;
    for section in [
        "core",
        "pipeline",
        "freshness",
        "memory",
        "history",
        "goals",
    ] {
        let header = format!("== bench {section}");
        let found = stdout[at..]
            .find(&header)
            .unwrap_or_else(|| panic!("no {header:?} after byte {at}:\n{stdout}"));
        at += found + header.len();
    }
    assert!(stdout.contains("totals in ClickHouse checked"), "{stdout}");

    // The goals table: one row per goal, in this order, each judged except
    // the 1,000,000-key one (a smoke run has 5,000 keys).
    let goals = &stdout[at..];
    let rows: Vec<&str> = goals
        .lines()
        .skip(3) // the blank line after the section header, the header, the rule
        .filter(|l| !l.trim().is_empty())
        .collect();
    let expected = [
        ("core: >= 1,000,000 schemas-off events/s per core", "yes|NO"),
        ("core: >= 2.5x the naive baseline, schemas off", "yes|NO"),
        ("core: >= 2.5x the naive baseline, schemas on", "yes|NO"),
        (
            "core: a flush costs what changed: 1M rows held within 2x of 10k",
            "yes|NO",
        ),
        (
            "pipeline: >= 70 % of a bare consumer (pipeline, in-process)",
            "yes|NO",
        ),
        (
            "pipeline: >= 70 % of a bare consumer (pipeline, 1 process(es))",
            "yes|NO",
        ),
        ("freshness: p99 <= flush interval + 250 ms", "yes|NO"),
        ("memory: RSS <= 256 MiB with 1,000,000 live keys", "n/a"),
        ("memory: flat while ClickHouse is down", "yes|NO"),
        // A smoke run's history is one month: its figures are not judged,
        // but its totals must be exact.
        ("history: memory after restart <= 256 MiB", "n/a"),
        ("history: memory under load <= 256 MiB", "n/a"),
        ("history: start to first commit <= 5 s", "n/a"),
        (
            "history: steady current-traffic events/s within 10 % of the empty history",
            "n/a",
        ),
        (
            "history: late burst events/s (old minutes, all cache misses)",
            "n/a",
        ),
        ("history: stored totals exact", "yes"),
    ];
    assert_eq!(rows.len(), expected.len(), "{goals}");
    for (row, (goal, verdicts)) in rows.iter().zip(expected) {
        assert!(row.starts_with(goal), "{row:?} is not {goal:?}\n{goals}");
        let met = row.rsplit(' ').next().unwrap();
        assert!(verdicts.split('|').any(|v| v == met), "{row:?}\n{goals}");
    }
}

/// `bench history` is wired into the CLI with its flags (no run: a run
/// needs the stack and writes millions of rows).
#[test]
fn bench_history_lists_its_flags() {
    let out = StdCommand::new(env!("CARGO_BIN_EXE_etl-tools"))
        .args(["bench", "history", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{help}");
    for flag in [
        "--months",
        "--products",
        "--events",
        "--steady-events",
        "--late-events",
        "--processor",
        "--timeout-secs",
        "--keep-databases",
    ] {
        assert!(help.contains(flag), "no {flag} in:\n{help}");
    }
}
