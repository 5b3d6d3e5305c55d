//! An aggregate store in memory, for the runtime's in-process tests: the
//! same semantics as the ClickHouse tables, plus switches a test holds to
//! make writes or loads wait.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::store::{Rows, Store};
use super::{SinkError, SinkTable};
use crate::aggregate::{Aggregate, PartitionMark, StoredRow};

/// Cheap to clone: every clone is the same store, writing through the
/// same gate. [`MemoryStore::another_writer`] shares the tables with a gate
/// of its own: two processors on one store, each held on its own.
#[derive(Clone, Default)]
pub struct MemoryStore {
    /// Per aggregate, a `Table<A>`.
    tables: Arc<Mutex<HashMap<&'static str, Box<dyn Any + Send>>>>,
    gate: Arc<Gate>,
}

#[derive(Default)]
struct Gate {
    writes: Switch,
    loads: Switch,
    /// Writes stored through the gate.
    stored: AtomicUsize,
    /// Reads of rows by key through the gate.
    key_reads: AtomicUsize,
}

/// What a test holds to make one kind of call wait.
struct Switch {
    /// False while a test holds the calls.
    open: watch::Sender<bool>,
    /// Calls waiting for it to open.
    waiting: AtomicUsize,
}

impl Default for Switch {
    fn default() -> Self {
        Switch {
            open: watch::Sender::new(true),
            waiting: AtomicUsize::new(0),
        }
    }
}

impl Switch {
    fn hold(&self) -> Held {
        self.open.send_replace(false);
        Held(self.open.clone())
    }

    fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Returns once the switch is open.
    async fn passed(&self) {
        let mut open = self.open.subscribe();
        if *open.borrow_and_update() {
            return;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        // The sender lives in the switch, as long as the caller.
        let _ = open.wait_for(|open| *open).await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

type Row<A> = StoredRow<<A as Aggregate>::Key, <A as Aggregate>::Value>;

/// One aggregate's rows as FINAL reads them: the highest offset of each
/// (key, partition), and its marks the same way.
struct Table<A: Aggregate> {
    rows: HashMap<(A::Key, i32), Row<A>>,
    /// The marks table's rows of this aggregate, by partition.
    marks: HashMap<i32, PartitionMark>,
}

impl<A: Aggregate> Default for Table<A> {
    fn default() -> Self {
        Table {
            rows: HashMap::new(),
            marks: HashMap::new(),
        }
    }
}

/// Writes (or loads) wait while this is held.
pub struct Held(watch::Sender<bool>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

impl MemoryStore {
    /// The same tables, written through a gate of its own.
    pub fn another_writer(&self) -> MemoryStore {
        MemoryStore {
            tables: self.tables.clone(),
            gate: Arc::default(),
        }
    }

    /// Makes every write through this gate wait until the returned guard
    /// is dropped.
    pub fn hold_writes(&self) -> Held {
        self.gate.writes.hold()
    }

    /// Writes waiting at this gate.
    pub fn writes_waiting(&self) -> usize {
        self.gate.writes.waiting()
    }

    /// Writes stored through this gate so far.
    pub fn writes(&self) -> usize {
        self.gate.stored.load(Ordering::SeqCst)
    }

    /// Reads of rows by key through this gate so far (one per batch that
    /// touched keys not held).
    pub fn key_reads(&self) -> usize {
        self.gate.key_reads.load(Ordering::SeqCst)
    }

    /// Makes every read of stored state (a partition's rows, its highest
    /// offsets) through this gate wait until the returned guard is dropped.
    pub fn hold_loads(&self) -> Held {
        self.gate.loads.hold()
    }

    /// Reads waiting at this gate.
    pub fn loads_waiting(&self) -> usize {
        self.gate.loads.waiting()
    }

    /// Every row of `A` that counts, in no particular order.
    pub fn rows<A: SinkTable>(&self) -> Rows<A> {
        let mut tables = self.tables();
        Self::table::<A>(&mut tables)
            .rows
            .values()
            .cloned()
            .collect()
    }

    fn tables(&self) -> MutexGuard<'_, HashMap<&'static str, Box<dyn Any + Send>>> {
        // A test that panicked while holding it has failed already.
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn table<'t, A: SinkTable>(
        tables: &'t mut HashMap<&'static str, Box<dyn Any + Send>>,
    ) -> &'t mut Table<A> {
        tables
            .entry(A::NAME)
            .or_insert_with(|| Box::new(Table::<A>::default()))
            .downcast_mut()
            .expect("one table type per aggregate name")
    }
}

impl Store for MemoryStore {
    async fn write<A: SinkTable>(
        &self,
        rows: &[StoredRow<A::Key, A::Value>],
        marks: &[PartitionMark],
    ) -> Result<(), SinkError> {
        // As ClickHouseSink does: nothing to insert is no insert.
        if rows.is_empty() && marks.is_empty() {
            return Ok(());
        }
        self.gate.writes.passed().await;
        // As ClickHouse does: a value its column cannot hold fails the insert.
        for row in rows {
            A::to_row(row)?;
        }
        let mut tables = self.tables();
        let table = Self::table::<A>(&mut tables);
        for row in rows {
            let key = (row.key.clone(), row.partition);
            // ReplacingMergeTree(source_offset): the highest offset wins,
            // the later insert on a tie.
            match table.rows.get(&key) {
                Some(stored) if stored.offset > row.offset => {}
                _ => {
                    table.rows.insert(key, row.clone());
                }
            }
        }
        for mark in marks {
            match table.marks.get(&mark.partition) {
                Some(stored) if stored.offset > mark.offset => {}
                _ => {
                    table.marks.insert(mark.partition, mark.clone());
                }
            }
        }
        self.gate.stored.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn load_marks<A: SinkTable>(
        &self,
        partitions: &[i32],
    ) -> Result<Vec<PartitionMark>, SinkError> {
        self.gate.loads.passed().await;
        let mut tables = self.tables();
        let table = Self::table::<A>(&mut tables);
        Ok(partitions
            .iter()
            .filter_map(|p| table.marks.get(p).cloned())
            .collect())
    }

    async fn load_partitions<A: SinkTable>(
        &self,
        partitions: &[i32],
    ) -> Result<Rows<A>, SinkError> {
        self.gate.loads.passed().await;
        let mut tables = self.tables();
        let table = Self::table::<A>(&mut tables);
        Ok(table
            .rows
            .values()
            .filter(|row| partitions.contains(&row.partition))
            .cloned()
            .collect())
    }

    async fn load_keys<A: SinkTable>(&self, keys: &[(i32, A::Key)]) -> Result<Rows<A>, SinkError> {
        self.gate.loads.passed().await;
        self.gate.key_reads.fetch_add(1, Ordering::SeqCst);
        let mut tables = self.tables();
        let table = Self::table::<A>(&mut tables);
        Ok(keys
            .iter()
            .filter_map(|(partition, key)| table.rows.get(&(key.clone(), *partition)).cloned())
            .collect())
    }
}
