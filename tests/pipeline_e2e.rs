//! The whole pipeline on the real stack (Postgres -> Debezium -> broker ->
//! etl-processor -> ClickHouse): after a workload the aggregates equal the
//! GROUP BY over Postgres to the cent, also after the processor is killed
//! with SIGKILL in the middle of a workload and started again, and after a
//! second member joins and leaves the consumer group during a workload.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{eventually, Stack};
use etl::reconcile::{reconcile, Report};
use etl::sink::ClickHouseSink;

const SESSION_TIMEOUT: Duration = Duration::from_secs(6);
const CATCH_UP: Duration = Duration::from_secs(90);
const UNKNOWN_TOPIC: &str = "online_store.public.reviews";
/// Long, so that a kill mid-workload finds seconds of unflushed events.
const FLUSH_INTERVAL: Duration = Duration::from_millis(2500);

/// The processor under test; killed if the test ends early (a failed
/// assertion must not leave it running).
struct Processor(Child);

impl Drop for Processor {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

struct Run {
    stack: Stack,
    database: String,
    group: String,
    logs: PathBuf,
    started: u32,
}

impl Run {
    fn processor_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_etl-processor"));
        cmd.args(args);
        for (k, v) in self.stack.vars() {
            if k.starts_with("ETL_") {
                cmd.env(k, v);
            }
        }
        cmd.env("ETL_CLICKHOUSE_DATABASE", &self.database)
            .env("ETL_KAFKA_GROUP_ID", &self.group)
            .env(
                "ETL_FLUSH_INTERVAL_MS",
                FLUSH_INTERVAL.as_millis().to_string(),
            )
            .env(
                "ETL_KAFKA_SESSION_TIMEOUT_MS",
                SESSION_TIMEOUT.as_millis().to_string(),
            );
        cmd
    }

    fn start_processor(&mut self) -> Processor {
        self.started += 1;
        let log = self.logs.join(format!("processor-{}.log", self.started));
        let log = std::fs::File::create(&log).unwrap();
        Processor(
            self.processor_command(&["run"])
                .env("ETL_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("etl-processor starts"),
        )
    }

    /// `store_workload.py --seed S --size SIZE | psql`, in the background.
    fn start_workload(&self, seed: u64, size: &str) -> Child {
        let script = common::repo_root().join("tests/workload/store_workload.py");
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "python3 '{}' --seed {seed} --size {size} | psql -X -q -v ON_ERROR_STOP=1 >/dev/null",
                script.display()
            ))
            .env("PGHOST", self.stack.get("PGHOST"))
            .env("PGPORT", self.stack.get("PGPORT"))
            .env("PGUSER", self.stack.get("PGUSER"))
            .env("PGDATABASE", self.stack.get("PGDATABASE"))
            .spawn()
            .unwrap()
    }

    async fn sink(&self) -> ClickHouseSink {
        ClickHouseSink::connect(&self.stack.clickhouse_config(&self.database))
            .await
            .unwrap()
    }

    async fn reconcile(&self) -> Report {
        reconcile(self.stack.get("ETL_POSTGRES_URL"), &self.sink().await)
            .await
            .unwrap()
    }

    /// Waits until reconcile is exact (the processor caught up); at the
    /// deadline, fails with the differences still there.
    async fn caught_up(&self, phase: &str) -> Report {
        let started = std::time::Instant::now();
        loop {
            let report = self.reconcile().await;
            if report.is_exact() {
                eprintln!(
                    "{phase}: exact after {:?}, {} keys",
                    started.elapsed(),
                    report.compared
                );
                return report;
            }
            if started.elapsed() > CATCH_UP {
                let shown: Vec<String> = report
                    .differences
                    .iter()
                    .take(10)
                    .map(|d| d.to_string())
                    .collect();
                panic!(
                    "{phase}: {} differences after {CATCH_UP:?}, e.g.\n{}",
                    report.differences.len(),
                    shown.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the workload of `seed` has created `orders` orders.
    async fn workload_reaches(&self, seed: u64, orders: i64) {
        let what = format!("workload {seed} to reach {orders} orders");
        eventually(&what, Duration::from_secs(60), || async {
            (self.orders_in_postgres(seed).await >= orders).then_some(())
        })
        .await;
    }

    /// Creates UNKNOWN_TOPIC (if needed) and writes `n` Debezium-shaped records.
    async fn produce_to_unknown_table(&self, n: usize) {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let brokers = self.stack.get("ETL_KAFKA_BROKERS");
        // The broker does not create topics on produce; an existing one is fine.
        let _ = Command::new(self.stack.get("TANSU_BIN"))
            .args(["topic", "create", UNKNOWN_TOPIC, "--partitions", "1"])
            .args(["--broker", &format!("tcp://{brokers}")])
            .output()
            .unwrap();
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .unwrap();
        for id in 0..n {
            let value = format!(r#"{{"before":null,"after":{{"id":{id},"stars":5}},"op":"c"}}"#);
            let record = FutureRecord::to(UNKNOWN_TOPIC).key("k").payload(&value);
            producer
                .send(record, Duration::from_secs(10))
                .await
                .unwrap();
        }
    }

    /// Order lines of the workload's own products already in ClickHouse.
    async fn flushed_item_lines(&self, seed: u64) -> i64 {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Lines {
            lines: i64,
        }
        let first_id = 1000 + seed as i64 * 100_000;
        let sql = "SELECT sum(lines) FROM product_sales FINAL WHERE product_id BETWEEN ? AND ?";
        let sink = self.sink().await;
        let q = sink
            .client()
            .query(sql)
            .bind(first_id)
            .bind(first_id + 99_999);
        q.fetch_one::<Lines>().await.unwrap().lines
    }

    async fn orders_in_postgres(&self, seed: u64) -> i64 {
        let (pg, conn) =
            tokio_postgres::connect(self.stack.get("ETL_POSTGRES_URL"), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        let first_id = 1000 + seed as i64 * 100_000;
        pg.query_one(
            "SELECT count(*) FROM orders WHERE id BETWEEN $1 AND $1 + 99999",
            &[&first_id],
        )
        .await
        .unwrap()
        .get(0)
    }
}

/// SIGTERM, and the processor must flush, commit and exit 0.
fn terminate(processor: &mut Processor) {
    let pid = processor.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = processor.0.wait().unwrap();
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
}

fn wait(child: &mut Child, what: &str) {
    let status = child.wait().unwrap();
    assert!(status.success(), "{what} failed: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn aggregates_are_exact_after_a_workload_a_sigkill_and_a_rebalance() {
    let stack = Stack::load();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    // Seeds pick disjoint id ranges, so runs against one stack do not collide.
    let seed = now.as_secs() % 40_000 * 2;
    let database = format!("e2e_{}", std::process::id());
    let logs = common::repo_root().join("target/e2e-logs");
    std::fs::create_dir_all(&logs).unwrap();
    eprintln!(
        "seed {seed}, database {database}, logs in {}",
        logs.display()
    );
    common::fresh_analytics_db(&stack, &database).await;
    let mut run = Run {
        stack,
        database,
        group: format!("e2e-{}", now.as_nanos()),
        logs,
        started: 0,
    };

    // A table the processor does not aggregate (say, added to the connector
    // later): its records must be skipped with a log line, not crash or stall.
    run.produce_to_unknown_table(3).await;

    // Phase 1: everything so far (snapshot included) plus a small workload.
    let mut processor = run.start_processor();
    let mut workload = run.start_workload(seed, "small");
    wait(&mut workload, "small workload");
    let first = run.caught_up("after the small workload").await;
    assert!(
        first.compared >= 40,
        "too few keys to mean anything: {}",
        first.compared
    );

    let log = std::fs::read_to_string(run.logs.join("processor-1.log")).unwrap();
    let skipped = log
        .lines()
        .filter(|l| l.contains("carries no captured table") && l.contains(UNKNOWN_TOPIC))
        .count();
    assert_eq!(skipped, 1, "one log line for the unknown table's records");

    // Phase 2: SIGKILL in the middle of a larger workload, then restart.
    let seed2 = seed + 1;
    let mut workload = run.start_workload(seed2, "large");
    // Kill while the processor works through this workload, half a flush
    // interval after a flush: it then dies holding applied but unflushed
    // events, which the restart must recover from the last commit.
    run.workload_reaches(seed2, 120).await;
    eventually(
        "the processor flushing the large workload",
        Duration::from_secs(60),
        || async { (run.flushed_item_lines(seed2).await >= 100).then_some(()) },
    )
    .await;
    tokio::time::sleep(FLUSH_INTERVAL / 2).await;
    processor.0.kill().unwrap();
    processor.0.wait().unwrap();
    eprintln!("processor killed with SIGKILL");
    // The broker hands a dead member's partitions on only after its session
    // timed out; a member joining before that leaves them stuck (broker bug).
    tokio::time::sleep(SESSION_TIMEOUT + Duration::from_secs(2)).await;
    let mut processor = run.start_processor();
    wait(&mut workload, "large workload");
    assert!(run.orders_in_postgres(seed2).await >= 300);
    let second = run.caught_up("after SIGKILL and restart").await;
    assert!(second.compared > first.compared);

    // Phase 3: a second member joins, takes partitions and works on a
    // workload, then leaves in the middle of it (rebalances both ways).
    let seed3 = seed + 2;
    let mut second_member = run.start_processor();
    let second_log = run.logs.join(format!("processor-{}.log", run.started));
    eventually(
        "the second member to take partitions",
        Duration::from_secs(60),
        || async {
            let log = std::fs::read_to_string(&second_log).unwrap_or_default();
            log.contains("partition state loaded").then_some(())
        },
    )
    .await;
    let mut workload = run.start_workload(seed3, "large");
    run.workload_reaches(seed3, 200).await;
    terminate(&mut second_member);
    wait(&mut workload, "third workload");
    let third = run.caught_up("after a member joined and left").await;
    assert!(third.compared > second.compared);

    // SIGTERM: flush, commit and exit 0.
    terminate(&mut processor);

    // The reconcile command: exit 0 now, non-zero once a cent is wrong.
    let out = run.processor_command(&["reconcile"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.ends_with(&format!(
            "{} keys compared, 0 differences\n",
            third.compared
        )),
        "{stdout}"
    );

    let sink = run.sink().await;
    sink.client()
        .query(
            "INSERT INTO orders_by_minute SELECT minute, status, source_partition, orders, \
             revenue + toDecimal64(0.01, 2), source_offset + 1000000 FROM orders_by_minute FINAL \
             WHERE orders > 0 ORDER BY minute, status, source_partition LIMIT 1",
        )
        .execute()
        .await
        .unwrap();
    let out = run.processor_command(&["reconcile"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].starts_with("orders_by_minute "), "{stdout}");
    assert!(lines[1].ends_with("1 differences"), "{stdout}");
    let report = run.reconcile().await;
    let d = &report.differences[0];
    let cents = |s: &Option<String>| -> rust_decimal::Decimal {
        s.as_ref()
            .unwrap()
            .split("revenue=")
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        cents(&d.clickhouse) - cents(&d.postgres),
        rust_decimal::Decimal::new(1, 2)
    );

    sink.client()
        .query(&format!("DROP DATABASE {}", run.database))
        .execute()
        .await
        .unwrap();
}
