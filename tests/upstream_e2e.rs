//! What happens upstream of the processor, on the real stack: a source that
//! starts over must never be counted on silently.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::eventually;
use common::pipeline::{Run, PARTITIONS, TABLES};

/// Exit code of a processor that found a partition's log started over.
const EXIT_LOG_STARTED_OVER: i32 = 5;

/// A second tansu broker with empty topics: Kafka's data gone, as after
/// `docker compose down` without a Kafka volume or a recreated topic.
struct FreshBroker {
    child: Child,
    address: String,
    _dir: PathBuf,
}

impl Drop for FreshBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

impl FreshBroker {
    async fn start(run: &Run) -> FreshBroker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = format!("127.0.0.1:{port}");
        let dir = common::repo_root()
            .join("target/e2e-logs")
            .join(&run.database)
            .join("fresh-broker");
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("broker.log")).unwrap();
        let child = Command::new(run.stack.get("TANSU_BIN"))
            .current_dir(&dir)
            .args(["broker", "--listener-url"])
            .arg(format!("tcp://{address}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://{address}"))
            .args(["--storage-engine", "sqlite://tansu.db"])
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tansu starts");
        let broker = FreshBroker {
            child,
            address,
            _dir: dir,
        };
        let prefix = run.stack.get("ETL_TOPIC_PREFIX").to_owned();
        let mut topics: Vec<(String, i32)> = TABLES
            .iter()
            .map(|t| (format!("{prefix}.public.{t}"), PARTITIONS))
            .collect();
        topics.push((run.dead_letter_topic.clone(), 1));
        eventually(
            "the fresh broker to create its topics",
            Duration::from_secs(30),
            || async {
                topics
                    .iter()
                    .all(|(topic, partitions)| broker.create_topic(run, topic, *partitions))
                    .then_some(())
            },
        )
        .await;
        broker
    }

    /// True once the topic exists (created now or before).
    fn create_topic(&self, run: &Run, topic: &str, partitions: i32) -> bool {
        let out = Command::new(run.stack.get("TANSU_BIN"))
            .args(["topic", "create", topic, "--partitions"])
            .arg(partitions.to_string())
            .args(["--broker", &format!("tcp://{}", self.address)])
            .output()
            .unwrap();
        out.status.success() || String::from_utf8_lossy(&out.stderr).contains("exist")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn a_log_that_started_over_stops_the_processor_and_counts_nothing() {
    // The aggregates of everything the stack's topics hold, exact.
    let mut run = Run::new("started_over").await;
    let mut processor = run.start_processor();
    let before = run.caught_up("from the stack's topics").await;
    processor.terminate();
    assert!(before.compared >= 10, "too few keys: {}", before.compared);

    // The same ClickHouse database, now fed by a broker whose topics start
    // over at offset 0.
    let broker = FreshBroker::start(&run).await;
    run.set("ETL_KAFKA_BROKERS", &broker.address);
    let mut processor = run.start_processor();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = processor.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the processor kept running on a log that started over:\n{}",
            run.log(2)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let log = run.log(2);
    assert_eq!(
        status.code(),
        Some(EXIT_LOG_STARTED_OVER),
        "exit code of a log that started over:\n{log}"
    );
    let prefix = run.stack.get("ETL_TOPIC_PREFIX");
    let said = log
        .lines()
        .find(|l| l.contains("the topic started over"))
        .unwrap_or_else(|| panic!("no line says the topic started over:\n{log}"));
    assert!(
        said.contains(&format!("{prefix}.public.")) && said.contains("ends at offset 0"),
        "the line names the topic, the partition and its end: {said}"
    );

    // Nothing was counted: the aggregates are still exactly the GROUP BY.
    let after = run.reconcile().await;
    assert!(
        after.is_exact(),
        "{} differences after the stop",
        after.differences.len()
    );
    assert_eq!(after.compared, before.compared);
    drop(broker);
}
