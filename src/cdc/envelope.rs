//! The Debezium envelope: `{before, after, source, op, ts_ms}`, either bare
//! (JsonConverter with schemas off) or as `{schema, payload}` (schemas on).

use serde::Deserialize;
use serde_json::value::RawValue;

use super::field::{row_schema, ColumnSchema, Row};
use super::position::{sequence_start, SourceFields};
use super::tables::{OldRow, OldRowNeed, SourceRow};
use super::{fast, schemas};
use super::{Change, DecodeError, DecodeErrorKind, Op, Origin, Table, TableChange};
use crate::telemetry;

/// What one Kafka record of a captured table's topic means.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A row change and where it comes from in the source's log (a change
    /// that cannot be placed is a [`DecodeErrorKind::NoPosition`] error).
    Change(TableChange, Origin),
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
    #[serde(default)]
    lsn: Option<u64>,
    #[serde(default)]
    sequence: Option<String>,
    /// A string in current releases ("true", "last", "incremental", ...).
    #[serde(default)]
    snapshot: Option<serde_json::Value>,
}

impl SourceInfo {
    fn fields(&self) -> Result<SourceFields, DecodeError> {
        let sequence = match &self.sequence {
            None => None,
            Some(text) => Some(sequence_start(text).ok_or_else(|| {
                DecodeError::new(
                    DecodeErrorKind::NoPosition,
                    format!("source.sequence {text:?} is not [commit LSN, LSN]"),
                )
            })?),
        };
        Ok(SourceFields {
            ts_ms: self.ts_ms,
            lsn: self.lsn,
            sequence,
            incremental: self.snapshot.as_ref().and_then(|s| s.as_str()) == Some("incremental"),
        })
    }
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
    // The usual message in one pass; anything unusual the serde way, which
    // gives the same result (see `fast`).
    let scanned = std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| schemas::with(|cache| fast::scan(text, |rest| cache.find(rest))));
    match scanned {
        Some(fast::Message::Envelope(envelope, schema)) => decode_scanned(table, envelope, schema),
        Some(fast::Message::Tombstone) => Ok(tombstone),
        None => decode_with_serde(table, bytes),
    }
}

/// Whether the scanner reads `value` (rather than leaving it to serde): the
/// tools check that every synthetic message they bench with is one it reads.
pub fn scanned(value: &[u8]) -> bool {
    std::str::from_utf8(value).is_ok_and(|text| {
        schemas::with(|cache| fast::scan(text, |rest| cache.find(rest))).is_some()
    })
}

/// A message the scanner read, checked in the serde path's order (the op
/// before the schema) so that both fail alike.
fn decode_scanned(
    table: Table,
    envelope: fast::Envelope,
    schema: fast::Schema<schemas::Columns>,
) -> Result<Event, DecodeError> {
    let event = |decoded| Event {
        decoded,
        committed_at_ms: envelope.source.ts_ms,
    };
    let op = match parse_op(Some(envelope.op))? {
        Some(op) => op,
        None => return Ok(event(Decoded::Truncate)),
    };
    let columns = match schema {
        fast::Schema::Absent => None,
        fast::Schema::Known(columns) => Some(columns),
        fast::Schema::New(text) => Some(schemas::with(|cache| cache.parse(text))?),
    };
    let before = envelope.before.map(Image::Columns);
    let after = envelope.after.map(Image::Columns);
    let change = changes(table, op, before, after, columns.as_deref())?;
    let origin = envelope.source.origin(table, op)?;
    Ok(event(Decoded::Change(change, origin)))
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
        None => {
            return Err(DecodeError::malformed(
                "not a Debezium envelope: no op field",
            ))
        }
    }))
}

/// A row image as the message holds it.
enum Image<'a> {
    /// Not parsed yet (the serde path).
    Raw(&'a RawValue),
    /// Split into columns already (the scanner).
    Columns(fast::Columns<'a>),
}

/// Any message the scanner leaves, every shape and every error; also the
/// reference the scanner is checked against, here and by the tools'
/// synthetic events.
pub fn decode_with_serde(table: Table, bytes: &[u8]) -> Result<Event, DecodeError> {
    let message: Message = serde_json::from_slice(bytes).map_err(DecodeError::malformed)?;
    let tombstone = Event {
        decoded: Decoded::Tombstone,
        committed_at_ms: None,
    };
    let (envelope, schema) = match message.payload {
        Some(None) => return Ok(tombstone),
        Some(Some(payload)) => {
            let envelope: Envelope =
                serde_json::from_str(payload.get()).map_err(DecodeError::malformed)?;
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
    let source = envelope.source.unwrap_or_default();
    let committed_at_ms = source.ts_ms;
    let event = |decoded| Event {
        decoded,
        committed_at_ms,
    };
    let op = match parse_op(envelope.op)? {
        Some(op) => op,
        None => return Ok(event(Decoded::Truncate)),
    };
    // Parsed anew, not taken from the scanner's cache: this path is the
    // reference the scanner's results are tested against.
    let columns: Vec<ColumnSchema> = match schema {
        Some(raw) => row_schema(raw.get())?,
        None => Vec::new(),
    };
    let schema = schema.map(|_| columns.as_slice());
    let before = envelope.before.map(Image::Raw);
    let after = envelope.after.map(Image::Raw);
    let change = changes(table, op, before, after, schema)?;
    let origin = source.fields()?.origin(table, op)?;
    Ok(event(Decoded::Change(change, origin)))
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
) -> Result<Change<R, R::Old>, DecodeError> {
    // Where the aggregates subtract the old row, an update and a delete need
    // all of it; where the newest row wins, only a delete needs its key.
    let whole = <R::Old as OldRow>::NEED == OldRowNeed::WholeRow;
    let needs_before = match op {
        Op::Update => whole,
        Op::Delete => true,
        Op::Create | Op::Read => false,
    };
    let needs_after = !matches!(op, Op::Delete);
    if needs_before && before.is_none() {
        return Err(missing_before(table, op, whole, "no before image"));
    }
    if needs_after && after.is_none() {
        return Err(DecodeError::new(
            DecodeErrorKind::MissingAfter,
            format!("{table} op {}: no after image", op.as_str()),
        ));
    }
    let row = |image| image_row::<R>(table, image, schema);
    // A create's or read's before is always null, a delete's after too; an
    // update's before is not read where nothing subtracts it.
    let before = match before.filter(|_| needs_before) {
        None => None,
        Some(image) => {
            let row = row(image)?;
            if whole && holds_only_the_key::<R>(&row) {
                return Err(missing_before(
                    table,
                    op,
                    whole,
                    "the before image holds only the key (placeholders in the other columns: \
                     the table has REPLICA IDENTITY DEFAULT)",
                ));
            }
            Some(R::Old::read(&row)?)
        }
    };
    let after = match after.filter(|_| needs_after) {
        None => None,
        Some(image) => Some(R::read(&row(image)?)?),
    };
    Ok(Change { op, before, after })
}

/// A row image's columns, with the columns the table does not have reported.
fn image_row<'a, R: SourceRow>(
    table: Table,
    image: Image<'a>,
    schema: Option<&'a [ColumnSchema<'a>]>,
) -> Result<Row<'a>, DecodeError> {
    let row = match image {
        Image::Raw(raw) => Row::parse(raw, schema)?,
        Image::Columns(columns) => Row::from_columns(columns, schema),
    };
    for column in row.column_names() {
        if !R::COLUMNS.contains(&column) {
            telemetry::unknown_column(table, column);
        }
    }
    Ok(row)
}

/// Whether a before image is Debezium's stand-in for a row it was given only
/// the key of (REPLICA IDENTITY DEFAULT): every other column holds a
/// placeholder ("", 0, the epoch), except those Postgres fills with their
/// constant DEFAULT. A whole row of these tables never looks like that.
fn holds_only_the_key<R: SourceRow>(row: &Row) -> bool {
    R::COLUMNS
        .iter()
        .filter(|c| !R::KEY.contains(c) && !R::CONSTANT_DEFAULTS.contains(c))
        .all(|c| row.is_placeholder(c))
}

/// An update or delete without the old row its table's aggregates need.
fn missing_before(table: Table, op: Op, whole: bool, what: &str) -> DecodeError {
    let why = if whole {
        format!(
            "the aggregates of {table} subtract the old row, which Debezium sends only for a \
             table with REPLICA IDENTITY FULL: run {}",
            table.replica_identity_fix()
        )
    } else {
        format!(
            "the {table} aggregate needs the deleted row's key, which Debezium sends for a table \
             with REPLICA IDENTITY DEFAULT or FULL"
        )
    };
    DecodeError::new(
        DecodeErrorKind::MissingBefore,
        format!("{table} op {}: {what}; {why}", op.as_str()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::Order;
    use rust_decimal::Decimal;
    use std::str::FromStr;

    fn order_change(value: &str) -> Change<Order> {
        match decode(Table::Orders, Some(value.as_bytes())).unwrap() {
            Decoded::Change(TableChange::Order(c), _) => c,
            other => panic!("{other:?}"),
        }
    }

    /// A source block with the position every real event has, and that
    /// position.
    const SOURCE: &str = r#""source":{"ts_ms":1,"sequence":"[\"100\",\"200\"]","lsn":200}"#;
    const AT: Origin = Origin::Stream(crate::cdc::Position {
        commit: 100,
        lsn: 200,
    });

    const ORDER_AFTER: &str = r#"{"id":7,"customer_id":1,"status":"paid","total_amount":"45.48",
        "created_at":"2024-02-01T09:00:10.250000Z","updated_at":"2024-02-01T09:05:00Z"}"#;

    #[test]
    fn schemas_off_create() {
        let c = order_change(&format!(
            r#"{{"before":null,"after":{ORDER_AFTER},"op":"c",{SOURCE},"ts_ms":1}}"#
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
            "created_at":1706778010000000},"op":"r","source":{"lsn":5,"ts_ms":1}}}"#;
        let after = order_change(value).after.unwrap();
        assert_eq!(after.total_amount.to_string(), "37.49");
        assert_eq!(after.created_at.timestamp(), 1_706_778_010);
    }

    #[test]
    fn the_commit_time_comes_from_source_ts_ms_in_both_shapes() {
        let off = format!(
            r#"{{"before":null,"after":{ORDER_AFTER},"op":"c","source":{{"db":"s","ts_ms":1706778010250,"sequence":"[null,\"5\"]","lsn":5}},"ts_ms":1706778011000}}"#
        );
        let on = format!(
            r#"{{"schema":null,"payload":{{"before":null,"after":{ORDER_AFTER},"op":"c","source":{{"ts_ms":17,"sequence":"[null,\"5\"]","lsn":5}}}}}}"#
        );
        let at = |v: &str| {
            decode_event(Table::Orders, Some(v.as_bytes()))
                .unwrap()
                .committed_at_ms
        };
        assert_eq!(at(&off), Some(1_706_778_010_250));
        assert_eq!(at(&on), Some(17));
        let no_source = format!(
            r#"{{"before":null,"after":{ORDER_AFTER},"op":"c","source":{{"sequence":"[null,\"5\"]","lsn":5}}}}"#
        );
        assert_eq!(at(&no_source), None);
    }

    #[test]
    fn the_position_comes_from_source_lsn_and_sequence_either_way() {
        let order = |op: &str, source: &str| {
            format!(r#"{{"before":null,"after":{ORDER_AFTER},"op":"{op}","source":{source}}}"#)
        };
        let origin = |value: &str| {
            // Both ways agree, whether or not the scanner reads the message.
            let fast = decode_event(Table::Orders, Some(value.as_bytes()));
            assert_eq!(
                fast,
                decode_with_serde(Table::Orders, value.as_bytes()),
                "{value}"
            );
            fast.map(|e| match e.decoded {
                Decoded::Change(_, origin) => origin,
                other => panic!("{other:?}"),
            })
        };
        let stream = |commit, lsn| Ok(Origin::Stream(crate::cdc::Position { commit, lsn }));
        let cases = [
            (
                order(
                    "c",
                    r#"{"sequence":"[\"26517664\",\"26516464\"]","lsn":26516464}"#,
                ),
                stream(26517664, 26516464),
                true,
            ),
            // The first transaction after a snapshot.
            (
                order("c", r#"{"lsn":7,"sequence":"[null,\"7\"]","ts_ms":1}"#),
                stream(0, 7),
                true,
            ),
            // Snapshot rows: the LSN of the snapshot; `snapshot` says which row.
            (
                order(
                    "r",
                    r#"{"snapshot":"last","sequence":"[null,\"9\"]","lsn":9,"ts_ms":1}"#,
                ),
                Ok(Origin::Snapshot(crate::cdc::SnapshotId {
                    lsn: 9,
                    started_ms: 1,
                })),
                true,
            ),
            (
                order("r", r#"{"snapshot":null,"lsn":9,"ts_ms":1}"#),
                Ok(Origin::Snapshot(crate::cdc::SnapshotId {
                    lsn: 9,
                    started_ms: 1,
                })),
                true,
            ),
            // Beyond 2^53, where a float would round.
            (
                order(
                    "c",
                    r#"{"sequence":"[\"9007199254740993\",\"9007199254740995\"]","lsn":9007199254740995}"#,
                ),
                stream(9007199254740993, 9007199254740995),
                true,
            ),
            // Odd spellings the scanner leaves to serde, which reads them alike.
            (
                order("c", r#"{"sequence":"[\u00223\u0022,\"4\"]","lsn":4}"#),
                stream(3, 4),
                false,
            ),
            (
                order("c", r#"{"sequence":"[ \"3\" , \"4\" ]","lsn":4}"#),
                stream(3, 4),
                false,
            ),
            (
                order(
                    "c",
                    r#"{"sequence":"[\"18446744073709551615\",\"4\"]","lsn":4}"#,
                ),
                stream(u64::MAX, 4),
                false,
            ),
            (
                order("r", r#"{"snapshot":true,"lsn":9,"ts_ms":1}"#),
                Ok(Origin::Snapshot(crate::cdc::SnapshotId {
                    lsn: 9,
                    started_ms: 1,
                })),
                false,
            ),
        ];
        for (value, expected, scanned) in cases {
            assert_eq!(origin(&value), expected, "{value}");
            assert_eq!(scans(value.as_bytes()), scanned, "{value}");
        }
        let no_position = [
            order("c", r#"{"lsn":4}"#),
            order("c", r#"{"sequence":"[null,\"4\"]"}"#),
            order("c", r#"{"sequence":"[null,\"4\"]","lsn":null}"#),
            order("c", r#"{"sequence":"[4]","lsn":4}"#),
            order("c", r#"{"sequence":"[\"x\",\"4\"]","lsn":4}"#),
            order("r", r#"{"snapshot":"incremental","lsn":4,"ts_ms":1}"#),
            order("r", r#"{"lsn":4}"#),
            format!(r#"{{"before":null,"after":{ORDER_AFTER},"op":"c"}}"#),
        ];
        for value in no_position {
            let err = origin(&value).unwrap_err();
            assert_eq!(err.kind, DecodeErrorKind::NoPosition, "{value}: {err}");
        }
        // A negative or fractional LSN is no LSN.
        for bad in [r#"{"lsn":-4}"#, r#"{"lsn":4.5}"#, r#"{"lsn":"4"}"#] {
            let value = order("r", bad);
            assert_eq!(
                origin(&value).unwrap_err().kind,
                DecodeErrorKind::MalformedJson,
                "{value}"
            );
        }
    }

    /// An order's before image as the real connector sends it for a delete
    /// under REPLICA IDENTITY DEFAULT (tests/fixtures/replica_identity_default_*):
    /// the key, Postgres's constant DEFAULT for `status`, placeholders else.
    const ORDER_KEY_ONLY: &str = r#"{"id":101,"customer_id":0,"status":"pending","total_amount":"0.00",
        "created_at":"1970-01-01T00:00:00.000000Z","updated_at":"1970-01-01T00:00:00.000000Z"}"#;

    /// Decodes `value` the scanner's way and the serde way, which must agree.
    fn both_ways(table: Table, value: &str) -> Result<Decoded, DecodeError> {
        let fast = decode_event(table, Some(value.as_bytes()));
        assert_eq!(fast, decode_with_serde(table, value.as_bytes()), "{value}");
        assert!(scans(value.as_bytes()), "{value}");
        fast.map(|e| e.decoded)
    }

    const SUBTRACTS: &str = "the aggregates of orders subtract the old row, which Debezium \
        sends only for a table with REPLICA IDENTITY FULL: run ALTER TABLE orders REPLICA IDENTITY FULL";

    #[test]
    fn an_update_or_delete_without_the_whole_old_row_is_missing_before_naming_the_fix() {
        let cases = [
            // REPLICA IDENTITY DEFAULT's update.
            (
                format!(r#"{{"before":null,"after":{ORDER_AFTER},"op":"u"}}"#),
                format!("orders op u: no before image; {SUBTRACTS}"),
            ),
            // Its delete.
            (
                format!(r#"{{"before":{ORDER_KEY_ONLY},"after":null,"op":"d"}}"#),
                format!(
                    "orders op d: the before image holds only the key (placeholders in the \
                     other columns: the table has REPLICA IDENTITY DEFAULT); {SUBTRACTS}"
                ),
            ),
            // An update whose before image holds only the key.
            (
                format!(r#"{{"before":{ORDER_KEY_ONLY},"after":{ORDER_AFTER},"op":"u"}}"#),
                format!(
                    "orders op u: the before image holds only the key (placeholders in the \
                     other columns: the table has REPLICA IDENTITY DEFAULT); {SUBTRACTS}"
                ),
            ),
            (
                r#"{"before":null,"after":null,"op":"d"}"#.to_owned(),
                format!("orders op d: no before image; {SUBTRACTS}"),
            ),
        ];
        for (value, detail) in cases {
            let err = both_ways(Table::Orders, &value).unwrap_err();
            assert_eq!(err.kind, DecodeErrorKind::MissingBefore, "{value}");
            assert_eq!(err.detail, detail, "{value}");
        }
    }

    /// A before image is taken for the key alone only when every column that
    /// could tell holds a placeholder: one real value makes it a whole row,
    /// which is subtracted. `status` does not tell: Postgres fills in its
    /// DEFAULT.
    #[test]
    fn one_real_value_makes_a_before_image_a_whole_row() {
        let key_only: serde_json::Value = serde_json::from_str(ORDER_KEY_ONLY).unwrap();
        for (column, value, total, created_at) in [
            ("customer_id", serde_json::json!(1), "0.00", 0),
            ("total_amount", serde_json::json!("0.01"), "0.01", 0),
            (
                "created_at",
                serde_json::json!("1970-01-01T00:00:00.000001Z"),
                "0.00",
                1,
            ),
            (
                "updated_at",
                serde_json::json!("2024-02-01T09:05:00Z"),
                "0.00",
                0,
            ),
        ] {
            let mut before = key_only.clone();
            before[column] = value;
            let value = format!(r#"{{"before":{before},"after":null,"op":"d",{SOURCE}}}"#);
            let Decoded::Change(TableChange::Order(c), _) =
                both_ways(Table::Orders, &value).unwrap()
            else {
                panic!("{value}")
            };
            let before = c.before.unwrap();
            assert_eq!(
                (
                    before.id,
                    before.status.as_str(),
                    before.total_amount.to_string().as_str(),
                    before.created_at.timestamp_micros()
                ),
                (101, "pending", total, created_at),
                "{value}"
            );
            assert_eq!(c.after, None);
        }
        let mut before = key_only;
        before["status"] = serde_json::json!("paid");
        let value = format!(r#"{{"before":{before},"after":null,"op":"d"}}"#);
        let err = both_ways(Table::Orders, &value).unwrap_err();
        assert_eq!(err.kind, DecodeErrorKind::MissingBefore);
    }

    /// The products dimension takes the newest row: it reads no before image
    /// of an update (none, a whole one or a broken one alike) and only the key
    /// of a delete's (whole or key only), so REPLICA IDENTITY DEFAULT will do.
    #[test]
    fn the_products_dimension_reads_no_old_row_of_an_update_and_only_a_deletes_key() {
        use crate::cdc::{Product, ProductKey};
        let after = r#"{"id":1,"name":"Espresso beans 1kg","category":"coffee","price":"21.49"}"#;
        let updated = Product {
            id: 1,
            name: "Espresso beans 1kg".into(),
            category: "coffee".into(),
            price: Decimal::new(2149, 2),
        };
        for before in [
            "null",
            r#"{"id":1,"name":"Espresso beans 1kg","category":"coffee","price":"19.99"}"#,
            r#"{"id":1,"name":"","category":"","price":"0.00"}"#,
            r#"{"id":"one","price":"not a decimal"}"#,
        ] {
            let value = format!(r#"{{"before":{before},"after":{after},"op":"u",{SOURCE}}}"#);
            assert_eq!(
                both_ways(Table::Products, &value).unwrap(),
                Decoded::Change(
                    TableChange::Product(Change {
                        op: Op::Update,
                        before: None,
                        after: Some(updated.clone()),
                    }),
                    AT
                ),
                "{value}"
            );
        }
        for before in [
            r#"{"id":101,"name":"","category":"","price":"0.00"}"#,
            r#"{"id":101,"name":"Milk frother","category":"equipment","price":"29.95"}"#,
            r#"{"id":101,"price":"not a decimal"}"#,
        ] {
            let value = format!(r#"{{"before":{before},"after":null,"op":"d",{SOURCE}}}"#);
            assert_eq!(
                both_ways(Table::Products, &value).unwrap(),
                Decoded::Change(
                    TableChange::Product(Change {
                        op: Op::Delete,
                        before: Some(ProductKey { id: 101 }),
                        after: None,
                    }),
                    AT
                ),
                "{value}"
            );
        }
        let err =
            both_ways(Table::Products, r#"{"before":null,"after":null,"op":"d"}"#).unwrap_err();
        assert_eq!(err.kind, DecodeErrorKind::MissingBefore);
        assert_eq!(
            err.detail,
            "products op d: no before image; the products aggregate needs the deleted row's key, \
             which Debezium sends for a table with REPLICA IDENTITY DEFAULT or FULL"
        );
        let err = both_ways(
            Table::Products,
            r#"{"before":{"name":"x"},"after":null,"op":"d"}"#,
        )
        .unwrap_err();
        assert_eq!(
            (err.kind, err.detail.as_str()),
            (DecodeErrorKind::BadField, "column id: column is missing")
        );
    }

    /// Whether the scanner reads `bytes` (rather than leaving them to serde).
    fn scans(bytes: &[u8]) -> bool {
        let text = std::str::from_utf8(bytes).unwrap();
        fast::scan(text, |_| None::<(usize, ())>).is_some()
    }

    /// The text of a message's schema object, if it has one.
    fn schema_text(bytes: &[u8]) -> Option<String> {
        let message: Message = serde_json::from_slice(bytes).ok()?;
        let text = message.schema?.get();
        text.starts_with('{').then(|| text.to_owned())
    }

    /// This thread's cached schema texts, most recently used first.
    fn cached() -> Vec<String> {
        schemas::with(|cache| cache.texts().into_iter().map(str::to_owned).collect())
    }

    fn empty_cache() {
        schemas::with(|cache| *cache = schemas::Cache::default());
    }

    /// The scanner's answers are the serde path's, to the error text: on
    /// the captured connector output, as it is and with random damage (the
    /// tools' synthetic messages are checked alike, in `etl-tools`).
    /// Undamaged, the scanner reads every one in the connector's key order,
    /// schemas on too, with its schema found in the cache or parsed into it.
    #[test]
    fn the_scanner_agrees_with_the_serde_path() {
        empty_cache();
        // (table, value, whether the scanner reads it undamaged, the reason
        // it fails for undamaged)
        let mut messages: Vec<(Table, Vec<u8>, bool, Option<DecodeErrorKind>)> = Vec::new();
        for name in [
            "schemas_off_string.jsonl",
            "schemas_off_double.jsonl",
            "schemas_on_precise.jsonl",
            "truncate.jsonl",
            "replica_identity_default_schemas_off_string.jsonl",
            "replica_identity_default_schemas_off_double.jsonl",
            "replica_identity_default_schemas_on_precise.jsonl",
        ] {
            let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
            for line in std::fs::read_to_string(path).unwrap().lines() {
                #[derive(Deserialize)]
                struct Record<'a> {
                    topic: &'a str,
                    #[serde(borrow)]
                    value: &'a RawValue,
                }
                let record: Record = serde_json::from_str(line).unwrap();
                let table = Table::from_topic(record.topic, "online_store").unwrap();
                let value: serde_json::Value = serde_json::from_str(record.value.get()).unwrap();
                if !value.is_null() {
                    // With REPLICA IDENTITY DEFAULT, the updates and deletes
                    // of the tables whose aggregates subtract fail.
                    let op = value.get("payload").unwrap_or(&value)["op"].as_str();
                    let fails = (name.starts_with("replica_identity_default")
                        && table.needs_whole_old_row()
                        && matches!(op, Some("u" | "d")))
                    .then_some(DecodeErrorKind::MissingBefore);
                    // As captured (spaces after `:` and `,`)...
                    messages.push((table, record.value.get().as_bytes().to_vec(), true, fails));
                    // ...and rewritten compact and pretty-printed (whitespace
                    // everywhere), with keys sorted: `payload` before
                    // `schema`, which the scanner leaves to serde.
                    let usual = value.get("schema").is_none();
                    messages.push((table, serde_json::to_vec(&value).unwrap(), usual, fails));
                    let pretty = serde_json::to_vec_pretty(&value).unwrap();
                    messages.push((table, pretty, usual, fails));
                }
            }
        }
        let same = |table: Table, bytes: &[u8]| {
            let fast = decode_event(table, Some(bytes));
            let serde = decode_with_serde(table, bytes);
            assert_eq!(fast, serde, "{}", String::from_utf8_lossy(bytes));
            fast
        };
        let mut rng = fastrand::Rng::with_seed(11);
        let (mut ok, mut failed) = (0, 0);
        let (mut hits, mut misses) = (0, 0);
        let mut missing_before = 0;
        for (table, bytes, usual, fails) in &messages {
            assert_eq!(scans(bytes), *usual, "{}", String::from_utf8_lossy(bytes));
            let schema = schema_text(bytes).filter(|_| *usual);
            if let Some(schema) = &schema {
                if cached().contains(schema) {
                    hits += 1;
                } else {
                    misses += 1;
                }
            }
            let undamaged = same(*table, bytes).map_err(|e| e.kind);
            assert_eq!(
                undamaged.err(),
                *fails,
                "{}",
                String::from_utf8_lossy(bytes)
            );
            missing_before += usize::from(fails.is_some());
            if let Some(schema) = schema {
                assert_eq!(cached()[0], schema);
            }
            for _ in 0..30 {
                let damaged = etl_testkit::damaged(bytes, &mut rng);
                if same(*table, &damaged).is_ok() {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
        }
        // Both outcomes were exercised, and both ways to a schema (35 hits
        // and 49 misses on these captures); 10 events of each REPLICA
        // IDENTITY DEFAULT capture, 3 ways each, miss the old row their
        // aggregates subtract.
        assert!(ok > 1_000 && failed > 1_000, "{ok} {failed}");
        assert_eq!(missing_before, 3 * 10 * 3);
        assert!(hits > 30 && misses > 30, "{hits} {misses}");
    }

    /// An orders message whose schema gives `total_amount` a scale and
    /// `created_at` a unit; the payload is the same whatever they are:
    /// 3749 unscaled, 1706778010000 in that unit.
    fn orders_message(scale: &str, timestamp: &str) -> (String, String) {
        let schema = format!(
            r#"{{"type":"struct","fields":[{{"type":"struct","optional":true,"field":"after","fields":[
              {{"type":"int64","field":"id"}},{{"type":"string","field":"status"}},
              {{"type":"bytes","name":"org.apache.kafka.connect.data.Decimal",
               "parameters":{{"scale":"{scale}","connect.decimal.precision":"12"}},"field":"total_amount"}},
              {{"type":"int64","name":"io.debezium.time.{timestamp}","field":"created_at"}}]}}]}}"#
        );
        let message = format!(
            r#"{{"schema":{schema},"payload":{{"before":null,"after":{{"id":7,"status":"paid",
              "total_amount":"DqU=","created_at":1706778010000}},"op":"c",
              "source":{{"ts_ms":5,"sequence":"[null,\"5\"]","lsn":5}}}}}}"#
        );
        (schema, message)
    }

    /// `created_at` of [`orders_message`] read as milliseconds.
    const MILLIS: i64 = 1_706_778_010_000;

    /// An order's total and creation time (ms), from a decoded create.
    fn total_and_time_of(event: Result<Event, DecodeError>) -> (String, i64) {
        match event.unwrap().decoded {
            Decoded::Change(TableChange::Order(c), _) => {
                let after = c.after.unwrap();
                (
                    after.total_amount.to_string(),
                    after.created_at.timestamp_millis(),
                )
            }
            other => panic!("{other:?}"),
        }
    }

    /// Decodes one message both ways, checks that they agree and that the
    /// scanner read it; the order's total and creation time.
    fn total_and_time(message: &str) -> (String, i64) {
        let bytes = message.as_bytes();
        assert!(scans(bytes), "{message}");
        let event = decode_event(Table::Orders, Some(bytes));
        assert_eq!(event, decode_with_serde(Table::Orders, bytes), "{message}");
        total_and_time_of(event)
    }

    /// Whether this thread's cache knows the schema `message` carries, as
    /// the scanner asks it.
    fn schema_is_cached(message: &str) -> bool {
        schemas::with(|cache| match fast::scan(message, |rest| cache.find(rest)) {
            Some(fast::Message::Envelope(_, fast::Schema::Known(_))) => true,
            Some(fast::Message::Envelope(_, fast::Schema::New(_))) => false,
            other => panic!("{message}: {other:?}"),
        })
    }

    /// The first message with a schema parses it (a miss) and keeps it; the
    /// next ones find it (hits) and decode the same.
    #[test]
    fn a_schema_is_parsed_once_then_found() {
        empty_cache();
        let (schema, message) = orders_message("2", "Timestamp");
        assert!(!schema_is_cached(&message));
        assert_eq!(total_and_time(&message), ("37.49".into(), MILLIS));
        assert_eq!(cached(), [schema.as_str()]);
        for _ in 0..2 {
            assert!(schema_is_cached(&message));
            assert_eq!(total_and_time(&message), ("37.49".into(), MILLIS));
        }
        // Still one entry: a hit does not parse and keep the text again.
        assert_eq!(cached(), [schema]);
    }

    /// Two schemas that differ in one byte, a decimal's scale, alternate:
    /// each message is read with its own scale.
    #[test]
    fn schemas_differing_only_in_a_decimal_scale_are_not_confused() {
        empty_cache();
        let (two, with_two) = orders_message("2", "Timestamp");
        let (three, with_three) = orders_message("3", "Timestamp");
        assert_eq!(two.len(), three.len());
        for _ in 0..3 {
            assert_eq!(total_and_time(&with_two), ("37.49".into(), MILLIS));
            assert_eq!(total_and_time(&with_three), ("3.749".into(), MILLIS));
        }
        assert_eq!(cached(), [three, two]);
    }

    /// A table's schema changes mid-stream (`created_at` becomes
    /// microseconds) while messages with the old one still come: each
    /// message is read with the schema it carries.
    #[test]
    fn a_schema_change_mid_stream_applies_to_the_messages_that_carry_it() {
        empty_cache();
        let (old, with_old) = orders_message("2", "Timestamp");
        let (new, with_new) = orders_message("2", "MicroTimestamp");
        let stream = [&with_old, &with_old, &with_new, &with_old, &with_new];
        let times: Vec<i64> = stream.iter().map(|m| total_and_time(m).1).collect();
        assert_eq!(
            times,
            [MILLIS, MILLIS, MILLIS / 1000, MILLIS, MILLIS / 1000]
        );
        assert_eq!(cached(), [new, old]);
    }

    /// More schemas than the cache holds: it keeps the most recently used,
    /// and a message whose schema was dropped is read right, parsing it anew.
    #[test]
    fn more_schemas_than_the_cache_holds_evict_the_least_recently_used() {
        empty_cache();
        let messages: Vec<(String, String)> = (0..=schemas::CAPACITY)
            .map(|scale| orders_message(&scale.to_string(), "Timestamp"))
            .collect();
        let total = |scale: usize| Decimal::new(3749, scale as u32).to_string();
        assert_eq!(total(schemas::CAPACITY), "0.00003749");
        for (scale, (_, message)) in messages.iter().enumerate() {
            assert_eq!(total_and_time(message).0, total(scale));
        }
        let kept = cached();
        assert_eq!(kept.len(), schemas::CAPACITY);
        assert!(!kept.contains(&messages[0].0));
        // The first schema again: parsed anew, and now the second is the
        // least recently used.
        assert!(!schema_is_cached(&messages[0].1));
        assert_eq!(total_and_time(&messages[0].1).0, total(0));
        let kept = cached();
        assert_eq!(kept.len(), schemas::CAPACITY);
        assert_eq!(kept[0], messages[0].0);
        assert!(!kept.contains(&messages[1].0));
        for (scale, (_, message)) in messages.iter().enumerate().skip(2) {
            assert!(schema_is_cached(message));
            assert_eq!(total_and_time(message).0, total(scale));
        }
    }

    /// Schemas that do not parse, schemas with escapes, and message shapes
    /// the scanner leaves to serde (another key order, other keys, escaped
    /// keys): the same result either way, read with the message's schema,
    /// and nothing that failed is cached.
    #[test]
    fn odd_schemas_and_shapes_decode_alike() {
        empty_cache();
        let (schema, message) = orders_message("2", "Timestamp");
        let payload = &message[message.find(r#""payload":"#).unwrap() + 10..message.len() - 1];
        let bad_scale = schema.replace(r#""scale":"2""#, r#""scale":"x""#);
        let escaped = schema.replace("total_amount", r"total\u005famount");
        let truncate = payload.replace(r#""op":"c""#, r#""op":"t""#);
        let decoded = Ok(("37.49", MILLIS));
        // (message, its total and time or the start of its error)
        let scanned = [
            // Parses only as JSON.
            (
                format!(r#"{{"schema":{bad_scale},"payload":{payload}}}"#),
                Err(r#"schema scale "x""#),
            ),
            (
                format!(r#"{{"schema":{{"fields":7}},"payload":{payload}}}"#),
                Err("schema: invalid type"),
            ),
            // An escape in the schema: fine, it is serde that parses it.
            (
                format!(r#"{{"schema":{escaped},"payload":{payload}}}"#),
                decoded,
            ),
            // Without its schema the base64 total is not a decimal.
            (
                format!(r#"{{"schema":null,"payload":{payload}}}"#),
                Err("column total_amount: \"DqU=\" is not a decimal"),
            ),
        ];
        // A truncate or a tombstone does not read the schema.
        let unread_schema = [
            (
                format!(r#"{{"schema":{bad_scale},"payload":{truncate}}}"#),
                Decoded::Truncate,
            ),
            (
                format!(r#"{{"schema":{bad_scale},"payload":null}}"#),
                Decoded::Tombstone,
            ),
        ];
        let left_to_serde = [
            (
                format!(r#"{{"payload":{payload},"schema":{schema}}}"#),
                decoded,
            ),
            (
                format!(r#"{{"schema":{schema},"payload":{payload},"extra":1}}"#),
                decoded,
            ),
            (
                format!(r#"{{"sch\u0065ma":{schema},"payload":{payload}}}"#),
                decoded,
            ),
            (
                format!("{{\n  \"payload\" : {payload} ,\n  \"schema\" : {schema}\n}}"),
                decoded,
            ),
            (
                format!(r#"{{"schema":{schema},"schema":{schema},"payload":{payload}}}"#),
                Err("duplicate field `schema`"),
            ),
            (
                format!(r#"{{"schema":"{{}}","payload":{payload}}}"#),
                Err("schema: invalid type"),
            ),
            (
                format!(
                    r#"{{"schema":{},"payload":{payload}}}"#,
                    &schema[..schema.len() - 1]
                ),
                Err("EOF while parsing an object"),
            ),
            (
                format!(r#"{{"schema":{schema}}}"#),
                Err("not a Debezium envelope: no op field"),
            ),
        ];
        let check = |message: &str, expected: &Result<(&str, i64), &str>| {
            let event = decode_event(Table::Orders, Some(message.as_bytes()));
            assert_eq!(event, decode_with_serde(Table::Orders, message.as_bytes()));
            match expected {
                Ok((total, time)) => {
                    assert_eq!(total_and_time_of(event), (total.to_string(), *time))
                }
                Err(start) => {
                    let detail = event.unwrap_err().detail;
                    assert!(detail.starts_with(start), "{message}: {detail}");
                }
            }
        };
        // Twice: the second time the schema that parsed is found.
        for _ in 0..2 {
            for (message, expected) in &scanned {
                assert!(scans(message.as_bytes()), "{message}");
                check(message, expected);
            }
            for (message, expected) in &unread_schema {
                assert!(scans(message.as_bytes()), "{message}");
                let event = decode_event(Table::Orders, Some(message.as_bytes()));
                assert_eq!(event, decode_with_serde(Table::Orders, message.as_bytes()));
                assert_eq!(&event.unwrap().decoded, expected);
            }
            for (message, expected) in &left_to_serde {
                assert!(!scans(message.as_bytes()), "{message}");
                check(message, expected);
            }
            // Only the schema that parsed, once.
            assert_eq!(cached(), [escaped.as_str()]);
        }
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
