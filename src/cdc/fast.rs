//! A single-pass scanner for the common Debezium message: the bare envelope
//! (schemas off) or `{"schema": ..., "payload": envelope}` (schemas on),
//! with object row images.
//!
//! The serde path reads a message in several passes (the envelope with its
//! row images as raw values, then each image, then each column) and pays
//! serde_json's per-string costs on every key of the `source` block. This
//! scanner walks the text once, keeps the row images as (column, raw value)
//! pairs and reads only `op`, `source.ts_ms` and the source position. A schema it has seen
//! before it passes over with one comparison (see [`super::schemas`]).
//!
//! It is strict: it accepts only what serde_json accepts too (the same JSON
//! grammar for every value it skips) and gives up (`None`) on anything else:
//! escapes in keys or in `op`, duplicate fields, values of unexpected types,
//! a `schema` that is not an object or null, keys beside `schema` and
//! `payload` or in another order, deep nesting. The caller then decodes the
//! message the serde way, so results and errors are exactly the same either
//! way; the scanner only makes the usual case cheap.

use super::position::SourceFields;

/// A row image: (column, raw JSON value) in message order.
pub(crate) type Columns<'a> = Vec<(&'a str, &'a str)>;

/// What the scanner read of an envelope.
#[derive(Debug, PartialEq)]
pub(crate) struct Envelope<'a> {
    pub before: Option<Columns<'a>>,
    pub after: Option<Columns<'a>>,
    pub op: &'a str,
    pub source: SourceFields,
}

/// What the scanner read of a message.
#[derive(Debug, PartialEq)]
pub(crate) enum Message<'a, K> {
    /// The whole message (schemas off) or a `{schema, payload}`'s payload.
    Envelope(Envelope<'a>, Schema<'a, K>),
    /// `{"schema": ..., "payload": null}`, JsonConverter's tombstone.
    Tombstone,
}

/// The schema beside an envelope.
#[derive(Debug, PartialEq)]
pub(crate) enum Schema<'a, K> {
    /// None: schemas off, or `"schema": null`.
    Absent,
    /// An object that the caller's `known` recognised: what it said of it.
    Known(K),
    /// Any other object, checked like every value skipped: its text.
    New(&'a str),
}

/// Nesting deeper than this is left to serde_json.
const MAX_DEPTH: u32 = 64;

struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

/// Scans a whole message; None when the serde path must decide.
///
/// `known` is shown the bytes from where a schema object starts to the end
/// of the message; when they start with a schema it knows, it says how long
/// that is, and the scanner goes on after it without checking it. So it
/// must know only whole JSON objects that this scanner has accepted.
pub(crate) fn scan<K>(
    text: &str,
    known: impl FnOnce(&[u8]) -> Option<(usize, K)>,
) -> Option<Message<'_, K>> {
    let mut s = Scanner {
        text,
        bytes: text.as_bytes(),
        at: 0,
    };
    let message = s.message(known)?;
    s.ws();
    (s.at == s.bytes.len()).then_some(message)
}

impl<'a> Scanner<'a> {
    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte after whitespace, not consumed.
    #[inline]
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.bytes.get(self.at).copied()
    }

    #[inline]
    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.at += 1)
    }

    /// A string without escapes, after its opening quote: its contents.
    #[inline]
    fn plain_string(&mut self) -> Option<&'a str> {
        let start = self.at;
        self.at = string_stop(self.bytes, start);
        if *self.bytes.get(self.at)? != b'"' {
            return None;
        }
        self.at += 1;
        Some(&self.text[start..self.at - 1])
    }

    /// Any string, after its opening quote, with serde_json's rules for a
    /// string it skips: no control characters, valid escapes.
    #[inline]
    fn skip_string(&mut self) -> Option<()> {
        self.at = string_stop(self.bytes, self.at);
        if *self.bytes.get(self.at)? == b'"' {
            self.at += 1;
            return Some(());
        }
        self.skip_escaped_string()
    }

    /// The rest of a string that has an escape (or a control character).
    #[cold]
    fn skip_escaped_string(&mut self) -> Option<()> {
        loop {
            match *self.bytes.get(self.at)? {
                b'"' => {
                    self.at += 1;
                    return Some(());
                }
                b'\\' => {
                    self.at += 1;
                    match *self.bytes.get(self.at)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 1,
                        b'u' => {
                            let hex = self.bytes.get(self.at + 1..self.at + 5)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.at += 5;
                        }
                        _ => return None,
                    }
                }
                _ => return None,
            }
            self.at = string_stop(self.bytes, self.at);
        }
    }

    #[inline]
    fn digits(&mut self) -> usize {
        let start = self.at;
        self.at = digits_stop(self.bytes, start);
        self.at - start
    }

    /// A number, by JSON's grammar (as serde_json checks it).
    fn skip_number(&mut self) -> Option<()> {
        if self.bytes.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        match *self.bytes.get(self.at)? {
            b'0' => {
                self.at += 1;
                if let Some(b'0'..=b'9') = self.bytes.get(self.at) {
                    return None;
                }
            }
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.bytes.get(self.at) {
            self.at += 1;
            if let Some(b'+' | b'-') = self.bytes.get(self.at) {
                self.at += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.bytes.get(self.at..self.at + word.len())? == word {
            self.at += word.len();
            Some(())
        } else {
            None
        }
    }

    /// Any value; returns its text. Scalars inline, containers in
    /// [`Self::container`].
    #[inline]
    fn value(&mut self, depth: u32) -> Option<&'a str> {
        self.ws();
        let start = self.at;
        self.skip_value(depth)?;
        Some(&self.text[start..self.at])
    }

    /// Any value, skipped.
    #[inline]
    fn skip_value(&mut self, depth: u32) -> Option<()> {
        let first = self.peek()?;
        match first {
            b'"' => {
                self.at += 1;
                self.skip_string()?;
            }
            b'-' | b'0'..=b'9' => self.skip_number()?,
            b'n' => self.literal(b"null")?,
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'{' | b'[' => self.container(first, depth)?,
            _ => return None,
        }
        Some(())
    }

    /// An object or array, at its opening bracket.
    #[inline(never)]
    fn container(&mut self, open: u8, depth: u32) -> Option<()> {
        if depth >= MAX_DEPTH {
            return None;
        }
        self.at += 1;
        let close = if open == b'{' { b'}' } else { b']' };
        if self.peek()? == close {
            self.at += 1;
            return Some(());
        }
        loop {
            if open == b'{' {
                self.eat(b'"')?;
                self.skip_string()?;
                self.eat(b':')?;
            }
            self.skip_value(depth + 1)?;
            match self.peek()? {
                b',' => self.at += 1,
                b if b == close => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Calls `field` for each key of an object (after whitespace, at its
    /// `{`), which must consume the value.
    #[inline]
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            self.eat(b'"')?;
            let key = self.plain_string()?;
            self.eat(b':')?;
            field(self, key)?;
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A row image: null, or an object whose values stay raw.
    fn image(&mut self) -> Option<Option<Columns<'a>>> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Some(None);
        }
        if self.peek()? != b'{' {
            return None;
        }
        let mut columns = Vec::with_capacity(8);
        self.object(|s, key| {
            let value = s.value(1)?;
            columns.push((key, value));
            Some(())
        })?;
        Some(Some(columns))
    }

    /// An integer that fits an i64 (no fraction, no exponent).
    fn int(&mut self) -> Option<i64> {
        self.ws();
        let start = self.at;
        self.skip_number()?;
        self.text[start..self.at].parse().ok()
    }

    /// `source`: null, or an object of which only `ts_ms` and the position
    /// fields are read.
    fn source(&mut self) -> Option<SourceFields> {
        match self.peek()? {
            b'n' => {
                self.literal(b"null")?;
                Some(SourceFields::default())
            }
            b'{' => {
                // Sixteen keys of which four are read: the others are only
                // checked, not sliced out.
                self.at += 1;
                let mut ts_ms: Option<Option<i64>> = None;
                let mut lsn: Option<Option<u64>> = None;
                let mut sequence: Option<Option<Option<u64>>> = None;
                let mut snapshot: Option<bool> = None;
                if self.peek()? == b'}' {
                    self.at += 1;
                    return Some(SourceFields::default());
                }
                loop {
                    self.eat(b'"')?;
                    let key_start = self.at;
                    self.plain_key()?;
                    let key = &self.bytes[key_start..self.at - 1];
                    self.eat(b':')?;
                    // Slice patterns: byte compares, no memcmp call per key.
                    match key {
                        [b't', b's', b'_', b'm', b's'] if ts_ms.is_none() => {
                            ts_ms = Some(self.nullable_int()?)
                        }
                        [b'l', b's', b'n'] if lsn.is_none() => {
                            lsn = Some(match self.nullable_int()? {
                                Some(n) => Some(u64::try_from(n).ok()?),
                                None => None,
                            })
                        }
                        [b's', b'e', b'q', b'u', b'e', b'n', b'c', b'e'] if sequence.is_none() => {
                            sequence = Some(if self.peek()? == b'n' {
                                self.literal(b"null")?;
                                None
                            } else {
                                Some(self.sequence()?)
                            })
                        }
                        [b's', b'n', b'a', b'p', b's', b'h', b'o', b't'] if snapshot.is_none() => {
                            snapshot = Some(if self.peek()? == b'n' {
                                self.literal(b"null")?;
                                false
                            } else {
                                self.eat(b'"')?;
                                self.plain_string()? == "incremental"
                            })
                        }
                        // Repeated: serde decides.
                        [b't', b's', b'_', b'm', b's']
                        | [b'l', b's', b'n']
                        | [b's', b'e', b'q', b'u', b'e', b'n', b'c', b'e']
                        | [b's', b'n', b'a', b'p', b's', b'h', b'o', b't'] => return None,
                        _ => self.skip_value(1)?,
                    }
                    match self.peek()? {
                        b',' => self.at += 1,
                        b'}' => {
                            self.at += 1;
                            return Some(SourceFields {
                                ts_ms: ts_ms.flatten(),
                                lsn: lsn.flatten(),
                                sequence: sequence.flatten(),
                                incremental: snapshot.unwrap_or(false),
                            });
                        }
                        _ => return None,
                    }
                }
            }
            _ => None,
        }
    }

    /// null, or an integer that fits an i64.
    fn nullable_int(&mut self) -> Option<Option<i64>> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            Some(None)
        } else {
            Some(Some(self.int()?))
        }
    }

    /// `sequence`'s string as the connector writes it, `"[null,\"26497112\"]"`
    /// or `"[\"1\",\"2\"]"`: its first element. Any other spelling (spaces,
    /// other escapes, numbers past 19 digits) is left to serde.
    fn sequence(&mut self) -> Option<Option<u64>> {
        self.expect(b"\"[")?;
        let first = self.sequence_element()?;
        self.expect(b",")?;
        self.sequence_element()?;
        self.expect(b"]\"")?;
        Some(first)
    }

    /// `null` or `\"digits\"` inside `sequence`'s string.
    fn sequence_element(&mut self) -> Option<Option<u64>> {
        if self.expect(b"null").is_some() {
            return Some(None);
        }
        self.expect(b"\\\"")?;
        let start = self.at;
        let stop = digits_stop(self.bytes, start);
        // 19 digits always fit a u64.
        if stop == start || stop - start > 19 {
            return None;
        }
        let n = self.bytes[start..stop]
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        self.at = stop;
        self.expect(b"\\\"")?;
        Some(Some(n))
    }

    /// The bytes `word` at the cursor, consumed.
    fn expect(&mut self, word: &[u8]) -> Option<()> {
        if self.bytes.get(self.at..self.at + word.len()) == Some(word) {
            self.at += word.len();
            Some(())
        } else {
            None
        }
    }

    /// A key without escapes, after its opening quote, skipped.
    #[inline]
    fn plain_key(&mut self) -> Option<()> {
        self.at = string_stop(self.bytes, self.at);
        if *self.bytes.get(self.at)? != b'"' {
            return None;
        }
        self.at += 1;
        Some(())
    }

    /// Either shape: `{schema, payload}` when `schema` is the first key.
    fn message<K>(
        &mut self,
        known: impl FnOnce(&[u8]) -> Option<(usize, K)>,
    ) -> Option<Message<'a, K>> {
        let start = self.at;
        if !self.schema_key() {
            self.at = start;
            return Some(Message::Envelope(self.envelope()?, Schema::Absent));
        }
        let schema = match self.peek()? {
            b'n' => {
                self.literal(b"null")?;
                Schema::Absent
            }
            b'{' => match known(&self.bytes[self.at..]) {
                Some((len, k)) => {
                    self.at += len;
                    Schema::Known(k)
                }
                None => Schema::New(self.value(1)?),
            },
            _ => return None,
        };
        self.eat(b',')?;
        self.eat(b'"')?;
        if self.plain_string()? != "payload" {
            return None;
        }
        self.eat(b':')?;
        let message = if self.peek()? == b'n' {
            self.literal(b"null")?;
            Message::Tombstone
        } else {
            Message::Envelope(self.envelope()?, schema)
        };
        self.eat(b'}')?;
        Some(message)
    }

    /// `{"schema":`, consumed (false: something else, partly consumed).
    fn schema_key(&mut self) -> bool {
        self.eat(b'{').is_some()
            && self.eat(b'"').is_some()
            && self.plain_string() == Some("schema")
            && self.eat(b':').is_some()
    }

    fn envelope(&mut self) -> Option<Envelope<'a>> {
        let mut before = None;
        let mut after = None;
        let mut op = None;
        let mut source = None;
        self.object(|s, key| {
            match key {
                "before" if before.is_none() => before = Some(s.image()?),
                "after" if after.is_none() => after = Some(s.image()?),
                "op" if op.is_none() => {
                    s.eat(b'"')?;
                    op = Some(s.plain_string()?);
                }
                "source" if source.is_none() => source = Some(s.source()?),
                // The other shape, and repeated fields: serde decides.
                "before" | "after" | "op" | "source" | "schema" | "payload" => return None,
                _ => {
                    s.skip_value(0)?;
                }
            }
            Some(())
        })?;
        Some(Envelope {
            before: before.flatten(),
            after: after.flatten(),
            op: op?,
            source: source.unwrap_or_default(),
        })
    }
}

/// Where a string's plain run starting at `at` stops: the first `"`, `\`
/// or control character (or the end). Eight bytes at a time: a byte is
/// flagged when `x - 1` borrows into its top bit for `x` = byte ^ quote,
/// byte ^ backslash, or when byte - 0x20 does (the lowest flag is exact).
#[inline]
fn string_stop(bytes: &[u8], mut at: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let v = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let quote = v ^ (ONES * u64::from(b'"'));
        let backslash = v ^ (ONES * u64::from(b'\\'));
        let flags = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (v.wrapping_sub(ONES * 0x20) & !v);
        let flags = flags & HIGH;
        if flags != 0 {
            return at + (flags.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    match bytes[at.min(bytes.len())..]
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
    {
        Some(i) => at + i,
        None => bytes.len(),
    }
}

/// Where a run of ASCII digits starting at `at` stops, eight bytes at a
/// time: a byte is a digit when its high nibble is 3 both as it is and
/// with 6 added (the lowest non-digit found is exact).
#[inline]
fn digits_stop(bytes: &[u8], mut at: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH_NIBBLES: u64 = 0xF0F0_F0F0_F0F0_F0F0;
    const THREES: u64 = 0x3030_3030_3030_3030;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let v = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let odd =
            ((v & HIGH_NIBBLES) ^ THREES) | ((v.wrapping_add(ONES * 6) & HIGH_NIBBLES) ^ THREES);
        if odd != 0 {
            return at + (odd.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    match bytes[at.min(bytes.len())..]
        .iter()
        .position(|b| !b.is_ascii_digit())
    {
        Some(i) => at + i,
        None => bytes.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans knowing no schema.
    fn scan_unknown(text: &str) -> Option<Message<'_, ()>> {
        scan(text, |_| None)
    }

    /// A bare envelope.
    fn bare(text: &str) -> Envelope<'_> {
        match scan_unknown(text) {
            Some(Message::Envelope(e, Schema::Absent)) => e,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn reads_the_envelope_and_keeps_row_values_raw() {
        let text = r#"{"before":null,"after":{"id":7,"status":"paid","total_amount":"45.48","x":{"a":[1,2.5e3,true,null]}},
            "source":{"version":"3.6.3.Final","ts_ms":17,"sequence":"[null,\"26497112\"]","xmin":null},
            "transaction":null,"op":"c","ts_ms":1,"ts_ns":-0}"#;
        let e = bare(text);
        assert_eq!(e.op, "c");
        assert_eq!(e.source.ts_ms, Some(17));
        assert_eq!(e.before, None);
        assert_eq!(
            e.after.unwrap(),
            vec![
                ("id", "7"),
                ("status", "\"paid\""),
                ("total_amount", "\"45.48\""),
                ("x", "{\"a\":[1,2.5e3,true,null]}"),
            ]
        );
    }

    #[test]
    fn reads_schema_and_payload_passing_over_a_known_schema() {
        let payload = r#"{"after":{"id":7},"op":"c","source":{"ts_ms":17}}"#;
        let schema = r#"{"type":"struct","fields":[{"field":"a\u00e9","x":[1,-2.5e3,true,null]}]}"#;
        let message = format!("{{ \"schema\" : {schema} ,\n\"payload\":{payload} }}");
        assert_eq!(
            scan_unknown(&message),
            Some(Message::Envelope(bare(payload), Schema::New(schema)))
        );
        // `known` sees the bytes from the schema on, and the scanner goes on
        // after the length it says.
        let known = |rest: &[u8]| {
            rest.starts_with(schema.as_bytes())
                .then_some((schema.len(), 7))
        };
        assert_eq!(
            scan(&message, known),
            Some(Message::Envelope(bare(payload), Schema::Known(7)))
        );
        let null = format!(r#"{{"schema":null,"payload":{payload}}}"#);
        assert_eq!(
            scan_unknown(&null),
            Some(Message::Envelope(bare(payload), Schema::Absent))
        );
        for tombstone in [
            format!(r#"{{"schema":{schema},"payload":null}}"#),
            r#"{"schema":null,"payload":null}"#.to_owned(),
        ] {
            assert_eq!(scan(&tombstone, known), Some(Message::Tombstone));
        }
        // A known schema followed by something that is not JSON.
        let broken = format!(r#"{{"schema":{schema}}},"payload":null}}"#);
        assert_eq!(scan(&broken, known), None);
    }

    #[test]
    fn strings_stop_at_quotes_backslashes_and_control_characters() {
        let text = "abcdefghijklmnopqrstuvwxyz0123456789";
        for stop in ["\"", "\\", "\n", "\u{1}"] {
            for at in 0..text.len() {
                let s = format!("{}{stop}{}", &text[..at], &text[at..]);
                for from in 0..=at {
                    assert_eq!(string_stop(s.as_bytes(), from), at, "{s:?} from {from}");
                }
            }
        }
        assert_eq!(string_stop(b"plain \xc3\xa9 text", 0), 13);
        assert_eq!(string_stop(b"", 0), 0);
    }

    #[test]
    fn digit_runs_stop_at_the_first_other_byte() {
        for other in 0..=255u8 {
            if other.is_ascii_digit() {
                continue;
            }
            for at in 0..20 {
                let mut s: Vec<u8> = b"12345678901234567890".to_vec();
                s.insert(at, other);
                for from in 0..=at {
                    assert_eq!(digits_stop(&s, from), at, "{other} at {at} from {from}");
                }
            }
        }
        assert_eq!(digits_stop(b"0123456789", 0), 10);
    }

    #[test]
    fn integers_read_like_std() {
        for text in [
            "0",
            "-0",
            "7",
            "-7",
            "1795505417056",
            "123456789012345678",
            "-123456789012345678",
            "9223372036854775807",
            "-9223372036854775808",
            "9223372036854775808",
            "1.5",
            "1e3",
        ] {
            let mut s = Scanner {
                text,
                bytes: text.as_bytes(),
                at: 0,
            };
            assert_eq!(s.int(), text.parse::<i64>().ok(), "{text}");
        }
    }

    #[test]
    fn leaves_anything_unusual_to_serde() {
        for text in [
            r#"{"op":"c","op":"u"}"#,
            r#"{"op":"\u0063"}"#,
            r#"{"after":{"i\u0064":1},"op":"c"}"#,
            r#"{"after":[1],"op":"c"}"#,
            r#"{"after":{"id":01},"op":"c"}"#,
            r#"{"after":{"id":1.},"op":"c"}"#,
            r#"{"after":{"id":1,},"op":"c"}"#,
            r#"{"after":{"n":"a\qb"},"op":"c"}"#,
            r#"{"source":{"ts_ms":1.5},"op":"c"}"#,
            r#"{"source":{"ts_ms":99999999999999999999},"op":"c"}"#,
            r#"{"source":{"ts_ms":1,"ts_ms":2},"op":"c"}"#,
            r#"{"before":null}"#,
            r#"{"op":"c"} x"#,
            r#"{"op":"c""#,
            "{\"op\":\"c\",\"x\":\"tab\there\"}",
            "[]",
            r#"{"payload":{"op":"c"},"schema":null}"#,
            r#"{"payload":{"op":"c"}}"#,
            r#"{"schema":null}"#,
            r#"{"schema":null,"schema":null,"payload":{"op":"c"}}"#,
            r#"{"schema":null,"x":1,"payload":{"op":"c"}}"#,
            r#"{"schema":null,"payload":{"op":"c"},"x":1}"#,
            r#"{"schema":null,"payload":{"op":"c"},"payload":null}"#,
            r#"{"schema":null,"payload":{"op":"c","payload":null}}"#,
            r#"{"sch\u0065ma":null,"payload":{"op":"c"}}"#,
            r#"{"schema":null,"p\u0061yload":{"op":"c"}}"#,
            r#"{"schema":"s","payload":{"op":"c"}}"#,
            r#"{"schema":[],"payload":{"op":"c"}}"#,
            r#"{"schema":7,"payload":{"op":"c"}}"#,
            r#"{"schema":true,"payload":{"op":"c"}}"#,
            r#"{"schema":{"a":},"payload":{"op":"c"}}"#,
            r#"{"schema":{"a":"\x"},"payload":{"op":"c"}}"#,
            r#"{"schema":{"a":1},"payload":{"op":"c"}"#,
            r#"{"schema":{"a":1},"payload":[]}"#,
            r#"{"schema":{"a":1},"payload":nul}"#,
            r#"{"schema":{"a":1},"payload":"x"}"#,
        ] {
            assert_eq!(scan_unknown(text), None, "{text}");
        }
    }
}
