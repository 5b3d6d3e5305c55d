//! Keyed aggregate state with a per-(key, partition) offset guard.

use std::collections::{BTreeMap, HashMap};

use super::{Aggregate, Measure, Offset, Partition};
use crate::cdc::TableChange;

#[derive(Debug, Clone)]
struct Entry<V> {
    value: V,
    /// Offset of the last event applied to this (key, partition).
    offset: Offset,
    /// Changed since the last flush.
    dirty: bool,
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

/// The running state of one aggregate over the partitions this process owns.
pub struct AggregateState<A: Aggregate> {
    entries: HashMap<(A::Key, Partition), Entry<A::Value>, Hasher>,
    /// Per partition, the highest offset handed to this state (applied,
    /// skipped, or without effect): what a flush makes safe to commit.
    watermarks: HashMap<Partition, Offset, Hasher>,
    offset_guard: bool,
}

impl<A: Aggregate> Default for AggregateState<A> {
    fn default() -> Self {
        AggregateState {
            entries: HashMap::default(),
            watermarks: HashMap::default(),
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
        self.observe(partition, offset);
        let mut applied = Applied::default();
        for (key, update) in A::updates(change) {
            let entry = self
                .entries
                .entry((key, partition))
                .or_insert_with(|| Entry {
                    value: A::Value::default(),
                    offset: -1,
                    dirty: false,
                });
            if offset <= entry.offset && self.offset_guard {
                applied.keys_skipped += 1;
                continue;
            }
            entry.value.apply(&update);
            entry.offset = entry.offset.max(offset);
            entry.dirty = true;
            applied.keys_updated += 1;
        }
        applied
    }

    /// Records that the event at `offset` was handed over, even if it had no
    /// effect here (a tombstone, say), so the commit can move past it.
    pub fn observe(&mut self, partition: Partition, offset: Offset) {
        let w = self.watermarks.entry(partition).or_insert(-1);
        *w = (*w).max(offset);
    }

    /// The highest offset of `partition` handed to this state.
    pub fn watermark(&self, partition: Partition) -> Option<Offset> {
        self.watermarks.get(&partition).copied()
    }

    pub fn watermarks(&self) -> impl Iterator<Item = (Partition, Offset)> + '_ {
        self.watermarks.iter().map(|(p, o)| (*p, *o))
    }

    /// The rows changed since the last flush.
    pub fn dirty_rows(&self) -> Vec<StoredRow<A::Key, A::Value>> {
        self.entries
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|((key, partition), e)| StoredRow {
                key: key.clone(),
                partition: *partition,
                value: e.value.clone(),
                offset: e.offset,
            })
            .collect()
    }

    /// Marks rows as written, unless an event changed them since (their
    /// offset moved, or, with the offset guard off, only their value).
    pub fn mark_flushed(&mut self, rows: &[StoredRow<A::Key, A::Value>]) {
        for row in rows {
            if let Some(e) = self.entries.get_mut(&(row.key.clone(), row.partition)) {
                if e.offset == row.offset && e.value == row.value {
                    e.dirty = false;
                }
            }
        }
    }

    /// Takes rows read back from the sink, e.g. after a restart or when a
    /// partition is assigned: the offset guard starts from their offsets.
    pub fn load(&mut self, rows: impl IntoIterator<Item = StoredRow<A::Key, A::Value>>) {
        for row in rows {
            self.entries.insert(
                (row.key, row.partition),
                Entry {
                    value: row.value,
                    offset: row.offset,
                    dirty: false,
                },
            );
        }
    }

    /// Forgets partitions this process no longer owns (or is about to
    /// reload), in one pass over the entries however many they are.
    pub fn release(&mut self, partitions: &[Partition]) {
        let mut gone = partitions.to_vec();
        gone.sort_unstable();
        self.entries
            .retain(|(_, p), _| gone.binary_search(p).is_err());
        for partition in partitions {
            self.watermarks.remove(partition);
        }
    }

    /// Each key's value summed over partitions, leaving out empty ones.
    pub fn totals(&self) -> BTreeMap<A::Key, A::Value> {
        let mut totals: BTreeMap<A::Key, A::Value> = BTreeMap::new();
        for ((key, _), entry) in &self.entries {
            totals.entry(key.clone()).or_default().merge(&entry.value);
        }
        totals.retain(|_, v| !v.is_empty());
        totals
    }
}
