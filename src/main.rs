//! etl-processor: Debezium change events from Kafka into exact ClickHouse
//! aggregates. `run` (the default) is the pipeline; `replay` and `reconcile`
//! are the checks.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use etl::actors::Pipeline;
use etl::config::Config;
use etl::sink::ClickHouseSink;
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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(config),
        Command::Replay { file } => replay(&file, &config.kafka.topic_prefix),
        Command::Reconcile => reconcile(config),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("etl-processor: {e:#}");
            ExitCode::FAILURE
        }
    }
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

/// Exit code for a panic anywhere: the process must not go on with an actor
/// missing (its numbers would be silently wrong); the orchestrator restarts it.
const PANIC_EXIT: i32 = 70;

fn run(config: Config) -> anyhow::Result<ExitCode> {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        tracing::error!("panic: {info}; exiting so the process is restarted clean");
        std::process::exit(PANIC_EXIT);
    }));

    let system = actix::System::with_tokio_rt(|| tokio_runtime().expect("tokio runtime"));
    system.block_on(async move {
        let sink = ClickHouseSink::connect(&config.clickhouse)
            .await
            .context("connecting to ClickHouse (setting ETL_CLICKHOUSE_URL)")?;
        let (commits_tx, commits_rx) = std::sync::mpsc::channel();
        let pipeline = Arc::new(Pipeline::start(&config, sink, commits_tx));
        let source = KafkaSource::new(&config.kafka, pipeline, commits_rx)?;

        let stop = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let source_stop = stop.clone();
        std::thread::Builder::new().name("kafka-source".into()).spawn(move || {
            let _ = done_tx.send(source.run(&source_stop));
        })?;

        tokio::pin!(done_rx);
        let result = tokio::select! {
            signal = shutdown_signal() => {
                tracing::info!(%signal, "shutting down: flushing and committing");
                stop.store(true, Ordering::Relaxed);
                (&mut done_rx).await.unwrap_or_else(|_| Err(anyhow::anyhow!("source thread died")))
            }
            result = &mut done_rx => result.unwrap_or_else(|_| Err(anyhow::anyhow!("source thread died"))),
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
