//! `etl-processor replay FILE`: Debezium events from a JSON-lines file through
//! the same decoder and aggregates the pipeline runs, without any service.

use std::io::BufRead;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::aggregate::{
    Aggregate, AggregateState, CustomersByMinute, OrdersByMinute, ProductSales, Products,
};
use crate::cdc::{self, Decoded, Table, TableChange};
use crate::telemetry;

/// The state of every aggregate, fed from one stream of events.
#[derive(Default)]
pub struct AllAggregates {
    pub orders_by_minute: AggregateState<OrdersByMinute>,
    pub product_sales: AggregateState<ProductSales>,
    pub customers_by_minute: AggregateState<CustomersByMinute>,
    pub products: AggregateState<Products>,
}

impl AllAggregates {
    pub fn apply(&mut self, partition: i32, offset: i64, change: &TableChange) {
        let _applied = match change {
            TableChange::Order(_) => self.orders_by_minute.apply(partition, offset, change),
            TableChange::OrderItem(_) => self.product_sales.apply(partition, offset, change),
            TableChange::Customer(_) => self.customers_by_minute.apply(partition, offset, change),
            TableChange::Product(_) => self.products.apply(partition, offset, change),
        };
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
}

/// Replays every line of `input`. `topic_prefix` is Debezium's topic.prefix.
/// Undecodable events stop the replay with the line number and the reason:
/// a replay is a check, so a bad capture must not pass as a good one.
pub fn replay(
    input: impl BufRead,
    topic_prefix: &str,
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
        match cdc::decode(table, value) {
            Ok(Decoded::Change(change)) => {
                all.apply(0, index as i64, &change);
                summary.changes += 1;
            }
            Ok(Decoded::Tombstone) => summary.tombstones += 1,
            Ok(Decoded::Truncate) => {
                telemetry::truncate(table);
                summary.truncates += 1;
            }
            Err(e) => bail!("line {number} ({}): {e}", record.topic),
        }
    }
    Ok((all, summary))
}
