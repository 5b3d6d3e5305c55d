//! `etl-processor reconcile`: each aggregate's GROUP BY over the current
//! Postgres state against what ClickHouse holds, to the cent; and the check
//! of the source tables' replica identity, which `run` makes at start-up too.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use anyhow::Context as _;
use clickhouse::Row;
use rust_decimal::Decimal;
use serde::Deserialize;

use crate::aggregate::{Aggregate, CustomersByMinute, OrdersByMinute, ProductSales, Products};
use crate::cdc::{Minute, Table};
use crate::registry::aggregate_of;
use crate::replay::money;
use crate::sink::ClickHouseSink;

/// An aggregate row reduced to comparable text, keyed for ordered output.
type Side = BTreeMap<Key, String>;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub aggregate: &'static str,
    /// What the key is sorted by (a minute's seconds, a product id).
    order: i64,
    pub label: String,
}

/// A key whose rows differ; `None` where a side has no (non-zero) row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub key: Key,
    pub postgres: Option<String>,
    pub clickhouse: Option<String>,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |s: &Option<String>| s.clone().unwrap_or_else(|| "no row".into());
        write!(
            f,
            "{} {}: postgres {} | clickhouse {}",
            self.key.aggregate,
            self.key.label,
            side(&self.postgres),
            side(&self.clickhouse)
        )
    }
}

#[derive(Debug, Default)]
pub struct Report {
    /// Keys compared, over all aggregates.
    pub compared: usize,
    pub differences: Vec<Difference>,
    /// Source tables whose replica identity keeps their aggregates from
    /// being exact once rows are updated or deleted.
    pub replica_identity: Vec<ReplicaIdentityWarning>,
}

impl Report {
    pub fn is_exact(&self) -> bool {
        self.differences.is_empty()
    }
}

/// Compares every aggregate. Errors only when a side cannot be read.
pub async fn reconcile(postgres_url: &str, sink: &ClickHouseSink) -> anyhow::Result<Report> {
    let (pg, connection) = tokio_postgres::connect(postgres_url, tokio_postgres::NoTls)
        .await
        .context("connecting to Postgres (setting ETL_POSTGRES_URL)")?;
    let connection = tokio::spawn(connection);
    // One snapshot for all four queries, so they see one state.
    pg.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let mut expected = Side::new();
    let mut actual = Side::new();
    postgres_side(&pg, &mut expected).await?;
    let replica_identity = replica_identity_warnings(&replica_identities(&pg).await?);
    pg.batch_execute("COMMIT").await?;
    drop(pg);
    let _ = connection.await;
    clickhouse_side(sink, &mut actual).await?;

    let mut report = Report {
        replica_identity,
        ..Report::default()
    };
    let keys: std::collections::BTreeSet<&Key> = expected.keys().chain(actual.keys()).collect();
    report.compared = keys.len();
    for key in keys {
        let (p, c) = (expected.get(key), actual.get(key));
        if p != c {
            report.differences.push(Difference {
                key: key.clone(),
                postgres: p.cloned(),
                clickhouse: c.cloned(),
            });
        }
    }
    Ok(report)
}

/// `pg_class.relreplident`: which old row Postgres logs for an update or a
/// delete, and so what Debezium can put in its before image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `d`: the primary key's columns only (Debezium: no before image for an
    /// update, the key and placeholders for a delete).
    Default,
    /// `f`: the whole row.
    Full,
    /// `i`: the columns of one index only.
    Index,
    /// `n`: nothing.
    Nothing,
}

impl ReplicaIdentity {
    pub fn from_relreplident(code: &str) -> Option<ReplicaIdentity> {
        Some(match code {
            "d" => ReplicaIdentity::Default,
            "f" => ReplicaIdentity::Full,
            "i" => ReplicaIdentity::Index,
            "n" => ReplicaIdentity::Nothing,
            _ => return None,
        })
    }

    /// As `ALTER TABLE ... REPLICA IDENTITY` spells it.
    pub fn as_sql(self) -> &'static str {
        match self {
            ReplicaIdentity::Default => "DEFAULT",
            ReplicaIdentity::Full => "FULL",
            ReplicaIdentity::Index => "USING INDEX",
            ReplicaIdentity::Nothing => "NOTHING",
        }
    }
}

/// A captured table whose aggregates subtract the old row, without
/// `REPLICA IDENTITY FULL`: its updates and deletes reach the processor
/// without that row and go to the dead-letter topic (`missing_before`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaIdentityWarning {
    pub table: Table,
    pub identity: ReplicaIdentity,
}

impl fmt::Display for ReplicaIdentityWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let table = self.table;
        write!(
            f,
            "table {table} has REPLICA IDENTITY {}: Debezium sends its updates and deletes without \
             the whole old row, which {} subtracts, so they go to the dead-letter topic \
             (reason missing_before) and the aggregate misses them; run {}",
            self.identity.as_sql(),
            aggregate_of(table),
            table.replica_identity_fix()
        )
    }
}

/// The warnings for the captured tables' replica identities, given as
/// (table name, `relreplident`): one for each table whose aggregates need the
/// whole old row and that does not have `FULL`. A table missing from the
/// list is not warned about (its GROUP BY fails on its own).
pub fn replica_identity_warnings(identities: &[(String, String)]) -> Vec<ReplicaIdentityWarning> {
    Table::ALL
        .into_iter()
        .filter(|table| table.needs_whole_old_row())
        .filter_map(|table| {
            let (_, code) = identities.iter().find(|(name, _)| name == table.name())?;
            let identity = ReplicaIdentity::from_relreplident(code)?;
            (identity != ReplicaIdentity::Full)
                .then_some(ReplicaIdentityWarning { table, identity })
        })
        .collect()
}

/// (table name, `relreplident`) of the captured tables in schema public.
async fn replica_identities(pg: &tokio_postgres::Client) -> anyhow::Result<Vec<(String, String)>> {
    let names: Vec<&str> = Table::ALL.iter().map(|t| t.name()).collect();
    let rows = pg
        .query(
            "SELECT c.relname::text, c.relreplident::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relname = ANY($1)",
            &[&names],
        )
        .await
        .context("reading the tables' replica identity (pg_class.relreplident)")?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The replica identity check on its own, as `run` makes it at start-up.
pub async fn check_replica_identity(
    postgres_url: &str,
) -> anyhow::Result<Vec<ReplicaIdentityWarning>> {
    let (pg, connection) = tokio_postgres::connect(postgres_url, tokio_postgres::NoTls)
        .await
        .context("connecting to Postgres (setting ETL_POSTGRES_URL)")?;
    let connection = tokio::spawn(connection);
    let identities = replica_identities(&pg).await;
    drop(pg);
    let _ = connection.await;
    Ok(replica_identity_warnings(&identities?))
}

/// Logs a warning for each captured table without the replica identity its
/// aggregates need; that the check could not be made, at info level (the
/// processor itself does not need Postgres). Bounded by `timeout`.
pub async fn warn_about_replica_identity(postgres_url: String, timeout: std::time::Duration) {
    match tokio::time::timeout(timeout, check_replica_identity(&postgres_url)).await {
        Ok(Ok(warnings)) => {
            for warning in warnings {
                tracing::warn!(table = %warning.table, "{warning}");
            }
        }
        Ok(Err(e)) => tracing::info!("replica identity not checked: {e:#}"),
        Err(_) => tracing::info!(
            ?timeout,
            "replica identity not checked: Postgres did not answer"
        ),
    }
}

fn orders_text(orders: i64, revenue: Decimal) -> String {
    format!("orders={orders} revenue={}", money(revenue))
}

fn sales_text(units: i64, revenue: Decimal, lines: i64) -> String {
    format!("units={units} revenue={} lines={lines}", money(revenue))
}

fn customers_text(customers: i64) -> String {
    format!("customers={customers}")
}

fn product_text(name: &str, category: &str, price: Decimal) -> String {
    format!("name={name:?} category={category:?} price={}", money(price))
}

fn minute_key(aggregate: &'static str, seconds: i64, extra: Option<&str>) -> Key {
    let minute = Minute(seconds);
    let label = match extra {
        Some(e) => format!("{minute}/{e}"),
        None => minute.to_string(),
    };
    Key {
        aggregate,
        order: seconds,
        label,
    }
}

fn id_key(aggregate: &'static str, id: i64) -> Key {
    Key {
        aggregate,
        order: id,
        label: id.to_string(),
    }
}

fn decimal(text: &str) -> anyhow::Result<Decimal> {
    Decimal::from_str(text).with_context(|| format!("{text:?} is not a decimal"))
}

async fn postgres_side(pg: &tokio_postgres::Client, side: &mut Side) -> anyhow::Result<()> {
    let minute = "extract(epoch FROM date_trunc('minute', created_at AT TIME ZONE 'UTC'))::bigint";
    let sql = format!(
        "SELECT {minute}, status, count(*)::bigint, sum(total_amount)::text FROM orders GROUP BY 1, 2"
    );
    for row in pg.query(&sql, &[]).await.context("orders GROUP BY")? {
        let status: String = row.get(1);
        side.insert(
            minute_key(OrdersByMinute::NAME, row.get(0), Some(&status)),
            orders_text(row.get(2), decimal(row.get(3))?),
        );
    }
    let sql = "SELECT product_id, sum(quantity)::bigint, sum(quantity * unit_price)::text, count(*)::bigint \
               FROM order_items GROUP BY product_id";
    for row in pg.query(sql, &[]).await.context("order_items GROUP BY")? {
        side.insert(
            id_key(ProductSales::NAME, row.get(0)),
            sales_text(row.get(1), decimal(row.get(2))?, row.get(3)),
        );
    }
    let sql = format!("SELECT {minute}, count(*)::bigint FROM customers GROUP BY 1");
    for row in pg.query(&sql, &[]).await.context("customers GROUP BY")? {
        side.insert(
            minute_key(CustomersByMinute::NAME, row.get(0), None),
            customers_text(row.get(1)),
        );
    }
    for row in pg
        .query("SELECT id, name, category, price::text FROM products", &[])
        .await?
    {
        let (name, category): (String, String) = (row.get(1), row.get(2));
        side.insert(
            id_key(Products::NAME, row.get(0)),
            product_text(&name, &category, decimal(row.get(3))?),
        );
    }
    Ok(())
}

// Sums of Decimal(18,2) are Decimal(38,2): an i128 of cents.
#[derive(Row, Deserialize)]
struct OrdersSum {
    minute: u32,
    status: String,
    orders: i64,
    revenue: i128,
}

#[derive(Row, Deserialize)]
struct SalesSum {
    product_id: i64,
    units: i64,
    revenue: i128,
    lines: i64,
}

#[derive(Row, Deserialize)]
struct CustomersSum {
    minute: u32,
    customers: i64,
}

#[derive(Row, Deserialize)]
struct ProductLatest {
    product_id: i64,
    name: String,
    category: String,
    price: i64,
}

fn cents(c: i128) -> anyhow::Result<Decimal> {
    Decimal::try_from_i128_with_scale(c, 2).context("sum out of range")
}

// The ClickHouse side of each aggregate: FINAL keeps each (key, partition)'s
// latest row, the sums add the partitions up, and rows whose every sum is zero
// are keys that no longer exist in Postgres. Public so that tests can run them
// on other ClickHouse versions.
pub const CLICKHOUSE_ORDERS_BY_MINUTE: &str =
    "SELECT toUInt32(minute) AS m, status, sum(orders) AS o, sum(revenue) AS r \
     FROM orders_by_minute FINAL GROUP BY m, status HAVING o != 0 OR r != 0";
pub const CLICKHOUSE_PRODUCT_SALES: &str =
    "SELECT product_id, sum(units) AS u, sum(revenue) AS r, sum(lines) AS l \
     FROM product_sales FINAL GROUP BY product_id HAVING u != 0 OR r != 0 OR l != 0";
pub const CLICKHOUSE_CUSTOMERS_BY_MINUTE: &str =
    "SELECT toUInt32(minute) AS m, sum(customers) AS c \
     FROM customers_by_minute FINAL GROUP BY m HAVING c != 0";
pub const CLICKHOUSE_PRODUCTS: &str =
    "SELECT product_id, name, category, price FROM products FINAL WHERE deleted = 0";

async fn clickhouse_side(sink: &ClickHouseSink, side: &mut Side) -> anyhow::Result<()> {
    let ch = sink.client();
    let rows: Vec<OrdersSum> = ch
        .query(CLICKHOUSE_ORDERS_BY_MINUTE)
        .fetch_all()
        .await
        .context("reading orders_by_minute")?;
    for r in rows {
        side.insert(
            minute_key(OrdersByMinute::NAME, r.minute.into(), Some(&r.status)),
            orders_text(r.orders, cents(r.revenue)?),
        );
    }
    let rows: Vec<SalesSum> = ch
        .query(CLICKHOUSE_PRODUCT_SALES)
        .fetch_all()
        .await
        .context("reading product_sales")?;
    for r in rows {
        side.insert(
            id_key(ProductSales::NAME, r.product_id),
            sales_text(r.units, cents(r.revenue)?, r.lines),
        );
    }
    let rows: Vec<CustomersSum> = ch
        .query(CLICKHOUSE_CUSTOMERS_BY_MINUTE)
        .fetch_all()
        .await
        .context("reading customers_by_minute")?;
    for r in rows {
        side.insert(
            minute_key(CustomersByMinute::NAME, r.minute.into(), None),
            customers_text(r.customers),
        );
    }
    let rows: Vec<ProductLatest> = ch
        .query(CLICKHOUSE_PRODUCTS)
        .fetch_all()
        .await
        .context("reading products")?;
    for r in rows {
        side.insert(
            id_key(Products::NAME, r.product_id),
            product_text(&r.name, &r.category, Decimal::new(r.price, 2)),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identities(rows: &[(&str, &str)]) -> Vec<(String, String)> {
        rows.iter()
            .map(|(t, c)| (t.to_string(), c.to_string()))
            .collect()
    }

    #[test]
    fn only_tables_whose_aggregates_subtract_need_replica_identity_full() {
        let full = identities(&[
            ("customers", "f"),
            ("products", "f"),
            ("orders", "f"),
            ("order_items", "f"),
        ]);
        assert_eq!(replica_identity_warnings(&full), []);
        // The products dimension needs only a delete's key: DEFAULT will do.
        let products_default = identities(&[
            ("customers", "f"),
            ("products", "d"),
            ("orders", "f"),
            ("order_items", "f"),
        ]);
        assert_eq!(replica_identity_warnings(&products_default), []);
        let others = identities(&[
            ("customers", "i"),
            ("products", "d"),
            ("orders", "d"),
            ("order_items", "n"),
            ("audit_log", "d"),
        ]);
        let warning = |table, identity| ReplicaIdentityWarning { table, identity };
        assert_eq!(
            replica_identity_warnings(&others),
            [
                warning(Table::Customers, ReplicaIdentity::Index),
                warning(Table::Orders, ReplicaIdentity::Default),
                warning(Table::OrderItems, ReplicaIdentity::Nothing),
            ]
        );
        // A table that is not there is not warned about.
        assert_eq!(
            replica_identity_warnings(&identities(&[("orders", "d")])),
            [warning(Table::Orders, ReplicaIdentity::Default)]
        );
    }

    #[test]
    fn a_warning_names_the_table_the_aggregate_and_the_fix() {
        let texts: Vec<String> = replica_identity_warnings(&identities(&[
            ("orders", "d"),
            ("order_items", "i"),
            ("customers", "n"),
        ]))
        .iter()
        .map(ToString::to_string)
        .collect();
        let text = |table: &str, identity: &str, aggregate: &str| {
            format!(
                "table {table} has REPLICA IDENTITY {identity}: Debezium sends its updates and \
                 deletes without the whole old row, which {aggregate} subtracts, so they go to the \
                 dead-letter topic (reason missing_before) and the aggregate misses them; run \
                 ALTER TABLE {table} REPLICA IDENTITY FULL"
            )
        };
        assert_eq!(
            texts,
            [
                text("customers", "NOTHING", "customers_by_minute"),
                text("orders", "DEFAULT", "orders_by_minute"),
                text("order_items", "USING INDEX", "product_sales"),
            ]
        );
    }
}
