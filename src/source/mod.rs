//! Where events come from: Kafka.

pub mod kafka;

pub use kafka::{CommitRequest, Downstream, KafkaSource, Record, RecordBatch, Rewind};
