//! Process-wide counters of what the pipeline skipped or could not read.
//!
//! Plain atomics in concurrent maps; `log_summary` writes them out at
//! shutdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

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
    /// Events that could not be decoded, by reason.
    pub decode_errors: DashMap<&'static str, AtomicU64>,
    /// Key updates skipped by the offset guard (replayed events), by aggregate.
    pub replays_skipped: DashMap<&'static str, AtomicU64>,
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
    /// Times the consumer paused its partitions for backpressure.
    pub pauses: AtomicU64,
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

pub fn decode_error(reason: &'static str) {
    bump(&counters().decode_errors, reason, 1);
}

pub fn replay_skipped(aggregate: &'static str, updates: u64) {
    bump(&counters().replays_skipped, aggregate, updates);
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

pub fn insert_retry(aggregate: &'static str) {
    bump(&counters().insert_retries, aggregate, 1);
}

pub fn paused() {
    counters().pauses.fetch_add(1, Ordering::Relaxed);
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
        decode_errors = %render(&c.decode_errors),
        replays_skipped = %render(&c.replays_skipped),
        dead_letters = %render(&c.dead_letters),
        actor_exits = %render(&c.actor_exits),
        restarts = %render(&c.restarts),
        rewinds = %render(&c.rewinds),
        rows_flushed = %render(&c.rows_flushed),
        insert_retries = %render(&c.insert_retries),
        pauses = c.pauses.load(Ordering::Relaxed),
        "counters"
    );
}
