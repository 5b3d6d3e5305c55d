//! `etl-processor replay FILE`: Debezium events from a JSON-lines file through
//! the same decoder and aggregates the pipeline runs, without any service,
//! and with its policy for events that do not decode: left out, reported as
//! dead letters, and the replay goes on.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::aggregate::{Aggregate, CustomersByMinute, OrdersByMinute, ProductSales, Unplaceable};
use crate::cdc::{self, DecodeError, Decoded, Table};
pub use crate::registry::AllAggregates;
use crate::telemetry;

impl AllAggregates {
    /// Decodes one event of `table` and applies it, counting what it was in
    /// `summary`. An event that does not decode is returned, for the caller
    /// to report as the pipeline's dead letter; one that cannot be placed
    /// in its partition's history is an error.
    pub fn feed(
        &mut self,
        summary: &mut ReplaySummary,
        table: Table,
        (partition, offset): (i32, i64),
        value: Option<&[u8]>,
    ) -> Result<Option<DecodeError>, Unplaceable> {
        match cdc::decode(table, value) {
            Ok(Decoded::Change(change, origin)) => {
                let applied = self.apply(partition, offset, origin, &change)?;
                summary.changes += 1;
                summary.repeats += u64::from(applied.redelivered);
                summary.snapshots_replaced += u64::from(applied.new_snapshot);
            }
            Ok(Decoded::Tombstone) => summary.tombstones += 1,
            Ok(Decoded::Truncate) => {
                telemetry::truncate(table);
                summary.truncates += 1;
            }
            Err(e) => {
                *summary.dead_letters.entry(e.kind.as_str()).or_default() += 1;
                return Ok(Some(e));
            }
        }
        Ok(None)
    }

    /// The report lines: aggregates in name order, keys ascending, rows whose
    /// counts are all zero left out.
    pub fn report(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (minute, v) in self.customers_by_minute.totals() {
            lines.push(line(&CustomersLine {
                aggregate: CustomersByMinute::NAME,
                minute: minute.to_string(),
                customers: v.customers,
            }));
        }
        for ((minute, status), v) in self.orders_by_minute.totals() {
            lines.push(line(&OrdersLine {
                aggregate: OrdersByMinute::NAME,
                minute: minute.to_string(),
                status,
                orders: v.orders,
                revenue: money(v.revenue),
            }));
        }
        for (product_id, v) in self.product_sales.totals() {
            lines.push(line(&SalesLine {
                aggregate: ProductSales::NAME,
                product_id,
                units: v.units,
                revenue: money(v.revenue),
                lines: v.lines,
            }));
        }
        lines
    }
}

/// Money as the contract prints it: exactly two decimals.
pub fn money(d: rust_decimal::Decimal) -> String {
    format!("{:.2}", d)
}

fn line(row: &impl Serialize) -> String {
    serde_json::to_string(row).expect("report rows serialize")
}

// Field order here is the output's field order.
#[derive(Serialize)]
struct CustomersLine {
    aggregate: &'static str,
    minute: String,
    customers: i64,
}

#[derive(Serialize)]
struct OrdersLine {
    aggregate: &'static str,
    minute: String,
    status: String,
    orders: i64,
    revenue: String,
}

#[derive(Serialize)]
struct SalesLine {
    aggregate: &'static str,
    product_id: i64,
    units: i64,
    revenue: String,
    lines: i64,
}

/// One captured record: `{"topic": "...", "key": <json or null>, "value": <json or null>}`.
#[derive(Deserialize)]
struct CapturedRecord<'a> {
    topic: String,
    #[serde(borrow, default)]
    value: Option<&'a RawValue>,
}

/// What a replay saw besides the changes it applied.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    pub changes: u64,
    pub tombstones: u64,
    pub truncates: u64,
    pub other_topics: u64,
    /// Changes the source sent again (a position already applied): left
    /// out, as the pipeline leaves them out.
    pub repeats: u64,
    /// Partitions whose rows a newer snapshot replaced.
    pub snapshots_replaced: u64,
    /// Events the pipeline would send to the dead-letter topic, by reason.
    pub dead_letters: BTreeMap<&'static str, u64>,
}

impl ReplaySummary {
    pub fn dead_lettered(&self) -> u64 {
        self.dead_letters.values().sum()
    }
}

/// An event that does not decode: the pipeline would send it to the
/// dead-letter topic with this reason and error, and go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// 1-based line of the capture.
    pub line: usize,
    pub topic: String,
    /// The dead letter's `reason` header, e.g. `missing_before`.
    pub reason: &'static str,
    /// Its `error` header (which starts with the reason).
    pub error: String,
}

impl fmt::Display for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {} ({}): dead letter: {}",
            self.line, self.topic, self.error
        )
    }
}

/// Replays every line of `input`. `topic_prefix` is Debezium's topic.prefix.
/// An event that does not decode is handled as the pipeline handles it: it
/// is left out of the aggregates, handed to `dead_letter` and counted, and
/// the replay goes on. A line that is not a captured record at all stops
/// the replay with its number: the file is not a capture.
pub fn replay(
    input: impl BufRead,
    topic_prefix: &str,
    mut dead_letter: impl FnMut(&DeadLetter),
) -> anyhow::Result<(AllAggregates, ReplaySummary)> {
    let mut all = AllAggregates::default();
    let mut summary = ReplaySummary::default();
    for (index, text) in input.lines().enumerate() {
        let number = index + 1;
        let text = text.with_context(|| format!("reading line {number}"))?;
        if text.trim().is_empty() {
            continue;
        }
        let record: CapturedRecord = serde_json::from_str(&text)
            .with_context(|| format!("line {number}: not a {{topic, key, value}} object"))?;
        let Some(table) = Table::from_topic(&record.topic, topic_prefix) else {
            telemetry::unknown_table(&record.topic, 1);
            summary.other_topics += 1;
            continue;
        };
        let value = record.value.map(|v| v.get().as_bytes());
        // One partition per topic, in the file's order: the order the
        // connector delivered them in.
        let undecoded = all
            .feed(&mut summary, table, (0, index as i64), value)
            .with_context(|| format!("line {number}"))?;
        if let Some(e) = undecoded {
            dead_letter(&DeadLetter {
                line: number,
                topic: record.topic,
                reason: e.kind.as_str(),
                error: e.to_string(),
            });
        }
    }
    Ok((all, summary))
}

/// `etl-processor replay FILE`: the aggregates on stdout; each event the
/// pipeline would dead-letter, and then their count by reason, on stderr.
/// Exits 0 when every event was used, 1 when some would be dead letters (the
/// aggregates printed leave them out) or the file is not a capture.
pub fn command(file: &Path, topic_prefix: &str) -> anyhow::Result<ExitCode> {
    let input = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut err = std::io::stderr().lock();
    let (aggregates, summary) = replay(std::io::BufReader::new(input), topic_prefix, |letter| {
        let _ = writeln!(err, "replay: {letter}");
    })?;
    drop(err);
    let mut out = std::io::stdout().lock();
    for line in aggregates.report() {
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    tracing::info!(?summary, "replayed");
    if summary.dead_letters.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let reasons: Vec<String> = summary
        .dead_letters
        .iter()
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    eprintln!(
        "replay: {} events would go to the dead-letter topic ({}); the aggregates leave them out",
        summary.dead_lettered(),
        reasons.join(", ")
    );
    Ok(ExitCode::FAILURE)
}
