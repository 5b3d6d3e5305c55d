//! The actor runtime that wires source -> decoder -> aggregates -> sink.
//!
//! Actors own mailboxes and lifecycles, nothing else: the logic they run is
//! in `cdc`, `aggregate` and `sink`. Every actor is supervised
//! ([`supervisor`]) under its kind's restart policy.
//!
//! - [`PartitionActor`]: one per assigned Kafka partition, started on assign
//!   and stopped on revoke; decodes a batch of records, sends what cannot be
//!   decoded to the dead-letter topic and hands the changes to its table's
//!   aggregator.
//! - [`AggregatorActor`]: one per table; applies changes to its aggregate
//!   state and flushes it on a time or size bound through its sink actor,
//!   then asks for the flushed offsets to be committed.
//! - [`SinkActor`]: one per table; inserts rows into the store (ClickHouse,
//!   or memory in the runtime's tests: `sink::Store`), retrying with backoff
//!   while it is down.
//! - [`Coordinator`]: the one owner of every partition's life (loading,
//!   live, rewinding, draining): it starts and stops the partition actors,
//!   has the aggregators load and release partitions, and alone decides
//!   what is committed.
//! - [`Pipeline`]: what the Kafka source talks to; it starts the rest and
//!   turns the source's rebalance hooks into messages to the coordinator,
//!   answered within the rebalance deadline.

mod aggregator;
mod coordinator;
mod partition;
mod pipeline;
mod sink;
pub mod supervisor;

pub use aggregator::{Acquire, AggregatorActor, ApplyChanges, Lease, Release};
pub use coordinator::{Coordinator, Wiring};
pub use partition::PartitionActor;
pub use pipeline::Pipeline;
pub use sink::SinkActor;
pub use supervisor::{Escalation, Fatal, Supervision};
