//! Where aggregates go: ClickHouse.

pub mod clickhouse;

pub use self::clickhouse::{ClickHouseSink, SinkError, SinkTable};
