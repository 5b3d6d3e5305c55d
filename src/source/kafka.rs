//! The Kafka source: one consumer-group member on its own thread.
//!
//! It polls, cuts the records into per-partition batches and hands each batch
//! to the runtime, waiting until it is accepted (backpressure). Partition
//! assignment changes go to the runtime from the rebalance hooks, which block
//! until the runtime is ready: on assign, until the partition's aggregate
//! state is loaded; on revoke, until it is flushed, and then the flushed
//! offsets are committed before the partition is given up. Offsets are only
//! ever committed for events whose effect is already in ClickHouse.

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::config::KafkaConfig;

/// One Kafka record, copied out of the consumer's buffers.
#[derive(Debug, Clone)]
pub struct Record {
    pub offset: i64,
    pub value: Option<Bytes>,
}

/// Consecutive records of one partition.
#[derive(Debug, Clone)]
pub struct RecordBatch {
    pub topic: Arc<str>,
    pub partition: i32,
    pub records: Vec<Record>,
}

/// A request to commit: every record of `partition` below `next_offset` has
/// its effect stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRequest {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// What the source needs from the runtime. Each call blocks until done.
pub trait Downstream: Send + Sync + 'static {
    /// A partition was assigned: get ready for its first batch.
    fn assigned(&self, topic: &str, partition: i32) -> anyhow::Result<()>;
    /// A partition is being taken away. Unless `lost`, flush what it fed and
    /// return the offset to commit; forget its state either way.
    fn revoked(&self, topic: &str, partition: i32, lost: bool) -> Option<i64>;
    /// Hand over a batch; returns once it is accepted.
    fn deliver(&self, batch: RecordBatch) -> anyhow::Result<()>;
}

pub struct SourceContext {
    downstream: Arc<dyn Downstream>,
    /// An assignment the runtime could not take: the source stops on it.
    fatal: Mutex<Option<String>>,
    /// Bumped by every assignment change, so the poll loop can tell records
    /// gathered under an older assignment.
    generation: AtomicU64,
}

impl ClientContext for SourceContext {}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let lost = consumer.assignment_lost();
                tracing::info!(partitions = tpl.count(), lost, "partitions revoked");
                release(consumer, self.downstream.as_ref(), tpl, lost);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::error!(error = %e, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => tracing::debug!(partitions = offsets.count(), "offsets committed"),
            // Not fatal: a later commit covers these offsets, and until then a
            // restart replays a little more (the offset guard skips it).
            Err(e) => {
                tracing::warn!(error = %e, offsets = %positions(offsets), "offset commit failed")
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        if let Rebalance::Assign(tpl) = rebalance {
            let resume = match consumer.committed_offsets((*tpl).clone(), COMMITTED_TIMEOUT) {
                Ok(committed) => positions(&committed),
                Err(e) => format!("unknown ({e})"),
            };
            tracing::info!(partitions = tpl.count(), %resume, "partitions assigned");
            for e in tpl.elements() {
                if let Err(err) = self.downstream.assigned(e.topic(), e.partition()) {
                    let why = format!(
                        "cannot take partition {}/{}: {err:#}",
                        e.topic(),
                        e.partition()
                    );
                    *self.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                }
            }
        }
    }
}

/// Gives up `partitions`: the runtime flushes what they fed (unless `lost`)
/// and forgets them, then the flushed offsets are committed synchronously, so
/// the next owner resumes exactly after what is stored.
fn release<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    downstream: &dyn Downstream,
    partitions: &TopicPartitionList,
    lost: bool,
) {
    let mut commits = TopicPartitionList::new();
    for e in partitions.elements() {
        if let Some(next) = downstream.revoked(e.topic(), e.partition(), lost) {
            let _ = commits.add_partition_offset(e.topic(), e.partition(), Offset::Offset(next));
        }
    }
    if commits.count() > 0 {
        if let Err(e) = consumer.commit(&commits, CommitMode::Sync) {
            tracing::warn!(error = %e, "commit on release failed; the next owner replays from the previous commit");
        }
    }
}

/// `text` as a literal inside a librdkafka (POSIX extended) regex.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `topic[partition]@offset ...`, for logs.
fn positions(tpl: &TopicPartitionList) -> String {
    let mut out = String::new();
    for e in tpl.elements() {
        let at = match e.offset() {
            Offset::Offset(o) => o.to_string(),
            other => format!("{other:?}"),
        };
        out.push_str(&format!("{}[{}]@{at} ", e.topic(), e.partition()));
    }
    out.trim_end().to_owned()
}

pub struct KafkaSource {
    consumer: BaseConsumer<SourceContext>,
    downstream: Arc<dyn Downstream>,
    commits: Receiver<CommitRequest>,
    batch_max_records: usize,
}

/// How long a poll gathers records before handing them on.
const LINGER: Duration = Duration::from_millis(20);
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// How long an assignment waits to learn the committed offsets (for the log).
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(5);

impl KafkaSource {
    /// Creates the consumer and subscribes to the captured tables' topics.
    pub fn new(
        config: &KafkaConfig,
        downstream: Arc<dyn Downstream>,
        commits: Receiver<CommitRequest>,
    ) -> anyhow::Result<KafkaSource> {
        let context = SourceContext {
            downstream: downstream.clone(),
            fatal: Mutex::new(None),
            generation: AtomicU64::new(0),
        };
        let session_ms = config.session_timeout.as_millis();
        let consumer: BaseConsumer<SourceContext> = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", session_ms.to_string())
            .set(
                "heartbeat.interval.ms",
                (session_ms / 3).max(100).to_string(),
            )
            // Some brokers hold a fetch for the whole wait even when data is ready.
            .set("fetch.wait.max.ms", "50")
            .create_with_context(context)
            .context("creating the Kafka consumer (setting ETL_KAFKA_BROKERS)")?;
        // Every table topic of the prefix, not just the captured four: a table
        // added to the connector then shows up as counted, logged records
        // rather than going unseen.
        let pattern = format!(r"^{}\.public\..+", regex_escape(&config.topic_prefix));
        consumer
            .subscribe(&[&pattern])
            .context("subscribing to the table topics")?;
        tracing::info!(brokers = %config.brokers, group = %config.group_id, %pattern, "subscribed");
        Ok(KafkaSource {
            consumer,
            downstream,
            commits,
            batch_max_records: config.batch_max_records,
        })
    }

    /// Polls until `stop` is set or something fatal happens; then gives up
    /// every partition the clean way (flush, commit) and leaves the group.
    pub fn run(self, stop: &AtomicBool) -> anyhow::Result<()> {
        let result = self.poll_until(stop);
        self.leave();
        result
    }

    fn poll_until(&self, stop: &AtomicBool) -> anyhow::Result<()> {
        let mut topics: HashMap<String, Arc<str>> = HashMap::new();
        while !stop.load(Ordering::Relaxed) {
            self.commit_requested();
            let batches = self.poll_batches(&mut topics);
            if let Some(why) = self
                .consumer
                .context()
                .fatal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                anyhow::bail!(why);
            }
            for batch in batches {
                self.downstream.deliver(batch)?;
            }
        }
        Ok(())
    }

    /// One poll's worth of records, cut into per-partition batches in order.
    fn poll_batches(&self, topics: &mut HashMap<String, Arc<str>>) -> Vec<RecordBatch> {
        let generation = &self.consumer.context().generation;
        let mut assignment = generation.load(Ordering::Relaxed);
        let mut batches: Vec<RecordBatch> = Vec::new();
        let mut total = 0usize;
        let started = Instant::now();
        let mut timeout = POLL_TIMEOUT;
        while total < self.batch_max_records && started.elapsed() < LINGER + POLL_TIMEOUT {
            let polled = self.consumer.poll(timeout);
            if generation.load(Ordering::Relaxed) != assignment {
                // A rebalance ran inside that poll. What was gathered so far
                // belongs to the old assignment; whoever owns those partitions
                // now (this process too) fetches them again from the commit.
                batches.clear();
                total = 0;
                assignment = generation.load(Ordering::Relaxed);
            }
            let message = match polled {
                None => break,
                Some(Err(KafkaError::PartitionEOF(_))) => continue,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                Some(Ok(m)) => m,
            };
            // After the first record, gather only what is already there.
            timeout = LINGER
                .saturating_sub(started.elapsed())
                .min(Duration::from_millis(5));
            let topic = match topics.get(message.topic()) {
                Some(t) => t.clone(),
                None => {
                    let t: Arc<str> = Arc::from(message.topic());
                    topics.insert(message.topic().to_owned(), t.clone());
                    t
                }
            };
            let record = Record {
                offset: message.offset(),
                value: message.payload().map(Bytes::copy_from_slice),
            };
            total += 1;
            let partition = message.partition();
            match batches
                .iter_mut()
                .find(|b| b.partition == partition && b.topic == topic)
            {
                Some(batch) => batch.records.push(record),
                None => batches.push(RecordBatch {
                    topic,
                    partition,
                    records: vec![record],
                }),
            }
        }
        batches
    }

    /// Commits what the aggregators have flushed (latest offset per partition).
    fn commit_requested(&self) {
        let mut latest: HashMap<(String, i32), i64> = HashMap::new();
        for request in self.commits.try_iter() {
            let next = latest
                .entry((request.topic, request.partition))
                .or_insert(0);
            *next = (*next).max(request.next_offset);
        }
        if latest.is_empty() {
            return;
        }
        // A request can arrive after its partition was revoked (and committed
        // on revoke); committing it then would only move the offset back.
        if let Ok(assignment) = self.consumer.assignment() {
            let owned: HashSet<(String, i32)> = assignment
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect();
            latest.retain(|key, _| owned.contains(key));
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in &latest {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(error = %e, "commit failed; it is retried with the next flush");
        }
    }

    fn leave(self) {
        // Queued flush commits first: the release commit below is newer.
        self.commit_requested();
        match self.consumer.assignment() {
            Ok(assignment) => release(&self.consumer, self.downstream.as_ref(), &assignment, false),
            Err(e) => tracing::warn!(error = %e, "cannot read the assignment at shutdown"),
        }
        self.consumer.unsubscribe();
        tracing::info!("left the consumer group");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_topic_prefix_is_matched_literally() {
        assert_eq!(super::regex_escape("online_store"), "online_store");
        assert_eq!(super::regex_escape("shop.eu-1"), r"shop\.eu-1");
    }
}
