//! The ClickHouse sink: writes (key, partition) rows with their running
//! totals and offset, and reads a partition's rows back when it is assigned.
//!
//! Money travels as Decimal(18,2), i.e. an i64 of cents; minutes as DateTime,
//! i.e. u32 seconds. Both conversions refuse values they would change.

use std::collections::HashMap;
use std::time::Duration;

use ::clickhouse::{Client, Row, RowOwned, RowRead, RowWrite};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::aggregate::{
    Aggregate, CustomerTotals, CustomersByMinute, OrderTotals, OrdersByMinute, PartitionMark,
    ProductInfo, ProductSales, Products, SalesTotals, SourceMark, StoredRow,
};
use crate::cdc::{Minute, Position, SnapshotId};
use crate::config::{ClickHouseConfig, Validation};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("ClickHouse: {0}")]
    ClickHouse(#[from] ::clickhouse::error::Error),
    #[error("ClickHouse did not answer within {0:?}")]
    Timeout(Duration),
    #[cfg(feature = "faults")]
    #[error("injected insert failure (ETL_FAULT_INSERT_FAILURE_RATE)")]
    Injected,
    /// A value the table cannot hold: retrying cannot help.
    #[error("{aggregate}: {why}")]
    Value {
        aggregate: &'static str,
        why: String,
    },
}

impl SinkError {
    /// True when the same write can never succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(self, SinkError::Value { .. })
    }
}

/// The longest a write or a load may take before it counts as failed, so
/// that a hung server cannot hang the pipeline (or its shutdown).
const TIMEOUT: Duration = Duration::from_secs(30);

async fn within<T>(
    work: impl std::future::Future<Output = Result<T, SinkError>>,
) -> Result<T, SinkError> {
    tokio::time::timeout(TIMEOUT, work)
        .await
        .unwrap_or(Err(SinkError::Timeout(TIMEOUT)))
}

/// An aggregate that has a ClickHouse table of the same name.
pub trait SinkTable: Aggregate {
    type Row: RowOwned + RowRead + RowWrite + Serialize + for<'de> Deserialize<'de> + Send + Sync;
    fn to_row(row: &StoredRow<Self::Key, Self::Value>) -> Result<Self::Row, SinkError>;
    fn from_row(row: Self::Row) -> Result<StoredRow<Self::Key, Self::Value>, SinkError>;
    /// The key's columns, those the table is ordered by first.
    const KEY_COLUMNS: &'static str;
    /// A key's values for those columns, as SQL.
    fn key_values(key: &Self::Key) -> Result<String, SinkError>;
    /// The DateTime column of [`Aggregate::key_minute`], if keyed by minute.
    const MINUTE_COLUMN: Option<&'static str> = None;
}

/// Keys per read by key: a minute and a status take ~30 bytes of SQL, so
/// this stays far below ClickHouse's default max_query_size (256 KiB).
const KEYS_PER_READ: usize = 2_000;

/// One stored row of aggregate `A`.
type StoredOf<A> = StoredRow<<A as Aggregate>::Key, <A as Aggregate>::Value>;

/// The table of every aggregate's [`PartitionMark`]s.
pub const MARKS_TABLE: &str = "source_marks";

/// The analytics schema (init/clickhouse), the one the compose stack and the
/// native stack apply at start-up.
const ANALYTICS_SQL: &str = include_str!("../../init/clickhouse/01-analytics.sql");

/// The analytics schema's statements, for a database named `db`: a database
/// of its own per test or benchmark run.
pub fn analytics_ddl(db: &str) -> Vec<String> {
    let code: String = ANALYTICS_SQL
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    code.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.replace("analytics.", &format!("{db}.")).replace(
                "DATABASE IF NOT EXISTS analytics",
                &format!("DATABASE IF NOT EXISTS {db}"),
            )
        })
        .collect()
}

/// The columns each table of the analytics schema declares, in order: one
/// column per line of its CREATE TABLE, as the schema file writes them.
pub fn analytics_columns() -> Vec<(String, Vec<(String, String)>)> {
    analytics_ddl("analytics")
        .iter()
        .filter_map(|statement| {
            let rest = statement.strip_prefix("CREATE TABLE IF NOT EXISTS analytics.")?;
            let (table, body) = rest.split_once('(')?;
            let (columns, _engine) = body.rsplit_once(")\nENGINE")?;
            let columns = columns
                .lines()
                .map(|l| l.trim().trim_end_matches(','))
                .filter(|l| !l.is_empty())
                .filter_map(|l| {
                    let (name, kind) = l.split_once(char::is_whitespace)?;
                    Some((name.to_owned(), kind.trim().to_owned()))
                })
                .collect();
            Some((table.trim().to_owned(), columns))
        })
        .collect()
}

#[derive(Clone)]
pub struct ClickHouseSink {
    client: Client,
}

impl ClickHouseSink {
    /// Connects and checks the server answers; with `Validation::Auto`,
    /// validation is on for servers new enough to support it.
    pub async fn connect(config: &ClickHouseConfig) -> Result<ClickHouseSink, SinkError> {
        let mut client = Client::default()
            .with_url(&config.url)
            .with_database(&config.database)
            .with_compression(::clickhouse::Compression::None)
            .with_validation(false)
            // Without it an error after the first rows is not reported (old servers).
            .with_setting("wait_end_of_query", "1");
        if let Some(user) = &config.user {
            client = client.with_user(user);
        }
        if let Some(password) = &config.password {
            client = client.with_password(password);
        }
        let version: String = client.query("SELECT version()").fetch_one().await?;
        let validation = match config.validation {
            Validation::On => true,
            Validation::Off => false,
            Validation::Auto => supports_validation(&version),
        };
        tracing::info!(url = %config.url, %version, validation, "connected to ClickHouse");
        Ok(ClickHouseSink {
            client: client.with_validation(validation),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The same server and settings, on database `db`.
    pub fn in_database(&self, db: &str) -> ClickHouseSink {
        ClickHouseSink {
            client: self.client.clone().with_database(db),
        }
    }

    /// Puts the analytics tables of database `shadow` in the place of
    /// database `live`'s, one RENAME per table: a reader of a live table
    /// sees the old one or the new one whole (the RENAME waits for the
    /// queries reading it). The tables replaced move to database `replaced`,
    /// which is emptied first; `shadow` is dropped once empty.
    ///
    /// Not one RENAME for all four: ClickHouse 18.16 locks the tables of a
    /// RENAME in name order, and a query reading two of them in another order
    /// (a dashboard's join) then deadlocks with it for good (seen here, with
    /// KILL QUERY unable to end either). One live table per RENAME cannot
    /// close such a cycle; a query joining two tables during the swap may
    /// see one rebuilt and the other not yet, for the milliseconds between.
    pub async fn swap_in(&self, live: &str, shadow: &str, replaced: &str) -> Result<(), SinkError> {
        let present = self.tables(live).await?;
        for statement in [
            format!("CREATE DATABASE IF NOT EXISTS {live}"),
            format!("DROP DATABASE IF EXISTS {replaced}"),
            format!("CREATE DATABASE {replaced}"),
        ] {
            self.client.query(&statement).execute().await?;
        }
        for (table, _) in analytics_columns() {
            let mut renames = Vec::new();
            if present.contains(&table) {
                renames.push(format!("{live}.{table} TO {replaced}.{table}"));
            }
            renames.push(format!("{shadow}.{table} TO {live}.{table}"));
            let rename = format!("RENAME TABLE {}", renames.join(", "));
            within(async { Ok(self.client.query(&rename).execute().await?) }).await?;
        }
        self.client
            .query(&format!("DROP DATABASE IF EXISTS {shadow}"))
            .execute()
            .await?;
        Ok(())
    }

    /// The tables of database `db`.
    pub async fn tables(&self, db: &str) -> Result<Vec<String>, SinkError> {
        let query = self
            .client
            .query("SELECT name FROM system.tables WHERE database = ?")
            .bind(db);
        within(async { Ok(query.fetch_all().await?) }).await
    }

    /// Rows in table `table` of the configured database, every version.
    pub async fn count_rows(&self, table: &str) -> Result<u64, SinkError> {
        let sql = format!("SELECT count() FROM {table}");
        let query = self.client.query(&sql);
        within(async { Ok(query.fetch_one().await?) }).await
    }

    /// Creates database `db` with the analytics schema, dropping an older one.
    pub async fn create_analytics_db(&self, db: &str) -> Result<(), SinkError> {
        self.client
            .query(&format!("DROP DATABASE IF EXISTS {db}"))
            .execute()
            .await?;
        for statement in analytics_ddl(db) {
            self.client.query(&statement).execute().await?;
        }
        Ok(())
    }

    /// Adds to the configured database's tables the columns the schema
    /// declares and they lack (tables created by an older release). ClickHouse
    /// 18.16 has no `ADD COLUMN IF NOT EXISTS`, so the columns are compared
    /// first. A new column reads as its type's zero in existing rows, which
    /// is what the processor expects of them. Returns what it added.
    pub async fn add_missing_columns(&self) -> Result<Vec<String>, SinkError> {
        let mut added = Vec::new();
        for (table, columns) in analytics_columns() {
            let present: Vec<String> = self
                .client
                .query(
                    "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = ?",
                )
                .bind(&table)
                .fetch_all()
                .await?;
            // A missing table is left to the schema scripts (and to the
            // first insert's error, which names it).
            if present.is_empty() {
                continue;
            }
            for (name, kind) in columns.iter().filter(|(n, _)| !present.contains(n)) {
                self.client
                    .query(&format!("ALTER TABLE {table} ADD COLUMN {name} {kind}"))
                    .execute()
                    .await?;
                added.push(format!("{table}.{name}"));
            }
        }
        Ok(added)
    }

    /// Inserts `rows` in one INSERT, then, once they are stored, `marks` in
    /// another: a mark never claims more than the rows hold. Both inserts
    /// may be repeated whole.
    pub async fn write<A: SinkTable>(
        &self,
        rows: &[StoredRow<A::Key, A::Value>],
        marks: &[PartitionMark],
    ) -> Result<(), SinkError> {
        // Convert first: a value that cannot be stored fails before any I/O.
        let rows: Vec<A::Row> = rows.iter().map(A::to_row).collect::<Result<_, _>>()?;
        let marks: Vec<MarkRow> = marks.iter().map(MarkRow::of::<A>).collect();
        self.insert(A::NAME, &rows).await?;
        self.insert(MARKS_TABLE, &marks).await
    }

    async fn insert<R: RowOwned + RowWrite + Serialize>(
        &self,
        table: &str,
        rows: &[R],
    ) -> Result<(), SinkError> {
        if rows.is_empty() {
            return Ok(());
        }
        within(async {
            let mut insert = self.client.insert::<R>(table).await?;
            for row in rows {
                insert.write(row).await?;
            }
            insert.end().await?;
            Ok(())
        })
        .await
    }

    /// The latest row of every key of `partition` (FINAL: the highest offset).
    pub async fn load_partitions<A: SinkTable>(
        &self,
        partitions: &[i32],
    ) -> Result<Vec<StoredRow<A::Key, A::Value>>, SinkError> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        // One query for a whole assignment, not one per partition.
        let condition = format!("source_partition IN ({})", sql_list(partitions));
        self.load_where::<A>("FINAL", &condition).await
    }

    /// The latest row of each (partition, key) of `keys` that is stored: one
    /// read for all of them (in chunks), along the tables' order (the key
    /// first, then the partition).
    pub async fn load_keys<A: SinkTable>(
        &self,
        keys: &[(i32, A::Key)],
    ) -> Result<Vec<StoredRow<A::Key, A::Value>>, SinkError> {
        // Without FINAL, which on ClickHouse 18.16 costs several times the
        // read itself (10 keys: 90 ms against 16): every version of a row
        // comes back, and the highest offset wins here, as FINAL picks it.
        let mut latest: HashMap<(A::Key, i32), StoredOf<A>> = HashMap::new();
        // A query's text is bounded (max_query_size, 256 KiB by default).
        for keys in keys.chunks(KEYS_PER_READ) {
            let tuples: Vec<String> = keys
                .iter()
                .map(|(p, key)| {
                    Ok(format!(
                        "({}, {})",
                        A::key_values(key)?,
                        partition_to_u32(*p)
                    ))
                })
                .collect::<Result<_, SinkError>>()?;
            let condition = format!(
                "({}, source_partition) IN ({})",
                A::KEY_COLUMNS,
                tuples.join(", ")
            );
            for row in self.load_where::<A>("", &condition).await? {
                let at = (row.key.clone(), row.partition);
                match latest.get(&at) {
                    Some(kept) if kept.offset >= row.offset => {}
                    _ => {
                        latest.insert(at, row);
                    }
                }
            }
        }
        Ok(latest.into_values().collect())
    }

    /// The rows of table `A` (`modifier`: FINAL, or every version) that
    /// meet `condition`.
    async fn load_where<A: SinkTable>(
        &self,
        modifier: &str,
        condition: &str,
    ) -> Result<Vec<StoredRow<A::Key, A::Value>>, SinkError> {
        let sql = format!(
            "SELECT ?fields FROM {} {modifier} WHERE {condition}",
            A::NAME
        );
        let query = self.client.query(&sql);
        let rows: Vec<A::Row> = within(async { Ok(query.fetch_all().await?) }).await?;
        rows.into_iter().map(A::from_row).collect()
    }

    /// The mark stored of each of `partitions` for aggregate `A` (those
    /// never flushed are left out).
    pub async fn load_marks<A: SinkTable>(
        &self,
        partitions: &[i32],
    ) -> Result<Vec<PartitionMark>, SinkError> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT ?fields FROM {MARKS_TABLE} FINAL WHERE aggregate = ? AND source_partition IN ({})",
            sql_list(partitions)
        );
        let query = self.client.query(&sql).bind(A::NAME);
        let rows: Vec<MarkRow> = within(async { Ok(query.fetch_all().await?) }).await?;
        Ok(rows.into_iter().map(MarkRow::into_mark).collect())
    }

    /// The highest source offset stored from each of `partitions` (those
    /// with no row are left out), counting every row ever written: a scan of
    /// the table, for `rebuild`'s check that no processor writes meanwhile.
    pub async fn highest_offsets<A: SinkTable>(
        &self,
        partitions: &[i32],
    ) -> Result<Vec<(i32, i64)>, SinkError> {
        #[derive(Row, Deserialize)]
        struct Highest {
            partition: u32,
            offset: u64,
        }
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        // No FINAL: any row ever written counts, also one a merge would replace.
        let sql = format!(
            "SELECT source_partition AS partition, max(source_offset) AS offset FROM {} \
             WHERE source_partition IN ({}) GROUP BY source_partition",
            A::NAME,
            sql_list(partitions)
        );
        let query = self.client.query(&sql);
        let rows: Vec<Highest> = within(async { Ok(query.fetch_all().await?) }).await?;
        Ok(rows
            .into_iter()
            .map(|h| (h.partition as i32, h.offset as i64))
            .collect())
    }

    /// Creates the marks table in database `db` if it is missing (tables
    /// created by a release before it).
    pub async fn create_marks_table(&self, db: &str) -> Result<(), SinkError> {
        let create = format!("CREATE TABLE IF NOT EXISTS {db}.{MARKS_TABLE}");
        for statement in analytics_ddl(db) {
            if statement.starts_with(&create) {
                self.client.query(&statement).execute().await?;
            }
        }
        Ok(())
    }

    /// For an aggregate whose table has rows but no marks (written by a
    /// release before the marks table), computes them from its rows, once,
    /// with a scan of the rows' mark columns. Returns how many partitions'
    /// marks it wrote (None: there was nothing to do).
    pub async fn fill_in_marks<A: SinkTable>(&self) -> Result<Option<usize>, SinkError> {
        let marked: u64 = self
            .client
            .query(&format!(
                "SELECT count() FROM {MARKS_TABLE} WHERE aggregate = ?"
            ))
            .bind(A::NAME)
            .fetch_one()
            .await?;
        if marked > 0 || self.count_rows(A::NAME).await? == 0 {
            return Ok(None);
        }
        let marks = if A::KEEPS_STORED_ROWS {
            self.marks_from_rows::<A>().await?
        } else {
            self.highest_offsets::<A>(&self.partitions_of(A::NAME).await?)
                .await?
                .into_iter()
                .map(|(partition, offset)| PartitionMark {
                    partition,
                    offset,
                    mark: SourceMark::default(),
                    newest_minute: None,
                })
                .collect()
        };
        self.insert(
            MARKS_TABLE,
            &marks.iter().map(MarkRow::of::<A>).collect::<Vec<_>>(),
        )
        .await?;
        Ok(Some(marks.len()))
    }

    async fn partitions_of(&self, table: &str) -> Result<Vec<i32>, SinkError> {
        let sql = format!("SELECT DISTINCT source_partition FROM {table}");
        let query = self.client.query(&sql);
        let partitions: Vec<u32> = within(async { Ok(query.fetch_all().await?) }).await?;
        Ok(partitions.into_iter().map(|p| p as i32).collect())
    }

    /// Each partition's mark as loading all of its rows made it: the highest
    /// offset of any row, and the greatest mark of any row, with the source
    /// rows of every row at exactly that mark (the rows' marks only grow from
    /// flush to flush), and the newest minute of any key.
    async fn marks_from_rows<A: SinkTable>(&self) -> Result<Vec<PartitionMark>, SinkError> {
        #[derive(Row, Deserialize)]
        struct Greatest {
            partition: u32,
            offset: u64,
            greatest: (u64, i64, u64, u64),
            newest_minute: Option<i64>,
        }
        let newest_minute = A::MINUTE_COLUMN.map_or_else(
            || "CAST(NULL AS Nullable(Int64))".to_owned(),
            |column| format!("toNullable(toInt64(max({column})))"),
        );
        let sql = format!(
            "SELECT source_partition AS partition, max(source_offset) AS offset, \
             max((source_snapshot, source_snapshot_ms, source_commit, source_lsn)) AS greatest, \
             {newest_minute} AS newest_minute FROM {} GROUP BY source_partition",
            A::NAME
        );
        let query = self.client.query(&sql);
        let greatest: Vec<Greatest> = within(async { Ok(query.fetch_all().await?) }).await?;
        let mut marks = Vec::new();
        for g in greatest {
            #[derive(Row, Deserialize)]
            struct AtMark {
                snapshot_offset: u64,
                rows: Vec<i64>,
            }
            let (snapshot, snapshot_ms, commit, lsn) = g.greatest;
            let sql = format!(
                "SELECT max(source_snapshot_offset) AS snapshot_offset, \
                 groupUniqArrayArray(source_rows) AS rows FROM {} WHERE source_partition = {} \
                 AND source_snapshot = {snapshot} AND source_snapshot_ms = {snapshot_ms} \
                 AND source_commit = {commit} AND source_lsn = {lsn}",
                A::NAME,
                g.partition
            );
            let query = self.client.query(&sql);
            let at: AtMark = within(async { Ok(query.fetch_one().await?) }).await?;
            marks.push(PartitionMark {
                partition: g.partition as i32,
                offset: g.offset as i64,
                mark: mark_of(
                    (snapshot, snapshot_ms),
                    at.snapshot_offset,
                    (commit, lsn),
                    at.rows,
                ),
                newest_minute: g.newest_minute.map(Minute),
            });
        }
        Ok(marks)
    }
}

/// One row of the marks table.
#[derive(Debug, Row, Serialize, Deserialize)]
struct MarkRow {
    aggregate: String,
    source_partition: u32,
    source_offset: u64,
    source_snapshot: u64,
    source_snapshot_ms: i64,
    source_snapshot_offset: u64,
    source_commit: u64,
    source_lsn: u64,
    source_rows: Vec<i64>,
    newest_minute: Option<i64>,
}

impl MarkRow {
    fn of<A: Aggregate>(m: &PartitionMark) -> MarkRow {
        let (
            source_snapshot,
            source_snapshot_ms,
            source_snapshot_offset,
            source_commit,
            source_lsn,
            source_rows,
        ) = mark_columns(&m.mark);
        MarkRow {
            aggregate: A::NAME.to_owned(),
            source_partition: partition_to_u32(m.partition),
            source_offset: offset_to_u64(m.offset),
            source_snapshot,
            source_snapshot_ms,
            source_snapshot_offset,
            source_commit,
            source_lsn,
            source_rows,
            newest_minute: m.newest_minute.map(|Minute(seconds)| seconds),
        }
    }

    fn into_mark(self) -> PartitionMark {
        PartitionMark {
            partition: self.source_partition as i32,
            offset: self.source_offset as i64,
            mark: mark_of(
                (self.source_snapshot, self.source_snapshot_ms),
                self.source_snapshot_offset,
                (self.source_commit, self.source_lsn),
                self.source_rows,
            ),
            newest_minute: self.newest_minute.map(Minute),
        }
    }
}

/// A string as an SQL literal.
fn sql_string(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Partition numbers for an SQL `IN (...)`: integers, so they go into the
/// SQL as they are.
fn sql_list(partitions: &[i32]) -> String {
    let numbers: Vec<String> = partitions.iter().map(i32::to_string).collect();
    numbers.join(", ")
}

/// RowBinaryWithNamesAndTypes, which validation uses, is read correctly by
/// the crate from ClickHouse 24 on.
fn supports_validation(version: &str) -> bool {
    version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .is_some_and(|major| major >= 24)
}

/// Decimal(18,2) holds |value| < 10^16, i.e. |cents| < 10^18.
const MAX_CENTS: i128 = 1_000_000_000_000_000_000;

fn cents(aggregate: &'static str, d: Decimal) -> Result<i64, SinkError> {
    let value_error = |why: String| SinkError::Value { aggregate, why };
    if d.round_dp(2) != d {
        return Err(value_error(format!("{d} has more than 2 decimals")));
    }
    // Scale 2 exactly: 45.480 (scale 3) and 45.5 (scale 1) both become 4548/4550.
    let mut at_scale_2 = d;
    at_scale_2.rescale(2);
    let cents = at_scale_2.mantissa();
    if cents.abs() >= MAX_CENTS {
        return Err(value_error(format!("{d} does not fit Decimal(18,2)")));
    }
    Ok(cents as i64)
}

fn from_cents(cents: i64) -> Decimal {
    Decimal::new(cents, 2)
}

fn minute_to_datetime(aggregate: &'static str, m: Minute) -> Result<u32, SinkError> {
    u32::try_from(m.0).map_err(|_| SinkError::Value {
        aggregate,
        why: format!("minute {m} is outside ClickHouse DateTime's range"),
    })
}

fn partition_to_u32(p: i32) -> u32 {
    // Kafka partitions are never negative.
    p.max(0) as u32
}

fn offset_to_u64(o: i64) -> u64 {
    o.max(0) as u64
}

/// The source mark's columns, in the order the row structs list them.
fn mark_columns(m: &SourceMark) -> (u64, i64, u64, u64, u64, Vec<i64>) {
    (
        m.snapshot.lsn,
        m.snapshot.started_ms,
        offset_to_u64(m.snapshot_offset),
        m.position.commit,
        m.position.lsn,
        m.rows.to_vec(),
    )
}

fn mark_of(
    (snapshot_lsn, started_ms): (u64, i64),
    snapshot_offset: u64,
    (commit, lsn): (u64, u64),
    rows: Vec<i64>,
) -> SourceMark {
    SourceMark {
        snapshot: SnapshotId {
            lsn: snapshot_lsn,
            started_ms,
        },
        snapshot_offset: snapshot_offset as i64,
        position: Position { commit, lsn },
        rows: rows.into(),
    }
}

#[derive(Debug, Row, Serialize, Deserialize)]
pub struct OrdersByMinuteRow {
    pub minute: u32,
    pub status: String,
    pub source_partition: u32,
    pub orders: i64,
    pub revenue: i64,
    pub source_offset: u64,
    pub source_snapshot: u64,
    pub source_snapshot_ms: i64,
    pub source_snapshot_offset: u64,
    pub source_commit: u64,
    pub source_lsn: u64,
    pub source_rows: Vec<i64>,
}

impl SinkTable for OrdersByMinute {
    type Row = OrdersByMinuteRow;
    const KEY_COLUMNS: &'static str = "minute, status";
    const MINUTE_COLUMN: Option<&'static str> = Some("minute");
    fn key_values((minute, status): &Self::Key) -> Result<String, SinkError> {
        Ok(format!(
            "{}, {}",
            minute_to_datetime(Self::NAME, *minute)?,
            sql_string(status)
        ))
    }
    fn to_row(r: &StoredRow<Self::Key, Self::Value>) -> Result<Self::Row, SinkError> {
        let (
            source_snapshot,
            source_snapshot_ms,
            source_snapshot_offset,
            source_commit,
            source_lsn,
            source_rows,
        ) = mark_columns(&r.mark);
        Ok(OrdersByMinuteRow {
            minute: minute_to_datetime(Self::NAME, r.key.0)?,
            status: r.key.1.clone(),
            source_partition: partition_to_u32(r.partition),
            orders: r.value.orders,
            revenue: cents(Self::NAME, r.value.revenue)?,
            source_offset: offset_to_u64(r.offset),
            source_snapshot,
            source_snapshot_ms,
            source_snapshot_offset,
            source_commit,
            source_lsn,
            source_rows,
        })
    }
    fn from_row(r: Self::Row) -> Result<StoredRow<Self::Key, Self::Value>, SinkError> {
        Ok(StoredRow {
            key: (Minute(i64::from(r.minute)), r.status),
            partition: r.source_partition as i32,
            value: OrderTotals {
                orders: r.orders,
                revenue: from_cents(r.revenue),
            },
            offset: r.source_offset as i64,
            mark: mark_of(
                (r.source_snapshot, r.source_snapshot_ms),
                r.source_snapshot_offset,
                (r.source_commit, r.source_lsn),
                r.source_rows,
            ),
        })
    }
}

#[derive(Debug, Row, Serialize, Deserialize)]
pub struct ProductSalesRow {
    pub product_id: i64,
    pub source_partition: u32,
    pub units: i64,
    pub revenue: i64,
    pub lines: i64,
    pub source_offset: u64,
    pub source_snapshot: u64,
    pub source_snapshot_ms: i64,
    pub source_snapshot_offset: u64,
    pub source_commit: u64,
    pub source_lsn: u64,
    pub source_rows: Vec<i64>,
}

impl SinkTable for ProductSales {
    type Row = ProductSalesRow;
    const KEY_COLUMNS: &'static str = "product_id";
    fn key_values(product: &Self::Key) -> Result<String, SinkError> {
        Ok(product.to_string())
    }
    fn to_row(r: &StoredRow<Self::Key, Self::Value>) -> Result<Self::Row, SinkError> {
        let (
            source_snapshot,
            source_snapshot_ms,
            source_snapshot_offset,
            source_commit,
            source_lsn,
            source_rows,
        ) = mark_columns(&r.mark);
        Ok(ProductSalesRow {
            product_id: r.key,
            source_partition: partition_to_u32(r.partition),
            units: r.value.units,
            revenue: cents(Self::NAME, r.value.revenue)?,
            lines: r.value.lines,
            source_offset: offset_to_u64(r.offset),
            source_snapshot,
            source_snapshot_ms,
            source_snapshot_offset,
            source_commit,
            source_lsn,
            source_rows,
        })
    }
    fn from_row(r: Self::Row) -> Result<StoredRow<Self::Key, Self::Value>, SinkError> {
        Ok(StoredRow {
            key: r.product_id,
            partition: r.source_partition as i32,
            value: SalesTotals {
                units: r.units,
                revenue: from_cents(r.revenue),
                lines: r.lines,
            },
            offset: r.source_offset as i64,
            mark: mark_of(
                (r.source_snapshot, r.source_snapshot_ms),
                r.source_snapshot_offset,
                (r.source_commit, r.source_lsn),
                r.source_rows,
            ),
        })
    }
}

#[derive(Debug, Row, Serialize, Deserialize)]
pub struct CustomersByMinuteRow {
    pub minute: u32,
    pub source_partition: u32,
    pub customers: i64,
    pub source_offset: u64,
    pub source_snapshot: u64,
    pub source_snapshot_ms: i64,
    pub source_snapshot_offset: u64,
    pub source_commit: u64,
    pub source_lsn: u64,
    pub source_rows: Vec<i64>,
}

impl SinkTable for CustomersByMinute {
    type Row = CustomersByMinuteRow;
    const KEY_COLUMNS: &'static str = "minute";
    const MINUTE_COLUMN: Option<&'static str> = Some("minute");
    fn key_values(minute: &Self::Key) -> Result<String, SinkError> {
        Ok(minute_to_datetime(Self::NAME, *minute)?.to_string())
    }
    fn to_row(r: &StoredRow<Self::Key, Self::Value>) -> Result<Self::Row, SinkError> {
        let (
            source_snapshot,
            source_snapshot_ms,
            source_snapshot_offset,
            source_commit,
            source_lsn,
            source_rows,
        ) = mark_columns(&r.mark);
        Ok(CustomersByMinuteRow {
            minute: minute_to_datetime(Self::NAME, r.key)?,
            source_partition: partition_to_u32(r.partition),
            customers: r.value.customers,
            source_offset: offset_to_u64(r.offset),
            source_snapshot,
            source_snapshot_ms,
            source_snapshot_offset,
            source_commit,
            source_lsn,
            source_rows,
        })
    }
    fn from_row(r: Self::Row) -> Result<StoredRow<Self::Key, Self::Value>, SinkError> {
        Ok(StoredRow {
            key: Minute(i64::from(r.minute)),
            partition: r.source_partition as i32,
            value: CustomerTotals {
                customers: r.customers,
            },
            offset: r.source_offset as i64,
            mark: mark_of(
                (r.source_snapshot, r.source_snapshot_ms),
                r.source_snapshot_offset,
                (r.source_commit, r.source_lsn),
                r.source_rows,
            ),
        })
    }
}

#[derive(Debug, Row, Serialize, Deserialize)]
pub struct ProductRow {
    pub product_id: i64,
    pub source_partition: u32,
    pub name: String,
    pub category: String,
    pub price: i64,
    pub deleted: u8,
    pub source_offset: u64,
}

impl SinkTable for Products {
    type Row = ProductRow;
    const KEY_COLUMNS: &'static str = "product_id";
    fn key_values(product: &Self::Key) -> Result<String, SinkError> {
        Ok(product.to_string())
    }
    fn to_row(r: &StoredRow<Self::Key, Self::Value>) -> Result<Self::Row, SinkError> {
        Ok(ProductRow {
            product_id: r.key,
            source_partition: partition_to_u32(r.partition),
            name: r.value.name.clone(),
            category: r.value.category.clone(),
            price: cents(Self::NAME, r.value.price)?,
            deleted: u8::from(r.value.deleted),
            source_offset: offset_to_u64(r.offset),
        })
    }
    fn from_row(r: Self::Row) -> Result<StoredRow<Self::Key, Self::Value>, SinkError> {
        Ok(StoredRow {
            key: r.product_id,
            partition: r.source_partition as i32,
            value: ProductInfo {
                name: r.name,
                category: r.category,
                price: from_cents(r.price),
                deleted: r.deleted != 0,
            },
            offset: r.source_offset as i64,
            // A dimension needs no source guard (see `AggregateState::apply`).
            mark: SourceMark::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn money_converts_to_cents_exactly_or_not_at_all() {
        let d = |s| Decimal::from_str(s).unwrap();
        assert_eq!(cents("t", d("45.48")).unwrap(), 4548);
        assert_eq!(cents("t", d("45.5")).unwrap(), 4550);
        assert_eq!(cents("t", d("-3")).unwrap(), -300);
        assert_eq!(cents("t", d("0.000")).unwrap(), 0);
        assert_eq!(cents("t", d("45.480")).unwrap(), 4548);
        assert_eq!(cents("t", d("-45.4800")).unwrap(), -4548);
        assert!(cents("t", d("0.001")).is_err());
        assert_eq!(
            cents("t", d("9999999999999999.99")).unwrap(),
            999_999_999_999_999_999
        );
        assert!(cents("t", d("10000000000000000.00")).is_err());
        assert_eq!(from_cents(4548).to_string(), "45.48");
    }

    #[test]
    fn the_schema_file_lists_every_column_of_every_table() {
        let tables = analytics_columns();
        let names: Vec<&str> = tables.iter().map(|(t, _)| t.as_str()).collect();
        // Every aggregate's table, in the registry's order, then the marks.
        let mut expected = crate::registry::names();
        expected.push(MARKS_TABLE);
        assert_eq!(names, expected);
        let (_, product_sales) = &tables[1];
        assert_eq!(
            product_sales
                .iter()
                .map(|(n, t)| format!("{n} {t}"))
                .collect::<Vec<_>>(),
            [
                "product_id Int64",
                "source_partition UInt32",
                "units Int64",
                "revenue Decimal(18, 2)",
                "lines Int64",
                "source_offset UInt64",
                "source_snapshot UInt64",
                "source_snapshot_ms Int64",
                "source_snapshot_offset UInt64",
                "source_commit UInt64",
                "source_lsn UInt64",
                "source_rows Array(Int64)",
            ]
        );
    }

    #[test]
    fn validation_is_on_only_for_new_servers() {
        assert!(!supports_validation("18.16.1"));
        assert!(supports_validation("25.8.2.29"));
    }
}
