//! Typed rows of the captured tables: only the columns the aggregates use,
//! and of the old row only what they need.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::field::Row;
use super::{Change, DecodeError};

#[derive(Debug, Clone, PartialEq)]
pub struct Customer {
    pub id: i64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Product {
    pub id: i64,
    pub name: String,
    pub category: String,
    pub price: Decimal,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    pub id: i64,
    pub status: String,
    pub total_amount: Decimal,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OrderItem {
    pub id: i64,
    pub product_id: i64,
    pub quantity: i64,
    pub unit_price: Decimal,
}

/// The key of a deleted product: all the products dimension needs of a
/// delete (the newest row wins, so an update needs no old row at all).
#[derive(Debug, Clone, PartialEq)]
pub struct ProductKey {
    pub id: i64,
}

/// A decoded change of one of the captured tables.
#[derive(Debug, Clone, PartialEq)]
pub enum TableChange {
    Customer(Change<Customer>),
    /// `before` is the key of a deleted product, and None for every other op.
    Product(Change<Product, ProductKey>),
    Order(Change<Order>),
    OrderItem(Change<OrderItem>),
}

/// What a table's aggregates need of the old row of an update or a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OldRowNeed {
    /// The whole old row, of updates and deletes: the aggregates subtract
    /// what it contributed. Debezium sends it only for a table with
    /// REPLICA IDENTITY FULL.
    WholeRow,
    /// Only a delete's key: the newest row wins (a dimension). REPLICA
    /// IDENTITY DEFAULT gives that.
    KeyOfDelete,
}

/// The old row as a table's aggregates read it.
pub(crate) trait OldRow: Sized {
    const NEED: OldRowNeed;
    fn read(row: &Row<'_>) -> Result<Self, DecodeError>;
}

/// A row type read from a Debezium row image.
pub(crate) trait SourceRow: Sized {
    /// Every column of the source table, used or not: a column outside this
    /// list is reported as unknown (the source schema moved on).
    const COLUMNS: &'static [&'static str];
    /// The primary key's columns.
    const KEY: &'static [&'static str] = &["id"];
    /// Columns with a constant DEFAULT in Postgres. Debezium writes that
    /// default, not a placeholder, into a before image that holds only the
    /// key, so they do not tell such an image from a whole row.
    const CONSTANT_DEFAULTS: &'static [&'static str] = &[];
    /// What the aggregates read of an update's or delete's before image.
    type Old: OldRow;
    fn read(row: &Row<'_>) -> Result<Self, DecodeError>;
}

/// A table whose aggregates subtract reads its whole old row, as the row.
macro_rules! whole_old_row {
    ($($t:ty),*) => {$(
        impl OldRow for $t {
            const NEED: OldRowNeed = OldRowNeed::WholeRow;
            fn read(row: &Row<'_>) -> Result<Self, DecodeError> {
                <$t as SourceRow>::read(row)
            }
        }
    )*};
}
whole_old_row!(Customer, Order, OrderItem);

impl OldRow for ProductKey {
    const NEED: OldRowNeed = OldRowNeed::KeyOfDelete;
    fn read(row: &Row<'_>) -> Result<Self, DecodeError> {
        Ok(ProductKey { id: row.i64("id")? })
    }
}

impl SourceRow for Customer {
    const COLUMNS: &'static [&'static str] = &["id", "email", "full_name", "created_at"];
    type Old = Customer;
    fn read(row: &Row<'_>) -> Result<Self, DecodeError> {
        Ok(Customer {
            id: row.i64("id")?,
            created_at: row.timestamp("created_at")?,
        })
    }
}

impl SourceRow for Product {
    const COLUMNS: &'static [&'static str] = &["id", "name", "category", "price"];
    type Old = ProductKey;
    fn read(row: &Row<'_>) -> Result<Self, DecodeError> {
        Ok(Product {
            id: row.i64("id")?,
            name: row.string("name")?,
            category: row.string("category")?,
            price: row.decimal("price")?,
        })
    }
}

impl SourceRow for Order {
    const COLUMNS: &'static [&'static str] = &[
        "id",
        "customer_id",
        "status",
        "total_amount",
        "created_at",
        "updated_at",
    ];
    // `total_amount DEFAULT 0` is a placeholder anyway.
    const CONSTANT_DEFAULTS: &'static [&'static str] = &["status"];
    type Old = Order;
    fn read(row: &Row<'_>) -> Result<Self, DecodeError> {
        Ok(Order {
            id: row.i64("id")?,
            status: row.string("status")?,
            total_amount: row.decimal("total_amount")?,
            created_at: row.timestamp("created_at")?,
        })
    }
}

impl SourceRow for OrderItem {
    const COLUMNS: &'static [&'static str] =
        &["id", "order_id", "product_id", "quantity", "unit_price"];
    type Old = OrderItem;
    fn read(row: &Row<'_>) -> Result<Self, DecodeError> {
        Ok(OrderItem {
            id: row.i64("id")?,
            product_id: row.i64("product_id")?,
            quantity: row.i64("quantity")?,
            unit_price: row.decimal("unit_price")?,
        })
    }
}
