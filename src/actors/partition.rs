use actix::prelude::*;

use super::aggregator::ApplyChanges;
use crate::cdc::{self, Decoded, Table};
use crate::source::RecordBatch;
use crate::telemetry;

/// Decodes the batches of one Kafka partition.
pub struct PartitionActor {
    table: Table,
    partition: i32,
    aggregator: Recipient<ApplyChanges>,
}

impl PartitionActor {
    pub fn new(table: Table, partition: i32, aggregator: Recipient<ApplyChanges>) -> Self {
        PartitionActor {
            table,
            partition,
            aggregator,
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

/// A batch of records; answered once the aggregator has taken the changes.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct Decode(pub RecordBatch);

impl Handler<Decode> for PartitionActor {
    type Result = ResponseFuture<Result<(), String>>;

    fn handle(&mut self, Decode(batch): Decode, _: &mut Self::Context) -> Self::Result {
        let mut changes = Vec::with_capacity(batch.records.len());
        let last_offset = batch.records.last().map_or(-1, |r| r.offset);
        for record in &batch.records {
            match cdc::decode(self.table, record.value.as_deref()) {
                Ok(Decoded::Change(change)) => changes.push((record.offset, change)),
                Ok(Decoded::Tombstone) => {}
                Ok(Decoded::Truncate) => telemetry::truncate(self.table),
                Err(e) => {
                    telemetry::decode_error(e.kind.as_str());
                    tracing::error!(
                        topic = %batch.topic, partition = batch.partition, offset = record.offset,
                        reason = e.kind.as_str(), error = %e, "cannot decode event; skipped"
                    );
                }
            }
        }
        let message = ApplyChanges {
            partition: self.partition,
            last_offset,
            changes,
        };
        let aggregator = self.aggregator.clone();
        Box::pin(async move { aggregator.send(message).await.map_err(|e| e.to_string()) })
    }
}
