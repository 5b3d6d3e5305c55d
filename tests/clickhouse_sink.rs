//! The ClickHouse sink against the real server: rows round-trip exactly,
//! and rewriting a (key, partition) row never counts twice.

use std::str::FromStr;

use etl::aggregate::{
    CustomerTotals, CustomersByMinute, OrderTotals, OrdersByMinute, PartitionMark, ProductInfo,
    ProductSales, Products, SalesTotals, SourceMark, StoredRow,
};
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
        sink.write::<OrdersByMinute>(&rows, &[]).await.unwrap();
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
    sink.write::<Products>(&rows, &[]).await.unwrap();
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
    let loaded = sink.load_partitions::<ProductSales>(&[0]).await.unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].offset, 4);
    assert_eq!(loaded[0].mark, SourceMark::default());
    let mut row = loaded[0].clone();
    row.offset = 9;
    row.mark.position = Position { commit: 7, lsn: 8 };
    row.mark.rows = vec![3].into();
    sink.write::<ProductSales>(std::slice::from_ref(&row), &[])
        .await
        .unwrap();
    let again = sink.load_partitions::<ProductSales>(&[0]).await.unwrap();
    assert_eq!(again, vec![row]);
}

/// Rows are read back by key with one primary-key read per call: exactly the
/// rows of the keys asked for, in the partition asked for, the highest offset
/// of each, whatever their text holds.
#[tokio::test]
#[ignore = "needs the real stack: run scripts/test"]
async fn rows_are_read_back_by_key() {
    let stack = etl_testkit::Stack::load();
    let sink = etl_testkit::fresh_analytics_db(&stack, "sink_keys").await;
    let order = |minute: i64, status: &str, partition, orders, offset| StoredRow {
        key: (Minute(minute), status.to_string()),
        partition,
        value: OrderTotals {
            orders,
            revenue: Decimal::new(orders * 1000, 2),
        },
        offset,
        mark: SourceMark::default(),
    };
    // Quotes and backslashes in a key's text, the same key in another
    // partition, and a key written twice.
    let odd = "it's \\ 'odd'";
    let rows = vec![
        order(60, "paid", 0, 1, 1),
        order(60, odd, 0, 2, 2),
        order(120, "paid", 0, 3, 3),
        order(60, "paid", 1, 4, 4),
        order(60, "paid", 0, 5, 6),
    ];
    sink.write::<OrdersByMinute>(&rows, &[]).await.unwrap();
    let key = |minute: i64, status: &str| (Minute(minute), status.to_string());
    let mut read = sink
        .load_keys::<OrdersByMinute>(&[
            (0, key(60, "paid")),
            (0, key(60, odd)),
            (0, key(180, "paid")),
        ])
        .await
        .unwrap();
    read.sort_by_key(|r| r.offset);
    assert_eq!(
        read,
        vec![order(60, odd, 0, 2, 2), order(60, "paid", 0, 5, 6)]
    );
    assert!(sink
        .load_keys::<OrdersByMinute>(&[(2, key(60, "paid"))])
        .await
        .unwrap()
        .is_empty());

    let customers = |minute: i64, customers| StoredRow {
        key: Minute(minute),
        partition: 3,
        value: CustomerTotals { customers },
        offset: customers,
        mark: SourceMark::default(),
    };
    sink.write::<CustomersByMinute>(&[customers(60, 1), customers(120, 2)], &[])
        .await
        .unwrap();
    let read = sink
        .load_keys::<CustomersByMinute>(&[(3, Minute(120)), (3, Minute(240)), (0, Minute(120))])
        .await
        .unwrap();
    assert_eq!(read, vec![customers(120, 2)]);

    let sales = |product: i64| StoredRow {
        key: product,
        partition: 0,
        value: SalesTotals {
            units: product,
            revenue: Decimal::new(product, 0),
            lines: 1,
        },
        offset: product,
        mark: SourceMark::default(),
    };
    sink.write::<ProductSales>(&[sales(7), sales(8), sales(9)], &[])
        .await
        .unwrap();
    let mut read = sink
        .load_keys::<ProductSales>(&[(0, 9), (0, 7), (0, 11), (1, 9)])
        .await
        .unwrap();
    read.sort_by_key(|r| r.key);
    assert_eq!(read, vec![sales(7), sales(9)]);
    assert!(sink
        .load_keys::<ProductSales>(&[])
        .await
        .unwrap()
        .is_empty());

    // More keys than one query's text holds: read in several, none lost.
    let many: Vec<_> = (0..12_000)
        .map(|m| (Minute(1_700_000_000 + 60 * m), "shipped".to_string()))
        .collect();
    let written: Vec<_> = many
        .iter()
        .step_by(7)
        .map(|(m, s)| order(m.0, s, 0, 1, 1))
        .collect();
    sink.write::<OrdersByMinute>(&written, &[]).await.unwrap();
    let many: Vec<_> = many.into_iter().map(|key| (0, key)).collect();
    let read = sink.load_keys::<OrdersByMinute>(&many).await.unwrap();
    assert_eq!(read.len(), written.len());
}

/// Each partition's mark: written after the rows, the highest offset wins
/// (a replayed flush writes an older one again), one aggregate's marks are
/// not another's.
#[tokio::test]
#[ignore = "needs the real stack: run scripts/test"]
async fn partition_marks_round_trip_and_the_highest_offset_wins() {
    let stack = etl_testkit::Stack::load();
    let sink = etl_testkit::fresh_analytics_db(&stack, "sink_marks").await;
    let mark = |partition, offset: i64| PartitionMark {
        partition,
        offset,
        mark: SourceMark {
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
        },
        // Known for partition 0 only.
        newest_minute: (partition == 0).then_some(Minute(1_795_505_400 + offset * 60)),
    };
    for marks in [
        vec![mark(0, 3)],
        vec![mark(0, 7), mark(1, 2)],
        vec![mark(0, 3)],
    ] {
        sink.write::<OrdersByMinute>(&[], &marks).await.unwrap();
    }
    let mut loaded = sink.load_marks::<OrdersByMinute>(&[0, 1, 5]).await.unwrap();
    loaded.sort_by_key(|m| m.partition);
    assert_eq!(loaded, vec![mark(0, 7), mark(1, 2)]);
    assert!(sink
        .load_marks::<CustomersByMinute>(&[0, 1])
        .await
        .unwrap()
        .is_empty());
    assert!(sink
        .load_marks::<OrdersByMinute>(&[])
        .await
        .unwrap()
        .is_empty());
}

/// Tables written before the marks table: their marks are filled in from
/// the rows, as loading every row made them (the highest offset; the
/// greatest mark, with the source rows of every row at it; the newest
/// minute of a by-minute aggregate), once.
#[tokio::test]
#[ignore = "needs the real stack: run scripts/test"]
async fn the_marks_of_an_older_release_are_filled_in_from_its_rows() {
    let stack = etl_testkit::Stack::load();
    let sink = etl_testkit::fresh_analytics_db(&stack, "sink_fill_in").await;
    sink.client()
        .query("DROP TABLE source_marks")
        .execute()
        .await
        .unwrap();
    let at = |commit: u64, rows: Vec<i64>| SourceMark {
        snapshot: SnapshotId {
            lsn: 100,
            started_ms: 1_795_505_416_569,
        },
        snapshot_offset: 4,
        position: Position { commit, lsn: 900 },
        rows: rows.into(),
    };
    let row = |minute: i64, partition, offset, mark: SourceMark| StoredRow {
        key: (Minute(minute), "paid".to_string()),
        partition,
        value: OrderTotals {
            orders: 1,
            revenue: Decimal::new(100, 2),
        },
        offset,
        mark,
    };
    // Partition 0: its last flush wrote two rows (at the greatest mark, with
    // a source row each); an older row has a higher offset than one of them.
    let rows = vec![
        row(60, 0, 9, at(50, vec![1])),
        row(120, 0, 12, at(70, vec![2])),
        row(180, 0, 11, at(70, vec![3])),
        row(60, 1, 5, at(20, vec![4])),
    ];
    sink.write::<OrdersByMinute>(&rows, &[]).await.unwrap();
    let products = StoredRow {
        key: 1,
        partition: 2,
        value: ProductInfo::default(),
        offset: 8,
        mark: SourceMark::default(),
    };
    sink.write::<Products>(&[products], &[]).await.unwrap();
    let sales = StoredRow {
        key: 7,
        partition: 3,
        value: SalesTotals {
            units: 2,
            revenue: Decimal::new(500, 2),
            lines: 1,
        },
        offset: 6,
        mark: at(30, vec![5]),
    };
    sink.write::<ProductSales>(&[sales], &[]).await.unwrap();

    sink.create_marks_table("sink_fill_in").await.unwrap();
    assert_eq!(
        sink.fill_in_marks::<OrdersByMinute>().await.unwrap(),
        Some(2)
    );
    assert_eq!(sink.fill_in_marks::<Products>().await.unwrap(), Some(1));
    assert_eq!(sink.fill_in_marks::<ProductSales>().await.unwrap(), Some(1));
    assert_eq!(
        sink.fill_in_marks::<CustomersByMinute>().await.unwrap(),
        None
    );
    // Once: now the table has its marks.
    assert_eq!(sink.fill_in_marks::<OrdersByMinute>().await.unwrap(), None);

    let mut marks = sink.load_marks::<OrdersByMinute>(&[0, 1]).await.unwrap();
    marks.sort_by_key(|m| m.partition);
    let mut zero = marks[0].mark.rows.to_vec();
    zero.sort_unstable();
    assert_eq!((marks[0].offset, marks[0].mark.position.commit), (12, 70));
    assert_eq!(zero, [2, 3]);
    assert_eq!(marks[0].mark.snapshot_offset, 4);
    assert_eq!(marks[0].newest_minute, Some(Minute(180)));
    assert_eq!(
        marks[1],
        PartitionMark {
            partition: 1,
            offset: 5,
            mark: at(20, vec![4]),
            newest_minute: Some(Minute(60)),
        }
    );
    // Not keyed by minute: any key may be stored.
    let sales = sink.load_marks::<ProductSales>(&[3]).await.unwrap();
    assert_eq!(
        sales,
        vec![PartitionMark {
            partition: 3,
            offset: 6,
            mark: at(30, vec![5]),
            newest_minute: None,
        }]
    );
    let products = sink.load_marks::<Products>(&[2]).await.unwrap();
    assert_eq!(
        products,
        vec![PartitionMark {
            partition: 2,
            offset: 8,
            mark: SourceMark::default(),
            newest_minute: None,
        }]
    );
}
