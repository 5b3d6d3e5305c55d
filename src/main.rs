//! etl-processor: Debezium change events from Kafka into exact ClickHouse
//! aggregates. `run` (the default) is the pipeline; `replay` and `reconcile`
//! are the checks; `rebuild` counts everything again from a snapshot.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use etl::app::{tokio_runtime, Outcome};
use etl::config::{Config, OnStartedOver};
use etl::sink::ClickHouseSink;

/// jemalloc, not the system allocator: it gives freed pages back to the OS,
/// where glibc's arenas keep what grown hash tables and batches left behind
/// (BENCHMARKS.md, memory).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's `malloc_conf` (a C string pointer it reads at start-up): pages
/// freed after a flush or a catch-up go back within a second, by a
/// background thread, instead of jemalloc's default ten seconds.
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: Option<&u8> =
    Some(&b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0]);

#[derive(Parser)]
#[command(name = "etl-processor", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the Debezium topics and keep the ClickHouse aggregates (default).
    Run {
        /// Rebuild the aggregates first, as `rebuild` does (what the processor
        /// becomes when its source started over and
        /// ETL_ON_SOURCE_STARTED_OVER=rebuild).
        #[arg(long)]
        rebuild_first: bool,
    },
    /// Replay captured Debezium events (JSON lines: {"topic","key","value"})
    /// through the decoder and aggregates; print the final aggregates.
    /// Events the pipeline would dead-letter are left out and listed on
    /// stderr, and the exit code is then 1.
    /// The topic prefix is ETL_TOPIC_PREFIX's (default online_store).
    Replay { file: std::path::PathBuf },
    /// Compare every aggregate in ClickHouse with a GROUP BY over Postgres;
    /// print each difference; exit 0 only when there is none.
    Reconcile,
    /// Count every aggregate again from the newest snapshot in the topics
    /// into shadow tables, then swap them in, each table at once (the
    /// processor must be stopped; see the README, "Rebuilding the
    /// aggregates").
    Rebuild,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config, traces) = match etl::telemetry::traces::configure("etl-processor") {
        Ok(configured) => configured,
        Err(code) => return code,
    };
    let result = match cli.command.unwrap_or(Command::Run {
        rebuild_first: false,
    }) {
        Command::Run { rebuild_first } => {
            let policy = config.on_started_over;
            match run(config, rebuild_first) {
                Ok(outcome @ Outcome::SourceStartedOver(_)) if policy == OnStartedOver::Rebuild => {
                    traces.shutdown();
                    return become_a_rebuild(&outcome);
                }
                done => done.map(|outcome| ExitCode::from(outcome.exit_code())),
            }
        }
        Command::Replay { file } => etl::replay::command(&file, &config.kafka.topic_prefix),
        Command::Reconcile => reconcile(config),
        Command::Rebuild => etl::rebuild::command(&config),
    };
    traces.finish(result)
}

fn reconcile(config: Config) -> anyhow::Result<ExitCode> {
    let postgres_url = config.require_postgres()?.to_owned();
    tokio_runtime()?.block_on(async move {
        let sink = ClickHouseSink::connect(&config.clickhouse).await?;
        let report = etl::reconcile::reconcile(&postgres_url, &sink).await?;
        for warning in &report.replica_identity {
            println!("reconcile: warning: {warning}");
        }
        for difference in &report.differences {
            println!("{difference}");
        }
        println!(
            "reconcile: {} keys compared, {} differences",
            report.compared,
            report.differences.len()
        );
        Ok(if report.is_exact() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}

fn run(config: Config, rebuild_first: bool) -> anyhow::Result<Outcome> {
    if rebuild_first {
        let began = std::time::Instant::now();
        let rebuilt = etl::rebuild::rebuild(&config)?;
        for line in rebuilt.report(&config) {
            tracing::info!("{line}");
        }
        // The consumer this process had before it became a rebuild left no
        // word; a member joining while the group still counts it can be left
        // without partitions (the native broker), so wait out its session.
        let expired = config.kafka.session_timeout + std::time::Duration::from_secs(1);
        if let Some(left) = expired.checked_sub(began.elapsed()) {
            tracing::info!(?left, "waiting for the old consumer's session to expire");
            std::thread::sleep(left);
        }
    }
    etl::app::run(config, etl::app::shutdown_signal())
}

/// The source started over and ETL_ON_SOURCE_STARTED_OVER=rebuild: the
/// process becomes `etl-processor run --rebuild-first` in place. exec keeps
/// its id, so its orchestrator sees it go on, and nothing of the old
/// pipeline (its consumer included) flushes or commits again.
fn become_a_rebuild(outcome: &Outcome) -> ExitCode {
    use std::os::unix::process::CommandExt;
    tracing::warn!("the source started over: rebuilding the aggregates from its newest snapshot, then counting on (ETL_ON_SOURCE_STARTED_OVER=rebuild)");
    let error = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe)
            .args(["run", "--rebuild-first"])
            .exec(),
        Err(e) => e,
    };
    tracing::error!(%error, "cannot start the rebuild");
    eprintln!("etl-processor: cannot start the rebuild: {error}");
    ExitCode::from(outcome.exit_code())
}
