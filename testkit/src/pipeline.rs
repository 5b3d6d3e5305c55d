//! Running the real processor against the stack: start, kill, terminate it,
//! drive workloads, wait for reconcile, read topics.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etl::reconcile::{reconcile, Report};
use etl::sink::ClickHouseSink;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::{eventually, repo_root, workspace_binary, Stack};

pub const SESSION_TIMEOUT: Duration = Duration::from_secs(6);
pub const CATCH_UP: Duration = Duration::from_secs(120);
pub const TABLES: [&str; 4] = ["customers", "products", "orders", "order_items"];
pub const PARTITIONS: i32 = 4;

/// The processor under test; killed if the test ends early (a failed
/// assertion must not leave it running).
pub struct Processor(pub Child);

impl Drop for Processor {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Processor {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL: a crash, with no flush and no commit.
    pub fn kill(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    /// SIGTERM; waits for the exit.
    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        self.0.wait().unwrap()
    }

    /// SIGTERM; the processor must flush, commit and exit 0.
    pub fn terminate(&mut self) {
        let status = self.sigterm();
        assert!(status.success(), "graceful shutdown exits 0, got {status}");
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

/// The sum of the samples of metric `name` with `labels` that the
/// processor's `/metrics` at `base` serves.
pub async fn metric(base: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One test's processor setup: its own ClickHouse database, consumer group,
/// dead-letter topic and log directory.
pub struct Run {
    pub stack: Stack,
    pub name: String,
    pub database: String,
    pub group: String,
    pub dead_letter_topic: String,
    pub logs: PathBuf,
    pub started: u32,
    /// Extra ETL_* settings of every processor this run starts.
    pub settings: HashMap<String, String>,
    /// The prefix of the table topics it reads (the stack's, unless set).
    pub topic_prefix: String,
}

impl Run {
    /// A run named `name`, with a fresh database and topic.
    pub async fn new(name: &str) -> Run {
        let stack = Stack::load();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let database = format!("{name}_{}", now.as_millis());
        let logs = repo_root().join("target/e2e-logs").join(&database);
        std::fs::create_dir_all(&logs).unwrap();
        eprintln!("{name}: database {database}, logs in {}", logs.display());
        crate::fresh_analytics_db(&stack, &database).await;
        let run = Run {
            topic_prefix: stack.get("ETL_TOPIC_PREFIX").to_owned(),
            dead_letter_topic: format!("{database}.dead_letter"),
            group: format!("{database}-group"),
            stack,
            name: name.to_owned(),
            database,
            logs,
            started: 0,
            settings: HashMap::new(),
        };
        run.create_topic(&run.dead_letter_topic, 1);
        run
    }

    pub fn set(&mut self, name: &str, value: impl ToString) -> &mut Run {
        self.settings.insert(name.to_owned(), value.to_string());
        self
    }

    /// Reads the table topics of another connector's `prefix`.
    pub fn read_topics_of(&mut self, prefix: &str) -> &mut Run {
        self.topic_prefix = prefix.to_owned();
        self.set("ETL_TOPIC_PREFIX", prefix)
    }

    /// Creates a topic (the broker does not on produce); an existing one is fine.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let brokers = self.stack.get("ETL_KAFKA_BROKERS");
        let out = Command::new(self.stack.get("TANSU_BIN"))
            .args(["topic", "create", topic, "--partitions"])
            .arg(partitions.to_string())
            .args(["--broker", &format!("tcp://{brokers}")])
            .output()
            .unwrap();
        // tansu logs its errors to stdout.
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .to_lowercase();
        assert!(
            out.status.success() || text.contains("exist"),
            "creating topic {topic}: {text}"
        );
    }

    /// `etl-processor` with `args`, set up for this run's stack, database,
    /// group and topics.
    pub fn processor_command(&self, args: &[&str]) -> Command {
        self.command("etl-processor", args)
    }

    /// `etl-tools` with `args` (`loadgen`, say), set up as the processor is.
    pub fn tools_command(&self, args: &[&str]) -> Command {
        self.command("etl-tools", args)
    }

    fn command(&self, binary: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(workspace_binary(binary).unwrap());
        cmd.args(args);
        for (k, v) in self.stack.vars() {
            if k.starts_with("ETL_") {
                cmd.env(k, v);
            }
        }
        cmd.env("ETL_CLICKHOUSE_DATABASE", &self.database)
            .env("ETL_KAFKA_GROUP_ID", &self.group)
            .env("ETL_DEAD_LETTER_TOPIC", &self.dead_letter_topic)
            .env(
                "ETL_KAFKA_SESSION_TIMEOUT_MS",
                SESSION_TIMEOUT.as_millis().to_string(),
            )
            // Several processors may run at once: each picks a free port.
            .env("ETL_METRICS_ADDR", "127.0.0.1:0");
        cmd.envs(&self.settings);
        cmd
    }

    pub fn log_path(&self, n: u32) -> PathBuf {
        self.logs.join(format!("processor-{n}.log"))
    }

    pub fn log(&self, n: u32) -> String {
        std::fs::read_to_string(self.log_path(n)).unwrap_or_default()
    }

    /// Where processor `n` serves /metrics and /health (from its log).
    pub async fn metrics_base_url(&self, n: u32) -> String {
        eventually(
            "the processor to log its metrics address",
            Duration::from_secs(60),
            || async move {
                let log = self.log(n);
                let line = log.lines().find(|l| l.contains("serving /metrics"))?;
                let addr = line.split("bound=").nth(1)?.split_whitespace().next()?;
                Some(format!("http://{addr}"))
            },
        )
        .await
    }

    /// Waits until processor `n` has loaded its partitions' state: one line
    /// per aggregate, four in all.
    pub async fn partitions_loaded(&self, n: u32) {
        eventually(
            "the processor to load its partitions",
            Duration::from_secs(60),
            || async { (self.log(n).matches("partition state loaded").count() >= 4).then_some(()) },
        )
        .await;
    }

    /// The last warnings and errors of every processor of this run, so that
    /// a failure far from this machine says what the processors saw.
    pub fn trouble_in_logs(&self) -> String {
        let mut lines = Vec::new();
        for n in 1..=self.started {
            let log = self.log(n);
            let trouble: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            lines.push(format!("processor {n}: {} lines", log.lines().count()));
            let from = trouble.len().saturating_sub(15);
            lines.extend(trouble[from..].iter().map(|l| format!("  {l}")));
        }
        // A test's own Debezium engine: when it started, and each snapshot.
        let engine =
            std::fs::read_to_string(self.logs.join("engine/engine.log")).unwrap_or_default();
        let said: Vec<&str> = engine
            .lines()
            .filter(|l| {
                [
                    "ERROR",
                    "cut short",
                    "connector ",
                    "Snapshot step 1",
                    "Snapshot ended",
                ]
                .iter()
                .any(|word| l.contains(word))
            })
            .collect();
        if !said.is_empty() {
            lines.push("the engine:".to_owned());
            let from = said.len().saturating_sub(40);
            lines.extend(said[from..].iter().map(|l| format!("  {l}")));
        }
        lines.join("\n")
    }

    /// Every processor log of this run, concatenated.
    pub fn all_logs(&self) -> String {
        (1..=self.started).map(|n| self.log(n)).collect()
    }

    pub fn start_processor(&mut self) -> Processor {
        self.started += 1;
        let log = std::fs::File::create(self.log_path(self.started)).unwrap();
        Processor(
            self.processor_command(&["run"])
                .env("ETL_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("etl-processor starts"),
        )
    }

    /// `store_workload.py --seed S ARGS | psql`, in the background.
    pub fn start_workload(&self, seed: u64, args: &str) -> Child {
        let script = repo_root().join("tests/workload/store_workload.py");
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "python3 '{}' --seed {seed} {args} | psql -X -q -v ON_ERROR_STOP=1 >/dev/null",
                script.display()
            ))
            .env("PGHOST", self.stack.get("PGHOST"))
            .env("PGPORT", self.stack.get("PGPORT"))
            .env("PGUSER", self.stack.get("PGUSER"))
            .env("PGDATABASE", self.stack.get("PGDATABASE"))
            .spawn()
            .unwrap()
    }

    /// `scripts/stack ARGS` (stop/start a component of the running stack).
    pub fn stack_command(&self, args: &[&str]) {
        let status = Command::new(repo_root().join("scripts/stack"))
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "scripts/stack {args:?} failed: {status}");
    }

    pub async fn sink(&self) -> ClickHouseSink {
        ClickHouseSink::connect(&self.stack.clickhouse_config(&self.database))
            .await
            .unwrap()
    }

    pub async fn reconcile(&self) -> Report {
        reconcile(self.stack.get("ETL_POSTGRES_URL"), &self.sink().await)
            .await
            .unwrap()
    }

    /// Waits until reconcile is exact (the processor caught up); at the
    /// deadline, fails with the differences still there.
    pub async fn caught_up(&self, phase: &str) -> Report {
        self.caught_up_within(phase, CATCH_UP).await
    }

    pub async fn caught_up_within(&self, phase: &str, deadline: Duration) -> Report {
        let started = Instant::now();
        loop {
            let report = self.reconcile().await;
            if report.is_exact() {
                eprintln!(
                    "{}: {phase}: exact after {:?}, {} keys",
                    self.name,
                    started.elapsed(),
                    report.compared
                );
                return report;
            }
            if started.elapsed() > deadline {
                let shown: Vec<String> = report
                    .differences
                    .iter()
                    .take(10)
                    .map(|d| d.to_string())
                    .collect();
                panic!(
                    "{}: {phase}: {} differences after {deadline:?}, e.g.\n{}\n\
                     the processors' warnings and errors:\n{}",
                    self.name,
                    report.differences.len(),
                    shown.join("\n"),
                    self.trouble_in_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the workload of `seed` has created `orders` orders.
    pub async fn workload_reaches(&self, seed: u64, orders: i64) {
        let what = format!("workload {seed} to reach {orders} orders");
        eventually(&what, Duration::from_secs(90), || async {
            (self.orders_in_postgres(seed).await >= orders).then_some(())
        })
        .await;
    }

    pub async fn orders_in_postgres(&self, seed: u64) -> i64 {
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

    /// Order lines of the workload's own products already in ClickHouse.
    pub async fn flushed_item_lines(&self, seed: u64) -> i64 {
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

    /// Records of the table topics not yet committed by the run's group.
    pub fn lag(&self) -> i64 {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.stack.get("ETL_KAFKA_BROKERS"))
            .set("group.id", &self.group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for table in TABLES {
            for p in 0..PARTITIONS {
                tpl.add_partition(&self.table_topic(table), p);
            }
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap();
        let mut lag = 0;
        for e in committed.elements() {
            let (low, high) = consumer
                .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(10))
                .unwrap();
            let at = match e.offset() {
                Offset::Offset(o) => o,
                _ => low,
            };
            lag += high - at;
        }
        lag
    }

    pub fn table_topic(&self, table: &str) -> String {
        format!("{}.public.{table}", self.topic_prefix)
    }

    /// Every record of `topic` (all partitions) up to its current end.
    pub fn read_topic(&self, topic: &str, partitions: i32) -> Vec<TopicRecord> {
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.stack.get("ETL_KAFKA_BROKERS"))
            .set("group.id", format!("{}-reader", self.group))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut records = Vec::new();
        for partition in 0..partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .unwrap();
            if high <= low {
                continue;
            }
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, partition, Offset::Offset(low))
                .unwrap();
            consumer.assign(&tpl).unwrap();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut next = low;
            while next < high {
                assert!(Instant::now() < deadline, "reading {topic}/{partition}");
                let Some(message) = consumer.poll(Duration::from_millis(500)) else {
                    continue;
                };
                let m = message.unwrap();
                // A record fetched for the previous assignment can still come out.
                if m.partition() != partition || m.topic() != topic {
                    continue;
                }
                next = m.offset() + 1;
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                let value =
                                    h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                                (h.key.to_owned(), value.unwrap_or_default())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                records.push(TopicRecord {
                    partition,
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
            }
        }
        records
    }
}

/// Starts a stack component again if the test fails while it is stopped, so
/// that the tests after it do not all fail on a service left down.
pub struct StartedAgainOnFailure(pub &'static str);

impl Drop for StartedAgainOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new(repo_root().join("scripts/stack"))
                .args(["start", self.0])
                .status();
        }
    }
}

#[derive(Debug, Clone)]
pub struct TopicRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

pub fn wait(child: &mut Child, what: &str) {
    let status = child.wait().unwrap();
    assert!(status.success(), "{what} failed: {status}");
}
