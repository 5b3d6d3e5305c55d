use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use dashmap::DashMap;

use super::aggregator::{Acquire, Acquired, AggregatorActor, ApplyChanges, Lease, Release};
use super::partition::{Decode, Drain, Inflight, PartitionActor, SetLease};
use super::sink::SinkActor;
use super::supervisor::{Route, Supervised, Supervision};
use crate::cdc::Table;
use crate::config::{Config, SupervisionConfig};
use crate::faults::FaultConfig;
use crate::registry::{each_aggregate, EachAggregate};
use crate::restart::ActorKind;
use crate::sink::{DeadLetters, SinkTable, Store};
use crate::source::{continuity, CommitRequest, Downstream, RecordBatch, Rewind};
use crate::telemetry::{self, metrics, traces};

/// The mailboxes of one table's aggregator, whichever incarnation runs.
#[derive(Clone)]
struct AggregatorHandle {
    /// Its ClickHouse table.
    aggregate: &'static str,
    apply: Route<ApplyChanges>,
    mailbox: telemetry::Mailbox,
    acquire: Route<Acquire>,
    release: Route<Release>,
}

/// The running actors, as the Kafka source sees them.
pub struct Pipeline {
    topic_prefix: String,
    /// The consumer group, for the batch spans.
    group: String,
    aggregators: HashMap<Table, AggregatorHandle>,
    /// The partition actors, by (topic, partition). Written by the rebalance
    /// hooks and read by the poll loop.
    partitions: DashMap<(String, i32), Supervised<PartitionActor>>,
    /// The decoding threads, beside the aggregators' one. A partition's
    /// actor stays on the thread it started on, so its batches keep their
    /// order; partitions are dealt out in turn.
    decoders: Vec<ArbiterHandle>,
    next_decoder: AtomicUsize,
    /// The aggregators' thread, where releases run.
    arbiter: ArbiterHandle,
    /// How long a rebalance callback (a release, a load) may take: the
    /// group waits for this member meanwhile.
    rebalance_deadline: Duration,
    supervision: Supervision,
    policies: SupervisionConfig,
    faults: Arc<FaultConfig>,
    dead_letters: DeadLetters,
    /// For the topics of tables that no aggregator reads.
    commits: Sender<CommitRequest>,
    /// Where a restarted actor asks for its partitions to be replayed.
    rewinds: Sender<Rewind>,
    inflight: Inflight,
    max_inflight: usize,
}

/// The pause between two tries to load a partition's state, at first and
/// at most; the tries go on until the rebalance deadline.
const ACQUIRE_FIRST_BACKOFF: Duration = Duration::from_millis(200);
const ACQUIRE_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the pipeline needs from its surroundings.
pub struct Wiring<S: Store> {
    /// Where the aggregates are stored.
    pub sink: S,
    pub dead_letters: DeadLetters,
    pub supervision: Supervision,
    pub commits: Sender<CommitRequest>,
    pub rewinds: Sender<Rewind>,
}

impl Pipeline {
    /// Starts one supervised aggregator (with its sink) per table. Must run
    /// inside the actix system.
    pub fn start<S: Store>(config: &Config, wiring: Wiring<S>) -> Pipeline {
        let faults = Arc::new(config.faults.clone());
        let here = Arbiter::current();
        let mut starter = Starter {
            started: HashMap::new(),
            config,
            wiring: &wiring,
            faults: &faults,
            arbiter: &here,
        };
        each_aggregate(&mut starter);
        let aggregators = starter.started;
        Pipeline {
            topic_prefix: config.kafka.topic_prefix.clone(),
            group: config.kafka.group_id.clone(),
            aggregators,
            partitions: DashMap::new(),
            decoders: (0..config.decode_threads)
                .map(|_| Arbiter::new().handle())
                .collect(),
            next_decoder: AtomicUsize::new(0),
            arbiter: here,
            rebalance_deadline: config.kafka.rebalance_deadline(),
            supervision: wiring.supervision,
            policies: config.supervision.clone(),
            faults,
            dead_letters: wiring.dead_letters,
            commits: wiring.commits,
            rewinds: wiring.rewinds,
            inflight: Inflight::default(),
            max_inflight: config.kafka.max_inflight_records,
        }
    }

    /// The table a topic carries and its aggregator; None for a table that
    /// the processor does not aggregate.
    fn table(&self, topic: &str) -> Option<(Table, &AggregatorHandle)> {
        let table = Table::from_topic(topic, &self.topic_prefix)?;
        Some((table, &self.aggregators[&table]))
    }

    /// Has the aggregator (re)load the partitions; returns their new leases
    /// and highest stored offsets, in the same order. Tries again while the
    /// load fails, and gives up at the rebalance deadline: the group (or
    /// the poll loop) is waiting, and an answer that comes later would come
    /// too late for it anyway.
    fn acquire(
        &self,
        table: Table,
        handle: &AggregatorHandle,
        partitions: &[i32],
    ) -> anyhow::Result<Vec<Acquired>> {
        let deadline = Instant::now() + self.rebalance_deadline;
        let mut backoff = ACQUIRE_FIRST_BACKOFF;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let answer = match (handle.acquire)() {
                Some(route) => {
                    let (answered, answer) = std::sync::mpsc::channel();
                    let acquire = Acquire {
                        partitions: partitions.to_vec(),
                    };
                    self.arbiter.spawn(async move {
                        let answer = route
                            .send(acquire)
                            .await
                            .unwrap_or_else(|e| Err(format!("the aggregator ended: {e}")));
                        let _ = answered.send(answer);
                    });
                    let left = deadline.saturating_duration_since(Instant::now());
                    answer.recv_timeout(left).unwrap_or_else(|e| match e {
                        std::sync::mpsc::RecvTimeoutError::Timeout => {
                            Err("no answer yet".to_owned())
                        }
                        std::sync::mpsc::RecvTimeoutError::Disconnected => {
                            Err("the actor system is stopping".to_owned())
                        }
                    })
                }
                None => Err("the aggregator is restarting".to_owned()),
            };
            let e = match answer {
                Ok(leases) => return Ok(leases),
                Err(e) => e,
            };
            let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
            if pause.is_zero() {
                anyhow::bail!(
                    "loading the state of {table} partitions {partitions:?} did not finish within {:?} (half of ETL_KAFKA_MAX_POLL_INTERVAL_MS), after {attempt} tries: {e}",
                    self.rebalance_deadline
                );
            }
            tracing::warn!(%table, ?partitions, attempt, error = %e, "loading partition state failed; retrying");
            std::thread::sleep(pause);
            backoff = (backoff * 2).min(ACQUIRE_MAX_BACKOFF);
        }
    }

    /// Starts the supervised actor that decodes `partition`, under `lease`.
    fn start_partition(
        &self,
        topic: &str,
        table: Table,
        aggregator: &AggregatorHandle,
        partition: i32,
        lease: Lease,
    ) {
        let (route, dead_letters, faults) = (
            (aggregator.apply.clone(), aggregator.mailbox.clone()),
            self.dead_letters.clone(),
            self.faults.clone(),
        );
        let rewinds = self.rewinds.clone();
        let rewind_topic = topic.to_owned();
        let turn = self.next_decoder.fetch_add(1, Ordering::Relaxed);
        let actor = self.supervision.start(
            &self.decoders[turn % self.decoders.len()],
            ActorKind::Partition,
            format!("partition {topic}/{partition}"),
            self.policies.partition,
            move |failure| {
                PartitionActor::new(
                    table,
                    partition,
                    route.clone(),
                    dead_letters.clone(),
                    &faults,
                    failure,
                )
            },
            // The batches in the failed instance's mailbox are gone: replay
            // the partition from its last commit.
            move || {
                let _ = rewinds.send(Rewind {
                    topic: rewind_topic.clone(),
                    partition: Some(partition),
                });
            },
        );
        if let Some(addr) = actor.addr() {
            addr.do_send(SetLease(lease));
        }
        self.partitions.insert((topic.to_owned(), partition), actor);
    }
}

/// Builds each table's supervised sink and aggregator.
struct Starter<'a, S: Store> {
    started: HashMap<Table, AggregatorHandle>,
    config: &'a Config,
    wiring: &'a Wiring<S>,
    faults: &'a Arc<FaultConfig>,
    arbiter: &'a ArbiterHandle,
}

impl<S: Store> EachAggregate for Starter<'_, S> {
    fn visit<A: SinkTable>(&mut self) {
        let handle = self.aggregator::<A>();
        self.started.insert(A::SOURCE, handle);
    }
}

impl<S: Store> Starter<'_, S> {
    fn aggregator<A: SinkTable>(&self) -> AggregatorHandle {
        let topic = A::SOURCE.topic(&self.config.kafka.topic_prefix);
        let policies = &self.config.supervision;
        let (sink, faults) = (self.wiring.sink.clone(), self.faults.clone());
        let writer = self.wiring.supervision.start(
            self.arbiter,
            ActorKind::Sink,
            format!("sink {}", A::NAME),
            policies.sink,
            move |_| SinkActor::<A, S>::new(sink.clone(), faults.clone()),
            // Stateless: the flush it failed stays dirty and is retried.
            || {},
        );
        let (sink, faults) = (self.wiring.sink.clone(), self.faults.clone());
        let (flush, commits) = (self.config.flush.clone(), self.wiring.commits.clone());
        let supervision = self.wiring.supervision.clone();
        let (rewinds, rewind_topic) = (self.wiring.rewinds.clone(), topic.clone());
        let aggregator: Supervised<AggregatorActor<A, S>> = self.wiring.supervision.start(
            self.arbiter,
            ActorKind::Aggregator,
            format!("aggregator {}", A::NAME),
            policies.aggregator,
            move |_| {
                AggregatorActor::<A, S>::new(
                    topic.clone(),
                    sink.clone(),
                    writer.clone(),
                    flush.clone(),
                    commits.clone(),
                    supervision.clone(),
                    &faults,
                )
            },
            // What it held in memory is gone: every partition it read is
            // reloaded from ClickHouse and replayed from its last commit.
            move || {
                let _ = rewinds.send(Rewind {
                    topic: rewind_topic.clone(),
                    partition: None,
                });
            },
        );
        AggregatorHandle {
            aggregate: A::NAME,
            apply: aggregator.route(),
            mailbox: aggregator.mailbox().clone(),
            acquire: aggregator.route(),
            release: aggregator.route(),
        }
    }
}

impl Downstream for Pipeline {
    fn assigned(&self, topic: &str, partitions: &[(i32, i64)]) -> anyhow::Result<()> {
        let Some((table, aggregator)) = self.table(topic) else {
            // Its records are counted and skipped in `deliver`.
            return Ok(());
        };
        let numbers: Vec<i32> = partitions.iter().map(|&(p, _)| p).collect();
        let acquired = self.acquire(table, aggregator, &numbers)?;
        // Before any of their records is applied: a log that ends before
        // what is stored from it started over, and counting on would be wrong.
        for (&(partition, end), a) in partitions.iter().zip(&acquired) {
            let aggregate = aggregator.aggregate;
            continuity::check(topic, partition, end, aggregate, a.highest_stored)?;
        }
        for (&partition, a) in numbers.iter().zip(acquired) {
            self.start_partition(topic, table, aggregator, partition, a.lease);
        }
        Ok(())
    }

    fn rewound(&self, topic: &str, partition: i32) -> anyhow::Result<()> {
        let Some((table, aggregator)) = self.table(topic) else {
            return Ok(());
        };
        let Some(actor) = self
            .partitions
            .get(&(topic.to_owned(), partition))
            .map(|a| a.clone())
        else {
            return Ok(());
        };
        let [Acquired { lease, .. }] = self.acquire(table, aggregator, &[partition])?[..] else {
            anyhow::bail!("the aggregator answered one partition with another number of leases");
        };
        // Queued behind any batch from before the rewind, which is dropped
        // under the old lease (or none).
        // None: restarting, and its restart asks for another rewind.
        if let Some(addr) = actor.addr() {
            addr.do_send(SetLease(lease));
        }
        Ok(())
    }

    fn revoked(&self, partitions: &[(String, i32)], lost: bool) -> Vec<(String, i32, i64)> {
        let deadline = Instant::now() + self.rebalance_deadline;
        // One release per aggregator, all under way at once: each drains the
        // partitions' actors (every batch delivered before is applied or
        // dropped), then flushes their rows in one insert.
        let mut by_topic: HashMap<&str, Vec<i32>> = HashMap::new();
        for (topic, partition) in partitions {
            by_topic.entry(topic).or_default().push(*partition);
        }
        let (done, answers) = std::sync::mpsc::channel();
        let mut releasing = 0;
        for (topic, numbers) in by_topic {
            let actors: Vec<_> = numbers
                .iter()
                .filter_map(|&p| self.partitions.remove(&(topic.to_owned(), p)))
                .map(|(_, actor)| actor)
                .collect();
            let Some((_, aggregator)) = self.table(topic) else {
                actors.iter().for_each(Supervised::stop);
                continue;
            };
            let (release, topic, done) =
                (aggregator.release.clone(), topic.to_owned(), done.clone());
            releasing += 1;
            self.arbiter.spawn(async move {
                let drains = actors
                    .iter()
                    .filter_map(|a| a.addr())
                    .map(|a| a.send(Drain));
                futures::future::join_all(drains).await;
                actors.iter().for_each(Supervised::stop);
                let commits = match release() {
                    Some(route) => route
                        .send(Release {
                            partitions: numbers,
                            lost,
                        })
                        .await
                        .unwrap_or_default(),
                    None => Vec::new(),
                };
                let _ = done.send((topic, commits));
            });
        }
        drop(done);
        let mut commits = Vec::new();
        for _ in 0..releasing {
            match answers.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((topic, released)) => commits.extend(
                    released
                        .into_iter()
                        .map(|(partition, next)| (topic.clone(), partition, next)),
                ),
                // The actix system is gone (the run is ending): nothing to wait for.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    telemetry::release_deadline_missed();
                    tracing::warn!(deadline = ?self.rebalance_deadline, "releasing the revoked partitions missed its deadline (half of ETL_KAFKA_MAX_POLL_INTERVAL_MS): those not flushed yet are handed over as lost, and their next owner replays them from the last commit");
                    break;
                }
            }
        }
        commits
    }

    fn deliver(&self, batch: RecordBatch) -> anyhow::Result<()> {
        let key = (batch.topic.to_string(), batch.partition);
        let Some(actor) = self.partitions.get(&key).map(|a| a.clone()) else {
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
