//! The processor's tools, kept out of the processor: the store load generator
//! (`loadgen`, which compose runs), synthetic Debezium events straight into
//! Kafka (`bench::synthetic`, the `produce` command), and the benchmarks
//! (`bench`, see BENCHMARKS.md). `catalog` is the shop both workloads
//! describe.

pub mod bench;
pub mod catalog;
pub mod loadgen;
