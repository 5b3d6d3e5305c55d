//! What the processor tells about itself: counters, gauges and health here;
//! their export in `metrics` (Prometheus, through OpenTelemetry), the HTTP
//! endpoints in `http`, batch traces in `traces`.
//!
//! The counts are plain atomics in concurrent maps, bumped once per batch or
//! per problem, never per event. `log_summary` writes them out at shutdown;
//! the metrics exporter reads them at each scrape.

pub mod http;
pub mod metrics;
pub mod traces;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;

use crate::cdc::Table;
use crate::restart::{ActorKind, Exit};

#[derive(Default)]
pub struct Counters {
    /// Records of topics that carry no table we capture, by topic.
    pub unknown_tables: DashMap<String, AtomicU64>,
    /// Columns outside our model of a table, by (table, column).
    pub unknown_columns: DashMap<(Table, String), AtomicU64>,
    /// Truncates seen (and, by policy, not applied), by table.
    pub truncates: DashMap<Table, AtomicU64>,
    /// Key updates skipped by the offset guard (replayed events), by aggregate.
    pub replays_skipped: DashMap<&'static str, AtomicU64>,
    /// Events skipped by the position guard (the source sent them again at
    /// new offsets), by aggregate.
    pub source_repeats: DashMap<&'static str, AtomicU64>,
    /// New snapshots that replaced a partition's rows, by aggregate.
    pub new_snapshots: DashMap<&'static str, AtomicU64>,
    /// Events sent to the dead-letter topic, by reason.
    pub dead_letters: DashMap<&'static str, AtomicU64>,
    /// Actor exits not asked for, by (kind, how: normal, failed, panicked).
    pub actor_exits: DashMap<(ActorKind, &'static str), AtomicU64>,
    /// Actors restarted by their supervisor, by kind.
    pub restarts: DashMap<ActorKind, AtomicU64>,
    /// Partitions replayed from their commit after a restart, by topic.
    pub rewinds: DashMap<String, AtomicU64>,
    /// Rows written to ClickHouse, by aggregate.
    pub rows_flushed: DashMap<&'static str, AtomicU64>,
    /// Insert attempts that failed and were retried, by aggregate.
    pub insert_retries: DashMap<&'static str, AtomicU64>,
    /// Reads of rows by key (events touched keys not held), by aggregate.
    pub key_reads: DashMap<&'static str, AtomicU64>,
    /// Rows read back by those reads, by aggregate.
    pub rows_read_back: DashMap<&'static str, AtomicU64>,
    /// Written rows dropped from memory to keep under ETL_STATE_MAX_ROWS,
    /// by aggregate.
    pub rows_evicted: DashMap<&'static str, AtomicU64>,
    /// Rows each aggregate holds in memory, as of its last flush.
    pub rows_held: DashMap<&'static str, AtomicI64>,
    /// Times the consumer paused its partitions for backpressure.
    pub pauses: AtomicU64,
    /// Partitions whose revoke began (a rebalance taking them away).
    pub partitions_revoked: AtomicU64,
    /// Revokes whose release missed its deadline: their partitions were
    /// handed over as lost.
    pub release_deadline_misses: AtomicU64,
    /// Batches dropped unapplied because they were decoded under a lease
    /// from before a rewind, or under none after a restart: their records
    /// are fetched again from the last commit.
    pub stale_batches: AtomicU64,
    /// Events decoded, by (table, op label: insert, update, delete,
    /// snapshot, truncate).
    pub events: DashMap<(Table, &'static str), AtomicU64>,
    /// Per table, the commit time (ms since the epoch, UTC) of the newest
    /// event applied to an aggregate.
    pub newest_applied_ms: DashMap<Table, AtomicI64>,
    /// Messages waiting in each supervised actor's mailbox, by actor name.
    pub mailboxes: DashMap<String, Arc<AtomicI64>>,
    /// (topic, partition, messages) as of the consumer's last statistics.
    pub consumer_lag: Mutex<Vec<(String, i32, i64)>>,
    /// Aggregates whose last insert failed (ClickHouse down or refusing).
    pub failing_sinks: DashMap<&'static str, ()>,
    /// Set once the consumer is subscribed and the actors run.
    pub started: AtomicBool,
    /// Set when a shutdown begins.
    pub stopping: AtomicBool,
}

pub fn counters() -> &'static Counters {
    static COUNTERS: LazyLock<Counters> = LazyLock::new(Counters::default);
    &COUNTERS
}

/// Adds `by` to `key`'s counter; true the first time the key is seen, so the
/// caller logs each distinct problem once rather than once per event.
fn bump<K: std::hash::Hash + Eq>(map: &DashMap<K, AtomicU64>, key: K, by: u64) -> bool {
    if let Some(c) = map.get(&key) {
        c.fetch_add(by, Ordering::Relaxed);
        return false;
    }
    let mut first = false;
    map.entry(key)
        .or_insert_with(|| {
            first = true;
            AtomicU64::new(0)
        })
        .fetch_add(by, Ordering::Relaxed);
    first
}

pub fn unknown_column(table: Table, column: &str) {
    if bump(&counters().unknown_columns, (table, column.to_owned()), 1) {
        tracing::warn!(%table, column, "ignoring a column the processor does not know");
    }
}

/// `records` records of `topic` skipped.
pub fn unknown_table(topic: &str, records: u64) {
    if bump(&counters().unknown_tables, topic.to_owned(), records) {
        tracing::warn!(
            topic,
            "ignoring records of a topic that carries no captured table"
        );
    }
}

pub fn truncate(table: Table) {
    bump(&counters().truncates, table, 1);
    tracing::warn!(
        %table,
        "TRUNCATE is not applied to the aggregates (policy: see README); run reconcile"
    );
}

pub fn replay_skipped(aggregate: &'static str, updates: u64) {
    bump(&counters().replays_skipped, aggregate, updates);
}

pub fn source_repeat(aggregate: &'static str) {
    bump(&counters().source_repeats, aggregate, 1);
}

pub fn new_snapshot(aggregate: &'static str) {
    bump(&counters().new_snapshots, aggregate, 1);
}

pub fn dead_letter(reason: &'static str) {
    bump(&counters().dead_letters, reason, 1);
}

pub fn actor_exit(kind: ActorKind, exit: &Exit) {
    let how = match exit {
        Exit::Normal => "normal",
        Exit::Failed(_) => "failed",
        Exit::Panicked(_) => "panicked",
    };
    bump(&counters().actor_exits, (kind, how), 1);
}

pub fn restarted(kind: ActorKind) {
    bump(&counters().restarts, kind, 1);
}

pub fn rewind(topic: &str) {
    bump(&counters().rewinds, topic.to_owned(), 1);
}

pub fn flushed(aggregate: &'static str, rows: u64) {
    bump(&counters().rows_flushed, aggregate, rows);
}

/// A read of rows by key: `rows` of them were stored.
pub fn read_back(aggregate: &'static str, rows: u64) {
    bump(&counters().key_reads, aggregate, 1);
    bump(&counters().rows_read_back, aggregate, rows);
}

/// After a flush: the rows dropped from memory, and those still held.
pub fn state_size(aggregate: &'static str, evicted: u64, held: usize) {
    bump(&counters().rows_evicted, aggregate, evicted);
    counters()
        .rows_held
        .entry(aggregate)
        .or_default()
        .store(held as i64, Ordering::Relaxed);
}

pub fn insert_retry(aggregate: &'static str) {
    bump(&counters().insert_retries, aggregate, 1);
}

pub fn paused() {
    counters().pauses.fetch_add(1, Ordering::Relaxed);
}

pub fn revoking(partitions: usize) {
    let revoked = &counters().partitions_revoked;
    revoked.fetch_add(partitions as u64, Ordering::Relaxed);
}

pub fn release_deadline_missed() {
    let misses = &counters().release_deadline_misses;
    misses.fetch_add(1, Ordering::Relaxed);
}

pub fn stale_batch() {
    counters().stale_batches.fetch_add(1, Ordering::Relaxed);
}

/// The events of one batch of `table`, as (op label, count).
pub fn events(table: Table, by_op: &[(&'static str, u64)]) {
    for &(op, n) in by_op {
        if n > 0 {
            bump(&counters().events, (table, op), n);
        }
    }
}

/// An aggregate applied events of `table` committed up to `committed_at_ms`.
pub fn applied(table: Table, committed_at_ms: i64) {
    let newest = &counters().newest_applied_ms;
    match newest.get(&table) {
        Some(t) => {
            t.fetch_max(committed_at_ms, Ordering::Relaxed);
        }
        None => {
            newest
                .entry(table)
                .or_insert_with(|| AtomicI64::new(0))
                .fetch_max(committed_at_ms, Ordering::Relaxed);
        }
    }
}

/// Per table, how old the newest applied event is (now - its commit time).
pub fn freshness() -> Vec<(Table, Duration)> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    counters()
        .newest_applied_ms
        .iter()
        .map(|e| {
            let age = now_ms.saturating_sub(e.value().load(Ordering::Relaxed));
            (*e.key(), Duration::from_millis(age.max(0) as u64))
        })
        .collect()
}

pub fn consumer_lag(partitions: Vec<(String, i32, i64)>) {
    *counters()
        .consumer_lag
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = partitions;
}

/// An insert of `aggregate` failed (true) or succeeded (false).
pub fn sink_failing(aggregate: &'static str, failing: bool) {
    let failing_sinks = &counters().failing_sinks;
    if failing {
        failing_sinks.insert(aggregate, ());
    } else if failing_sinks.contains_key(aggregate) {
        failing_sinks.remove(aggregate);
    }
}

pub fn started() {
    counters().started.store(true, Ordering::Relaxed);
}

pub fn stopping() {
    counters().stopping.store(true, Ordering::Relaxed);
}

/// Why the processor is not ready to do its work; empty when it is.
pub fn not_ready() -> Vec<String> {
    let c = counters();
    let mut why = Vec::new();
    if !c.started.load(Ordering::Relaxed) {
        why.push("starting".to_owned());
    }
    if c.stopping.load(Ordering::Relaxed) {
        why.push("shutting down".to_owned());
    }
    let mut failing: Vec<_> = c.failing_sinks.iter().map(|e| *e.key()).collect();
    failing.sort();
    for aggregate in failing {
        why.push(format!("ClickHouse inserts of {aggregate} are failing"));
    }
    why
}

/// The count of messages waiting in one actor's mailbox.
#[derive(Clone)]
pub struct Mailbox(Arc<AtomicI64>);

impl Mailbox {
    /// The mailbox gauge of actor `name`, shared by its incarnations.
    pub fn named(name: &str) -> Mailbox {
        let depth = counters()
            .mailboxes
            .entry(name.to_owned())
            .or_default()
            .clone();
        Mailbox(depth)
    }

    /// Stops reporting the actor (it ended for good).
    pub fn forget(name: &str) {
        counters().mailboxes.remove(name);
    }

    /// Counts one message as waiting until the guard is dropped: by the
    /// handler when it takes the message, or with the message if the actor
    /// died first.
    pub fn enqueued(&self) -> Queued {
        self.0.fetch_add(1, Ordering::Relaxed);
        Queued(self.0.clone())
    }
}

pub struct Queued(Arc<AtomicI64>);

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One log line with every non-zero counter.
pub fn log_summary() {
    fn render<K: std::fmt::Debug + std::hash::Hash + Eq>(map: &DashMap<K, AtomicU64>) -> String {
        let mut parts: Vec<String> = map
            .iter()
            .map(|e| format!("{:?}={}", e.key(), e.value().load(Ordering::Relaxed)))
            .collect();
        parts.sort();
        parts.join(" ")
    }
    let c = counters();
    tracing::info!(
        unknown_tables = %render(&c.unknown_tables),
        unknown_columns = %render(&c.unknown_columns),
        truncates = %render(&c.truncates),
        replays_skipped = %render(&c.replays_skipped),
        source_repeats = %render(&c.source_repeats),
        new_snapshots = %render(&c.new_snapshots),
        dead_letters = %render(&c.dead_letters),
        actor_exits = %render(&c.actor_exits),
        restarts = %render(&c.restarts),
        rewinds = %render(&c.rewinds),
        rows_flushed = %render(&c.rows_flushed),
        insert_retries = %render(&c.insert_retries),
        pauses = c.pauses.load(Ordering::Relaxed),
        events = %render(&c.events),
        "counters"
    );
}
