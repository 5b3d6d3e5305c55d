//! Keyed aggregate state with two guards against counting an event twice:
//! per (key, partition), the Kafka offset of the last event applied (a
//! replay of the partition after a restart or a rewind), and per partition,
//! the source position reached (Debezium sending events again at new
//! offsets, see [`SourceMark`]).

use std::cmp::Ordering;
use std::collections::hash_map::Entry as Slot;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::evicted::Evicted;
use super::{Aggregate, Measure, Offset, Partition};
use crate::cdc::{Minute, Origin, Position, SnapshotId, TableChange};

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
    /// How far into the source the partition's rows reached when this row
    /// was written: stored with every row, so it is in the same INSERT as
    /// the rows it covers.
    pub mark: SourceMark,
}

/// How far into the source's log a partition's events have been applied.
///
/// Debezium delivers whole transactions in commit order, so a partition's
/// streamed changes come in non-decreasing [`Position`] order; a position
/// repeats only for the rows of one WAL record (a COPY page), which have
/// distinct primary keys. So a change was already applied exactly when its
/// position is below `position`, or equal to it with its row among `rows`
/// (ARCHITECTURE.md, "Exactly once from Postgres").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceMark {
    /// The snapshot the rows start from (zero: none seen yet).
    pub snapshot: SnapshotId,
    /// The offset of that snapshot's first row in the partition: events
    /// before it belong to what the snapshot replaced.
    pub snapshot_offset: Offset,
    /// The position of the last streamed change applied (zero: none since
    /// the snapshot).
    pub position: Position,
    /// The primary keys of the source rows applied at exactly `position`.
    pub rows: Arc<[i64]>,
}

/// What is stored of one partition as a whole, written after each flush's
/// rows: the offset their flush covered (every event up to it has its effect
/// in the stored rows) and how far into the source they reach.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionMark {
    pub partition: Partition,
    pub offset: Offset,
    pub mark: SourceMark,
    /// For an aggregate keyed by minute, the newest minute of any key
    /// stored from the partition: a key past it was never stored, so it is
    /// not read back. None: unknown, any key may be stored.
    pub newest_minute: Option<Minute>,
}

impl PartitionMark {
    /// No change streamed after the snapshot yet: a snapshot taken again
    /// would replace every row of the partition, so they are all held.
    pub fn in_snapshot(&self) -> bool {
        self.mark.position == Position::default()
    }
}

/// An event the state cannot place in its partition's history. Counting it
/// could be wrong either way, so it stops the pipeline (see the README,
/// "The source started over").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{aggregate}: partition {partition} offset {offset}: {why}")]
pub struct Unplaceable {
    pub aggregate: &'static str,
    pub partition: Partition,
    pub offset: Offset,
    pub why: String,
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
    /// The keys of the rows changed since they were last written, so that a
    /// flush costs what changed, not what is held.
    dirty: Vec<K>,
    /// Which keys earlier owners of the partition may have stored: those
    /// not held are read back before an event touches them.
    earlier: Earlier,
    /// The keys this process evicted: stored, and no longer held.
    evicted: Evicted,
    /// The newest minute of any key the partition's rows hold (stored or
    /// not), if the aggregate is keyed by minute and it is known.
    newest_minute: Option<Minute>,
    /// The highest offset handed to this state (applied, skipped, or without
    /// effect): what a flush makes safe to commit. None until an event came.
    watermark: Option<Offset>,
    /// The highest offset among the rows loaded from the sink: events up to
    /// it were handled by an earlier owner, and are a replay.
    loaded_to: Option<Offset>,
    snapshot: SnapshotId,
    snapshot_offset: Offset,
    position: Position,
    /// Kept small: more than one only inside a COPY page.
    rows_at_position: Vec<i64>,
}

impl<K, V> Default for PartitionState<K, V> {
    fn default() -> Self {
        PartitionState {
            rows: HashMap::default(),
            dirty: Vec::new(),
            earlier: Earlier::Nothing,
            evicted: Evicted::default(),
            newest_minute: None,
            watermark: None,
            loaded_to: None,
            snapshot: SnapshotId::default(),
            snapshot_offset: 0,
            position: Position::default(),
            rows_at_position: Vec::new(),
        }
    }
}

/// What earlier owners of a partition may have stored, besides what this
/// process holds or evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Earlier {
    /// Nothing, or all of it was loaded.
    Nothing,
    /// Keys up to this minute; a key keyed by a later one was never stored.
    UpTo(Minute),
    /// Any key.
    Anything,
}

/// What the source guard makes of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placed {
    /// Not applied before as far as the source tells: the offset guard has
    /// the last word. `replaced_snapshot`: it begins a snapshot taken again.
    New { replaced_snapshot: bool },
    /// Applied before; Debezium sent it again at a new offset.
    SentAgain,
    /// Applied before, at this very offset: a replay of the partition.
    Replayed,
}

impl<K: Clone, V: Default> PartitionState<K, V> {
    /// Places the change at `offset` in the partition's history and moves
    /// the mark past it; an error says why it cannot be placed. `latest` is
    /// the newest snapshot any partition of the table has seen.
    fn place(
        &mut self,
        offset: Offset,
        origin: Origin,
        change: &TableChange,
        latest: SnapshotId,
        position_guard: bool,
        rebuild: bool,
    ) -> Result<Placed, String> {
        let new = Placed::New {
            replaced_snapshot: false,
        };
        // At or below the highest offset loaded, the earlier owner of the
        // partition handled the event. If it came after the snapshot the
        // rows start from, the loaded mark must cover its place, unless the
        // log under the offsets is another one. Before that snapshot, it
        // belongs to what the snapshot replaced: the offset guard skips it.
        let replay = self.loaded_to.is_some_and(|to| offset <= to);
        if replay && self.has_mark() && offset < self.snapshot_offset {
            // Even for a key the loaded rows lack: after a rebuild, the rows
            // hold only what the newest snapshot has.
            return Ok(Placed::Replayed);
        }
        let checked_replay = replay && self.has_mark();
        match origin {
            Origin::Stream(_) if replay && !checked_replay => Ok(new),
            Origin::Stream(position) => {
                let row = change.row_id();
                let seen = self.seen(position, row);
                if position_guard && checked_replay && !seen {
                    return Err(format!(
                        "the offset was counted before, but its event (position {position}, row \
                         {row}) is past what the partition's rows hold ({}): the topic started over",
                        self.position
                    ));
                }
                if position_guard && seen {
                    return Ok(if replay {
                        Placed::Replayed
                    } else {
                        Placed::SentAgain
                    });
                }
                // The snapshot started over and sent this partition no rows:
                // the table had none of its keys by then. Only a change
                // written after that snapshot tells so: an older one may
                // precede its rows in this partition, read before them.
                let replaced_snapshot = self.position == Position::default()
                    && self.snapshot < latest
                    && position.lsn > latest.lsn
                    && self.start_snapshot(latest, offset, rebuild);
                self.advance(position, row);
                Ok(Placed::New { replaced_snapshot })
            }
            Origin::Snapshot(snapshot) if replay => {
                if checked_replay && snapshot != self.snapshot {
                    return Err(format!(
                        "the offset was counted before, but its event is a row of {snapshot}, \
                         where the rows start from {}: the topic started over",
                        self.snapshot
                    ));
                }
                Ok(new)
            }
            // A rebuild counts from the newest snapshot: what came before it
            // is replaced, whatever was lost or repeated there.
            Origin::Snapshot(snapshot) if rebuild && snapshot > self.snapshot => Ok(Placed::New {
                replaced_snapshot: self.start_snapshot(snapshot, offset, rebuild),
            }),
            // After streamed changes, a snapshot row means the connector lost
            // its place (its slot or offsets were recreated, or a snapshot was
            // signalled): changes between the two may be lost or come again,
            // which no guard can settle.
            Origin::Snapshot(snapshot) if self.position != Position::default() => Err(format!(
                "a row of {snapshot} after streamed changes up to position {}: a new snapshot \
                 after streaming began; rebuild the aggregates",
                self.position
            )),
            Origin::Snapshot(snapshot) => match snapshot.cmp(&self.snapshot) {
                // A snapshot that started over (the engine stopped during it):
                // its rows replace those of the unfinished one.
                Ordering::Greater => Ok(Placed::New {
                    replaced_snapshot: self.start_snapshot(snapshot, offset, rebuild),
                }),
                Ordering::Equal => Ok(new),
                Ordering::Less => Err(format!(
                    "a row of {snapshot}, older than {} the partition's rows start from: the \
                     source's log started over",
                    self.snapshot
                )),
            },
        }
    }

    /// Whether the streamed change of source row `row` at `position` was
    /// applied already.
    fn seen(&self, position: Position, row: i64) -> bool {
        match position.cmp(&self.position) {
            Ordering::Less => true,
            Ordering::Equal => self.rows_at_position.contains(&row),
            Ordering::Greater => false,
        }
    }

    fn advance(&mut self, position: Position, row: i64) {
        if position > self.position {
            self.position = position;
            self.rows_at_position.clear();
        }
        if position == self.position && !self.rows_at_position.contains(&row) {
            self.rows_at_position.push(row);
        }
    }

    /// Whether the rows came with a mark: rows written before marks existed
    /// (or never) say nothing about positions.
    fn has_mark(&self) -> bool {
        self.snapshot != SnapshotId::default() || self.position != Position::default()
    }

    fn mark(&self) -> SourceMark {
        SourceMark {
            snapshot: self.snapshot,
            snapshot_offset: self.snapshot_offset,
            position: self.position,
            rows: self.rows_at_position.as_slice().into(),
        }
    }

    /// A new snapshot replaces everything the partition's rows hold: they
    /// start again from zero just before `offset`, the snapshot's first row.
    /// A rebuild, which has written nothing yet, drops them instead.
    /// Returns whether it replaced an earlier snapshot.
    fn start_snapshot(&mut self, snapshot: SnapshotId, offset: Offset, rebuild: bool) -> bool {
        let replaced = self.snapshot != SnapshotId::default();
        // Held whole until the first streamed change (see `evict`).
        debug_assert_eq!(
            self.earlier,
            Earlier::Nothing,
            "a partition in its snapshot is held whole"
        );
        if rebuild {
            self.rows.clear();
            self.dirty.clear();
        }
        for (key, entry) in self.rows.iter_mut() {
            if !entry.stamp.is_changed() {
                self.dirty.push(key.clone());
            }
            entry.value = V::default();
            entry.stamp = Stamp::changed(entry.stamp.offset().max(offset - 1));
        }
        self.snapshot = snapshot;
        self.snapshot_offset = offset;
        self.position = Position::default();
        self.rows_at_position.clear();
        replaced
    }
}

/// The running state of one aggregate over the partitions this process owns.
pub struct AggregateState<A: Aggregate> {
    partitions: HashMap<Partition, PartitionState<A::Key, A::Value>, Hasher>,
    /// The newest snapshot any partition has seen: a partition that goes on
    /// to stream without having seen it had no rows in it.
    latest_snapshot: SnapshotId,
    #[cfg(feature = "faults")]
    guards: Guards,
    /// Counting again from the newest snapshot in the log (`rebuild`).
    rebuild: bool,
}

impl<A: Aggregate> Default for AggregateState<A> {
    fn default() -> Self {
        AggregateState {
            partitions: HashMap::default(),
            latest_snapshot: SnapshotId::default(),
            #[cfg(feature = "faults")]
            guards: Guards::ON,
            rebuild: false,
        }
    }
}

/// The two replay guards: by Kafka offset, and by position in the source.
#[derive(Debug, Clone, Copy)]
struct Guards {
    offset: bool,
    position: bool,
}

impl Guards {
    const ON: Guards = Guards {
        offset: true,
        position: true,
    };
}

/// What applying one event did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub keys_updated: u32,
    /// Keys whose stored offset already covers the event (a replay).
    pub keys_skipped: u32,
    /// The event is one the source sent again, at a new offset.
    pub redelivered: bool,
    /// The event is the first of a snapshot taken again, which replaced
    /// the partition's rows of the earlier one.
    pub new_snapshot: bool,
}

impl<A: Aggregate> AggregateState<A> {
    /// Fault-test builds only (`ETL_FAULT_NO_OFFSET_GUARD`): applies
    /// replayed events again, which the fault tests must catch as double
    /// counting.
    #[cfg(feature = "faults")]
    pub fn without_offset_guard(mut self) -> Self {
        self.guards.offset = false;
        self
    }

    /// Fault-test builds only (`ETL_FAULT_NO_POSITION_GUARD`): applies
    /// events the source sent again, which the upstream tests must catch as
    /// double counting.
    #[cfg(feature = "faults")]
    pub fn without_position_guard(mut self) -> Self {
        self.guards.position = false;
        self
    }

    #[cfg(feature = "faults")]
    fn guards(&self) -> Guards {
        self.guards
    }

    /// Without fault injection compiled in, both guards always hold.
    #[cfg(not(feature = "faults"))]
    fn guards(&self) -> Guards {
        Guards::ON
    }

    /// A state that counts a whole log from its start, as a rebuild does:
    /// every snapshot replaces what came before it in its partition, also
    /// after streamed changes, and [`AggregateState::rebuilt`] then checks
    /// that every partition reached the newest one. A dimension is guarded
    /// like a sum here, so that a newer snapshot drops its older rows too.
    pub fn rebuilding() -> Self {
        AggregateState {
            rebuild: true,
            ..Self::default()
        }
    }

    /// The end of a rebuild: an error names a partition that holds rows but
    /// none of the newest snapshot: its table's, or one at LSN `newest_lsn`,
    /// the newest of the connector's other tables. The table had none of
    /// that partition's keys then, but which of its later changes came after
    /// the snapshot cannot be told apart, so counting it could be wrong.
    pub fn rebuilt(&self, newest_lsn: u64) -> Result<(), Unplaceable> {
        let latest = self.latest_snapshot;
        for (partition, state) in &self.partitions {
            let behind = state.snapshot < latest || state.snapshot.lsn < newest_lsn;
            if behind && !state.rows.is_empty() {
                return Err(Unplaceable {
                    aggregate: A::NAME,
                    partition: *partition,
                    offset: state.watermark.unwrap_or_default(),
                    why: format!(
                        "its rows start from {}, not from the newest snapshot ({latest}), \
                         which sent the partition no rows: take a new snapshot with rows in \
                         every partition, or rebuild from a log that starts with it",
                        state.snapshot
                    ),
                });
            }
        }
        Ok(())
    }

    /// The newest snapshot any partition has seen.
    pub fn latest_snapshot(&self) -> SnapshotId {
        self.latest_snapshot
    }

    /// Applies the change at `offset` of `partition`, which comes from
    /// `origin` in the source, to every key it touches whose stored offset
    /// is below `offset`, unless the source sent it before.
    ///
    /// A dimension (`!A::KEEPS_STORED_ROWS`) needs neither source guard:
    /// its newest row wins, and a repeat comes with every later change after
    /// it, in order.
    pub fn apply(
        &mut self,
        partition: Partition,
        offset: Offset,
        origin: Origin,
        change: &TableChange,
    ) -> Result<Applied, Unplaceable> {
        let Guards {
            offset: offset_guard,
            position: position_guard,
        } = self.guards();
        let latest_snapshot = self.latest_snapshot;
        let rebuild = self.rebuild;
        let state = self.observed(partition, offset);
        let mut applied = Applied::default();
        if A::KEEPS_STORED_ROWS || rebuild {
            let placed = state
                .place(
                    offset,
                    origin,
                    change,
                    latest_snapshot,
                    position_guard,
                    rebuild,
                )
                .map_err(|why| Unplaceable {
                    aggregate: A::NAME,
                    partition,
                    offset,
                    why,
                })?;
            match placed {
                Placed::New { replaced_snapshot } => applied.new_snapshot = replaced_snapshot,
                Placed::SentAgain => {
                    applied.redelivered = true;
                    return Ok(applied);
                }
                Placed::Replayed => {
                    applied.keys_skipped = A::updates(change).len() as u32;
                    return Ok(applied);
                }
            }
        }
        for (key, update) in A::updates(change) {
            state.newest_minute = state.newest_minute.max(A::key_minute(&key));
            match state.rows.entry(key) {
                Slot::Occupied(mut slot) => {
                    let last = slot.get().stamp.offset();
                    if offset <= last && offset_guard {
                        applied.keys_skipped += 1;
                        continue;
                    }
                    if !slot.get().stamp.is_changed() {
                        state.dirty.push(slot.key().clone());
                    }
                    let entry = slot.get_mut();
                    entry.value.apply(&update);
                    entry.stamp = Stamp::changed(last.max(offset));
                }
                Slot::Vacant(slot) => {
                    state.dirty.push(slot.key().clone());
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
        if let Origin::Snapshot(snapshot) = origin {
            self.latest_snapshot = self.latest_snapshot.max(snapshot);
        }
        Ok(applied)
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
        self.dirty_rows_where(|_| true)
    }

    /// The rows of `partitions` changed since the last flush.
    pub fn dirty_rows_of(&self, partitions: &[Partition]) -> Vec<StoredRow<A::Key, A::Value>> {
        self.dirty_rows_where(|p| partitions.contains(&p))
    }

    fn dirty_rows_where(
        &self,
        wanted: impl Fn(Partition) -> bool,
    ) -> Vec<StoredRow<A::Key, A::Value>> {
        self.partitions
            .iter()
            .filter(|(partition, _)| wanted(**partition))
            .flat_map(|(partition, state)| {
                let mark = state.mark();
                state.dirty.iter().filter_map(move |key| {
                    let e = state.rows.get(key)?;
                    e.stamp.is_changed().then(|| StoredRow {
                        key: key.clone(),
                        partition: *partition,
                        value: e.value.clone(),
                        offset: e.stamp.offset(),
                        mark: mark.clone(),
                    })
                })
            })
            .collect()
    }

    /// What a flush that covers `partition` up to its watermark stores of
    /// it as a whole (None: no event of it came yet).
    pub fn partition_mark(&self, partition: Partition) -> Option<PartitionMark> {
        let state = self.partitions.get(&partition)?;
        Some(PartitionMark {
            partition,
            offset: state.watermark?,
            mark: state.mark(),
            newest_minute: match state.earlier {
                Earlier::Anything => None,
                Earlier::Nothing | Earlier::UpTo(_) => state.newest_minute,
            },
        })
    }

    /// The marks of every partition an event came from.
    pub fn partition_marks(&self) -> Vec<PartitionMark> {
        let mut partitions: Vec<Partition> = self.partitions.keys().copied().collect();
        partitions.sort_unstable();
        partitions
            .into_iter()
            .filter_map(|p| self.partition_mark(p))
            .collect()
    }

    /// How far into the source `partition`'s rows reach.
    pub fn mark(&self, partition: Partition) -> SourceMark {
        self.partitions
            .get(&partition)
            .map(PartitionState::mark)
            .unwrap_or_default()
    }

    /// Marks rows as written, unless an event changed them since (their
    /// offset moved, or, with the offset guard off, only their value). An
    /// aggregate that need not keep written rows (`A::KEEPS_STORED_ROWS`)
    /// forgets them instead.
    pub fn mark_flushed(&mut self, rows: &[StoredRow<A::Key, A::Value>]) {
        let mut touched: Vec<Partition> = Vec::new();
        for row in rows {
            if !touched.contains(&row.partition) {
                touched.push(row.partition);
            }
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
        for partition in touched {
            if let Some(PartitionState { rows, dirty, .. }) = self.partitions.get_mut(&partition) {
                dirty.retain(|key| rows.get(key).is_some_and(|e| e.stamp.is_changed()));
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
    /// partition is assigned: the offset guard starts from their offsets,
    /// and the source guard from the highest of their marks. Marks only grow
    /// from flush to flush, so that is the last flush's, whichever version of
    /// a row the sink kept.
    pub fn load(&mut self, rows: impl IntoIterator<Item = StoredRow<A::Key, A::Value>>) {
        for row in rows {
            self.latest_snapshot = self.latest_snapshot.max(row.mark.snapshot);
            let state = self.partitions.entry(row.partition).or_default();
            state.loaded_to = state.loaded_to.max(Some(row.offset));
            state.newest_minute = state.newest_minute.max(A::key_minute(&row.key));
            let mark = &row.mark;
            match (mark.snapshot, mark.position).cmp(&(state.snapshot, state.position)) {
                Ordering::Greater => {
                    state.snapshot = mark.snapshot;
                    state.snapshot_offset = mark.snapshot_offset;
                    state.position = mark.position;
                    state.rows_at_position = mark.rows.to_vec();
                }
                Ordering::Equal => {
                    for id in mark.rows.iter() {
                        if !state.rows_at_position.contains(id) {
                            state.rows_at_position.push(*id);
                        }
                    }
                }
                Ordering::Less => {}
            }
            state.rows.insert(
                row.key,
                Entry {
                    value: row.value,
                    stamp: Stamp::written(row.offset),
                },
            );
        }
    }

    /// Begins holding `partition` from what is stored of it as a whole:
    /// events up to `stored.offset` were handled by an earlier owner (a
    /// replay), and the source guard starts from its mark. `partial`: its
    /// rows are not loaded with it, but read back as events need them (for
    /// an aggregate keyed by minute, only keys up to the newest minute
    /// stored).
    pub fn start(&mut self, stored: &PartitionMark, partial: bool) {
        self.latest_snapshot = self.latest_snapshot.max(stored.mark.snapshot);
        let state = self.partitions.entry(stored.partition).or_default();
        state.loaded_to = state.loaded_to.max(Some(stored.offset));
        let mark = &stored.mark;
        state.snapshot = mark.snapshot;
        state.snapshot_offset = mark.snapshot_offset;
        state.position = mark.position;
        state.rows_at_position = mark.rows.to_vec();
        state.newest_minute = state.newest_minute.max(stored.newest_minute);
        state.earlier = match stored.newest_minute {
            _ if !partial => Earlier::Nothing,
            Some(newest) => Earlier::UpTo(newest),
            None => Earlier::Anything,
        };
    }

    /// The keys `changes` (offset, origin, change) touch in `partition` that
    /// may be stored but are not held: they are read back
    /// ([`AggregateState::load_rows`]) before the changes are applied. Each
    /// key once. A replayed change the loaded mark covers is skipped whole,
    /// so its keys are not needed.
    pub fn missing<'c>(
        &self,
        partition: Partition,
        changes: impl IntoIterator<Item = (Offset, Origin, &'c TableChange)>,
    ) -> Vec<A::Key> {
        let Some(state) = self.partitions.get(&partition) else {
            return Vec::new();
        };
        if !A::KEEPS_STORED_ROWS || (state.earlier == Earlier::Nothing && state.evicted.is_empty())
        {
            return Vec::new();
        }
        let earlier_stored = |key: &A::Key| match state.earlier {
            Earlier::Nothing => false,
            Earlier::UpTo(newest) => A::key_minute(key).is_none_or(|minute| minute <= newest),
            Earlier::Anything => true,
        };
        let covered = |offset: Offset, origin: Origin| {
            self.guards().position
                && matches!(origin, Origin::Stream(_))
                && state.has_mark()
                && state.loaded_to.is_some_and(|to| offset <= to)
        };
        let mut missing: HashSet<A::Key, Hasher> = HashSet::default();
        for (offset, origin, change) in changes {
            if covered(offset, origin) {
                continue;
            }
            for (key, _) in A::updates(change) {
                let stored = earlier_stored(&key) || state.evicted.may_contain(&key);
                if stored && !state.rows.contains_key(&key) {
                    missing.insert(key);
                }
            }
        }
        missing.into_iter().collect()
    }

    /// Takes rows of `partition` read back on demand, as written. A key
    /// held already keeps what is held (it is as new or newer). The
    /// partition's mark is not touched: it comes from [`AggregateState::start`].
    pub fn load_rows(
        &mut self,
        partition: Partition,
        rows: impl IntoIterator<Item = StoredRow<A::Key, A::Value>>,
    ) {
        let state = self.partitions.entry(partition).or_default();
        for row in rows {
            debug_assert_eq!(row.partition, partition);
            state.newest_minute = state.newest_minute.max(A::key_minute(&row.key));
            if let Slot::Vacant(slot) = state.rows.entry(row.key) {
                slot.insert(Entry {
                    value: row.value,
                    stamp: Stamp::written(row.offset),
                });
            }
        }
    }

    /// Keeps at most `limit` rows held, give or take the rows not yet
    /// written (which cannot go): once over it, drops written rows down to
    /// three quarters of it, so that the pass over the rows is paid once per
    /// quarter of the limit, not at every flush. A partition gives up its
    /// rows in proportion to how many it holds, those least recently touched
    /// first: a row's offset is where its last event was in the partition.
    /// A partition still in its snapshot (see [`PartitionMark::in_snapshot`])
    /// keeps its rows. Returns how many rows went.
    pub fn evict(&mut self, limit: usize) -> usize {
        let held = self.len();
        if !A::KEEPS_STORED_ROWS || self.rebuild || held <= limit {
            return 0;
        }
        let excess = held - limit / 4 * 3;
        let streaming = |s: &PartitionState<A::Key, A::Value>| s.position != Position::default();
        let evictable: usize = self
            .partitions
            .values()
            .filter(|s| streaming(s))
            .map(|s| s.rows.len() - s.dirty.len())
            .sum();
        if evictable == 0 {
            return 0;
        }
        let mut evicted = 0;
        for state in self.partitions.values_mut().filter(|s| streaming(s)) {
            let mut offsets: Vec<Offset> = state
                .rows
                .values()
                .filter(|e| !e.stamp.is_changed())
                .map(|e| e.stamp.offset())
                .collect();
            let quota = (excess * offsets.len())
                .div_ceil(evictable)
                .min(offsets.len());
            if quota == 0 {
                continue;
            }
            let cutoff = *offsets.select_nth_unstable(quota - 1).1;
            let below = offsets.iter().filter(|&&o| o < cutoff).count();
            // Of the rows last touched at the cutoff itself, only as many as
            // the quota leaves room for.
            let mut at_cutoff = quota - below;
            let PartitionState {
                rows,
                evicted: gone,
                ..
            } = state;
            rows.retain(|key, e| {
                let (offset, written) = (e.stamp.offset(), !e.stamp.is_changed());
                let evict = written
                    && (offset < cutoff
                        || (offset == cutoff && at_cutoff > 0 && {
                            at_cutoff -= 1;
                            true
                        }));
                if evict {
                    gone.insert(key);
                }
                !evict
            });
            evicted += quota;
            if state.rows.capacity() > 2 * state.rows.len() + SMALL_MAP {
                state.rows.shrink_to_fit();
            }
        }
        evicted
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
    use super::*;
    use crate::aggregate::fixtures::{created, snapshot, sold, streamed, streamed_to};
    use crate::aggregate::{OrdersByMinute, ProductSales, Products, SalesTotals};
    use rust_decimal::Decimal;

    /// Partition 0 as an earlier owner left it after streaming, up to
    /// offset 0: its rows are read back as events need them.
    fn streaming() -> AggregateState<ProductSales> {
        let mut state = AggregateState::<ProductSales>::default();
        state.start(&streamed_to(0, 0), true);
        state
    }

    fn held(state: &AggregateState<ProductSales>) -> Vec<i64> {
        let mut keys: Vec<i64> = state.partitions[&0].rows.keys().copied().collect();
        keys.sort_unstable();
        keys
    }

    /// An order placed in minute `minute` (seconds since the epoch).
    fn placed(id: i64, minute: i64) -> TableChange {
        use chrono::TimeZone;
        TableChange::Order(crate::cdc::Change {
            op: crate::cdc::Op::Create,
            before: None,
            after: Some(crate::cdc::Order {
                id,
                status: "paid".into(),
                total_amount: Decimal::new(1000, 2),
                created_at: chrono::Utc.timestamp_opt(minute, 0).unwrap(),
            }),
        })
    }

    #[test]
    fn keys_newer_than_every_stored_minute_are_not_read_back_until_evicted() {
        let mut state = AggregateState::<OrdersByMinute>::default();
        let stored = PartitionMark {
            newest_minute: Some(Minute(600)),
            ..streamed_to(0, 0)
        };
        state.start(&stored, true);
        let key = |minute| (Minute(minute), "paid".to_string());
        let (old, current) = (placed(1, 540), placed(2, 660));
        let touched = [(1, streamed(1), &old), (2, streamed(2), &current)];
        // 09:00 may be stored; 11:00 is past the newest stored minute.
        assert_eq!(state.missing(0, touched), [key(540)]);
        state.load_rows(0, []);
        state.apply(0, 1, streamed(1), &old).unwrap();
        state.apply(0, 2, streamed(2), &current).unwrap();
        // The mark takes the newest minute the rows now hold.
        assert_eq!(
            state.partition_mark(0).unwrap().newest_minute,
            Some(Minute(660))
        );

        // Written and evicted, the current minute's key is stored: read back.
        let rows = state.dirty_rows();
        state.mark_flushed(&rows);
        assert_eq!(state.evict(1), 2);
        let again = placed(3, 660);
        assert_eq!(state.missing(0, [(3, streamed(3), &again)]), [key(660)]);

        // A mark that does not know its newest minute: every key is read.
        let mut unknown = AggregateState::<OrdersByMinute>::default();
        unknown.start(&streamed_to(0, 0), true);
        assert_eq!(unknown.missing(0, [(2, streamed(2), &current)]), [key(660)]);
        assert_eq!(unknown.partition_mark(0), None);
        unknown.load_rows(0, []);
        unknown.apply(0, 2, streamed(2), &current).unwrap();
        assert_eq!(unknown.partition_mark(0).unwrap().newest_minute, None);
    }

    #[test]
    fn eviction_drops_the_written_rows_least_recently_touched() {
        let mut state = streaming();
        for product in 1..=100 {
            let change = sold(product);
            assert_eq!(
                state.missing(0, [(product, streamed(product), &change)]),
                [product]
            );
            state.load_rows(0, []);
            state
                .apply(0, product, streamed(product), &sold(product))
                .unwrap();
        }
        let rows = state.dirty_rows();
        assert_eq!(rows.len(), 100);
        state.mark_flushed(&rows);
        assert!(state.dirty_rows().is_empty());
        // Product 5 is touched again: the most recent, and not yet written.
        state.apply(0, 101, streamed(101), &sold(5)).unwrap();
        assert_eq!(state.dirty_rows().len(), 1);

        assert_eq!(state.evict(100), 0, "at the limit, nothing goes");
        // Over 40: down to 30, the 70 written rows touched longest ago go.
        assert_eq!(state.evict(40), 70);
        let mut kept: Vec<i64> = (72..=100).collect();
        kept.insert(0, 5);
        assert_eq!(held(&state), kept);
        assert_eq!(state.dirty_rows()[0].key, 5);

        // An evicted key is missing again; read back, it is guarded by its
        // stored offset and goes on from its stored value.
        let (three, eighty) = (sold(3), sold(80));
        let touched = [(103, streamed(103), &three), (104, streamed(104), &eighty)];
        assert_eq!(state.missing(0, touched), [3]);
        let stored = StoredRow {
            key: 3,
            partition: 0,
            value: SalesTotals {
                units: 1,
                revenue: Decimal::new(250, 2),
                lines: 1,
            },
            offset: 3,
            mark: SourceMark::default(),
        };
        state.load_rows(0, [stored]);
        let replayed = state.apply(0, 3, streamed(3), &sold(3));
        // The source guard knows this one as sent before (its position).
        assert!(replayed.unwrap().redelivered);
        state.apply(0, 102, streamed(102), &sold(3)).unwrap();
        assert_eq!(state.totals()[&3].units, 2);
    }

    #[test]
    fn a_partition_that_started_empty_reads_back_only_what_it_evicted() {
        let mut state = AggregateState::<ProductSales>::default();
        for product in 1..=100 {
            state
                .apply(0, product, streamed(product), &sold(product))
                .unwrap();
        }
        let rows = state.dirty_rows();
        state.mark_flushed(&rows);
        assert_eq!(state.evict(40), 70);
        // Products 1 to 70 went; 500 was never seen, so it is stored nowhere.
        let (gone, new) = (sold(3), sold(500));
        let touched = [(101, streamed(101), &gone), (102, streamed(102), &new)];
        assert_eq!(state.missing(0, touched), [3]);
    }

    #[test]
    fn a_partition_in_its_snapshot_is_held_whole() {
        let mut state = AggregateState::<ProductSales>::default();
        for product in 1..=100 {
            let order_line = sold(product);
            state.apply(0, product, snapshot(), &order_line).unwrap();
        }
        let rows = state.dirty_rows();
        state.mark_flushed(&rows);
        // A snapshot taken again would replace every row: none may go.
        assert_eq!(state.evict(10), 0);
        assert_eq!(state.len(), 100);
        let other = sold(500);
        assert!(state.missing(0, [(101, snapshot(), &other)]).is_empty());
    }

    #[test]
    fn a_row_changed_during_its_flush_stays_dirty() {
        let mut state = streaming();
        state.load_rows(0, []);
        state.apply(0, 1, streamed(1), &sold(1)).unwrap();
        state.apply(0, 2, streamed(2), &sold(2)).unwrap();
        let in_flight = state.dirty_rows();
        state.apply(0, 3, streamed(3), &sold(2)).unwrap();
        state.mark_flushed(&in_flight);
        let dirty = state.dirty_rows();
        assert_eq!(dirty.len(), 1);
        assert_eq!(
            (dirty[0].key, dirty[0].offset, dirty[0].value.units),
            (2, 3, 2)
        );
        state.mark_flushed(&dirty);
        assert!(state.dirty_rows().is_empty());
        assert_eq!(
            state.partition_mark(0).map(|m| (m.offset, m.mark.position)),
            Some((
                3,
                Position {
                    commit: 13,
                    lsn: 13
                }
            ))
        );
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
            state.apply(0, id, snapshot(), &created(id)).unwrap();
        }
        assert!(state.partitions[&0].rows.capacity() >= 20_000);

        // Flushed while one more row arrived: that row stays, the room goes.
        let rows = state.dirty_rows();
        state
            .apply(0, 20_000, snapshot(), &created(20_000))
            .unwrap();
        state.mark_flushed(&rows);

        assert_eq!(state.len(), 1);
        let capacity = state.partitions[&0].rows.capacity();
        assert!(capacity <= SMALL_MAP, "capacity {capacity} after the flush");
    }
}
