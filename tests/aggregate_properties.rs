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
//!   loads nothing and replays still leaves the sink with the final table.

use std::collections::{BTreeMap, HashMap};

use chrono::{TimeZone, Utc};
use etl::aggregate::{
    AggregateState, OrderTotals, OrdersByMinute, ProductInfo, ProductSales, Products, SalesTotals,
    StoredRow,
};
use etl::cdc::{Change, Minute, Op, Order, OrderItem, Product, ProductKey, TableChange};
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
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u8..5, 0usize..3, 0u32..100_000).prop_map(|(minute, status, cents)| Step::Insert { minute, status, cents }),
        3 => (any::<usize>(), 0usize..3, 0u32..100_000, proptest::option::of(0u8..5))
            .prop_map(|(pick, status, cents, minute)| Step::Update { pick, status, cents, minute }),
        1 => any::<usize>().prop_map(|pick| Step::Delete { pick }),
    ]
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

/// An event as the pipeline sees it: (partition, offset, change).
type Event = (i32, i64, TableChange);

/// Runs the steps against a model table; returns the events (Debezium keys by
/// id, so an order's events share a partition) and the final table.
fn history(steps: &[Step]) -> (Vec<Event>, HashMap<i64, Order>) {
    let mut table: HashMap<i64, Order> = HashMap::new();
    let mut next_id = 1;
    let mut next_offset = vec![0i64; PARTITIONS as usize];
    let mut events = Vec::new();
    for s in steps {
        let (id, change) = match s {
            Step::Insert {
                minute,
                status,
                cents,
            } => {
                let o = order(next_id, *minute, *status, *cents);
                next_id += 1;
                table.insert(o.id, o.clone());
                (
                    o.id,
                    Change {
                        op: Op::Create,
                        before: None,
                        after: Some(o),
                    },
                )
            }
            Step::Update {
                pick,
                status,
                cents,
                minute,
            } => {
                if table.is_empty() {
                    continue;
                }
                let mut ids: Vec<i64> = table.keys().copied().collect();
                ids.sort();
                let id = ids[pick % ids.len()];
                let before = table[&id].clone();
                let mut after = order(id, 0, *status, *cents);
                after.created_at = match minute {
                    Some(m) => order(id, *m, 0, 0).created_at,
                    None => before.created_at,
                };
                table.insert(id, after.clone());
                (
                    id,
                    Change {
                        op: Op::Update,
                        before: Some(before),
                        after: Some(after),
                    },
                )
            }
            Step::Delete { pick } => {
                if table.is_empty() {
                    continue;
                }
                let mut ids: Vec<i64> = table.keys().copied().collect();
                ids.sort();
                let id = ids[pick % ids.len()];
                let before = table.remove(&id).unwrap();
                (
                    id,
                    Change {
                        op: Op::Delete,
                        before: Some(before),
                        after: None,
                    },
                )
            }
        };
        let partition = (id % PARTITIONS) as usize;
        events.push((
            partition as i32,
            next_offset[partition],
            TableChange::Order(change),
        ));
        next_offset[partition] += 1;
    }
    (events, table)
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
    for (p, o, c) in events {
        state.apply(*p, *o, c);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn deltas_add_up_to_the_group_by(steps in proptest::collection::vec(step(), 0..80)) {
        let (events, table) = history(&steps);
        let mut state = AggregateState::<OrdersByMinute>::default();
        apply_all(&mut state, &events);
        prop_assert_eq!(state.totals(), group_by(&table));
    }

    #[test]
    fn replaying_a_prefix_again_changes_nothing(
        steps in proptest::collection::vec(step(), 1..80),
        cut in any::<prop::sample::Index>(),
    ) {
        let (events, table) = history(&steps);
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
        let (events, table) = history(&steps);
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
        let (events, table) = history(&steps);
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
        state.apply(0, offset as i64, &TableChange::OrderItem(c));
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
        let (events, _) = history(&steps);
        let mut state = AggregateState::<OrdersByMinute>::default();
        apply_all(&mut state, &events);
        state.release(&released);
        let kept: Vec<Event> = events
            .iter()
            .filter(|(p, _, _)| !released.contains(p))
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
        events.push((
            partition as i32,
            next_offset[partition],
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
            for (p, o, c) in &events[applied..point] {
                state.apply(*p, *o, c);
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
        for (p, o, c) in &events[replay_from..] {
            restarted.apply(*p, *o, c);
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
