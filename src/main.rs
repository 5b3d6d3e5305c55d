//! etl-processor: Debezium change events from Kafka into exact ClickHouse
//! aggregates. `run` (the default) is the pipeline; `replay` and `reconcile`
//! are the checks.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use etl::actors::{Pipeline, Supervision, Wiring};
use etl::config::Config;
use etl::sink::{ClickHouseSink, DeadLetters};
use etl::source::KafkaSource;

#[derive(Parser)]
#[command(name = "etl-processor", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the Debezium topics and keep the ClickHouse aggregates (default).
    Run,
    /// Replay captured Debezium events (JSON lines: {"topic","key","value"})
    /// through the decoder and aggregates; print the final aggregates.
    /// The topic prefix is ETL_TOPIC_PREFIX's (default online_store).
    Replay { file: std::path::PathBuf },
    /// Compare every aggregate in ClickHouse with a GROUP BY over Postgres;
    /// print each difference; exit 0 only when there is none.
    Reconcile,
    /// Write a realistic, seeded store workload into Postgres
    /// (ETL_POSTGRES_URL) at a target rate of new orders, until SIGTERM/SIGINT
    /// or --duration; prints progress and a summary to stderr.
    Loadgen(etl::loadgen::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::from_process() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("etl-processor: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&config.log) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!(
                "etl-processor: setting ETL_LOG: {:?} is not a log filter: {e}",
                config.log
            );
            return ExitCode::from(2);
        }
    };
    let traces = match etl::telemetry::traces::init(filter, &config.telemetry) {
        Ok(traces) => traces,
        Err(e) => {
            eprintln!("etl-processor: setting ETL_OTEL_ENDPOINT: cannot export traces: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(config),
        Command::Replay { file } => replay(&file, &config.kafka.topic_prefix),
        Command::Reconcile => reconcile(config),
        Command::Loadgen(args) => {
            etl::loadgen::command(args, config.require_postgres(), tokio_runtime)
        }
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("etl-processor: {e:#}");
            ExitCode::FAILURE
        }
    };
    traces.shutdown();
    code
}

fn replay(file: &std::path::Path, topic_prefix: &str) -> anyhow::Result<ExitCode> {
    let input = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let (aggregates, summary) = etl::replay::replay(std::io::BufReader::new(input), topic_prefix)?;
    let mut out = std::io::stdout().lock();
    for line in aggregates.report() {
        writeln!(out, "{line}")?;
    }
    tracing::info!(?summary, "replayed");
    Ok(ExitCode::SUCCESS)
}

fn tokio_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn reconcile(config: Config) -> anyhow::Result<ExitCode> {
    let postgres_url = config.require_postgres()?.to_owned();
    tokio_runtime()?.block_on(async move {
        let sink = ClickHouseSink::connect(&config.clickhouse).await?;
        let report = etl::reconcile::reconcile(&postgres_url, &sink).await?;
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

/// Exit code when supervision gives up: an actor failed more often than its
/// restart policy allows (or the source thread panicked). The process must
/// not go on with an actor missing; the orchestrator restarts it clean.
const EXIT_ESCALATED: i32 = 70;
/// Exit code when a shutdown did not flush and commit within its bound.
const EXIT_SHUTDOWN_TIMEOUT: i32 = 4;

fn run(config: Config) -> anyhow::Result<ExitCode> {
    if config.faults.any() {
        tracing::warn!(faults = ?config.faults, "FAULT INJECTION IS ON (ETL_FAULT_*): for tests only");
    }
    let system = actix::System::with_tokio_rt(|| tokio_runtime().expect("tokio runtime"));
    system.block_on(async move {
        if let Some(addr) = config.telemetry.metrics_addr {
            let metrics = etl::telemetry::metrics::install()?;
            let bound = etl::telemetry::http::serve(addr, metrics)
                .await
                .with_context(|| format!("setting ETL_METRICS_ADDR: cannot listen on {addr}"))?;
            tracing::info!(%bound, "serving /metrics, /health/live and /health/ready");
        }
        let sink = ClickHouseSink::connect(&config.clickhouse)
            .await
            .context("connecting to ClickHouse (setting ETL_CLICKHOUSE_URL)")?;
        let dead_letters = DeadLetters::new(&config.kafka.brokers, &config.dead_letter_topic)
            .context("creating the dead-letter producer (setting ETL_KAFKA_BROKERS)")?;
        let (commits, commits_rx) = std::sync::mpsc::channel();
        let (rewinds, rewinds_rx) = std::sync::mpsc::channel();
        let (escalations, mut escalated) = tokio::sync::mpsc::unbounded_channel();
        let wiring = Wiring {
            sink,
            dead_letters,
            supervision: Supervision::new(escalations),
            commits,
            rewinds,
        };
        let pipeline = Arc::new(Pipeline::start(&config, wiring));
        let source = KafkaSource::new(&config.kafka, pipeline, commits_rx, rewinds_rx)?;

        etl::telemetry::started();
        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let source_stop = stop.clone();
        std::thread::Builder::new().name("kafka-source".into()).spawn(move || {
            let _ = done_tx.send(source.run(&source_stop));
        })?;

        tokio::pin!(done_rx);
        let source_died = || {
            tracing::error!("the Kafka source thread panicked; exiting");
            std::process::exit(EXIT_ESCALATED)
        };
        let result = tokio::select! {
            signal = shutdown_signal() => {
                tracing::info!(%signal, bound = ?config.shutdown_timeout, "shutting down: flushing and committing");
                etl::telemetry::stopping();
                stop.store(true, Ordering::Relaxed);
                match tokio::time::timeout(config.shutdown_timeout, &mut done_rx).await {
                    Ok(done) => done.unwrap_or_else(|_| source_died()),
                    Err(_) => {
                        tracing::error!(bound = ?config.shutdown_timeout, "shutdown did not finish in time (setting ETL_SHUTDOWN_TIMEOUT_MS); exiting without the last flush: the next start replays it");
                        std::process::exit(EXIT_SHUTDOWN_TIMEOUT);
                    }
                }
            }
            Some(e) = escalated.recv() => {
                etl::telemetry::log_summary();
                tracing::error!(kind = e.kind.as_str(), actor = %e.name, "supervision gave up: {}; exiting so the process is restarted", e.reason);
                std::process::exit(EXIT_ESCALATED);
            }
            result = &mut done_rx => result.unwrap_or_else(|_| source_died()),
        };
        etl::telemetry::log_summary();
        actix::System::current().stop();
        result.map(|()| ExitCode::SUCCESS)
    })
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
