//! `etl-tools bench core`: the decode + aggregate core on one thread.
//!
//! Synthetic Debezium messages ([`super::synthetic`]) go through
//!
//! - **ours**: [`cdc::decode_event`] and [`AggregateState::apply`] of the
//!   aggregate of the message's table, with its partition and offset (one
//!   state per aggregate, as the aggregator actors hold them);
//! - **naive** ([`naive`]): what one writes first: `serde_json::Value` for
//!   the whole message, fields read out of it, decimals parsed from their
//!   strings (or base64 with the schema's scale), timestamps with chrono,
//!   the same [`TableChange`] built and applied through the same states.
//!
//! Both end in identical totals (a unit test checks it), so the comparison is
//! of the decoding alone plus the shared aggregation. Messages are generated
//! in chunks between the timed parts (memory stays flat at any event count);
//! only decoding and applying are timed. Everything runs on the calling
//! thread: events per second are events per second per core.
//!
//! [`AggregateState::apply`]: etl::aggregate::AggregateState::apply

use std::hint::black_box;
use std::time::{Duration, Instant};

use super::synthetic::{Generator, Message, Schemas, Spec};
use super::{load_average, median, print_table, thousands, Progress, Verdict};
use etl::aggregate::{AggregateState, ProductSales};
use etl::cdc::{self, Change, Decoded, Op, OrderItem, Origin, Position, TableChange};
use etl::replay::AllAggregates;
use rust_decimal::Decimal;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Messages per measurement (tombstones included).
    #[arg(long, default_value_t = 2_000_000)]
    pub events: u64,
    /// Which encodings to measure.
    #[arg(long, value_enum, default_value_t = Modes::Both)]
    pub schemas: Modes,
    /// Which paths to measure (ours alone, e.g. under a profiler).
    #[arg(long, value_enum, default_value_t = Paths::Both)]
    pub paths: Paths,
    /// Each measurement is repeated this often; best and median are shown.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Distinct product ids in order_items.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Source partitions per table (the states key by partition too).
    #[arg(long, default_value_t = 16)]
    pub partitions: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Modes {
    Off,
    On,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Paths {
    Ours,
    Naive,
    Both,
}

/// A way to decode and aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Ours,
    Naive,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Ours => "ours",
            Path::Naive => "naive",
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    pub events: u64,
    /// Value bytes decoded.
    pub bytes: u64,
    /// Time spent decoding and applying (generation excluded).
    pub busy: Duration,
    /// Time spent generating the messages (not part of the figure).
    pub generating: Duration,
    /// Messages that did not decode (there should be none).
    pub errors: u64,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.busy.as_secs_f64()
    }
}

/// Messages generated per timed chunk.
const CHUNK: usize = 65_536;

/// Decodes and applies every message of `spec` along `path` into fresh
/// aggregate states; returns the measurement and the states.
pub fn measure(spec: &Spec, path: Path) -> (Run, AllAggregates) {
    let mut generator = Generator::new(spec.clone());
    let mut aggregates = AllAggregates::default();
    let mut chunk: Vec<Message> = Vec::with_capacity(CHUNK);
    let mut run = Run::default();
    let mut progress = Progress::new(format!(
        "core {} schemas {}",
        path.name(),
        spec.schemas.as_str()
    ));
    loop {
        let started = Instant::now();
        chunk.clear();
        chunk.extend(generator.by_ref().take(CHUNK));
        run.generating += started.elapsed();
        if chunk.is_empty() {
            break;
        }
        run.bytes += chunk
            .iter()
            .map(|m| m.value.as_ref().map_or(0, Vec::len) as u64)
            .sum::<u64>();
        let started = Instant::now();
        run.errors += match path {
            Path::Ours => ours(&chunk, &mut aggregates),
            Path::Naive => naive::run(&chunk, &mut aggregates),
        };
        run.busy += started.elapsed();
        run.events += chunk.len() as u64;
        progress.tick(run.events);
    }
    black_box(&aggregates);
    (run, aggregates)
}

/// Our path over a chunk; returns the number of messages that did not
/// decode. Not inlined, so that profilers can single it out.
#[inline(never)]
pub fn ours(chunk: &[Message], aggregates: &mut AllAggregates) -> u64 {
    let mut errors = 0;
    for message in chunk {
        match cdc::decode_event(message.table, message.value.as_deref()) {
            Ok(event) => {
                if let Decoded::Change(change, origin) = event.decoded {
                    if aggregates
                        .apply(message.partition, message.offset, origin, &change)
                        .is_err()
                    {
                        errors += 1;
                    }
                }
            }
            Err(_) => errors += 1,
        }
    }
    errors
}

/// The baseline: a straightforward decoder over `serde_json::Value`.
pub mod naive {
    use std::str::FromStr;

    use base64::Engine as _;
    use chrono::{DateTime, TimeZone, Utc};
    use rust_decimal::Decimal;
    use serde_json::Value;

    use crate::bench::synthetic::Message;
    use etl::cdc::{
        Change, Customer, Op, Order, OrderItem, Origin, Position, Product, ProductKey, SnapshotId,
        Table, TableChange,
    };
    use etl::replay::AllAggregates;

    /// Decodes and applies a chunk; returns the messages that did not decode.
    #[inline(never)]
    pub fn run(chunk: &[Message], aggregates: &mut AllAggregates) -> u64 {
        let mut errors = 0;
        for message in chunk {
            match decode(message.table, message.value.as_deref()) {
                Ok(Some((change, origin))) => {
                    if aggregates
                        .apply(message.partition, message.offset, origin, &change)
                        .is_err()
                    {
                        errors += 1;
                    }
                }
                Ok(None) => {}
                Err(_) => errors += 1,
            }
        }
        errors
    }

    /// One message's value; None for a tombstone or a truncate.
    pub fn decode(
        table: Table,
        value: Option<&[u8]>,
    ) -> Result<Option<(TableChange, Origin)>, String> {
        let Some(bytes) = value else {
            return Ok(None);
        };
        let message: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        // Schemas on: {"schema": ..., "payload": envelope}; off: the envelope.
        let (envelope, schema) = match message.get("payload") {
            Some(payload) => (payload, message.get("schema")),
            None => (&message, None),
        };
        if envelope.is_null() {
            return Ok(None);
        }
        let op = match envelope["op"].as_str() {
            Some("c") => Op::Create,
            Some("u") => Op::Update,
            Some("d") => Op::Delete,
            Some("r") => Op::Read,
            Some("t") => return Ok(None),
            other => return Err(format!("unknown op {other:?}")),
        };
        let image = |side: &str| Some(&envelope[side]).filter(|v| !v.is_null());
        let before = match op {
            Op::Update | Op::Delete => Some(image("before").ok_or("no before image")?),
            Op::Create | Op::Read => None,
        };
        let after = match op {
            Op::Delete => None,
            _ => Some(image("after").ok_or("no after image")?),
        };
        let source = &envelope["source"];
        let lsn = source["lsn"].as_u64().ok_or("no source.lsn")?;
        let origin = match op {
            Op::Read => Origin::Snapshot(SnapshotId {
                lsn,
                started_ms: source["ts_ms"].as_i64().ok_or("no source.ts_ms")?,
            }),
            _ => {
                let sequence: Vec<Option<String>> =
                    serde_json::from_str(source["sequence"].as_str().ok_or("no sequence")?)
                        .map_err(|e| e.to_string())?;
                let commit = match sequence.first() {
                    Some(Some(c)) => c.parse().map_err(|_| "bad sequence")?,
                    _ => 0,
                };
                Origin::Stream(Position { commit, lsn })
            }
        };
        let row = Row { schema };
        let change = match table {
            Table::Customers => {
                TableChange::Customer(change(op, before, after, |v| row.customer(v))?)
            }
            // The dimension reads only a delete's key of the old row.
            Table::Products => TableChange::Product(Change {
                op,
                before: match op {
                    Op::Delete => before.map(|v| int(v, "id").map(|id| ProductKey { id })),
                    _ => None,
                }
                .transpose()?,
                after: after.map(|v| row.product(v)).transpose()?,
            }),
            Table::Orders => TableChange::Order(change(op, before, after, |v| row.order(v))?),
            Table::OrderItems => {
                TableChange::OrderItem(change(op, before, after, |v| row.item(v))?)
            }
        };
        Ok(Some((change, origin)))
    }

    fn change<R>(
        op: Op,
        before: Option<&Value>,
        after: Option<&Value>,
        read: impl Fn(&Value) -> Result<R, String>,
    ) -> Result<Change<R>, String> {
        Ok(Change {
            op,
            before: before.map(&read).transpose()?,
            after: after.map(&read).transpose()?,
        })
    }

    /// Reads columns of a row image, with the message's schema if any.
    struct Row<'a> {
        schema: Option<&'a Value>,
    }

    impl Row<'_> {
        fn customer(&self, v: &Value) -> Result<Customer, String> {
            Ok(Customer {
                id: int(v, "id")?,
                created_at: timestamp(v, "created_at")?,
            })
        }

        fn product(&self, v: &Value) -> Result<Product, String> {
            Ok(Product {
                id: int(v, "id")?,
                name: string(v, "name")?,
                category: string(v, "category")?,
                price: self.decimal(v, "price")?,
            })
        }

        fn order(&self, v: &Value) -> Result<Order, String> {
            Ok(Order {
                id: int(v, "id")?,
                status: string(v, "status")?,
                total_amount: self.decimal(v, "total_amount")?,
                created_at: timestamp(v, "created_at")?,
            })
        }

        fn item(&self, v: &Value) -> Result<OrderItem, String> {
            Ok(OrderItem {
                id: int(v, "id")?,
                product_id: int(v, "product_id")?,
                quantity: int(v, "quantity")?,
                unit_price: self.decimal(v, "unit_price")?,
            })
        }

        /// A string ("37.49") or a number; with a Connect Decimal schema, a
        /// base64 unscaled integer whose scale the schema gives.
        fn decimal(&self, v: &Value, column: &str) -> Result<Decimal, String> {
            if let Some(scale) = self.decimal_scale(column) {
                let text = v[column].as_str().ok_or(format!("{column}: not base64"))?;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|e| format!("{column}: {e}"))?;
                let mut unscaled: i128 = if bytes.first().is_some_and(|b| b & 0x80 != 0) {
                    -1
                } else {
                    0
                };
                for b in bytes {
                    unscaled = (unscaled << 8) | i128::from(b);
                }
                return Decimal::try_from_i128_with_scale(unscaled, scale)
                    .map_err(|e| format!("{column}: {e}"));
            }
            match &v[column] {
                Value::String(s) => Decimal::from_str(s).map_err(|e| format!("{column}: {e}")),
                Value::Number(n) => {
                    Decimal::from_str(&n.to_string()).map_err(|e| format!("{column}: {e}"))
                }
                other => Err(format!("{column}: not a decimal: {other}")),
            }
        }

        /// The scale of a Connect Decimal column, from the row's schema.
        fn decimal_scale(&self, column: &str) -> Option<u32> {
            let fields = self.schema?["fields"].as_array()?;
            let row = fields.iter().find(|f| f["field"] == "after")?;
            let field = row["fields"]
                .as_array()?
                .iter()
                .find(|f| f["field"] == column)?;
            if field["name"] != "org.apache.kafka.connect.data.Decimal" {
                return None;
            }
            field["parameters"]["scale"].as_str()?.parse().ok()
        }
    }

    fn int(v: &Value, column: &str) -> Result<i64, String> {
        v[column]
            .as_i64()
            .ok_or_else(|| format!("{column}: not an integer"))
    }

    fn string(v: &Value, column: &str) -> Result<String, String> {
        v[column]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{column}: not a string"))
    }

    /// ISO-8601 (timestamptz) or milliseconds since the epoch.
    fn timestamp(v: &Value, column: &str) -> Result<DateTime<Utc>, String> {
        match &v[column] {
            Value::String(s) => DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| format!("{column}: {e}")),
            Value::Number(n) => n
                .as_i64()
                .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
                .ok_or_else(|| format!("{column}: not a timestamp")),
            other => Err(format!("{column}: not a timestamp: {other}")),
        }
    }
}

/// The figures of one path and encoding.
struct Figures {
    path: Path,
    schemas: Schemas,
    runs: Vec<Run>,
}

impl Figures {
    fn best(&self) -> f64 {
        self.runs.iter().map(Run::rate).fold(0.0, f64::max)
    }

    fn median(&self) -> f64 {
        median(&self.runs.iter().map(Run::rate).collect::<Vec<_>>())
    }
}

/// The goals: events/s per core, and the ratio to the naive baseline.
const GOAL_RATE: f64 = 1_000_000.0;
const GOAL_RATIO: f64 = 2.5;

pub fn run(args: Args) -> anyhow::Result<Vec<Verdict>> {
    anyhow::ensure!(args.repeats >= 1, "--repeats must be at least 1");
    anyhow::ensure!(
        args.partitions >= 1 && args.keys >= 1,
        "--partitions and --keys must be at least 1"
    );
    let modes: &[Schemas] = match args.schemas {
        Modes::Off => &[Schemas::Off],
        Modes::On => &[Schemas::On],
        Modes::Both => &[Schemas::Off, Schemas::On],
    };
    let paths: &[Path] = match args.paths {
        Paths::Ours => &[Path::Ours],
        Paths::Naive => &[Path::Naive],
        Paths::Both => &[Path::Ours, Path::Naive],
    };
    let load_before = load_average();
    let mut figures = Vec::new();
    for &schemas in modes {
        let spec = Spec {
            events: args.events,
            schemas,
            partitions: args.partitions,
            keys: args.keys,
            seed: args.seed,
            ..Spec::default()
        };
        for &path in paths {
            let mut runs = Vec::new();
            for _ in 0..args.repeats {
                let (run, _) = measure(&spec, path);
                anyhow::ensure!(
                    run.errors == 0,
                    "{} schemas {}: {} messages did not decode",
                    path.name(),
                    schemas.as_str(),
                    run.errors
                );
                runs.push(run);
            }
            figures.push(Figures {
                path,
                schemas,
                runs,
            });
        }
    }
    let load_after = load_average();

    let mut rows = Vec::new();
    for f in &figures {
        let run = f.runs[0];
        let naive = figures
            .iter()
            .find(|n| n.path == Path::Naive && n.schemas == f.schemas);
        let ratio = match (f.path, naive) {
            (Path::Ours, Some(n)) => format!(
                "{:.2}x / {:.2}x",
                f.best() / n.best(),
                f.median() / n.median()
            ),
            _ => "-".to_owned(),
        };
        rows.push(vec![
            f.path.name().to_owned(),
            f.schemas.as_str().to_owned(),
            thousands(run.events),
            format!("{:.0}", run.bytes as f64 / run.events as f64),
            thousands(f.best() as u64),
            thousands(f.median() as u64),
            format!("{:.0}", 1e9 / f.best()),
            format!(
                "{:.0}",
                f.best() * run.bytes as f64 / run.events as f64 / 1e6
            ),
            ratio,
        ]);
    }
    println!(
        "bench core: decode + aggregate on one thread (one thread = one core), {} runs each, \
         keys {}, partitions {}, seed {}",
        args.repeats, args.keys, args.partitions, args.seed
    );
    print_table(
        &[
            "path",
            "schemas",
            "events",
            "B/event",
            "best events/s",
            "median events/s",
            "ns/event",
            "MB/s",
            "vs naive (best / median)",
        ],
        &rows,
    );
    let mut verdicts = Vec::new();
    let find = |path, schemas| {
        figures
            .iter()
            .find(|f| f.path == path && f.schemas == schemas)
    };
    if let Some(ours) = find(Path::Ours, Schemas::Off) {
        println!(
            "ours, schemas off: {} events/s per core (best), {} (median)",
            thousands(ours.best() as u64),
            thousands(ours.median() as u64)
        );
        verdicts.push(Verdict::new(
            "core: >= 1,000,000 schemas-off events/s per core",
            format!(
                "{} (median {})",
                thousands(ours.best() as u64),
                thousands(ours.median() as u64)
            ),
            Some(ours.best() >= GOAL_RATE),
        ));
    }
    for schemas in [Schemas::Off, Schemas::On] {
        if let (Some(ours), Some(naive)) = (find(Path::Ours, schemas), find(Path::Naive, schemas)) {
            let ratio = ours.best() / naive.best();
            verdicts.push(Verdict::new(
                format!(
                    "core: >= 2.5x the naive baseline, schemas {}",
                    schemas.as_str()
                ),
                format!("{ratio:.2}x"),
                Some(ratio >= GOAL_RATIO),
            ));
        }
    }
    verdicts.push(flush_cost());
    println!(
        "cores: {}; load average before {load_before}, after {load_after}",
        super::cores()
    );
    Ok(verdicts)
}

/// Rows changed between two flushes in [`flush_cost`].
const CHANGED: i64 = 1_000;

/// A flush's own work (taking the changed rows, then marking them written)
/// for [`CHANGED`] rows changed, with 10,000 and with 1,000,000 rows held:
/// it should follow the rows changed, not the rows held.
fn flush_cost() -> Verdict {
    let took = |held: i64| {
        let mut state = AggregateState::<ProductSales>::default();
        for product in 0..held {
            let change = sold(product);
            state
                .apply(0, product, Origin::Stream(at(product)), &change)
                .expect("applies");
        }
        let rows = state.dirty_rows();
        state.mark_flushed(&rows);
        let mut times = Vec::new();
        for round in 0..5 {
            for i in 0..CHANGED {
                let offset = held + round * CHANGED + i;
                let change = sold(i * (held / CHANGED));
                state
                    .apply(0, offset, Origin::Stream(at(offset)), &change)
                    .expect("applies");
            }
            let started = Instant::now();
            let rows = black_box(state.dirty_rows());
            state.mark_flushed(&rows);
            times.push(started.elapsed().as_secs_f64());
            assert_eq!(rows.len() as i64, CHANGED);
        }
        median(&times)
    };
    let (small, large) = (took(10_000), took(1_000_000));
    let ratio = large / small;
    print_table(
        &["rows held", "flush of 1,000 changed rows", "vs 10,000 held"],
        &[
            vec![
                "10,000".into(),
                format!("{:.0} µs", small * 1e6),
                "1.00".into(),
            ],
            vec![
                "1,000,000".into(),
                format!("{:.0} µs", large * 1e6),
                format!("{ratio:.2}"),
            ],
        ],
    );
    Verdict::new(
        "core: a flush costs what changed: 1M rows held within 2x of 10k",
        format!("{ratio:.2}x"),
        Some(ratio <= 2.0),
    )
}

/// An order line selling one unit of `product`.
fn sold(product: i64) -> TableChange {
    TableChange::OrderItem(Change {
        op: Op::Create,
        before: None,
        after: Some(OrderItem {
            id: product,
            product_id: product,
            quantity: 1,
            unit_price: Decimal::new(250, 2),
        }),
    })
}

fn at(offset: i64) -> Position {
    Position {
        commit: 1 + offset as u64,
        lsn: 1 + offset as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etl::cdc::TableChange;

    fn assert_same_totals(schemas: Schemas) {
        let spec = Spec {
            events: 30_000,
            schemas,
            partitions: 8,
            keys: 500,
            seed: 3,
            ..Spec::default()
        };
        let (ours_run, ours) = measure(&spec, Path::Ours);
        let (naive_run, naive) = measure(&spec, Path::Naive);
        assert_eq!((ours_run.errors, naive_run.errors), (0, 0));
        assert_eq!(ours_run.events, 30_000);
        let totals = ours.orders_by_minute.totals();
        assert!(totals.len() > 10, "{}", totals.len());
        assert_eq!(totals, naive.orders_by_minute.totals());
        assert_eq!(ours.product_sales.totals(), naive.product_sales.totals());
        assert_eq!(ours.product_sales.totals().len(), 500);
        assert_eq!(
            ours.customers_by_minute.totals(),
            naive.customers_by_minute.totals()
        );
        assert!(!ours.products.totals().is_empty());
        assert_eq!(ours.products.totals(), naive.products.totals());
    }

    #[test]
    fn ours_and_naive_end_in_identical_totals_schemas_off() {
        assert_same_totals(Schemas::Off);
    }

    #[test]
    fn ours_and_naive_end_in_identical_totals_schemas_on() {
        assert_same_totals(Schemas::On);
    }

    #[test]
    fn naive_reads_the_captured_fixtures_like_ours() {
        for name in [
            "schemas_off_string.jsonl",
            "schemas_off_double.jsonl",
            "schemas_on_precise.jsonl",
        ] {
            let path = etl_testkit::fixture(name);
            for line in std::fs::read_to_string(path).unwrap().lines() {
                let record: serde_json::Value = serde_json::from_str(line).unwrap();
                let table =
                    etl::cdc::Table::from_topic(record["topic"].as_str().unwrap(), "online_store")
                        .unwrap();
                let value = match &record["value"] {
                    serde_json::Value::Null => None,
                    v => Some(serde_json::to_vec(v).unwrap()),
                };
                let ours = match cdc::decode(table, value.as_deref()).unwrap() {
                    Decoded::Change(c, origin) => Some((c, origin)),
                    _ => None,
                };
                let naive: Option<(TableChange, etl::cdc::Origin)> =
                    naive::decode(table, value.as_deref()).unwrap();
                assert_eq!(ours, naive, "{name}: {line}");
            }
        }
    }
}
