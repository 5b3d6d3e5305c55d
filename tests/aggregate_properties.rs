//! Properties of the aggregation logic, on random store histories:
//! - the deltas add up to the GROUP BY over the final table state;
//! - replaying any prefix of the events again changes nothing;
//! - a restart from flushed rows plus a replay from any earlier commit point
//!   ends in the same totals (what the pipeline does after a crash);
//! - a flush whose rows are written while more events are applied, then a
//!   later flush, store exactly the totals (the aggregator's non-blocking
//!   flush: rows changed meanwhile must stay dirty);
//! - releasing some partitions leaves exactly the state of the others;
//! - the products dimension holds only unwritten rows, and a restart that
//!   loads nothing and replays still leaves the sink with the final table;
//! - events the source sends again at new offsets (a restarted Debezium),
//!   also across a processor restart, change nothing;
//! - a snapshot started over replaces the unfinished one's rows; a new
//!   snapshot after streaming is an error, not a count;
//! - a rebuild counts from the newest snapshot whatever the log before it
//!   lost or repeated, and a processor restarted on the rebuilt rows from
//!   an older offset counts on exactly;
//! - with a bound on the rows held, eviction, rows read back by key and
//!   replays (crashes, repeats) together still store the GROUP BY.

use std::collections::{BTreeMap, HashMap};

use chrono::{TimeZone, Utc};
use etl::aggregate::{
    AggregateState, OrderTotals, OrdersByMinute, PartitionMark, ProductInfo, ProductSales,
    Products, SalesTotals, StoredRow,
};
use etl::cdc::{
    Change, Minute, Op, Order, OrderItem, Origin, Position, Product, ProductKey, SnapshotId,
    TableChange,
};
use proptest::prelude::*;
use rust_decimal::Decimal;

const STATUSES: [&str; 3] = ["pending", "paid", "cancelled"];
const PARTITIONS: i64 = 3;

#[derive(Debug, Clone)]
enum Step {
    Insert {
        minute: u8,
        status: usize,
        cents: u32,
    },
    Update {
        pick: usize,
        status: usize,
        cents: u32,
        minute: Option<u8>,
    },
    Delete {
        pick: usize,
    },
    /// A COPY page: several inserts in one WAL record, at one position.
    Copy {
        rows: Vec<(u8, usize, u32)>,
    },
}

/// A statement, and whether it runs in the transaction of the one before.
type Statement = (bool, Step);

fn step() -> impl Strategy<Value = Statement> {
    let row = || (0u8..5, 0usize..3, 0u32..100_000);
    let step = prop_oneof![
        3 => row().prop_map(|(minute, status, cents)| Step::Insert { minute, status, cents }),
        3 => (any::<usize>(), 0usize..3, 0u32..100_000, proptest::option::of(0u8..5))
            .prop_map(|(pick, status, cents, minute)| Step::Update { pick, status, cents, minute }),
        1 => any::<usize>().prop_map(|pick| Step::Delete { pick }),
        1 => proptest::collection::vec(row(), 2..6).prop_map(|rows| Step::Copy { rows }),
    ];
    (proptest::bool::weighted(0.3), step)
}

fn order(id: i64, minute: u8, status: usize, cents: u32) -> Order {
    Order {
        id,
        status: STATUSES[status].to_string(),
        total_amount: Decimal::new(cents.into(), 2),
        created_at: Utc
            .timestamp_opt(1_706_778_000 + i64::from(minute) * 60 + 17, 0)
            .unwrap(),
    }
}

/// An event as the connector delivers it: (partition, origin, change).
type Delivery = (i32, Origin, TableChange);
/// An event as the pipeline sees it: (partition, offset, origin, change).
type Event = (i32, i64, Origin, TableChange);

/// The LSN of the snapshot the histories start from (an empty table).
const SNAPSHOT: u64 = 1_000;

/// A model of the source table and of what the connector delivers for it.
/// Debezium keys by id, so an order's events share a partition. Positions
/// are as the real connector's (docs/SOURCE-POSITIONS.md): `commit` is the
/// end of the previous transaction's commit (0 for the first transaction
/// after a snapshot), `lsn` grows within a transaction, and a COPY page's
/// rows share one.
struct Source {
    table: HashMap<i64, Order>,
    next_id: i64,
    lsn: u64,
    commit: u64,
    snapshots: i64,
}

impl Source {
    fn new() -> Source {
        Source {
            table: HashMap::new(),
            next_id: 1,
            lsn: SNAPSHOT,
            commit: 0,
            snapshots: 0,
        }
    }

    /// Runs the statements; returns what the connector delivers for them.
    fn run(&mut self, statements: &[Statement]) -> Vec<Delivery> {
        let mut deliveries = Vec::new();
        let mut in_transaction = false;
        for (joins, s) in statements {
            if in_transaction && !joins {
                // The previous transaction commits: its commit record ends here.
                self.lsn += 10;
                self.commit = self.lsn;
            }
            in_transaction = true;
            self.lsn += 10;
            let at = Origin::Stream(Position {
                commit: self.commit,
                lsn: self.lsn,
            });
            for change in self.statement(s) {
                let id = change.after.as_ref().or(change.before.as_ref()).unwrap().id;
                deliveries.push(((id % PARTITIONS) as i32, at, TableChange::Order(change)));
            }
        }
        if in_transaction {
            self.lsn += 10;
            self.commit = self.lsn;
        }
        deliveries
    }

    fn insert(&mut self, minute: u8, status: usize, cents: u32) -> Change<Order> {
        let o = order(self.next_id, minute, status, cents);
        self.next_id += 1;
        self.table.insert(o.id, o.clone());
        Change {
            op: Op::Create,
            before: None,
            after: Some(o),
        }
    }

    fn pick(&self, pick: usize) -> Option<i64> {
        let mut ids: Vec<i64> = self.table.keys().copied().collect();
        ids.sort();
        (!ids.is_empty()).then(|| ids[pick % ids.len()])
    }

    fn statement(&mut self, s: &Step) -> Vec<Change<Order>> {
        match s {
            Step::Insert {
                minute,
                status,
                cents,
            } => vec![self.insert(*minute, *status, *cents)],
            Step::Copy { rows } => rows
                .iter()
                .map(|(minute, status, cents)| self.insert(*minute, *status, *cents))
                .collect(),
            Step::Update {
                pick,
                status,
                cents,
                minute,
            } => {
                let Some(id) = self.pick(*pick) else {
                    return Vec::new();
                };
                let before = self.table[&id].clone();
                let mut after = order(id, 0, *status, *cents);
                after.created_at = match minute {
                    Some(m) => order(id, *m, 0, 0).created_at,
                    None => before.created_at,
                };
                self.table.insert(id, after.clone());
                vec![Change {
                    op: Op::Update,
                    before: Some(before),
                    after: Some(after),
                }]
            }
            Step::Delete { pick } => {
                let Some(id) = self.pick(*pick) else {
                    return Vec::new();
                };
                let before = self.table.remove(&id).unwrap();
                vec![Change {
                    op: Op::Delete,
                    before: Some(before),
                    after: None,
                }]
            }
        }
    }

    /// A new snapshot (a recreated slot, or a snapshot started over): every
    /// row as `r` at a new, higher LSN; streaming then starts again with no
    /// previous commit.
    fn snapshot(&mut self) -> Vec<Delivery> {
        // At the WAL's current position: the same as the last snapshot's if
        // nothing was written since, but always started later.
        self.commit = 0;
        self.snapshots += 1;
        let snapshot = SnapshotId {
            lsn: self.lsn,
            started_ms: 1_700_000_000_000 + self.snapshots * 60_000,
        };
        let mut ids: Vec<&i64> = self.table.keys().collect();
        ids.sort();
        ids.into_iter()
            .map(|id| {
                let change = Change {
                    op: Op::Read,
                    before: None,
                    after: Some(self.table[id].clone()),
                };
                (
                    (id % PARTITIONS) as i32,
                    Origin::Snapshot(snapshot),
                    TableChange::Order(change),
                )
            })
            .collect()
    }
}

fn history(statements: &[Statement]) -> (Vec<Delivery>, HashMap<i64, Order>) {
    let mut source = Source::new();
    let deliveries = source.run(statements);
    (deliveries, source.table)
}

/// The offsets the deliveries get in their partitions, from `first` on.
fn at_offsets(deliveries: &[Delivery], first: &[i64]) -> Vec<Event> {
    let mut next = first.to_vec();
    deliveries
        .iter()
        .map(|(p, origin, change)| {
            let offset = next[*p as usize];
            next[*p as usize] += 1;
            (*p, offset, *origin, change.clone())
        })
        .collect()
}

fn events_of(statements: &[Statement]) -> (Vec<Event>, HashMap<i64, Order>) {
    let (deliveries, table) = history(statements);
    (at_offsets(&deliveries, &[0; PARTITIONS as usize]), table)
}

/// Where a restarted connector may resume: at the start of a transaction or
/// at the first LSN after the one it stored, never inside a group of events
/// at one position (debezium/dbz#1554 made that lose the rest of the group;
/// docs/SOURCE-POSITIONS.md, 6b).
fn resume_points(deliveries: &[Delivery]) -> Vec<usize> {
    (0..=deliveries.len())
        .filter(|&i| i == 0 || i == deliveries.len() || deliveries[i].1 != deliveries[i - 1].1)
        .collect()
}

/// The deliveries with a restarted connector's repeats: after `sent`
/// deliveries it starts again from resume point `from` (at or before
/// `sent`), and every event from there comes again, at new offsets.
fn with_repeats(deliveries: &[Delivery], sent: usize, from: usize) -> Vec<Delivery> {
    assert!(from <= sent);
    let mut out = deliveries[..sent].to_vec();
    out.extend_from_slice(&deliveries[from..]);
    out
}

/// SELECT minute, status, count(*), sum(total_amount) GROUP BY 1, 2.
fn group_by(table: &HashMap<i64, Order>) -> BTreeMap<(Minute, String), OrderTotals> {
    let mut out: BTreeMap<(Minute, String), OrderTotals> = BTreeMap::new();
    for o in table.values() {
        let t = out
            .entry((Minute::of(o.created_at), o.status.clone()))
            .or_default();
        t.orders += 1;
        t.revenue += o.total_amount;
    }
    out
}

fn apply_all(state: &mut AggregateState<OrdersByMinute>, events: &[Event]) {
    for (p, o, origin, c) in events {
        state.apply(*p, *o, *origin, c).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn deltas_add_up_to_the_group_by(steps in proptest::collection::vec(step(), 0..80)) {
        let (events, table) = events_of(&steps);
        let mut state = AggregateState::<OrdersByMinute>::default();
        apply_all(&mut state, &events);
        prop_assert_eq!(state.totals(), group_by(&table));
    }

    #[test]
    fn replaying_a_prefix_again_changes_nothing(
        steps in proptest::collection::vec(step(), 1..80),
        cut in any::<prop::sample::Index>(),
    ) {
        let (events, table) = events_of(&steps);
        let mut state = AggregateState::<OrdersByMinute>::default();
        apply_all(&mut state, &events);
        let prefix = cut.index(events.len() + 1);
        apply_all(&mut state, &events[..prefix]);
        prop_assert_eq!(state.totals(), group_by(&table));
    }

    #[test]
    fn restart_from_flushed_rows_and_replay_from_the_commit_converges(
        steps in proptest::collection::vec(step(), 1..80),
        flush_at in any::<prop::sample::Index>(),
        commit_lag in any::<prop::sample::Index>(),
    ) {
        let (events, table) = events_of(&steps);
        // Run up to the flush point, write the dirty rows (the sink), crash.
        let flushed = flush_at.index(events.len() + 1);
        let mut before_crash = AggregateState::<OrdersByMinute>::default();
        apply_all(&mut before_crash, &events[..flushed]);
        let stored = before_crash.dirty_rows();
        // The commit lags the flush: the restart replays from an earlier point.
        let committed = flushed - commit_lag.index(flushed + 1);
        let mut restarted = AggregateState::<OrdersByMinute>::default();
        restarted.load(stored);
        apply_all(&mut restarted, &events[committed..]);
        prop_assert_eq!(restarted.totals(), group_by(&table));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn rows_changed_during_a_flush_are_written_by_the_next(
        steps in proptest::collection::vec(step(), 1..80),
        taken in any::<prop::sample::Index>(),
        written in any::<prop::sample::Index>(),
    ) {
        let (events, table) = events_of(&steps);
        let taken = taken.index(events.len() + 1);
        let written = taken + written.index(events.len() - taken + 1);
        let mut state = AggregateState::<OrdersByMinute>::default();
        // ClickHouse's ReplacingMergeTree(source_offset): per (key, partition)
        // the row with the highest offset.
        let mut store = HashMap::new();
        let mut write = |rows: &[StoredRow<(Minute, String), OrderTotals>]| {
            for row in rows {
                let kept = store.entry((row.key.clone(), row.partition)).or_insert_with(|| row.clone());
                if row.offset >= kept.offset {
                    *kept = row.clone();
                }
            }
        };
        apply_all(&mut state, &events[..taken]);
        let first = state.dirty_rows();
        // Applied while the first flush is being written.
        apply_all(&mut state, &events[taken..written]);
        write(&first);
        state.mark_flushed(&first);
        apply_all(&mut state, &events[written..]);
        let second = state.dirty_rows();
        write(&second);
        state.mark_flushed(&second);
        prop_assert!(state.dirty_rows().is_empty());
        let mut reloaded = AggregateState::<OrdersByMinute>::default();
        reloaded.load(store.into_values());
        prop_assert_eq!(reloaded.totals(), group_by(&table));
    }
}

#[test]
fn item_edits_move_units_and_revenue_between_products() {
    let item = |product_id, quantity, cents| OrderItem {
        id: 1,
        product_id,
        quantity,
        unit_price: Decimal::new(cents, 2),
    };
    let mut state = AggregateState::<ProductSales>::default();
    let events = [
        Change {
            op: Op::Create,
            before: None,
            after: Some(item(1, 2, 1999)),
        },
        Change {
            op: Op::Update,
            before: Some(item(1, 2, 1999)),
            after: Some(item(1, 3, 1999)),
        },
        Change {
            op: Op::Update,
            before: Some(item(1, 3, 1999)),
            after: Some(item(2, 1, 4500)),
        },
    ];
    for (offset, c) in events.into_iter().enumerate() {
        let at = Origin::Stream(Position {
            commit: offset as u64,
            lsn: offset as u64,
        });
        state
            .apply(0, offset as i64, at, &TableChange::OrderItem(c))
            .unwrap();
    }
    let totals = state.totals();
    assert_eq!(
        totals.len(),
        1,
        "product 1 is back to zero and left out: {totals:?}"
    );
    assert_eq!(
        totals[&2],
        SalesTotals {
            units: 1,
            revenue: Decimal::new(4500, 2),
            lines: 1
        }
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]

    #[test]
    fn releasing_partitions_keeps_exactly_the_others(
        steps in proptest::collection::vec(step(), 1..80),
        released in proptest::collection::vec(0..PARTITIONS as i32, 0..4),
    ) {
        let (events, _) = events_of(&steps);
        let mut state = AggregateState::<OrdersByMinute>::default();
        apply_all(&mut state, &events);
        state.release(&released);
        let kept: Vec<Event> = events
            .iter()
            .filter(|(p, _, _, _)| !released.contains(p))
            .cloned()
            .collect();
        let mut expected = AggregateState::<OrdersByMinute>::default();
        apply_all(&mut expected, &kept);
        prop_assert_eq!(state.totals(), expected.totals());
        for p in 0..PARTITIONS as i32 {
            prop_assert_eq!(state.watermark(p), expected.watermark(p), "partition {}", p);
        }
    }
}

/// A products history: upserts and deletes of a few product ids, each id's
/// events in its own partition (Debezium keys by primary key), as the
/// decoder gives them to the dimension: no old row of an update, only the
/// key of a delete (all that REPLICA IDENTITY DEFAULT sends).
fn product_history(steps: &[(u8, Option<u32>)]) -> (Vec<Event>, BTreeMap<i64, Product>) {
    let mut table: BTreeMap<i64, Product> = BTreeMap::new();
    let mut next_offset = vec![0i64; PARTITIONS as usize];
    let mut events = Vec::new();
    for &(id, cents) in steps {
        let id = i64::from(id);
        let before = table.get(&id).cloned();
        let after = cents.map(|cents| Product {
            id,
            name: format!("product {id} at {cents}"),
            category: ["toys", "books"][(cents % 2) as usize].to_string(),
            price: Decimal::new(cents.into(), 2),
        });
        let op = match (&before, &after) {
            (None, None) => continue,
            (None, Some(_)) => Op::Create,
            (Some(_), Some(_)) => Op::Update,
            (Some(_), None) => Op::Delete,
        };
        match &after {
            Some(p) => table.insert(id, p.clone()),
            None => table.remove(&id),
        };
        let before = (op == Op::Delete).then_some(ProductKey { id });
        let partition = (id % PARTITIONS) as usize;
        let lsn = events.len() as u64 + 1;
        events.push((
            partition as i32,
            next_offset[partition],
            Origin::Stream(Position { commit: lsn, lsn }),
            TableChange::Product(Change { op, before, after }),
        ));
        next_offset[partition] += 1;
    }
    (events, table)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// The products dimension keeps no written rows, and loads none after a
    /// restart: a replay writes older rows again, which the sink's highest
    /// offset settles. What the sink ends with is the final table.
    #[test]
    fn a_dimension_forgets_written_rows_and_the_sink_keeps_the_latest(
        steps in proptest::collection::vec((0u8..6, proptest::option::of(1u32..10_000)), 1..60),
        flushes in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
        crash in any::<prop::sample::Index>(),
        commit_lag in any::<prop::sample::Index>(),
    ) {
        let (events, table) = product_history(&steps);
        let mut store: HashMap<(i64, i32), StoredRow<i64, ProductInfo>> = HashMap::new();
        let mut flush = |state: &mut AggregateState<Products>| {
            let rows = state.dirty_rows();
            for row in &rows {
                let kept = store.entry((row.key, row.partition)).or_insert_with(|| row.clone());
                if row.offset >= kept.offset {
                    *kept = row.clone();
                }
            }
            state.mark_flushed(&rows);
        };
        let crash = crash.index(events.len() + 1);
        let mut points: Vec<usize> = flushes.iter().map(|i| i.index(crash + 1)).collect();
        points.sort_unstable();
        let mut state = AggregateState::<Products>::default();
        let mut applied = 0;
        let mut committed = 0;
        for point in points {
            for (p, o, origin, c) in &events[applied..point] {
                state.apply(*p, *o, *origin, c).unwrap();
            }
            applied = point;
            flush(&mut state);
            prop_assert!(state.is_empty(), "written rows are still held: {}", state.len());
            committed = point;
        }
        // Crash, restart with nothing loaded, replay from a commit at or
        // before the last flush, then flush.
        let replay_from = committed - commit_lag.index(committed + 1);
        let mut restarted = AggregateState::<Products>::default();
        for (p, o, origin, c) in &events[replay_from..] {
            restarted.apply(*p, *o, *origin, c).unwrap();
        }
        flush(&mut restarted);
        prop_assert!(restarted.is_empty());
        // A deleted product's row says so and keeps nothing else: the
        // delete carried only the key.
        let deleted: Vec<i64> = store
            .values()
            .filter(|row| row.value.deleted)
            .map(|row| row.key)
            .collect();
        for row in store.values().filter(|row| row.value.deleted) {
            prop_assert_eq!(&row.value, &ProductInfo { deleted: true, ..ProductInfo::default() });
        }
        let ever: std::collections::BTreeSet<i64> = steps
            .iter()
            .filter(|(_, cents)| cents.is_some())
            .map(|(id, _)| i64::from(*id))
            .collect();
        let gone: Vec<i64> = ever.into_iter().filter(|id| !table.contains_key(id)).collect();
        let mut deleted_sorted = deleted;
        deleted_sorted.sort_unstable();
        prop_assert_eq!(deleted_sorted, gone);
        let stored: BTreeMap<i64, (String, String, Decimal)> = store
            .into_values()
            .filter(|row| !row.value.deleted)
            .map(|row| (row.key, (row.value.name, row.value.category, row.value.price)))
            .collect();
        let expected: BTreeMap<i64, (String, String, Decimal)> = table
            .into_values()
            .map(|p| (p.id, (p.name, p.category, p.price)))
            .collect();
        prop_assert_eq!(stored, expected);
    }
}

/// A crash: after how many events the last flush was, and how many events
/// the commit was behind it.
type Crash = Option<(prop::sample::Index, prop::sample::Index)>;

/// Applies `events`; with a crash, runs up to the flush, restarts from the
/// flushed rows and replays from the commit (what the pipeline does).
fn run_with_crash(events: &[Event], crash: Crash) -> AggregateState<OrdersByMinute> {
    let crash = crash.map(|(flush_at, commit_lag)| {
        let flushed = flush_at.index(events.len() + 1);
        (flushed, flushed - commit_lag.index(flushed + 1))
    });
    run_with_crash_at(events, crash)
}

/// [`run_with_crash`] with the crash as (events flushed, events committed).
fn run_with_crash_at(
    events: &[Event],
    crash: Option<(usize, usize)>,
) -> AggregateState<OrdersByMinute> {
    let mut state = AggregateState::<OrdersByMinute>::default();
    let Some((flushed, committed)) = crash else {
        apply_all(&mut state, events);
        return state;
    };
    apply_all(&mut state, &events[..flushed]);
    let stored = state.dirty_rows();
    let mut restarted = AggregateState::<OrdersByMinute>::default();
    restarted.load(stored);
    apply_all(&mut restarted, &events[committed..]);
    restarted
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// A restarted connector sends everything from where it resumes again,
    /// at new offsets: the totals still end at the GROUP BY, also when the
    /// processor crashes and replays in between.
    #[test]
    fn events_the_source_sends_again_change_nothing(
        steps in proptest::collection::vec(step(), 1..80),
        sent in any::<prop::sample::Index>(),
        from in any::<prop::sample::Index>(),
        crash in proptest::option::of(any::<(prop::sample::Index, prop::sample::Index)>()),
    ) {
        let (deliveries, table) = history(&steps);
        let sent = sent.index(deliveries.len() + 1);
        let resumable: Vec<usize> =
            resume_points(&deliveries).into_iter().filter(|&p| p <= sent).collect();
        let from = resumable[from.index(resumable.len())];
        let events = at_offsets(&with_repeats(&deliveries, sent, from), &[0; PARTITIONS as usize]);
        let state = run_with_crash(&events, crash);
        prop_assert_eq!(state.totals(), group_by(&table));
    }

    /// A snapshot started over after `cut` of its rows were sent (an engine
    /// stopped during it comes back at a new LSN, and the table may have
    /// changed meanwhile): its rows replace the unfinished one's, and the
    /// stream after it counts on from there.
    #[test]
    fn a_snapshot_started_over_replaces_the_unfinished_one(
        table in proptest::collection::vec(step(), 0..40),
        meanwhile in proptest::collection::vec(step(), 0..10),
        after in proptest::collection::vec(step(), 0..30),
        cut in any::<prop::sample::Index>(),
        crash in proptest::option::of(any::<(prop::sample::Index, prop::sample::Index)>()),
    ) {
        let mut source = Source::new();
        // The table before the connector first runs: not streamed.
        source.run(&table);
        let unfinished = source.snapshot();
        let mut deliveries = unfinished[..cut.index(unfinished.len() + 1)].to_vec();
        source.run(&meanwhile);
        let restarted = source.snapshot();
        // A partition the restarted snapshot sends no rows learns of it from
        // the others, at its next streamed change; three inserts give every
        // partition one. A table the restarted snapshot sends no rows at all
        // is the limit of what the stream tells (ARCHITECTURE.md).
        prop_assume!(!restarted.is_empty());
        deliveries.extend(restarted);
        deliveries.extend(source.run(&after));
        let inserts: Vec<Statement> = (0..PARTITIONS).map(|_| (false, insert(0, 0, 1))).collect();
        deliveries.extend(source.run(&inserts));
        let events = at_offsets(&deliveries, &[0; PARTITIONS as usize]);
        let state = run_with_crash(&events, crash);
        prop_assert_eq!(state.totals(), group_by(&source.table));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// The log before a new snapshot lost some changes and repeated others
    /// (what a recreated slot leaves): a rebuild over the whole log counts
    /// from the new snapshot, so its totals are the GROUP BY. A processor
    /// that then starts on the rebuilt rows, from an older committed offset
    /// of each partition, skips what the rebuild counted and counts the
    /// changes after it, also for keys the rebuilt rows lack.
    #[test]
    fn a_rebuild_counts_from_the_newest_snapshot(
        before in proptest::collection::vec(step(), 0..40),
        lost in proptest::collection::vec(any::<bool>(), 40),
        after in proptest::collection::vec(step(), 0..20),
        later in proptest::collection::vec(step(), 0..20),
        committed in proptest::collection::vec(any::<prop::sample::Index>(), PARTITIONS as usize),
        rotate in proptest::option::of(0..PARTITIONS as i32),
    ) {
        let mut source = Source::new();
        let streamed = source.run(&before);
        let mut deliveries: Vec<Delivery> = streamed
            .iter()
            .zip(lost.iter().cycle())
            .filter(|(_, lost)| !**lost)
            .map(|(d, _)| d.clone())
            .collect();
        deliveries.extend(streamed.iter().take(3).cloned());
        let snapshot = source.snapshot();
        // A table empty at the new snapshot shows it by the other tables'
        // rows only (`AllAggregates::rebuilt`); this model has one table.
        prop_assume!(!snapshot.is_empty());
        let with_rows: std::collections::BTreeSet<i32> = snapshot.iter().map(|d| d.0).collect();
        deliveries.extend(snapshot);
        deliveries.extend(source.run(&after));
        let events = at_offsets(&deliveries, &[0; PARTITIONS as usize]);

        // A consumer reads partitions in any interleaving: here, with
        // `rotate`, one whole partition after the other.
        let mut read = events.clone();
        if let Some(rotate) = rotate {
            read.sort_by_key(|(p, _, _, _)| (p + rotate) % PARTITIONS as i32);
        }
        let mut rebuilt = AggregateState::<OrdersByMinute>::rebuilding();
        apply_all(&mut rebuilt, &read);
        match rebuilt.rebuilt(0) {
            Ok(()) => prop_assert_eq!(rebuilt.totals(), group_by(&source.table)),
            // Only a partition with rows but none of the new snapshot's.
            Err(e) => {
                prop_assert!(!with_rows.contains(&e.partition), "{}", e);
                return Ok(());
            }
        }

        // The processor, stopped by the new snapshot at its first row,
        // starts on the rebuilt rows from an offset it committed earlier.
        let mut restarted = AggregateState::<OrdersByMinute>::default();
        restarted.load(rebuilt.dirty_rows());
        let ends = at_offsets(&deliveries, &[0; PARTITIONS as usize])
            .iter()
            .fold(vec![0i64; PARTITIONS as usize], |mut ends, (p, o, _, _)| {
                ends[*p as usize] = ends[*p as usize].max(o + 1);
                ends
            });
        let resumes: Vec<i64> = committed
            .iter()
            .zip(&ends)
            .map(|(i, end)| i.index(*end as usize + 1) as i64)
            .collect();
        let replay: Vec<Event> = events
            .iter()
            .filter(|(p, o, _, _)| *o >= resumes[*p as usize])
            .cloned()
            .collect();
        apply_all(&mut restarted, &replay);
        prop_assert_eq!(restarted.totals(), group_by(&source.table));
        let more = at_offsets(&source.run(&later), &ends);
        apply_all(&mut restarted, &more);
        prop_assert_eq!(restarted.totals(), group_by(&source.table));
    }
}

/// Two orders inserted and streamed (ids 1 and 2, partitions 1 and 2), then
/// a new snapshot of both: the log of a slot recreated after streaming.
fn two_streamed_orders_then_a_snapshot() -> (Vec<Event>, Source) {
    let mut source = Source::new();
    let mut deliveries = source.run(&[(false, insert(0, 1, 100)), (false, insert(1, 1, 200))]);
    deliveries.extend(source.snapshot());
    let events = at_offsets(&deliveries, &[0; PARTITIONS as usize]);
    (events, source)
}

/// The negative control of the property above: the same log counted by the
/// pipeline's state, not a rebuild's, stops at the new snapshot.
#[test]
fn only_a_rebuild_counts_past_a_new_snapshot() {
    let (events, source) = two_streamed_orders_then_a_snapshot();
    let mut rebuilt = AggregateState::<OrdersByMinute>::rebuilding();
    apply_all(&mut rebuilt, &events);
    rebuilt.rebuilt(0).unwrap();
    assert_eq!(rebuilt.totals(), group_by(&source.table));
    let mut live = AggregateState::<OrdersByMinute>::default();
    let stopped = events
        .iter()
        .filter(|(p, o, origin, c)| live.apply(*p, *o, *origin, c).is_err())
        .count();
    assert_eq!(stopped, 2);
}

/// A partition with rows from before the newest snapshot and none of it
/// cannot be rebuilt: which of its later changes follow the snapshot is
/// unknown. The rebuild says which partition, instead of counting.
#[test]
fn a_rebuild_refuses_a_partition_the_newest_snapshot_missed() {
    let mut source = Source::new();
    // Ids 1, 2, 3 in partitions 1, 2, 0; id 3 is deleted, but the delete
    // is lost, so partition 0 still holds it when the new snapshot comes.
    let mut deliveries = source.run(&[
        (false, insert(0, 1, 100)),
        (false, insert(1, 1, 200)),
        (false, insert(1, 1, 300)),
    ]);
    source.run(&[(false, Step::Delete { pick: 2 })]);
    deliveries.extend(source.snapshot());
    let events = at_offsets(&deliveries, &[0; PARTITIONS as usize]);
    let mut rebuilt = AggregateState::<OrdersByMinute>::rebuilding();
    apply_all(&mut rebuilt, &events);
    let refused = rebuilt.rebuilt(0).unwrap_err();
    assert_eq!(refused.partition, 0, "{refused}");
    assert!(refused.why.contains("newest snapshot"), "{refused}");
}

/// A snapshot after streamed changes (the slot or the connector's offsets
/// were recreated) stops the partition with an error: the changes between
/// the two may be lost or come again.
#[test]
fn a_new_snapshot_after_streaming_is_an_error() {
    let (events, _) = two_streamed_orders_then_a_snapshot();
    let mut state = AggregateState::<OrdersByMinute>::default();
    let errors: Vec<String> = events
        .iter()
        .filter_map(|(p, o, origin, c)| state.apply(*p, *o, *origin, c).err())
        .map(|e| e.why)
        .collect();
    // Ids 1 and 2 live in partitions 1 and 2, each streamed, then snapshotted.
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("a new snapshot after streaming"),
        "{errors:?}"
    );
}

/// The negative control of the property above, by hand: without the
/// position guard, an insert the source sends again counts twice (a
/// fault-test build: only it can switch the guard off).
#[cfg(feature = "faults")]
#[test]
fn without_the_position_guard_a_repeat_counts_twice() {
    let (deliveries, table) = history(&[(false, insert(0, 1, 4548))]);
    let repeated = with_repeats(&deliveries, deliveries.len(), 0);
    let events = at_offsets(&repeated, &[0; PARTITIONS as usize]);
    assert_eq!(events.len(), 2);
    let mut guarded = AggregateState::<OrdersByMinute>::default();
    apply_all(&mut guarded, &events);
    assert_eq!(guarded.totals(), group_by(&table));
    let mut unguarded = AggregateState::<OrdersByMinute>::default().without_position_guard();
    apply_all(&mut unguarded, &events);
    let totals: Vec<i64> = unguarded.totals().values().map(|t| t.orders).collect();
    assert_eq!(totals, [2]);
}

/// Rows of one COPY page at one position: siblings count, a repeat of the
/// page does not, and a processor restart between two siblings does not
/// lose the ones before it (the mark stored with the rows lists them).
#[test]
fn rows_sharing_a_position_are_told_apart_by_their_key() {
    let page = Step::Copy {
        rows: vec![(0, 1, 100), (0, 1, 200), (0, 1, 300), (0, 1, 400)],
    };
    let (deliveries, table) = history(&[(false, page)]);
    // Ids 1..=4 over 3 partitions: partition 1 gets ids 1 and 4, both into
    // one aggregate key.
    let repeated = with_repeats(&deliveries, deliveries.len(), 0);
    let events = at_offsets(&repeated, &[0; PARTITIONS as usize]);
    for flushed in 0..=events.len() {
        for committed in 0..=flushed {
            let state = run_with_crash_at(&events, Some((flushed, committed)));
            assert_eq!(
                state.totals(),
                group_by(&table),
                "flushed after {flushed}, committed {committed}"
            );
        }
    }
}

/// Events that cannot be placed stop the state with an error instead of
/// counting: a snapshot older than the one the rows start from, and a row of
/// the current snapshot after streaming.
#[test]
fn an_event_that_cannot_be_placed_is_an_error() {
    let read = |id| {
        TableChange::Order(Change {
            op: Op::Read,
            before: None,
            after: Some(order(id, 0, 0, 100)),
        })
    };
    let snapshot = |lsn, started_ms| Origin::Snapshot(SnapshotId { lsn, started_ms });
    let mut state = AggregateState::<OrdersByMinute>::default();
    state.apply(0, 0, snapshot(50, 9), &read(3)).unwrap();
    let older = state.apply(0, 1, snapshot(40, 10), &read(6)).unwrap_err();
    assert!(older.why.contains("LSN 40"), "{older}");
    let at = Origin::Stream(Position { commit: 0, lsn: 60 });
    let create = TableChange::Order(Change {
        op: Op::Create,
        before: None,
        after: Some(order(9, 0, 0, 100)),
    });
    state.apply(0, 2, at, &create).unwrap();
    let late = state.apply(0, 3, snapshot(50, 9), &read(12)).unwrap_err();
    assert!(late.why.contains("after streaming began"), "{late}");
}

fn insert(minute: u8, status: usize, cents: u32) -> Step {
    Step::Insert {
        minute,
        status,
        cents,
    }
}

/// What the pipeline writes, as ClickHouse keeps it: per (key, partition)
/// the row with the highest offset, per partition the mark with the highest.
type OrderRow = StoredRow<(Minute, String), OrderTotals>;

#[derive(Default)]
struct Stored {
    rows: HashMap<((Minute, String), i32), OrderRow>,
    marks: HashMap<i32, PartitionMark>,
    /// The marks before the last write.
    marks_before: HashMap<i32, PartitionMark>,
}

impl Stored {
    fn write(&mut self, rows: &[OrderRow], marks: &[PartitionMark]) {
        self.marks_before = self.marks.clone();
        for row in rows {
            let key = (row.key.clone(), row.partition);
            if self
                .rows
                .get(&key)
                .is_none_or(|kept| row.offset >= kept.offset)
            {
                self.rows.insert(key, row.clone());
            }
        }
        for mark in marks {
            if self
                .marks
                .get(&mark.partition)
                .is_none_or(|kept| mark.offset >= kept.offset)
            {
                self.marks.insert(mark.partition, mark.clone());
            }
        }
    }

    fn read_back(&self, partition: i32, keys: &[(Minute, String)]) -> Vec<OrderRow> {
        keys.iter()
            .filter_map(|key| self.rows.get(&(key.clone(), partition)).cloned())
            .collect()
    }

    /// A new owner's state: each partition from its mark, its rows read
    /// back as events need them (or whole, while still in its snapshot).
    fn assigned(&self) -> AggregateState<OrdersByMinute> {
        let mut state = AggregateState::<OrdersByMinute>::default();
        for mark in self.marks.values() {
            state.start(mark, !mark.in_snapshot());
            if mark.in_snapshot() {
                let whole = self.rows.values().filter(|r| r.partition == mark.partition);
                state.load(whole.cloned());
            }
        }
        state
    }

    fn totals(&self) -> BTreeMap<(Minute, String), OrderTotals> {
        let mut read = AggregateState::<OrdersByMinute>::default();
        read.load(self.rows.values().cloned());
        read.totals()
    }
}

/// The aggregator over `events` with at most `limit` rows held: batches of
/// up to `batch` events of one partition, the keys not held read back
/// first; a flush (rows, then marks; the commit moves to the watermarks)
/// every `flush_every` batches, then an eviction. With `crash` = (batches,
/// flushes the commit lags, marks lost), the process dies after that many
/// batches, and a new one starts from the store and replays from the
/// commit; with `marks lost`, it died between a flush's rows and its marks
/// (when a flush came last), so the stored marks are one flush behind.
fn run_bounded(
    events: &[Event],
    batch: usize,
    limit: usize,
    flush_every: usize,
    crash: Option<(usize, usize, bool)>,
) -> (Stored, usize) {
    let mut stored = Stored::default();
    let mut state = AggregateState::<OrdersByMinute>::default();
    // After each flush, the offset to resume each partition from.
    let mut commits: Vec<HashMap<i32, i64>> = vec![HashMap::new()];
    let mut reads = 0;
    let flush = |state: &mut AggregateState<OrdersByMinute>,
                 stored: &mut Stored,
                 commits: &mut Vec<HashMap<i32, i64>>| {
        let rows = state.dirty_rows();
        let marks = state.partition_marks();
        stored.write(&rows, &marks);
        state.mark_flushed(&rows);
        state.evict(limit);
        let mut commit = commits.last().cloned().unwrap_or_default();
        commit.extend(state.watermarks().map(|(p, o)| (p, o + 1)));
        commits.push(commit);
    };
    let mut batches = 0;
    let mut next = 0;
    let mut crashed = false;
    let mut queue: Vec<Event> = events.to_vec();
    while next < queue.len() {
        let partition = queue[next].0;
        let end = (next..queue.len())
            .take(batch)
            .take_while(|&i| queue[i].0 == partition)
            .last()
            .map_or(next, |i| i + 1);
        let this = &queue[next..end];
        let missing = state.missing(
            partition,
            this.iter().map(|(_, o, origin, c)| (*o, *origin, c)),
        );
        if !missing.is_empty() {
            reads += 1;
            state.load_rows(partition, stored.read_back(partition, &missing));
        }
        apply_all(&mut state, this);
        next = end;
        batches += 1;
        if batches % flush_every == 0 {
            flush(&mut state, &mut stored, &mut commits);
        }
        if let Some((at, mut lag, marks_lost)) = crash.filter(|_| !crashed) {
            if batches == at {
                // The process dies; its unflushed changes with it. The next
                // one replays every partition from its commit.
                crashed = true;
                if marks_lost && batches % flush_every == 0 {
                    // Between the last flush's rows and its marks: it never
                    // committed either.
                    stored.marks = stored.marks_before.clone();
                    lag = lag.max(1);
                }
                let commit = commits[commits.len() - 1 - lag.min(commits.len() - 1)].clone();
                state = stored.assigned();
                queue = events
                    .iter()
                    .filter(|(p, o, ..)| *o >= commit.get(p).copied().unwrap_or(0))
                    .cloned()
                    .collect();
                next = 0;
            }
        }
    }
    flush(&mut state, &mut stored, &mut commits);
    (stored, reads)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Eviction, rows read back by key and replays (a crash replaying from a
    /// commit that lags the flushes, and a restarted connector's repeats at
    /// new offsets) together still store the GROUP BY.
    #[test]
    fn eviction_reads_back_and_replays_converge_to_the_group_by(
        steps in proptest::collection::vec(step(), 1..80),
        sent in any::<prop::sample::Index>(),
        from in any::<prop::sample::Index>(),
        batch in 1usize..6,
        limit in 1usize..8,
        flush_every in 1usize..4,
        crash in proptest::option::of((1usize..60, 0usize..3, any::<bool>())),
    ) {
        let (deliveries, table) = history(&steps);
        let sent = sent.index(deliveries.len() + 1);
        let resumable: Vec<usize> =
            resume_points(&deliveries).into_iter().filter(|&p| p <= sent).collect();
        let from = resumable[from.index(resumable.len())];
        let events = at_offsets(&with_repeats(&deliveries, sent, from), &[0; PARTITIONS as usize]);
        let (stored, _) = run_bounded(&events, batch, limit, flush_every, crash);
        prop_assert_eq!(stored.totals(), group_by(&table));
    }
}

/// The bound is what makes rows go and come back: without it nothing is
/// read back; with a bound of one row, keys are read back, and a restart
/// reads back what it touches instead of loading every row.
#[test]
fn a_small_bound_reads_rows_back_and_a_large_one_does_not() {
    let steps: Vec<Statement> = (0..60u8)
        .map(|i| {
            let step = if i % 3 == 2 {
                Step::Update {
                    pick: usize::from(i),
                    status: usize::from(i) % STATUSES.len(),
                    cents: 100 + u32::from(i),
                    minute: None,
                }
            } else {
                Step::Insert {
                    minute: i % 20,
                    status: 0,
                    cents: 500 + u32::from(i),
                }
            };
            (false, step)
        })
        .collect();
    let (events, table) = events_of(&steps);
    let (large, no_reads) = run_bounded(&events, 4, 10_000, 1, None);
    assert_eq!(no_reads, 0);
    assert_eq!(large.totals(), group_by(&table));
    let (small, reads) = run_bounded(&events, 4, 1, 1, Some((10, 1, false)));
    assert!(reads > 5, "{reads} reads with one row held");
    assert_eq!(small.totals(), group_by(&table));
}
