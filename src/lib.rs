//! Real-time CDC analytics for the online store: Debezium change events from
//! Kafka become exact aggregates in ClickHouse.
//!
//! The modules follow the data: `source` (Kafka) -> `cdc` (Debezium decoder)
//! -> `aggregate` (pure state machines) -> `sink` (ClickHouse), wired by
//! `actors`. See ARCHITECTURE.md.

pub mod actors;
pub mod aggregate;
pub mod app;
pub mod cdc;
pub mod config;
pub mod faults;
pub mod rebuild;
pub mod reconcile;
pub mod registry;
pub mod replay;
pub mod restart;
pub mod sink;
pub mod source;
pub mod telemetry;
