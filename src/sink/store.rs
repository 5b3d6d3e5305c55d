//! What the runtime needs of the aggregate store: ClickHouse in
//! production ([`ClickHouseSink`]), memory in the runtime's in-process
//! tests ([`super::MemoryStore`]).

use std::future::Future;

use super::{ClickHouseSink, SinkError, SinkTable};
use crate::aggregate::{PartitionMark, StoredRow};

/// The rows one aggregate writes and reads back.
pub type Rows<A> = Vec<
    StoredRow<<A as crate::aggregate::Aggregate>::Key, <A as crate::aggregate::Aggregate>::Value>,
>;

/// An aggregate store with ClickHouse's semantics: a table per aggregate,
/// each row keyed by (aggregate key, source partition), and of the rows
/// of one key the one with the highest source offset is the one that
/// counts; and beside them each partition's [`PartitionMark`], of which the
/// highest offset counts.
pub trait Store: Clone + Send + Sync + Unpin + 'static {
    /// Inserts `rows` in one write (all of them, or none), then, once they
    /// are stored, `marks`: a mark never claims more than the rows hold.
    fn write<A: SinkTable>(
        &self,
        rows: &[StoredRow<A::Key, A::Value>],
        marks: &[PartitionMark],
    ) -> impl Future<Output = Result<(), SinkError>>;

    /// The mark of each of `partitions` (those never written are left out).
    fn load_marks<A: SinkTable>(
        &self,
        partitions: &[i32],
    ) -> impl Future<Output = Result<Vec<PartitionMark>, SinkError>>;

    /// The row that counts of every key of `partitions`.
    fn load_partitions<A: SinkTable>(
        &self,
        partitions: &[i32],
    ) -> impl Future<Output = Result<Rows<A>, SinkError>>;

    /// The row that counts of each (partition, key) of `keys`, in one read
    /// (keys never written are left out).
    fn load_keys<A: SinkTable>(
        &self,
        keys: &[(i32, A::Key)],
    ) -> impl Future<Output = Result<Rows<A>, SinkError>>;
}

impl Store for ClickHouseSink {
    fn write<A: SinkTable>(
        &self,
        rows: &[StoredRow<A::Key, A::Value>],
        marks: &[PartitionMark],
    ) -> impl Future<Output = Result<(), SinkError>> {
        ClickHouseSink::write::<A>(self, rows, marks)
    }

    fn load_marks<A: SinkTable>(
        &self,
        partitions: &[i32],
    ) -> impl Future<Output = Result<Vec<PartitionMark>, SinkError>> {
        ClickHouseSink::load_marks::<A>(self, partitions)
    }

    fn load_partitions<A: SinkTable>(
        &self,
        partitions: &[i32],
    ) -> impl Future<Output = Result<Rows<A>, SinkError>> {
        ClickHouseSink::load_partitions::<A>(self, partitions)
    }

    fn load_keys<A: SinkTable>(
        &self,
        keys: &[(i32, A::Key)],
    ) -> impl Future<Output = Result<Rows<A>, SinkError>> {
        ClickHouseSink::load_keys::<A>(self, keys)
    }
}
