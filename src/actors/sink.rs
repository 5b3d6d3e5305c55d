use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::aggregate::StoredRow;
use crate::faults::{FaultConfig, PanicInjector};
use crate::restart::ActorKind;
use crate::sink::{SinkError, SinkTable, Store};
use crate::telemetry::{self, Queued};
use tracing::Instrument;

/// Rows of one aggregate to insert; answered once they are stored, or with
/// an error that retrying cannot fix.
pub struct Write<A: SinkTable> {
    pub rows: Arc<Vec<StoredRow<A::Key, A::Value>>>,
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
        let Write { rows, queued, span } = write;
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
            let mut wait = RETRY_FIRST;
            let mut attempt = 0u64;
            loop {
                attempt += 1;
                let result = match faults.before_insert(&mut rng).await {
                    Ok(()) => sink.write::<A>(&rows).await,
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
                            tracing::warn!(aggregate = A::NAME, attempt, error = %e, retry_in = ?wait, "insert failed; retrying");
                        }
                        // Equal jitter: instances that failed together spread out.
                        tokio::time::sleep(wait / 2 + wait.mul_f64(rng.f64() / 2.0)).await;
                        wait = (wait * 2).min(RETRY_MAX);
                    }
                }
            }
        }.instrument(insert))
    }
}
