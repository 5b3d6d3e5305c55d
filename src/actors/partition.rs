//! The partition actor: decodes one Kafka partition's batches, in order,
//! sends what does not decode to the dead-letter topic, and hands the
//! changes to its table's aggregator under the lease it started with.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;

use super::aggregator::{ApplyChanges, Lease};
use super::supervisor::{Failure, Route};
use crate::cdc::{self, Decoded, Table};
use crate::faults::{FaultConfig, PanicInjector};
use crate::restart::ActorKind;
use crate::sink::{DeadLetter, DeadLetters};
use crate::source::RecordBatch;
use crate::telemetry;
use crate::telemetry::{Mailbox, Queued};

/// Records handed on and not yet applied (or dropped), process-wide; the
/// source pauses its partitions above a bound.
#[derive(Clone, Default)]
pub struct Inflight(Arc<AtomicUsize>);

impl Inflight {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    pub fn permit(&self, records: usize) -> Permit {
        self.0.fetch_add(records, Ordering::Relaxed);
        Permit {
            inflight: self.clone(),
            records,
        }
    }
}

/// Counts its records as in flight until dropped, however the batch ends.
pub struct Permit {
    inflight: Inflight,
    records: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.inflight.0.fetch_sub(self.records, Ordering::Relaxed);
    }
}

/// Decodes the batches of one Kafka partition, one at a time and in order.
pub struct PartitionActor {
    table: Table,
    partition: i32,
    aggregator: Route<ApplyChanges>,
    aggregator_mailbox: Mailbox,
    /// Given when the actor starts, never changed: None in a restarted
    /// incarnation, which drops every batch (to be fetched again from the
    /// commit) until the rewind its restart asks for replaces the actor.
    lease: Option<Lease>,
    dead_letters: DeadLetters,
    failure: Failure,
    panics: PanicInjector,
}

impl PartitionActor {
    pub fn new(
        table: Table,
        partition: i32,
        lease: Option<Lease>,
        (aggregator, aggregator_mailbox): (Route<ApplyChanges>, Mailbox),
        dead_letters: DeadLetters,
        faults: &FaultConfig,
        failure: Failure,
    ) -> Self {
        PartitionActor {
            table,
            partition,
            aggregator,
            aggregator_mailbox,
            lease,
            dead_letters,
            failure,
            panics: PanicInjector::new(faults, ActorKind::Partition),
        }
    }
}

impl Actor for PartitionActor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        tracing::debug!(table = %self.table, partition = self.partition, "partition actor started");
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        tracing::debug!(table = %self.table, partition = self.partition, "partition actor stopped");
    }
}

/// A batch of records, with the permit that counts it as in flight and the
/// span of its trace.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Decode {
    pub batch: RecordBatch,
    pub permit: Permit,
    pub queued: Queued,
    pub span: tracing::Span,
}

/// Answered once every batch sent before it has been handled.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

impl Handler<Decode> for PartitionActor {
    type Result = ();

    fn handle(&mut self, decode: Decode, ctx: &mut Self::Context) {
        let Decode {
            batch,
            permit,
            queued,
            span,
        } = decode;
        drop(queued);
        self.panics.maybe_panic("a partition actor");
        let Some(lease) = self.lease else {
            telemetry::stale_batch();
            return;
        };
        let decoding = tracing::info_span!(parent: &span, "decode", table = %self.table, dead_letters = tracing::field::Empty).entered();
        let mut changes = Vec::with_capacity(batch.records.len());
        let mut letters = Vec::new();
        let mut by_op = OpCounts::default();
        let mut newest_committed_ms = None;
        let last_offset = batch.records.last().map_or(-1, |r| r.offset);
        for record in &batch.records {
            let event = match cdc::decode_event(self.table, record.value.as_deref()) {
                Ok(event) => event,
                Err(e) => {
                    letters.push(DeadLetter {
                        reason: e.kind.as_str(),
                        error: e.to_string(),
                        topic: batch.topic.clone(),
                        partition: batch.partition,
                        offset: record.offset,
                        key: record.key.clone(),
                        value: record.value.clone(),
                    });
                    continue;
                }
            };
            newest_committed_ms = newest_committed_ms.max(event.committed_at_ms);
            match event.decoded {
                Decoded::Change(change, origin) => {
                    by_op.add(change.op().label());
                    changes.push((record.offset, origin, change));
                }
                Decoded::Tombstone => {}
                Decoded::Truncate => {
                    by_op.add("truncate");
                    telemetry::truncate(self.table);
                }
            }
        }
        telemetry::events(self.table, &by_op.0);
        decoding.record("dead_letters", letters.len());
        drop(decoding);
        let message = ApplyChanges {
            partition: self.partition,
            lease,
            last_offset,
            caught_up: batch.caught_up,
            changes,
            newest_committed_ms,
            queued: self.aggregator_mailbox.enqueued(),
            span,
        };
        let aggregator = (self.aggregator)();
        let dead_letters = self.dead_letters.clone();
        // Waiting keeps the batches in order and makes `Drain` mean drained.
        // Dead letters are stored before the batch goes on: its offsets can
        // only be committed after that.
        let work = async move {
            for letter in &letters {
                dead_letters.send(letter).await.map_err(|e| {
                    format!(
                        "cannot write the dead letter of {}/{}@{} to {}: {e}",
                        letter.topic,
                        letter.partition,
                        letter.offset,
                        dead_letters.topic()
                    )
                })?;
                telemetry::dead_letter(letter.reason);
                tracing::warn!(
                    topic = %letter.topic, partition = letter.partition, offset = letter.offset,
                    reason = letter.reason, error = %letter.error, "event sent to the dead-letter topic"
                );
            }
            // An aggregator that is restarting, or a lease gone stale: the
            // batch is dropped, and the rewind that follows fetches it again.
            if let Some(aggregator) = aggregator {
                let _ = aggregator.send(message).await;
            }
            drop(permit);
            Ok::<(), String>(())
        };
        ctx.wait(work.into_actor(self).map(|result, act, ctx| {
            if let Err(reason) = result {
                act.failure.fail(ctx, reason);
            }
        }));
    }
}

/// Events of one batch by op label, counted without a map.
struct OpCounts([(&'static str, u64); 5]);

impl Default for OpCounts {
    fn default() -> Self {
        OpCounts(["insert", "update", "delete", "snapshot", "truncate"].map(|op| (op, 0)))
    }
}

impl OpCounts {
    fn add(&mut self, op: &'static str) {
        if let Some(slot) = self.0.iter_mut().find(|(o, _)| *o == op) {
            slot.1 += 1;
        }
    }
}

impl Handler<Drain> for PartitionActor {
    type Result = ();

    fn handle(&mut self, _: Drain, _: &mut Self::Context) {}
}
