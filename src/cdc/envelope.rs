//! The Debezium envelope: `{before, after, source, op, ts_ms}`, either bare
//! (JsonConverter with schemas off) or as `{schema, payload}` (schemas on).

use serde::Deserialize;
use serde_json::value::RawValue;

use super::fast;
use super::field::{row_schema, ColumnSchema, Row};
use super::tables::SourceRow;
use super::{Change, DecodeError, DecodeErrorKind, Op, Table, TableChange};
use crate::telemetry;

/// What one Kafka record of a captured table's topic means.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Change(TableChange),
    /// The null-valued record Debezium writes after a delete (for compaction).
    Tombstone,
    /// `op = t`. The processor's policy (see README, "Truncate") is to count
    /// and log it, not to apply it: a truncate carries no rows to subtract.
    Truncate,
}

/// A decoded record and when its change was committed in the source
/// database (Debezium's `source.ts_ms`), if the event says.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub decoded: Decoded,
    pub committed_at_ms: Option<i64>,
}

#[derive(Deserialize, Default)]
struct SourceInfo {
    #[serde(default)]
    ts_ms: Option<i64>,
}

/// Both envelope shapes in one pass: `payload` (+ `schema`) when schemas are
/// on, the envelope fields at the top when they are off.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    schema: Option<&'a RawValue>,
    /// `Some(None)`: a `payload` that is null, JsonConverter's tombstone
    /// with schemas on.
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<Option<&'a RawValue>>,
    // Not `#[serde(flatten)] Envelope`: flatten cannot hold borrowed RawValues.
    #[serde(borrow, default)]
    before: Option<&'a RawValue>,
    #[serde(borrow, default)]
    after: Option<&'a RawValue>,
    #[serde(borrow, default)]
    op: Option<&'a str>,
    #[serde(default)]
    source: Option<SourceInfo>,
}

#[derive(Deserialize, Default)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    before: Option<&'a RawValue>,
    #[serde(borrow, default)]
    after: Option<&'a RawValue>,
    #[serde(borrow, default)]
    op: Option<&'a str>,
    #[serde(default)]
    source: Option<SourceInfo>,
}

/// Tells a field that is there but null from one that is absent.
fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<&'de RawValue>>, D::Error> {
    Option::<&'de RawValue>::deserialize(d).map(Some)
}

fn malformed(what: impl std::fmt::Display) -> DecodeError {
    DecodeError::new(DecodeErrorKind::MalformedJson, what.to_string())
}

/// Decodes the value of one record from `table`'s topic.
pub fn decode(table: Table, value: Option<&[u8]>) -> Result<Decoded, DecodeError> {
    decode_event(table, value).map(|e| e.decoded)
}

/// [`decode`], keeping the event's commit time too.
pub fn decode_event(table: Table, value: Option<&[u8]>) -> Result<Event, DecodeError> {
    let tombstone = Event {
        decoded: Decoded::Tombstone,
        committed_at_ms: None,
    };
    let bytes = match value {
        None => return Ok(tombstone),
        Some(b) if b.trim_ascii() == b"null" => return Ok(tombstone),
        Some(b) => b,
    };
    // The usual message in one pass; anything unusual the serde way below,
    // which gives the same result (see `fast`).
    if let Some(envelope) = std::str::from_utf8(bytes).ok().and_then(fast::scan) {
        let event = |decoded| Event {
            decoded,
            committed_at_ms: envelope.ts_ms,
        };
        let op = match parse_op(Some(envelope.op))? {
            Some(op) => op,
            None => return Ok(event(Decoded::Truncate)),
        };
        let before = envelope.before.map(Image::Columns);
        let after = envelope.after.map(Image::Columns);
        return changes(table, op, before, after, None).map(|c| event(Decoded::Change(c)));
    }
    decode_with_serde(table, bytes)
}

/// Debezium's op; None for a truncate.
fn parse_op(op: Option<&str>) -> Result<Option<Op>, DecodeError> {
    Ok(Some(match op {
        Some("c") => Op::Create,
        Some("u") => Op::Update,
        Some("d") => Op::Delete,
        Some("r") => Op::Read,
        Some("t") => return Ok(None),
        Some(other) => {
            return Err(DecodeError::new(
                DecodeErrorKind::UnknownOp,
                format!("op {other:?}"),
            ))
        }
        None => return Err(malformed("not a Debezium envelope: no op field")),
    }))
}

/// A row image as the message holds it.
enum Image<'a> {
    /// Not parsed yet (the serde path).
    Raw(&'a RawValue),
    /// Split into columns already (the scanner).
    Columns(fast::Columns<'a>),
}

/// Any message the scanner leaves, every shape and every error.
fn decode_with_serde(table: Table, bytes: &[u8]) -> Result<Event, DecodeError> {
    let message: Message = serde_json::from_slice(bytes).map_err(malformed)?;
    let tombstone = Event {
        decoded: Decoded::Tombstone,
        committed_at_ms: None,
    };
    let (envelope, schema) = match message.payload {
        Some(None) => return Ok(tombstone),
        Some(Some(payload)) => {
            let envelope: Envelope = serde_json::from_str(payload.get()).map_err(malformed)?;
            (envelope, message.schema)
        }
        None => (
            Envelope {
                before: message.before,
                after: message.after,
                op: message.op,
                source: message.source,
            },
            None,
        ),
    };
    let committed_at_ms = envelope.source.and_then(|s| s.ts_ms);
    let event = |decoded| Event {
        decoded,
        committed_at_ms,
    };
    let op = match parse_op(envelope.op)? {
        Some(op) => op,
        None => return Ok(event(Decoded::Truncate)),
    };
    let columns: Vec<ColumnSchema> = match schema {
        Some(raw) => row_schema(raw.get())?,
        None => Vec::new(),
    };
    let schema = schema.map(|_| columns.as_slice());
    let before = envelope.before.map(Image::Raw);
    let after = envelope.after.map(Image::Raw);
    changes(table, op, before, after, schema).map(|c| event(Decoded::Change(c)))
}

/// The typed change of `table`'s row images.
fn changes(
    table: Table,
    op: Op,
    before: Option<Image>,
    after: Option<Image>,
    schema: Option<&[ColumnSchema]>,
) -> Result<TableChange, DecodeError> {
    Ok(match table {
        Table::Customers => TableChange::Customer(change(table, op, before, after, schema)?),
        Table::Products => TableChange::Product(change(table, op, before, after, schema)?),
        Table::Orders => TableChange::Order(change(table, op, before, after, schema)?),
        Table::OrderItems => TableChange::OrderItem(change(table, op, before, after, schema)?),
    })
}

fn change<R: SourceRow>(
    table: Table,
    op: Op,
    before: Option<Image>,
    after: Option<Image>,
    schema: Option<&[ColumnSchema]>,
) -> Result<Change<R>, DecodeError> {
    let needs_before = matches!(op, Op::Update | Op::Delete);
    let needs_after = !matches!(op, Op::Delete);
    if needs_before && before.is_none() {
        return Err(DecodeError::new(
            DecodeErrorKind::MissingBefore,
            format!(
                "{table} op {}: no before image (the table needs REPLICA IDENTITY FULL)",
                op.as_str()
            ),
        ));
    }
    if needs_after && after.is_none() {
        return Err(DecodeError::new(
            DecodeErrorKind::MissingAfter,
            format!("{table} op {}: no after image", op.as_str()),
        ));
    }
    let read = |image: Option<Image>| -> Result<Option<R>, DecodeError> {
        let row = match image {
            None => return Ok(None),
            Some(Image::Raw(raw)) => Row::parse(raw, schema)?,
            Some(Image::Columns(columns)) => Row::from_columns(columns, schema),
        };
        for column in row.column_names() {
            if !R::COLUMNS.contains(&column) {
                telemetry::unknown_column(table, column);
            }
        }
        R::read(&row).map(Some)
    };
    Ok(Change {
        op,
        // An update's before image is what the deltas subtract; a create's
        // or read's before is always null, a delete's after too.
        before: if needs_before { read(before)? } else { None },
        after: if needs_after { read(after)? } else { None },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::Order;
    use rust_decimal::Decimal;
    use std::str::FromStr;

    fn order_change(value: &str) -> Change<Order> {
        match decode(Table::Orders, Some(value.as_bytes())).unwrap() {
            Decoded::Change(TableChange::Order(c)) => c,
            other => panic!("{other:?}"),
        }
    }

    const ORDER_AFTER: &str = r#"{"id":7,"customer_id":1,"status":"paid","total_amount":"45.48",
        "created_at":"2024-02-01T09:00:10.250000Z","updated_at":"2024-02-01T09:05:00Z"}"#;

    #[test]
    fn schemas_off_create() {
        let c = order_change(&format!(
            r#"{{"before":null,"after":{ORDER_AFTER},"op":"c","ts_ms":1}}"#
        ));
        assert_eq!(c.op, Op::Create);
        let after = c.after.unwrap();
        assert_eq!((after.id, after.status.as_str()), (7, "paid"));
        assert_eq!(after.total_amount, Decimal::from_str("45.48").unwrap());
        assert_eq!(after.created_at.timestamp_micros(), 1_706_778_010_250_000);
        assert!(c.before.is_none());
    }

    #[test]
    fn schemas_on_precise_decimal_and_micro_timestamp() {
        let value = r#"{"schema":{"type":"struct","fields":[
            {"type":"struct","optional":true,"field":"before","fields":[]},
            {"type":"struct","optional":true,"field":"after","fields":[
              {"type":"int64","field":"id"},
              {"type":"string","field":"status"},
              {"type":"bytes","name":"org.apache.kafka.connect.data.Decimal",
               "parameters":{"scale":"2","connect.decimal.precision":"12"},"field":"total_amount"},
              {"type":"int64","name":"io.debezium.time.MicroTimestamp","field":"created_at"}]}]},
          "payload":{"before":null,"after":{"id":7,"status":"paid","total_amount":"DqU=",
            "created_at":1706778010000000},"op":"r"}}"#;
        let after = order_change(value).after.unwrap();
        assert_eq!(after.total_amount.to_string(), "37.49");
        assert_eq!(after.created_at.timestamp(), 1_706_778_010);
    }

    #[test]
    fn the_commit_time_comes_from_source_ts_ms_in_both_shapes() {
        let off = format!(
            r#"{{"before":null,"after":{ORDER_AFTER},"op":"c","source":{{"db":"s","ts_ms":1706778010250}},"ts_ms":1706778011000}}"#
        );
        let on = format!(
            r#"{{"schema":null,"payload":{{"before":null,"after":{ORDER_AFTER},"op":"c","source":{{"ts_ms":17}}}}}}"#
        );
        let at = |v: &str| {
            decode_event(Table::Orders, Some(v.as_bytes()))
                .unwrap()
                .committed_at_ms
        };
        assert_eq!(at(&off), Some(1_706_778_010_250));
        assert_eq!(at(&on), Some(17));
        let no_source = format!(r#"{{"before":null,"after":{ORDER_AFTER},"op":"c"}}"#);
        assert_eq!(at(&no_source), None);
    }

    #[test]
    fn update_without_before_is_an_error_not_a_guess() {
        let value = format!(r#"{{"before":null,"after":{ORDER_AFTER},"op":"u"}}"#);
        let err = decode(Table::Orders, Some(value.as_bytes())).unwrap_err();
        assert_eq!(err.kind, DecodeErrorKind::MissingBefore);
    }

    /// The scanner's answers are the serde path's, to the error text: on
    /// the captured connector output and on synthetic messages, as they are
    /// and with random damage.
    #[test]
    fn the_scanner_agrees_with_the_serde_path() {
        let mut messages: Vec<(Table, Vec<u8>)> = Vec::new();
        for name in [
            "schemas_off_string.jsonl",
            "schemas_off_double.jsonl",
            "schemas_on_precise.jsonl",
            "truncate.jsonl",
        ] {
            let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
            for line in std::fs::read_to_string(path).unwrap().lines() {
                let record: serde_json::Value = serde_json::from_str(line).unwrap();
                let table =
                    Table::from_topic(record["topic"].as_str().unwrap(), "online_store").unwrap();
                if !record["value"].is_null() {
                    messages.push((table, serde_json::to_vec(&record["value"]).unwrap()));
                    // Pretty-printed too: whitespace everywhere.
                    messages.push((table, serde_json::to_vec_pretty(&record["value"]).unwrap()));
                }
            }
        }
        let spec = crate::bench::synthetic::Spec {
            events: 3_000,
            keys: 50,
            ..Default::default()
        };
        for m in crate::bench::synthetic::Generator::new(spec) {
            if let Some(value) = m.value {
                messages.push((m.table, value));
            }
        }
        let same = |table: Table, bytes: &[u8]| {
            let fast = decode_event(table, Some(bytes));
            let serde = decode_with_serde(table, bytes);
            assert_eq!(fast, serde, "{}", String::from_utf8_lossy(bytes));
            fast.is_ok()
        };
        let mut rng = fastrand::Rng::with_seed(11);
        let noise = b"\"\\{}[],:0123456789-+.eEntfu \x01\xff\xc3";
        let (mut ok, mut failed) = (0, 0);
        for (table, bytes) in &messages {
            assert!(same(*table, bytes));
            for _ in 0..30 {
                let mut damaged = bytes.clone();
                for _ in 0..rng.usize(1..3) {
                    let at = rng.usize(0..damaged.len());
                    match rng.u8(0..3) {
                        0 => {
                            damaged.remove(at);
                        }
                        1 => damaged.insert(at, noise[rng.usize(0..noise.len())]),
                        _ => damaged[at] = noise[rng.usize(0..noise.len())],
                    }
                }
                if same(*table, &damaged) {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
        }
        // Both outcomes were exercised.
        assert!(ok > 1_000 && failed > 1_000, "{ok} {failed}");
    }

    #[test]
    fn tombstones_truncates_and_bad_input() {
        assert_eq!(decode(Table::Orders, None).unwrap(), Decoded::Tombstone);
        let enveloped_null = br#"{"schema":null,"payload":null}"#;
        assert_eq!(
            decode(Table::Orders, Some(enveloped_null)).unwrap(),
            Decoded::Tombstone
        );
        let t = r#"{"before":null,"after":null,"op":"t"}"#;
        assert_eq!(
            decode(Table::Orders, Some(t.as_bytes())).unwrap(),
            Decoded::Truncate
        );
        let kind = |v: &str| decode(Table::Orders, Some(v.as_bytes())).unwrap_err().kind;
        assert_eq!(kind("{not json"), DecodeErrorKind::MalformedJson);
        assert_eq!(kind(r#"{"op":"x","after":{}}"#), DecodeErrorKind::UnknownOp);
        assert_eq!(
            kind(r#"{"before":null,"after":{"id":"seven"},"op":"c"}"#),
            DecodeErrorKind::BadField
        );
        assert_eq!(
            kind(r#"{"before":{},"after":null,"op":"c"}"#),
            DecodeErrorKind::MissingAfter
        );
    }
}
