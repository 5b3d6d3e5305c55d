//! The aggregator actor: one table's aggregate state over the partitions
//! held here. It applies the batches under their partitions' current
//! leases, flushes on a time or size bound (or once the source caught up)
//! through its sink actor, and reports each flush to the coordinator.

use std::collections::{HashMap, HashSet};
use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Poll};
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::sink::{Backoff, SinkActor, Write};
use super::supervisor::{Fatal, Supervised, Supervision};
use crate::aggregate::{AggregateState, PartitionMark};
use crate::cdc::{Origin, Table, TableChange};
use crate::config::FlushConfig;
use crate::faults::{FaultConfig, PanicInjector};
use crate::restart::ActorKind;
use crate::sink::{SinkError, SinkTable, Store};
use crate::telemetry::{self, metrics, traces, Queued};
use opentelemetry::trace::SpanContext;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The right to feed one partition to an aggregator instance, granted by
/// `Acquire`. A batch under any other lease (from before a restart or a
/// rewind) is refused, so nothing is applied twice or out of order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease(u64);

/// Decoded changes of one partition, in offset order, each with its offset
/// and its origin in the source. `last_offset` is the offset of the batch's
/// last record, change or not.
#[derive(Message)]
#[rtype(result = "Result<(), Refused>")]
pub struct ApplyChanges {
    pub partition: i32,
    pub lease: Lease,
    pub last_offset: i64,
    /// The consumer had caught up when it polled the batch: flush soon, not
    /// on the timer.
    pub caught_up: bool,
    pub changes: Vec<(i64, Origin, TableChange)>,
    /// When the newest event of the batch was committed in Postgres.
    pub newest_committed_ms: Option<i64>,
    pub queued: Queued,
    /// The batch's trace.
    pub span: tracing::Span,
}

/// Why a batch was dropped unapplied.
#[derive(Debug)]
pub enum Refused {
    /// Its lease is no longer current: the partition is being (or has
    /// been) rewound to its last commit.
    StaleLease,
    /// The aggregator met a fatal error and the run is ending.
    Halted,
}

/// (Re)load partitions' rows before their first batch, dropping whatever
/// this instance held of them; answers, in the order asked, with the lease
/// each partition's batches must carry and the highest offset stored from
/// it (None: nothing yet), which says how far into its log the sink is.
#[derive(Message)]
#[rtype(result = "Result<Vec<Acquired>, String>")]
pub struct Acquire {
    pub partitions: Vec<i32>,
}

#[derive(Debug, Clone, Copy)]
pub struct Acquired {
    pub lease: Lease,
    pub highest_stored: Option<i64>,
}

/// Flush the partitions' own rows (unless `lost`), in one insert, and
/// forget them; answers with the offset to commit for each partition whose
/// rows were written.
#[derive(Message)]
#[rtype(result = "Vec<(i32, i64)>")]
pub struct Release {
    pub partitions: Vec<i32>,
    pub lost: bool,
    /// The rebalance's deadline: past it nothing is committed, and the
    /// partitions are forgotten without waiting for their flush.
    pub deadline: Instant,
}

/// An aggregator's flush is stored: every record of each partition below
/// its offset has its effect in the store.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Flushed {
    pub table: Table,
    /// (partition, next offset).
    pub offsets: Vec<(i32, i64)>,
}

/// Owns one aggregate's state over the partitions this process holds.
pub struct AggregatorActor<A: SinkTable, S: Store> {
    state: AggregateState<A>,
    /// For loading partitions; writes go through `writer`.
    sink: S,
    writer: Supervised<SinkActor<A, S>>,
    flush: FlushConfig,
    /// Where a flush is reported (the coordinator, which commits it).
    flushed: Recipient<Flushed>,
    supervision: Supervision,
    /// A fatal error was reported: nothing more is applied, flushed or
    /// committed, since the run is ending.
    halted: bool,
    /// Keys updated since the last flush: an upper bound of the dirty rows.
    updated_since_flush: usize,
    /// When the last flush started: the next one that the source catching
    /// up asks for waits until `flush.min_interval` after it.
    last_flush: Instant,
    /// A flush for a caught-up source is scheduled.
    flush_soon: bool,
    /// Per partition, the last offset whose flush was reported.
    committed: HashMap<i32, i64>,
    leases: HashMap<i32, Lease>,
    next_lease: u64,
    panics: PanicInjector,
    /// The traced batches applied since the last flush, which it links to.
    batches_since_flush: Vec<SpanContext>,
    /// The flush being written, if any (at most one at a time).
    in_flight: Option<InFlight<A>>,
    /// A spawned `Settled` is pending: it finishes whichever flush is in
    /// flight when it ends, so one is enough.
    watching: bool,
    /// A due flush stepped aside for a load or a release: it starts when the
    /// one in flight lands.
    flush_on_landing: bool,
    /// Loads and releases on their way here.
    urgent: Urgent,
}

type Rows<A> = Arc<
    Vec<
        crate::aggregate::StoredRow<
            <A as crate::aggregate::Aggregate>::Key,
            <A as crate::aggregate::Aggregate>::Value,
        >,
    >,
>;

/// A flush whose rows the sink is writing while batches go on being applied.
struct InFlight<A: SinkTable> {
    rows: Rows<A>,
    /// The watermarks taken with the rows: what the flush makes safe to commit.
    watermarks: Vec<(i32, i64)>,
    outcome: tokio::sync::oneshot::Receiver<Result<Duration, WriteFailed>>,
}

impl<A: SinkTable, S: Store> AggregatorActor<A, S> {
    pub fn new(
        sink: S,
        writer: Supervised<SinkActor<A, S>>,
        flush: FlushConfig,
        flushed: Recipient<Flushed>,
        supervision: Supervision,
        urgent: Urgent,
        faults: &Arc<FaultConfig>,
    ) -> Self {
        AggregatorActor {
            state: faults.guard(AggregateState::default()),
            sink,
            writer,
            flush,
            flushed,
            supervision,
            halted: false,
            updated_since_flush: 0,
            last_flush: Instant::now(),
            flush_soon: false,
            committed: HashMap::new(),
            leases: HashMap::new(),
            // Leases of different incarnations must differ too.
            next_lease: fastrand::u64(..) >> 16,
            panics: PanicInjector::new(faults, ActorKind::Aggregator),
            batches_since_flush: Vec::new(),
            in_flight: None,
            watching: false,
            flush_on_landing: false,
            urgent,
        }
    }

    /// A flush is due (the timer, or `max_rows` keys updated). If the previous
    /// one is still being written, no batch is taken until it is done: so a
    /// slow or unreachable ClickHouse holds this aggregator, and through it
    /// the partitions feeding it, instead of letting dirty rows pile up. A
    /// load or a release (which have the rebalance's deadline) does not wait
    /// behind it: the wait steps aside for them, and the flush starts when
    /// the one in flight lands.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.halted {
            return;
        }
        if self.in_flight.is_some() {
            let urgent = self.urgent.clone();
            ctx.wait(StepAside(urgent).map(|landed, act: &mut Self, ctx| {
                if landed {
                    act.start_flush(ctx);
                } else {
                    act.flush_on_landing = true;
                }
            }));
        } else {
            self.start_flush(ctx);
        }
    }

    /// Takes the dirty rows and the watermarks, and has the sink write them
    /// while batches go on being applied. A row an event changes meanwhile
    /// stays dirty (`mark_flushed` compares offsets), and the commits cover
    /// only the watermarks taken with the rows.
    fn start_flush(&mut self, ctx: &mut Context<Self>) {
        debug_assert!(self.in_flight.is_none());
        let rows = Arc::new(self.state.dirty_rows());
        let watermarks: Vec<(i32, i64)> = self
            .state
            .watermarks()
            .filter(|(p, o)| self.committed.get(p).is_none_or(|c| c < o))
            .collect();
        if rows.is_empty() && watermarks.is_empty() {
            return;
        }
        let marks = self.marks_of(watermarks.iter().map(|(p, _)| *p));
        self.updated_since_flush = 0;
        self.last_flush = Instant::now();
        let span = tracing::info_span!(
            "flush",
            aggregate = A::NAME,
            rows = rows.len(),
            batches = self.batches_since_flush.len()
        );
        for batch in self.batches_since_flush.drain(..) {
            span.add_link(batch);
        }
        // Its own task: the write must go on while this actor's mailbox waits
        // for it (a waiting context polls nothing it spawned).
        let write = self.write(rows.clone(), marks, span);
        let (done, outcome) = tokio::sync::oneshot::channel();
        actix::spawn(async move {
            let _ = done.send(write.await);
        });
        self.in_flight = Some(InFlight {
            rows,
            watermarks,
            outcome,
        });
        if !self.watching {
            self.watching = true;
            ctx.spawn(Settled.map(|(), act: &mut Self, ctx| {
                act.watching = false;
                if std::mem::take(&mut act.flush_on_landing) && !act.halted {
                    act.start_flush(ctx);
                }
            }));
        }
    }

    /// The in-flight flush ended: on success its rows are clean (unless
    /// changed since) and its watermarks are committed.
    fn finish_flush(&mut self, flight: InFlight<A>, result: Result<Duration, WriteFailed>) {
        let InFlight {
            rows, watermarks, ..
        } = flight;
        match result {
            Ok(took) => {
                self.state.mark_flushed(&rows);
                telemetry::flushed(A::NAME, rows.len() as u64);
                metrics::record_flush(A::NAME, took);
                tracing::debug!(aggregate = A::NAME, rows = rows.len(), ?took, "flushed");
                for &(partition, offset) in &watermarks {
                    self.committed.insert(partition, offset);
                }
                if !watermarks.is_empty() {
                    self.flushed.do_send(Flushed {
                        table: A::SOURCE,
                        offsets: watermarks.iter().map(|&(p, o)| (p, o + 1)).collect(),
                    });
                }
                // Written rows can go now; those least recently touched do.
                let evicted = self.state.evict(self.flush.held_rows);
                telemetry::state_size(A::NAME, evicted as u64, self.state.len());
            }
            Err(WriteFailed::Unstorable(e)) => self.unstorable(&e),
            Err(WriteFailed::SinkGone) => {
                self.updated_since_flush += rows.len();
                tracing::warn!(
                    aggregate = A::NAME,
                    rows = rows.len(),
                    "the sink actor ended during a flush; retrying on the next tick"
                );
            }
        }
    }

    /// What a flush covering `partitions` up to their watermarks stores of
    /// each as a whole.
    fn marks_of(&self, partitions: impl IntoIterator<Item = i32>) -> Arc<Vec<PartitionMark>> {
        Arc::new(
            partitions
                .into_iter()
                .filter_map(|p| self.state.partition_mark(p))
                .collect(),
        )
    }

    /// Hands rows, and then the partitions' marks, to the sink actor;
    /// resolves with how long they took.
    fn write(
        &self,
        rows: Rows<A>,
        marks: Arc<Vec<PartitionMark>>,
        span: tracing::Span,
    ) -> impl std::future::Future<Output = Result<Duration, WriteFailed>> + 'static {
        let writer = self.writer.addr();
        let mailbox = self.writer.mailbox().clone();
        async move {
            let started = std::time::Instant::now();
            if rows.is_empty() && marks.is_empty() {
                return Ok(started.elapsed());
            }
            let writer = writer.ok_or(WriteFailed::SinkGone)?;
            let write = Write {
                rows,
                marks,
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

    /// The consumer has caught up: write what changed now, not
    /// on the timer, so that a burst's last events do not wait for it; but
    /// at most once per `flush.min_interval`, so that a trickle of events
    /// does not become an insert each.
    fn caught_up(&mut self, ctx: &mut Context<Self>) {
        if self.updated_since_flush == 0 || self.flush_soon {
            return;
        }
        let wait = self
            .flush
            .min_interval
            .saturating_sub(self.last_flush.elapsed());
        if wait.is_zero() {
            self.flush(ctx);
        } else {
            self.flush_soon = true;
            ctx.run_later(wait, |act, ctx| {
                act.flush_soon = false;
                if act.updated_since_flush > 0 {
                    act.flush(ctx);
                }
            });
        }
    }

    /// Stops this aggregator for good and ends the run: an event that
    /// cannot be placed would be wrong to count either way, and an
    /// aggregate that cannot be written would stall for good.
    fn halt(&mut self, fatal: Fatal) {
        self.halted = true;
        self.supervision.report(fatal);
    }

    /// Nothing past the last good flush was committed, so a restart (after
    /// fixing the data or the schema) loses nothing.
    fn unstorable(&mut self, error: &crate::sink::SinkError) {
        tracing::error!(aggregate = A::NAME, %error, "a value cannot be stored in ClickHouse; stopping");
        self.halt(Fatal::Unstorable {
            aggregate: A::NAME,
            error: error.to_string(),
        });
    }

    fn forget(&mut self, partitions: &[i32]) {
        self.state.release(partitions);
        for partition in partitions {
            self.committed.remove(partition);
            self.leases.remove(partition);
        }
    }
}

enum WriteFailed {
    /// The sink answers only with errors retrying cannot fix.
    Unstorable(crate::sink::SinkError),
    /// The sink actor panicked or is restarting; the rows stay dirty.
    SinkGone,
}

/// Resolves once no flush is in flight, finishing the one that was. Polled
/// from `ctx.spawn` (a flush ends on its own) and from `ctx.wait` (whatever
/// must not overlap a flush: the next flush, releasing partitions);
/// whichever sees the outcome first finishes the flush.
struct Settled;

impl<A: SinkTable, S: Store> ActorFuture<AggregatorActor<A, S>> for Settled {
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        act: &mut AggregatorActor<A, S>,
        _: &mut Context<AggregatorActor<A, S>>,
        task: &mut std::task::Context<'_>,
    ) -> Poll<()> {
        let Some(flight) = act.in_flight.as_mut() else {
            return Poll::Ready(());
        };
        // A dropped sender means the write task died: like a gone sink.
        let result =
            ready!(Pin::new(&mut flight.outcome).poll(task)).unwrap_or(Err(WriteFailed::SinkGone));
        let flight = act.in_flight.take().expect("checked above");
        act.finish_flush(flight, result);
        Poll::Ready(())
    }
}

/// Loads and releases on their way to an aggregator, counted by whoever
/// sends them (the coordinator) until they are answered: a flush that
/// holds the aggregator's mailbox steps aside while any is pending, since
/// a rebalance waits for them and ClickHouse may take longer than it does.
#[derive(Clone, Default)]
pub struct Urgent(Arc<UrgentCount>);

#[derive(Default)]
struct UrgentCount {
    pending: AtomicUsize,
    waker: futures::task::AtomicWaker,
}

/// One urgent message on its way, until dropped.
pub struct UrgentGuard(Urgent);

impl Urgent {
    pub fn raise(&self) -> UrgentGuard {
        self.0.pending.fetch_add(1, Ordering::SeqCst);
        self.0.waker.wake();
        UrgentGuard(self.clone())
    }

    fn pending(&self, task: &std::task::Context<'_>) -> bool {
        self.0.waker.register(task.waker());
        self.0.pending.load(Ordering::SeqCst) > 0
    }
}

impl Drop for UrgentGuard {
    fn drop(&mut self) {
        let Urgent(count) = &self.0;
        count.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// [`Settled`], unless a load or a release is on its way first: resolves
/// with whether the flight landed.
struct StepAside(Urgent);

impl<A: SinkTable, S: Store> ActorFuture<AggregatorActor<A, S>> for StepAside {
    type Output = bool;

    fn poll(
        self: Pin<&mut Self>,
        act: &mut AggregatorActor<A, S>,
        ctx: &mut Context<AggregatorActor<A, S>>,
        task: &mut std::task::Context<'_>,
    ) -> Poll<bool> {
        if Pin::new(&mut Settled).poll(act, ctx, task).is_ready() {
            return Poll::Ready(true);
        }
        if self.0.pending(task) {
            return Poll::Ready(false);
        }
        Poll::Pending
    }
}

impl<A: SinkTable, S: Store> Actor for AggregatorActor<A, S> {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.flush.interval, |act, ctx| act.flush(ctx));
    }
}

impl<A: SinkTable, S: Store> AggregatorActor<A, S> {
    /// Applies a batch whose keys are all held (or were never stored).
    fn apply(&mut self, batch: ApplyChanges, ctx: &mut Context<Self>) -> Result<(), Refused> {
        let ApplyChanges {
            partition,
            lease: _,
            last_offset,
            caught_up,
            changes,
            newest_committed_ms,
            queued,
            span,
        } = batch;
        drop(queued);
        let _span = tracing::info_span!(parent: &span, "aggregate", aggregate = A::NAME, changes = changes.len()).entered();
        for (offset, origin, change) in &changes {
            let applied = match self.state.apply(partition, *offset, *origin, change) {
                Ok(applied) => applied,
                Err(e) => {
                    tracing::error!(error = %e, "an event cannot be placed in its partition's history (README, \"The source started over\")");
                    self.halt(Fatal::Unplaceable(e));
                    return Err(Refused::Halted);
                }
            };
            self.updated_since_flush += applied.keys_updated as usize;
            if applied.keys_skipped > 0 {
                telemetry::replay_skipped(A::NAME, applied.keys_skipped.into());
            }
            if applied.redelivered {
                telemetry::source_repeat(A::NAME);
            }
            if applied.new_snapshot {
                telemetry::new_snapshot(A::NAME);
                tracing::warn!(
                    aggregate = A::NAME,
                    partition,
                    offset,
                    ?origin,
                    "a new snapshot of the source begins: it replaces the partition's rows"
                );
            }
        }
        self.state.observe(partition, last_offset);
        if let Some(committed) = newest_committed_ms {
            telemetry::applied(A::SOURCE, committed);
        }
        if self.batches_since_flush.len() < traces::MAX_LINKS {
            self.batches_since_flush.extend(traces::link_to(&span));
        }
        if self.updated_since_flush >= self.flush.max_rows {
            self.flush(ctx);
        } else if caught_up {
            self.caught_up(ctx);
        }
        Ok(())
    }

    /// The stored rows of `keys` in `partition`, in one read, retried while
    /// ClickHouse fails (as inserts are): meanwhile this aggregator takes
    /// nothing else, and its partitions' backlog pauses the consumer.
    fn read_back(
        &self,
        partition: i32,
        keys: Vec<A::Key>,
        span: tracing::Span,
    ) -> impl std::future::Future<Output = Result<crate::sink::store::Rows<A>, SinkError>> + 'static
    {
        let sink = self.sink.clone();
        let read = tracing::info_span!(parent: &span, "read_back", aggregate = A::NAME, partition, keys = keys.len());
        let keys: Vec<(i32, A::Key)> = keys.into_iter().map(|key| (partition, key)).collect();
        async move {
            let mut backoff = Backoff::default();
            for attempt in 1u64.. {
                match sink.load_keys::<A>(&keys).await {
                    Ok(rows) => {
                        telemetry::read_back(A::NAME, rows.len() as u64);
                        return Ok(rows);
                    }
                    Err(e) if e.is_permanent() => return Err(e),
                    Err(e) => {
                        if attempt % 10 == 1 {
                            tracing::warn!(aggregate = A::NAME, attempt, error = %e, retry_in = ?backoff.next(), "reading rows back failed; retrying");
                        }
                        backoff.pause().await;
                    }
                }
            }
            unreachable!("the attempts never run out")
        }
        .instrument(read)
    }
}

impl<A: SinkTable, S: Store> Handler<ApplyChanges> for AggregatorActor<A, S> {
    type Result = ActorResponse<Self, Result<(), Refused>>;

    fn handle(&mut self, batch: ApplyChanges, ctx: &mut Self::Context) -> Self::Result {
        if self.halted {
            return ActorResponse::reply(Err(Refused::Halted));
        }
        if self.leases.get(&batch.partition) != Some(&batch.lease) {
            telemetry::stale_batch();
            return ActorResponse::reply(Err(Refused::StaleLease));
        }
        self.panics.maybe_panic(A::NAME);
        let missing = self.missing(&batch, &HashSet::new());
        if missing.is_empty() {
            return ActorResponse::reply(self.apply(batch, ctx));
        }
        let (reply, replied) = tokio::sync::oneshot::channel();
        self.read_then_apply(batch, missing, HashSet::new(), reply, ctx);
        ActorResponse::r#async(
            async move { replied.await.unwrap_or(Err(Refused::Halted)) }.into_actor(self),
        )
    }
}

impl<A: SinkTable, S: Store> AggregatorActor<A, S> {
    /// The keys `batch` touches that may be stored but are not held,
    /// leaving out those `absent` from the store.
    fn missing(&self, batch: &ApplyChanges, absent: &HashSet<A::Key>) -> Vec<A::Key> {
        let touched = batch.changes.iter().map(|(o, origin, c)| (*o, *origin, c));
        let mut missing = self.state.missing(batch.partition, touched);
        missing.retain(|key| !absent.contains(key));
        missing
    }

    /// Reads the rows of `keys` back, then applies `batch` and answers on
    /// `reply`. Until then this aggregator takes no other message (a
    /// `ctx.wait`), so batches, loads, releases and flushes keep their order.
    ///
    /// Before applying, the batch's keys are checked again: actix polls the
    /// context's spawned futures once between a handler's `ctx.wait` and the
    /// wait itself, and a flush that lands there evicts rows, which may be
    /// keys this batch found held. Those are read too, so a key is never
    /// counted from zero while its row is stored. `absent`: keys read and
    /// not stored, which cannot become stored without being held first.
    fn read_then_apply(
        &mut self,
        batch: ApplyChanges,
        keys: Vec<A::Key>,
        mut absent: HashSet<A::Key>,
        reply: tokio::sync::oneshot::Sender<Result<(), Refused>>,
        ctx: &mut Context<Self>,
    ) {
        let read = self.read_back(batch.partition, keys.clone(), batch.span.clone());
        ctx.wait(read.into_actor(self).map(move |rows, act, ctx| {
            if act.halted {
                let _ = reply.send(Err(Refused::Halted));
                return;
            }
            let rows = match rows {
                Ok(rows) => rows,
                Err(e) => {
                    act.unstorable(&e);
                    let _ = reply.send(Err(Refused::Halted));
                    return;
                }
            };
            let found: HashSet<&A::Key> = rows.iter().map(|row| &row.key).collect();
            absent.extend(keys.into_iter().filter(|key| !found.contains(key)));
            act.state.load_rows(batch.partition, rows);
            let evicted_meanwhile = act.missing(&batch, &absent);
            if evicted_meanwhile.is_empty() {
                let _ = reply.send(act.apply(batch, ctx));
            } else {
                tracing::debug!(
                    aggregate = A::NAME,
                    partition = batch.partition,
                    keys = evicted_meanwhile.len(),
                    "keys evicted while their batch waited are read too"
                );
                act.read_then_apply(batch, evicted_meanwhile, absent, reply, ctx);
            }
        }));
    }
}

impl<A: SinkTable, S: Store> Handler<Acquire> for AggregatorActor<A, S> {
    type Result = AtomicResponse<Self, Result<Vec<Acquired>, String>>;

    fn handle(&mut self, Acquire { partitions }: Acquire, _: &mut Self::Context) -> Self::Result {
        // Until the marks are loaded, no batch of the partitions is taken. A
        // flush in flight is not waited for (it may take as long as
        // ClickHouse does, and the load has the rebalance's deadline): if it
        // lands after the load, the mark loaded is one flush behind its
        // rows, which a replay from the commit walks again exactly, as after
        // a crash between the rows and the marks.
        AtomicResponse::new(Box::pin(
            actix::fut::ready(())
                .then(|(), act: &mut Self, _| {
                    act.forget(&partitions);
                    let sink = act.sink.clone();
                    async move {
                        let loaded = async {
                            let marks = sink.load_marks::<A>(&partitions).await?;
                            // Until a partition streams its first change, a
                            // snapshot taken again replaces all of its rows:
                            // it is held whole. Any other is read back by key.
                            let whole: Vec<i32> = marks
                                .iter()
                                .filter(|m| A::KEEPS_STORED_ROWS && m.in_snapshot())
                                .map(|m| m.partition)
                                .collect();
                            let rows = sink.load_partitions::<A>(&whole).await?;
                            Ok::<_, SinkError>((marks, whole, rows))
                        }
                        .await;
                        (partitions, loaded)
                    }
                    .into_actor(act)
                })
                .map(|(partitions, result), act, _| {
                    let (marks, whole, rows) = result.map_err(|e| e.to_string())?;
                    for mark in &marks {
                        act.state.start(mark, !whole.contains(&mark.partition));
                    }
                    let loaded = rows.len();
                    act.state.load(rows);
                    let leases = partitions
                        .iter()
                        .map(|&partition| {
                            act.next_lease += 1;
                            let lease = Lease(act.next_lease);
                            act.leases.insert(partition, lease);
                            let highest_stored = marks
                                .iter()
                                .find(|m| m.partition == partition)
                                .map(|m| m.offset);
                            Acquired {
                                lease,
                                highest_stored,
                            }
                        })
                        .collect();
                    tracing::info!(
                        aggregate = A::NAME,
                        ?partitions,
                        ?whole,
                        rows = loaded,
                        "partition state loaded"
                    );
                    Ok(leases)
                }),
        ))
    }
}

impl<A: SinkTable, S: Store> Handler<Release> for AggregatorActor<A, S> {
    type Result = AtomicResponse<Self, Vec<(i32, i64)>>;

    fn handle(
        &mut self,
        Release {
            partitions,
            lost,
            deadline,
        }: Release,
        _: &mut Self::Context,
    ) -> Self::Result {
        let within = deadline.saturating_duration_since(Instant::now());
        let these = partitions.clone();
        // A flush in flight ends first (its commits included); then the
        // partitions' rows it did not cover are written, in one insert.
        AtomicResponse::new(Box::pin(
            Settled
                .then(move |(), act: &mut Self, _| {
                    // Only these partitions' rows: the others' flush on their
                    // own bounds, and their commits with them.
                    let written = !lost && !act.halted;
                    let rows = Arc::new(if written {
                        act.state.dirty_rows_of(&these)
                    } else {
                        Vec::new()
                    });
                    let marks = if written {
                        act.marks_of(these.iter().copied())
                    } else {
                        Arc::default()
                    };
                    let span = tracing::info_span!(
                        "flush",
                        aggregate = A::NAME,
                        rows = rows.len(),
                        partitions = ?these,
                        lost
                    );
                    act.write(rows.clone(), marks, span)
                        .into_actor(act)
                        .map(move |result, _, _| (rows, result))
                })
                // Past the deadline the partitions are someone else's: this
                // aggregator stops waiting, so that it can take its next
                // assignment. A write still under way may land later; it
                // stores what it holds, which the next owner's replay
                // counts on top of or supersedes (its offsets are lower).
                .timeout(within)
                .map(move |outcome, act, _| {
                    let flushed = match outcome {
                        Ok((rows, Ok(_))) => (!lost && !act.halted).then_some(rows),
                        Ok((_, Err(WriteFailed::Unstorable(e)))) => {
                            act.unstorable(&e);
                            None
                        }
                        Ok((_, Err(WriteFailed::SinkGone))) => {
                            tracing::warn!(
                                aggregate = A::NAME,
                                ?partitions,
                                "flush on release failed; the next owner replays"
                            );
                            None
                        }
                        Err(()) => {
                            tracing::warn!(
                                aggregate = A::NAME,
                                ?partitions,
                                "the release's flush missed the rebalance deadline; the next owner replays"
                            );
                            None
                        }
                    };
                    let mut commits = Vec::new();
                    if let Some(rows) = flushed {
                        act.state.mark_flushed(&rows);
                        for &partition in &partitions {
                            if let Some(offset) = act.state.watermark(partition) {
                                commits.push((partition, offset + 1));
                            }
                        }
                    }
                    act.forget(&partitions);
                    commits
                }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::supervisor::Supervised;
    use crate::aggregate::fixtures::{created, snapshot, sold, streamed, streamed_to};
    use crate::aggregate::{ProductSales, Products};
    use crate::restart::RestartPolicy;
    use crate::sink::MemoryStore;

    fn batch(lease: Lease, offset: i64, id: i64) -> ApplyChanges {
        ApplyChanges {
            partition: 0,
            lease,
            last_offset: offset,
            caught_up: false,
            changes: vec![(offset, snapshot(), created(id))],
            newest_committed_ms: None,
            queued: telemetry::Mailbox::named("aggregator test").enqueued(),
            span: tracing::Span::none(),
        }
    }

    /// Takes the flushes' reports where the coordinator would commit them:
    /// these tests commit nothing.
    struct NoCommits;

    impl Actor for NoCommits {
        type Context = Context<Self>;
    }

    impl Handler<Flushed> for NoCommits {
        type Result = ();

        fn handle(&mut self, _: Flushed, _: &mut Context<Self>) {}
    }

    /// A products aggregator over `store`, with its sink, as the pipeline
    /// starts them.
    fn start(store: &MemoryStore) -> Addr<AggregatorActor<Products, MemoryStore>> {
        start_with(
            store,
            FlushConfig {
                interval: Duration::from_secs(60),
                max_rows: 1_000,
                min_interval: Duration::ZERO,
                held_rows: 1_000,
            },
        )
    }

    /// An aggregator of `A` over `store` flushing on `flush`.
    fn start_with<A: SinkTable>(
        store: &MemoryStore,
        flush: FlushConfig,
    ) -> Addr<AggregatorActor<A, MemoryStore>> {
        start_urgent(store, flush, Urgent::default())
    }

    /// The same, told of loads and releases through `urgent`.
    fn start_urgent<A: SinkTable>(
        store: &MemoryStore,
        flush: FlushConfig,
        urgent: Urgent,
    ) -> Addr<AggregatorActor<A, MemoryStore>> {
        let (fatal, _) = tokio::sync::mpsc::unbounded_channel();
        let supervision = Supervision::new(fatal);
        let faults: Arc<FaultConfig> = Arc::default();
        let here = Arbiter::current();
        let (sink, sink_faults) = (store.clone(), faults.clone());
        let writer = supervision.start(
            &here,
            ActorKind::Sink,
            format!("sink {}", A::NAME),
            RestartPolicy::default_for(ActorKind::Sink),
            move |_| SinkActor::<A, MemoryStore>::new(sink.clone(), sink_faults.clone()),
            || {},
        );
        let flushed = NoCommits.start().recipient();
        let (store, own) = (store.clone(), supervision.clone());
        let aggregator: Supervised<AggregatorActor<A, MemoryStore>> = supervision.start(
            &here,
            ActorKind::Aggregator,
            format!("aggregator {}", A::NAME),
            RestartPolicy::default_for(ActorKind::Aggregator),
            move |_| {
                AggregatorActor::new(
                    store.clone(),
                    writer.clone(),
                    flush.clone(),
                    flushed.clone(),
                    own.clone(),
                    urgent.clone(),
                    &faults,
                )
            },
            || {},
        );
        aggregator.addr().expect("the aggregator runs")
    }

    #[test]
    fn a_batch_under_a_lease_from_before_a_rewind_is_refused_and_stores_nothing() {
        actix::System::new().block_on(async {
            let store = MemoryStore::default();
            let aggregator = start(&store);
            let acquire = || {
                aggregator.send(Acquire {
                    partitions: vec![0],
                })
            };
            let old = acquire().await.unwrap().unwrap()[0].lease;
            // The rewind: the partition is loaded again under a new lease.
            let new = acquire().await.unwrap().unwrap()[0].lease;
            assert_ne!(old, new);

            let counted = || telemetry::counters().stale_batches.load(Ordering::Relaxed);
            let before = counted();
            let stale = aggregator.send(batch(old, 0, 7)).await.unwrap();
            assert!(matches!(stale, Err(Refused::StaleLease)), "{stale:?}");
            // Counted: a stale batch is dropped, not dropped without a word.
            assert!(counted() > before);
            aggregator.send(batch(new, 1, 8)).await.unwrap().unwrap();

            let commits = release_partition_0(&aggregator).await;
            assert_eq!(commits, [(0, 2)]);
            let stored: Vec<(i64, i64)> = store
                .rows::<Products>()
                .iter()
                .map(|row| (row.key, row.offset))
                .collect();
            // Product 8 from the current lease's batch; nothing of product 7.
            assert_eq!(stored, [(8, 1)]);
        });
    }

    /// Releases partition 0, written (not lost), well within its deadline;
    /// answers with its commits.
    async fn release_partition_0<A: SinkTable>(
        aggregator: &Addr<AggregatorActor<A, MemoryStore>>,
    ) -> Vec<(i32, i64)> {
        aggregator
            .send(Release {
                partitions: vec![0],
                lost: false,
                deadline: Instant::now() + Duration::from_secs(60),
            })
            .await
            .unwrap()
    }

    /// Product sales of partition 0 at `offset`: one unit of each product.
    fn sales(lease: Lease, offset: i64, products: &[i64]) -> ApplyChanges {
        ApplyChanges {
            changes: products
                .iter()
                .map(|&p| (offset, streamed(offset), sold(p)))
                .collect(),
            ..batch(lease, offset, 0)
        }
    }

    /// Yields to the other tasks on this thread until `done`.
    async fn until(mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out");
            tokio::task::yield_now().await;
        }
    }

    /// actix polls an actor's spawned futures once between a handler's
    /// `ctx.wait` and the wait itself. A flush landing there evicts rows
    /// the batch found held; they must be read back like any other, or the
    /// key counts again from zero (the runtime test's rare under-count).
    #[test]
    fn a_key_evicted_while_its_batch_waits_for_a_read_is_read_back_too() {
        actix::System::new().block_on(async {
            let store = MemoryStore::default();
            // Partition 0 streamed by an earlier owner: rows are read by key.
            store
                .write::<ProductSales>(&[], &[streamed_to(0, 0)])
                .await
                .unwrap();
            let aggregator = start_with::<ProductSales>(
                &store,
                FlushConfig {
                    interval: Duration::from_secs(60),
                    // A's three keys start a flush; B0's and B1's do not.
                    max_rows: 3,
                    min_interval: Duration::ZERO,
                    // A flush that lands evicts every written row.
                    held_rows: 1,
                },
            );
            let lease = aggregator
                .send(Acquire {
                    partitions: vec![0],
                })
                .await
                .unwrap()
                .unwrap()[0]
                .lease;
            let stored = store.writes();

            // A sells products 1, 2 and 3, and starts a flush, held at the store.
            let writes = store.hold_writes();
            aggregator
                .send(sales(lease, 1, &[1, 2, 3]))
                .await
                .unwrap()
                .unwrap();
            // B0 (product 4) waits for its read, and B1 (product 5) and B
            // (products 1 and 6) queue behind it.
            let loads = store.hold_loads();
            let b0 = aggregator.send(sales(lease, 2, &[4]));
            let b1 = aggregator.send(sales(lease, 3, &[5]));
            let b = aggregator.send(sales(lease, 4, &[1, 6]));
            until(|| store.loads_waiting() == 1).await;
            // The flush lands while the aggregator waits, so nothing takes
            // its outcome yet; yielding longer than needed changes nothing.
            drop(writes);
            until(|| store.writes() > stored).await;
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            // B0, B1 and B are now taken in one poll. B finds product 1 held
            // (in the flush); B1's reply leaves the flush's watcher first in
            // line for the poll between B's `ctx.wait` and the wait, where the
            // flush ends and evicts product 1.
            drop(loads);
            for batch in [b0, b1, b] {
                batch.await.unwrap().unwrap();
            }

            release_partition_0(&aggregator).await;
            let mut units: Vec<(i64, i64)> = store
                .rows::<ProductSales>()
                .iter()
                .map(|row| (row.key, row.value.units))
                .collect();
            units.sort_unstable();
            assert_eq!(units, [(1, 2), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1)]);
        });
    }

    /// A flush due while another is being written holds the mailbox (the
    /// batches wait for ClickHouse), but not a load: the rebalance waits
    /// for it, and ClickHouse may take longer than the deadline.
    #[test]
    fn a_load_does_not_wait_behind_a_flush_held_by_clickhouse() {
        actix::System::new().block_on(async {
            let store = MemoryStore::default();
            let urgent = Urgent::default();
            let aggregator = start_urgent::<ProductSales>(
                &store,
                FlushConfig {
                    interval: Duration::from_secs(60),
                    max_rows: 1,
                    min_interval: Duration::ZERO,
                    held_rows: 1_000,
                },
                urgent.clone(),
            );
            let acquire = |partition| {
                aggregator.send(Acquire {
                    partitions: vec![partition],
                })
            };
            let lease = acquire(0).await.unwrap().unwrap()[0].lease;
            let writes = store.hold_writes();
            // The first flush is held at the store; the second is due and
            // waits for it, holding the mailbox.
            aggregator
                .send(sales(lease, 1, &[1]))
                .await
                .unwrap()
                .unwrap();
            aggregator
                .send(sales(lease, 2, &[2]))
                .await
                .unwrap()
                .unwrap();
            until(|| store.writes_waiting() == 1).await;

            let raised = urgent.raise();
            let loaded = tokio::time::timeout(Duration::from_secs(5), acquire(1)).await;
            drop(raised);
            assert!(loaded.is_ok(), "the load waited behind the flush");
            loaded.unwrap().unwrap().unwrap();

            // The due flush starts once the held one lands.
            drop(writes);
            until(|| store.rows::<ProductSales>().len() == 2).await;
        });
    }
}
