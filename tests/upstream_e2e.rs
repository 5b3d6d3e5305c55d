//! What happens upstream of the processor, on the real stack: a connector
//! that is killed and sends events again, and a source that starts over,
//! must never be counted on silently.
// They inject faults (ETL_FAULT_*), which only a build with the feature has.
#![cfg(feature = "faults")]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etl_testkit::eventually;
use etl_testkit::pipeline::{metric, wait, Processor, Run, PARTITIONS, SESSION_TIMEOUT, TABLES};
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Exit code of a processor that found a partition's log started over.
const EXIT_LOG_STARTED_OVER: i32 = 5;

/// These tests change what every processor reads upstream (Postgres, its
/// WAL and slots) and assert exact totals or unchanged ones: another test's
/// workload meanwhile would move Postgres under a comparison, and load the
/// two cores the kills are timed on. So they run one at a time.
async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    // Not std's: its guard is held across awaits (and a failed test
    // would poison it).
    static UPSTREAM: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    UPSTREAM.lock().await
}

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
        let dir = etl_testkit::repo_root()
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
        let prefix = run.topic_prefix.clone();
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
    let _alone = one_at_a_time().await;
    // The aggregates of everything the stack's topics hold, exact.
    let mut run = Run::new("started_over").await;
    let mut processor = run.start_processor();
    let exact = run.caught_up("from the stack's topics").await;
    processor.terminate();
    assert!(exact.compared >= 10, "too few keys: {}", exact.compared);
    // What ClickHouse holds, not a comparison with Postgres: the other
    // tests write to Postgres meanwhile.
    let before = fingerprint(&run).await;

    // The same ClickHouse database, now fed by a broker whose topics start
    // over at offset 0.
    let broker = FreshBroker::start(&run).await;
    run.set("ETL_KAFKA_BROKERS", &broker.address);
    let mut processor = run.start_processor();
    let status = stops(&mut processor, &run, 2).await;
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

    // Nothing was counted: the aggregates are still what they were.
    assert_eq!(
        fingerprint(&run).await,
        before,
        "something was counted; the processor's log:\n{log}"
    );
    drop(broker);
}

/// Waits for processor `n` of `run` to exit on its own; fails with its log
/// if it goes on counting.
async fn stops(processor: &mut Processor, run: &Run, n: u32) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = processor.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the processor kept running:\n{}",
            run.log(n)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A Debezium engine of one test's own: its own replication slot, offsets
/// and topics, so that it can be killed without touching the stack's.
struct OwnEngine {
    prefix: String,
    slot: String,
    dir: PathBuf,
    python: String,
    brokers: String,
    pg: [(&'static str, String); 4],
    child: Option<Child>,
}

impl OwnEngine {
    /// Creates its topics; nothing runs yet.
    fn new(run: &Run) -> OwnEngine {
        let prefix = format!("{}_src", run.database);
        for table in TABLES {
            run.create_topic(&format!("{prefix}.public.{table}"), PARTITIONS);
        }
        run.create_topic(&format!("__debezium-heartbeat.{prefix}"), 1);
        let dir = run.logs.join("engine");
        std::fs::create_dir_all(&dir).unwrap();
        OwnEngine {
            slot: format!("{}_slot", run.database),
            prefix,
            dir,
            python: run.stack.get("STACK_PYTHON").to_owned(),
            brokers: run.stack.get("ETL_KAFKA_BROKERS").to_owned(),
            pg: ["PGHOST", "PGPORT", "PGUSER", "PGDATABASE"]
                .map(|k| (k, run.stack.get(k).to_owned())),
            child: None,
        }
    }

    /// Starts the engine on its stored offsets, with connector settings
    /// `extra` on top of the project's connector and of a Kafka Connect
    /// worker's habit of storing offsets only every few seconds: a kill
    /// then makes it send again what it sent since.
    fn start(&mut self, extra: &[&str]) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("engine.log"))
            .unwrap();
        let mut cmd = Command::new(&self.python);
        cmd.arg(etl_testkit::repo_root().join("scripts/debezium-engine.py"))
            .arg("--state-dir")
            .arg(&self.dir)
            .args(["--sink", "kafka", "--brokers", &self.brokers])
            .args(["--set", &format!("topic.prefix={}", self.prefix)])
            .args(["--set", &format!("slot.name={}", self.slot)])
            .args([
                "--set",
                &format!("offset.flush.interval.ms={}", OFFSET_FLUSH.as_millis()),
            ]);
        for setting in extra {
            cmd.args(["--set", setting]);
        }
        let child = cmd
            .envs(self.pg.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the Debezium engine starts");
        self.child = Some(child);
    }

    /// Its offsets are gone (they lived in the lost broker, as Kafka
    /// Connect's do), and it now writes to `brokers`.
    fn moved_to(&mut self, brokers: &str) {
        self.forget_offsets();
        self.brokers = brokers.to_owned();
    }

    /// Deletes its stored offsets: it starts with a new snapshot.
    fn forget_offsets(&mut self) {
        assert!(self.child.is_none());
        std::fs::remove_file(self.dir.join("offsets.dat")).unwrap();
    }

    /// SIGKILL: the engine stores no offsets on its way out.
    fn kill(&mut self) {
        let mut child = self.child.take().expect("the engine runs");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Waits until the engine reads the WAL and has stored offsets that say
    /// so: killed before that, it would take a new snapshot (the case the
    /// processor stops on, not the one these kills are about).
    async fn streaming(&self, run: &Run) {
        let sql = "SELECT count(*) FROM pg_replication_slots s \
                   JOIN pg_stat_replication r ON r.pid = s.active_pid \
                   WHERE s.slot_name = $1 AND r.state = 'streaming'";
        let (pg, conn) =
            tokio_postgres::connect(run.stack.get("ETL_POSTGRES_URL"), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        let offsets = self.dir.join("offsets.dat");
        eventually(
            "the engine to stream with its offsets stored",
            Duration::from_secs(180),
            || async {
                let n: i64 = pg.query_one(sql, &[&self.slot]).await.unwrap().get(0);
                let stored = std::fs::read(&offsets).unwrap_or_default();
                // Offsets of a snapshot under way hold "snapshot":"INITIAL".
                let streaming = contains(&stored, b"\"lsn\"")
                    && (!contains(&stored, b"\"snapshot\"")
                        || contains(&stored, b"\"snapshot_completed\":true"));
                (n == 1 && streaming).then_some(())
            },
        )
        .await;
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl OwnEngine {
    /// A new replication slot and no stored offsets: the engine's next start
    /// takes a new snapshot, consistent with where it then streams from.
    fn take_new_slot(&mut self) {
        self.forget_offsets();
        self.drop_slot();
        self.slot = format!("{}_next", self.slot);
    }

    /// Drops the slot, which holds WAL back; it can be dropped once its
    /// walsender has noticed the engine is gone.
    fn drop_slot(&self) {
        let sql = format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = '{}' AND NOT active",
            self.slot
        );
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            let out = Command::new("psql")
                .args(["-X", "-tA", "-c", &sql])
                .envs(self.pg.iter().map(|(k, v)| (k, v)))
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).trim() == "" && out.status.success() {
                let left = Command::new("psql")
                    .args(["-X", "-tA", "-c"])
                    .arg(format!(
                        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
                        self.slot
                    ))
                    .envs(self.pg.iter().map(|(k, v)| (k, v)))
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&left.stdout).trim() == "0" {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!("replication slot {} left behind", self.slot);
    }
}

impl Drop for OwnEngine {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill();
        }
        self.drop_slot();
    }
}

/// How often the test's engine stores its offsets. Kafka Connect's default
/// is a minute; a few seconds keep the test short and still make every kill
/// send again the events of the seconds before it.
const OFFSET_FLUSH: Duration = Duration::from_secs(5);

/// Records in all partitions of `topic` on the stack's broker.
fn records_in(run: &Run, topic: &str, partitions: i32) -> i64 {
    records_in_broker(run.stack.get("ETL_KAFKA_BROKERS"), topic, 0, partitions)
}

/// Records in partitions `first..first + n` of `topic` on `brokers`.
fn records_in_broker(brokers: &str, topic: &str, first: i32, n: i32) -> i64 {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    (first..first + n)
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap();
            high - low
        })
        .sum()
}

/// The sum of a counter over its label sets, from /metrics.
/// Workload seeds of their own (ids from 1000 + seed * 100000 on), apart
/// from the other suites' seeds.
fn seeds() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    700_000 + now.as_secs() % 3_000 * 20
}

/// Kafka's file offset store rewrites its file in place, and reads a file
/// cut short as no offsets at all: an engine killed while saving would take
/// a new snapshot after it had streamed. The engine puts back the last
/// complete copy instead; without one, it says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn an_engine_killed_while_saving_its_offsets_goes_on_from_the_last_complete_copy() {
    let _alone = one_at_a_time().await;
    let run = Run::new("offsets_cut").await;
    let mut engine = OwnEngine::new(&run);
    engine.start(&[]);
    engine.streaming(&run).await;
    let (offsets, copy) = (
        engine.dir.join("offsets.dat"),
        engine.dir.join("offsets.dat.complete"),
    );
    eventually(
        "the engine to copy its offsets",
        Duration::from_secs(30),
        || async { (std::fs::read(&copy).ok() == std::fs::read(&offsets).ok()).then_some(()) },
    )
    .await;
    engine.kill();
    let topic = format!("{}.public.products", engine.prefix);
    let sent = records_in(&run, &topic, PARTITIONS);
    assert!(sent > 0, "the snapshot sent no products");
    let engine_log = engine.dir.join("engine.log");
    let log = || std::fs::read_to_string(&engine_log).unwrap();

    // Complete offsets are taken as they are.
    engine.start(&[]);
    engine.streaming(&run).await;
    engine.kill();
    assert!(
        !log().contains("cut short"),
        "complete offsets taken for cut:\n{}",
        log()
    );
    assert_eq!(records_in(&run, &topic, PARTITIONS), sent);

    // What a kill between the store's truncate and its write leaves: the
    // object stream's header alone.
    let cut = [0xAC, 0xED, 0x00, 0x05];
    std::fs::write(&offsets, cut).unwrap();
    engine.start(&[]);
    engine.streaming(&run).await;
    let log = log();
    assert!(log.contains("was cut short"), "the engine says so:\n{log}");
    assert_eq!(
        records_in(&run, &topic, PARTITIONS),
        sent,
        "the engine took a new snapshot"
    );

    // Without a copy nothing can be put back: the engine says so and takes
    // a new snapshot, which a processor that saw streaming stops on.
    engine.kill();
    std::fs::write(&offsets, cut).unwrap();
    std::fs::remove_file(&copy).unwrap();
    engine.start(&[]);
    engine.streaming(&run).await;
    let log = std::fs::read_to_string(&engine_log).unwrap();
    assert!(log.contains("no complete copy exists"), "{log}");
    assert_eq!(records_in(&run, &topic, PARTITIONS), 2 * sent);
}

/// The issue's scenario: the connector is SIGKILLed 10 times, once during
/// its initial snapshot and 9 times during workloads, and sends again what
/// it had not stored offsets for, at new Kafka offsets. Two processors read
/// the same topics: with the position guard, the aggregates end exact; the
/// negative control, without it, must find differences, or the test proves
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn ten_engine_kills_neither_lose_nor_double_count() {
    let _alone = one_at_a_time().await;
    let mut guarded = Run::new("engine_kills").await;
    let mut unguarded = Run::new("engine_kills_unguarded").await;
    let mut engine = OwnEngine::new(&guarded);
    guarded.read_topics_of(&engine.prefix);
    unguarded
        .read_topics_of(&engine.prefix)
        .set("ETL_FAULT_NO_POSITION_GUARD", "true");
    let mut processors = [guarded.start_processor(), unguarded.start_processor()];

    // Kill 1: during the initial snapshot, slowed to batches of 10 rows.
    engine.start(&["max.batch.size=10"]);
    let prefix = engine.prefix.clone();
    let topic = |table: &str| format!("{prefix}.public.{table}");
    eventually(
        "the snapshot to begin",
        Duration::from_secs(180),
        || async { (records_in(&guarded, &topic("customers"), PARTITIONS) > 0).then_some(()) },
    )
    .await;
    engine.kill();
    let items = records_in(&guarded, &topic("order_items"), PARTITIONS);
    assert_eq!(
        items, 0,
        "the snapshot ended before the kill: it reached order_items"
    );
    eprintln!("engine_kills: kill 1 of 10 during the initial snapshot");
    engine.start(&[]);
    engine.streaming(&guarded).await;

    // Kills 2 to 10: each in the middle of a workload, which goes on while
    // the engine is down.
    let first = seeds();
    let mut rng = fastrand::Rng::with_seed(first);
    for kill in 2..=10 {
        let seed = first + kill;
        let mut workload = guarded.start_workload(seed, "--size small");
        // The workload deletes some of its 45 orders as it goes: a kill
        // after at most 25 of them lands while it runs.
        let orders = rng.i64(3..25);
        guarded.workload_reaches(seed, orders).await;
        engine.kill();
        eprintln!("engine_kills: kill {kill} of 10 after {orders} orders of workload {seed}");
        wait(&mut workload, "workload");
        engine.start(&[]);
        engine.streaming(&guarded).await;
    }

    let report = guarded.caught_up("after 10 engine kills").await;
    let base = guarded.metrics_base_url(1).await;
    let repeats = metric(&base, "etl_source_repeats_skipped_total", &[]).await;
    let snapshots = metric(&base, "etl_new_snapshots_total", &[]).await;
    eprintln!(
        "engine_kills: exact over {} keys; {repeats} events sent again were skipped, {snapshots} \
         partitions took the restarted snapshot",
        report.compared
    );
    assert!(
        repeats > 0.0,
        "the kills made the connector send nothing again"
    );
    assert!(snapshots > 0.0, "no partition saw the restarted snapshot");

    eventually(
        "the unguarded processor to commit everything",
        Duration::from_secs(120),
        || async { (unguarded.lag() == 0).then_some(()) },
    )
    .await;
    for processor in &mut processors {
        processor.terminate();
    }
    let without = unguarded.reconcile().await;
    eprintln!(
        "engine_kills: without the position guard, {} differences in {} keys",
        without.differences.len(),
        without.compared
    );
    assert!(
        !without.is_exact(),
        "without the position guard, the repeats must count twice"
    );
    drop(engine);
}

/// Real events produced again at new offsets, the way a restarted Kafka
/// Connect worker sends them: in every partition of the sums' topics, the
/// events after a point, again, in order. The guarded processor skips
/// exactly those and stays exact; the negative control counts them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn real_events_produced_again_at_new_offsets_change_nothing() {
    let _alone = one_at_a_time().await;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let mut guarded = Run::new("repeated").await;
    let mut unguarded = Run::new("repeated_unguarded").await;
    let mut engine = OwnEngine::new(&guarded);
    guarded.read_topics_of(&engine.prefix);
    unguarded
        .read_topics_of(&engine.prefix)
        .set("ETL_FAULT_NO_POSITION_GUARD", "true");
    engine.start(&[]);
    engine.streaming(&guarded).await;
    let seed = seeds() + 15;
    wait(
        &mut guarded.start_workload(seed, "--size small"),
        "workload",
    );
    let mut processors = [guarded.start_processor(), unguarded.start_processor()];
    guarded.caught_up("before the repeat").await;

    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", guarded.stack.get("ETL_KAFKA_BROKERS"))
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let mut repeated = 0;
    for table in ["customers", "orders", "order_items"] {
        let topic = guarded.table_topic(table);
        let records = guarded.read_topic(&topic, PARTITIONS);
        for partition in 0..PARTITIONS {
            // The streamed events of the partition (a restarted worker
            // resumes streaming; it does not send snapshot rows again).
            let streamed: Vec<_> = records
                .iter()
                .filter(|r| r.partition == partition)
                .skip_while(|r| {
                    r.value
                        .as_deref()
                        .is_some_and(|v| contains(v, br#""op":"r""#))
                })
                .collect();
            // Everything from the middle on, again.
            for record in &streamed[streamed.len() / 2..] {
                let mut again = FutureRecord::to(&topic).partition(partition);
                if let Some(key) = &record.key {
                    again = again.key(key);
                }
                if let Some(value) = &record.value {
                    again = again.payload(value);
                    repeated += 1;
                }
                producer.send(again, Duration::from_secs(10)).await.unwrap();
            }
        }
    }
    assert!(repeated >= 100, "only {repeated} events produced again");

    for run in [&guarded, &unguarded] {
        eventually(
            "the processors to commit everything",
            Duration::from_secs(120),
            || async { (run.lag() == 0).then_some(()) },
        )
        .await;
    }
    let report = guarded.caught_up("after the repeat").await;
    let base = guarded.metrics_base_url(1).await;
    let skipped = metric(&base, "etl_source_repeats_skipped_total", &[]).await;
    eprintln!(
        "repeated: {repeated} events produced again, {skipped} skipped as repeats; exact over {} keys",
        report.compared
    );
    assert_eq!(skipped, f64::from(repeated), "every repeat, and only those");
    for processor in &mut processors {
        processor.terminate();
    }
    let without = unguarded.reconcile().await;
    eprintln!(
        "repeated: without the position guard, {} differences in {} keys",
        without.differences.len(),
        without.compared
    );
    assert!(
        !without.is_exact(),
        "the negative control counted the repeats"
    );
    drop(engine);
}

/// What the sums hold, in a form that changes with any count: rows, and
/// the sums of their values and offsets.
async fn fingerprint(run: &Run) -> Vec<(u64, i64, u64)> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Print {
        rows: u64,
        total: i64,
        offsets: u64,
    }
    let sink = run.sink().await;
    let mut prints = Vec::new();
    for (table, value) in [
        ("orders_by_minute", "orders"),
        ("product_sales", "units"),
        ("customers_by_minute", "customers"),
    ] {
        let sql = format!(
            "SELECT count() AS rows, sum({value}) AS total, sum(source_offset) AS offsets FROM {table}"
        );
        let p: Print = sink.client().query(&sql).fetch_one().await.unwrap();
        prints.push((p.rows, p.total, p.offsets));
    }
    prints
}

/// Kafka's data is lost with Connect's offsets in it (a broker without a
/// volume, say) while ClickHouse keeps its rows: the connector takes a new
/// snapshot into new topics, which outgrow the offsets ClickHouse stored
/// before the processor comes back. The offsets alone look like a replay;
/// the positions show the log is another one, and the processor stops
/// with exit code 5, having counted nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn a_recreated_log_grown_past_the_stored_offsets_stops_the_processor() {
    let _alone = one_at_a_time().await;
    let mut run = Run::new("grown_past").await;
    let mut engine = OwnEngine::new(&run);
    run.read_topics_of(&engine.prefix);
    engine.start(&[]);
    engine.streaming(&run).await;
    let mut processor = run.start_processor();
    run.caught_up("from the snapshot").await;
    processor.terminate();
    let before = fingerprint(&run).await;

    let ends = |brokers: String| {
        let run = &run;
        move || -> Vec<i64> {
            TABLES
                .iter()
                .flat_map(|t| {
                    let topic = run.table_topic(t);
                    let brokers = brokers.clone();
                    (0..PARTITIONS).map(move |p| records_in_broker(&brokers, &topic, p, 1))
                })
                .collect()
        }
    };
    let old = ends(run.stack.get("ETL_KAFKA_BROKERS").to_owned())();

    engine.kill();
    let broker = FreshBroker::start(&run).await;
    engine.moved_to(&broker.address);
    engine.start(&[]);
    engine.streaming(&run).await;
    // Changes after the new snapshot, until every partition's new log is
    // longer than the old one was: the offsets checked at assignment then
    // see nothing wrong.
    let new = ends(broker.address.clone());
    let mut seed = seeds() + 16;
    while new().iter().zip(&old).any(|(n, o)| n <= o) {
        wait(&mut run.start_workload(seed, "--size large"), "workload");
        seed += 1;
        assert!(seed < seeds() + 20, "the new log did not outgrow the old");
    }

    run.set("ETL_KAFKA_BROKERS", &broker.address);
    let mut processor = run.start_processor();
    let status = stops(&mut processor, &run, 2).await;
    let log = run.log(2);
    assert_eq!(status.code(), Some(EXIT_LOG_STARTED_OVER), "{log}");
    assert!(
        log.contains("the offset was counted before") && log.contains("the topic started over"),
        "the positions, not the offsets, told:\n{log}"
    );
    assert_eq!(
        fingerprint(&run).await,
        before,
        "something was counted; the processor's log:\n{log}"
    );
    drop(engine);
    drop(broker);
}

/// The connector loses its offsets while Kafka keeps its topics, and takes a
/// new snapshot after it has streamed changes: changes between the two may
/// be lost or come again, which no guard can settle. The processor stops
/// with exit code 5 and says why, having counted nothing of the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn a_new_snapshot_after_streaming_stops_the_processor() {
    let _alone = one_at_a_time().await;
    let mut run = Run::new("new_snapshot").await;
    let mut engine = OwnEngine::new(&run);
    run.read_topics_of(&engine.prefix);
    engine.start(&[]);
    engine.streaming(&run).await;
    let mut processor = run.start_processor();
    // Enough changes that every partition has streamed some.
    wait(
        &mut run.start_workload(seeds() + 17, "--size large"),
        "workload",
    );
    let exact = run.caught_up("after the workload").await;
    let before = fingerprint(&run).await;

    engine.kill();
    engine.forget_offsets();
    engine.start(&[]);
    let status = stops(&mut processor, &run, 1).await;
    let log = run.log(1);
    assert_eq!(status.code(), Some(EXIT_LOG_STARTED_OVER), "{log}");
    assert!(
        log.contains("a new snapshot after streaming began"),
        "the processor says why:\n{log}"
    );
    assert_eq!(fingerprint(&run).await, before, "something was counted");
    assert!(exact.compared > 0);
    drop(engine);
}

/// What a dashboard reads of each live table, in one query: its rows and
/// the sums of its values.
async fn live_totals(sink: &etl::sink::ClickHouseSink) -> Result<Vec<String>, String> {
    let sql = "SELECT concat('orders_by_minute ', toString(count()), ' ', toString(sum(orders)), ' ', toString(sum(revenue))) FROM orders_by_minute FINAL \
               UNION ALL SELECT concat('product_sales ', toString(count()), ' ', toString(sum(units)), ' ', toString(sum(revenue))) FROM product_sales FINAL \
               UNION ALL SELECT concat('customers_by_minute ', toString(count()), ' ', toString(sum(customers))) FROM customers_by_minute FINAL \
               UNION ALL SELECT concat('products ', toString(count()), ' ', toString(sum(price))) FROM products FINAL";
    let mut rows: Vec<String> = sink
        .client()
        .query(sql)
        .fetch_all()
        .await
        .map_err(|e| e.to_string())?;
    rows.sort();
    Ok(rows)
}

/// A run whose processor counted a workload streamed by an engine of its
/// own; then the engine takes a new snapshot from a new slot while loadgen
/// writes to the store. Returns the run, the engine, processor 1 and
/// loadgen, all running.
async fn new_snapshot_under_load(name: &str, settings: &[(&str, &str)]) -> NewSnapshot {
    let mut run = Run::new(name).await;
    let mut engine = OwnEngine::new(&run);
    run.read_topics_of(&engine.prefix);
    for (key, value) in settings {
        run.set(key, value);
    }
    engine.start(&[]);
    engine.streaming(&run).await;
    let processor = run.start_processor();
    wait(
        &mut run.start_workload(seeds() + 18, "--size large"),
        "workload",
    );
    run.caught_up("before the new snapshot").await;

    engine.kill();
    engine.take_new_slot();
    let loadgen_log = std::fs::File::create(run.logs.join("loadgen.log")).unwrap();
    let seed = seeds().to_string();
    let loadgen = Processor(
        run.tools_command(&["loadgen", "--rate", "10", "--seed", &seed])
            .stdout(Stdio::null())
            .stderr(loadgen_log)
            .spawn()
            .unwrap(),
    );
    engine.start(&[]);
    NewSnapshot {
        run,
        engine,
        processor,
        loadgen,
    }
}

struct NewSnapshot {
    run: Run,
    engine: OwnEngine,
    processor: Processor,
    loadgen: Processor,
}

/// The issue's rebuild: the connector takes a new snapshot after
/// streaming, from a new slot, and the processor stops (exit code 5).
/// `rebuild`, while loadgen writes to the store, counts from the new
/// snapshot into shadow tables and swaps them in. A reader of the live
/// tables meanwhile sees each table's old totals, then its rebuilt ones,
/// nothing between and no error. The processor started again goes on from
/// the rebuilt rows, and reconcile is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn a_rebuild_while_loadgen_runs_swaps_in_whole_totals() {
    let _alone = one_at_a_time().await;
    let NewSnapshot {
        mut run,
        engine,
        mut processor,
        mut loadgen,
    } = new_snapshot_under_load("rebuild", &[]).await;
    let status = stops(&mut processor, &run, 1).await;
    let exited = Instant::now();
    assert_eq!(status.code(), Some(EXIT_LOG_STARTED_OVER), "{}", run.log(1));
    engine.streaming(&run).await;

    let sink = run.sink().await;
    let before = live_totals(&sink).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, reads, sink) = (stop.clone(), reads.clone(), sink.clone());
        tokio::spawn(async move {
            // Each distinct reading, in the order first seen.
            let mut seen: Vec<Vec<String>> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let reading = live_totals(&sink).await;
                let reading = reading.unwrap_or_else(|e| vec![format!("error: {e}")]);
                if seen.last() != Some(&reading) {
                    seen.push(reading);
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            seen
        })
    };
    let started = Instant::now();
    let rebuild = run.processor_command(&["rebuild"]).output().unwrap();
    let took = started.elapsed();
    let said = String::from_utf8_lossy(&rebuild.stdout).into_owned();
    let logged = String::from_utf8_lossy(&rebuild.stderr).into_owned();
    assert!(
        rebuild.status.success(),
        "rebuild failed:\n{said}\n{logged}"
    );
    eprintln!("rebuild: took {took:?} while loadgen ran:\n{said}");
    let after = live_totals(&sink).await.unwrap();
    let at_swap = reads.load(Ordering::Relaxed);
    eventually(
        "the reader to read the rebuilt tables",
        Duration::from_secs(10),
        || async { (reads.load(Ordering::Relaxed) > at_swap + 1).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let seen = reader.await.unwrap();
    let reads = reads.load(Ordering::Relaxed);
    eprintln!("rebuild: {reads} readings of the live tables during the rebuild");
    assert_ne!(before, after, "the rebuild changed nothing");
    for table in 0..before.len() {
        let readings: Vec<&String> = seen.iter().map(|r| &r[table.min(r.len() - 1)]).collect();
        let mut distinct: Vec<&String> = readings.clone();
        distinct.dedup();
        assert!(
            distinct
                .iter()
                .all(|r| **r == before[table] || **r == after[table]),
            "a reader saw a table neither old nor rebuilt: {distinct:?}\nold: {}\nnew: {}",
            before[table],
            after[table]
        );
        assert!(
            distinct.len() <= 2,
            "a table went back and forth: {distinct:?}"
        );
    }
    assert_eq!(seen.first(), Some(&before), "{seen:?}");
    assert_eq!(seen.last(), Some(&after), "{seen:?}");
    assert!(
        said.contains("swapped in") && said.contains("0 dead letters"),
        "{said}"
    );

    // Processor 2 goes on from the rebuilt rows, while loadgen still runs.
    // Processor 1 exited without leaving the group: the broker hands its
    // partitions on only after its session timed out, and a member joining
    // before that is left without them (broker bug).
    if let Some(left) = (SESSION_TIMEOUT + Duration::from_secs(2)).checked_sub(exited.elapsed()) {
        tokio::time::sleep(left).await;
    }
    let mut processor = run.start_processor();
    run.partitions_loaded(2).await;
    let status = loadgen.sigterm();
    assert!(status.success(), "loadgen: {status}");
    let report = run.caught_up("after the rebuild").await;
    eprintln!(
        "rebuild: exact over {} keys after the rebuild",
        report.compared
    );
    let log = run.log(2);
    assert!(!log.contains("ERROR"), "{log}");
    processor.terminate();
    drop(engine);
}

/// The automatic path: with `ETL_ON_SOURCE_STARTED_OVER=rebuild`, the
/// processor that meets the new snapshot rebuilds in place (the same
/// process, which never exits), waiting for the snapshot to finish, and
/// goes on counting: reconcile is exact. A rebuild run by hand while it
/// runs refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn with_rebuild_on_a_new_snapshot_the_processor_rebuilds_and_goes_on() {
    let _alone = one_at_a_time().await;
    let NewSnapshot {
        run,
        engine,
        mut processor,
        mut loadgen,
    } = new_snapshot_under_load(
        "auto_rebuild",
        &[
            ("ETL_ON_SOURCE_STARTED_OVER", "rebuild"),
            // Flushes every 100 ms, so that the processor surely writes
            // while the rebuild by hand below reads (a second on a small
            // store): that is what the rebuild sees of a running processor.
            ("ETL_FLUSH_INTERVAL_MS", "100"),
        ],
    )
    .await;
    let swapped = eventually(
        "the processor to rebuild in place",
        Duration::from_secs(180),
        || async {
            let log = run.log(1);
            log.lines()
                .find(|l| l.contains("rebuild: swapped in"))
                .map(str::to_owned)
        },
    )
    .await;
    eprintln!("auto_rebuild: {swapped}");
    let log = run.log(1);
    assert!(
        log.contains("a new snapshot after streaming began")
            && log.contains("ETL_ON_SOURCE_STARTED_OVER=rebuild"),
        "{log}"
    );
    assert!(
        processor.0.try_wait().unwrap().is_none(),
        "the processor exited instead of going on:\n{log}"
    );
    // Counting again: after a quick rebuild it first waits out its old
    // consumer's session, and meanwhile writes nothing.
    eventually(
        "the rebuilt processor to load its partitions",
        Duration::from_secs(60),
        || async { (run.log(1).matches("partition state loaded").count() >= 8).then_some(()) },
    )
    .await;
    // A rebuild run by hand now, while that processor counts what loadgen
    // writes, must refuse: the processor would overwrite the rebuilt rows.
    let refused = run.processor_command(&["rebuild"]).output().unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(said.contains("a processor is running"), "{said}");
    let status = loadgen.sigterm();
    assert!(status.success(), "loadgen: {status}");
    let report = run.caught_up("after the rebuild in place").await;
    eprintln!("auto_rebuild: exact over {} keys", report.compared);
    assert!(processor.0.try_wait().unwrap().is_none(), "{}", run.log(1));
    let status = processor.sigterm();
    assert!(status.success(), "{}", run.log(1));
    drop(engine);
}
