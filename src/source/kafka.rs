//! The Kafka source: one consumer-group member on its own thread.
//!
//! It polls, cuts the records into per-partition batches and hands each batch
//! to the runtime, waiting until it is accepted (backpressure). Partition
//! assignment changes go to the runtime from the rebalance hooks, which block
//! until the runtime is ready, at most until the rebalance deadline: on
//! assign, until the partitions' aggregate state is loaded (past the
//! deadline the run ends); on revoke, until it is flushed, and then the
//! flushed offsets are committed before the partitions are given up (past
//! the deadline they are given up as lost). Offsets are only ever committed
//! for events whose effect is already in ClickHouse.

use std::collections::HashSet;
use std::collections::{BTreeMap, HashMap};
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
use crate::telemetry;
use crate::telemetry::traces::TraceHeaders;

/// One Kafka record, copied out of the consumer's buffers.
#[derive(Debug, Clone)]
pub struct Record {
    pub offset: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    /// The W3C trace context the producer attached, if any.
    pub trace: Option<TraceHeaders>,
}

/// Consecutive records of one partition.
#[derive(Debug, Clone)]
pub struct RecordBatch {
    pub topic: Arc<str>,
    pub partition: i32,
    pub records: Vec<Record>,
    /// The poll that gathered it ended with nothing more waiting: the
    /// consumer has caught up, so its changes may be written without
    /// waiting for the flush timer.
    pub caught_up: bool,
}

/// A request to commit: every record of `partition` below `next_offset` has
/// its effect stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRequest {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// A request to replay partitions from their last commit, because an actor
/// that held their unflushed changes was restarted. `partition: None` means
/// every partition of the topic that this process owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewind {
    pub topic: String,
    pub partition: Option<i32>,
}

/// What the source needs from the runtime. Each call blocks until done.
pub trait Downstream: Send + Sync + 'static {
    /// Partitions were assigned, by topic, each with its log's end offset
    /// (`(partition, end)`): get ready for their first batches (all at once:
    /// their state is loaded in one go). It answers within its deadline, or
    /// fails.
    fn assigned(&self, partitions: &BTreeMap<String, Vec<(i32, i64)>>) -> anyhow::Result<()>;
    /// A partition is about to be replayed from its last commit: drop what
    /// is held of it and reload its stored state.
    fn rewound(&self, topic: &str, partition: i32) -> anyhow::Result<()>;
    /// Partitions (topic, partition) are being taken away, all at once.
    /// Unless `lost`, flush what they fed and return the offset to commit for
    /// each partition written in time; forget their state either way. It
    /// answers within its deadline: a partition not released by then counts
    /// as lost (its next owner replays from the last commit).
    fn revoked(&self, partitions: &[(String, i32)], lost: bool) -> Vec<(String, i32, i64)>;
    /// Hand over a batch, without waiting for it to be applied.
    fn deliver(&self, batch: RecordBatch) -> anyhow::Result<()>;
    /// (records handed over and not yet applied, the most there may be).
    fn backlog(&self) -> (usize, usize);
}

pub struct SourceContext {
    downstream: Arc<dyn Downstream>,
    /// An assignment the runtime could not take: the source stops on it.
    fatal: Mutex<Option<anyhow::Error>>,
    /// Bumped by every assignment change, so the poll loop can tell records
    /// gathered under an older assignment.
    generation: AtomicU64,
}

impl ClientContext for SourceContext {
    /// librdkafka's statistics (every STATISTICS_INTERVAL): the lag of each
    /// assigned partition behind its high watermark, from the committed offset.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut lag = Vec::new();
        for (topic, t) in statistics.topics {
            for (partition, p) in t.partitions {
                // -1: not assigned here, or not known yet; partition -1 is librdkafka's own.
                if partition >= 0 && p.consumer_lag >= 0 {
                    lag.push((topic.clone(), partition, p.consumer_lag));
                }
            }
        }
        telemetry::consumer_lag(lag);
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let lost = consumer.assignment_lost();
                tracing::info!(partitions = tpl.count(), lost, "partitions revoked");
                telemetry::revoking(tpl.count());
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
            // Each log's end, so the runtime can tell a log that started over.
            let taken = log_ends_retried(consumer, tpl).and_then(|by_topic| {
                self.downstream
                    .assigned(&by_topic)
                    .context("cannot take the assigned partitions")
            });
            if let Err(err) = taken {
                *self.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
            }
        }
    }
}

/// How long an assignment may keep asking for its logs' ends: a broker that
/// has just restarted can time out the first requests.
const LOG_ENDS_BOUND: Duration = Duration::from_secs(30);

/// [`log_ends`], asked again while it fails, up to [`LOG_ENDS_BOUND`].
fn log_ends_retried(
    consumer: &BaseConsumer<SourceContext>,
    tpl: &TopicPartitionList,
) -> anyhow::Result<BTreeMap<String, Vec<(i32, i64)>>> {
    let started = Instant::now();
    loop {
        match log_ends(consumer, tpl) {
            Err(e) if started.elapsed() < LOG_ENDS_BOUND => {
                tracing::warn!(error = %format!("{e:#}"), "reading the assigned partitions' ends: trying again");
                std::thread::sleep(Duration::from_millis(500));
            }
            done => return done,
        }
    }
}

/// The end offset of every partition in `tpl` (the offset its next record
/// will get), by topic, read in one request for the whole assignment.
fn log_ends(
    consumer: &BaseConsumer<SourceContext>,
    tpl: &TopicPartitionList,
) -> anyhow::Result<BTreeMap<String, Vec<(i32, i64)>>> {
    // An empty assignment (a member the group has nothing for yet, while
    // a departed one still holds its partitions): nothing to ask, and
    // librdkafka refuses an empty request.
    if tpl.count() == 0 {
        return Ok(BTreeMap::new());
    }
    let mut latest = TopicPartitionList::new();
    for e in tpl.elements() {
        // ListOffsets' timestamp -1 (Offset::End) asks for the latest offset.
        latest.add_partition_offset(e.topic(), e.partition(), Offset::End)?;
    }
    let answered = consumer
        .offsets_for_times(latest, COMMITTED_TIMEOUT)
        .context("reading the end offsets of the assigned partitions")?;
    let mut ends: BTreeMap<String, Vec<(i32, i64)>> = BTreeMap::new();
    for e in answered.elements() {
        let (topic, partition) = (e.topic(), e.partition());
        let end = match (e.error(), e.offset()) {
            (Ok(()), Offset::Offset(end)) => end,
            (Err(err), _) => {
                anyhow::bail!("cannot read the end of {topic} partition {partition}: {err}")
            }
            (Ok(()), other) => {
                anyhow::bail!("the end of {topic} partition {partition} came back as {other:?}")
            }
        };
        ends.entry(topic.to_owned())
            .or_default()
            .push((partition, end));
    }
    Ok(ends)
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
    let taken: Vec<(String, i32)> = partitions
        .elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect();
    let mut commits = TopicPartitionList::new();
    for (topic, partition, next) in downstream.revoked(&taken, lost) {
        let _ = commits.add_partition_offset(&topic, partition, Offset::Offset(next));
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

/// The consumer's settings (the benchmarks' bare consumer uses them too).
pub fn consumer_config(config: &KafkaConfig) -> ClientConfig {
    let session_ms = config.session_timeout.as_millis();
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", session_ms.to_string())
        .set(
            "max.poll.interval.ms",
            config.max_poll_interval.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (session_ms / 3).max(100).to_string(),
        )
        // Some brokers hold a fetch for the whole wait even when data is ready.
        .set("fetch.wait.max.ms", "50")
        // Catching up on a backlog, the prefetch queue fills faster than the
        // pipeline drains it; librdkafka then stops fetching for this long
        // (1 s by default), and the pipeline idles once it has drained it.
        .set("fetch.queue.backoff.ms", "20")
        .set(
            "queued.max.messages.kbytes",
            config.prefetch_kbytes.to_string(),
        )
        // The subscription is a pattern: topics Debezium creates after
        // start-up are picked up within seconds, not librdkafka's 5 minutes.
        .set("topic.metadata.refresh.interval.ms", "5000")
        .set(
            "statistics.interval.ms",
            STATISTICS_INTERVAL.as_millis().to_string(),
        );
    client
}

/// The subscription: every table topic of the prefix, not just the captured
/// four, so that a table added to the connector shows up as counted, logged
/// records rather than going unseen.
pub fn topic_pattern(topic_prefix: &str) -> String {
    format!(r"^{}\.public\..+", regex_escape(topic_prefix))
}

pub struct KafkaSource {
    consumer: BaseConsumer<SourceContext>,
    downstream: Arc<dyn Downstream>,
    commits: Receiver<CommitRequest>,
    rewinds: Receiver<Rewind>,
    batch_max_records: usize,
    commit_interval: Duration,
}

/// The poll loop's own state.
#[derive(Default)]
struct LoopState {
    topics: HashMap<String, Arc<str>>,
    /// Flushed offsets not committed yet (latest per partition).
    pending: HashMap<(String, i32), i64>,
    last_commit: Option<Instant>,
    paused: bool,
}

/// How long the poll loop waits for downstream to catch up before it pauses
/// the partitions.
const PAUSE_AFTER: Duration = Duration::from_millis(250);
/// The poll loop reads the clock once per this many records.
const CLOCK_EVERY: usize = 64;
/// How long a poll gathers records before handing them on.
const LINGER: Duration = Duration::from_millis(20);
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// How often librdkafka reports its statistics (consumer lag).
const STATISTICS_INTERVAL: Duration = Duration::from_secs(2);
/// How long an assignment waits to learn the committed offsets (for the log).
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(5);

impl KafkaSource {
    /// Creates the consumer and subscribes to the captured tables' topics.
    pub fn new(
        config: &KafkaConfig,
        downstream: Arc<dyn Downstream>,
        commits: Receiver<CommitRequest>,
        rewinds: Receiver<Rewind>,
    ) -> anyhow::Result<KafkaSource> {
        let context = SourceContext {
            downstream: downstream.clone(),
            fatal: Mutex::new(None),
            generation: AtomicU64::new(0),
        };
        let consumer: BaseConsumer<SourceContext> = consumer_config(config)
            .create_with_context(context)
            .context("creating the Kafka consumer (setting ETL_KAFKA_BROKERS)")?;
        let pattern = topic_pattern(&config.topic_prefix);
        consumer
            .subscribe(&[&pattern])
            .context("subscribing to the table topics")?;
        tracing::info!(brokers = %config.brokers, group = %config.group_id, %pattern, "subscribed");
        Ok(KafkaSource {
            consumer,
            downstream,
            commits,
            rewinds,
            batch_max_records: config.batch_max_records,
            commit_interval: config.commit_interval,
        })
    }

    /// Polls until `stop` is set or something fatal happens; then gives up
    /// every partition the clean way (flush, commit) and leaves the group.
    pub fn run(self, stop: &AtomicBool) -> anyhow::Result<()> {
        let mut state = LoopState::default();
        let result = self.poll_until(stop, &mut state);
        self.leave(&mut state);
        result
    }

    fn poll_until(&self, stop: &AtomicBool, state: &mut LoopState) -> anyhow::Result<()> {
        while !stop.load(Ordering::Relaxed) {
            self.commit_flushed(state, false);
            self.rewind_requested(state)?;
            self.pause_while_backlogged(state);
            let batches = self.poll_batches(&mut state.topics);
            if let Some(why) = self
                .consumer
                .context()
                .fatal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                return Err(why);
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
        let deadline = started + LINGER + POLL_TIMEOUT;
        let mut now = started;
        let mut drained = false;
        while total < self.batch_max_records && now < deadline {
            // After the first record, gather only what is already there, or
            // arrives within the linger. The clock is read when nothing is
            // ready, and every CLOCK_EVERY records, not for each record.
            let mut polled = if total == 0 {
                self.consumer.poll(POLL_TIMEOUT)
            } else {
                self.consumer.poll(Duration::ZERO)
            };
            if polled.is_none() && total > 0 {
                now = Instant::now();
                let wait = LINGER
                    .saturating_sub(now - started)
                    .min(Duration::from_millis(5));
                if !wait.is_zero() {
                    polled = self.consumer.poll(wait);
                }
            }
            if generation.load(Ordering::Relaxed) != assignment {
                // A rebalance ran inside that poll. What was gathered so far
                // belongs to the old assignment; whoever owns those partitions
                // now (this process too) fetches them again from the commit.
                batches.clear();
                total = 0;
                assignment = generation.load(Ordering::Relaxed);
            }
            let message = match polled {
                None => {
                    drained = true;
                    break;
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    now = Instant::now();
                    continue;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                Some(Ok(m)) => m,
            };
            if total % CLOCK_EVERY == 0 {
                now = Instant::now();
            }
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
                key: message.key().map(Bytes::copy_from_slice),
                value: message.payload().map(Bytes::copy_from_slice),
                trace: message.headers().and_then(TraceHeaders::from_kafka),
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
                    caught_up: false,
                }),
            }
        }
        for batch in &mut batches {
            batch.caught_up = drained;
        }
        batches
    }

    /// Pauses every assigned partition while too many records are handed on
    /// and not yet applied (ClickHouse down or slow), and resumes them once
    /// half of those are done. Polling goes on meanwhile, so the group
    /// membership and rebalances are served.
    fn pause_while_backlogged(&self, state: &mut LoopState) {
        let (mut inflight, max) = self.downstream.backlog();
        // Catching up on a backlog, downstream is behind the consumer all
        // the time, a little. Pausing for that would throw away the records
        // librdkafka prefetched and fetch them again; so the poll loop first
        // waits a moment for downstream to take more, and pauses only for a
        // backlog that lasts (ClickHouse down or slow).
        if !state.paused && inflight >= max {
            let waiting = Instant::now();
            while inflight >= max && waiting.elapsed() < PAUSE_AFTER {
                std::thread::sleep(Duration::from_millis(1));
                inflight = self.downstream.backlog().0;
            }
        }
        let pause = inflight >= max || (state.paused && inflight > max / 2);
        // On the poll path: read the assignment only when there is something to do.
        if !pause && !state.paused {
            return;
        }
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        if pause {
            // Again each time: partitions assigned meanwhile start unpaused.
            if let Err(e) = self.consumer.pause(&assignment) {
                tracing::warn!(error = %e, "cannot pause partitions");
            }
            if !state.paused {
                telemetry::paused();
                tracing::warn!(inflight, max, "downstream is behind; partitions paused");
            }
        } else if state.paused {
            if let Err(e) = self.consumer.resume(&assignment) {
                tracing::warn!(error = %e, "cannot resume partitions");
            }
            tracing::info!(inflight, "downstream caught up; partitions resumed");
        }
        state.paused = pause;
    }

    /// Replays partitions whose unflushed changes died with an actor: their
    /// state is reloaded from ClickHouse, then they are read again from the
    /// last commit. A partition that cannot be rewound stops the process
    /// rather than going on with a gap.
    fn rewind_requested(&self, state: &mut LoopState) -> anyhow::Result<()> {
        let requests: Vec<Rewind> = self.rewinds.try_iter().collect();
        if requests.is_empty() {
            return Ok(());
        }
        // Flushed offsets first, so the replay starts as late as it can.
        self.commit_flushed(state, true);
        let assignment = self
            .consumer
            .assignment()
            .context("reading the assignment")?;
        let mut targets = TopicPartitionList::new();
        for e in assignment.elements() {
            if requests
                .iter()
                .any(|r| r.topic == e.topic() && r.partition.is_none_or(|p| p == e.partition()))
                && targets.find_partition(e.topic(), e.partition()).is_none()
            {
                targets.add_partition(e.topic(), e.partition());
            }
        }
        if targets.count() == 0 {
            return Ok(());
        }
        let committed = self
            .consumer
            .committed_offsets(targets, COMMITTED_TIMEOUT)
            .context("reading committed offsets to rewind")?;
        for e in committed.elements() {
            self.downstream.rewound(e.topic(), e.partition())?;
            let from = match e.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            self.consumer
                .seek(e.topic(), e.partition(), from, COMMITTED_TIMEOUT)
                .with_context(|| {
                    format!("rewinding {}/{} to {from:?}", e.topic(), e.partition())
                })?;
            telemetry::rewind(e.topic());
            tracing::warn!(
                topic = e.topic(),
                partition = e.partition(),
                ?from,
                "partition rewound to its last commit"
            );
        }
        Ok(())
    }

    /// Commits what the aggregators have flushed (latest offset per
    /// partition), at most every `commit_interval` unless `now`.
    fn commit_flushed(&self, state: &mut LoopState, now: bool) {
        for request in self.commits.try_iter() {
            let next = state
                .pending
                .entry((request.topic, request.partition))
                .or_insert(0);
            *next = (*next).max(request.next_offset);
        }
        let due = now
            || state
                .last_commit
                .is_none_or(|t| t.elapsed() >= self.commit_interval);
        if state.pending.is_empty() || !due {
            return;
        }
        state.last_commit = Some(Instant::now());
        let mut latest = std::mem::take(&mut state.pending);
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
        let mode = if now {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        if let Err(e) = self.consumer.commit(&tpl, mode) {
            tracing::warn!(error = %e, "commit failed; it is retried with the next flush");
        }
    }

    fn leave(self, state: &mut LoopState) {
        // Queued flush commits first: the release commit below is newer.
        self.commit_flushed(state, true);
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
