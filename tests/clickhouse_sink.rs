//! The ClickHouse sink against the real server: rows round-trip exactly,
//! and rewriting a (key, partition) row never counts twice.

use std::str::FromStr;

use etl::aggregate::{OrderTotals, OrdersByMinute, ProductInfo, Products, SourceMark, StoredRow};
use etl::cdc::{Minute, Position, SnapshotId};
use rust_decimal::Decimal;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

#[tokio::test]
#[ignore = "needs the real stack: run scripts/test"]
async fn rows_round_trip_and_the_highest_offset_wins() {
    let stack = etl_testkit::Stack::load();
    let sink = etl_testkit::fresh_analytics_db(&stack, "sink_roundtrip").await;
    let minute = Minute(1_706_778_000);
    // The source mark travels with the row: several source rows at one
    // position (a COPY page), and a position past 2^32.
    let mark = |offset: i64| SourceMark {
        snapshot: SnapshotId {
            lsn: 26_497_000,
            started_ms: 1_795_505_416_569,
        },
        snapshot_offset: 1,
        position: Position {
            commit: 5_000_000_000 + offset as u64,
            lsn: 5_000_000_100,
        },
        rows: vec![offset, 1 << 40].into(),
    };
    let row = |partition, orders, revenue: &str, offset| StoredRow {
        key: (minute, "paid".to_string()),
        partition,
        value: OrderTotals {
            orders,
            revenue: dec(revenue),
        },
        offset,
        mark: mark(offset),
    };
    // Partition 0 writes its running total three times (a replay writes an
    // older one again, last); partition 1 once.
    for rows in [
        vec![row(0, 1, "45.48", 3)],
        vec![row(0, 2, "90.96", 7), row(1, 1, "0.01", 2)],
        vec![row(0, 1, "45.48", 3)],
    ] {
        sink.write::<OrdersByMinute>(&rows).await.unwrap();
    }
    let mut loaded = sink.load_partitions::<OrdersByMinute>(&[0]).await.unwrap();
    assert_eq!(loaded, vec![row(0, 2, "90.96", 7)]);
    loaded = sink.load_partitions::<OrdersByMinute>(&[1]).await.unwrap();
    assert_eq!(loaded, vec![row(1, 1, "0.01", 2)]);
    loaded = sink
        .load_partitions::<OrdersByMinute>(&[1, 0, 5])
        .await
        .unwrap();
    loaded.sort_by_key(|r| r.partition);
    assert_eq!(loaded, vec![row(0, 2, "90.96", 7), row(1, 1, "0.01", 2)]);
    assert!(sink
        .load_partitions::<OrdersByMinute>(&[])
        .await
        .unwrap()
        .is_empty());

    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Total {
        orders: i64,
        revenue: i128,
    }
    let total: Total = sink
        .client()
        .query("SELECT sum(orders), sum(revenue) FROM orders_by_minute FINAL")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!((total.orders, total.revenue), (3, 9097));
}

#[tokio::test]
#[ignore = "needs the real stack: run scripts/test"]
async fn products_dimension_keeps_text_and_deletion() {
    let stack = etl_testkit::Stack::load();
    let sink = etl_testkit::fresh_analytics_db(&stack, "sink_products").await;
    let info = |name: &str, deleted| ProductInfo {
        name: name.into(),
        category: "coffee \"beans\"".into(),
        price: dec("19.99"),
        deleted,
    };
    let rows = vec![
        StoredRow {
            key: 1,
            partition: 2,
            value: info("Espresso ☕", false),
            offset: 10,
            // The dimension keeps no mark (it needs no source guard).
            mark: SourceMark::default(),
        },
        StoredRow {
            key: 2,
            partition: 2,
            value: info("Gone", true),
            offset: 11,
            mark: SourceMark::default(),
        },
    ];
    sink.write::<Products>(&rows).await.unwrap();
    let mut loaded = sink.load_partitions::<Products>(&[2]).await.unwrap();
    loaded.sort_by_key(|r| r.key);
    assert_eq!(loaded, rows);
    assert!(sink
        .load_partitions::<Products>(&[0])
        .await
        .unwrap()
        .is_empty());
}

/// A table made by a release before the source marks: the processor adds
/// the columns it lacks, its rows load with no mark, and it can be written.
#[tokio::test]
#[ignore = "needs the real stack: run scripts/test"]
async fn the_mark_columns_are_added_to_an_older_table() {
    let stack = etl_testkit::Stack::load();
    let sink = etl_testkit::fresh_analytics_db(&stack, "sink_migrate").await;
    let old = "CREATE TABLE product_sales (product_id Int64, source_partition UInt32, \
               units Int64, revenue Decimal(18, 2), lines Int64, source_offset UInt64) \
               ENGINE = ReplacingMergeTree(source_offset) ORDER BY (product_id, source_partition)";
    sink.client()
        .query("DROP TABLE product_sales")
        .execute()
        .await
        .unwrap();
    sink.client().query(old).execute().await.unwrap();
    sink.client()
        .query("INSERT INTO product_sales VALUES (5, 0, 2, 39.98, 1, 4)")
        .execute()
        .await
        .unwrap();

    let added = sink.add_missing_columns().await.unwrap();
    assert_eq!(
        added,
        [
            "product_sales.source_snapshot",
            "product_sales.source_snapshot_ms",
            "product_sales.source_snapshot_offset",
            "product_sales.source_commit",
            "product_sales.source_lsn",
            "product_sales.source_rows",
        ]
    );
    assert!(sink.add_missing_columns().await.unwrap().is_empty());
    let loaded = sink
        .load_partitions::<etl::aggregate::ProductSales>(&[0])
        .await
        .unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].offset, 4);
    assert_eq!(loaded[0].mark, SourceMark::default());
    let mut row = loaded[0].clone();
    row.offset = 9;
    row.mark.position = Position { commit: 7, lsn: 8 };
    row.mark.rows = vec![3].into();
    sink.write::<etl::aggregate::ProductSales>(std::slice::from_ref(&row))
        .await
        .unwrap();
    let again = sink
        .load_partitions::<etl::aggregate::ProductSales>(&[0])
        .await
        .unwrap();
    assert_eq!(again, vec![row]);
}
