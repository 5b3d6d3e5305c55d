//! What the Kafka source talks to: its rebalance hooks become messages to
//! the [`Coordinator`], answered within the rebalance deadline, and its
//! batches go straight to the live partitions' actors.

use std::collections::BTreeMap;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::coordinator::{Assign, Coordinator, Revoke, Rewound, Routes, Skipped, Wiring};
use super::partition::{Decode, Inflight};
use crate::cdc::Table;
use crate::config::Config;
use crate::sink::Store;
use crate::source::{CommitRequest, Downstream, RecordBatch};
use crate::telemetry::{self, metrics, traces};

/// The running actors, as the Kafka source sees them.
pub struct Pipeline {
    coordinator: Addr<Coordinator>,
    /// The live partitions' actors, which the coordinator keeps.
    routes: Routes,
    topic_prefix: String,
    /// The consumer group, for the batch spans.
    group: String,
    /// Where the coordinator's work runs.
    arbiter: ArbiterHandle,
    /// How long a rebalance callback may take: the group waits for this
    /// member meanwhile.
    deadline: Duration,
    inflight: Inflight,
    max_inflight: usize,
}

impl Pipeline {
    /// Starts the coordinator and, under it, one supervised aggregator (with
    /// its sink) per table. Must run inside the actix system.
    pub fn start<S: Store>(config: &Config, wiring: Wiring<S>) -> Pipeline {
        let (coordinator, routes) = Coordinator::start(config, wiring);
        Pipeline {
            coordinator,
            routes,
            topic_prefix: config.kafka.topic_prefix.clone(),
            group: config.kafka.group_id.clone(),
            arbiter: Arbiter::current(),
            deadline: config.kafka.rebalance_deadline(),
            inflight: Inflight::default(),
            max_inflight: config.kafka.max_inflight_records,
        }
    }

    /// Sends `message` to the coordinator from the source's thread and
    /// waits for the answer until `deadline`: None if it did not come.
    fn ask<M>(&self, message: M, deadline: Instant) -> Option<M::Result>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        Coordinator: Handler<M>,
    {
        let (answered, answer) = std::sync::mpsc::channel();
        let coordinator = self.coordinator.clone();
        self.arbiter.spawn(async move {
            if let Ok(result) = coordinator.send(message).await {
                let _ = answered.send(result);
            }
        });
        answer
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()
    }

    /// A load's answer, or why there is none.
    fn loaded<M>(&self, message: M, what: String) -> anyhow::Result<()>
    where
        M: Message<Result = anyhow::Result<()>> + Send + 'static,
        Coordinator: Handler<M>,
    {
        // The coordinator gives up at the deadline and says why; a moment
        // more here lets its answer through.
        let deadline = Instant::now() + self.deadline + Duration::from_secs(1);
        self.ask(message, deadline).unwrap_or_else(|| {
            anyhow::bail!(
                "{what} did not finish within {:?} (half of ETL_KAFKA_MAX_POLL_INTERVAL_MS)",
                self.deadline
            )
        })
    }
}

impl Downstream for Pipeline {
    fn assigned(&self, partitions: &BTreeMap<String, Vec<(i32, i64)>>) -> anyhow::Result<()> {
        let assign = Assign {
            partitions: partitions.clone(),
        };
        self.loaded(assign, "loading the assigned partitions".to_owned())
    }

    fn rewound(&self, topic: &str, partition: i32) -> anyhow::Result<()> {
        let rewound = Rewound {
            topic: topic.to_owned(),
            partition,
        };
        self.loaded(
            rewound,
            format!("reloading partition {partition} of {topic}"),
        )
    }

    fn revoked(&self, partitions: &[(String, i32)], lost: bool) -> Vec<(String, i32, i64)> {
        let deadline = Instant::now() + self.deadline;
        let (released, answers) = std::sync::mpsc::channel();
        let revoke = Revoke {
            partitions: partitions.to_vec(),
            lost,
            deadline,
            released,
        };
        self.coordinator.do_send(revoke);
        // Each aggregator's answer as it comes, until the last or the deadline.
        let mut commits = Vec::new();
        loop {
            match answers.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Some((topic, released))) => commits.extend(
                    released
                        .into_iter()
                        .map(|(partition, next)| (topic.clone(), partition, next)),
                ),
                Ok(None) => break,
                // The actix system is gone (the run is ending): nothing to wait for.
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    telemetry::release_deadline_missed();
                    tracing::warn!(deadline = ?self.deadline, "releasing the revoked partitions missed its deadline (half of ETL_KAFKA_MAX_POLL_INTERVAL_MS): those not flushed yet are handed over as lost, and their next owner replays them from the last commit");
                    break;
                }
            }
        }
        commits
    }

    fn deliver(&self, batch: RecordBatch) -> anyhow::Result<()> {
        let key = (batch.topic.to_string(), batch.partition);
        let Some(actor) = self.routes.get(&key).map(|a| a.clone()) else {
            if Table::from_topic(&batch.topic, &self.topic_prefix).is_none() {
                telemetry::unknown_table(&batch.topic, batch.records.len() as u64);
                if let Some(last) = batch.records.last() {
                    self.coordinator.do_send(Skipped(CommitRequest {
                        topic: batch.topic.to_string(),
                        partition: batch.partition,
                        next_offset: last.offset + 1,
                    }));
                }
            }
            // Otherwise a partition not live here: revoked inside this poll
            // (its next owner resumes from the commit on revoke), or being
            // rewound (it is fetched again from the commit).
            return Ok(());
        };
        // A restarting partition actor: its restart rewinds the partition.
        if let Some(addr) = actor.addr() {
            metrics::record_batch(batch.records.len());
            addr.do_send(Decode {
                permit: self.inflight.permit(batch.records.len()),
                queued: actor.mailbox().enqueued(),
                span: traces::batch_span(&batch, &self.group),
                batch,
            });
        }
        Ok(())
    }

    fn backlog(&self) -> (usize, usize) {
        (self.inflight.get(), self.max_inflight)
    }
}
