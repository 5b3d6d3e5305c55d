-- Analytics schema. Valid on ClickHouse 18.16 (Debian) and on current releases.
--
-- Every aggregate table holds one row per (aggregate key, source partition):
-- the running totals of the events of that Kafka partition, and the offset of
-- the last event applied to them. ReplacingMergeTree keeps the row with the
-- highest offset, so a replayed batch rewrites the same values and nothing is
-- counted twice. Read with FINAL (or argMax) and sum over source_partition.
--
-- The sums also keep, in every row, how far into Postgres's log the
-- partition had been applied when the row was written: the snapshot the rows
-- start from (source_snapshot: its LSN, source_snapshot_ms: its start,
-- source_snapshot_offset: its first row's offset) and the position of the last
-- streamed change (source_commit, source_lsn, and source_rows: the primary keys
-- applied at exactly that position). That is what recognises an event
-- Debezium sends again at a new offset. The processor adds these columns to
-- tables created before them.
--
-- The tables are ordered by the aggregate key first, so that the processor
-- reads back the rows of the keys an event touches (those it does not hold in
-- memory) with a primary-key range read, not a scan.
CREATE DATABASE IF NOT EXISTS analytics;

-- Orders by (minute of created_at, UTC; status): count and sum(total_amount).
CREATE TABLE IF NOT EXISTS analytics.orders_by_minute
(
    minute           DateTime('UTC'),
    status           String,
    source_partition UInt32,
    orders           Int64,
    revenue          Decimal(18, 2),
    source_offset    UInt64,
    source_snapshot  UInt64,
    source_snapshot_ms Int64,
    source_snapshot_offset UInt64,
    source_commit    UInt64,
    source_lsn       UInt64,
    source_rows      Array(Int64)
)
ENGINE = ReplacingMergeTree(source_offset)
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, status, source_partition);

-- Product sales by product_id from order_items: units, revenue, order lines.
CREATE TABLE IF NOT EXISTS analytics.product_sales
(
    product_id       Int64,
    source_partition UInt32,
    units            Int64,
    revenue          Decimal(18, 2),
    lines            Int64,
    source_offset    UInt64,
    source_snapshot  UInt64,
    source_snapshot_ms Int64,
    source_snapshot_offset UInt64,
    source_commit    UInt64,
    source_lsn       UInt64,
    source_rows      Array(Int64)
)
ENGINE = ReplacingMergeTree(source_offset)
ORDER BY (product_id, source_partition);

-- New customers by minute of created_at (UTC).
CREATE TABLE IF NOT EXISTS analytics.customers_by_minute
(
    minute           DateTime('UTC'),
    source_partition UInt32,
    customers        Int64,
    source_offset    UInt64,
    source_snapshot  UInt64,
    source_snapshot_ms Int64,
    source_snapshot_offset UInt64,
    source_commit    UInt64,
    source_lsn       UInt64,
    source_rows      Array(Int64)
)
ENGINE = ReplacingMergeTree(source_offset)
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, source_partition);

-- Products dimension: the latest name, category and price of each product, so
-- dashboards can group revenue by category at query time. deleted = 1 once the
-- product was deleted in Postgres.
CREATE TABLE IF NOT EXISTS analytics.products
(
    product_id       Int64,
    source_partition UInt32,
    name             String,
    category         String,
    price            Decimal(18, 2),
    deleted          UInt8,
    source_offset    UInt64
)
ENGINE = ReplacingMergeTree(source_offset)
ORDER BY (product_id, source_partition);

-- How far each aggregate's stored rows reach, per source partition: the Kafka
-- offset the flush that wrote them covered (every event up to it has its
-- effect in the rows) and the source mark then (the columns the sums' rows
-- carry). Written after each flush's rows, so it never claims more than they
-- hold; read when a partition is assigned, which then needs none of its rows.
-- The processor creates it, and fills it from the rows of tables written
-- before it existed.
CREATE TABLE IF NOT EXISTS analytics.source_marks
(
    aggregate        String,
    source_partition UInt32,
    source_offset    UInt64,
    source_snapshot  UInt64,
    source_snapshot_ms Int64,
    source_snapshot_offset UInt64,
    source_commit    UInt64,
    source_lsn       UInt64,
    source_rows      Array(Int64),
    -- By-minute aggregates: the newest minute of any key stored from the
    -- partition, as seconds since the epoch (NULL: unknown).
    newest_minute    Nullable(Int64)
)
ENGINE = ReplacingMergeTree(source_offset)
ORDER BY (aggregate, source_partition);
