//! `etl-processor run`: the whole processor, from the Kafka source to the
//! ClickHouse sinks, until asked to stop. A library function so that the
//! benchmarks run exactly what the binary runs.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;

use crate::actors::{Pipeline, Supervision, Wiring};
use crate::config::Config;
use crate::sink::{ClickHouseSink, DeadLetters};
use crate::source::KafkaSource;

/// Exit code when supervision gives up: an actor failed more often than its
/// restart policy allows (or the source thread panicked). The process must
/// not go on with an actor missing; the orchestrator restarts it clean.
pub const EXIT_ESCALATED: i32 = 70;
/// Exit code when a shutdown did not flush and commit within its bound.
pub const EXIT_SHUTDOWN_TIMEOUT: i32 = 4;

/// How long the start-up check of the source tables' replica identity may
/// wait for Postgres (when `ETL_POSTGRES_URL` is set).
const REPLICA_IDENTITY_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

fn tokio_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Runs the processor until `stop` resolves (what it resolves to is logged
/// as the reason), then flushes, commits and returns; or until the source
/// ends with an error. Exits the process itself when supervision gives up
/// ([`EXIT_ESCALATED`]) or the shutdown takes longer than its bound
/// ([`EXIT_SHUTDOWN_TIMEOUT`]). Starts its own actix system on the calling
/// thread.
pub fn run<S: Display>(config: Config, stop: impl Future<Output = S>) -> anyhow::Result<ExitCode> {
    if config.faults.any() {
        tracing::warn!(faults = ?config.faults, "FAULT INJECTION IS ON (ETL_FAULT_*): for tests only");
    }
    let system = actix::System::with_tokio_rt(|| tokio_runtime().expect("tokio runtime"));
    system.block_on(async move {
        if let Some(addr) = config.telemetry.metrics_addr {
            let metrics = crate::telemetry::metrics::install()?;
            let bound = crate::telemetry::http::serve(addr, metrics)
                .await
                .with_context(|| format!("setting ETL_METRICS_ADDR: cannot listen on {addr}"))?;
            tracing::info!(%bound, "serving /metrics, /health/live and /health/ready");
        }
        if let Some(url) = config.postgres_url.clone() {
            // In the background: the processor does not need Postgres.
            let check = crate::reconcile::warn_about_replica_identity(url, REPLICA_IDENTITY_CHECK);
            tokio::spawn(check);
        }
        let sink = ClickHouseSink::connect(&config.clickhouse)
            .await
            .context("connecting to ClickHouse (setting ETL_CLICKHOUSE_URL)")?;
        let added = sink
            .add_missing_columns()
            .await
            .context("adding the schema's new columns to the analytics tables")?;
        if !added.is_empty() {
            tracing::warn!(?added, "added the columns this release needs to tables created by an older one");
        }
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

        crate::telemetry::started();
        let stop_flag = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let source_stop = stop_flag.clone();
        std::thread::Builder::new().name("kafka-source".into()).spawn(move || {
            let _ = done_tx.send(source.run(&source_stop));
        })?;

        tokio::pin!(done_rx);
        let source_died = || {
            tracing::error!("the Kafka source thread panicked; exiting");
            std::process::exit(EXIT_ESCALATED)
        };
        let result = tokio::select! {
            signal = stop => {
                tracing::info!(%signal, bound = ?config.shutdown_timeout, "shutting down: flushing and committing");
                crate::telemetry::stopping();
                stop_flag.store(true, Ordering::Relaxed);
                match tokio::time::timeout(config.shutdown_timeout, &mut done_rx).await {
                    Ok(done) => done.unwrap_or_else(|_| source_died()),
                    Err(_) => {
                        tracing::error!(bound = ?config.shutdown_timeout, "shutdown did not finish in time (setting ETL_SHUTDOWN_TIMEOUT_MS); exiting without the last flush: the next start replays it");
                        std::process::exit(EXIT_SHUTDOWN_TIMEOUT);
                    }
                }
            }
            Some(e) = escalated.recv() => {
                crate::telemetry::log_summary();
                tracing::error!(kind = e.kind.as_str(), actor = %e.name, "supervision gave up: {}; exiting so the process is restarted", e.reason);
                std::process::exit(EXIT_ESCALATED);
            }
            result = &mut done_rx => result.unwrap_or_else(|_| source_died()),
        };
        crate::telemetry::log_summary();
        actix::System::current().stop();
        result.map(|()| ExitCode::SUCCESS)
    })
}

/// Resolves at the first SIGTERM or SIGINT, naming it.
pub async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
