//! The runtime in one process: librdkafka's mock cluster as the broker and
//! the aggregate store in memory. Backpressure, rewinds, leases and
//! rebalances, each asserted on what is stored, without the stack.
//!
//! The telemetry counters are process-wide, so the tests run one at a time.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etl::aggregate::AggregateState;
use etl::app::Outcome;
use etl::cdc::Table;
use etl::config::{Config, Settings};
use etl::registry::{AllAggregates, EachState};
use etl::sink::{MemoryStore, SinkTable};
use etl::telemetry;
use etl_testkit::MockBroker;
use etl_tools::bench::core::{measure, Path};
use etl_tools::bench::synthetic::{produce_with, Compression, Schemas, Spec};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Synthetic Debezium events preloaded into the mock cluster, and what the
/// aggregates must come to.
struct Topics {
    broker: MockBroker,
    prefix: String,
    expected: AllAggregates,
    /// (topic, partition, end offset) of every table partition.
    ends: Vec<(String, i32, i64)>,
}

fn preload(events: u64, partitions: i32) -> Topics {
    let prefix = "runtime".to_owned();
    let spec = Spec {
        events,
        schemas: Schemas::Off,
        partitions,
        keys: 200,
        seed: 7,
        prefix: prefix.clone(),
        snapshot: true,
    };
    let (_, expected) = measure(&spec, Path::Ours);
    let broker = MockBroker::start().expect("the mock cluster starts");
    for table in Table::ALL {
        broker
            .create_topic(&table.topic(&prefix), partitions)
            .expect("a table topic");
    }
    broker
        .create_topic(&format!("{prefix}.dead_letter"), 1)
        .expect("the dead-letter topic");
    let produced =
        produce_with(&broker.bootstrap, &spec, Compression::Lz4).expect("the events are produced");
    assert_eq!(produced.messages, events);
    let mut ends: Vec<(String, i32, i64)> = produced
        .per_partition
        .iter()
        .map(|((topic, partition), end)| (topic.clone(), *partition, *end))
        .collect();
    ends.sort();
    Topics {
        broker,
        prefix,
        expected,
        ends,
    }
}

impl Topics {
    /// The processor's settings for this broker and `group`, with `more`.
    fn config(&self, group: &str, more: &[(&str, &str)]) -> Config {
        let mut env: HashMap<String, String> = [
            ("ETL_KAFKA_BROKERS", self.broker.bootstrap.as_str()),
            ("ETL_KAFKA_GROUP_ID", group),
            ("ETL_TOPIC_PREFIX", &self.prefix),
            ("ETL_METRICS_ADDR", "off"),
            ("ETL_KAFKA_SESSION_TIMEOUT_MS", "6000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        env.extend(more.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let settings = Settings::from_sources(env, None).expect("settings");
        Config::from_settings(&settings).expect("a valid config")
    }

    /// The offsets `group` committed, as (topic, partition, offset).
    fn committed(&self, group: &str) -> Vec<(String, i32, i64)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.broker.bootstrap)
            .set("group.id", group)
            .create()
            .expect("a consumer");
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, _) in &self.ends {
            tpl.add_partition(topic, *partition);
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("the committed offsets");
        let mut offsets: Vec<_> = committed
            .elements()
            .iter()
            .map(|e| {
                let at = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                (e.topic().to_owned(), e.partition(), at)
            })
            .collect();
        offsets.sort();
        offsets
    }
}

/// Where what `store` holds differs from `expected`, per aggregate key.
fn differences(store: &MemoryStore, expected: &AllAggregates) -> Vec<String> {
    struct Compare<'s>(&'s MemoryStore, Vec<String>);
    impl EachState<'_> for Compare<'_> {
        fn visit<A: SinkTable>(&mut self, expected: &AggregateState<A>) {
            let mut stored = AggregateState::<A>::default();
            stored.load(self.0.rows::<A>());
            let (stored, expected) = (stored.totals(), expected.totals());
            for key in expected.keys().chain(stored.keys()) {
                if stored.get(key) != expected.get(key) {
                    self.1.push(format!(
                        "{} {key:?}: stored {:?}, expected {:?}",
                        A::NAME,
                        stored.get(key),
                        expected.get(key)
                    ));
                }
            }
        }
    }
    let mut compare = Compare(store, Vec::new());
    expected.each_state(&mut compare);
    compare.1.dedup();
    compare.1
}

/// `etl-processor run` on its own thread, storing into a [`MemoryStore`].
struct Processor {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: JoinHandle<anyhow::Result<Outcome>>,
}

impl Processor {
    fn start(config: Config, store: MemoryStore) -> Processor {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            etl::app::run_with_store(config, store, async move {
                let _ = stopped.await;
                "the test is done"
            })
        });
        Processor { stop, thread }
    }

    /// Asks it to stop and returns how its run ended.
    fn stop(self) -> Outcome {
        let _ = self.stop.send(());
        self.thread
            .join()
            .expect("the processor thread does not panic")
            .expect("the processor runs")
    }

    /// Waits for its run to end in an error (without asking it to stop),
    /// and returns the error as the binary would print it.
    fn failure(self) -> String {
        let error = self
            .thread
            .join()
            .expect("the processor thread does not panic")
            .expect_err("the run ends in an error");
        format!("{error:#}")
    }
}

/// Waits for `done`, checking every 20 ms, failing after `within`.
fn await_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `store` holds exactly the expected aggregates.
fn await_exact(store: &MemoryStore, topics: &Topics, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let differences = differences(store, &topics.expected);
        if differences.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {within:?}, {} differences, e.g. {:?}",
            differences.len(),
            &differences[..differences.len().min(5)]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process-wide counter's value.
fn counter(which: impl Fn(&telemetry::Counters) -> &std::sync::atomic::AtomicU64) -> u64 {
    which(telemetry::counters()).load(std::sync::atomic::Ordering::Relaxed)
}

fn events_decoded() -> u64 {
    telemetry::counters()
        .events
        .iter()
        .map(|e| e.value().load(std::sync::atomic::Ordering::Relaxed))
        .sum()
}

#[test]
fn the_runtime_stores_exactly_what_the_events_say_and_commits_their_ends() {
    let _serial = one_at_a_time();
    let topics = preload(20_000, 4);
    let store = MemoryStore::default();
    let processor = Processor::start(topics.config("exact", &[]), store.clone());
    await_exact(&store, &topics, Duration::from_secs(60));
    assert_eq!(processor.stop(), Outcome::Stopped);
    assert_eq!(topics.committed("exact"), topics.ends);
    assert_eq!(differences(&store, &topics.expected), Vec::<String>::new());
}

#[test]
fn a_store_that_stops_taking_writes_pauses_the_consumer_at_the_inflight_bound() {
    let _serial = one_at_a_time();
    let events = 60_000;
    let topics = preload(events, 4);
    let store = MemoryStore::default();
    let held = store.hold_writes();
    let (pauses, decoded) = (
        telemetry::counters()
            .pauses
            .load(std::sync::atomic::Ordering::Relaxed),
        events_decoded(),
    );
    let config = topics.config(
        "paused",
        &[
            ("ETL_MAX_INFLIGHT_RECORDS", "500"),
            ("ETL_BATCH_MAX_RECORDS", "100"),
            ("ETL_FLUSH_MAX_ROWS", "50"),
        ],
    );
    let processor = Processor::start(config, store.clone());
    await_until("the consumer to pause", Duration::from_secs(30), || {
        telemetry::counters()
            .pauses
            .load(std::sync::atomic::Ordering::Relaxed)
            > pauses
    });
    assert!(store.writes_waiting() >= 1, "a flush waits for the store");
    assert_eq!(store.writes(), 0);
    // Paused, not merely slow: most of the topics is not even decoded.
    let taken = events_decoded() - decoded;
    assert!(
        taken < events / 2,
        "{taken} of {events} events were decoded with the store holding every write"
    );
    drop(held);
    await_exact(&store, &topics, Duration::from_secs(60));
    assert_eq!(processor.stop(), Outcome::Stopped);
    assert_eq!(topics.committed("paused"), topics.ends);
}

/// A state bound far below the keys: written rows are evicted after each
/// flush and read back by key when an event touches them again (orders
/// moving through their statuses, products sold again). The totals end
/// exact; a second group replaying the whole topics on the same store
/// (a restart from scratch) changes nothing.
#[test]
fn with_a_small_state_bound_evicted_rows_are_read_back_and_the_totals_stay_exact() {
    let _serial = one_at_a_time();
    let topics = preload(20_000, 4);
    let store = MemoryStore::default();
    let per_aggregate = |map: &dashmap::DashMap<&'static str, std::sync::atomic::AtomicU64>| {
        map.iter()
            .map(|e| e.value().load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>()
    };
    let evicted = || per_aggregate(&telemetry::counters().rows_evicted);
    let read_back = || per_aggregate(&telemetry::counters().rows_read_back);
    let (evicted_before, read_before) = (evicted(), read_back());
    let bounded = [
        ("ETL_STATE_MAX_ROWS", "40"),
        ("ETL_FLUSH_MAX_ROWS", "100"),
        ("ETL_BATCH_MAX_RECORDS", "200"),
    ];
    let processor = Processor::start(topics.config("bounded", &bounded), store.clone());
    await_exact(&store, &topics, Duration::from_secs(90));
    assert_eq!(processor.stop(), Outcome::Stopped);
    assert_eq!(topics.committed("bounded"), topics.ends);
    assert!(evicted() > evicted_before, "no row was evicted");
    assert!(read_back() > read_before, "no evicted row was read back");
    let reads = store.key_reads();
    assert!(reads > 0);

    // Every event again, from offset 0: all are replays the marks cover.
    let processor = Processor::start(topics.config("bounded-again", &bounded), store.clone());
    await_until(
        "the second group to commit the ends",
        Duration::from_secs(90),
        || topics.committed("bounded-again") == topics.ends,
    );
    assert_eq!(processor.stop(), Outcome::Stopped);
    assert_eq!(differences(&store, &topics.expected), Vec::<String>::new());
}

#[cfg(feature = "faults")]
#[test]
fn an_aggregator_that_panics_is_restarted_and_its_partitions_replayed_exactly() {
    panics_are_restarted_and_replayed_exactly(etl::restart::ActorKind::Aggregator);
}

#[cfg(feature = "faults")]
#[test]
fn a_partition_actor_that_panics_is_replaced_and_its_partition_replayed_exactly() {
    panics_are_restarted_and_replayed_exactly(etl::restart::ActorKind::Partition);
}

/// Injected panics in actors of `kind`: each is restarted, its partitions
/// rewound and replayed, and the totals end exact, every partition
/// committed to its end.
#[cfg(feature = "faults")]
fn panics_are_restarted_and_replayed_exactly(kind: etl::restart::ActorKind) {
    let _serial = one_at_a_time();
    let topics = preload(30_000, 4);
    let store = MemoryStore::default();
    let restarts = || {
        telemetry::counters()
            .restarts
            .get(&kind)
            .map_or(0, |c| c.load(std::sync::atomic::Ordering::Relaxed))
    };
    let rewinds = || -> u64 {
        telemetry::counters()
            .rewinds
            .iter()
            .map(|r| r.value().load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    };
    let (restarts_before, rewinds_before) = (restarts(), rewinds());
    let name = kind.as_str();
    let group = format!("panics-{name}");
    let panics = format!("{name}=0.02");
    let policy = format!("ETL_RESTART_{}", name.to_uppercase());
    let config = topics.config(
        &group,
        &[
            ("ETL_FAULT_PANIC", &panics),
            ("ETL_FAULT_SEED", "11"),
            ("ETL_BATCH_MAX_RECORDS", "200"),
            (&policy, "permanent max=1000 within=60s backoff=10ms..200ms"),
        ],
    );
    let processor = Processor::start(config, store.clone());
    await_exact(&store, &topics, Duration::from_secs(90));
    assert_eq!(processor.stop(), Outcome::Stopped);
    assert!(
        restarts() > restarts_before,
        "no {name} actor was restarted"
    );
    assert!(rewinds() > rewinds_before, "no partition was rewound");
    assert_eq!(topics.committed(&group), topics.ends);
}

#[test]
fn a_member_whose_release_misses_the_deadline_hands_its_partitions_over_and_takes_the_next() {
    let _serial = one_at_a_time();
    let topics = preload(20_000, 4);
    let store = MemoryStore::default();
    // The first member never gets a write through: when the second joins,
    // its release cannot flush, and it must give its partitions up at the
    // deadline (half the poll interval) for the group to go on.
    let stuck = store.another_writer();
    let held = stuck.hold_writes();
    let settings = [("ETL_KAFKA_MAX_POLL_INTERVAL_MS", "10000")];
    let first = Processor::start(topics.config("deadline", &settings), stuck.clone());
    await_until("the first member to flush", Duration::from_secs(30), || {
        stuck.writes_waiting() >= 1
    });
    let misses = counter(|c| &c.release_deadline_misses);
    let joined = Instant::now();
    let second = Processor::start(topics.config("deadline", &settings), store.clone());
    await_until(
        "the release to miss its deadline",
        Duration::from_secs(15),
        || counter(|c| &c.release_deadline_misses) > misses,
    );
    // Not before the deadline (5 s, half the poll interval).
    assert!(
        joined.elapsed() >= Duration::from_millis(4_500),
        "{:?}",
        joined.elapsed()
    );
    // The handover gives the stuck member half of each topic again, and it
    // takes them within the deadline: its held flush steps aside for the
    // load, which does not wait for it. Nothing of its own is stored yet.
    await_until(
        "the second member to store its half",
        Duration::from_secs(30),
        || store.writes() > 0,
    );
    assert_eq!(stuck.writes(), 0);
    // Once ClickHouse takes its writes again, the stuck member stores its
    // half: its flush from before the handover lands late, and counts
    // nothing twice (the second member's rows have the higher offsets).
    drop(held);
    await_exact(&store, &topics, Duration::from_secs(60));
    await_until("every partition committed", Duration::from_secs(40), || {
        topics.committed("deadline") == topics.ends
    });
    assert!(stuck.writes() > 0);
    assert_eq!(first.stop(), Outcome::Stopped);
    assert_eq!(second.stop(), Outcome::Stopped);
    assert_eq!(differences(&store, &topics.expected), Vec::<String>::new());
}

#[test]
fn a_load_that_never_answers_ends_the_run_at_the_rebalance_deadline() {
    let _serial = one_at_a_time();
    let topics = preload(2_000, 2);
    let store = MemoryStore::default();
    // Every read of stored state waits: the assignment cannot be loaded.
    let _held = store.hold_loads();
    let settings = [("ETL_KAFKA_MAX_POLL_INTERVAL_MS", "10000")];
    let started = Instant::now();
    let processor = Processor::start(topics.config("load-deadline", &settings), store.clone());
    await_until("a load to wait", Duration::from_secs(20), || {
        store.loads_waiting() >= 1
    });
    await_until("the run to end", Duration::from_secs(30), || {
        processor.thread.is_finished()
    });
    let ended = started.elapsed();
    let said = processor.failure();
    assert!(
        said.contains("did not finish within 5s (half of ETL_KAFKA_MAX_POLL_INTERVAL_MS)"),
        "{said}"
    );
    // Not before the deadline (5 s, half the poll interval).
    assert!(ended >= Duration::from_millis(4_500), "{ended:?}");
    // Nothing was counted, so nothing was stored or committed.
    assert_eq!(store.writes(), 0);
    assert!(
        topics
            .committed("load-deadline")
            .iter()
            .all(|(_, _, at)| *at == 0),
        "{:?}",
        topics.committed("load-deadline")
    );
}
