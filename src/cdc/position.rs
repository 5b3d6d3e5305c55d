//! Where a change comes from in Postgres's log: what recognises an event
//! Debezium sends again at a new Kafka offset. The facts behind it were
//! measured against the real connector (docs/SOURCE-POSITIONS.md); the
//! ordering argument is in ARCHITECTURE.md.

use super::{DecodeError, DecodeErrorKind, Op, Table};

/// A streamed change's place in the order Debezium delivers changes:
/// `commit` is `source.sequence[0]`, the end LSN of the commit delivered
/// before this change's transaction (0 for the first transaction after a
/// snapshot), `lsn` is `source.lsn`. Compared as a pair, positions never
/// go down along the delivery order; they are equal only for rows of one
/// WAL record (a COPY page), which have distinct primary keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub commit: u64,
    pub lsn: u64,
}

impl std::fmt::Display for Position {
    /// As Debezium's `source.sequence` spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {}]", self.commit, self.lsn)
    }
}

/// Which snapshot a row comes from: its LSN (the slot's consistent point)
/// and when it started (`source.ts_ms`), both the same on all its rows. A
/// snapshot taken again has a higher LSN, or the same one if nothing was
/// written to the WAL in between, but always a later start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SnapshotId {
    pub lsn: u64,
    pub started_ms: i64,
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the snapshot at LSN {} started at {} ms",
            self.lsn, self.started_ms
        )
    }
}

/// What an event says about its place in the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A row of a snapshot.
    Snapshot(SnapshotId),
    /// A streamed change (op c, u or d).
    Stream(Position),
}

/// The position fields of an envelope's `source` block, as read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SourceFields {
    pub ts_ms: Option<i64>,
    pub lsn: Option<u64>,
    /// `sequence`, if present: its first element (None: `null`).
    pub sequence: Option<Option<u64>>,
    /// `snapshot` is `"incremental"`.
    pub incremental: bool,
}

impl SourceFields {
    /// The origin of a change of `table` with `op`.
    pub fn origin(&self, table: Table, op: Op) -> Result<Origin, DecodeError> {
        let unplaced = |what: &str| {
            DecodeError::new(
                DecodeErrorKind::NoPosition,
                format!("{table} op {}: {what}", op.as_str()),
            )
        };
        let lsn = self
            .lsn
            .ok_or_else(|| unplaced("no source.lsn, so a repeat of it could not be recognised"))?;
        match op {
            // Its rows come again at new positions in every chunk; nothing
            // here can tell them from rows already counted.
            Op::Read if self.incremental => Err(unplaced(
                "a row of an incremental snapshot, which the aggregates cannot place: \
                 see \"A new snapshot\" in the README",
            )),
            Op::Read => {
                let started_ms = self.ts_ms.ok_or_else(|| {
                    unplaced("no source.ts_ms, which tells a snapshot started again from the first")
                })?;
                Ok(Origin::Snapshot(SnapshotId { lsn, started_ms }))
            }
            Op::Create | Op::Update | Op::Delete => {
                let commit = self.sequence.ok_or_else(|| {
                    unplaced("no source.sequence, so its transaction's place is unknown")
                })?;
                Ok(Origin::Stream(Position {
                    commit: commit.unwrap_or(0),
                    lsn,
                }))
            }
        }
    }
}

/// `source.sequence` as the connector writes it: a JSON array of two
/// strings of digits or nulls, itself in a string (`"[null,\"26497112\"]"`).
/// Returns its first element; None if it is not that shape.
pub(crate) fn sequence_start(text: &str) -> Option<Option<u64>> {
    let inner = text.trim().strip_prefix('[')?.strip_suffix(']')?;
    let (first, second) = inner.split_once(',')?;
    let element = |e: &str| -> Option<Option<u64>> {
        let e = e.trim();
        if e == "null" {
            return Some(None);
        }
        let digits = e.strip_prefix('"')?.strip_suffix('"')?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok().map(Some)
    };
    element(second)?;
    element(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_first_element_of_a_sequence() {
        assert_eq!(sequence_start(r#"[null,"26497112"]"#), Some(None));
        assert_eq!(
            sequence_start(r#"["26517664","26516464"]"#),
            Some(Some(26517664))
        );
        assert_eq!(sequence_start(r#"[ "1" , null ]"#), Some(Some(1)));
        for bad in [
            "",
            "[]",
            "[1,2]",
            r#"["1"]"#,
            r#"["a","1"]"#,
            r#"["-1","1"]"#,
            r#"["1","2","3"]"#,
        ] {
            assert_eq!(sequence_start(bad), None, "{bad}");
        }
    }

    #[test]
    fn positions_order_by_commit_first() {
        let p = |commit, lsn| Position { commit, lsn };
        // Transaction 742 commits after 743, though its changes come first
        // in the WAL (docs/SOURCE-POSITIONS.md, experiment 1).
        assert!(p(0, 26516680) < p(26517664, 26516464));
        assert!(p(26517664, 26516464) < p(26517664, 26517016));
    }

    #[test]
    fn a_change_without_a_place_is_an_error_that_says_why() {
        let fields = SourceFields {
            ts_ms: Some(7),
            lsn: Some(5),
            sequence: None,
            incremental: false,
        };
        assert_eq!(
            fields.origin(Table::Orders, Op::Read),
            Ok(Origin::Snapshot(SnapshotId {
                lsn: 5,
                started_ms: 7
            }))
        );
        let no_time = SourceFields {
            ts_ms: None,
            ..fields
        };
        let e = no_time.origin(Table::Orders, Op::Read).unwrap_err();
        assert!(e.detail.contains("source.ts_ms"), "{e}");
        let e = fields.origin(Table::Orders, Op::Update).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::NoPosition);
        assert!(e.detail.contains("source.sequence"), "{e}");
        let e = SourceFields::default()
            .origin(Table::Orders, Op::Create)
            .unwrap_err();
        assert!(e.detail.contains("source.lsn"), "{e}");
        let incremental = SourceFields {
            ts_ms: Some(7),
            lsn: Some(5),
            sequence: Some(None),
            incremental: true,
        };
        assert!(incremental.origin(Table::Orders, Op::Read).is_err());
    }
}
