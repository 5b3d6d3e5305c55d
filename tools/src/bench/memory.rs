//! `etl-tools bench memory`: the processor's resident memory with many
//! live aggregate keys, and while ClickHouse is down.
//!
//! One `etl-processor run` process reads synthetic events from the mock
//! cluster (in this process) until it has committed them all, so every key
//! is in its state and in ClickHouse; its RSS is read from /proc. Then the
//! relay in front of ClickHouse is cut, as many events again arrive (the same
//! keys), and its RSS is sampled every second: the consumer must pause
//! rather than buffer. After the relay is restored it must catch up.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::outage::{host_port, Relay};
use super::pipeline::{check_retention, wait_committed};
use super::synthetic::{produce_with, Compression, Generator, Produced, Schemas, Spec};
use super::{load_average, print_table, thousands, Verdict};
use etl::cdc::{Op, Table};
use etl::config::Config;
use etl::sink::ClickHouseSink;
use etl_testkit::{workspace_binary, MockBroker};

#[derive(Debug, Clone, clap::Args)]
pub struct MemoryArgs {
    /// Distinct products sold (keys of product_sales); the events are as
    /// many as it takes for the order lines to sell each once.
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u64,
    /// Partitions per topic (the mock cluster keeps ~5 MB per partition).
    #[arg(long, default_value_t = 128)]
    pub partitions: i32,
    /// Seconds ClickHouse stays unreachable.
    #[arg(long, default_value_t = 30)]
    pub outage_secs: u64,
    /// Give up waiting for a catch-up after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
}

/// The goal: resident memory at most this with 1,000,000 live keys.
const GOAL_BYTES: u64 = 256 * 1024 * 1024;
/// "Flat" during an outage: RSS grows by no more than this (allocator noise).
const FLAT_BYTES: u64 = 16 * 1024 * 1024;

/// (VmRSS, VmHWM) of `pid`, in bytes.
pub(super) fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .context("a number")?
            .parse()?;
        Ok(kib * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

pub(super) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// How many events of `spec` it takes for the order lines to sell `keys`
/// distinct products (each of the first `keys` lines sells another).
fn events_for(spec: &Spec, keys: u64) -> u64 {
    let mut lines = 0;
    let mut events = 0;
    for message in Generator::new(Spec {
        events: u64::MAX,
        ..spec.clone()
    }) {
        events += 1;
        if message.table == Table::OrderItems && message.op == Some(Op::Create) {
            lines += 1;
            if lines >= keys {
                break;
            }
        }
    }
    events
}

/// Stops the processor with SIGTERM (then SIGKILL) when dropped.
struct Processor(Child);

impl Drop for Processor {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(args: MemoryArgs, config: &Config) -> anyhow::Result<Vec<Verdict>> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let load_before = load_average();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let prefix = config.kafka.topic_prefix.clone();
    let mut spec = Spec {
        events: 0,
        schemas: Schemas::Off,
        partitions: args.partitions,
        keys: args.keys,
        seed: 1,
        prefix: prefix.clone(),
        snapshot: true,
    };
    spec.events = events_for(&spec, args.keys);

    let broker = MockBroker::start()?;
    for table in Table::ALL {
        broker.create_topic(&table.topic(&prefix), args.partitions)?;
    }
    broker.create_topic(&config.dead_letter_topic, 1)?;
    let first = produce_with(&broker.bootstrap, &spec, Compression::Lz4)?;
    let ends = check_retention(&broker.bootstrap, &first)?;
    eprintln!(
        "bench memory: preloaded {} messages selling {} distinct products",
        thousands(first.messages),
        thousands(args.keys)
    );

    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let db = format!("bench_memory_{stamp}");
    let group = format!("bench-memory-{stamp}");
    let mut admin = config.clickhouse.clone();
    admin.database = "default".into();
    runtime.block_on(async {
        ClickHouseSink::connect(&admin)
            .await?
            .create_analytics_db(&db)
            .await
    })?;
    let target = host_port(&config.clickhouse.url)
        .context("ETL_CLICKHOUSE_URL must be http://host:port for the relay")?;
    let relay = runtime.block_on(Relay::start(target))?;

    let log_path = std::env::temp_dir().join(format!("{db}.log"));
    let log = std::fs::File::create(&log_path)?;
    eprintln!("bench memory: the processor logs to {}", log_path.display());
    let started = Instant::now();
    let processor = Processor(
        Command::new(workspace_binary("etl-processor")?)
            .arg("run")
            .env("ETL_KAFKA_BROKERS", &broker.bootstrap)
            .env("ETL_KAFKA_GROUP_ID", &group)
            .env("ETL_TOPIC_PREFIX", &prefix)
            .env("ETL_CLICKHOUSE_URL", &relay.url)
            .env("ETL_CLICKHOUSE_DATABASE", &db)
            .env("ETL_DEAD_LETTER_TOPIC", &config.dead_letter_topic)
            .env("ETL_METRICS_ADDR", "off")
            .env("ETL_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etl-processor run")?,
    );
    let pid = processor.0.id();
    let alive = || -> anyhow::Result<()> {
        if std::fs::metadata(format!("/proc/{pid}")).is_err() {
            bail!("the processor exited");
        }
        Ok(())
    };
    wait_committed(&broker.bootstrap, &group, &ends, started, timeout, alive)?;
    let loaded_in = started.elapsed();
    let (rss_loaded, peak_loaded) = rss(pid)?;
    let keys = runtime.block_on(live_keys(config, &db))?;

    // ClickHouse goes away; as many events again arrive for the same keys.
    relay.cut();
    let outage_started = Instant::now();
    let producer = {
        let bootstrap = broker.bootstrap.clone();
        // The stream goes on: no second snapshot, positions past the first.
        let spec = Spec {
            seed: 2,
            snapshot: false,
            ..spec.clone()
        };
        std::thread::spawn(move || produce_with(&bootstrap, &spec, Compression::Lz4))
    };
    // Sampled while the events arrive, and for the whole outage.
    let mut samples = Vec::new();
    while !producer.is_finished()
        || outage_started.elapsed() < Duration::from_secs(args.outage_secs)
    {
        alive()?;
        samples.push(rss(pid)?.0);
        std::thread::sleep(Duration::from_secs(1));
    }
    let second = producer
        .join()
        .map_err(|_| anyhow::anyhow!("the producer thread panicked"))??;
    relay.restore();
    let restored = Instant::now();
    let both = merged(&first, &second);
    let ends = check_retention(&broker.bootstrap, &both)?;
    wait_committed(&broker.bootstrap, &group, &ends, restored, timeout, alive)?;
    let recovered_in = restored.elapsed();
    let (rss_end, peak_end) = rss(pid)?;
    drop(processor);
    let load_after = load_average();

    let (first_sample, last_sample) = (
        samples.first().copied().unwrap_or(0),
        samples.last().copied().unwrap_or(0),
    );
    let max_sample = samples.iter().copied().max().unwrap_or(0);
    let growth = max_sample.saturating_sub(first_sample);
    println!(
        "bench memory: one etl-processor run process; {} events (schemas off) over 4 topics x {} \
         partitions on the mock cluster, ClickHouse behind a relay this bench can cut",
        thousands(first.messages),
        args.partitions
    );
    let rows = vec![
        (
            "live keys: product_sales products",
            thousands(keys.products_sold),
        ),
        (
            "live keys: all four aggregates (key, partition) rows",
            thousands(keys.rows),
        ),
        (
            "read, aggregated, flushed and committed in",
            format!("{:.1} s", loaded_in.as_secs_f64()),
        ),
        ("RSS with every key live", mib(rss_loaded)),
        ("peak RSS so far (VmHWM)", mib(peak_loaded)),
        (
            "goal: RSS <= 256 MiB at 1,000,000 keys",
            if keys.products_sold < 1_000_000 {
                "n/a (fewer keys asked for)".to_owned()
            } else if peak_loaded <= GOAL_BYTES {
                "met".to_owned()
            } else {
                "NOT met".to_owned()
            },
        ),
        (
            "ClickHouse down: RSS first / max / last sample",
            format!(
                "{} / {} / {}",
                mib(first_sample),
                mib(max_sample),
                mib(last_sample)
            ),
        ),
        (
            "ClickHouse down: growth over the outage",
            format!("{} over {} samples", mib(growth), samples.len()),
        ),
        (
            "after ClickHouse came back: caught up in",
            format!("{:.1} s", recovered_in.as_secs_f64()),
        ),
        (
            "RSS at the end / peak (VmHWM)",
            format!("{} / {}", mib(rss_end), mib(peak_end)),
        ),
        (
            "load average before / after",
            format!("{load_before} / {load_after}"),
        ),
    ];
    print_table(
        &["memory", "value"],
        &rows
            .into_iter()
            .map(|(k, v)| vec![k.to_owned(), v])
            .collect::<Vec<_>>(),
    );
    runtime.block_on(async {
        ClickHouseSink::connect(&admin)
            .await?
            .client()
            .query(&format!("DROP DATABASE IF EXISTS {db}"))
            .execute()
            .await
            .map_err(anyhow::Error::from)
    })?;
    let judged = keys.products_sold >= 1_000_000;
    Ok(vec![
        Verdict::new(
            "memory: RSS <= 256 MiB with 1,000,000 live keys",
            format!(
                "{} at {} keys (peak {})",
                mib(rss_loaded),
                thousands(keys.products_sold),
                mib(peak_loaded)
            ),
            judged.then_some(peak_loaded <= GOAL_BYTES),
        ),
        Verdict::new(
            "memory: flat while ClickHouse is down",
            format!("+{} over {} s", mib(growth), samples.len()),
            Some(growth <= FLAT_BYTES),
        ),
    ])
}

struct LiveKeys {
    products_sold: u64,
    rows: u64,
}

async fn live_keys(config: &Config, db: &str) -> anyhow::Result<LiveKeys> {
    let mut c = config.clickhouse.clone();
    c.database = db.to_owned();
    let sink = ClickHouseSink::connect(&c).await?;
    let products_sold: u64 = sink
        .client()
        .query(&format!(
            "SELECT uniqExact(product_id) FROM {db}.product_sales FINAL"
        ))
        .fetch_one()
        .await?;
    let mut rows = 0;
    for table in etl::registry::names() {
        let n: u64 = sink
            .client()
            .query(&format!("SELECT count() FROM {db}.{table} FINAL"))
            .fetch_one()
            .await?;
        rows += n;
    }
    Ok(LiveKeys {
        products_sold,
        rows,
    })
}

/// Both preloads, as one (per-partition counts add up).
pub(super) fn merged(a: &Produced, b: &Produced) -> Produced {
    let mut both = a.clone();
    both.messages += b.messages;
    both.bytes += b.bytes;
    for (key, n) in &b.per_partition {
        *both.per_partition.entry(key.clone()).or_insert(0) += n;
    }
    both
}
