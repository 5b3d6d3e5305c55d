//! `etl-processor run`: the whole processor, from the Kafka source to the
//! ClickHouse sinks, until asked to stop. A library function so that the
//! benchmarks run exactly what the binary runs.

use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;

use crate::actors::{Fatal, Pipeline, Supervision, Wiring};
use crate::config::Config;
use crate::registry::{each_aggregate, EachAggregate, InTurn};
use crate::sink::{ClickHouseSink, DeadLetters, SinkTable, Store};
use crate::source::{KafkaSource, LogStartedOver};

/// How a run ended. The binary maps each to its exit code (the README,
/// "Exit codes"), after the summary and the traces are out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped when asked, having flushed and committed.
    Stopped,
    /// Supervision gave up: an actor failed more often than its restart
    /// policy allows, or the source thread panicked. The process must not
    /// go on with an actor missing; the orchestrator restarts it clean.
    Escalated(String),
    /// The shutdown did not flush and commit within its bound; the next
    /// start replays what it did not commit.
    ShutdownTimedOut,
    /// An aggregate holds a value its table cannot store.
    Unstorable(String),
    /// The source started over, or an event cannot be placed in its
    /// partition's history: a restart cannot help, a rebuild can.
    SourceStartedOver(String),
}

impl Outcome {
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Stopped => 0,
            Outcome::Unstorable(_) => 3,
            Outcome::ShutdownTimedOut => 4,
            Outcome::SourceStartedOver(_) => 5,
            Outcome::Escalated(_) => 70,
        }
    }
}

/// The outcome a fatal error ends the run with. An aggregator has logged
/// its own error already; supervision's is said here, once.
fn ended_by(fatal: Fatal) -> Outcome {
    match fatal {
        Fatal::Escalated(e) => {
            tracing::error!(kind = e.kind.as_str(), actor = %e.name, "supervision gave up: {}; stopping so that the process is restarted", e.reason);
            Outcome::Escalated(format!("{} {}: {}", e.kind.as_str(), e.name, e.reason))
        }
        Fatal::Unstorable { aggregate, error } => {
            Outcome::Unstorable(format!("{aggregate}: {error}"))
        }
        Fatal::Unplaceable(e) => Outcome::SourceStartedOver(e.to_string()),
    }
}

/// How long the start-up check of the source tables' replica identity may
/// wait for Postgres (when `ETL_POSTGRES_URL` is set).
const REPLICA_IDENTITY_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// A multi-threaded tokio runtime with every driver, as the binaries' async
/// commands and the actix system run on.
pub fn tokio_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Runs the processor until `stop` resolves (what it resolves to is logged
/// as the reason), then flushes, commits and returns [`Outcome::Stopped`];
/// or until something ends it early, which the outcome says. An error is
/// a failure to start, or of the source. Starts its own actix system on
/// the calling thread.
///
/// After an early outcome the actor that met it applies, flushes and
/// commits nothing more, and the actors stop with the actix system; what
/// the others wrote before is correct as it is. The source thread is left
/// to the process's exit: a caller that goes on must not start another run
/// in the same consumer group meanwhile.
pub fn run<S: Display>(config: Config, stop: impl Future<Output = S>) -> anyhow::Result<Outcome> {
    in_actix_system(async move {
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
            tracing::warn!(
                ?added,
                "added the columns this release needs to tables created by an older one"
            );
        }
        prepare_marks(&sink, &config.clickhouse.database)
            .await
            .context("preparing the marks table (analytics.source_marks)")?;
        process(config, sink, stop).await
    })
}

/// Creates the marks table if it is missing, and fills in the marks of
/// tables written before it from their rows (README, "Upgrading").
async fn prepare_marks(sink: &ClickHouseSink, database: &str) -> anyhow::Result<()> {
    struct FillIn<'a>(
        &'a ClickHouseSink,
        InTurn<'a, (&'static str, Option<usize>)>,
    );
    impl EachAggregate for FillIn<'_> {
        fn visit<A: SinkTable>(&mut self) {
            let sink = self.0;
            self.1 .0.push(Box::pin(async move {
                Ok((A::NAME, sink.fill_in_marks::<A>().await?))
            }));
        }
    }
    sink.create_marks_table(database).await?;
    let mut fill_in = FillIn(sink, InTurn(Vec::new()));
    each_aggregate(&mut fill_in);
    for (aggregate, filled) in fill_in.1.all().await? {
        if let Some(partitions) = filled {
            tracing::warn!(
                aggregate,
                partitions,
                "filled in the marks of rows written by an older release"
            );
        }
    }
    Ok(())
}

/// [`run`] with the aggregates in `store` instead of ClickHouse, and
/// without serving metrics: the runtime's in-process tests.
pub fn run_with_store<St: Store, S: Display>(
    config: Config,
    store: St,
    stop: impl Future<Output = S>,
) -> anyhow::Result<Outcome> {
    in_actix_system(process(config, store, stop))
}

fn in_actix_system(run: impl Future<Output = anyhow::Result<Outcome>>) -> anyhow::Result<Outcome> {
    let system = actix::System::with_tokio_rt(|| tokio_runtime().expect("tokio runtime"));
    system.block_on(async move {
        let outcome = run.await;
        actix::System::current().stop();
        outcome
    })
}

/// The pipeline from the Kafka source into `store`, until `stop` or an
/// early outcome.
async fn process<St: Store, S: Display>(
    config: Config,
    store: St,
    stop: impl Future<Output = S>,
) -> anyhow::Result<Outcome> {
    if config.faults.any() {
        tracing::warn!(faults = ?config.faults, "FAULT INJECTION IS ON (ETL_FAULT_*): for tests only");
    }
    let dead_letters = DeadLetters::new(&config.kafka.brokers, &config.dead_letter_topic)
        .context("creating the dead-letter producer (setting ETL_KAFKA_BROKERS)")?;
    let (commits, commits_rx) = std::sync::mpsc::channel();
    let (rewinds, rewinds_rx) = std::sync::mpsc::channel();
    let (fatal, mut fatal_rx) = tokio::sync::mpsc::unbounded_channel();
    let wiring = Wiring {
        sink: store,
        dead_letters,
        supervision: Supervision::new(fatal),
        commits,
        rewinds,
    };
    let pipeline = Arc::new(Pipeline::start(&config, wiring));
    let source = KafkaSource::new(&config.kafka, pipeline, commits_rx, rewinds_rx)?;

    crate::telemetry::started();
    let stop_flag = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let source_stop = stop_flag.clone();
    std::thread::Builder::new()
        .name("kafka-source".into())
        .spawn(move || {
            let _ = done_tx.send(source.run(&source_stop));
        })?;

    tokio::pin!(done_rx);
    let source_died = || {
        tracing::error!("the Kafka source thread panicked; stopping");
        Outcome::Escalated("the Kafka source thread panicked".to_owned())
    };
    let outcome = tokio::select! {
        signal = stop => {
            tracing::info!(%signal, bound = ?config.shutdown_timeout, "shutting down: flushing and committing");
            crate::telemetry::stopping();
            stop_flag.store(true, Ordering::Relaxed);
            match tokio::time::timeout(config.shutdown_timeout, &mut done_rx).await {
                Ok(Ok(done)) => source_ended(done),
                Ok(Err(_)) => Ok(source_died()),
                Err(_) => {
                    tracing::error!(bound = ?config.shutdown_timeout, "shutdown did not finish in time (setting ETL_SHUTDOWN_TIMEOUT_MS); stopping without the last flush: the next start replays it");
                    Ok(Outcome::ShutdownTimedOut)
                }
            }
        }
        Some(fatal) = fatal_rx.recv() => Ok(ended_by(fatal)),
        done = &mut done_rx => done.map_or_else(|_| Ok(source_died()), source_ended),
    };
    crate::telemetry::log_summary();
    if let Ok(outcome) = &outcome {
        tracing::info!(code = outcome.exit_code(), "the run ends: {outcome:?}");
    }
    outcome
}

/// The source thread's end: a log that started over is an outcome of its
/// own, any other error a failure.
fn source_ended(done: anyhow::Result<()>) -> anyhow::Result<Outcome> {
    match done {
        Ok(()) => Ok(Outcome::Stopped),
        Err(e) if e.chain().any(|cause| cause.is::<LogStartedOver>()) => {
            Ok(Outcome::SourceStartedOver(format!("{e:#}")))
        }
        Err(e) => Err(e),
    }
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
