//! init/clickhouse and the queries reconcile runs give the same answers on the
//! Debian ClickHouse (18.16, the stack's) and on a current release (embedded
//! through chdb, installed by scripts/install): the compose stack runs a
//! current one.

use etl::reconcile::{
    CLICKHOUSE_CUSTOMERS_BY_MINUTE, CLICKHOUSE_ORDERS_BY_MINUTE, CLICKHOUSE_PRODUCTS,
    CLICKHOUSE_PRODUCT_SALES,
};

/// Rows of every table, with what the sink does to them: several partitions,
/// a row rewritten with a higher offset, an older row written again after it
/// (a replay), rows gone to zero, a deleted product.
const ROWS: &[&str] = &[
    "INSERT INTO orders_by_minute (minute, status, source_partition, orders, revenue, source_offset) VALUES ('2024-02-01 09:00:00', 'paid', 0, 1, 45.48, 3)",
    "INSERT INTO orders_by_minute (minute, status, source_partition, orders, revenue, source_offset) VALUES ('2024-02-01 09:00:00', 'paid', 0, 2, 90.96, 7)",
    "INSERT INTO orders_by_minute (minute, status, source_partition, orders, revenue, source_offset) VALUES ('2024-02-01 09:00:00', 'paid', 1, 1, 0.01, 2)",
    "INSERT INTO orders_by_minute (minute, status, source_partition, orders, revenue, source_offset) VALUES ('2024-02-01 09:00:00', 'paid', 0, 1, 45.48, 3)",
    "INSERT INTO orders_by_minute (minute, status, source_partition, orders, revenue, source_offset) VALUES ('2024-02-01 09:01:00', 'pending', 2, 0, 0, 9)",
    "INSERT INTO product_sales (product_id, source_partition, units, revenue, lines, source_offset) VALUES (5, 0, 2, 39.98, 1, 4), (5, 3, 1, 19.99, 1, 8), (6, 1, 0, 0, 0, 5)",
    "INSERT INTO customers_by_minute (minute, source_partition, customers, source_offset) VALUES ('2024-01-02 10:00:00', 0, 2, 1), ('2024-01-02 10:00:00', 1, 1, 6)",
    "INSERT INTO customers_by_minute (minute, source_partition, customers, source_offset) VALUES ('2024-01-02 10:00:00', 0, 3, 9)",
    "INSERT INTO products VALUES (1, 0, 'Espresso', 'coffee', 19.99, 0, 3), (2, 1, 'Kettle', 'equipment', 45, 1, 4)",
    "INSERT INTO products VALUES (1, 0, 'Espresso beans', 'coffee', 21.50, 0, 8)",
];

const QUERIES: [&str; 4] = [
    CLICKHOUSE_ORDERS_BY_MINUTE,
    CLICKHOUSE_PRODUCT_SALES,
    CLICKHOUSE_CUSTOMERS_BY_MINUTE,
    CLICKHOUSE_PRODUCTS,
];

/// What each query must return (TSV, numbers normalised).
const EXPECTED: [&str; 4] = [
    "1706778000\tpaid\t3\t90.97",
    "5\t3\t59.97\t2",
    "1704189600\t4",
    "1\tEspresso beans\tcoffee\t21.5",
];

/// Sorted lines, each number written the same way ("21.50" and "21.5"
/// differ only in how a server version prints decimals).
fn normalise(tsv: &str) -> String {
    let numbers = etl_testkit::normalise_numbers(tsv);
    let mut lines: Vec<&str> = numbers.lines().collect();
    lines.sort();
    lines.join("\n")
}

#[tokio::test]
#[ignore = "needs the real stack: run scripts/test"]
async fn the_debian_server_answers_as_expected() {
    let stack = etl_testkit::Stack::load();
    let sink = etl_testkit::fresh_analytics_db(&stack, "versions_check").await;
    for statement in ROWS {
        sink.client().query(statement).execute().await.unwrap();
    }
    for (query, expected) in QUERIES.iter().zip(EXPECTED) {
        let mut cursor = sink.client().query(query).fetch_bytes("TSV").unwrap();
        let tsv = String::from_utf8(cursor.collect().await.unwrap().to_vec()).unwrap();
        assert_eq!(normalise(&tsv), expected, "{query}");
    }
}

#[test]
#[ignore = "needs the real stack: run scripts/test"]
fn a_current_server_answers_the_same() {
    let stack = etl_testkit::Stack::load();
    let mut statements = etl_testkit::analytics_ddl("analytics");
    statements.push("USE analytics".into());
    statements.extend(ROWS.iter().map(|s| s.to_string()));
    let queries: Vec<String> = QUERIES.iter().map(|q| q.to_string()).collect();
    let answer = etl_testkit::chdb(
        std::path::Path::new(stack.get("STACK_PYTHON")),
        &statements,
        &queries,
    );
    let version = &answer.version;
    let major: u32 = version.split('.').next().unwrap().parse().unwrap();
    assert!(major >= 24, "not a current ClickHouse: {version}");
    for ((query, expected), result) in QUERIES.iter().zip(EXPECTED).zip(&answer.results) {
        let tsv = result
            .as_ref()
            .unwrap_or_else(|e| panic!("{query} on {version}: {e}"));
        assert_eq!(normalise(tsv), expected, "{query} on {version}");
    }
}
