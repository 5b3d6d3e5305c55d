//! The fault suite, on the real stack: each test injects a fault in the middle
//! of a workload and ends with reconcile exact (Postgres GROUP BY = ClickHouse,
//! to the cent) and the dead-letter topic holding exactly the poison events.
//! The tests take the stack's components away, so they run one at a time.
// They inject faults (ETL_FAULT_*), which only a build with the feature has.
#![cfg(feature = "faults")]

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etl_testkit::eventually;
use etl_testkit::pipeline::{
    wait, Processor, Run, StartedAgainOnFailure, PARTITIONS, SESSION_TIMEOUT, TABLES,
};

/// One fault test at a time: they stop ClickHouse and the broker.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A seed of disjoint workload ids for this test run.
fn seed(slot: u64) -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    // Each test takes 20 consecutive seeds; tests and runs do not collide.
    now.as_secs() % 3_000 * 200 + slot * 20 + 1
}

/// The key prefix that marks an event produced as poison by these tests.
const POISON: &str = "poison:";

/// Events the decoder must refuse, with the reason it must give.
const POISON_EVENTS: &[(&str, &str, &str)] = &[
    (
        "orders",
        "malformed_json",
        r#"{"before":null,"after":{"id":1"#,
    ),
    (
        "orders",
        "unknown_op",
        r#"{"before":null,"after":{"id":900000001},"op":"x"}"#,
    ),
    (
        "customers",
        "bad_field",
        r#"{"before":null,"after":{"id":"nine","email":"a@b.c","full_name":"A","created_at":"2024-01-01T00:00:00Z"},"op":"c"}"#,
    ),
    (
        "orders",
        "missing_before",
        r#"{"before":null,"after":{"id":900000002,"customer_id":1,"status":"paid","total_amount":"1.00","created_at":"2024-01-01T00:00:00Z","updated_at":"2024-01-01T00:00:00Z"},"op":"u"}"#,
    ),
    (
        "order_items",
        "missing_after",
        r#"{"before":null,"after":null,"op":"c"}"#,
    ),
];

/// Checks the run's dead-letter topic against the poison in the table
/// topics: the same events (position, key, bytes) with the right reason, and
/// each once unless `replays` (a crash may dead-letter an event again).
fn check_dead_letters(run: &Run, replays: bool) -> usize {
    let mut expected = BTreeMap::new();
    for table in TABLES {
        let topic = run.table_topic(table);
        for r in run.read_topic(&topic, PARTITIONS) {
            let key = r
                .key
                .clone()
                .map(|k| String::from_utf8_lossy(&k).into_owned());
            if let Some(reason) = key
                .as_deref()
                .and_then(|k| k.strip_prefix(POISON))
                .and_then(|k| k.split(':').next())
            {
                expected.insert(
                    (topic.clone(), r.partition, r.offset),
                    (reason.to_owned(), r),
                );
            }
        }
    }
    let letters = run.read_topic(&run.dead_letter_topic, 1);
    let mut seen = HashSet::new();
    for letter in &letters {
        let h = &letter.headers;
        let position = (
            h["source.topic"].clone(),
            h["source.partition"].parse::<i32>().unwrap(),
            h["source.offset"].parse::<i64>().unwrap(),
        );
        let (reason, original) = expected
            .get(&position)
            .unwrap_or_else(|| panic!("a dead letter for a valid event: {position:?} {h:?}"));
        assert_eq!(&h["reason"], reason, "reason of {position:?}");
        assert!(!h["error"].is_empty());
        assert_eq!(letter.value, original.value, "bytes of {position:?}");
        assert_eq!(letter.key, original.key, "key of {position:?}");
        assert!(
            seen.insert(position.clone()) || replays,
            "{position:?} dead-lettered twice"
        );
    }
    let missing: Vec<_> = expected.keys().filter(|p| !seen.contains(*p)).collect();
    assert!(
        missing.is_empty(),
        "poison events not dead-lettered: {missing:?}"
    );
    eprintln!(
        "{}: dead letters: {} events, {} records",
        run.name,
        seen.len(),
        letters.len()
    );
    seen.len()
}

/// A run whose processors flush often and commit seldom, so that a crash
/// nearly always finds events flushed but not committed: exactly what the
/// offset guard must not count twice.
async fn kill_run(name: &str) -> Run {
    let mut run = Run::new(name).await;
    run.set("ETL_FLUSH_INTERVAL_MS", 200)
        .set("ETL_COMMIT_INTERVAL_MS", 3000);
    run
}

/// SIGKILLs the processor at `kills` random points of a running workload,
/// restarting it each time; returns the processor left running.
async fn kill_repeatedly(run: &mut Run, first_seed: u64, kills: u32) -> Processor {
    let mut rng = fastrand::Rng::with_seed(first_seed);
    let mut processor = run.start_processor();
    run.caught_up("before the kills").await;
    for i in 0..kills {
        // Each kill lands while the processor is counting: after it has
        // loaded its partitions (4 aggregates), during a workload.
        run.partitions_loaded(run.started).await;
        let mut workload = run.start_workload(first_seed + u64::from(i), "--orders 120");
        let after = Duration::from_millis(rng.u64(500..3000));
        tokio::time::sleep(after).await;
        processor.kill();
        eprintln!("{}: kill {} of {kills} after {after:?}", run.name, i + 1);
        wait(&mut workload, "workload");
        // The broker hands a dead member's partitions on only after its
        // session timed out; a member joining before that finds them stuck.
        tokio::time::sleep(SESSION_TIMEOUT + Duration::from_secs(2)).await;
        processor = run.start_processor();
    }
    processor
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn sigkill_at_ten_random_points_loses_and_doubles_nothing() {
    let _serial = SERIAL.lock().await;
    let mut run = kill_run("kill").await;
    let mut processor = kill_repeatedly(&mut run, seed(0), 10).await;
    run.caught_up("after 10 SIGKILLs").await;
    processor.terminate();
    let log = run.all_logs();
    let skipped = log.matches("partition state loaded").count();
    assert!(skipped >= 10 * 4, "every restart reloads its partitions");
    check_dead_letters(&run, true);
}

/// The negative control: the same kills with the guards that recognise a
/// replay off must leave double counts, or the kill test proves nothing.
/// Both: a replayed streamed change is at a position the partition has
/// applied too, so the position guard alone also skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn without_the_replay_guards_the_kill_test_finds_differences() {
    let _serial = SERIAL.lock().await;
    let mut run = kill_run("noguard").await;
    run.set("ETL_FAULT_NO_OFFSET_GUARD", "true")
        .set("ETL_FAULT_NO_POSITION_GUARD", "true");
    let mut processor = kill_repeatedly(&mut run, seed(1), 10).await;
    eventually(
        "the group to commit everything",
        Duration::from_secs(120),
        || async { (run.lag() == 0).then_some(()) },
    )
    .await;
    processor.terminate();
    let report = run.reconcile().await;
    eprintln!(
        "noguard: {} differences in {} keys",
        report.differences.len(),
        report.compared
    );
    assert!(
        !report.is_exact(),
        "with the replay guards off, replays after SIGKILL must double count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn clickhouse_down_for_30s_pauses_the_consumer_and_catches_up() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::new("chdown").await;
    run.set("ETL_MAX_INFLIGHT_RECORDS", 2000)
        .set("ETL_FLUSH_INTERVAL_MS", 500);
    let mut processor = run.start_processor();
    let health = format!("{}/health/ready", run.metrics_base_url(1).await);
    run.caught_up("before the outage").await;
    assert_eq!(
        ready(&health).await,
        (200, r#"{"status":"ready"}"#.to_owned())
    );
    let seed = seed(2);
    let mut workload = run.start_workload(seed, "--orders 1500");
    run.workload_reaches(seed, 100).await;
    run.stack_command(&["stop", "clickhouse", "--kill"]);
    let _started_again = StartedAgainOnFailure("clickhouse");
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_early = processor.rss_kib();
    eventually("the consumer to pause", Duration::from_secs(25), || async {
        run.log(1).contains("partitions paused").then_some(())
    })
    .await;
    // Not ready while inserts fail, with the reason.
    let (status, body) = ready(&health).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("ClickHouse inserts of"), "{body}");
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(stopped.elapsed())).await;
    let rss_late = processor.rss_kib();
    run.stack_command(&["start", "clickhouse"]);
    eprintln!(
        "chdown: ClickHouse down {:?}; RSS {rss_early} KiB after 5 s, {rss_late} KiB at the end",
        stopped.elapsed()
    );
    assert!(
        rss_late < rss_early + 32 * 1024,
        "memory must stay flat while ClickHouse is down: {rss_early} -> {rss_late} KiB"
    );
    wait(&mut workload, "workload");
    run.caught_up("after ClickHouse came back").await;
    let log = run.log(1);
    assert!(
        log.contains("insert failed; retrying"),
        "inserts were retried"
    );
    assert!(log.contains("partitions resumed"));
    assert_eq!(
        ready(&health).await.0,
        200,
        "ready again once inserts succeed"
    );
    processor.terminate();

    // SIGTERM while ClickHouse is down: the last flush cannot finish, so the
    // process exits 4 at its shutdown bound, and the next start loses nothing.
    let bound = Duration::from_secs(2);
    run.set("ETL_SHUTDOWN_TIMEOUT_MS", bound.as_millis());
    let mut processor = run.start_processor();
    // The outage must come after the start-up loaded the partitions' state:
    // a start that cannot load it stops (exit 1), which is not what this
    // part tests.
    let n = run.started;
    run.partitions_loaded(n).await;
    let mut workload = run.start_workload(seed + 1, "--orders 200");
    run.workload_reaches(seed + 1, 20).await;
    run.stack_command(&["stop", "clickhouse", "--kill"]);
    let _started_again = StartedAgainOnFailure("clickhouse");
    eventually("an insert to fail", Duration::from_secs(30), || async {
        run.log(n).contains("insert failed; retrying").then_some(())
    })
    .await;
    let signalled = Instant::now();
    let status = processor.sigterm();
    let took = signalled.elapsed();
    eprintln!("chdown: SIGTERM during the outage: {status} after {took:?}");
    assert_eq!(status.code(), Some(4), "exit 4 past the shutdown bound");
    assert!(
        took >= bound && took < bound + Duration::from_secs(3),
        "{took:?}"
    );
    run.stack_command(&["start", "clickhouse"]);
    wait(&mut workload, "workload");
    // It left without leaving the group: its partitions move on at the timeout.
    tokio::time::sleep(SESSION_TIMEOUT + Duration::from_secs(2)).await;
    run.settings.remove("ETL_SHUTDOWN_TIMEOUT_MS");
    let mut processor = run.start_processor();
    run.caught_up("after a shutdown cut short by its bound")
        .await;
    processor.terminate();
    check_dead_letters(&run, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn a_broker_restart_mid_workload_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::new("brokerdown").await;
    let mut processor = run.start_processor();
    run.caught_up("before the broker restart").await;
    let seed = seed(3);
    let mut workload = run.start_workload(seed, "--orders 600");
    run.workload_reaches(seed, 100).await;
    run.stack_command(&["stop", "broker", "--kill"]);
    let _started_again = StartedAgainOnFailure("broker");
    tokio::time::sleep(Duration::from_secs(5)).await;
    run.stack_command(&["start", "broker"]);
    wait(&mut workload, "workload");
    run.caught_up("after the broker restart").await;
    processor.terminate();
    check_dead_letters(&run, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn members_joining_and_leaving_repeatedly_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::new("members").await;
    let mut processor = run.start_processor();
    run.caught_up("before the rebalances").await;
    let seed = seed(4);
    let mut workload = run.start_workload(seed, "--orders 1500");
    for round in 1..=3 {
        let mut second = run.start_processor();
        let n = run.started;
        eventually(
            "the second member to take partitions",
            Duration::from_secs(60),
            || async { run.log(n).contains("partition state loaded").then_some(()) },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        second.terminate();
        eprintln!("members: round {round}: joined and left");
    }
    wait(&mut workload, "workload");
    run.caught_up("after three members joined and left").await;
    processor.terminate();
    check_dead_letters(&run, false);
}

/// Lines of `log` that say `actor` was restarted.
fn restarts_of(log: &str, actor: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("restarting it") && l.contains(actor))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn injected_panics_restart_the_actor_alone_and_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::new("panics").await;
    let lenient = "permanent max=1000 within=60s backoff=10ms..200ms";
    run.set("ETL_FAULT_PANIC", "partition=0.02 aggregator=0.05 sink=0.1")
        .set("ETL_FAULT_INSERT_FAILURE_RATE", 0.2)
        .set("ETL_FAULT_FLUSH_DELAY_MS", 100)
        .set("ETL_RESTART_PARTITION", lenient)
        .set("ETL_RESTART_AGGREGATOR", lenient)
        .set("ETL_RESTART_SINK", lenient)
        .set("ETL_FLUSH_INTERVAL_MS", 300);
    let mut processor = run.start_processor();
    let kinds = ["kind=\"partition\"", "kind=\"aggregator\"", "kind=\"sink\""];
    let restarts = |log: &str, kind: &str| {
        log.lines()
            .filter(|l| l.contains("restarting it") && l.contains(kind))
            .count()
    };
    // Panics are drawn at random: workloads go on until every kind has
    // been restarted at least once (and the totals stay exact throughout).
    let first = seed(5);
    for chunk in 0..6 {
        let mut workload = run.start_workload(first + chunk, "--orders 200");
        wait(&mut workload, "workload");
        run.caught_up("with panics injected").await;
        let log = run.log(1);
        if kinds.iter().all(|k| restarts(&log, k) > 0) {
            break;
        }
    }
    processor.terminate();
    let log = run.log(1);
    for kind in kinds {
        eprintln!("panics: {kind}: {} restarts", restarts(&log, kind));
        assert!(restarts(&log, kind) > 0, "no {kind} restart in the log");
    }
    assert!(
        log.contains("injected insert failure"),
        "failed inserts were injected and retried"
    );
    assert!(
        log.contains("restarts="),
        "the restart counters are reported"
    );
    assert!(!log.contains("supervision gave up"));
    check_dead_letters(&run, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn panics_past_the_intensity_limit_exit_non_zero() {
    let _serial = SERIAL.lock().await;
    let mut run = Run::new("intensity").await;
    run.set("ETL_FAULT_PANIC", "aggregator=1").set(
        "ETL_RESTART_AGGREGATOR",
        "permanent max=3 within=60s backoff=10ms..50ms",
    );
    let mut processor = run.start_processor();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = processor.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the processor never gave up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(70), "escalation exits 70");
    let log = run.log(1);
    let gave_up: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("supervision gave up"))
        .collect();
    assert_eq!(gave_up.len(), 1, "one clear line:\n{log}");
    assert!(
        gave_up[0].contains("4 failures within 60s exceed the limit of 3 restarts"),
        "{}",
        gave_up[0]
    );
    let actor = etl::registry::names()
        .into_iter()
        .map(|name| format!("aggregator {name}"))
        .find(|actor| {
            gave_up[0].contains(&format!("actor={actor} "))
                || gave_up[0].ends_with(&format!("actor={actor}"))
        })
        .expect("the line names the actor");
    assert_eq!(
        restarts_of(&log, &actor),
        3,
        "restarted exactly as often as the policy allows"
    );

    // Without the fault, the next start recovers everything. The exited
    // member left no word: on the native broker a member that joins while
    // the group still counts it gets no partitions, so wait out its session.
    tokio::time::sleep(SESSION_TIMEOUT + Duration::from_secs(2)).await;
    run.settings.clear();
    let mut processor = run.start_processor();
    run.caught_up("after the escalation, restarted without faults")
        .await;
    processor.terminate();
    check_dead_letters(&run, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn poison_events_go_to_the_dead_letter_topic_and_the_rest_is_counted() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let _serial = SERIAL.lock().await;
    let mut run = Run::new("poison").await;
    let mut processor = run.start_processor();
    let seed = seed(6);
    let mut workload = run.start_workload(seed, "--orders 300");
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", run.stack.get("ETL_KAFKA_BROKERS"))
        .create()
        .unwrap();
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    for round in 0..2 {
        for (table, reason, value) in POISON_EVENTS {
            let key = format!("{POISON}{reason}:{nonce}-{round}");
            let topic = run.table_topic(table);
            let record = FutureRecord::to(&topic).key(&key).payload(*value);
            producer
                .send(record, Duration::from_secs(10))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait(&mut workload, "workload");
    run.caught_up("with poison events in the topics").await;
    eventually(
        "the group to commit everything",
        Duration::from_secs(60),
        || async { (run.lag() == 0).then_some(()) },
    )
    .await;
    processor.terminate();
    let letters = check_dead_letters(&run, false);
    assert!(letters >= 2 * POISON_EVENTS.len());
}

/// GET the readiness endpoint: (status, body).
async fn ready(url: &str) -> (u16, String) {
    let response = reqwest::get(url)
        .await
        .expect("the health endpoint answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// A slow ClickHouse must not stall the group's rebalance: a member whose
/// revoked partitions cannot flush in time (every insert here takes longer
/// than the deadline, half of ETL_KAFKA_MAX_POLL_INTERVAL_MS) hands them
/// over as lost when the deadline passes, and still takes its next
/// assignment; their new owner replays them from the last commit, and the
/// totals end exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn a_revoke_that_cannot_flush_in_time_hands_its_partitions_over_at_the_deadline() {
    let _serial = SERIAL.lock().await;
    let poll_interval = Duration::from_secs(10);
    let mut run = Run::new("deadline").await;
    run.set("ETL_KAFKA_MAX_POLL_INTERVAL_MS", poll_interval.as_millis());
    // The history first, at full speed.
    let mut first = run.start_processor();
    run.caught_up("the stack's topics").await;
    first.terminate();

    run.set("ETL_FAULT_FLUSH_DELAY_MS", 8_000);
    let mut slow = run.start_processor();
    run.partitions_loaded(2).await;
    // A workload under way, so that the slow member has a flush in flight
    // whenever the rebalance comes.
    let seed = seed(7);
    let mut workload = run.start_workload(seed, "--size large");
    run.workload_reaches(seed, 20).await;

    run.settings.remove("ETL_FAULT_FLUSH_DELAY_MS");
    let joined = Instant::now();
    let mut second = run.start_processor();
    let answered = eventually(
        "the slow member to give its partitions up at the deadline",
        poll_interval * 2,
        || async {
            run.log(2)
                .contains("missed its deadline")
                .then(|| joined.elapsed())
        },
    )
    .await;
    eprintln!(
        "deadline: the slow member answered the rebalance {answered:?} after the second joined"
    );
    assert!(
        answered < poll_interval,
        "the rebalance waited {answered:?}, past the poll interval"
    );
    run.partitions_loaded(3).await;
    // And it takes its next assignment within the deadline: its loads do
    // not wait behind its slow flushes (four aggregates, loaded twice).
    eventually(
        "the slow member to load its next assignment",
        poll_interval,
        || async { (run.log(2).matches("partition state loaded").count() >= 8).then_some(()) },
    )
    .await;
    wait(&mut workload, "workload");
    run.caught_up("after the hand-over").await;
    second.terminate();
    slow.kill();
}
