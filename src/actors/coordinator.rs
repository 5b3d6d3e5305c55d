//! The coordinator: the one owner of every partition's life in this
//! process, from its assignment to its release.
//!
//! ```text
//!   assigned ─▶ Loading ─▶ Live ─▶ Draining ─▶ released
//!                           │ ▲
//!                    rewind ▼ │ reloaded
//!                        Rewinding
//! ```
//!
//! It alone starts and stops partition actors, asks aggregators to load and
//! release partitions, hands out the leases batches must carry, and decides
//! what is committed: aggregators report their flushes here, and only the
//! offsets of partitions it still holds go on to the source. Every message
//! is handled whole before the next (an assignment waits for a release
//! still under way), so a partition's life moves one step at a time.
//!
//! Only a `Live` partition has a route for its batches ([`Routes`]); a batch
//! of a partition in any other phase is dropped at the source, to be
//! fetched again from the last commit. A partition actor gets its lease when
//! it starts, never later, and a rewind replaces it: an actor never holds a
//! lease from before a rewind. What an older actor still sends carries an
//! older lease, which the aggregator refuses.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use dashmap::DashMap;

use super::aggregator::{
    Acquire, Acquired, AggregatorActor, ApplyChanges, Flushed, Lease, Release, Urgent,
};
use super::partition::{Drain, PartitionActor};
use super::sink::SinkActor;
use super::supervisor::{Route, Supervised, Supervision};
use crate::cdc::Table;
use crate::config::{Config, SupervisionConfig};
use crate::faults::FaultConfig;
use crate::registry::{each_aggregate, EachAggregate};
use crate::restart::ActorKind;
use crate::sink::{DeadLetters, SinkTable, Store};
use crate::source::{continuity, CommitRequest, Rewind};
use crate::telemetry;

/// What the pipeline needs from its surroundings.
pub struct Wiring<S: Store> {
    /// Where the aggregates are stored.
    pub sink: S,
    pub dead_letters: DeadLetters,
    pub supervision: Supervision,
    pub commits: Sender<CommitRequest>,
    pub rewinds: Sender<Rewind>,
}

/// Where a partition held here is in its life. Released partitions are no
/// longer held at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Assigned; its stored state is being loaded.
    Loading,
    /// Its batches are decoded and applied.
    Live,
    /// An actor that held its unflushed changes died: its state is being
    /// loaded again, to be replayed from the last commit.
    Rewinding,
    /// Revoked: its actor drains, then its rows are written.
    Draining,
}

/// What happens to a partition held here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Loaded,
    Rewind,
    Revoke,
}

impl Phase {
    /// The phase after `step`; None where the step cannot happen (a rewind
    /// of a partition not live: the one under way covers it).
    pub fn after(self, step: Step) -> Option<Phase> {
        match (self, step) {
            (Phase::Loading | Phase::Rewinding, Step::Loaded) => Some(Phase::Live),
            (Phase::Live, Step::Rewind) => Some(Phase::Rewinding),
            (_, Step::Revoke) => Some(Phase::Draining),
            _ => None,
        }
    }
}

/// The live partitions' actors by (topic, partition): what the source's
/// poll loop reads to hand batches on. Only the coordinator writes it.
pub type Routes = Arc<DashMap<(String, i32), Supervised<PartitionActor>>>;

/// The mailboxes of one table's aggregator, whichever incarnation runs.
#[derive(Clone)]
struct AggregatorHandle {
    /// Its ClickHouse table.
    aggregate: &'static str,
    apply: Route<ApplyChanges>,
    mailbox: telemetry::Mailbox,
    acquire: Route<Acquire>,
    release: Route<Release>,
    /// Raised while a load or a release is on its way to it.
    urgent: Urgent,
}

pub struct Coordinator {
    topic_prefix: String,
    aggregators: HashMap<Table, AggregatorHandle>,
    /// Every partition held here, in its phase.
    lives: HashMap<(String, i32), Phase>,
    /// The live ones' actors: a partition has an actor exactly while live.
    routes: Routes,
    /// The decoding threads. A partition's actor stays on the thread it
    /// started on, so its batches keep their order; partitions are dealt
    /// out in turn.
    decoders: Vec<ArbiterHandle>,
    next_decoder: usize,
    /// How long a load may take; past it, the assignment (or the rewind)
    /// fails, since the group, or the poll loop, waits for it.
    deadline: Duration,
    supervision: Supervision,
    policies: SupervisionConfig,
    faults: Arc<FaultConfig>,
    dead_letters: DeadLetters,
    /// What the source commits.
    commits: Sender<CommitRequest>,
    /// Where a restarted actor asks for its partitions to be replayed.
    rewinds: Sender<Rewind>,
}

impl Actor for Coordinator {
    type Context = Context<Self>;
}

/// The pause between two tries to load a partition's state, at first and
/// at most; the tries go on until the deadline.
const ACQUIRE_FIRST_BACKOFF: Duration = Duration::from_millis(200);
const ACQUIRE_MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Coordinator {
    /// Starts the coordinator, and one supervised aggregator (with its sink)
    /// per table, on the current arbiter; returns it with the routes it
    /// keeps. Must run inside the actix system.
    pub fn start<S: Store>(config: &Config, wiring: Wiring<S>) -> (Addr<Coordinator>, Routes) {
        let routes = Routes::default();
        let own_routes = routes.clone();
        let coordinator = Coordinator::create(move |ctx| {
            let faults = Arc::new(config.faults.clone());
            let mut starter = Starter {
                started: HashMap::new(),
                config,
                wiring: &wiring,
                faults: &faults,
                arbiter: &Arbiter::current(),
                coordinator: ctx.address(),
            };
            each_aggregate(&mut starter);
            Coordinator {
                topic_prefix: config.kafka.topic_prefix.clone(),
                aggregators: starter.started,
                lives: HashMap::new(),
                routes: own_routes,
                decoders: (0..config.decode_threads)
                    .map(|_| Arbiter::new().handle())
                    .collect(),
                next_decoder: 0,
                deadline: config.kafka.rebalance_deadline(),
                supervision: wiring.supervision,
                policies: config.supervision.clone(),
                faults,
                dead_letters: wiring.dead_letters,
                commits: wiring.commits,
                rewinds: wiring.rewinds,
            }
        });
        (coordinator, routes)
    }

    /// The table a topic carries and its aggregator; None for a table that
    /// the processor does not aggregate.
    fn table(&self, topic: &str) -> Option<(Table, AggregatorHandle)> {
        let table = Table::from_topic(topic, &self.topic_prefix)?;
        Some((table, self.aggregators[&table].clone()))
    }

    /// Moves a held partition's life on by `step`; false where it cannot.
    fn step(&mut self, key: &(String, i32), step: Step) -> bool {
        let Some(phase) = self.lives.get_mut(key) else {
            return false;
        };
        match phase.after(step) {
            Some(next) => {
                *phase = next;
                true
            }
            None => false,
        }
    }

    /// Starts the supervised actor that decodes `partition` under `lease`,
    /// and opens its route: the partition is live.
    fn go_live(&mut self, topic: &str, table: Table, partition: i32, lease: Lease) {
        let key = (topic.to_owned(), partition);
        if !self.step(&key, Step::Loaded) {
            return;
        }
        let aggregator = &self.aggregators[&table];
        let (route, dead_letters, faults) = (
            (aggregator.apply.clone(), aggregator.mailbox.clone()),
            self.dead_letters.clone(),
            self.faults.clone(),
        );
        // The first incarnation alone holds the lease: a restarted one drops
        // every batch until the rewind its restart asks for replaces it.
        let lease = Mutex::new(Some(lease));
        let rewinds = self.rewinds.clone();
        let rewind_topic = topic.to_owned();
        let decoder = &self.decoders[self.next_decoder % self.decoders.len()];
        self.next_decoder += 1;
        let actor = self.supervision.start(
            decoder,
            ActorKind::Partition,
            format!("partition {topic}/{partition}"),
            self.policies.partition,
            move |failure| {
                let lease = lease.lock().unwrap_or_else(|p| p.into_inner()).take();
                PartitionActor::new(
                    table,
                    partition,
                    lease,
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
        self.routes.insert(key, actor);
    }

    /// Has `aggregator` (re)load `partitions`, trying again while it fails,
    /// until the deadline; answers their leases and highest stored offsets,
    /// in the same order.
    fn acquire(
        &self,
        table: Table,
        aggregator: AggregatorHandle,
        partitions: Vec<i32>,
    ) -> impl std::future::Future<Output = anyhow::Result<Vec<Acquired>>> + 'static {
        let within = self.deadline;
        async move {
            let deadline = Instant::now() + within;
            let mut backoff = ACQUIRE_FIRST_BACKOFF;
            let mut attempt = 0;
            loop {
                attempt += 1;
                let _urgent = aggregator.urgent.raise();
                let answer = match (aggregator.acquire)() {
                    Some(route) => route
                        .send(Acquire {
                            partitions: partitions.clone(),
                        })
                        .await
                        .unwrap_or_else(|e| Err(format!("the aggregator ended: {e}"))),
                    None => Err("the aggregator is restarting".to_owned()),
                };
                let e = match answer {
                    Ok(leases) => return Ok(leases),
                    Err(e) => e,
                };
                let pause = backoff.min(deadline.saturating_duration_since(Instant::now()));
                if pause.is_zero() {
                    anyhow::bail!(
                        "loading the state of {table} partitions {partitions:?} did not finish within {within:?} (half of ETL_KAFKA_MAX_POLL_INTERVAL_MS), after {attempt} tries: {e}"
                    );
                }
                tracing::warn!(%table, ?partitions, attempt, error = %e, "loading partition state failed; retrying");
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(ACQUIRE_MAX_BACKOFF);
            }
        }
    }

    /// Marks `key` draining and takes its actor out of the routes.
    fn drain(&mut self, key: &(String, i32)) -> Option<Supervised<PartitionActor>> {
        self.step(key, Step::Revoke);
        self.routes.remove(key).map(|(_, actor)| actor)
    }
}

/// Partitions were assigned, by topic, each with its log's end offset:
/// load their state (every aggregator at once), check that their logs did
/// not start over, and start their actors. An error ends the run.
#[derive(Message)]
#[rtype(result = "anyhow::Result<()>")]
pub struct Assign {
    pub partitions: BTreeMap<String, Vec<(i32, i64)>>,
}

impl Handler<Assign> for Coordinator {
    type Result = AtomicResponse<Self, anyhow::Result<()>>;

    fn handle(&mut self, Assign { partitions }: Assign, _: &mut Context<Self>) -> Self::Result {
        let mut loads = Vec::new();
        for (topic, partitions) in partitions {
            // A table nobody aggregates: its records are counted and
            // skipped as they come.
            let Some((table, aggregator)) = self.table(&topic) else {
                continue;
            };
            for &(partition, _) in &partitions {
                self.lives
                    .insert((topic.clone(), partition), Phase::Loading);
            }
            let numbers: Vec<i32> = partitions.iter().map(|&(p, _)| p).collect();
            let aggregate = aggregator.aggregate;
            let acquire = self.acquire(table, aggregator, numbers);
            loads.push(async move {
                let acquired = acquire.await?;
                // Before any of their records is applied: a log that ends
                // before what is stored from it started over, and counting
                // on would be wrong.
                for (&(partition, end), a) in partitions.iter().zip(&acquired) {
                    continuity::check(&topic, partition, end, aggregate, a.highest_stored)?;
                }
                Ok::<_, anyhow::Error>((topic, table, partitions, acquired))
            });
        }
        AtomicResponse::new(Box::pin(
            futures::future::join_all(loads)
                .into_actor(self)
                .map(|loaded, act, _| {
                    for load in loaded {
                        let (topic, table, partitions, acquired) = load?;
                        for (&(partition, _), a) in partitions.iter().zip(acquired) {
                            act.go_live(&topic, table, partition, a.lease);
                        }
                    }
                    Ok(())
                }),
        ))
    }
}

/// A partition is about to be replayed from its last commit: its actor is
/// replaced, and its state loaded again, before its first batch from there.
#[derive(Message)]
#[rtype(result = "anyhow::Result<()>")]
pub struct Rewound {
    pub topic: String,
    pub partition: i32,
}

impl Handler<Rewound> for Coordinator {
    type Result = AtomicResponse<Self, anyhow::Result<()>>;

    fn handle(
        &mut self,
        Rewound { topic, partition }: Rewound,
        _: &mut Context<Self>,
    ) -> Self::Result {
        let key = (topic.clone(), partition);
        let Some((table, aggregator)) = self.table(&topic) else {
            return AtomicResponse::new(Box::pin(fut::ready(Ok(()))));
        };
        if !self.step(&key, Step::Rewind) {
            return AtomicResponse::new(Box::pin(fut::ready(Ok(()))));
        }
        // Its batches stop here; what its actor still holds goes out under
        // the old lease (or none, after a restart) and is refused.
        if let Some((_, actor)) = self.routes.remove(&key) {
            actor.stop();
        }
        let acquire = self.acquire(table, aggregator, vec![partition]);
        AtomicResponse::new(Box::pin(acquire.into_actor(self).map(
            move |acquired, act, _| {
                let [Acquired { lease, .. }] = acquired?[..] else {
                    anyhow::bail!(
                        "the aggregator answered one partition with another number of leases"
                    );
                };
                act.go_live(&topic, table, partition, lease);
                Ok(())
            },
        )))
    }
}

/// Partitions (topic, partition) are taken away, all at once: their actors
/// drain, then each aggregator writes the rows of its partitions (unless
/// `lost`) in one insert. Each aggregator's answer goes to `released` as it
/// comes, then None.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Revoke {
    pub partitions: Vec<(String, i32)>,
    pub lost: bool,
    /// When the rebalance goes on without the answers: an aggregator still
    /// writing then gives up (see [`Release::deadline`]).
    pub deadline: Instant,
    pub released: Sender<Option<Released>>,
}

/// A topic's partitions an aggregator wrote on release, each with the
/// offset to commit.
pub type Released = (String, Vec<(i32, i64)>);

impl Handler<Revoke> for Coordinator {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, revoke: Revoke, _: &mut Context<Self>) -> Self::Result {
        let Revoke {
            partitions,
            lost,
            deadline,
            released,
        } = revoke;
        let mut by_topic: HashMap<String, Vec<i32>> = HashMap::new();
        for (topic, partition) in partitions {
            by_topic.entry(topic).or_default().push(partition);
        }
        let mut releases = Vec::new();
        for (topic, numbers) in by_topic {
            let actors: Vec<_> = numbers
                .iter()
                .filter_map(|&p| self.drain(&(topic.clone(), p)))
                .collect();
            let Some((_, aggregator)) = self.table(&topic) else {
                actors.iter().for_each(Supervised::stop);
                continue;
            };
            let released = released.clone();
            releases.push(async move {
                // From the start: the partition actors drain into the
                // aggregator, whose mailbox a flush may be holding.
                let _urgent = aggregator.urgent.raise();
                let drains = actors
                    .iter()
                    .filter_map(|a| a.addr())
                    .map(|a| a.send(Drain));
                futures::future::join_all(drains).await;
                actors.iter().for_each(Supervised::stop);
                let commits = match (aggregator.release)() {
                    Some(route) => route
                        .send(Release {
                            partitions: numbers.clone(),
                            lost,
                            deadline,
                        })
                        .await
                        .unwrap_or_default(),
                    None => Vec::new(),
                };
                let _ = released.send(Some((topic.clone(), commits)));
                (topic, numbers)
            });
        }
        AtomicResponse::new(Box::pin(
            futures::future::join_all(releases)
                .into_actor(self)
                .map(move |done, act, _| {
                    for (topic, numbers) in done {
                        for partition in numbers {
                            act.lives.remove(&(topic.clone(), partition));
                        }
                    }
                    let _ = released.send(None);
                }),
        ))
    }
}

impl Handler<Flushed> for Coordinator {
    type Result = ();

    fn handle(&mut self, Flushed { table, offsets }: Flushed, _: &mut Context<Self>) {
        let topic = table.topic(&self.topic_prefix);
        for (partition, next_offset) in offsets {
            // A partition released meanwhile is committed by its release.
            if self.lives.contains_key(&(topic.clone(), partition)) {
                let _ = self.commits.send(CommitRequest {
                    topic: topic.clone(),
                    partition,
                    next_offset,
                });
            }
        }
    }
}

/// Records of a table that nobody aggregates were counted and skipped:
/// nothing of them is stored, so nothing stands before their commit.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Skipped(pub CommitRequest);

impl Handler<Skipped> for Coordinator {
    type Result = ();

    fn handle(&mut self, Skipped(commit): Skipped, _: &mut Context<Self>) {
        let _ = self.commits.send(commit);
    }
}

/// Builds each table's supervised sink and aggregator.
struct Starter<'a, S: Store> {
    started: HashMap<Table, AggregatorHandle>,
    config: &'a Config,
    wiring: &'a Wiring<S>,
    faults: &'a Arc<FaultConfig>,
    arbiter: &'a ArbiterHandle,
    coordinator: Addr<Coordinator>,
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
        let flush = self.config.flush.clone();
        let flushed = self.coordinator.clone().recipient();
        let supervision = self.wiring.supervision.clone();
        let rewinds = self.wiring.rewinds.clone();
        let urgent = Urgent::default();
        let own = urgent.clone();
        let aggregator: Supervised<AggregatorActor<A, S>> = self.wiring.supervision.start(
            self.arbiter,
            ActorKind::Aggregator,
            format!("aggregator {}", A::NAME),
            policies.aggregator,
            move |_| {
                AggregatorActor::<A, S>::new(
                    sink.clone(),
                    writer.clone(),
                    flush.clone(),
                    flushed.clone(),
                    supervision.clone(),
                    own.clone(),
                    &faults,
                )
            },
            // What it held in memory is gone: every partition it read is
            // reloaded from the store and replayed from its last commit.
            move || {
                let _ = rewinds.send(Rewind {
                    topic: topic.clone(),
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
            urgent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Phase, Step};

    #[test]
    fn a_partition_goes_live_once_loaded_and_drains_from_any_phase() {
        assert_eq!(Phase::Loading.after(Step::Loaded), Some(Phase::Live));
        assert_eq!(Phase::Live.after(Step::Rewind), Some(Phase::Rewinding));
        assert_eq!(Phase::Rewinding.after(Step::Loaded), Some(Phase::Live));
        for phase in [
            Phase::Loading,
            Phase::Live,
            Phase::Rewinding,
            Phase::Draining,
        ] {
            assert_eq!(phase.after(Step::Revoke), Some(Phase::Draining));
        }
    }

    #[test]
    fn only_a_live_partition_is_rewound_and_a_draining_one_never_goes_live() {
        for phase in [Phase::Loading, Phase::Rewinding, Phase::Draining] {
            assert_eq!(phase.after(Step::Rewind), None, "{phase:?}");
        }
        assert_eq!(Phase::Live.after(Step::Loaded), None);
        assert_eq!(Phase::Draining.after(Step::Loaded), None);
    }
}
