use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use actix::prelude::*;

use super::faults::PanicInjector;
use super::sink::{SinkActor, Write};
use super::supervisor::Supervised;
use crate::aggregate::AggregateState;
use crate::cdc::TableChange;
use crate::config::{FaultConfig, FlushConfig};
use crate::restart::ActorKind;
use crate::sink::{ClickHouseSink, SinkTable};
use crate::source::CommitRequest;
use crate::telemetry::{self, metrics, traces, Queued};
use opentelemetry::trace::SpanContext;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The right to feed one partition to an aggregator instance, granted by
/// `Acquire`. A batch under any other lease (from before a restart or a
/// rewind) is refused, so nothing is applied twice or out of order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease(u64);

/// Decoded changes of one partition, in offset order. `last_offset` is the
/// offset of the batch's last record, change or not.
#[derive(Message)]
#[rtype(result = "Result<(), StaleLease>")]
pub struct ApplyChanges {
    pub partition: i32,
    pub lease: Lease,
    pub last_offset: i64,
    pub changes: Vec<(i64, TableChange)>,
    /// When the newest event of the batch was committed in Postgres.
    pub newest_committed_ms: Option<i64>,
    pub queued: Queued,
    /// The batch's trace.
    pub span: tracing::Span,
}

/// A batch under a lease that is no longer current: dropped; the partition
/// is being (or has been) rewound to its last commit.
#[derive(Debug)]
pub struct StaleLease;

/// (Re)load a partition's rows before its first batch, dropping whatever
/// this instance held of it; answers with the lease its batches must carry.
#[derive(Message)]
#[rtype(result = "Result<Lease, String>")]
pub struct Acquire {
    pub partition: i32,
}

/// Flush (unless `lost`) and forget a partition; answers with the offset to
/// commit for it, if the flush succeeded.
#[derive(Message)]
#[rtype(result = "Option<i64>")]
pub struct Release {
    pub partition: i32,
    pub lost: bool,
}

/// Owns one aggregate's state over the partitions this process holds.
pub struct AggregatorActor<A: SinkTable> {
    topic: String,
    state: AggregateState<A>,
    /// For loading partitions; writes go through `writer`.
    sink: ClickHouseSink,
    writer: Supervised<SinkActor<A>>,
    flush: FlushConfig,
    commits: Sender<CommitRequest>,
    /// Keys updated since the last flush: an upper bound of the dirty rows.
    updated_since_flush: usize,
    /// Per partition, the last offset whose commit was requested.
    committed: HashMap<i32, i64>,
    leases: HashMap<i32, Lease>,
    next_lease: u64,
    panics: PanicInjector,
    /// The traced batches applied since the last flush, which it links to.
    batches_since_flush: Vec<SpanContext>,
}

impl<A: SinkTable> AggregatorActor<A> {
    pub fn new(
        topic: String,
        sink: ClickHouseSink,
        writer: Supervised<SinkActor<A>>,
        flush: FlushConfig,
        commits: Sender<CommitRequest>,
        faults: &Arc<FaultConfig>,
    ) -> Self {
        let mut state = AggregateState::default();
        if faults.no_offset_guard {
            state = state.without_offset_guard();
        }
        AggregatorActor {
            topic,
            state,
            sink,
            writer,
            flush,
            commits,
            updated_since_flush: 0,
            committed: HashMap::new(),
            leases: HashMap::new(),
            // Leases of different incarnations must differ too.
            next_lease: fastrand::u64(..) >> 16,
            panics: PanicInjector::new(faults, ActorKind::Aggregator),
            batches_since_flush: Vec::new(),
        }
    }

    /// Writes every dirty row, then requests commits up to each partition's
    /// watermark. The mailbox waits meanwhile (the sink retries until
    /// ClickHouse answers), so nothing is applied between taking the rows and
    /// marking them written, and the partitions feeding this aggregator wait.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        let rows = Arc::new(self.state.dirty_rows());
        let marks: Vec<(i32, i64)> = self
            .state
            .watermarks()
            .filter(|(p, o)| self.committed.get(p).is_none_or(|c| c < o))
            .collect();
        if rows.is_empty() && marks.is_empty() {
            return;
        }
        self.updated_since_flush = 0;
        let span = tracing::info_span!(
            "flush",
            aggregate = A::NAME,
            rows = rows.len(),
            batches = self.batches_since_flush.len()
        );
        for batch in self.batches_since_flush.drain(..) {
            span.add_link(batch);
        }
        let write = self.write(rows.clone(), span);
        ctx.wait(
            write
                .into_actor(self)
                .map(move |result, act, _| match result {
                    Ok(took) => {
                        act.state.mark_flushed(&rows);
                        telemetry::flushed(A::NAME, rows.len() as u64);
                        metrics::record_flush(A::NAME, took);
                        tracing::debug!(aggregate = A::NAME, rows = rows.len(), ?took, "flushed");
                        for (partition, offset) in marks {
                            act.committed.insert(partition, offset);
                            let _ = act.commits.send(CommitRequest {
                                topic: act.topic.clone(),
                                partition,
                                next_offset: offset + 1,
                            });
                        }
                    }
                    Err(WriteFailed::Unstorable(e)) => unstorable(A::NAME, &e),
                    Err(WriteFailed::SinkGone) => {
                        act.updated_since_flush = rows.len();
                        tracing::warn!(
                            aggregate = A::NAME,
                            rows = rows.len(),
                            "the sink actor ended during a flush; retrying on the next tick"
                        );
                    }
                }),
        );
    }

    /// Hands rows to the sink actor; resolves with how long they took.
    fn write(
        &self,
        rows: Arc<Vec<crate::aggregate::StoredRow<A::Key, A::Value>>>,
        span: tracing::Span,
    ) -> impl std::future::Future<Output = Result<std::time::Duration, WriteFailed>> + 'static {
        let writer = self.writer.addr();
        let mailbox = self.writer.mailbox().clone();
        async move {
            let started = std::time::Instant::now();
            if rows.is_empty() {
                return Ok(started.elapsed());
            }
            let writer = writer.ok_or(WriteFailed::SinkGone)?;
            let write = Write {
                rows,
                queued: mailbox.enqueued(),
                span,
            };
            match writer.send(write).await {
                Ok(Ok(())) => Ok(started.elapsed()),
                Ok(Err(e)) => Err(WriteFailed::Unstorable(e)),
                Err(_) => Err(WriteFailed::SinkGone),
            }
        }
    }

    fn forget(&mut self, partition: i32) {
        self.state.release(partition);
        self.committed.remove(&partition);
        self.leases.remove(&partition);
    }
}

enum WriteFailed {
    /// The sink answers only with errors retrying cannot fix.
    Unstorable(crate::sink::SinkError),
    /// The sink actor panicked or is restarting; the rows stay dirty.
    SinkGone,
}

/// Exit code when an aggregate holds a value its table cannot store.
pub const EXIT_UNSTORABLE: i32 = 3;

/// An aggregate that cannot be written would stall for good, its offsets
/// never committed: stop loudly instead. Nothing past the last good flush was
/// committed, so a restart (after fixing the data or the schema) loses nothing.
fn unstorable(aggregate: &str, error: &crate::sink::SinkError) -> ! {
    tracing::error!(aggregate, %error, "a value cannot be stored in ClickHouse; exiting");
    std::process::exit(EXIT_UNSTORABLE)
}

impl<A: SinkTable> Actor for AggregatorActor<A> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.flush.interval, |act, ctx| act.flush(ctx));
    }
}

impl<A: SinkTable> Handler<ApplyChanges> for AggregatorActor<A> {
    type Result = Result<(), StaleLease>;

    fn handle(&mut self, batch: ApplyChanges, ctx: &mut Self::Context) -> Self::Result {
        drop(batch.queued);
        if self.leases.get(&batch.partition) != Some(&batch.lease) {
            return Err(StaleLease);
        }
        self.panics.maybe_panic(A::NAME);
        let _span = tracing::info_span!(parent: &batch.span, "aggregate", aggregate = A::NAME, changes = batch.changes.len()).entered();
        for (offset, change) in &batch.changes {
            let applied = self.state.apply(batch.partition, *offset, change);
            self.updated_since_flush += applied.keys_updated as usize;
            if applied.keys_skipped > 0 {
                telemetry::replay_skipped(A::NAME, applied.keys_skipped.into());
            }
        }
        self.state.observe(batch.partition, batch.last_offset);
        if let Some(committed) = batch.newest_committed_ms {
            telemetry::applied(A::SOURCE, committed);
        }
        if self.batches_since_flush.len() < traces::MAX_LINKS {
            self.batches_since_flush
                .extend(traces::link_to(&batch.span));
        }
        if self.updated_since_flush >= self.flush.max_rows {
            self.flush(ctx);
        }
        Ok(())
    }
}

impl<A: SinkTable> Handler<Acquire> for AggregatorActor<A> {
    type Result = AtomicResponse<Self, Result<Lease, String>>;

    fn handle(&mut self, Acquire { partition }: Acquire, _: &mut Self::Context) -> Self::Result {
        // Until the rows are loaded, no batch of the partition is taken.
        self.forget(partition);
        let sink = self.sink.clone();
        AtomicResponse::new(Box::pin(
            async move { sink.load_partition::<A>(partition).await }
                .into_actor(self)
                .map(move |result, act, _| {
                    let rows = result.map_err(|e| e.to_string())?;
                    let loaded = rows.len();
                    act.state.load(rows);
                    act.next_lease += 1;
                    let lease = Lease(act.next_lease);
                    act.leases.insert(partition, lease);
                    tracing::info!(
                        aggregate = A::NAME,
                        partition,
                        rows = loaded,
                        "partition state loaded"
                    );
                    Ok(lease)
                }),
        ))
    }
}

impl<A: SinkTable> Handler<Release> for AggregatorActor<A> {
    type Result = AtomicResponse<Self, Option<i64>>;

    fn handle(
        &mut self,
        Release { partition, lost }: Release,
        _: &mut Self::Context,
    ) -> Self::Result {
        let rows = Arc::new(if lost {
            Vec::new()
        } else {
            self.state.dirty_rows()
        });
        let span = tracing::info_span!(
            "flush",
            aggregate = A::NAME,
            rows = rows.len(),
            partition,
            lost
        );
        let write = self.write(rows.clone(), span);
        AtomicResponse::new(Box::pin(write.into_actor(self).map(
            move |result, act, _| {
                let next = match result {
                    Ok(_) if !lost => {
                        act.state.mark_flushed(&rows);
                        act.state.watermark(partition).map(|o| o + 1)
                    }
                    Ok(_) => None,
                    Err(WriteFailed::Unstorable(e)) => unstorable(A::NAME, &e),
                    Err(WriteFailed::SinkGone) => {
                        tracing::warn!(
                            aggregate = A::NAME,
                            partition,
                            "flush on release failed; the next owner replays"
                        );
                        None
                    }
                };
                act.forget(partition);
                next
            },
        )))
    }
}
