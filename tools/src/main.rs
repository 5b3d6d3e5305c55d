//! etl-tools: what runs beside the processor, never in it. `loadgen` writes a
//! store workload into Postgres (compose runs it), `produce` writes synthetic
//! Debezium events into Kafka, and `bench` measures the processor (see
//! BENCHMARKS.md).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use etl::app::tokio_runtime;
use etl::config::Config;
use etl_tools::{bench, loadgen};

/// The processor's allocator, so that the in-process benches measure what
/// the processor runs (see the processor's main).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "etl-tools", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a realistic, seeded store workload into Postgres
    /// (ETL_POSTGRES_URL) at a target rate of new orders, until SIGTERM/SIGINT
    /// or --duration; prints progress and a summary to stderr.
    Loadgen(loadgen::Args),
    /// Write synthetic Debezium events (the connector's shapes, a seeded
    /// store workload) into the table topics of ETL_KAFKA_BROKERS and
    /// ETL_TOPIC_PREFIX, creating the topics if needed.
    Produce(bench::synthetic::ProduceArgs),
    /// Benchmarks; each prints its figures (see BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        bench: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Every bench below in one run (the pipeline with one process), then
    /// the goals each measured; needs the whole stack.
    All(bench::AllArgs),
    /// Postgres commit -> visible in ClickHouse under steady load, through
    /// the real stack (ETL_POSTGRES_URL, ETL_KAFKA_BROKERS, ETL_CLICKHOUSE_URL).
    Freshness(bench::freshness::FreshnessArgs),
    /// Decode + aggregate on one thread, ours against a naive serde_json::Value
    /// baseline, on synthetic events (schemas off and on).
    Core(bench::core::Args),
    /// The processor (from a preloaded topic to aggregates in ClickHouse,
    /// ETL_CLICKHOUSE_URL) against a bare consumer, on librdkafka's mock cluster.
    Pipeline(bench::pipeline::Args),
    /// Resident memory of one processor with many live keys, and while
    /// ClickHouse is unreachable (mock cluster; ETL_CLICKHOUSE_URL behind a relay).
    Memory(bench::memory::MemoryArgs),
    /// Restart time, memory and events/s of one processor in front of a
    /// year of stored aggregates (written into ETL_CLICKHOUSE_URL), against
    /// an empty history, and a burst of late events in old minutes (mock
    /// cluster).
    History(bench::history::HistoryArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config, traces) = match etl::telemetry::traces::configure("etl-tools") {
        Ok(configured) => configured,
        Err(code) => return code,
    };
    let result = match cli.command {
        Command::Bench { bench } => run_bench(bench, &config),
        Command::Produce(args) => {
            bench::synthetic::command(args, &config).map(|()| ExitCode::SUCCESS)
        }
        Command::Loadgen(args) => loadgen::command(args, config.require_postgres(), tokio_runtime),
    };
    traces.finish(result)
}

fn run_bench(bench: BenchCommand, config: &Config) -> anyhow::Result<ExitCode> {
    // Each bench prints its own figures; `all` ends with the goals.
    match bench {
        BenchCommand::All(args) => drop(bench::all(&args, config)?),
        BenchCommand::Freshness(args) => {
            let freshness = tokio_runtime()?.block_on(bench::freshness::run(&args, config))?;
            freshness.print(&args);
        }
        BenchCommand::Core(args) => drop(bench::core::run(args)?),
        BenchCommand::Pipeline(args) => drop(bench::pipeline::run(args, config)?),
        BenchCommand::Memory(args) => drop(bench::memory::run(args, config)?),
        // Its goals are the point of it: printed here, not in `all`'s list twice.
        BenchCommand::History(args) => bench::print_verdicts(&bench::history::run(args, config)?),
    }
    Ok(ExitCode::SUCCESS)
}
