use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::aggregate::{PartitionMark, StoredRow};
use crate::faults::{FaultConfig, PanicInjector};
use crate::restart::ActorKind;
use crate::sink::{SinkError, SinkTable, Store};
use crate::telemetry::{self, Queued};
use tracing::Instrument;

/// Rows of one aggregate to insert; answered once they are stored, or with
/// an error that retrying cannot fix.
pub struct Write<A: SinkTable> {
    pub rows: Arc<Vec<StoredRow<A::Key, A::Value>>>,
    /// What the rows' flush covers of each partition, stored after them.
    pub marks: Arc<Vec<PartitionMark>>,
    pub queued: Queued,
    /// The flush this write is for.
    pub span: tracing::Span,
}

impl<A: SinkTable> Message for Write<A> {
    type Result = Result<(), SinkError>;
}

/// Writes one aggregate's rows to the store. While ClickHouse is down or
/// slow it retries with backoff and does not answer; its aggregator then
/// stops taking batches at its next flush, which holds the partitions
/// feeding it: that is the backpressure that pauses the consumer.
pub struct SinkActor<A: SinkTable, S: Store> {
    sink: S,
    faults: Arc<FaultConfig>,
    panics: PanicInjector,
    _aggregate: PhantomData<A>,
}

/// The first and the longest wait between two attempts of one insert.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The waits between attempts of one call to the store: doubling from
/// [`RETRY_FIRST`] up to [`RETRY_MAX`], with equal jitter, so that
/// instances that failed together spread out.
pub(super) struct Backoff {
    wait: Duration,
    rng: fastrand::Rng,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            wait: RETRY_FIRST,
            rng: fastrand::Rng::new(),
        }
    }
}

impl Backoff {
    /// The wait before the next attempt, give or take its jitter.
    pub(super) fn next(&self) -> Duration {
        self.wait
    }

    pub(super) async fn pause(&mut self) {
        let wait = self.wait / 2 + self.wait.mul_f64(self.rng.f64() / 2.0);
        tokio::time::sleep(wait).await;
        self.wait = (self.wait * 2).min(RETRY_MAX);
    }
}

impl<A: SinkTable, S: Store> SinkActor<A, S> {
    pub fn new(sink: S, faults: Arc<FaultConfig>) -> Self {
        SinkActor {
            sink,
            panics: PanicInjector::new(&faults, ActorKind::Sink),
            faults,
            _aggregate: PhantomData,
        }
    }
}

impl<A: SinkTable, S: Store> Actor for SinkActor<A, S> {
    type Context = Context<Self>;
}

impl<A: SinkTable, S: Store> Handler<Write<A>> for SinkActor<A, S> {
    type Result = ResponseFuture<Result<(), SinkError>>;

    fn handle(&mut self, write: Write<A>, _: &mut Self::Context) -> Self::Result {
        let Write {
            rows,
            marks,
            queued,
            span,
        } = write;
        drop(queued);
        self.panics.maybe_panic(A::NAME);
        let insert = tracing::info_span!(
            parent: &span,
            "insert",
            otel.kind = "client",
            db.system.name = "clickhouse",
            db.operation.name = "INSERT",
            db.collection.name = A::NAME,
            rows = rows.len(),
            attempts = tracing::field::Empty,
        );
        let sink = self.sink.clone();
        let faults = self.faults.clone();
        let mut rng = fastrand::Rng::new();
        Box::pin(async move {
            let mut backoff = Backoff::default();
            let mut attempt = 0u64;
            loop {
                attempt += 1;
                let result = match faults.before_insert(&mut rng).await {
                    Ok(()) => sink.write::<A>(&rows, &marks).await,
                    Err(injected) => Err(injected),
                };
                telemetry::sink_failing(A::NAME, result.is_err());
                match result {
                    Ok(()) => {
                        tracing::Span::current().record("attempts", attempt);
                        if attempt > 1 {
                            tracing::info!(
                                aggregate = A::NAME,
                                attempt,
                                "insert succeeded after retries"
                            );
                        }
                        return Ok(());
                    }
                    Err(e) if e.is_permanent() => return Err(e),
                    Err(e) => {
                        telemetry::insert_retry(A::NAME);
                        // Log the first failure and then every tenth, not each.
                        if attempt % 10 == 1 {
                            tracing::warn!(aggregate = A::NAME, attempt, error = %e, retry_in = ?backoff.next(), "insert failed; retrying");
                        }
                        backoff.pause().await;
                    }
                }
            }
        }.instrument(insert))
    }
}
