//! The aggregates, as pure state machines over decoded changes.
//!
//! Each aggregate is a GROUP BY over the current Postgres state (the contract
//! in the README). A change contributes `after - before` to the keys it
//! touches, so any stream of c/u/d/r events converges to that GROUP BY.
//!
//! State is kept per (aggregate key, source partition) together with the
//! offset of the last event applied to it. An event at or below a key's stored
//! offset is skipped, so replaying a partition from any earlier offset changes
//! nothing: this is what makes the ClickHouse rows exactly-once without
//! transactions. Each partition also keeps how far into Postgres's log it has
//! applied, which recognises an event Debezium sends again at a new offset
//! (see `state`).

mod evicted;
mod kinds;
mod state;

/// Changes that unit tests across the crate feed to aggregates.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::sync::Arc;

    use rust_decimal::Decimal;

    use super::{Offset, Partition, PartitionMark, SourceMark};
    use crate::cdc::{Change, Op, OrderItem, Origin, Position, Product, SnapshotId, TableChange};

    /// Product `id` created (a products dimension row).
    pub(crate) fn created(id: i64) -> TableChange {
        TableChange::Product(Change {
            op: Op::Create,
            before: None,
            after: Some(Product {
                id,
                name: format!("product {id}"),
                category: "toys".into(),
                price: Decimal::new(1999, 2),
            }),
        })
    }

    /// A row of one snapshot, the same for every call.
    pub(crate) fn snapshot() -> Origin {
        Origin::Snapshot(SnapshotId {
            lsn: 1,
            started_ms: 1,
        })
    }

    /// An order line selling one unit of `product` at 2.50, created.
    pub(crate) fn sold(product: i64) -> TableChange {
        TableChange::OrderItem(Change {
            op: Op::Create,
            before: None,
            after: Some(OrderItem {
                id: product,
                product_id: product,
                quantity: 1,
                unit_price: Decimal::new(250, 2),
            }),
        })
    }

    /// A streamed change at `offset`, its position growing with it.
    pub(crate) fn streamed(offset: Offset) -> Origin {
        Origin::Stream(Position {
            commit: 10 + offset as u64,
            lsn: 10 + offset as u64,
        })
    }

    /// What is stored of `partition` after an owner streamed it up to
    /// `offset`, below every [`streamed`] position: its rows are read
    /// back by key as events touch them.
    pub(crate) fn streamed_to(partition: Partition, offset: Offset) -> PartitionMark {
        PartitionMark {
            partition,
            offset,
            mark: SourceMark {
                snapshot: SnapshotId {
                    lsn: 1,
                    started_ms: 1,
                },
                snapshot_offset: 0,
                position: Position { commit: 1, lsn: 1 },
                rows: Arc::new([]),
            },
            newest_minute: None,
        }
    }
}

pub use kinds::{
    CustomerTotals, CustomersByMinute, OrderTotals, OrdersByMinute, ProductInfo, ProductSales,
    Products, SalesTotals,
};
pub use state::{AggregateState, Applied, PartitionMark, SourceMark, StoredRow, Unplaceable};

use std::fmt::Debug;
use std::hash::Hash;

use arrayvec::ArrayVec;

use crate::cdc::{Minute, Table, TableChange};

/// A Kafka partition of the aggregate's source topic.
pub type Partition = i32;
/// A Kafka offset within a partition.
pub type Offset = i64;

/// How one change moves one key's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Update<V> {
    /// Add this delta (sums: `after - before`).
    Add(V),
    /// Replace the value (dimensions: the latest row wins).
    Set(V),
}

/// The updates of one change: at most two keys (the before key and the
/// after key), each key at most once.
pub type Updates<K, V> = ArrayVec<(K, Update<V>), 2>;

pub trait Aggregate: Unpin + 'static {
    /// The aggregate's name: the ClickHouse table and the `aggregate` field
    /// of `replay`'s output.
    const NAME: &'static str;
    /// The source table whose changes feed it.
    const SOURCE: Table;
    type Key: Clone + Eq + Hash + Ord + Debug + Send + Sync + Unpin + 'static;
    type Value: Measure;
    /// Whether a row stays in memory once it is written. A sum's must: the
    /// next delta is added to it, and its offset guards against replays. A
    /// dimension whose every update replaces the value need not: the sink
    /// keeps the row with the highest offset, so a replayed older row loses
    /// there, and memory holds only rows not yet written.
    const KEEPS_STORED_ROWS: bool = true;

    /// The updates one change of `SOURCE` makes; none for other tables.
    fn updates(change: &TableChange) -> Updates<Self::Key, Self::Value>;

    /// The minute a key is keyed by, for an aggregate keyed by time: a key
    /// newer than every stored one was never stored, so the current
    /// minutes' new keys are not read back.
    fn key_minute(_key: &Self::Key) -> Option<Minute> {
        None
    }
}

/// A value the aggregate state can hold.
pub trait Measure: Clone + Default + PartialEq + Debug + Send + Sync + Unpin + 'static {
    fn apply(&mut self, update: &Update<Self>);
    /// Summed over source partitions: how a key's total is read back.
    fn merge(&mut self, other: &Self);
    /// A row that would be all zeros is left out of reports.
    fn is_empty(&self) -> bool;
}

/// For sum aggregates: a row's contribution to its key.
pub(crate) trait Contribution: Sized {
    fn plus(&self, other: &Self) -> Self;
    fn minus(&self, other: &Self) -> Self;
    fn is_zero(&self) -> bool;
}

/// The updates of a change to a sum aggregate: subtract what the before row
/// contributed, add what the after row contributes, one update per key.
pub(crate) fn sum_updates<K: PartialEq, V: Contribution + Default>(
    before: Option<(K, V)>,
    after: Option<(K, V)>,
) -> Updates<K, V> {
    let mut updates = Updates::new();
    match (before, after) {
        (Some((kb, vb)), Some((ka, va))) if kb == ka => {
            let delta = va.minus(&vb);
            if !delta.is_zero() {
                updates.push((ka, Update::Add(delta)));
            }
        }
        (before, after) => {
            if let Some((k, v)) = before {
                updates.push((k, Update::Add(V::default().minus(&v))));
            }
            if let Some((k, v)) = after {
                updates.push((k, Update::Add(v)));
            }
        }
    }
    updates
}
