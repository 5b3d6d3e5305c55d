//! Where events come from: Kafka.

pub mod continuity;
pub mod kafka;

pub use continuity::LogStartedOver;
pub use kafka::{CommitRequest, Downstream, KafkaSource, Record, RecordBatch, Rewind};
