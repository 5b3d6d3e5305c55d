//! The four aggregates of the README's contract.

use rust_decimal::Decimal;

use super::{sum_updates, Aggregate, Contribution, Measure, Update, Updates};
use crate::cdc::{Customer, Minute, Order, OrderItem, Product, Table, TableChange};

/// Orders by (minute of created_at in UTC, status): count and sum(total_amount).
pub struct OrdersByMinute;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrderTotals {
    pub orders: i64,
    pub revenue: Decimal,
}

/// Product sales by product_id, from order_items: sum(quantity),
/// sum(quantity * unit_price) and count(*).
pub struct ProductSales;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SalesTotals {
    pub units: i64,
    pub revenue: Decimal,
    pub lines: i64,
}

/// New customers by minute of created_at in UTC.
pub struct CustomersByMinute;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CustomerTotals {
    pub customers: i64,
}

/// The products dimension: latest name, category and price by product_id.
/// The newest row wins, so it reads no old row of an update and only the key
/// of a delete: it works with REPLICA IDENTITY DEFAULT.
pub struct Products;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProductInfo {
    pub name: String,
    pub category: String,
    pub price: Decimal,
    /// The product was deleted in Postgres. A delete needs only the key, so
    /// a deleted product's row keeps no name, category or price.
    pub deleted: bool,
}

impl Aggregate for OrdersByMinute {
    const NAME: &'static str = "orders_by_minute";
    const SOURCE: Table = Table::Orders;
    type Key = (Minute, String);
    type Value = OrderTotals;

    fn key_minute((minute, _): &Self::Key) -> Option<Minute> {
        Some(*minute)
    }

    fn updates(change: &TableChange) -> Updates<Self::Key, Self::Value> {
        let TableChange::Order(c) = change else {
            return Updates::new();
        };
        let contribution = |o: &Order| {
            let key = (Minute::of(o.created_at), o.status.clone());
            (
                key,
                OrderTotals {
                    orders: 1,
                    revenue: o.total_amount,
                },
            )
        };
        sum_updates(
            c.before.as_ref().map(contribution),
            c.after.as_ref().map(contribution),
        )
    }
}

impl Aggregate for ProductSales {
    const NAME: &'static str = "product_sales";
    const SOURCE: Table = Table::OrderItems;
    type Key = i64;
    type Value = SalesTotals;

    fn updates(change: &TableChange) -> Updates<Self::Key, Self::Value> {
        let TableChange::OrderItem(c) = change else {
            return Updates::new();
        };
        let contribution = |i: &OrderItem| {
            let totals = SalesTotals {
                units: i.quantity,
                revenue: Decimal::from(i.quantity) * i.unit_price,
                lines: 1,
            };
            (i.product_id, totals)
        };
        sum_updates(
            c.before.as_ref().map(contribution),
            c.after.as_ref().map(contribution),
        )
    }
}

impl Aggregate for CustomersByMinute {
    const NAME: &'static str = "customers_by_minute";
    const SOURCE: Table = Table::Customers;
    type Key = Minute;
    type Value = CustomerTotals;

    fn key_minute(minute: &Self::Key) -> Option<Minute> {
        Some(*minute)
    }

    fn updates(change: &TableChange) -> Updates<Self::Key, Self::Value> {
        let TableChange::Customer(c) = change else {
            return Updates::new();
        };
        let contribution =
            |c: &Customer| (Minute::of(c.created_at), CustomerTotals { customers: 1 });
        sum_updates(
            c.before.as_ref().map(contribution),
            c.after.as_ref().map(contribution),
        )
    }
}

impl Aggregate for Products {
    const NAME: &'static str = "products";
    const SOURCE: Table = Table::Products;
    type Key = i64;
    type Value = ProductInfo;
    const KEEPS_STORED_ROWS: bool = false;

    fn updates(change: &TableChange) -> Updates<Self::Key, Self::Value> {
        let TableChange::Product(c) = change else {
            return Updates::new();
        };
        let info = |p: &Product| ProductInfo {
            name: p.name.clone(),
            category: p.category.clone(),
            price: p.price,
            deleted: false,
        };
        let mut updates = Updates::new();
        match (&c.before, &c.after) {
            (_, Some(after)) => {
                // A changed primary key shows up as delete + create in Debezium,
                // so before and after of an update share the id.
                updates.push((after.id, Update::Set(info(after))));
            }
            // A delete carries only the key (all REPLICA IDENTITY DEFAULT
            // gives): the row says deleted and keeps no other value.
            (Some(key), None) => updates.push((
                key.id,
                Update::Set(ProductInfo {
                    deleted: true,
                    ..ProductInfo::default()
                }),
            )),
            (None, None) => {}
        }
        updates
    }
}

impl Contribution for OrderTotals {
    fn plus(&self, o: &Self) -> Self {
        OrderTotals {
            orders: self.orders + o.orders,
            revenue: self.revenue + o.revenue,
        }
    }
    fn minus(&self, o: &Self) -> Self {
        OrderTotals {
            orders: self.orders - o.orders,
            revenue: self.revenue - o.revenue,
        }
    }
    fn is_zero(&self) -> bool {
        self.orders == 0 && self.revenue.is_zero()
    }
}

impl Contribution for SalesTotals {
    fn plus(&self, o: &Self) -> Self {
        SalesTotals {
            units: self.units + o.units,
            revenue: self.revenue + o.revenue,
            lines: self.lines + o.lines,
        }
    }
    fn minus(&self, o: &Self) -> Self {
        SalesTotals {
            units: self.units - o.units,
            revenue: self.revenue - o.revenue,
            lines: self.lines - o.lines,
        }
    }
    fn is_zero(&self) -> bool {
        self.units == 0 && self.revenue.is_zero() && self.lines == 0
    }
}

impl Contribution for CustomerTotals {
    fn plus(&self, o: &Self) -> Self {
        CustomerTotals {
            customers: self.customers + o.customers,
        }
    }
    fn minus(&self, o: &Self) -> Self {
        CustomerTotals {
            customers: self.customers - o.customers,
        }
    }
    fn is_zero(&self) -> bool {
        self.customers == 0
    }
}

/// Sum aggregates add their deltas and add up across partitions.
macro_rules! sum_measure {
    ($($t:ty),*) => {$(
        impl Measure for $t {
            fn apply(&mut self, update: &Update<Self>) {
                *self = match update {
                    Update::Add(delta) => self.plus(delta),
                    Update::Set(value) => value.clone(),
                };
            }
            fn merge(&mut self, other: &Self) {
                *self = self.plus(other);
            }
            fn is_empty(&self) -> bool {
                self.is_zero()
            }
        }
    )*};
}
sum_measure!(OrderTotals, SalesTotals, CustomerTotals);

impl Measure for ProductInfo {
    fn apply(&mut self, update: &Update<Self>) {
        // A dimension is never summed: Products::updates emits only Set.
        debug_assert!(matches!(update, Update::Set(_)));
        let (Update::Set(value) | Update::Add(value)) = update;
        *self = value.clone();
    }
    /// A product's events all come from one partition (Debezium keys by
    /// primary key); the row of the partition that still has it wins.
    fn merge(&mut self, other: &Self) {
        if self.deleted || *self == ProductInfo::default() {
            *self = other.clone();
        }
    }
    fn is_empty(&self) -> bool {
        self.deleted
    }
}
