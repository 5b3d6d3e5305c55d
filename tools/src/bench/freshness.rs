//! Freshness under steady load, measured from outside: how long after a
//! change is committed in Postgres it is visible in ClickHouse, through the
//! real stack (Debezium, the broker, the processor, ClickHouse).
//!
//! While `loadgen` keeps the store busy, a probe commits a marker customer
//! every so often, each with `created_at` in a minute no other row uses, and
//! a poller asks ClickHouse every 20 ms which of those minutes have appeared
//! in `customers_by_minute`. A probe's latency is from its COMMIT returning to
//! the first poll that sees its minute; the poll interval bounds the error.
//! The markers stay (in minutes before 2020, where nothing else writes), so
//! the next run's minutes start after them.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use etl::config::Config;
use etl::sink::ClickHouseSink;
use etl_testkit::workspace_binary;

#[derive(Debug, Clone, clap::Args)]
pub struct FreshnessArgs {
    /// Seconds of measurement, after the processor has caught up.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// The background load: new orders a second (loadgen --rate).
    #[arg(long, default_value_t = 20.0)]
    pub load: f64,
    /// Marker commits a second.
    #[arg(long, default_value_t = 4.0)]
    pub probes_per_second: f64,
}

/// How often ClickHouse is asked which markers are visible.
const POLL: Duration = Duration::from_millis(20);
/// The goal: visible within the flush interval plus this.
const GOAL_SLACK: Duration = Duration::from_millis(250);

pub struct Freshness {
    pub latencies: Vec<Duration>,
    pub flush_interval: Duration,
    pub catch_up: Duration,
}

impl Freshness {
    /// The nearest-rank percentile `p` (0 to 100).
    pub fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }

    pub fn goal(&self) -> Duration {
        self.flush_interval + GOAL_SLACK
    }

    pub fn verdict(&self) -> super::Verdict {
        let ms = |d: Duration| d.as_millis();
        super::Verdict::new(
            "freshness: p99 <= flush interval + 250 ms",
            format!(
                "p99 {} ms (p50 {} ms), goal {} ms",
                ms(self.percentile(99.0)),
                ms(self.percentile(50.0)),
                ms(self.goal())
            ),
            Some(self.percentile(99.0) <= self.goal()),
        )
    }

    pub fn print(&self, args: &FreshnessArgs) {
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        let goal = self.goal();
        let p99 = self.percentile(99.0);
        let rows = [
            ("probes", self.latencies.len().to_string()),
            ("p50", ms(self.percentile(50.0))),
            ("p90", ms(self.percentile(90.0))),
            ("p99", ms(p99)),
            ("max", ms(self.percentile(100.0))),
            (
                "goal: p99 <= flush interval + 250 ms",
                format!(
                    "{} ({})",
                    ms(goal),
                    if p99 <= goal { "met" } else { "NOT met" }
                ),
            ),
            (
                "background load",
                format!("{} orders/s (loadgen)", args.load),
            ),
            (
                "history caught up in",
                format!("{:.1} s", self.catch_up.as_secs_f64()),
            ),
            ("load average", super::load_average()),
        ];
        super::print_table(
            &[
                "freshness: Postgres commit -> visible in ClickHouse",
                "value",
            ],
            &rows
                .into_iter()
                .map(|(k, v)| vec![k.to_owned(), v])
                .collect::<Vec<_>>(),
        );
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// A child process that is stopped with SIGTERM when dropped.
struct Running(Child, &'static str);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SIGTERM: the processor flushes and commits, loadgen finishes its transaction.
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
        eprintln!("bench: {} stopped", self.1);
    }
}

fn spawn(
    program: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    log: &std::path::Path,
) -> anyhow::Result<Child> {
    let log = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

pub async fn run(args: &FreshnessArgs, config: &Config) -> anyhow::Result<Freshness> {
    let postgres_url = config.require_postgres()?.to_owned();
    let run_id = format!(
        "bench_fresh_{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let mut admin_config = config.clickhouse.clone();
    admin_config.database = "default".into();
    ClickHouseSink::connect(&admin_config)
        .await?
        .create_analytics_db(&run_id)
        .await?;
    let mut db_config = config.clickhouse.clone();
    db_config.database = run_id.clone();
    let clickhouse = ClickHouseSink::connect(&db_config).await?;

    let logs = std::env::temp_dir().join(&run_id);
    std::fs::create_dir_all(&logs)?;
    eprintln!(
        "bench: freshness: ClickHouse database {run_id}, logs in {}",
        logs.display()
    );
    // A consumer group and database of its own: it reads the whole history
    // first, then keeps up with the load.
    let _processor = Running(
        spawn(
            &workspace_binary("etl-processor")?,
            &["run"],
            &[
                ("ETL_CLICKHOUSE_DATABASE", &run_id),
                ("ETL_KAFKA_GROUP_ID", &run_id),
                ("ETL_METRICS_ADDR", "off"),
            ],
            &logs.join("processor.log"),
        )?,
        "processor",
    );

    let (pg, connection) = tokio_postgres::connect(&postgres_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    // Marker minutes start after any earlier run's: before 2020, nothing
    // else writes there.
    let base: i64 = pg
        .query_one(
            "SELECT (floor(extract(epoch FROM coalesce(max(created_at), '2000-01-01'::timestamptz)) / 60)::bigint + 1) * 60
             FROM customers WHERE created_at < '2020-01-01'",
            &[],
        )
        .await?
        .get(0);
    let mut probe = Probe {
        pg: &pg,
        clickhouse: &clickhouse,
        run_id: &run_id,
        base,
        next: 0,
    };

    let started = Instant::now();
    let first = probe.commit().await?;
    probe.wait_visible(first, Duration::from_secs(600)).await?;
    let catch_up = started.elapsed();
    eprintln!("bench: freshness: the processor caught up with the history in {catch_up:.1?}");

    let load = args.load.to_string();
    let _loadgen = Running(
        spawn(
            &std::env::current_exe()?,
            &["loadgen", "--rate", &load],
            &[],
            &logs.join("loadgen.log"),
        )?,
        "loadgen",
    );
    // Let the load reach its steady state first.
    tokio::time::sleep(Duration::from_secs(5)).await;

    let every = Duration::from_secs_f64(1.0 / args.probes_per_second.max(0.01));
    let measure_until = Instant::now() + Duration::from_secs(args.seconds);
    let mut pending: BTreeMap<i64, Instant> = BTreeMap::new();
    let mut latencies = Vec::new();
    let mut next_probe = Instant::now();
    let mut last_report = Instant::now();
    while Instant::now() < measure_until || !pending.is_empty() {
        if Instant::now() >= next_probe && Instant::now() < measure_until {
            let minute = probe.commit().await?;
            pending.insert(minute, Instant::now());
            next_probe += every;
        }
        let seen = probe.visible().await?;
        let now = Instant::now();
        pending.retain(|minute, committed| {
            if seen.contains(minute) {
                latencies.push(now - *committed);
                false
            } else {
                true
            }
        });
        if pending
            .values()
            .any(|c| c.elapsed() > Duration::from_secs(120))
        {
            anyhow::bail!("a marker was not visible in ClickHouse after 120 s");
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let mut sorted = latencies.clone();
            sorted.sort();
            eprintln!(
                "bench: freshness: {} probes, p50 {:?}, p99 {:?}, {} pending",
                sorted.len(),
                percentile(&sorted, 50.0),
                percentile(&sorted, 99.0),
                pending.len()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    latencies.sort();
    Ok(Freshness {
        latencies,
        flush_interval: config.flush.interval,
        catch_up,
    })
}

/// Marker customers in Postgres and their minutes in ClickHouse.
struct Probe<'a> {
    pg: &'a tokio_postgres::Client,
    clickhouse: &'a ClickHouseSink,
    run_id: &'a str,
    /// Unix seconds of the first marker minute.
    base: i64,
    next: i64,
}

impl Probe<'_> {
    /// Commits the next marker; returns its minute (unix seconds).
    async fn commit(&mut self) -> anyhow::Result<i64> {
        let minute = self.base + 60 * self.next;
        let email = format!("probe.{}.{}@example.test", self.run_id, self.next);
        self.next += 1;
        self.pg
            .execute(
                "INSERT INTO customers (email, full_name, created_at) VALUES ($1, 'Freshness probe', to_timestamp($2::bigint))",
                &[&email, &minute],
            )
            .await
            .context("committing a marker customer")?;
        Ok(minute)
    }

    /// The marker minutes visible in ClickHouse now.
    async fn visible(&self) -> anyhow::Result<std::collections::HashSet<i64>> {
        let sql = format!(
            "SELECT toInt64(toUInt32(minute)) FROM {}.customers_by_minute FINAL \
             WHERE minute >= toDateTime({}) AND minute < toDateTime({}) \
             GROUP BY minute HAVING sum(customers) > 0",
            self.run_id,
            self.base,
            self.base + 60 * self.next
        );
        let minutes: Vec<i64> = self.clickhouse.client().query(&sql).fetch_all().await?;
        Ok(minutes.into_iter().collect())
    }

    async fn wait_visible(&self, minute: i64, deadline: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        while !self.visible().await?.contains(&minute) {
            if started.elapsed() > deadline {
                anyhow::bail!("the first marker was not visible after {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        let sorted = ms(&[10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
        assert_eq!(percentile(&sorted, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&sorted, 99.0), Duration::from_millis(100));
        assert_eq!(percentile(&sorted, 10.0), Duration::from_millis(10));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
