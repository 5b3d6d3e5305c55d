//! Keyed aggregate state with a per-(key, partition) offset guard.

use std::collections::hash_map::Entry as Slot;
use std::collections::{BTreeMap, HashMap};

use super::{Aggregate, Measure, Offset, Partition};
use crate::cdc::TableChange;

#[derive(Debug, Clone)]
struct Entry<V> {
    value: V,
    stamp: Stamp,
}

/// Offset of the last event applied to a (key, partition), and whether the
/// row changed since the last flush, in one word: a separate flag would
/// cost 8 bytes of padding per row, 16 MiB at a million rows. Kafka offsets
/// are never negative, so the sign bit is free for the flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp(u64);

impl Stamp {
    const CHANGED: u64 = 1 << 63;

    fn changed(offset: Offset) -> Stamp {
        Stamp(Self::unsigned(offset) | Self::CHANGED)
    }

    fn written(offset: Offset) -> Stamp {
        Stamp(Self::unsigned(offset))
    }

    fn unsigned(offset: Offset) -> u64 {
        u64::try_from(offset).expect("Kafka offsets are not negative")
    }

    fn offset(self) -> Offset {
        (self.0 & !Self::CHANGED) as Offset
    }

    fn is_changed(self) -> bool {
        self.0 & Self::CHANGED != 0
    }
}

/// One (key, partition) row as it is stored in the sink.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow<K, V> {
    pub key: K,
    pub partition: Partition,
    pub value: V,
    pub offset: Offset,
}

/// The maps' hasher: foldhash (seeded per map, like std's SipHash, but a
/// few times cheaper on these small keys; it is on the path of every event).
type Hasher = foldhash::fast::RandomState;

/// Rows a partition's map may have room for beyond its live rows without
/// being shrunk: below this, giving memory back is not worth regrowing.
const SMALL_MAP: usize = 1024;

/// What this state holds of one source partition. Kept apart per partition
/// so that giving a partition up drops its map instead of scanning every
/// key, and so that a row does not carry its partition number.
struct PartitionState<K, V> {
    rows: HashMap<K, Entry<V>, Hasher>,
    /// The highest offset handed to this state (applied, skipped, or without
    /// effect): what a flush makes safe to commit. None until an event came.
    watermark: Option<Offset>,
}

impl<K, V> Default for PartitionState<K, V> {
    fn default() -> Self {
        PartitionState {
            rows: HashMap::default(),
            watermark: None,
        }
    }
}

/// The running state of one aggregate over the partitions this process owns.
pub struct AggregateState<A: Aggregate> {
    partitions: HashMap<Partition, PartitionState<A::Key, A::Value>, Hasher>,
    offset_guard: bool,
}

impl<A: Aggregate> Default for AggregateState<A> {
    fn default() -> Self {
        AggregateState {
            partitions: HashMap::default(),
            offset_guard: true,
        }
    }
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub keys_updated: u32,
    /// Keys whose stored offset already covers the event (a replay).
    pub keys_skipped: u32,
}

impl<A: Aggregate> AggregateState<A> {
    /// Test only (`ETL_FAULT_NO_OFFSET_GUARD`): applies replayed events again,
    /// which is what the fault tests must catch as double counting.
    pub fn without_offset_guard(mut self) -> Self {
        self.offset_guard = false;
        self
    }

    /// Applies the change at `offset` of `partition` to every key it touches
    /// whose stored offset is below `offset`.
    pub fn apply(&mut self, partition: Partition, offset: Offset, change: &TableChange) -> Applied {
        let offset_guard = self.offset_guard;
        let state = self.observed(partition, offset);
        let mut applied = Applied::default();
        for (key, update) in A::updates(change) {
            match state.rows.entry(key) {
                Slot::Occupied(mut slot) => {
                    let entry = slot.get_mut();
                    let last = entry.stamp.offset();
                    if offset <= last && offset_guard {
                        applied.keys_skipped += 1;
                        continue;
                    }
                    entry.value.apply(&update);
                    entry.stamp = Stamp::changed(last.max(offset));
                }
                Slot::Vacant(slot) => {
                    let mut value = A::Value::default();
                    value.apply(&update);
                    slot.insert(Entry {
                        value,
                        stamp: Stamp::changed(offset),
                    });
                }
            }
            applied.keys_updated += 1;
        }
        applied
    }

    /// Records that the event at `offset` was handed over, even if it had no
    /// effect here (a tombstone, say), so the commit can move past it.
    pub fn observe(&mut self, partition: Partition, offset: Offset) {
        self.observed(partition, offset);
    }

    fn observed(
        &mut self,
        partition: Partition,
        offset: Offset,
    ) -> &mut PartitionState<A::Key, A::Value> {
        let state = self.partitions.entry(partition).or_default();
        state.watermark = Some(state.watermark.map_or(offset, |w| w.max(offset)));
        state
    }

    /// The highest offset of `partition` handed to this state.
    pub fn watermark(&self, partition: Partition) -> Option<Offset> {
        self.partitions.get(&partition)?.watermark
    }

    pub fn watermarks(&self) -> impl Iterator<Item = (Partition, Offset)> + '_ {
        self.partitions
            .iter()
            .filter_map(|(p, state)| Some((*p, state.watermark?)))
    }

    /// The rows changed since the last flush.
    pub fn dirty_rows(&self) -> Vec<StoredRow<A::Key, A::Value>> {
        self.partitions
            .iter()
            .flat_map(|(partition, state)| {
                state
                    .rows
                    .iter()
                    .filter(|(_, e)| e.stamp.is_changed())
                    .map(|(key, e)| StoredRow {
                        key: key.clone(),
                        partition: *partition,
                        value: e.value.clone(),
                        offset: e.stamp.offset(),
                    })
            })
            .collect()
    }

    /// Marks rows as written, unless an event changed them since (their
    /// offset moved, or, with the offset guard off, only their value). An
    /// aggregate that need not keep written rows (`A::KEEPS_STORED_ROWS`)
    /// forgets them instead.
    pub fn mark_flushed(&mut self, rows: &[StoredRow<A::Key, A::Value>]) {
        for row in rows {
            let Some(state) = self.partitions.get_mut(&row.partition) else {
                continue;
            };
            let Some(e) = state.rows.get_mut(&row.key) else {
                continue;
            };
            if e.stamp.offset() != row.offset || e.value != row.value {
                continue;
            }
            if A::KEEPS_STORED_ROWS {
                e.stamp = Stamp::written(row.offset);
            } else {
                state.rows.remove(&row.key);
            }
        }
        if !A::KEEPS_STORED_ROWS {
            // A map keeps its capacity when rows leave: without this, a burst
            // (a snapshot, a catch-up) would hold its peak for good.
            for state in self.partitions.values_mut() {
                if state.rows.capacity() > 4 * state.rows.len() + SMALL_MAP {
                    state.rows.shrink_to_fit();
                }
            }
        }
    }

    /// Takes rows read back from the sink, e.g. after a restart or when a
    /// partition is assigned: the offset guard starts from their offsets.
    pub fn load(&mut self, rows: impl IntoIterator<Item = StoredRow<A::Key, A::Value>>) {
        for row in rows {
            self.partitions
                .entry(row.partition)
                .or_default()
                .rows
                .insert(
                    row.key,
                    Entry {
                        value: row.value,
                        stamp: Stamp::written(row.offset),
                    },
                );
        }
    }

    /// Forgets partitions this process no longer owns (or is about to
    /// reload).
    pub fn release(&mut self, partitions: &[Partition]) {
        for partition in partitions {
            self.partitions.remove(partition);
        }
    }

    /// The (key, partition) rows held.
    pub fn len(&self) -> usize {
        self.partitions.values().map(|s| s.rows.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.partitions.values().all(|s| s.rows.is_empty())
    }

    /// Each key's value summed over partitions, leaving out empty ones.
    pub fn totals(&self) -> BTreeMap<A::Key, A::Value> {
        let mut totals: BTreeMap<A::Key, A::Value> = BTreeMap::new();
        for state in self.partitions.values() {
            for (key, entry) in &state.rows {
                totals.entry(key.clone()).or_default().merge(&entry.value);
            }
        }
        totals.retain(|_, v| !v.is_empty());
        totals
    }
}

#[cfg(test)]
mod tests {
    use rust_decimal::Decimal;

    use super::*;
    use crate::aggregate::{Products, SalesTotals};
    use crate::cdc::{Change, Op, Product};

    fn created(id: i64) -> TableChange {
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

    #[test]
    fn a_stamp_keeps_the_offset_and_the_flag_apart() {
        for offset in [0, 1, 41, Offset::MAX] {
            let changed = Stamp::changed(offset);
            let written = Stamp::written(offset);
            assert_eq!((changed.offset(), changed.is_changed()), (offset, true));
            assert_eq!((written.offset(), written.is_changed()), (offset, false));
        }
        assert_eq!(std::mem::size_of::<Entry<SalesTotals>>(), 40);
    }

    #[test]
    fn a_forgetting_aggregate_gives_back_the_room_a_burst_took() {
        let mut state = AggregateState::<Products>::default();
        for id in 0..20_000 {
            state.apply(0, id, &created(id));
        }
        assert!(state.partitions[&0].rows.capacity() >= 20_000);

        // Flushed while one more row arrived: that row stays, the room goes.
        let rows = state.dirty_rows();
        state.apply(0, 20_000, &created(20_000));
        state.mark_flushed(&rows);

        assert_eq!(state.len(), 1);
        let capacity = state.partitions[&0].rows.capacity();
        assert!(capacity <= SMALL_MAP, "capacity {capacity} after the flush");
    }
}
