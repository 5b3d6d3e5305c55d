use std::collections::HashMap;
use std::sync::mpsc::Sender;

use actix::prelude::*;

use crate::aggregate::AggregateState;
use crate::cdc::TableChange;
use crate::config::FlushConfig;
use crate::sink::{ClickHouseSink, SinkTable};
use crate::source::CommitRequest;
use crate::telemetry;

/// Decoded changes of one partition, in offset order. `last_offset` is the
/// offset of the batch's last record, change or not.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ApplyChanges {
    pub partition: i32,
    pub last_offset: i64,
    pub changes: Vec<(i64, TableChange)>,
}

/// Load a newly assigned partition's rows before its first batch; answers
/// with the number of rows loaded.
#[derive(Message)]
#[rtype(result = "Result<usize, String>")]
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
    sink: ClickHouseSink,
    flush: FlushConfig,
    commits: Sender<CommitRequest>,
    /// Keys updated since the last flush: an upper bound of the dirty rows.
    updated_since_flush: usize,
    /// Per partition, the last offset whose commit was requested.
    committed: HashMap<i32, i64>,
}

impl<A: SinkTable> AggregatorActor<A> {
    pub fn new(
        topic: String,
        sink: ClickHouseSink,
        flush: FlushConfig,
        commits: Sender<CommitRequest>,
    ) -> Self {
        AggregatorActor {
            topic,
            state: AggregateState::default(),
            sink,
            flush,
            commits,
            updated_since_flush: 0,
            committed: HashMap::new(),
        }
    }

    /// Writes every dirty row, then requests commits up to each partition's
    /// watermark. The mailbox waits meanwhile, so nothing is applied between
    /// taking the rows and marking them written.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        let rows = self.state.dirty_rows();
        let marks: Vec<(i32, i64)> = self
            .state
            .watermarks()
            .filter(|(p, o)| self.committed.get(p).is_none_or(|c| c < o))
            .collect();
        if rows.is_empty() && marks.is_empty() {
            return;
        }
        self.updated_since_flush = 0;
        let sink = self.sink.clone();
        let write = async move {
            let started = std::time::Instant::now();
            let result = sink.write::<A>(&rows).await;
            (rows, result, started.elapsed())
        };
        ctx.wait(write.into_actor(self).map(move |(rows, result, took), act, _| match result {
            Ok(()) => {
                act.state.mark_flushed(&rows);
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
            Err(e) if e.is_permanent() => unstorable(A::NAME, &e),
            Err(e) => {
                act.updated_since_flush = rows.len();
                tracing::warn!(aggregate = A::NAME, rows = rows.len(), error = %e, "flush failed; retrying on the next tick");
            }
        }));
    }
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
    type Result = ();

    fn handle(&mut self, batch: ApplyChanges, ctx: &mut Self::Context) {
        for (offset, change) in &batch.changes {
            let applied = self.state.apply(batch.partition, *offset, change);
            self.updated_since_flush += applied.keys_updated as usize;
            if applied.keys_skipped > 0 {
                telemetry::replay_skipped(A::NAME, applied.keys_skipped.into());
            }
        }
        self.state.observe(batch.partition, batch.last_offset);
        if self.updated_since_flush >= self.flush.max_rows {
            self.flush(ctx);
        }
    }
}

impl<A: SinkTable> Handler<Acquire> for AggregatorActor<A> {
    type Result = AtomicResponse<Self, Result<usize, String>>;

    fn handle(&mut self, Acquire { partition }: Acquire, _: &mut Self::Context) -> Self::Result {
        let sink = self.sink.clone();
        AtomicResponse::new(Box::pin(
            async move { sink.load_partition::<A>(partition).await }
                .into_actor(self)
                .map(move |result, act, _| {
                    let rows = result.map_err(|e| e.to_string())?;
                    let loaded = rows.len();
                    act.state.release(partition);
                    act.committed.remove(&partition);
                    act.state.load(rows);
                    tracing::info!(
                        aggregate = A::NAME,
                        partition,
                        rows = loaded,
                        "partition state loaded"
                    );
                    Ok(loaded)
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
        let rows = if lost {
            Vec::new()
        } else {
            self.state.dirty_rows()
        };
        let sink = self.sink.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let result = sink.write::<A>(&rows).await;
                (rows, result)
            }
            .into_actor(self)
            .map(move |(rows, result), act, _| {
                let next = match result {
                    Ok(()) if !lost => {
                        act.state.mark_flushed(&rows);
                        act.state.watermark(partition).map(|o| o + 1)
                    }
                    Ok(()) => None,
                    Err(e) if e.is_permanent() => unstorable(A::NAME, &e),
                    Err(e) => {
                        tracing::warn!(aggregate = A::NAME, partition, error = %e, "flush on release failed; the next owner replays");
                        None
                    }
                };
                act.state.release(partition);
                act.committed.remove(&partition);
                next
            }),
        ))
    }
}
