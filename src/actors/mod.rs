//! The actor runtime that wires source -> decoder -> aggregates -> sink.
//!
//! Actors own mailboxes and lifecycles, nothing else: the logic they run is
//! in `cdc`, `aggregate` and `sink`.
//!
//! - [`PartitionActor`]: one per assigned Kafka partition, started on assign
//!   and stopped on revoke; decodes a batch of records and hands the changes
//!   to its table's aggregator.
//! - [`AggregatorActor`]: one per table; applies changes to its aggregate
//!   state and flushes it to ClickHouse on a time or size bound, then asks
//!   for the flushed offsets to be committed.
//! - [`Pipeline`]: starts them and is what the Kafka source talks to.

mod aggregator;
mod partition;
mod pipeline;

pub use aggregator::{Acquire, AggregatorActor, ApplyChanges, Release};
pub use partition::PartitionActor;
pub use pipeline::Pipeline;
