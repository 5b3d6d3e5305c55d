//! `etl-tools bench history`: the processor in front of a long store
//! history, against an empty one.
//!
//! 1. History: a year (`--months`) of stored aggregates written straight into
//!    a fresh ClickHouse database with `INSERT ... SELECT ... FROM numbers(n)`
//!    (server side, no events): every minute x 5 statuses x 8 partitions of
//!    orders_by_minute, every minute x 8 partitions of customers_by_minute,
//!    `--products` x 8 partitions of product_sales, and one row per
//!    (aggregate, partition) of source_marks. Every row claims offset 0 of its
//!    partition and a source position just below the synthetic stream's.
//! 2. Topics on the mock cluster, in this process: offset 0 of every
//!    partition is a tombstone (the stored rows claim that offset, so it must
//!    be an event the processor only observes), then the current traffic:
//!    synthetic events created now, no snapshot, seed 1: `--events` of
//!    warm-up, then `--steady-events` more of the same stream.
//! 3. One `etl-processor run` child process on an empty database (the
//!    baseline), then one on the history, each flushing (and committing)
//!    every 50 ms: start to first commit, to the warm-up committed (with a
//!    history, its keys are read back as they come), to every partition
//!    committed; events/s of the warm-up and of the steady part, VmRSS after
//!    the first commit (memory after a restart) and VmHWM (memory under
//!    load). With the history run
//!    still up, the late burst: `--late-events` events of orders and
//!    customers created in old minutes spread over the history (each one a
//!    key the history holds and memory does not), seed 2 (positions past the
//!    current traffic's), timed until committed.
//! 4. The stored totals are checked against the same events aggregated in
//!    this process, plus the history's own values where it has the key.
//!
//! A processor that keeps every stored row in memory loads the whole history
//! when its partitions are assigned: it may time out (each ClickHouse call
//! has a 30 s timeout) or take gigabytes. Each phase gives up after
//! `--timeout-secs`, and what happened (the exit status, the log's last
//! lines) is the measured outcome.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use chrono::{DateTime, Months, TimeZone as _, Utc};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};
use rust_decimal::Decimal;

use super::memory::{merged, mib, rss};
use super::pipeline::{check_retention, expected_totals, stored_totals, wait_committed, Ends};
use super::synthetic::{
    produce_from, Clock, Compression, Generator, Message, Produced, Schemas, Spec, FIRST_LSN,
};
use super::{load_average, print_table, thousands, Verdict};
use etl::cdc::Table;
use etl::config::Config;
use etl::replay::AllAggregates;
use etl::sink::ClickHouseSink;
use etl_testkit::{workspace_binary, MockBroker};

#[derive(Debug, Clone, clap::Args)]
pub struct HistoryArgs {
    /// Months of store history written into ClickHouse, ending a day ago
    /// (12: about 12.6 million rows; 1 for a quick run).
    #[arg(long, default_value_t = 12)]
    pub months: u32,
    /// Products with sales in the history (product_sales keys).
    #[arg(long, default_value_t = 10_000)]
    pub products: u64,
    /// The products current traffic sells (ids 1 to this), of `--products`:
    /// the hot set. A processor that has run for a while holds it; the
    /// warm-up reads it back, and the mock cluster's ~600,000 events cannot
    /// warm up more than a few thousand (product, partition) rows.
    #[arg(long, default_value_t = 1_000)]
    pub hot_products: u64,
    /// Current traffic: synthetic events created now, read by both runs.
    /// These first ones are the warm-up: with a history, their keys (the
    /// products sold, above all) are read back from it as they come.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Then more of the same stream (the same products, the minutes after):
    /// the steady state, timed between the commits of the warm-up's ends and
    /// of the stream's. The mock cluster keeps ~5 MB per partition: with the
    /// late burst, ~600,000 events fit in the 8 partitions.
    #[arg(long, default_value_t = 400_000)]
    pub steady_events: u64,
    /// Late events, produced while the history run is up: orders and
    /// customers created in old minutes, each a key the history holds.
    #[arg(long, default_value_t = 40_000)]
    pub late_events: u64,
    /// The processor binary to time (default: the etl-processor built
    /// beside this tool), e.g. an older build, for the baseline.
    #[arg(long)]
    pub processor: Option<PathBuf>,
    /// Give up a phase (start to first commit, to every partition committed,
    /// the late burst) after this many seconds: the processor is stopped and
    /// what happened is reported.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// Keep the two ClickHouse databases (dropped by default).
    #[arg(long)]
    pub keep_databases: bool,
}

/// Partitions per table topic; the history has rows of each. Eight, not the
/// stack's four: the mock cluster keeps ~5 MB per partition, and the steady
/// part needs enough events to be timed to a few percent.
const PARTITIONS: i32 = 8;
const STATUSES: [&str; 5] = ["pending", "paid", "shipped", "delivered", "cancelled"];
/// The goals, for a history of at least `GOAL_MONTHS`.
const GOAL_MONTHS: u32 = 12;
const GOAL_BYTES: u64 = 256 * 1024 * 1024;
const GOAL_FIRST_COMMIT: Duration = Duration::from_secs(5);
const GOAL_RATE_RATIO: f64 = 0.9;
/// How often the group's commits are read while waiting for the first one.
const FIRST_COMMIT_POLL: Duration = Duration::from_millis(50);
/// Rows per INSERT ... SELECT while writing the history.
const INSERT_CHUNK: u64 = 2_000_000;
/// Minutes per query when reading stored rows back by minute (ClickHouse's
/// max_query_size is 256 KiB).
const MINUTES_PER_QUERY: usize = 2_000;
/// Log lines shown of a processor that failed.
const LOG_TAIL: usize = 12;

/// The source mark every history row carries: a snapshot long ago and a
/// streamed position just below the synthetic stream's first, so that every
/// event produced is new to it. A non-zero position also tells a processor
/// that loads partitions on demand that streaming had begun: a mark at
/// position zero (still in the snapshot) makes it load the partition whole.
const HISTORY_SNAPSHOT_LSN: u64 = 1_000_000;
const HISTORY_COMMIT: u64 = FIRST_LSN as u64 - 2_000;
const HISTORY_LSN: u64 = FIRST_LSN as u64 - 1_000;
const _: () = assert!(HISTORY_SNAPSHOT_LSN < HISTORY_COMMIT && HISTORY_COMMIT < HISTORY_LSN);

/// What the history covers.
#[derive(Debug, Clone, Copy)]
struct History {
    /// The first minute, in seconds since the epoch (UTC).
    start: i64,
    /// Minutes from `start` on (the last ends a day before the bench began).
    minutes: u64,
    products: u64,
}

impl History {
    fn end(&self) -> i64 {
        self.start + self.minutes as i64 * 60
    }
}

pub fn run(args: HistoryArgs, config: &Config) -> anyhow::Result<Vec<Verdict>> {
    anyhow::ensure!(
        args.months >= 1 && args.products >= 1 && args.events >= 1,
        "--months, --products and --events must be at least 1"
    );
    anyhow::ensure!(
        (1..=args.products).contains(&args.hot_products),
        "--hot-products must be 1 to --products ({})",
        args.products
    );
    let timeout = Duration::from_secs(args.timeout_secs);
    let exe = match &args.processor {
        Some(path) => path.clone(),
        None => workspace_binary("etl-processor")?,
    };
    anyhow::ensure!(exe.is_file(), "{} is not a file", exe.display());
    let load_before = load_average();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let prefix = config.kafka.topic_prefix.clone();
    let now = Utc::now();
    let stamp = now.timestamp();

    // The history ends a day ago: the current traffic (created now) lies
    // past it, the late burst inside it.
    let end = minute_floor(now - chrono::Duration::days(1));
    let start = end
        .checked_sub_months(Months::new(args.months))
        .context("--months reaches before the calendar")?;
    let history = History {
        start: start.timestamp(),
        minutes: ((end - start).num_seconds() / 60) as u64,
        products: args.products,
    };

    // The two streams and what they add up to, in this process.
    let current_spec = Spec {
        events: args.events + args.steady_events,
        schemas: Schemas::Off,
        partitions: PARTITIONS,
        keys: args.hot_products,
        seed: 1,
        prefix: prefix.clone(),
        snapshot: false,
    };
    // Event time runs about as fast as the processor reads: 20 to 80 µs an
    // order, ~150,000 events/s. The generator's default (20 to 80 ms, a busy
    // store in real time) would pack an hour of new minutes into a few
    // seconds, each new minute's keys a read that real traffic makes once a
    // minute.
    let current_clock = Clock {
        start_us: now.timestamp_micros(),
        step_us: (20, 80),
    };
    let current = aggregated(Generator::with_clock(current_spec.clone(), current_clock))?;
    // The stream goes on: no second snapshot, positions past the first.
    let late_spec = Spec {
        events: args.late_events,
        seed: 2,
        ..current_spec.clone()
    };
    let late_clock = late_clock(&late_spec, &history);
    let late = aggregated(Generator::with_clock(late_spec.clone(), late_clock))?;
    let late_minutes = touched_minutes(&late);
    let outside = late_minutes
        .iter()
        .filter(|m| **m < history.start || **m >= history.end())
        .count();
    anyhow::ensure!(
        outside == 0,
        "{outside} minutes of the late burst fall outside the history: a bug in its clock"
    );

    // The databases: the history, and an empty one for the baseline.
    let history_db = format!("bench_history_{stamp}");
    let empty_db = format!("bench_history_{stamp}_empty");
    let mut admin_config = config.clickhouse.clone();
    admin_config.database = "default".into();
    let admin = runtime
        .block_on(ClickHouseSink::connect(&admin_config))
        .context("connecting to ClickHouse (setting ETL_CLICKHOUSE_URL)")?;
    // Dropped at the end, also when the bench fails on the way: the history
    // is millions of rows.
    let databases = Databases {
        runtime: &runtime,
        admin: &admin,
        names: vec![history_db.clone(), empty_db.clone()],
        keep: args.keep_databases,
    };
    for db in &databases.names {
        runtime.block_on(admin.create_analytics_db(db))?;
    }
    eprintln!(
        "bench history: writing {} months of history ({} to {}) into {history_db}",
        args.months,
        start.format("%Y-%m-%d %H:%M"),
        end.format("%Y-%m-%d %H:%M")
    );
    let writing = Instant::now();
    let rows_written = runtime.block_on(write_history(&admin, &history_db, &history))?;
    let written_in = writing.elapsed();
    eprintln!(
        "bench history: {} rows written in {:.1} s",
        thousands(rows_written),
        written_in.as_secs_f64()
    );
    // ClickHouse merges the history's parts in the background for a while:
    // on two cores that would slow whichever run it overlaps.
    let settling = Instant::now();
    runtime.block_on(merges_done(&admin, timeout))?;
    eprintln!(
        "bench history: ClickHouse's merges of it done after {:.1} s",
        settling.elapsed().as_secs_f64()
    );
    // The history's own values where the late burst lands, read before any
    // processor writes there.
    let late_before = runtime.block_on(Stored::read(&admin, &history_db, &late_minutes))?;
    let sales_before = runtime.block_on(sales_totals(&admin, &history_db))?;

    let setup = Setup {
        exe: &exe,
        prefix: &prefix,
        config,
        stamp,
        timeout,
        stream: (current_spec, current_clock),
        events: (args.events, args.steady_events),
    };
    let empty = setup.run("empty", &empty_db, None)?;
    let late_burst = LateBurst {
        generator: Generator::with_clock(late_spec, late_clock),
    };
    let full = setup.run("history", &history_db, Some(late_burst))?;

    // Exactness, where the runs finished.
    let mut checks = Vec::new();
    if empty.finished() {
        let stored = runtime.block_on(stored_totals(config, &empty_db))?;
        let expected = expected_totals(&current);
        checks.push(Check::new(
            "empty: every total (orders, lines, units, revenue, customers, products)",
            if stored == expected {
                Ok(())
            } else {
                Err(format!(
                    "stored {stored:?}, the events add up to {expected:?}"
                ))
            },
        ));
    }
    if full.finished() {
        let since = current_clock.start_us.div_euclid(60_000_000) * 60;
        let stored = runtime.block_on(Stored::read_since(&admin, &history_db, since))?;
        checks.push(Check::new(
            "history: orders_by_minute, current minutes",
            compare(&stored.orders, &Stored::orders_of(&current), None),
        ));
        checks.push(Check::new(
            "history: customers_by_minute, current minutes",
            compare(&stored.customers, &Stored::customers_of(&current), None),
        ));
        if full.late.is_some() {
            let after = runtime.block_on(Stored::read(&admin, &history_db, &late_minutes))?;
            checks.push(Check::new(
                "history: orders_by_minute, late minutes = history + late events",
                compare(
                    &after.orders,
                    &Stored::orders_of(&late),
                    Some(&late_before.orders),
                ),
            ));
            checks.push(Check::new(
                "history: customers_by_minute, late minutes = history + late events",
                compare(
                    &after.customers,
                    &Stored::customers_of(&late),
                    Some(&late_before.customers),
                ),
            ));
            let sales_after = runtime.block_on(sales_totals(&admin, &history_db))?;
            let events = sales_of(&current).plus(&sales_of(&late));
            checks.push(Check::new(
                "history: product_sales totals = history + all events",
                if sales_after == sales_before.plus(&events) {
                    Ok(())
                } else {
                    Err(format!(
                        "stored {sales_after:?}, history {sales_before:?} + events {events:?}"
                    ))
                },
            ));
        }
    }
    drop(databases);
    let load_after = load_average();

    // The figures.
    println!(
        "bench history: {} months of history ({} rows: orders_by_minute {} minutes x 5 statuses x \
         {PARTITIONS} partitions, customers_by_minute, product_sales x {} products, source_marks) \
         written in {:.1} s",
        args.months,
        thousands(rows_written),
        thousands(history.minutes),
        thousands(history.products),
        written_in.as_secs_f64()
    );
    println!(
        "current traffic: {} events created now (no snapshot, seed 1) selling {} of the products, \
         {} of them the warm-up, \
         the rest produced while the processor was stopped (SIGSTOP) and timed from SIGCONT; late \
         burst: {} events, orders and customers in {} old minutes (seed 2); 4 topics x \
         {PARTITIONS} partitions on the mock cluster, one cluster per run",
        thousands(args.events + args.steady_events),
        thousands(args.hot_products),
        thousands(args.events),
        thousands(args.late_events),
        thousands(late_minutes.len() as u64)
    );
    println!(
        "processor: {}; ETL_STATE_MAX_ROWS {}",
        exe.display(),
        std::env::var("ETL_STATE_MAX_ROWS").unwrap_or_else(|_| "unset (its default)".into())
    );
    let figure = |f: &dyn Fn(&RunReport) -> String| vec![f(&empty), f(&full)];
    let mut rows: Vec<(String, Vec<String>)> = vec![
        (
            "rows stored at the start".into(),
            vec!["0".into(), thousands(rows_written)],
        ),
        (
            "start -> first commit".into(),
            figure(&|r| seconds(r.first_commit)),
        ),
        (
            "start -> every partition committed".into(),
            figure(&|r| seconds(r.all_committed)),
        ),
        (
            "warm-up events/s (first commit -> its ends committed)".into(),
            figure(&|r| rate(r.warm_up_rate())),
        ),
        (
            "steady events/s (warm-up committed -> all committed)".into(),
            figure(&|r| rate(r.steady_rate())),
        ),
        (
            "events/s over the whole run".into(),
            figure(&|r| rate(r.whole_rate())),
        ),
        (
            "VmRSS after the first commit (after a restart)".into(),
            figure(&|r| r.rss_first_commit.map_or("-".into(), mib)),
        ),
        (
            "VmHWM after the current traffic".into(),
            figure(&|r| r.hwm_current.map_or("-".into(), mib)),
        ),
        (
            "late burst: produced -> committed".into(),
            figure(&|r| seconds(r.late.as_ref().map(|l| l.took))),
        ),
        (
            "late burst events/s".into(),
            figure(&|r| rate(r.late.as_ref().map(Late::rate))),
        ),
        (
            "VmHWM at the end (under load)".into(),
            figure(&|r| r.hwm_end.map_or("-".into(), mib)),
        ),
        (
            "outcome".into(),
            figure(&|r| {
                r.failure
                    .as_ref()
                    .map_or("ok".into(), |_| "gave up (see below)".into())
            }),
        ),
    ];
    for check in &checks {
        let verdict = match &check.result {
            Ok(()) => "exact".to_owned(),
            Err(_) => "NOT exact".to_owned(),
        };
        let (e, h) = if check.name.starts_with("empty") {
            (verdict, "-".to_owned())
        } else {
            ("-".to_owned(), verdict)
        };
        rows.push((check.name.to_owned(), vec![e, h]));
    }
    let history_column = format!("{}-month history", args.months);
    print_table(
        &["history", "empty history", history_column.as_str()],
        &rows
            .into_iter()
            .map(|(name, cells)| std::iter::once(name).chain(cells).collect())
            .collect::<Vec<_>>(),
    );
    println!(
        "logs: {} and {}",
        empty.log_path.display(),
        full.log_path.display()
    );
    for report in [&empty, &full] {
        if let Some(failure) = &report.failure {
            println!(
                "the {} run: {}; the last lines of its log:",
                report.label, failure.summary
            );
            for line in &failure.log_tail {
                println!("  {line}");
            }
        }
    }
    for check in &checks {
        if let Err(e) = &check.result {
            println!("{}: {e}", check.name);
        }
    }
    println!(
        "cores: {} (shared by the mock broker, the processor and ClickHouse); load average before \
         {load_before}, after {load_after}",
        super::cores()
    );

    Ok(verdicts(args.months, &empty, &full, &checks))
}

/// The goals, judged on a history of at least [`GOAL_MONTHS`] (a shorter one
/// is a smoke run: its figures are shown, not judged).
fn verdicts(months: u32, empty: &RunReport, full: &RunReport, checks: &[Check]) -> Vec<Verdict> {
    let judged = months >= GOAL_MONTHS;
    let gave_up = |r: &RunReport| {
        r.failure
            .as_ref()
            .map(|f| format!("the {} run: {}", r.label, f.summary))
    };
    // A figure and whether it meets its goal; a run that gave up before it
    // misses the goal.
    let goal = |figure: Option<(String, bool)>, why: Option<String>| match (figure, why) {
        (Some((measured, met)), _) if judged => (measured, Some(met)),
        (Some((measured, _)), _) => (
            format!("{measured} (a {months}-month history: not judged)"),
            None,
        ),
        (None, Some(why)) => (why, judged.then_some(false)),
        (None, None) => ("not measured".to_owned(), None),
    };
    let memory = |bytes: Option<u64>| goal(bytes.map(|b| (mib(b), b <= GOAL_BYTES)), gave_up(full));
    let (after_restart, after_restart_met) = memory(full.rss_first_commit);
    let (under_load, under_load_met) = memory(full.hwm_end);
    let (first_commit, first_commit_met) = goal(
        full.first_commit
            .map(|d| (format!("{:.2} s", d.as_secs_f64()), d <= GOAL_FIRST_COMMIT)),
        gave_up(full),
    );
    let (ratio, ratio_met) = goal(
        empty.steady_rate().zip(full.steady_rate()).map(|(e, h)| {
            (
                format!(
                    "{:.2} ({} vs {} events/s)",
                    h / e,
                    thousands(h as u64),
                    thousands(e as u64)
                ),
                h >= GOAL_RATE_RATIO * e,
            )
        }),
        gave_up(full).or_else(|| gave_up(empty)),
    );
    let late = match (&full.late, gave_up(full)) {
        (Some(l), _) => format!(
            "{} events/s ({} events in {:.2} s)",
            thousands(l.rate() as u64),
            thousands(l.events),
            l.took.as_secs_f64()
        ),
        (None, why) => why.unwrap_or_else(|| "not measured".into()),
    };
    let wrong: Vec<&str> = checks
        .iter()
        .filter(|c| c.result.is_err())
        .map(|c| c.name)
        .collect();
    let (exact, exact_met) = match (checks.len(), wrong.is_empty()) {
        (0, _) => ("not checked: the runs gave up".to_owned(), None),
        (n, true) => (format!("every check exact ({n})"), Some(true)),
        (_, false) => (format!("NOT exact: {}", wrong.join("; ")), Some(false)),
    };
    vec![
        Verdict::new(
            "history: memory after restart <= 256 MiB",
            after_restart,
            after_restart_met,
        ),
        Verdict::new(
            "history: memory under load <= 256 MiB",
            under_load,
            under_load_met,
        ),
        Verdict::new(
            "history: start to first commit <= 5 s",
            first_commit,
            first_commit_met,
        ),
        Verdict::new(
            "history: steady current-traffic events/s within 10 % of the empty history",
            ratio,
            ratio_met,
        ),
        Verdict::new(
            "history: late burst events/s (old minutes, all cache misses)",
            late,
            None,
        ),
        Verdict::new("history: stored totals exact", exact, exact_met),
    ]
}

/// The bench's databases, dropped with it unless kept.
struct Databases<'a> {
    runtime: &'a tokio::runtime::Runtime,
    admin: &'a ClickHouseSink,
    names: Vec<String>,
    keep: bool,
}

impl Drop for Databases<'_> {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "bench history: kept the databases {}",
                self.names.join(", ")
            );
            return;
        }
        for db in &self.names {
            let dropped = self.runtime.block_on(
                self.admin
                    .client()
                    .query(&format!("DROP DATABASE IF EXISTS {db}"))
                    .execute(),
            );
            if let Err(e) = dropped {
                eprintln!("bench history: cannot drop the database {db}: {e}");
            }
        }
    }
}

/// Waits until ClickHouse runs no merge (polled every 100 ms), at most
/// `timeout`.
async fn merges_done(admin: &ClickHouseSink, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let running: u64 = admin
            .client()
            .query("SELECT count() FROM system.merges")
            .fetch_one()
            .await?;
        if running == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "ClickHouse still merges after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn minute_floor(t: DateTime<Utc>) -> DateTime<Utc> {
    let secs = t.timestamp().div_euclid(60) * 60;
    Utc.timestamp_opt(secs, 0).single().expect("a whole minute")
}

fn seconds(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

fn rate(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| thousands(r as u64))
}

// ---------------------------------------------------------- the history --

/// Writes the history into `db` (made by `create_analytics_db`), all
/// server side; returns the rows written.
async fn write_history(admin: &ClickHouseSink, db: &str, h: &History) -> anyhow::Result<u64> {
    // The columns every sum's row ends with: offset 0 and the history's mark.
    let mark_columns = "source_offset, source_snapshot, source_snapshot_ms, \
                        source_snapshot_offset, source_commit, source_lsn, source_rows";
    let mark_values = format!(
        "toUInt64(0), toUInt64({HISTORY_SNAPSHOT_LSN}), toInt64({}), toUInt64(0), \
         toUInt64({HISTORY_COMMIT}), toUInt64({HISTORY_LSN}), emptyArrayInt64()",
        h.start * 1000
    );
    let statuses = STATUSES
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ");
    // Row n (P partitions): minute n / (5 P), status (n / P) % 5, partition
    // n % P. Plausible values drawn from hashes of n: more delivered orders
    // than any other status, 15.00 to 250.00 an order, revenue in Decimal.
    let p = PARTITIONS;
    let orders = format!(
        "INSERT INTO {db}.orders_by_minute (minute, status, source_partition, orders, revenue, \
         {mark_columns}) \
         SELECT toDateTime({start} + intDiv(n, {per_minute}) * 60, 'UTC'), \
         [{statuses}][intDiv(n, {p}) % 5 + 1], toUInt32(n % {p}), \
         toInt64(1 + intHash64(n) % [2, 2, 3, 8, 2][intDiv(n, {p}) % 5 + 1]) AS orders_n, \
         toDecimal64(orders_n * (1500 + intHash64(n + 1000000007) % 23500), 2) / 100, \
         {mark_values}",
        start = h.start,
        per_minute = STATUSES.len() as i32 * p,
    );
    // Row n: minute n / P, partition n % P.
    let customers = format!(
        "INSERT INTO {db}.customers_by_minute (minute, source_partition, customers, \
         {mark_columns}) \
         SELECT toDateTime({start} + intDiv(n, {p}) * 60, 'UTC'), toUInt32(n % {p}), \
         toInt64(1 + intHash64(n) % 3), {mark_values}",
        start = h.start
    );
    // Row n: product n / P + 1, partition n % P; 1 to 2 units a line at
    // 1.49 to 99.99.
    let sales = format!(
        "INSERT INTO {db}.product_sales (product_id, source_partition, lines, units, revenue, \
         {mark_columns}) \
         SELECT toInt64(intDiv(n, {p}) + 1), toUInt32(n % {p}), \
         toInt64(20 + intHash64(n) % 400) AS lines_n, \
         toInt64(lines_n + intHash64(n + 1) % (lines_n + 1)) AS units_n, \
         toDecimal64(units_n * (149 + intHash64(n + 2) % 9851), 2) / 100, {mark_values}"
    );
    let tables = [
        (
            "orders_by_minute",
            orders,
            h.minutes * STATUSES.len() as u64 * PARTITIONS as u64,
        ),
        (
            "customers_by_minute",
            customers,
            h.minutes * PARTITIONS as u64,
        ),
        ("product_sales", sales, h.products * PARTITIONS as u64),
    ];
    for (name, insert, rows) in &tables {
        let mut from = 0;
        while from < *rows {
            let count = INSERT_CHUNK.min(rows - from);
            let sql = format!("{insert} FROM (SELECT number + {from} AS n FROM numbers({count}))");
            admin
                .client()
                .query(&sql)
                .execute()
                .await
                .with_context(|| format!("writing the history of {name}"))?;
            from += count;
            eprintln!(
                "[history {name}] {} of {} rows",
                thousands(from),
                thousands(*rows)
            );
        }
    }
    // Each aggregate's mark per partition, as a processor writes it after a
    // flush: what the rows above hold, and for the by-minute aggregates the
    // history's last minute. The products dimension has no rows here (it
    // reads none back), and its mark is the same one.
    let last_minute = h.start + (h.minutes as i64 - 1) * 60;
    let marks: Vec<String> = etl::registry::names()
        .into_iter()
        .flat_map(|aggregate| {
            let newest_minute = if aggregate.ends_with("_by_minute") {
                last_minute.to_string()
            } else {
                "NULL".to_owned()
            };
            (0..PARTITIONS).map(move |p| {
                format!(
                    "('{aggregate}', {p}, 0, {HISTORY_SNAPSHOT_LSN}, {}, 0, {HISTORY_COMMIT}, \
                     {HISTORY_LSN}, [], {newest_minute})",
                    h.start * 1000
                )
            })
        })
        .collect();
    admin
        .client()
        .query(&format!(
            "INSERT INTO {db}.source_marks (aggregate, source_partition, {mark_columns}, \
             newest_minute) VALUES {}",
            marks.join(", ")
        ))
        .execute()
        .await
        .context("writing the source marks")?;
    let mut written = 0;
    for table in [
        "orders_by_minute",
        "customers_by_minute",
        "product_sales",
        "source_marks",
    ] {
        let n: u64 = admin
            .client()
            .query(&format!("SELECT count() FROM {db}.{table}"))
            .fetch_one()
            .await?;
        written += n;
    }
    Ok(written)
}

/// A clock for the late burst that spreads its orders evenly over the
/// history, one every so many minutes: each touches minutes no other event
/// touched, keys the history holds.
fn late_clock(spec: &Spec, h: &History) -> Clock {
    // The same store on any clock makes the same orders: count them once.
    let mut dry = Generator::new(spec.clone());
    dry.by_ref().for_each(drop);
    let orders = dry.orders().max(1) as i64;
    // An hour of margin at both ends. A fixed step: a random one's sum
    // wanders by its spread times the square root of the orders, which
    // would need a margin of days to stay inside the history.
    let start_us = (h.start + 3600) * 1_000_000;
    let span_us = (h.minutes as i64 * 60 - 2 * 3600).max(60) * 1_000_000;
    let step = (span_us / (orders + 1)).max(1);
    Clock {
        start_us,
        step_us: (step, step + 1),
    }
}

/// Decodes and applies every message of `generator` in fresh aggregates.
fn aggregated(generator: Generator) -> anyhow::Result<AllAggregates> {
    let mut aggregates = AllAggregates::default();
    let mut chunk: Vec<Message> = Vec::with_capacity(65_536);
    let mut generator = generator;
    loop {
        chunk.clear();
        chunk.extend(generator.by_ref().take(65_536));
        if chunk.is_empty() {
            return Ok(aggregates);
        }
        let errors = super::core::ours(&chunk, &mut aggregates);
        anyhow::ensure!(errors == 0, "{errors} synthetic events did not apply");
    }
}

/// The minutes (seconds since the epoch) whose orders or customers the
/// events changed.
fn touched_minutes(aggregates: &AllAggregates) -> Vec<i64> {
    let mut minutes = BTreeSet::new();
    minutes.extend(
        aggregates
            .orders_by_minute
            .totals()
            .keys()
            .map(|(m, _)| m.0),
    );
    minutes.extend(aggregates.customers_by_minute.totals().keys().map(|m| m.0));
    minutes.into_iter().collect()
}

// --------------------------------------------------------- the checks --

/// Stored or added values by key: (minute in seconds, status) -> (count,
/// revenue); a customers key has no status, and its value no revenue.
type Sums = BTreeMap<(i64, String), (i64, Decimal)>;

/// Values of orders_by_minute and customers_by_minute, summed over the
/// partitions, both as [`Sums`] for [`compare`].
#[derive(Debug, Default)]
struct Stored {
    orders: Sums,
    customers: Sums,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct OrdersRow {
    at: u32,
    status: String,
    n_orders: i64,
    revenue_total: String,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct CustomersRow {
    at: u32,
    n_customers: i64,
}

impl Stored {
    /// The stored values (FINAL) of `minutes`.
    async fn read(admin: &ClickHouseSink, db: &str, minutes: &[i64]) -> anyhow::Result<Stored> {
        let mut stored = Stored::default();
        for chunk in minutes.chunks(MINUTES_PER_QUERY) {
            let list = chunk
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            stored
                .add(admin, db, &format!("minute IN ({list})"))
                .await?;
        }
        Ok(stored)
    }

    /// The stored values (FINAL) of the minutes from `since` on.
    async fn read_since(admin: &ClickHouseSink, db: &str, since: i64) -> anyhow::Result<Stored> {
        let mut stored = Stored::default();
        stored
            .add(admin, db, &format!("minute >= toDateTime({since}, 'UTC')"))
            .await?;
        Ok(stored)
    }

    async fn add(
        &mut self,
        admin: &ClickHouseSink,
        db: &str,
        condition: &str,
    ) -> anyhow::Result<()> {
        let sql = format!(
            "SELECT toUInt32(minute) AS at, status, toInt64(sum(orders)) AS n_orders, \
             toString(toDecimal64(sum(revenue), 2)) AS revenue_total \
             FROM {db}.orders_by_minute FINAL WHERE {condition} GROUP BY minute, status"
        );
        let rows: Vec<OrdersRow> = admin
            .client()
            .query(&sql)
            .fetch_all()
            .await
            .with_context(|| sql.clone())?;
        for row in rows {
            let revenue = Decimal::from_str(&row.revenue_total)
                .with_context(|| format!("revenue {}", row.revenue_total))?;
            self.orders
                .insert((i64::from(row.at), row.status), (row.n_orders, revenue));
        }
        let sql = format!(
            "SELECT toUInt32(minute) AS at, toInt64(sum(customers)) AS n_customers \
             FROM {db}.customers_by_minute FINAL WHERE {condition} GROUP BY minute"
        );
        let rows: Vec<CustomersRow> = admin
            .client()
            .query(&sql)
            .fetch_all()
            .await
            .with_context(|| sql.clone())?;
        for row in rows {
            self.customers.insert(
                (i64::from(row.at), String::new()),
                (row.n_customers, Decimal::ZERO),
            );
        }
        Ok(())
    }

    /// What the events add to orders_by_minute, in the same shape.
    fn orders_of(aggregates: &AllAggregates) -> Sums {
        aggregates
            .orders_by_minute
            .totals()
            .into_iter()
            .map(|((minute, status), v)| ((minute.0, status), (v.orders, v.revenue)))
            .collect()
    }

    /// What the events add to customers_by_minute, in the same shape.
    fn customers_of(aggregates: &AllAggregates) -> Sums {
        aggregates
            .customers_by_minute
            .totals()
            .into_iter()
            .map(|(minute, v)| ((minute.0, String::new()), (v.customers, Decimal::ZERO)))
            .collect()
    }
}

/// Whether `stored` is `base` (none: nothing) plus `delta`, key by key; keys
/// missing from a side count as zero.
fn compare(stored: &Sums, delta: &Sums, base: Option<&Sums>) -> Result<(), String> {
    let empty = BTreeMap::new();
    let base = base.unwrap_or(&empty);
    let zero = (0, Decimal::ZERO);
    let keys: BTreeSet<&(i64, String)> = stored
        .keys()
        .chain(delta.keys())
        .chain(base.keys())
        .collect();
    let mut wrong = Vec::new();
    for key in &keys {
        let s = stored.get(*key).unwrap_or(&zero);
        let d = delta.get(*key).unwrap_or(&zero);
        let b = base.get(*key).unwrap_or(&zero);
        if *s != (b.0 + d.0, b.1 + d.1) {
            wrong.push(format!(
                "{} {}: stored {} / {}, expected {} / {}",
                DateTime::from_timestamp(key.0, 0).map_or(key.0.to_string(), |t| t.to_rfc3339()),
                key.1,
                s.0,
                s.1,
                b.0 + d.0,
                b.1 + d.1
            ));
        }
    }
    if wrong.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} of {} keys differ, e.g. {}",
        wrong.len(),
        keys.len(),
        wrong.into_iter().take(3).collect::<Vec<_>>().join("; ")
    ))
}

/// One exactness check.
struct Check {
    name: &'static str,
    result: Result<(), String>,
}

impl Check {
    fn new(name: &'static str, result: Result<(), String>) -> Check {
        Check { name, result }
    }
}

/// product_sales summed over every product: (units, revenue, lines).
#[derive(Debug, Clone, PartialEq)]
struct Sales(i64, Decimal, i64);

impl Sales {
    fn plus(&self, o: &Sales) -> Sales {
        Sales(self.0 + o.0, self.1 + o.1, self.2 + o.2)
    }
}

fn sales_of(aggregates: &AllAggregates) -> Sales {
    aggregates
        .product_sales
        .totals()
        .values()
        .fold(Sales(0, Decimal::ZERO, 0), |t, v| {
            t.plus(&Sales(v.units, v.revenue, v.lines))
        })
}

async fn sales_totals(admin: &ClickHouseSink, db: &str) -> anyhow::Result<Sales> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Row {
        n_units: i64,
        revenue_total: String,
        n_lines: i64,
    }
    let row: Row = admin
        .client()
        .query(&format!(
            "SELECT toInt64(sum(units)) AS n_units, \
             toString(toDecimal64(sum(revenue), 2)) AS revenue_total, \
             toInt64(sum(lines)) AS n_lines FROM {db}.product_sales FINAL"
        ))
        .fetch_one()
        .await?;
    Ok(Sales(
        row.n_units,
        Decimal::from_str(&row.revenue_total)?,
        row.n_lines,
    ))
}

// ------------------------------------------------------------ the topics --

/// One tombstone (a key, no value) into every partition of every table
/// topic, keyed as the generator keys its rows (`{"id":N}`, N % partitions
/// the partition).
fn produce_tombstones(bootstrap: &str, prefix: &str) -> anyhow::Result<Produced> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .create()
        .context("creating the Kafka producer")?;
    let started = Instant::now();
    let mut produced = Produced::default();
    for table in Table::ALL {
        let topic = table.topic(prefix);
        for partition in 0..PARTITIONS {
            let key = format!(r#"{{"id":{}}}"#, PARTITIONS + partition);
            producer
                .send(
                    BaseRecord::<_, [u8]>::to(&topic)
                        .partition(partition)
                        .key(&key),
                )
                .map_err(|(e, _)| e)
                .with_context(|| format!("producing a tombstone to {topic}/{partition}"))?;
            produced.messages += 1;
            produced.bytes += key.len() as u64;
            produced.per_partition.insert((topic.clone(), partition), 1);
        }
    }
    producer
        .flush(Duration::from_secs(30))
        .context("waiting for the broker to acknowledge the tombstones")?;
    produced.took = started.elapsed();
    Ok(produced)
}

// -------------------------------------------------------------- the runs --

/// What every run shares.
struct Setup<'a> {
    exe: &'a Path,
    prefix: &'a str,
    config: &'a Config,
    stamp: i64,
    timeout: Duration,
    /// The current traffic, the same stream in every run.
    stream: (Spec, Clock),
    /// Its events: the warm-up, then the steady part.
    events: (u64, u64),
}

/// The late burst a run produces once it has read the current traffic.
struct LateBurst {
    generator: Generator,
}

struct Late {
    events: u64,
    /// From the first late event produced to every partition committed.
    took: Duration,
}

impl Late {
    fn rate(&self) -> f64 {
        self.events as f64 / self.took.as_secs_f64()
    }
}

/// What one run measured, as far as it got.
struct RunReport {
    label: &'static str,
    log_path: PathBuf,
    /// The warm-up's events and the steady part's.
    events: (u64, u64),
    first_commit: Option<Duration>,
    rss_first_commit: Option<u64>,
    /// From the start until the warm-up was committed, and all of it.
    warm_committed: Option<Duration>,
    all_committed: Option<Duration>,
    hwm_current: Option<u64>,
    late: Option<Late>,
    hwm_end: Option<u64>,
    failure: Option<Failure>,
}

impl RunReport {
    fn finished(&self) -> bool {
        self.failure.is_none() && self.all_committed.is_some()
    }

    /// Events/s of the warm-up, from the first commit to its last.
    fn warm_up_rate(&self) -> Option<f64> {
        let window = self.warm_committed? - self.first_commit?;
        (window >= Duration::from_millis(1)).then(|| self.events.0 as f64 / window.as_secs_f64())
    }

    /// Events/s of the steady part: from the warm-up committed to all.
    fn steady_rate(&self) -> Option<f64> {
        let window = self.all_committed? - self.warm_committed?;
        (window >= Duration::from_millis(1)).then(|| self.events.1 as f64 / window.as_secs_f64())
    }

    fn whole_rate(&self) -> Option<f64> {
        let events = self.events.0 + self.events.1;
        Some(events as f64 / self.all_committed?.as_secs_f64())
    }
}

/// Why a run stopped early.
struct Failure {
    summary: String,
    log_tail: Vec<String>,
}

impl Setup<'_> {
    /// One `etl-processor run` on database `db`, in a fresh group, until it
    /// committed `ends` (and the late burst, if any). A phase that fails or
    /// takes longer than the timeout ends the run, not the bench.
    fn run(
        &self,
        label: &'static str,
        db: &str,
        late: Option<LateBurst>,
    ) -> anyhow::Result<RunReport> {
        let group = format!("bench-history-{}-{label}", self.stamp);
        // Topics of its own: the steady part is produced while the run's
        // processor is stopped. Offset 0 of every partition is a tombstone,
        // then comes the warm-up.
        let broker = MockBroker::start()?;
        for table in Table::ALL {
            broker.create_topic(&table.topic(self.prefix), PARTITIONS)?;
        }
        broker.create_topic(&self.config.dead_letter_topic, 1)?;
        let bootstrap = broker.bootstrap.as_str();
        let tombstones = produce_tombstones(bootstrap, self.prefix)?;
        let (spec, clock) = self.stream.clone();
        let mut stream = Generator::with_clock(spec, clock);
        let warm_up = produce_from(
            bootstrap,
            stream.by_ref().take(self.events.0 as usize),
            Compression::Lz4,
        )?;
        let mut produced = merged(&tombstones, &warm_up);
        let warm_ends = check_retention(bootstrap, &produced)?;
        let log_path = std::env::temp_dir().join(format!("{db}.log"));
        eprintln!(
            "bench history: the {label} run (database {db}, group {group}) logs to {}",
            log_path.display()
        );
        let mut report = RunReport {
            label,
            log_path: log_path.clone(),
            events: (warm_up.messages, 0),
            first_commit: None,
            rss_first_commit: None,
            warm_committed: None,
            all_committed: None,
            hwm_current: None,
            late: None,
            hwm_end: None,
            failure: None,
        };
        let log = std::fs::File::create(&log_path)?;
        let started = Instant::now();
        let mut processor = Processor {
            child: Command::new(self.exe)
                .arg("run")
                .env("ETL_KAFKA_BROKERS", bootstrap)
                .env("ETL_KAFKA_GROUP_ID", &group)
                .env("ETL_TOPIC_PREFIX", self.prefix)
                .env("ETL_CLICKHOUSE_URL", &self.config.clickhouse.url)
                .env("ETL_CLICKHOUSE_DATABASE", db)
                .env("ETL_DEAD_LETTER_TOPIC", &self.config.dead_letter_topic)
                .env("ETL_METRICS_ADDR", "off")
                .env("ETL_LOG", "warn")
                // A commit at least every 50 ms (a flush each): the phases'
                // ends are timed by the commits.
                .env("ETL_FLUSH_INTERVAL_MS", "50")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {} run", self.exe.display()))?,
            log_path,
        };
        let pid = processor.child.id();
        // The phase under way and when it began: what a failure is told by.
        let mut phase = ("the first commit", started);
        let phases = (|| -> anyhow::Result<()> {
            let monitor = Monitor::new(bootstrap, &group, &warm_ends)?;
            let first = monitor.first_commit(started, self.timeout, || processor.alive())?;
            report.first_commit = Some(first);
            report.rss_first_commit = Some(rss(pid)?.0);
            phase = ("the warm-up committed", Instant::now());
            let warm = monitor.reached(&warm_ends, started, self.timeout, || processor.alive())?;
            report.warm_committed = Some(warm);
            // The steady part goes into the topics while the processor is
            // stopped (SIGSTOP), so that it then reads a backlog whole, as
            // fast as it can: timed from SIGCONT to every partition committed.
            phase = ("the steady part committed", Instant::now());
            processor.signal("STOP")?;
            let steady = produce_from(bootstrap, stream, Compression::Lz4);
            processor.signal("CONT")?;
            let steady = steady?;
            let resumed = Instant::now();
            produced = merged(&produced, &steady);
            let ends = check_retention(bootstrap, &produced)?;
            let steady_took =
                monitor.reached(&ends, resumed, self.timeout, || processor.alive())?;
            report.events.1 = steady.messages;
            report.all_committed = Some(warm + steady_took);
            report.hwm_current = Some(rss(pid)?.1);
            if let Some(burst) = late {
                phase = ("the late burst committed", Instant::now());
                let late = produce_from(bootstrap, burst.generator, Compression::Lz4)?;
                let ends = check_retention(bootstrap, &merged(&produced, &late))?;
                let committed =
                    wait_committed(bootstrap, &group, &ends, phase.1, self.timeout, || {
                        processor.alive()
                    })?;
                let produced = late;
                report.late = Some(Late {
                    events: produced.messages,
                    took: committed.took,
                });
            }
            report.hwm_end = Some(rss(pid)?.1);
            Ok(())
        })();
        match phases {
            Ok(()) => {
                let status = processor.stop();
                if !status.is_some_and(|s| s.success()) {
                    eprintln!(
                        "bench history: the {label} run did not stop cleanly: {}",
                        status.map_or("still running, killed".into(), |s| s.to_string())
                    );
                }
            }
            Err(e) => {
                let (name, began) = phase;
                let mut reason = if began.elapsed() >= self.timeout {
                    format!(
                        "gave up waiting for {name} after {} s",
                        self.timeout.as_secs()
                    )
                } else {
                    format!("waiting for {name}: {e:#}")
                };
                // What it held by then, if it still runs.
                if let Ok((now, peak)) = rss(pid) {
                    reason.push_str(&format!(" (VmRSS {}, VmHWM {})", mib(now), mib(peak)));
                }
                let failure = processor.give_up(name, &reason);
                eprintln!("bench history: the {label} run: {}", failure.summary);
                report.failure = Some(failure);
            }
        }
        Ok(report)
    }
}

/// A group's committed offsets, read as often as a phase's end needs.
struct Monitor {
    consumer: BaseConsumer,
    partitions: TopicPartitionList,
}

/// How often [`Monitor::reached`] reads the commits: the steady part takes
/// under a second, so this is about one percent of it.
const COMMIT_POLL: Duration = Duration::from_millis(5);

impl Monitor {
    fn new(bootstrap: &str, group: &str, ends: &Ends) -> anyhow::Result<Monitor> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()?;
        let mut partitions = TopicPartitionList::new();
        for (topic, partition, _) in ends {
            partitions.add_partition(topic, *partition);
        }
        Ok(Monitor {
            consumer,
            partitions,
        })
    }

    /// Waits until any partition has a commit past 0 (offset 0 is each
    /// partition's tombstone, so a commit means a flush), reading every
    /// `FIRST_COMMIT_POLL`; returns when, from `started`.
    fn first_commit(
        &self,
        started: Instant,
        timeout: Duration,
        mut alive: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<Duration> {
        loop {
            alive()?;
            if started.elapsed() > timeout {
                bail!("no offset committed within {timeout:?}");
            }
            let committed = self
                .consumer
                .committed_offsets(self.partitions.clone(), Duration::from_secs(5));
            if let Ok(committed) = committed {
                let any = committed
                    .elements()
                    .iter()
                    .any(|e| matches!(e.offset(), Offset::Offset(o) if o > 0));
                if any {
                    return Ok(started.elapsed());
                }
            }
            std::thread::sleep(FIRST_COMMIT_POLL);
        }
    }

    /// Waits until every partition's commit is at or past its offset in
    /// `target`; returns when, from `started`.
    fn reached(
        &self,
        target: &Ends,
        started: Instant,
        timeout: Duration,
        mut alive: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<Duration> {
        let waited = Instant::now();
        loop {
            alive()?;
            if waited.elapsed() > timeout {
                bail!("not every partition was committed within {timeout:?}");
            }
            let committed = self
                .consumer
                .committed_offsets(self.partitions.clone(), Duration::from_secs(5))?;
            let at = |topic: &str, partition: i32| {
                committed
                    .find_partition(topic, partition)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
            };
            if target
                .iter()
                .all(|(topic, partition, end)| at(topic, *partition).is_some_and(|o| o >= *end))
            {
                return Ok(started.elapsed());
            }
            std::thread::sleep(COMMIT_POLL);
        }
    }
}

/// The processor child process; killed if still running when dropped.
struct Processor {
    child: Child,
    log_path: PathBuf,
}

impl Processor {
    /// Sends signal `name` (`STOP`, `CONT`) to the processor.
    fn signal(&self, name: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -{name} failed: {status}");
        Ok(())
    }

    fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the processor exited: {status}");
        }
        Ok(())
    }

    /// SIGTERM (flush, commit, leave), then SIGKILL after `grace`.
    fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }

    fn stop(&mut self) -> Option<ExitStatus> {
        self.terminate(Duration::from_secs(40))
    }

    /// Stops the processor (if it still runs) after `reason`, met while
    /// waiting for `phase`, and tells what became of it.
    fn give_up(&mut self, phase: &str, reason: &str) -> Failure {
        let summary = match self.child.try_wait().ok().flatten() {
            // It ended by itself: its status says how, the reason is only
            // what the bench noticed.
            Some(status) => format!("exited by itself ({status}) before {phase}"),
            None => match self.terminate(Duration::from_secs(10)) {
                Some(status) => format!("{reason}; stopped on SIGTERM ({status})"),
                None => format!("{reason}; killed (still running 10 s after SIGTERM)"),
            },
        };
        Failure {
            summary,
            log_tail: log_tail(&self.log_path, LOG_TAIL),
        }
    }
}

impl Drop for Processor {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.terminate(Duration::from_secs(10));
        }
    }
}

/// The last `n` lines of a log, each cut to a readable length.
fn log_tail(path: &Path, n: usize) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return vec![format!("(cannot read {})", path.display())];
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return vec!["(nothing logged)".to_owned()];
    }
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| {
            if l.chars().count() > 400 {
                format!("{}...", l.chars().take(400).collect::<String>())
            } else {
                (*l).to_owned()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_late_burst_lands_inside_the_history_on_distinct_minutes() {
        let h = History {
            start: 1_700_000_040,
            minutes: 30 * 24 * 60,
            products: 100,
        };
        let spec = Spec {
            events: 3_000,
            schemas: Schemas::Off,
            partitions: PARTITIONS,
            keys: 100,
            seed: 2,
            prefix: "history".to_owned(),
            snapshot: false,
        };
        let clock = late_clock(&spec, &h);
        let late = aggregated(Generator::with_clock(spec, clock)).expect("applies");
        let minutes = touched_minutes(&late);
        assert!(minutes.len() > 300, "{} minutes", minutes.len());
        assert!(minutes.iter().all(|m| *m >= h.start && *m < h.end()));
    }

    #[test]
    fn compare_adds_the_base_to_the_delta() {
        let key = (60, "paid".to_owned());
        let stored = BTreeMap::from([(key.clone(), (3, Decimal::new(3000, 2)))]);
        let base = BTreeMap::from([(key.clone(), (1, Decimal::new(1000, 2)))]);
        let delta = BTreeMap::from([(key.clone(), (2, Decimal::new(2000, 2)))]);
        assert_eq!(compare(&stored, &delta, Some(&base)), Ok(()));
        assert!(compare(&stored, &delta, None).is_err());
    }
}
