//! `etl-tools bench pipeline`: the whole processor against a bare
//! consumer, on the same preloaded topics, in one run.
//!
//! The broker is librdkafka's mock cluster, in this process: it is not the
//! bottleneck the way tansu on sqlite is (~20-30k messages/s), but it keeps
//! only about 5 MB of record batches per partition and drops older ones, so
//! the topics get many partitions and every partition's low watermark is
//! checked to be 0 after the preload (else the run fails). It competes for
//! the same cores as what it serves.
//!
//! 1. Preload: synthetic Debezium messages ([`super::synthetic`]) into the
//!    four table topics (lz4, as the stack's Debezium forwarder writes).
//! 2. Bare consumer: a `BaseConsumer` with the processor's own consumer
//!    settings ([`etl::source::kafka::consumer_config`]) and subscription,
//!    in a fresh group, reads every message once, counting messages and
//!    bytes and nothing else.
//! 3. Pipeline: what `etl-processor run` runs ([`etl::app::run`]), in this
//!    process, in a fresh consumer group, into a fresh ClickHouse database
//!    (the stack's server, ETL_CLICKHOUSE_URL), timed from its start until
//!    every partition's committed offset is at the end of the partition
//!    (polled every 100 ms); the processor commits only what is flushed to
//!    ClickHouse, so that is "every aggregate stored". Then the stored totals
//!    are checked against the same events decoded and aggregated here.
//! 4. The same with 1, 2, 4 `etl-processor run` child processes in one
//!    consumer group (they reach the mock cluster over loopback).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message as _, Offset, TopicPartitionList};

use super::synthetic::{produce_with, Compression, Produced, Schemas, Spec};
use super::{load_average, print_table, thousands, Progress, Verdict};
use etl::cdc::Table;
use etl::config::{Config, KafkaConfig};
use etl::replay::{money, AllAggregates};
use etl::sink::clickhouse::analytics_ddl;
use etl::sink::ClickHouseSink;
use etl::source::kafka::{consumer_config, topic_pattern};
use etl_testkit::{workspace_binary, MockBroker};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Messages preloaded into the four table topics (tombstones included).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Partitions per topic. The mock cluster keeps ~5 MB of (lz4) record
    /// batches per partition; the run fails if any partition lost data.
    #[arg(long, default_value_t = 64)]
    pub partitions: i32,
    #[arg(long, value_enum, default_value_t = Schemas::Off)]
    pub schemas: Schemas,
    /// Distinct product ids in order_items.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also run this many `etl-processor run` processes in one group, for
    /// each number given (comma-separated; `--instances 0` for none).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub instances: Vec<usize>,
    /// Give up a run after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// Keep the ClickHouse databases of the runs (dropped by default).
    #[arg(long)]
    pub keep_databases: bool,
}

/// Every (topic, partition) of the table topics with its end offset.
pub(super) type Ends = Vec<(String, i32, i64)>;

/// Checks that the broker kept every message: low watermarks 0, high
/// watermarks the counts produced.
pub(super) fn check_retention(bootstrap: &str, produced: &Produced) -> anyhow::Result<Ends> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let mut ends = Vec::new();
    let mut keys: Vec<_> = produced.per_partition.iter().collect();
    keys.sort();
    for ((topic, partition), count) in keys {
        let (low, high) = consumer
            .fetch_watermarks(topic, *partition, Duration::from_secs(10))
            .with_context(|| format!("reading the watermarks of {topic}/{partition}"))?;
        if low != 0 {
            bail!(
                "the mock cluster dropped data: {topic}/{partition} starts at offset {low}, not 0 \
                 (it keeps ~5 MB of record batches per partition): ask for more --partitions \
                 or fewer --events"
            );
        }
        if high != *count {
            bail!("{topic}/{partition} ends at offset {high}, but {count} messages were produced");
        }
        ends.push((topic.clone(), *partition, high));
    }
    Ok(ends)
}

/// A bare consumer's run: every message read once.
struct Bare {
    took: Duration,
    messages: u64,
    bytes: u64,
}

fn bare_consumer(kafka: &KafkaConfig, total: u64, timeout: Duration) -> anyhow::Result<Bare> {
    let started = Instant::now();
    let consumer: BaseConsumer = consumer_config(kafka)
        .create()
        .context("creating the bare consumer")?;
    consumer.subscribe(&[&topic_pattern(&kafka.topic_prefix)])?;
    let mut progress = Progress::new("bare consumer");
    let (mut messages, mut bytes) = (0u64, 0u64);
    while messages < total {
        if started.elapsed() > timeout {
            bail!(
                "the bare consumer read {messages} of {total} messages in {timeout:?}; giving up"
            );
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                messages += 1;
                bytes += (m.payload_len() + m.key().map_or(0, <[u8]>::len)) as u64;
                progress.tick(messages);
            }
            Some(Err(e)) => tracing::warn!(error = %e, "bare consumer"),
            None => {}
        }
    }
    let took = started.elapsed();
    progress.finish(messages);
    Ok(Bare {
        took,
        messages,
        bytes,
    })
}

/// When a group's committed offsets reached the ends of every partition.
pub(super) struct Committed {
    pub(super) took: Duration,
    /// When the first offset was committed (the first flush), from the start.
    pub(super) first_commit: Option<Duration>,
}

/// Polls the group's committed offsets every 100 ms until every partition
/// is committed to its end; `alive` says whether the processor still runs.
pub(super) fn wait_committed(
    bootstrap: &str,
    group: &str,
    ends: &Ends,
    started: Instant,
    timeout: Duration,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Committed> {
    let monitor: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, _) in ends {
        tpl.add_partition(topic, *partition);
    }
    let end: HashMap<(&str, i32), i64> = ends
        .iter()
        .map(|(t, p, e)| ((t.as_str(), *p), *e))
        .collect();
    let total: i64 = ends.iter().map(|(_, _, e)| e).sum();
    let mut progress = Progress::new(format!("pipeline {group}"));
    let mut first_commit = None;
    let (mut last_done, mut last_change, mut stall_reported) = (0, Instant::now(), false);
    loop {
        alive()?;
        if started.elapsed() > timeout {
            bail!("group {group} did not commit every partition to its end within {timeout:?}");
        }
        if let Ok(committed) = monitor.committed_offsets(tpl.clone(), Duration::from_secs(5)) {
            let mut done = 0i64;
            let mut complete = true;
            for e in committed.elements() {
                let at = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                done += at;
                if at < end[&(e.topic(), e.partition())] {
                    complete = false;
                }
            }
            if done > 0 && first_commit.is_none() {
                first_commit = Some(started.elapsed());
            }
            if complete && done == total {
                let took = started.elapsed();
                progress.finish(done as u64);
                return Ok(Committed { took, first_commit });
            }
            if done != last_done {
                (last_done, last_change) = (done, Instant::now());
            } else if last_change.elapsed() > STALL_REPORT && !stall_reported {
                stall_reported = true;
                let behind: Vec<String> = committed
                    .elements()
                    .iter()
                    .filter_map(|e| {
                        let end = end[&(e.topic(), e.partition())];
                        let at = match e.offset() {
                            Offset::Offset(o) => o,
                            _ => 0,
                        };
                        (at < end)
                            .then(|| format!("{}/{} at {at} of {end}", e.topic(), e.partition()))
                    })
                    .collect();
                eprintln!(
                    "[pipeline {group}] no commit for {STALL_REPORT:?}; behind: {}",
                    behind.join(", ")
                );
            }
            progress.tick(done as u64);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Commits standing still this long are reported with the partitions behind.
const STALL_REPORT: Duration = Duration::from_secs(2);

/// One pipeline run: where it ran and how long it took.
struct PipelineRun {
    label: String,
    instances: usize,
    committed: Committed,
}

/// The run's ClickHouse database, made from init/clickhouse.
async fn fresh_database(config: &Config, db: &str) -> anyhow::Result<()> {
    let mut admin_config = config.clickhouse.clone();
    admin_config.database = "default".to_owned();
    let admin = ClickHouseSink::connect(&admin_config)
        .await
        .context("connecting to ClickHouse (setting ETL_CLICKHOUSE_URL)")?;
    admin
        .client()
        .query(&format!("DROP DATABASE IF EXISTS {db}"))
        .execute()
        .await?;
    for statement in analytics_ddl(db) {
        admin
            .client()
            .query(&statement)
            .execute()
            .await
            .with_context(|| statement.clone())?;
    }
    Ok(())
}

async fn drop_database(config: &Config, db: &str) -> anyhow::Result<()> {
    let mut admin_config = config.clickhouse.clone();
    admin_config.database = "default".to_owned();
    let admin = ClickHouseSink::connect(&admin_config).await?;
    admin
        .client()
        .query(&format!("DROP DATABASE IF EXISTS {db}"))
        .execute()
        .await?;
    Ok(())
}

/// The totals every run must have stored (orders, order lines, units,
/// product revenue, customers, live products), as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Totals(Vec<(&'static str, String)>);

pub(super) fn expected_totals(aggregates: &AllAggregates) -> Totals {
    let orders: i64 = aggregates
        .orders_by_minute
        .totals()
        .values()
        .map(|v| v.orders)
        .sum();
    let sales = aggregates.product_sales.totals();
    let lines: i64 = sales.values().map(|v| v.lines).sum();
    let units: i64 = sales.values().map(|v| v.units).sum();
    let revenue: rust_decimal::Decimal = sales.values().map(|v| v.revenue).sum();
    let customers: i64 = aggregates
        .customers_by_minute
        .totals()
        .values()
        .map(|v| v.customers)
        .sum();
    let products = aggregates.products.totals().len();
    Totals(vec![
        ("orders", orders.to_string()),
        ("lines", lines.to_string()),
        ("units", units.to_string()),
        ("revenue", money(revenue)),
        ("customers", customers.to_string()),
        ("products", products.to_string()),
    ])
}

pub(super) async fn stored_totals(config: &Config, db: &str) -> anyhow::Result<Totals> {
    let mut db_config = config.clickhouse.clone();
    db_config.database = db.to_owned();
    let sink = ClickHouseSink::connect(&db_config).await?;
    let one = |sql: String| {
        let client = sink.client().clone();
        async move {
            client
                .query(&sql)
                .fetch_one::<String>()
                .await
                .with_context(|| sql.clone())
        }
    };
    Ok(Totals(vec![
        (
            "orders",
            one(format!(
                "SELECT toString(sum(orders)) FROM {db}.orders_by_minute FINAL"
            ))
            .await?,
        ),
        (
            "lines",
            one(format!(
                "SELECT toString(sum(lines)) FROM {db}.product_sales FINAL"
            ))
            .await?,
        ),
        (
            "units",
            one(format!(
                "SELECT toString(sum(units)) FROM {db}.product_sales FINAL"
            ))
            .await?,
        ),
        (
            "revenue",
            one(format!(
                "SELECT toString(toDecimal64(sum(revenue), 2)) FROM {db}.product_sales FINAL"
            ))
            .await?,
        ),
        (
            "customers",
            one(format!(
                "SELECT toString(sum(customers)) FROM {db}.customers_by_minute FINAL"
            ))
            .await?,
        ),
        (
            "products",
            one(format!(
                "SELECT toString(count()) FROM {db}.products FINAL WHERE deleted = 0"
            ))
            .await?,
        ),
    ]))
}

/// The processor's config for a run: the mock cluster, a fresh group and
/// database; no metrics server (several may run at once).
fn run_config(config: &Config, bootstrap: &str, group: &str, db: &str) -> Config {
    let mut c = config.clone();
    c.kafka.brokers = bootstrap.to_owned();
    c.kafka.group_id = group.to_owned();
    c.clickhouse.database = db.to_owned();
    c.telemetry.metrics_addr = None;
    c
}

/// `etl-processor run` in this process, until its group has committed
/// everything.
fn in_process(
    config: Config,
    bootstrap: &str,
    ends: &Ends,
    timeout: Duration,
) -> anyhow::Result<Committed> {
    let group = config.kafka.group_id.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let processor = std::thread::Builder::new()
        .name("bench-processor".into())
        .spawn(move || {
            etl::app::run(config, async move {
                let _ = stopped.await;
                "the benchmark is done"
            })
        })?;
    let committed = wait_committed(bootstrap, &group, ends, started, timeout, || {
        if processor.is_finished() {
            bail!("the processor stopped before it had committed every partition");
        }
        Ok(())
    });
    let _ = stop.send(());
    let result = processor
        .join()
        .map_err(|_| anyhow::anyhow!("the processor thread panicked"))?;
    match result.context("the processor failed")? {
        etl::app::Outcome::Stopped => committed,
        early => bail!("the processor ended early: {early:?}"),
    }
}

/// `instances` child processes of `etl-processor run` in one group.
fn processes(
    config: &Config,
    instances: usize,
    bootstrap: &str,
    ends: &Ends,
    timeout: Duration,
) -> anyhow::Result<Committed> {
    let exe = workspace_binary("etl-processor")?;
    let started = Instant::now();
    let mut children: Vec<Child> = Vec::new();
    let spawned = (0..instances).try_for_each(|_| {
        let child = Command::new(&exe)
            .arg("run")
            .env("ETL_KAFKA_BROKERS", bootstrap)
            .env("ETL_KAFKA_GROUP_ID", &config.kafka.group_id)
            .env("ETL_TOPIC_PREFIX", &config.kafka.topic_prefix)
            .env("ETL_CLICKHOUSE_DATABASE", &config.clickhouse.database)
            .env("ETL_DEAD_LETTER_TOPIC", &config.dead_letter_topic)
            .env("ETL_METRICS_ADDR", "off")
            .env("ETL_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting etl-processor run")?;
        children.push(child);
        anyhow::Ok(())
    });
    let committed = spawned.and_then(|()| {
        wait_committed(
            bootstrap,
            &config.kafka.group_id,
            ends,
            started,
            timeout,
            || {
                for child in &mut children {
                    if let Some(status) = child.try_wait()? {
                        bail!("an etl-processor run exited early: {status}");
                    }
                }
                Ok(())
            },
        )
    });
    // A clean stop (SIGTERM: flush, commit, leave), then make sure.
    for child in &children {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
    }
    let deadline = Instant::now() + config.shutdown_timeout + Duration::from_secs(5);
    for child in &mut children {
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }
    committed
}

/// The goal: the pipeline at least this fraction of the bare consumer's rate.
const GOAL_RATIO: f64 = 0.7;

pub fn run(args: Args, config: &Config) -> anyhow::Result<Vec<Verdict>> {
    anyhow::ensure!(
        args.partitions >= 1 && args.keys >= 1,
        "--partitions and --keys must be at least 1"
    );
    let timeout = Duration::from_secs(args.timeout_secs);
    let load_before = load_average();
    let prefix = config.kafka.topic_prefix.clone();
    let spec = Spec {
        events: args.events,
        schemas: args.schemas,
        partitions: args.partitions,
        keys: args.keys,
        seed: args.seed,
        prefix: prefix.clone(),
        snapshot: true,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // What ClickHouse must hold after each run.
    let (_, aggregates) = super::core::measure(&spec, super::core::Path::Ours);
    let expected = expected_totals(&aggregates);
    drop(aggregates);

    let broker = MockBroker::start()?;
    for table in Table::ALL {
        broker.create_topic(&table.topic(&prefix), args.partitions)?;
    }
    broker.create_topic(&config.dead_letter_topic, 1)?;
    let produced = produce_with(&broker.bootstrap, &spec, Compression::Lz4)?;
    let ends = check_retention(&broker.bootstrap, &produced)?;
    let most = produced.per_partition.values().max().copied().unwrap_or(0);
    eprintln!(
        "preloaded {} messages ({:.1} MB) into {} partitions in {:.1} s; all kept",
        thousands(produced.messages),
        produced.bytes as f64 / 1e6,
        ends.len(),
        produced.took.as_secs_f64()
    );

    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut kafka = config.kafka.clone();
    kafka.brokers = broker.bootstrap.clone();
    kafka.group_id = format!("bench-bare-{stamp}");
    let bare = bare_consumer(&kafka, produced.messages, timeout)?;
    anyhow::ensure!(
        bare.bytes == produced.bytes,
        "the bare consumer read {} bytes, {} were produced",
        bare.bytes,
        produced.bytes
    );

    let mut runs = Vec::new();
    let mut plan: Vec<(String, usize, bool)> = vec![("pipeline, in-process".to_owned(), 1, true)];
    for &n in args.instances.iter().filter(|n| **n > 0) {
        plan.push((format!("pipeline, {n} process(es)"), n, false));
    }
    for (i, (label, instances, inside)) in plan.into_iter().enumerate() {
        let db = format!("bench_pipeline_{stamp}_{i}");
        let group = format!("bench-pipeline-{stamp}-{i}");
        runtime.block_on(fresh_database(config, &db))?;
        let run_config = run_config(config, &broker.bootstrap, &group, &db);
        eprintln!("{label}: group {group}, database {db}");
        let committed = if inside {
            in_process(run_config, &broker.bootstrap, &ends, timeout)
        } else {
            processes(&run_config, instances, &broker.bootstrap, &ends, timeout)
        }
        .with_context(|| label.clone())?;
        let stored = runtime.block_on(stored_totals(config, &db))?;
        if stored != expected {
            bail!("{label}: ClickHouse holds {stored:?}, the events add up to {expected:?}");
        }
        if !args.keep_databases {
            runtime.block_on(drop_database(config, &db))?;
        }
        runs.push(PipelineRun {
            label,
            instances,
            committed,
        });
    }
    let load_after = load_average();

    let bare_rate = bare.messages as f64 / bare.took.as_secs_f64();
    let mut rows = vec![vec![
        "bare consumer (reads, counts)".to_owned(),
        "1".to_owned(),
        format!("{:.2}", bare.took.as_secs_f64()),
        "-".to_owned(),
        thousands(bare_rate as u64),
        "1.00".to_owned(),
    ]];
    for run in &runs {
        let rate = produced.messages as f64 / run.committed.took.as_secs_f64();
        rows.push(vec![
            run.label.clone(),
            run.instances.to_string(),
            format!("{:.2}", run.committed.took.as_secs_f64()),
            run.committed
                .first_commit
                .map_or("-".to_owned(), |d| format!("{:.2}", d.as_secs_f64())),
            thousands(rate as u64),
            format!("{:.2}", rate / bare_rate),
        ]);
    }
    println!(
        "bench pipeline: {} messages (schemas {}, {:.0} B/message, lz4), 4 topics x {} partitions \
         (at most {} messages in one), librdkafka mock cluster in this process",
        thousands(produced.messages),
        spec.schemas.as_str(),
        produced.bytes as f64 / produced.messages as f64,
        args.partitions,
        thousands(most as u64)
    );
    println!(
        "pipeline: start -> every partition committed (= flushed to ClickHouse; flush interval {} ms, \
         max {} rows), totals in ClickHouse checked",
        config.flush.interval.as_millis(),
        thousands(config.flush.max_rows as u64)
    );
    print_table(
        &[
            "run",
            "instances",
            "seconds",
            "first commit s",
            "events/s",
            "vs bare",
        ],
        &rows,
    );
    println!(
        "cores: {} (shared by the mock broker, the processor and ClickHouse); load average before \
         {load_before}, after {load_after}",
        super::cores()
    );
    Ok(runs
        .iter()
        .map(|run| {
            let rate = produced.messages as f64 / run.committed.took.as_secs_f64();
            Verdict::new(
                format!("pipeline: >= 70 % of a bare consumer ({})", run.label),
                format!(
                    "{:.2} ({} vs {} events/s)",
                    rate / bare_rate,
                    thousands(rate as u64),
                    thousands(bare_rate as u64)
                ),
                Some(rate / bare_rate >= GOAL_RATIO),
            )
        })
        .collect())
}
