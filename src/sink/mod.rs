//! Where results go: aggregates to ClickHouse, unusable events to the
//! dead-letter topic.

pub mod clickhouse;
pub mod dead_letter;

pub use self::clickhouse::{ClickHouseSink, SinkError, SinkTable};
pub use self::dead_letter::{DeadLetter, DeadLetters};
