//! Column values as Debezium's JsonConverter writes them.
//!
//! With schemas on, the schema says how a column is encoded (a decimal's
//! scale, a timestamp's unit); with schemas off we read what the JSON shows.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::{DecodeError, DecodeErrorKind};

const CONNECT_DECIMAL: &str = "org.apache.kafka.connect.data.Decimal";
const VARIABLE_SCALE_DECIMAL: &str = "io.debezium.data.VariableScaleDecimal";
const CONNECT_TIMESTAMP_MILLIS: &str = "org.apache.kafka.connect.data.Timestamp";
const TIMESTAMP_MILLIS: &str = "io.debezium.time.Timestamp";
const TIMESTAMP_MICROS: &str = "io.debezium.time.MicroTimestamp";
const TIMESTAMP_NANOS: &str = "io.debezium.time.NanoTimestamp";

/// What the schema says about one column (schemas on only).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ColumnSchema<'a> {
    pub column: Cow<'a, str>,
    /// Connect logical type, e.g. `org.apache.kafka.connect.data.Decimal`.
    pub logical: Option<Cow<'a, str>>,
    /// A fixed-scale decimal's scale.
    pub scale: Option<u32>,
}

impl ColumnSchema<'_> {
    /// The same, owning its text (to outlive the message it came from).
    pub fn into_owned(self) -> ColumnSchema<'static> {
        ColumnSchema {
            column: Cow::Owned(self.column.into_owned()),
            logical: self.logical.map(|l| Cow::Owned(l.into_owned())),
            scale: self.scale,
        }
    }
}

/// The columns of a message's row, from the text of its Connect schema.
pub(crate) fn row_schema(text: &str) -> Result<Vec<ColumnSchema<'_>>, DecodeError> {
    serde_json::from_str::<SchemaNode>(text)
        .map_err(|e| DecodeError::malformed(format_args!("schema: {e}")))?
        .row_columns()
}

/// One row image (`before` or `after`): its columns in message order, values
/// still raw JSON text, and the schema of its columns when the message had one.
pub(crate) struct Row<'a> {
    columns: Vec<(&'a str, &'a str)>,
    schema: Option<&'a [ColumnSchema<'a>]>,
}

impl<'a> Row<'a> {
    pub fn parse(
        raw: &'a RawValue,
        schema: Option<&'a [ColumnSchema<'a>]>,
    ) -> Result<Self, DecodeError> {
        let columns = serde_json::from_str::<RawColumns<'a>>(raw.get())
            .map_err(|e| DecodeError::malformed(format_args!("row image: {e}")))?
            .0;
        Ok(Row { columns, schema })
    }

    /// A row image already split into (column, raw JSON value) pairs.
    pub fn from_columns(
        columns: Vec<(&'a str, &'a str)>,
        schema: Option<&'a [ColumnSchema<'a>]>,
    ) -> Self {
        Row { columns, schema }
    }

    pub fn column_names(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.columns.iter().map(|(name, _)| *name)
    }

    /// Whether `column` holds what Debezium writes into a before image where
    /// it has no value (a column outside REPLICA IDENTITY DEFAULT's key):
    /// null, false, "", zero in any decimal encoding, or the epoch. A column
    /// the image lacks counts too. A real value can look like this; the
    /// caller asks it of every column that would tell.
    pub fn is_placeholder(&self, column: &str) -> bool {
        let Ok(raw) = self.raw(column) else {
            return true;
        };
        let zero = || self.decimal(column).is_ok_and(|d| d.is_zero());
        match raw.as_bytes().first() {
            Some(b'n') => raw == "null",
            Some(b'f') => raw == "false",
            Some(b'-' | b'0'..=b'9' | b'{') => zero(),
            Some(b'"') => match plain_string(raw) {
                // Escapes: text that is not a placeholder.
                None => false,
                Some("") => true,
                Some(text) if text.starts_with("1970-01-01T") => self
                    .timestamp(column)
                    .is_ok_and(|t| t.timestamp() == 0 && t.timestamp_subsec_nanos() == 0),
                // "0.00", or a base64 decimal whose scale the schema gives.
                Some(text) => {
                    let precise = self
                        .schema_of(column)
                        .is_some_and(|c| c.logical.as_deref() == Some(CONNECT_DECIMAL));
                    (precise || text.bytes().all(|b| b"0123456789.-+eE".contains(&b))) && zero()
                }
            },
            _ => false,
        }
    }

    fn raw(&self, column: &str) -> Result<&'a str, DecodeError> {
        self.columns
            .iter()
            .find(|(name, _)| *name == column)
            .map(|(_, value)| *value)
            .ok_or_else(|| bad_field(column, "column is missing"))
    }

    fn schema_of(&self, column: &str) -> Option<&ColumnSchema<'a>> {
        self.schema?.iter().find(|c| c.column == column)
    }

    pub fn i64(&self, column: &str) -> Result<i64, DecodeError> {
        let raw = self.raw(column)?;
        raw.parse::<i64>()
            .map_err(|_| bad_field(column, format!("expected an integer, got {raw}")))
    }

    pub fn string(&self, column: &str) -> Result<String, DecodeError> {
        let raw = self.raw(column)?;
        if let Some(plain) = plain_string(raw) {
            return Ok(plain.to_owned());
        }
        serde_json::from_str::<String>(raw)
            .map_err(|_| bad_field(column, format!("expected a string, got {raw}")))
    }

    /// A decimal in any of Debezium's `decimal.handling.mode`s: `string`
    /// ("37.49"), `double` (37.49) or `precise` (base64 unscaled integer whose
    /// scale is in the schema; readable only with schemas on).
    pub fn decimal(&self, column: &str) -> Result<Decimal, DecodeError> {
        let text = self.raw(column)?;
        let logical = self.schema_of(column).and_then(|c| c.logical.as_deref());
        match logical {
            Some(CONNECT_DECIMAL) => {
                let scale = self
                    .schema_of(column)
                    .and_then(|c| c.scale)
                    .ok_or_else(|| bad_field(column, "decimal schema without a scale parameter"))?;
                let encoded: Cow<str> = serde_json::from_str(text).map_err(|_| {
                    bad_field(column, format!("expected a base64 string, got {text}"))
                })?;
                precise_decimal(&encoded, scale).map_err(|why| bad_field(column, why))
            }
            // A variable-scale decimal describes itself, schema or not.
            _ if logical == Some(VARIABLE_SCALE_DECIMAL) || text.starts_with('{') => {
                #[derive(Deserialize)]
                struct Variable<'s> {
                    scale: u32,
                    #[serde(borrow)]
                    value: Cow<'s, str>,
                }
                let v: Variable = serde_json::from_str(text).map_err(|_| {
                    bad_field(column, format!("expected {{scale, value}}, got {text}"))
                })?;
                precise_decimal(&v.value, v.scale).map_err(|why| bad_field(column, why))
            }
            _ => textual_decimal(text).map_err(|why| bad_field(column, why)),
        }
    }

    /// A timestamp as an ISO-8601 string (timestamptz: ZonedTimestamp) or as
    /// an integer since the epoch, whose unit the schema names; without a
    /// schema the unit is inferred from the magnitude (see [`epoch_to_utc`]).
    pub fn timestamp(&self, column: &str) -> Result<DateTime<Utc>, DecodeError> {
        let text = self.raw(column)?;
        if text.starts_with('"') {
            let iso: Cow<str> = match plain_string(text) {
                Some(plain) => Cow::Borrowed(plain),
                None => serde_json::from_str(text)
                    .map_err(|_| bad_field(column, format!("expected a timestamp, got {text}")))?,
            };
            if let Some(t) = utc_timestamp(&iso) {
                return Ok(t);
            }
            return DateTime::parse_from_rfc3339(&iso)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| bad_field(column, format!("{iso:?} is not ISO-8601: {e}")));
        }
        let n: i64 = text
            .parse()
            .map_err(|_| bad_field(column, format!("expected a timestamp, got {text}")))?;
        let unit = match self.schema_of(column).and_then(|c| c.logical.as_deref()) {
            Some(TIMESTAMP_MILLIS | CONNECT_TIMESTAMP_MILLIS) => EpochUnit::Millis,
            Some(TIMESTAMP_MICROS) => EpochUnit::Micros,
            Some(TIMESTAMP_NANOS) => EpochUnit::Nanos,
            _ => EpochUnit::infer(n),
        };
        epoch_to_utc(n, unit).ok_or_else(|| bad_field(column, format!("{n} is out of range")))
    }
}

/// `2024-02-01T09:00:10.250000Z`, the way Debezium writes every timestamptz
/// (a ZonedTimestamp in UTC): read directly, to the nanosecond. None for any
/// other form (an offset, a leap second, a lower-case `t`...), which chrono's
/// RFC 3339 parser then reads; for the forms read here both agree.
fn utc_timestamp(iso: &str) -> Option<DateTime<Utc>> {
    let b = iso.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || *b.last()? != b'Z' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        b[range].iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let nanos = match &b[19..b.len() - 1] {
        [] => 0,
        [b'.', digits @ ..] if (1..=9).contains(&digits.len()) => {
            number(20..b.len() - 1)? * 10u32.pow(9 - digits.len() as u32)
        }
        _ => return None,
    };
    let second = number(17..19)?;
    if second > 59 {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(number(0..4)? as i32, number(5..7)?, number(8..10)?)?;
    let time = NaiveTime::from_hms_nano_opt(number(11..13)?, number(14..16)?, second, nanos)?;
    Some(Utc.from_utc_datetime(&NaiveDateTime::new(date, time)))
}

/// The contents of a JSON string literal that has no escapes (and so needs
/// no decoding); None for anything else.
fn plain_string(raw: &str) -> Option<&str> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    inner
        .bytes()
        .all(|b| b != b'\\' && b != b'"' && b >= 0x20)
        .then_some(inner)
}

fn bad_field(column: &str, why: impl fmt::Display) -> DecodeError {
    DecodeError::new(DecodeErrorKind::BadField, format!("column {column}: {why}"))
}

/// A decimal written as text: a JSON string ("37.49") or a JSON number
/// (37.49, 1.0E-4). Parsing the number's text keeps it exact.
fn textual_decimal(text: &str) -> Result<Decimal, String> {
    let digits = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    let parsed = if digits.contains(['e', 'E']) {
        Decimal::from_scientific(digits)
    } else {
        Decimal::from_str(digits)
    };
    parsed.map_err(|_| {
        if text.starts_with('"') {
            format!(
                "{text} is not a decimal (a base64 `precise` decimal needs schemas on; \
                 or set decimal.handling.mode=string)"
            )
        } else {
            format!("{text} is not a decimal")
        }
    })
}

/// Connect's Decimal: base64 of a big-endian two's-complement unscaled integer.
pub(crate) fn precise_decimal(encoded: &str, scale: u32) -> Result<Decimal, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| format!("{encoded:?} is not base64: {e}"))?;
    if bytes.is_empty() || bytes.len() > 16 {
        return Err(format!("unscaled value of {} bytes", bytes.len()));
    }
    let negative = bytes[0] & 0x80 != 0;
    let mut unscaled: i128 = if negative { -1 } else { 0 };
    for b in bytes {
        unscaled = (unscaled << 8) | i128::from(b);
    }
    Decimal::try_from_i128_with_scale(unscaled, scale).map_err(|e| format!("{e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EpochUnit {
    Millis,
    Micros,
    Nanos,
}

impl EpochUnit {
    /// Without a schema the unit is not written down. Millis below 10^13 cover
    /// 1970-2286, micros below 10^16 cover 1970-2286 too beyond 10^13 (i.e.
    /// from 1970-04-27); anything larger is nanos.
    fn infer(n: i64) -> EpochUnit {
        match n.unsigned_abs() {
            0..10_000_000_000_000 => EpochUnit::Millis,
            10_000_000_000_000..10_000_000_000_000_000 => EpochUnit::Micros,
            _ => EpochUnit::Nanos,
        }
    }
}

pub(crate) fn epoch_to_utc(n: i64, unit: EpochUnit) -> Option<DateTime<Utc>> {
    match unit {
        EpochUnit::Millis => Utc.timestamp_millis_opt(n).single(),
        EpochUnit::Micros => Utc.timestamp_micros(n).single(),
        EpochUnit::Nanos => Some(Utc.timestamp_nanos(n)),
    }
}

/// The start of a UTC minute, as seconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Minute(pub i64);

impl Minute {
    pub fn of(t: DateTime<Utc>) -> Minute {
        Minute(t.timestamp().div_euclid(60) * 60)
    }
}

impl fmt::Display for Minute {
    /// `2024-02-01T09:00:00Z`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Utc.timestamp_opt(self.0, 0).single() {
            Some(t) => write!(f, "{}", t.format("%Y-%m-%dT%H:%M:%SZ")),
            None => write!(f, "@{}", self.0),
        }
    }
}

/// A JSON object read as (column, raw value) pairs without copying.
struct RawColumns<'a>(Vec<(&'a str, &'a str)>);

impl<'de> Deserialize<'de> for RawColumns<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ColumnsVisitor;
        impl<'de> Visitor<'de> for ColumnsVisitor {
            type Value = RawColumns<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a row object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut columns = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(name) = map.next_key::<&'de str>()? {
                    columns.push((name, map.next_value::<&'de RawValue>()?.get()));
                }
                Ok(RawColumns(columns))
            }
        }
        deserializer.deserialize_map(ColumnsVisitor)
    }
}

/// The parts of a Connect schema node that we read.
#[derive(Deserialize)]
struct SchemaNode<'a> {
    #[serde(borrow, default)]
    field: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    parameters: Option<SchemaParameters<'a>>,
    #[serde(borrow, default)]
    fields: Vec<SchemaNode<'a>>,
}

#[derive(Deserialize)]
struct SchemaParameters<'a> {
    #[serde(borrow, default)]
    scale: Option<Cow<'a, str>>,
}

impl<'a> SchemaNode<'a> {
    /// The columns of the envelope's `after` (or `before`) row struct.
    fn row_columns(self) -> Result<Vec<ColumnSchema<'a>>, DecodeError> {
        let row = self.fields.into_iter().find(|f| {
            matches!(f.field.as_deref(), Some("after" | "before")) && !f.fields.is_empty()
        });
        let Some(row) = row else {
            return Ok(Vec::new());
        };
        row.fields
            .into_iter()
            .map(|f| {
                let scale =
                    match f.parameters.as_ref().and_then(|p| p.scale.as_deref()) {
                        Some(s) => Some(s.parse::<u32>().map_err(|_| {
                            DecodeError::malformed(format_args!("schema scale {s:?}"))
                        })?),
                        None => None,
                    };
                Ok(ColumnSchema {
                    column: f.field.unwrap_or_default(),
                    logical: f.name,
                    scale,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precise_decimals_are_twos_complement_with_the_schema_scale() {
        // 3749 = 0x0EA5 -> "DqU="; -1 = 0xFF -> "/w=="; 128 needs a leading 0x00.
        assert_eq!(precise_decimal("DqU=", 2).unwrap().to_string(), "37.49");
        assert_eq!(precise_decimal("/w==", 2).unwrap().to_string(), "-0.01");
        assert_eq!(precise_decimal("AIA=", 0).unwrap().to_string(), "128");
        assert!(precise_decimal("not base64!", 2).is_err());
    }

    #[test]
    fn variable_scale_decimals_need_no_schema() {
        let raw = serde_json::value::RawValue::from_string(
            r#"{"amount":{"scale":3,"value":"/w=="}}"#.to_string(),
        )
        .unwrap();
        let row = Row::parse(&raw, None).unwrap();
        assert_eq!(row.decimal("amount").unwrap().to_string(), "-0.001");
    }

    /// What Debezium writes where a before image has no value, in every
    /// encoding (tests/fixtures/replica_identity_default_*), and values that
    /// only look close.
    #[test]
    fn placeholders_are_null_false_empty_zero_or_the_epoch() {
        let decimal_schema = [ColumnSchema {
            column: "v".into(),
            logical: Some(CONNECT_DECIMAL.into()),
            scale: Some(2),
        }];
        let is = |raw: &str, schema: Option<&[ColumnSchema]>| {
            let text = format!(r#"{{"v":{raw}}}"#);
            let value = RawValue::from_string(text).unwrap();
            Row::parse(&value, schema).unwrap().is_placeholder("v")
        };
        for raw in [
            "null",
            "false",
            r#""""#,
            "0",
            "-0",
            "0.0",
            "0E-2",
            r#""0.00""#,
            r#""0""#,
            r#""1970-01-01T00:00:00.000000Z""#,
            r#""1970-01-01T00:00:00Z""#,
            r#"{"scale":2,"value":"AA=="}"#,
        ] {
            assert!(is(raw, None), "{raw}");
        }
        assert!(is(r#""AA==""#, Some(&decimal_schema)));
        assert!(is(r#""AAA=""#, Some(&decimal_schema)));
        for raw in [
            "true",
            "1",
            "0.01",
            r#""0.01""#,
            r#""AA==""#,
            r#"" ""#,
            r#""\u0030""#,
            r#""pending""#,
            r#""1970-01-01T00:00:00.000001Z""#,
            r#""1970-01-01""#,
            r#""2024-02-01T09:00:00Z""#,
            r#"{"scale":2,"value":"AQ=="}"#,
            "[]",
        ] {
            assert!(!is(raw, None), "{raw}");
        }
        assert!(!is(r#""AQ==""#, Some(&decimal_schema)));
        // A column the image lacks has no value either.
        let value = RawValue::from_string(r#"{"id":7}"#.into()).unwrap();
        assert!(Row::parse(&value, None).unwrap().is_placeholder("email"));
    }

    #[test]
    fn textual_decimals_keep_every_digit() {
        assert_eq!(textual_decimal("\"37.49\"").unwrap().to_string(), "37.49");
        assert_eq!(textual_decimal("37.49").unwrap().to_string(), "37.49");
        assert_eq!(textual_decimal("1.0E-4").unwrap().to_string(), "0.00010");
        let err = textual_decimal("\"DqU=\"").unwrap_err();
        assert!(err.contains("schemas on"), "{err}");
    }

    #[test]
    fn epoch_units_follow_the_magnitude_without_a_schema() {
        let t = Utc.with_ymd_and_hms(2024, 2, 1, 9, 0, 10).unwrap();
        for (n, unit) in [
            (t.timestamp_millis(), EpochUnit::Millis),
            (t.timestamp_micros(), EpochUnit::Micros),
            (t.timestamp_nanos_opt().unwrap(), EpochUnit::Nanos),
        ] {
            assert_eq!(EpochUnit::infer(n), unit);
            assert_eq!(epoch_to_utc(n, unit), Some(t));
        }
    }

    #[test]
    fn debezium_timestamps_read_directly_agree_with_chrono() {
        let chrono = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|t| t.with_timezone(&Utc))
        };
        let mut rng = fastrand::Rng::with_seed(5);
        let mut direct = 0;
        for _ in 0..20_000 {
            let mut s = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                rng.u32(0..10_000),
                rng.u32(0..14),
                rng.u32(0..33),
                rng.u32(0..26),
                rng.u32(0..62),
                rng.u32(0..62)
            );
            let digits = rng.usize(0..11);
            if digits > 0 {
                s.push('.');
                for _ in 0..digits {
                    s.push(char::from(b'0' + rng.u8(0..10)));
                }
            }
            s.push(['Z', 'Z', 'Z', 'z', '+'][rng.usize(0..5)]);
            if s.ends_with('+') {
                s.push_str("01:00");
            }
            if let Some(t) = utc_timestamp(&s) {
                assert_eq!(Some(t), chrono(&s), "{s}");
                direct += 1;
            }
        }
        assert!(direct > 1_000, "{direct}");
        for s in [
            "2024-02-01T09:00:10.250000Z",
            "2024-02-01T09:00:10Z",
            "2024-02-29T23:59:59.999999999Z",
            "1969-12-31T23:59:59.5Z",
        ] {
            assert_eq!(utc_timestamp(s), chrono(s), "{s}");
            assert!(utc_timestamp(s).is_some(), "{s}");
        }
        for s in [
            "2023-02-29T00:00:00Z",
            "2024-02-01T09:00:60Z",
            "2024-02-01T09:00:10.Z",
            "2024-02-01t09:00:10Z",
            "2024-02-01T09:00:10+00:00",
            "+2024-02-01T09:00:10Z",
        ] {
            assert_eq!(utc_timestamp(s), None, "{s}");
        }
    }

    #[test]
    fn minutes_print_as_utc_iso() {
        let t = DateTime::parse_from_rfc3339("2024-02-01T10:00:59.999999+01:00").unwrap();
        assert_eq!(
            Minute::of(t.with_timezone(&Utc)).to_string(),
            "2024-02-01T09:00:00Z"
        );
        let before_epoch = DateTime::parse_from_rfc3339("1969-12-31T23:59:30Z").unwrap();
        assert_eq!(
            Minute::of(before_epoch.with_timezone(&Utc)).to_string(),
            "1969-12-31T23:59:00Z"
        );
    }
}
