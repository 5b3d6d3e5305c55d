use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::time::Duration;

use actix::prelude::*;
use dashmap::DashMap;
use futures::executor::block_on;

use super::aggregator::{Acquire, AggregatorActor, ApplyChanges, Release};
use super::partition::{Decode, PartitionActor};
use crate::aggregate::{CustomersByMinute, OrdersByMinute, ProductSales, Products};
use crate::cdc::Table;
use crate::config::Config;
use crate::sink::{ClickHouseSink, SinkTable};
use crate::source::{CommitRequest, Downstream, RecordBatch};
use crate::telemetry;

/// The mailboxes of one table's aggregator.
#[derive(Clone)]
struct AggregatorHandle {
    apply: Recipient<ApplyChanges>,
    acquire: Recipient<Acquire>,
    release: Recipient<Release>,
}

/// The running actors, as the Kafka source sees them.
pub struct Pipeline {
    topic_prefix: String,
    aggregators: HashMap<Table, AggregatorHandle>,
    /// The partition actors, by (topic, partition). Written by the rebalance
    /// hooks and read by the poll loop.
    partitions: DashMap<(String, i32), Addr<PartitionActor>>,
    /// Decoding runs on its own thread, beside the aggregators.
    decoders: ArbiterHandle,
    /// For the topics of tables that no aggregator reads.
    commits: Sender<CommitRequest>,
}

/// How often and how patiently a newly assigned partition's state is loaded.
const ACQUIRE_ATTEMPTS: u32 = 5;
const ACQUIRE_FIRST_BACKOFF: Duration = Duration::from_millis(200);

impl Pipeline {
    /// Starts one aggregator per table. Must run inside the actix system.
    pub fn start(
        config: &Config,
        sink: ClickHouseSink,
        commits: Sender<CommitRequest>,
    ) -> Pipeline {
        let prefix = &config.kafka.topic_prefix;
        let mut aggregators = HashMap::new();
        let mut add = |table: Table, handle: AggregatorHandle| aggregators.insert(table, handle);
        add(
            Table::Orders,
            aggregator::<OrdersByMinute>(config, prefix, &sink, &commits),
        );
        add(
            Table::OrderItems,
            aggregator::<ProductSales>(config, prefix, &sink, &commits),
        );
        add(
            Table::Customers,
            aggregator::<CustomersByMinute>(config, prefix, &sink, &commits),
        );
        add(
            Table::Products,
            aggregator::<Products>(config, prefix, &sink, &commits),
        );
        Pipeline {
            topic_prefix: prefix.clone(),
            aggregators,
            partitions: DashMap::new(),
            decoders: Arbiter::new().handle(),
            commits,
        }
    }

    /// The table a topic carries and its aggregator; None for a table that
    /// the processor does not aggregate.
    fn table(&self, topic: &str) -> Option<(Table, &AggregatorHandle)> {
        let table = Table::from_topic(topic, &self.topic_prefix)?;
        Some((table, &self.aggregators[&table]))
    }
}

fn aggregator<A: SinkTable>(
    config: &Config,
    prefix: &str,
    sink: &ClickHouseSink,
    commits: &Sender<CommitRequest>,
) -> AggregatorHandle {
    let addr = AggregatorActor::<A>::new(
        A::SOURCE.topic(prefix),
        sink.clone(),
        config.flush.clone(),
        commits.clone(),
    )
    .start();
    AggregatorHandle {
        apply: addr.clone().recipient(),
        acquire: addr.clone().recipient(),
        release: addr.recipient(),
    }
}

impl Downstream for Pipeline {
    fn assigned(&self, topic: &str, partition: i32) -> anyhow::Result<()> {
        let Some((table, aggregator)) = self.table(topic) else {
            // Its records are counted and skipped in `deliver`.
            return Ok(());
        };
        let mut backoff = ACQUIRE_FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match block_on(aggregator.acquire.send(Acquire { partition })) {
                Ok(Ok(_rows)) => break,
                Ok(Err(e)) if attempt < ACQUIRE_ATTEMPTS => {
                    tracing::warn!(%table, partition, attempt, error = %e, "loading partition state failed; retrying");
                    std::thread::sleep(backoff);
                    backoff *= 2;
                    attempt += 1;
                }
                Ok(Err(e)) => anyhow::bail!("loading {table} partition {partition} state: {e}"),
                Err(e) => anyhow::bail!("{table} aggregator is gone: {e}"),
            }
        }
        let apply = aggregator.apply.clone();
        let actor = PartitionActor::new(table, partition, apply);
        let addr = PartitionActor::start_in_arbiter(&self.decoders, move |_| actor);
        self.partitions.insert((topic.to_owned(), partition), addr);
        Ok(())
    }

    fn revoked(&self, topic: &str, partition: i32, lost: bool) -> Option<i64> {
        // Every batch was awaited by `deliver`, so the actor's mailbox is empty
        // and its changes are in the aggregator's mailbox ahead of Release.
        self.partitions.remove(&(topic.to_owned(), partition))?;
        let (_, aggregator) = self.table(topic)?;
        block_on(aggregator.release.send(Release { partition, lost }))
            .ok()
            .flatten()
    }

    fn deliver(&self, batch: RecordBatch) -> anyhow::Result<()> {
        let key = (batch.topic.to_string(), batch.partition);
        let Some(addr) = self.partitions.get(&key).map(|a| a.clone()) else {
            if self.table(&batch.topic).is_none() {
                telemetry::unknown_table(&batch.topic, batch.records.len() as u64);
                // Nothing of it is stored, so nothing stands before the commit.
                if let Some(last) = batch.records.last() {
                    let _ = self.commits.send(CommitRequest {
                        topic: batch.topic.to_string(),
                        partition: batch.partition,
                        next_offset: last.offset + 1,
                    });
                }
            }
            // Otherwise a partition no longer ours (revoked inside this poll):
            // its next owner resumes from the offset committed on revoke.
            return Ok(());
        };
        block_on(addr.send(Decode(batch)))
            .map_err(|e| anyhow::anyhow!("partition actor {key:?} is gone: {e}"))?
            .map_err(|e| anyhow::anyhow!("aggregator of {key:?} is gone: {e}"))
    }
}
