//! Where results go: aggregates to ClickHouse, unusable events to the
//! dead-letter topic. The runtime reaches the aggregate store through
//! [`Store`], which memory also implements for its in-process tests.

pub mod clickhouse;
pub mod dead_letter;
pub mod memory;
pub mod store;

pub use self::clickhouse::{ClickHouseSink, SinkError, SinkTable};
pub use self::dead_letter::{DeadLetter, DeadLetters};
pub use self::memory::MemoryStore;
pub use self::store::Store;
