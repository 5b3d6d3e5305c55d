//! What the runtime needs of the aggregate store: ClickHouse in
//! production ([`ClickHouseSink`]), memory in the runtime's in-process
//! tests ([`super::MemoryStore`]).

use std::future::Future;

use super::{ClickHouseSink, SinkError, SinkTable};
use crate::aggregate::StoredRow;

/// The rows one aggregate writes and reads back.
pub type Rows<A> = Vec<
    StoredRow<<A as crate::aggregate::Aggregate>::Key, <A as crate::aggregate::Aggregate>::Value>,
>;

/// An aggregate store with ClickHouse's semantics: a table per aggregate,
/// each row keyed by (aggregate key, source partition), and of the rows
/// of one key the one with the highest source offset is the one that
/// counts.
pub trait Store: Clone + Send + Sync + Unpin + 'static {
    /// Inserts `rows` in one write: all of them, or none.
    fn write<A: SinkTable>(
        &self,
        rows: &[StoredRow<A::Key, A::Value>],
    ) -> impl Future<Output = Result<(), SinkError>>;

    /// The row that counts of every key of `partitions`.
    fn load_partitions<A: SinkTable>(
        &self,
        partitions: &[i32],
    ) -> impl Future<Output = Result<Rows<A>, SinkError>>;

    /// The highest source offset stored from each of `partitions` (those
    /// with no row are left out), counting every row ever written.
    fn highest_offsets<A: SinkTable>(
        &self,
        partitions: &[i32],
    ) -> impl Future<Output = Result<Vec<(i32, i64)>, SinkError>>;
}

impl Store for ClickHouseSink {
    fn write<A: SinkTable>(
        &self,
        rows: &[StoredRow<A::Key, A::Value>],
    ) -> impl Future<Output = Result<(), SinkError>> {
        ClickHouseSink::write::<A>(self, rows)
    }

    fn load_partitions<A: SinkTable>(
        &self,
        partitions: &[i32],
    ) -> impl Future<Output = Result<Rows<A>, SinkError>> {
        ClickHouseSink::load_partitions::<A>(self, partitions)
    }

    fn highest_offsets<A: SinkTable>(
        &self,
        partitions: &[i32],
    ) -> impl Future<Output = Result<Vec<(i32, i64)>, SinkError>> {
        ClickHouseSink::highest_offsets::<A>(self, partitions)
    }
}
