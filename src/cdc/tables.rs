//! Typed rows of the captured tables: only the columns the aggregates use.

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

/// A decoded change of one of the captured tables.
#[derive(Debug, Clone, PartialEq)]
pub enum TableChange {
    Customer(Change<Customer>),
    Product(Change<Product>),
    Order(Change<Order>),
    OrderItem(Change<OrderItem>),
}

/// A row type read from a Debezium row image.
pub(crate) trait SourceRow: Sized {
    /// Every column of the source table, used or not: a column outside this
    /// list is reported as unknown (the source schema moved on).
    const COLUMNS: &'static [&'static str];
    fn read(row: &Row<'_>) -> Result<Self, DecodeError>;
}

impl SourceRow for Customer {
    const COLUMNS: &'static [&'static str] = &["id", "email", "full_name", "created_at"];
    fn read(row: &Row<'_>) -> Result<Self, DecodeError> {
        Ok(Customer {
            id: row.i64("id")?,
            created_at: row.timestamp("created_at")?,
        })
    }
}

impl SourceRow for Product {
    const COLUMNS: &'static [&'static str] = &["id", "name", "category", "price"];
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
    fn read(row: &Row<'_>) -> Result<Self, DecodeError> {
        Ok(OrderItem {
            id: row.i64("id")?,
            product_id: row.i64("product_id")?,
            quantity: row.i64("quantity")?,
            unit_price: row.decimal("unit_price")?,
        })
    }
}
