//! `etl-processor rebuild`: every aggregate counted again from the newest
//! snapshot in the topics, into shadow tables, which then replace the live
//! ones, each at once. Dashboards read a table's old numbers until the swap
//! and its new ones after it, never a table half built.
//!
//! The processor must not run meanwhile (it stops by itself, exit code 5, on
//! the new snapshot a rebuild usually follows). After the swap, the
//! processor's group is committed at the offsets the rebuild read to, so it
//! goes on from there; a processor that starts from older offsets is safe
//! too, since events before a partition's snapshot count as replays.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::aggregate::{AggregateState, SourceMark};
use crate::cdc::{Position, SnapshotId, Table};
use crate::config::Config;
use crate::registry::{each_aggregate, AllAggregates, EachAggregate, EachState, InTurn};
use crate::replay::ReplaySummary;
use crate::sink::{ClickHouseSink, SinkTable};
use crate::source::kafka::consumer_config;

/// How long the broker may take to answer a metadata or watermark request.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long reading may go without a record while partitions are still
/// short of their end: past it, the rebuild gives up.
const STALLED: Duration = Duration::from_secs(60);
/// Rows per INSERT into the shadow tables.
const INSERT_ROWS: usize = 100_000;

/// One partition the rebuild read: from `start` (the log's first offset)
/// up to `end` (the offset after the last record read, at least its end
/// when the rebuild began): where the processor goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub table: Table,
    pub topic: String,
    pub partition: i32,
    pub start: i64,
    pub end: i64,
}

/// What a rebuild did.
#[derive(Debug)]
pub struct Rebuilt {
    pub spans: Vec<Span>,
    pub summary: ReplaySummary,
    /// Rows written per aggregate, in the order they were swapped in.
    pub rows: Vec<(&'static str, usize)>,
    /// The snapshot the rebuilt rows start from.
    pub snapshot: SnapshotId,
    pub read_in: Duration,
    pub total: Duration,
}

/// `etl-processor rebuild`: rebuilds, swaps, and prints what it did.
pub fn command(config: &Config) -> anyhow::Result<ExitCode> {
    for line in rebuild(config)?.report(config) {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

impl Rebuilt {
    /// What the rebuild did, in lines for a person.
    pub fn report(&self, config: &Config) -> Vec<String> {
        let events: i64 = self.spans.iter().map(|s| s.end - s.start).sum();
        let mut lines = vec![format!(
            "rebuild: read {events} events from {} partitions in {:.1} s ({} changes, {} sent again and skipped, {} partitions replaced by a newer snapshot, {} dead letters left out)",
            self.spans.len(),
            self.read_in.as_secs_f64(),
            self.summary.changes,
            self.summary.repeats,
            self.summary.snapshots_replaced,
            self.summary.dead_lettered(),
        )];
        for (aggregate, rows) in &self.rows {
            lines.push(format!("rebuild: {aggregate}: {rows} rows"));
        }
        lines.push(format!(
            "rebuild: swapped in, counted from {}, in {:.1} s; the replaced tables are in database {}",
            self.snapshot,
            self.total.as_secs_f64(),
            replaced_database(config)
        ));
        lines
    }
}

/// The database the shadow tables are built in.
pub fn shadow_database(config: &Config) -> String {
    format!("{}_rebuild", config.clickhouse.database)
}

/// The database the replaced tables are kept in, until the next rebuild.
pub fn replaced_database(config: &Config) -> String {
    format!("{}_replaced", config.clickhouse.database)
}

/// Reads every partition of the table topics to its current end, counts
/// from the newest snapshot (reading on, up to `ETL_REBUILD_SNAPSHOT_WAIT_MS`,
/// while that snapshot has not finished), writes the shadow tables, swaps
/// them in and commits the processor's group at the ends read.
pub fn rebuild(config: &Config) -> anyhow::Result<Rebuilt> {
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let sink = runtime
        .block_on(ClickHouseSink::connect(&config.clickhouse))
        .context("connecting to ClickHouse (setting ETL_CLICKHOUSE_URL)")?;
    let mut reader = Reader::new(config)?;
    let partitions = reader.partitions();
    let live = &config.clickhouse.database;
    let stored_before = runtime.block_on(stored_ends(&sink, live, &partitions))?;
    reader.read_to_ends()?;
    while let Some(newest) = unfinished(&reader.all) {
        if started.elapsed() > config.rebuild_snapshot_wait {
            bail!(
                "rebuilding: the newest snapshot ({newest}) may not have finished: no change was \
                 streamed after it within {:?} (setting ETL_REBUILD_SNAPSHOT_WAIT_MS). Once the \
                 connector streams (after any change to a captured table), run the rebuild again",
                config.rebuild_snapshot_wait
            );
        }
        tracing::info!(%newest, "waiting for the newest snapshot to finish: reading on");
        std::thread::sleep(SNAPSHOT_POLL);
        reader.extend_ends()?;
        reader.read_to_ends()?;
    }
    // The snapshot's last rows of one partition may reach the broker just
    // after the first streamed change of another: read what came meanwhile.
    reader.extend_ends()?;
    reader.read_to_ends()?;
    let read_in = started.elapsed();
    let Reader {
        all,
        summary,
        spans,
        ..
    } = reader;
    let snapshot = check(&all, &spans)?;

    let rows = runtime.block_on(async {
        let shadow = shadow_database(config);
        sink.create_analytics_db(&shadow)
            .await
            .with_context(|| format!("creating the shadow tables in database {shadow}"))?;
        let shadow_sink = sink.in_database(&shadow);
        let rows = write_every(&shadow_sink, &all).await?;
        // A processor running meanwhile would write its old state into the
        // rebuilt tables at its next flush: refuse while one is seen writing.
        if stored_ends(&sink, live, &partitions).await? != stored_before {
            bail!(
                "rebuilding: the live tables of database {} changed while the rebuild read: a \
                 processor is running. Stop it, then run the rebuild again (the live tables are \
                 as it left them)",
                config.clickhouse.database
            );
        }
        sink.swap_in(
            &config.clickhouse.database,
            &shadow,
            &replaced_database(config),
        )
        .await
        .context("swapping the rebuilt tables in")?;
        anyhow::Ok(rows)
    })?;
    commit_ends(config, &spans).context(
        "the rebuilt tables are in, but committing the processor's group at the offsets the \
         rebuild read to failed: run the rebuild again before starting the processor",
    )?;
    Ok(Rebuilt {
        spans,
        summary,
        rows,
        snapshot,
        read_in,
        total: started.elapsed(),
    })
}

/// How often a rebuild looks for more records while the newest snapshot
/// has not finished.
const SNAPSHOT_POLL: Duration = Duration::from_secs(1);

/// The table topics, read through the decoder into a rebuilding state.
struct Reader {
    consumer: BaseConsumer,
    prefix: String,
    /// Each partition from its first offset to the record after the last
    /// one read.
    spans: Vec<Span>,
    at: HashMap<(String, i32), usize>,
    /// The partitions not read to the end they must reach yet.
    left: HashMap<(String, i32), i64>,
    all: AllAggregates,
    summary: ReplaySummary,
}

impl Reader {
    /// Assigns every partition of the table topics from its first offset,
    /// to be read to its end now.
    fn new(config: &Config) -> anyhow::Result<Reader> {
        let mut client = consumer_config(&config.kafka);
        // Its own group, which never commits: the processor's is left
        // alone. No statistics: nothing here reads them.
        client
            .set("group.id", format!("{}-rebuild", config.kafka.group_id))
            .set("statistics.interval.ms", "0");
        let consumer: BaseConsumer = client
            .create()
            .context("creating a Kafka consumer (setting ETL_KAFKA_BROKERS)")?;
        let prefix = config.kafka.topic_prefix.clone();
        let mut spans = spans(&consumer, &prefix)?;
        let mut assignment = TopicPartitionList::new();
        for span in &spans {
            let from = Offset::Offset(span.start);
            assignment.add_partition_offset(&span.topic, span.partition, from)?;
        }
        consumer.assign(&assignment)?;
        let key = |s: &Span| (s.topic.clone(), s.partition);
        let left = spans
            .iter()
            .filter(|s| s.end > s.start)
            .map(|s| (key(s), s.end))
            .collect();
        // Nothing read yet: a span grows with each record read.
        for span in &mut spans {
            span.end = span.start;
        }
        Ok(Reader {
            at: spans.iter().enumerate().map(|(i, s)| (key(s), i)).collect(),
            left,
            consumer,
            prefix,
            spans,
            all: AllAggregates::rebuilding(),
            summary: ReplaySummary::default(),
        })
    }

    /// Partitions whose consumer position is past their end though their
    /// last record came before it: the log ends in a record no consumer
    /// gets (a transaction's commit marker, when Kafka Connect's
    /// exactly-once source support is on).
    fn reached_by_position(&mut self) -> anyhow::Result<()> {
        let positions = self.consumer.position()?;
        for e in positions.elements() {
            let key = (e.topic().to_owned(), e.partition());
            let (Some(&end), Offset::Offset(at)) = (self.left.get(&key), e.offset()) else {
                continue;
            };
            if at >= end {
                let span = &mut self.spans[self.at[&key]];
                span.end = span.end.max(at);
                self.left.remove(&key);
            }
        }
        Ok(())
    }

    /// The partition numbers read, of any topic.
    fn partitions(&self) -> Vec<i32> {
        let mut partitions: Vec<i32> = self.spans.iter().map(|s| s.partition).collect();
        partitions.sort_unstable();
        partitions.dedup();
        partitions
    }

    /// Every partition must now be read to where its log ends now.
    fn extend_ends(&mut self) -> anyhow::Result<()> {
        for span in &self.spans {
            let (_, end) = self
                .consumer
                .fetch_watermarks(&span.topic, span.partition, BROKER_TIMEOUT)
                .with_context(|| {
                    format!(
                        "reading the end of {} partition {}",
                        span.topic, span.partition
                    )
                })?;
            if end > span.end {
                self.left.insert((span.topic.clone(), span.partition), end);
            }
        }
        Ok(())
    }

    /// Reads until every partition reached its end. A record past it is
    /// read too (the span grows): every record read is counted, so the
    /// spans' ends are where the processor goes on.
    fn read_to_ends(&mut self) -> anyhow::Result<()> {
        let mut last_record = Instant::now();
        while !self.left.is_empty() {
            let Some(message) = self.consumer.poll(Duration::from_millis(200)) else {
                self.reached_by_position()?;
                if self.left.is_empty() {
                    break;
                }
                if last_record.elapsed() > STALLED {
                    bail!(
                        "no record for {STALLED:?}, with partitions short of their end (topic, partition: end): {:?}",
                        self.left
                    );
                }
                continue;
            };
            let message = message.context("reading the table topics")?;
            last_record = Instant::now();
            let key = (message.topic().to_owned(), message.partition());
            let table = Table::from_topic(message.topic(), &self.prefix)
                .expect("only table topics are read");
            let at = (message.partition(), message.offset());
            self.all
                .feed(&mut self.summary, table, at, message.payload())
                .with_context(|| format!("{} partition {} offset {}", key.0, at.0, at.1))?;
            let span = &mut self.spans[self.at[&key]];
            span.end = span.end.max(message.offset() + 1);
            if self.left.get(&key).is_some_and(|&end| span.end >= end) {
                self.left.remove(&key);
            }
        }
        Ok(())
    }
}

/// The partitions of every table topic, with their first offset and their
/// current end. A table whose topic does not exist yet has had no event.
fn spans(consumer: &BaseConsumer, prefix: &str) -> anyhow::Result<Vec<Span>> {
    let mut spans = Vec::new();
    for table in Table::ALL {
        let topic = table.topic(prefix);
        let metadata = consumer
            .fetch_metadata(Some(&topic), BROKER_TIMEOUT)
            .with_context(|| format!("reading the metadata of topic {topic}"))?;
        let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
            continue;
        };
        if found.error().is_some() || found.partitions().is_empty() {
            tracing::warn!(%topic, "no such topic: the table has had no event");
            continue;
        }
        for partition in found.partitions() {
            let (start, end) = consumer
                .fetch_watermarks(&topic, partition.id(), BROKER_TIMEOUT)
                .with_context(|| {
                    format!(
                        "reading the offsets of {topic} partition {}",
                        partition.id()
                    )
                })?;
            spans.push(Span {
                table,
                topic: topic.clone(),
                partition: partition.id(),
                start,
                end,
            });
        }
    }
    Ok(spans)
}

/// The newest snapshot, if no change was streamed after it yet: Debezium
/// streams once its whole snapshot is done, so a change after the
/// snapshot's rows, in any partition, says it finished.
fn unfinished(all: &AllAggregates) -> Option<SnapshotId> {
    let newest = all.newest_snapshot();
    let finished = newest == SnapshotId::default()
        || marks(all)
            .iter()
            .any(|(_, _, mark)| mark.snapshot == newest && mark.position != Position::default());
    (!finished).then_some(newest)
}

/// What the rows were counted from must be whole: every partition reached
/// the newest snapshot, and no partition's log lost its start to
/// retention. Returns that snapshot.
fn check(all: &AllAggregates, spans: &[Span]) -> anyhow::Result<SnapshotId> {
    all.rebuilt()
        .context("rebuilding: a partition cannot be counted from the newest snapshot")?;
    let marks = marks(all);
    for span in spans.iter().filter(|s| s.start > 0 && s.end > s.start) {
        let mark = marks
            .iter()
            .find(|(t, p, _)| *t == span.table && *p == span.partition)
            .map(|(_, _, mark)| mark);
        let whole = mark.is_some_and(|m| m.snapshot_offset > span.start);
        if !whole {
            bail!(
                "rebuilding: {} partition {} starts at offset {}, not 0, and nothing before the \
                 newest snapshot's first row is left in it: retention may have deleted rows of \
                 that snapshot. Take a new snapshot, then rebuild",
                span.topic,
                span.partition,
                span.start
            );
        }
    }
    Ok(all.newest_snapshot())
}

/// The mark of every partition of every source table the aggregates hold
/// rows or events of.
fn marks(all: &AllAggregates) -> Vec<(Table, i32, SourceMark)> {
    struct Marks(Vec<(Table, i32, SourceMark)>);
    impl EachState<'_> for Marks {
        fn visit<A: SinkTable>(&mut self, state: &AggregateState<A>) {
            let marks = state
                .watermarks()
                .map(|(p, _)| (A::SOURCE, p, state.mark(p)));
            self.0.extend(marks);
        }
    }
    let mut marks = Marks(Vec::new());
    all.each_state(&mut marks);
    marks.0
}

/// The highest offset each live table stores from each of `partitions`
/// (nothing for a table that does not exist yet): a processor that writes
/// moves them.
async fn stored_ends(
    sink: &ClickHouseSink,
    database: &str,
    partitions: &[i32],
) -> anyhow::Result<Vec<Vec<(i32, i64)>>> {
    struct Ends<'a> {
        sink: &'a ClickHouseSink,
        present: &'a [String],
        partitions: &'a [i32],
        ends: InTurn<'a, Vec<(i32, i64)>>,
    }
    impl EachAggregate for Ends<'_> {
        fn visit<A: SinkTable>(&mut self) {
            let end = stored_end::<A>(self.sink, self.present, self.partitions);
            self.ends.0.push(Box::pin(end));
        }
    }
    let present = sink.tables(database).await?;
    let mut ends = Ends {
        sink,
        present: &present,
        partitions,
        ends: InTurn(Vec::new()),
    };
    each_aggregate(&mut ends);
    ends.ends.all().await
}

async fn stored_end<A: SinkTable>(
    sink: &ClickHouseSink,
    present: &[String],
    partitions: &[i32],
) -> anyhow::Result<Vec<(i32, i64)>> {
    if !present.iter().any(|t| t == A::NAME) {
        return Ok(Vec::new());
    }
    let mut ends = sink.highest_offsets::<A>(partitions).await?;
    ends.sort_unstable();
    Ok(ends)
}

/// Writes every aggregate's rows into `sink`'s tables ([`write_all`]), one
/// table after another.
async fn write_every(
    sink: &ClickHouseSink,
    all: &AllAggregates,
) -> anyhow::Result<Vec<(&'static str, usize)>> {
    struct Writes<'a>(&'a ClickHouseSink, InTurn<'a, (&'static str, usize)>);
    impl<'a> EachState<'a> for Writes<'a> {
        fn visit<A: SinkTable>(&mut self, state: &'a AggregateState<A>) {
            self.1 .0.push(Box::pin(write_all(self.0, state)));
        }
    }
    let mut writes = Writes(sink, InTurn(Vec::new()));
    all.each_state(&mut writes);
    writes.1.all().await
}

/// Writes every row of `state` into `sink`'s table for it, and checks that
/// the table then holds exactly those rows.
async fn write_all<A: SinkTable>(
    sink: &ClickHouseSink,
    state: &AggregateState<A>,
) -> anyhow::Result<(&'static str, usize)> {
    let rows = state.dirty_rows();
    for chunk in rows.chunks(INSERT_ROWS) {
        sink.write::<A>(chunk, &[])
            .await
            .with_context(|| format!("writing the rebuilt {}", A::NAME))?;
    }
    // The marks last, as a flush writes them: after every row they cover.
    sink.write::<A>(&[], &state.partition_marks())
        .await
        .with_context(|| format!("writing the rebuilt {}'s marks", A::NAME))?;
    let stored = sink.count_rows(A::NAME).await?;
    if stored != rows.len() as u64 {
        bail!(
            "rebuilding: the shadow {} holds {stored} rows after {} were written",
            A::NAME,
            rows.len()
        );
    }
    Ok((A::NAME, rows.len()))
}

/// Commits the processor's group at the end of every partition read. A
/// broker refuses a commit from outside the group while it has members, so
/// it is tried until a processor that ended without leaving (the one that
/// found the source started over, say) has timed out of the group.
fn commit_ends(config: &Config, spans: &[Span]) -> anyhow::Result<()> {
    let consumer: BaseConsumer = consumer_config(&config.kafka)
        .set("statistics.interval.ms", "0")
        .create()?;
    let mut offsets = TopicPartitionList::new();
    for span in spans {
        offsets.add_partition_offset(&span.topic, span.partition, Offset::Offset(span.end))?;
    }
    let deadline = Instant::now() + config.kafka.session_timeout * 2;
    loop {
        match consumer.commit(&offsets, CommitMode::Sync) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, group = %config.kafka.group_id, "committing the rebuild's offsets for the processor's group: trying again");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::cdc::{Change, Customer, Op, Origin, TableChange};

    fn customer(op: Op, id: i64) -> TableChange {
        TableChange::Customer(Change {
            op,
            before: None,
            after: Some(Customer {
                id,
                created_at: Utc.timestamp_opt(1_706_778_000, 0).unwrap(),
            }),
        })
    }

    const SNAPSHOT: Origin = Origin::Snapshot(SnapshotId {
        lsn: 100,
        started_ms: 1,
    });

    fn span(start: i64, end: i64) -> Span {
        Span {
            table: Table::Customers,
            topic: "store.public.customers".into(),
            partition: 0,
            start,
            end,
        }
    }

    #[test]
    fn a_snapshot_with_no_change_streamed_after_it_may_be_unfinished() {
        let newest = SnapshotId {
            lsn: 100,
            started_ms: 1,
        };
        let mut all = AllAggregates::rebuilding();
        assert_eq!(unfinished(&all), None, "no snapshot at all");
        all.apply(0, 0, SNAPSHOT, &customer(Op::Read, 1)).unwrap();
        assert_eq!(unfinished(&all), Some(newest));

        let after = Origin::Stream(Position {
            commit: 0,
            lsn: 120,
        });
        all.apply(0, 1, after, &customer(Op::Create, 2)).unwrap();
        assert_eq!(unfinished(&all), None);
        assert_eq!(check(&all, &[span(0, 2)]).unwrap(), newest);
    }

    #[test]
    fn a_log_trimmed_up_to_the_snapshot_may_have_lost_its_first_rows() {
        let mut all = AllAggregates::rebuilding();
        let older = Origin::Stream(Position {
            commit: 40,
            lsn: 50,
        });
        all.apply(0, 7, older, &customer(Op::Create, 9)).unwrap();
        all.apply(0, 8, SNAPSHOT, &customer(Op::Read, 1)).unwrap();
        let after = Origin::Stream(Position {
            commit: 0,
            lsn: 120,
        });
        all.apply(0, 9, after, &customer(Op::Create, 2)).unwrap();
        // Something before the snapshot's first row is left: it is whole.
        check(&all, &[span(7, 10)]).unwrap();

        let mut trimmed = AllAggregates::rebuilding();
        trimmed
            .apply(0, 8, SNAPSHOT, &customer(Op::Read, 1))
            .unwrap();
        trimmed
            .apply(0, 9, after, &customer(Op::Create, 2))
            .unwrap();
        let refused = check(&trimmed, &[span(8, 10)]).unwrap_err();
        assert!(format!("{refused:#}").contains("retention"), "{refused:#}");
    }
}
