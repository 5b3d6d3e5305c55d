//! Debezium change events -> typed changes of the four captured tables.
//!
//! [`decode`] turns one Kafka record (topic, value bytes) into a [`Decoded`]:
//! a typed [`TableChange`], a tombstone, a truncate, or an event of a topic we
//! do not capture. Anything we cannot read is a [`DecodeError`] with a reason
//! that names what was wrong; nothing is dropped silently.

mod envelope;
mod fast;
mod field;
mod position;
mod schemas;
mod tables;

pub use envelope::{decode, decode_event, decode_with_serde, scanned, Decoded, Event};
pub use field::Minute;
pub use position::{Origin, Position, SnapshotId};
pub use tables::{Customer, Order, OrderItem, Product, ProductKey, TableChange};

use tables::{OldRow, OldRowNeed, SourceRow};

use std::fmt;

/// The source tables the processor captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Customers,
    Products,
    Orders,
    OrderItems,
}

impl Table {
    pub const ALL: [Table; 4] = [
        Table::Customers,
        Table::Products,
        Table::Orders,
        Table::OrderItems,
    ];

    /// The Postgres table name (Debezium topics are `<prefix>.public.<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Table::Customers => "customers",
            Table::Products => "products",
            Table::Orders => "orders",
            Table::OrderItems => "order_items",
        }
    }

    pub fn topic(self, prefix: &str) -> String {
        format!("{prefix}.public.{}", self.name())
    }

    /// The table a topic carries, if it is one of ours.
    pub fn from_topic(topic: &str, prefix: &str) -> Option<Table> {
        let name = topic.strip_prefix(prefix)?.strip_prefix(".public.")?;
        Table::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether the table's aggregates subtract the old row of an update or a
    /// delete, and so need the whole of it: Debezium sends that only for a
    /// table with `REPLICA IDENTITY FULL`. The others (the products
    /// dimension) need only a delete's key, which `DEFAULT` gives too.
    pub fn needs_whole_old_row(self) -> bool {
        fn whole<R: SourceRow>() -> bool {
            <R::Old as OldRow>::NEED == OldRowNeed::WholeRow
        }
        match self {
            Table::Customers => whole::<Customer>(),
            Table::Products => whole::<Product>(),
            Table::Orders => whole::<Order>(),
            Table::OrderItems => whole::<OrderItem>(),
        }
    }

    /// The statement that gives the table the replica identity its
    /// aggregates need.
    pub fn replica_identity_fix(self) -> String {
        format!("ALTER TABLE {self} REPLICA IDENTITY FULL")
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl TableChange {
    /// The source table the change is of.
    pub fn table(&self) -> Table {
        match self {
            TableChange::Customer(_) => Table::Customers,
            TableChange::Product(_) => Table::Products,
            TableChange::Order(_) => Table::Orders,
            TableChange::OrderItem(_) => Table::OrderItems,
        }
    }

    pub fn op(&self) -> Op {
        match self {
            TableChange::Customer(c) => c.op,
            TableChange::Product(c) => c.op,
            TableChange::Order(c) => c.op,
            TableChange::OrderItem(c) => c.op,
        }
    }

    /// The primary key of the source row (every captured table has an
    /// `id`): what tells apart the rows of one WAL record, which share a
    /// position.
    pub fn row_id(&self) -> i64 {
        fn id<R, B>(
            c: &Change<R, B>,
            of_after: impl Fn(&R) -> i64,
            of_before: impl Fn(&B) -> i64,
        ) -> i64 {
            c.after
                .as_ref()
                .map(of_after)
                .or_else(|| c.before.as_ref().map(of_before))
                .expect("a decoded change has a before or an after image")
        }
        match self {
            TableChange::Customer(c) => id(c, |r| r.id, |r| r.id),
            TableChange::Product(c) => id(c, |r| r.id, |r| r.id),
            TableChange::Order(c) => id(c, |r| r.id, |r| r.id),
            TableChange::OrderItem(c) => id(c, |r| r.id, |r| r.id),
        }
    }
}

/// Debezium's `op` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `c`: a row was inserted.
    Create,
    /// `u`: a row was updated.
    Update,
    /// `d`: a row was deleted.
    Delete,
    /// `r`: a row read by the initial snapshot.
    Read,
}

impl Op {
    /// For metrics: what happened to the row, in words.
    pub fn label(self) -> &'static str {
        match self {
            Op::Create => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Read => "snapshot",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
        }
    }
}

/// One row change: the row before and after it, as Debezium sends them.
/// Create and read carry only `after`, delete only `before`. `B` is what the
/// table's aggregates read of the old row: the whole row (`R`) where they
/// subtract it, less where they do not (see [`TableChange::Product`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Change<R, B = R> {
    pub op: Op,
    pub before: Option<B>,
    pub after: Option<R>,
}

/// Why an event could not be decoded. The kind is a stable, low-cardinality
/// label (metrics, dead-letter headers); the detail says what exactly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct DecodeError {
    pub kind: DecodeErrorKind,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodeErrorKind {
    /// Not JSON, or not a Debezium envelope.
    MalformedJson,
    /// An `op` we do not know.
    UnknownOp,
    /// A column is missing or has a value of the wrong type.
    BadField,
    /// An update or delete without the before image the table's aggregates
    /// need: none at all, or one that holds only the key where they subtract
    /// the whole old row (the table has REPLICA IDENTITY DEFAULT).
    MissingBefore,
    /// A create, update or read without an after image.
    MissingAfter,
    /// A change whose place in Postgres's log cannot be told: no
    /// `source.lsn` or `source.sequence`, or a read of an incremental
    /// snapshot (see [`Origin`]).
    NoPosition,
}

impl DecodeErrorKind {
    pub const ALL: [DecodeErrorKind; 6] = [
        DecodeErrorKind::MalformedJson,
        DecodeErrorKind::UnknownOp,
        DecodeErrorKind::BadField,
        DecodeErrorKind::MissingBefore,
        DecodeErrorKind::MissingAfter,
        DecodeErrorKind::NoPosition,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DecodeErrorKind::MalformedJson => "malformed_json",
            DecodeErrorKind::UnknownOp => "unknown_op",
            DecodeErrorKind::BadField => "bad_field",
            DecodeErrorKind::MissingBefore => "missing_before",
            DecodeErrorKind::MissingAfter => "missing_after",
            DecodeErrorKind::NoPosition => "no_position",
        }
    }
}

impl fmt::Display for DecodeErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl DecodeError {
    pub(crate) fn new(kind: DecodeErrorKind, detail: impl Into<String>) -> Self {
        DecodeError {
            kind,
            detail: detail.into(),
        }
    }

    /// Text that is not the JSON it should be.
    pub(crate) fn malformed(detail: impl std::fmt::Display) -> Self {
        DecodeError::new(DecodeErrorKind::MalformedJson, detail.to_string())
    }
}
