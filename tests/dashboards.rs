//! The Grafana provisioning in grafana/provisioning: both dashboards are well
//! formed and point at provisioned data sources; every PromQL expression of
//! the Pipeline dashboard parses (promtool) and uses only the metrics the
//! processor exports; every ClickHouse query of the Store live dashboard runs
//! on a current ClickHouse (chdb) and on the Debian server (18.16) with the
//! same answers, and on the real stack returns exactly the figures computed
//! from Postgres, to the cent.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etl_testkit::pipeline::{wait, Run};
use rust_decimal::Decimal;
use serde_json::Value;

const CLICKHOUSE_TYPE: &str = "grafana-clickhouse-datasource";
const PROMETHEUS_TYPE: &str = "prometheus";

/// The metrics the processor exports (the contract of its /metrics endpoint).
const METRIC_CONTRACT: [&str; 9] = [
    "etl_events_total",
    "etl_consumer_lag_messages",
    "etl_batch_size_records",
    "etl_flush_duration_seconds",
    "etl_rows_flushed_total",
    "etl_dead_letters_total",
    "etl_actor_restarts_total",
    "etl_mailbox_depth_messages",
    "etl_freshness_seconds",
];

/// What the Store live dashboard must show: a panel whose title contains all
/// the words of each entry (case-insensitive).
const STORE_LIVE_PANELS: &[&[&str]] = &[
    &["orders per minute"],
    &["revenue per minute"],
    &["rolling", "revenue", "5 min", "1 h", "24 h"],
    &["rolling", "orders", "5 min", "1 h", "24 h"],
    &["average order value"],
    &["status breakdown"],
    &["top products", "revenue", "all time"],
    &["top categories", "revenue", "all time"],
    &["new customers per minute"],
    &["new customers", "in range"],
];

const PIPELINE_PANELS: &[&[&str]] = &[
    &["throughput"],
    &["lag", "partition"],
    &["flush latency", "p50", "p99"],
    &["freshness"],
    &["restarts"],
    &["dead letters"],
    &["batch size"],
    &["rows flushed"],
    &["mailbox depth"],
];

fn provisioning(path: &str) -> PathBuf {
    etl_testkit::repo_root()
        .join("grafana/provisioning")
        .join(path)
}

fn dashboard(file: &str) -> Value {
    let path = provisioning(&format!("dashboards/{file}"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn store_live() -> Value {
    dashboard("store-live.json")
}

fn pipeline() -> Value {
    dashboard("pipeline.json")
}

/// uid -> type of every provisioned data source.
fn datasources() -> BTreeMap<String, String> {
    let path = provisioning("datasources/datasources.yml");
    let text = std::fs::read_to_string(&path).unwrap();
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    yaml["datasources"]
        .as_sequence()
        .expect("datasources: a list")
        .iter()
        .map(|d| {
            let field = |k: &str| {
                d[k].as_str()
                    .unwrap_or_else(|| panic!("data source without {k}: {d:?}"))
                    .to_owned()
            };
            (field("uid"), field("type"))
        })
        .collect()
}

fn panels(dashboard: &Value) -> &Vec<Value> {
    dashboard["panels"].as_array().expect("panels")
}

fn title(panel: &Value) -> &str {
    panel["title"].as_str().expect("every panel has a title")
}

/// One query of a panel.
#[derive(Debug, Clone)]
struct Target {
    panel: String,
    ref_id: String,
    /// rawSql (ClickHouse) or expr (Prometheus).
    text: String,
}

fn targets(dashboard: &Value, datasource_type: &str, field: &str) -> Vec<Target> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let ds = if target["datasource"].is_object() {
                &target["datasource"]
            } else {
                &panel["datasource"]
            };
            if ds["type"] != datasource_type {
                continue;
            }
            let text = target[field].as_str().unwrap_or_else(|| {
                panic!(
                    "{}: a {datasource_type} target without {field}",
                    title(panel)
                )
            });
            out.push(Target {
                panel: title(panel).to_owned(),
                ref_id: target["refId"].as_str().unwrap_or("A").to_owned(),
                text: text.to_owned(),
            });
        }
    }
    out
}

fn clickhouse_targets() -> Vec<Target> {
    targets(&store_live(), CLICKHOUSE_TYPE, "rawSql")
}

fn prometheus_targets() -> Vec<Target> {
    targets(&pipeline(), PROMETHEUS_TYPE, "expr")
}

fn has_panel(dashboard: &Value, words: &[&str]) -> bool {
    panels(dashboard).iter().any(|p| {
        let t = title(p).to_lowercase();
        words.iter().all(|w| t.contains(w))
    })
}

/// The `etl_*` metric names a PromQL expression references (what the regex
/// `etl_[a-z_]+` finds at a name boundary), with the series suffixes of a
/// histogram (`_bucket`, `_sum`, `_count`) stripped, so that each is a name
/// of the metrics contract. Standalone: copy it where it is needed.
pub fn referenced_metrics(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut from = 0;
    while let Some(found) = expr[from..].find("etl_") {
        let start = from + found;
        let end = start
            + expr[start..]
                .bytes()
                .take_while(|b| b.is_ascii_lowercase() || *b == b'_')
                .count();
        let at_boundary = start == 0 || {
            let before = bytes[start - 1];
            !(before.is_ascii_alphanumeric() || before == b'_' || before == b':')
        };
        if at_boundary {
            let name = &expr[start..end];
            let name = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.insert(name.to_owned());
        }
        from = end;
    }
    names
}

/// A dashboard time range as the ClickHouse plugin sees it: unix seconds and
/// the query interval.
#[derive(Debug, Clone, Copy)]
struct TimeRange {
    from: i64,
    to: i64,
    interval_s: i64,
}

/// Expands the grafana-clickhouse-datasource macros exactly as the plugin
/// does (its pkg/macros/macros.go); any other `$__` macro or `$` variable
/// fails the test (the dashboards must not depend on one).
fn expand_macros(sql: &str, range: TimeRange) -> String {
    let TimeRange {
        from,
        to,
        interval_s,
    } = range;
    let mut out = String::new();
    let mut rest = sql;
    while let Some(at) = rest.find("$__") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 3..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..name_len];
        let mut tail = &after[name_len..];
        let arg = if let Some(args) = tail.strip_prefix('(') {
            let close = args.find(')').expect("a macro's closing parenthesis");
            tail = &args[close + 1..];
            Some(args[..close].trim())
        } else {
            None
        };
        let expanded = match (name, arg) {
            ("timeFilter", Some(c)) => {
                format!("{c} >= toDateTime({from}) AND {c} <= toDateTime({to})")
            }
            ("fromTime", None) => format!("toDateTime({from})"),
            ("toTime", None) => format!("toDateTime({to})"),
            ("timeInterval", Some(c)) => {
                format!("toStartOfInterval(toDateTime({c}), INTERVAL {interval_s} second)")
            }
            ("interval_s", None) => interval_s.to_string(),
            _ => panic!("macro $__{name} ({arg:?}) is not one the dashboards may use:\n{sql}"),
        };
        out.push_str(&expanded);
        rest = tail;
    }
    out.push_str(rest);
    assert!(
        !out.contains('$'),
        "a variable is left after expansion:\n{out}"
    );
    out
}

// ------------------------------------------------------------ structure --

#[test]
fn dashboards_are_well_formed_and_use_provisioned_datasources() {
    let sources = datasources();
    assert_eq!(
        sources.get("clickhouse").map(String::as_str),
        Some(CLICKHOUSE_TYPE)
    );
    assert_eq!(
        sources.get("prometheus").map(String::as_str),
        Some(PROMETHEUS_TYPE)
    );

    for (file, uid, name, panel_type) in [
        (
            "store-live.json",
            "store-live",
            "Store live",
            CLICKHOUSE_TYPE,
        ),
        ("pipeline.json", "pipeline", "Pipeline", PROMETHEUS_TYPE),
    ] {
        let d = dashboard(file);
        assert_eq!(d["uid"], uid, "{file}");
        assert_eq!(d["title"], name, "{file}");
        assert_eq!(d["refresh"], "5s", "{file}");
        assert_eq!(d["timezone"], "utc", "{file}");
        assert_eq!(d["time"]["from"], "now-1h", "{file}");
        assert_eq!(d["time"]["to"], "now", "{file}");
        let mut ids = BTreeSet::new();
        for panel in panels(&d) {
            let t = title(panel);
            assert!(
                ids.insert(panel["id"].as_i64().unwrap()),
                "{file}: duplicate id at {t}"
            );
            assert!(panel["gridPos"]["w"].as_i64().unwrap() > 0, "{file}: {t}");
            let ds = &panel["datasource"];
            let ds_uid = ds["uid"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: {t}: no datasource uid"));
            assert_eq!(
                sources.get(ds_uid).map(String::as_str),
                Some(panel_type),
                "{file}: {t}: data source {ds_uid} is not a provisioned {panel_type}"
            );
            let targets = panel["targets"]
                .as_array()
                .unwrap_or_else(|| panic!("{t}: no targets"));
            assert!(!targets.is_empty(), "{file}: {t}: no targets");
            for target in targets {
                let uid = target["datasource"]["uid"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{file}: {t}: a target without datasource uid"));
                assert_eq!(
                    sources.get(uid),
                    Some(&target["datasource"]["type"].as_str().unwrap().to_owned()),
                    "{file}: {t}: target data source {uid}"
                );
                if panel_type == CLICKHOUSE_TYPE {
                    let sql = target["rawSql"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{t}: no rawSql"));
                    assert!(!sql.trim().is_empty(), "{t}: empty rawSql");
                    assert_eq!(target["editorType"], "sql", "{t}");
                    // The plugin's format is sqlutil.FormatQueryOption: 0 time series, 1 table.
                    match target["queryType"].as_str() {
                        Some("timeseries") => {
                            assert_eq!(target["format"], 0, "{t}");
                            assert!(
                                sql.contains(" AS time"),
                                "{t}: a time series needs a time column"
                            );
                        }
                        Some("table") => assert_eq!(target["format"], 1, "{t}"),
                        other => panic!("{t}: queryType {other:?}"),
                    }
                } else {
                    let expr = target["expr"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{t}: no expr"));
                    assert!(!expr.trim().is_empty(), "{t}: empty expr");
                }
            }
        }
    }

    let store = store_live();
    for words in STORE_LIVE_PANELS {
        assert!(
            has_panel(&store, words),
            "Store live has no panel titled with {words:?}"
        );
    }
    let pipe = pipeline();
    for words in PIPELINE_PANELS {
        assert!(
            has_panel(&pipe, words),
            "Pipeline has no panel titled with {words:?}"
        );
    }

    // The aggregate tables: always analytics.<table>, always FINAL; a panel on
    // product_sales (no time dimension) says "all time".
    for target in clickhouse_targets() {
        let sql = &target.text;
        let mut rest = sql.as_str();
        let mut tables = 0;
        while let Some(at) = rest.find("analytics.") {
            let after = &rest[at + "analytics.".len()..];
            let table: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                after[table.len()..].starts_with(" FINAL"),
                "{}: analytics.{table} read without FINAL:\n{sql}",
                target.panel
            );
            tables += 1;
            rest = after;
        }
        assert!(
            tables > 0,
            "{}: reads no analytics.<table>:\n{sql}",
            target.panel
        );
        for (i, _) in sql.match_indices("FROM ") {
            let next = &sql[i + 5..];
            assert!(
                next.starts_with('(') || next.starts_with("analytics."),
                "{}: a table not named analytics.<table>:\n{sql}",
                target.panel
            );
        }
        if sql.contains("analytics.product_sales") {
            assert!(
                target.panel.to_lowercase().contains("all time"),
                "{}: product_sales has no time dimension: say \"all time\"",
                target.panel
            );
        } else {
            assert!(
                sql.contains("$__"),
                "{}: ignores the time range",
                target.panel
            );
        }
    }
}

// --------------------------------------------------------------- PromQL --

/// Grafana's own interval variables, replaced by a fixed window so that
/// promtool can parse an expression that uses them.
fn promql_for_promtool(expr: &str) -> String {
    let fixed = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    assert!(!fixed.contains('$'), "unknown Grafana variable in {expr}");
    fixed
}

/// `promtool check rules` on a rules file with one recording rule per expression.
fn promtool_check(name: &str, exprs: &[(String, String)]) -> std::process::Output {
    let rules: Vec<Value> = exprs
        .iter()
        .map(|(record, expr)| serde_json::json!({ "record": record, "expr": promql_for_promtool(expr) }))
        .collect();
    let file =
        serde_json::json!({ "groups": [{ "name": "dashboard_expressions", "rules": rules }] });
    let path = std::env::temp_dir().join(format!("{name}-{}.rules.yml", std::process::id()));
    std::fs::write(&path, serde_yaml_ng::to_string(&file).unwrap()).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool: {e}. scripts/install installs it (Debian package prometheus)")
        });
    let _ = std::fs::remove_file(&path);
    out
}

#[test]
fn every_promql_expression_parses_and_uses_only_contract_metrics() {
    let targets = prometheus_targets();
    assert!(
        targets.len() >= 9,
        "too few Prometheus targets: {}",
        targets.len()
    );
    let exprs: Vec<(String, String)> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            (
                format!("dashboard:expr_{i}:{}", t.ref_id.to_lowercase()),
                t.text.clone(),
            )
        })
        .collect();
    let out = promtool_check("pipeline-dashboard", &exprs);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check rules failed:\n{text}");
    assert!(
        text.contains(&format!("SUCCESS: {} rules found", exprs.len())),
        "{text}"
    );

    // The check is live: promtool refuses a broken expression.
    let broken = [(
        "dashboard:broken".to_owned(),
        "sum(rate(etl_events_total[1m])".to_owned(),
    )];
    assert!(!promtool_check("broken-expression", &broken)
        .status
        .success());

    let contract: BTreeSet<String> = METRIC_CONTRACT.iter().map(|s| s.to_string()).collect();
    let mut used = BTreeSet::new();
    for t in &targets {
        let names = referenced_metrics(&t.text);
        assert!(
            !names.is_empty(),
            "{}: uses no etl_ metric: {}",
            t.panel,
            t.text
        );
        for name in names {
            assert!(
                contract.contains(&name),
                "{}: {name} is not an exported metric ({})",
                t.panel,
                t.text
            );
            used.insert(name);
        }
    }
    assert_eq!(used, contract, "every exported metric has a panel");
}

#[test]
fn referenced_metrics_strips_histogram_suffixes_only_at_name_boundaries() {
    let expr = "histogram_quantile(0.99, sum by (le) (rate(etl_flush_duration_seconds_bucket[1m]))) \
                / sum(rate(etl_batch_size_records_count[1m])) + my_etl_other + rate(etl_events_total[5m])";
    let names: Vec<String> = referenced_metrics(expr).into_iter().collect();
    assert_eq!(
        names,
        [
            "etl_batch_size_records",
            "etl_events_total",
            "etl_flush_duration_seconds"
        ]
    );
}

// ----------------------------------------------------------- ClickHouse --

/// Rows for the cross-version check: several partitions, a row rewritten
/// with a higher offset, zero rows, a cancelled order, a deleted product,
/// data outside the range.
const FIXTURE_ROWS: &[&str] = &[
    "INSERT INTO analytics.orders_by_minute (minute, status, source_partition, orders, revenue, source_offset) VALUES ('2024-02-01 09:00:00', 'paid', 0, 1, 45.48, 3)",
    "INSERT INTO analytics.orders_by_minute (minute, status, source_partition, orders, revenue, source_offset) VALUES ('2024-02-01 09:00:00', 'paid', 0, 2, 90.96, 7)",
    "INSERT INTO analytics.orders_by_minute (minute, status, source_partition, orders, revenue, source_offset) VALUES ('2024-02-01 09:00:00', 'paid', 1, 1, 0.05, 4)",
    "INSERT INTO analytics.orders_by_minute (minute, status, source_partition, orders, revenue, source_offset) VALUES ('2024-02-01 09:00:00', 'cancelled', 2, 1, 10.01, 2)",
    "INSERT INTO analytics.orders_by_minute (minute, status, source_partition, orders, revenue, source_offset) VALUES ('2024-02-01 09:01:00', 'pending', 2, 0, 0, 9)",
    "INSERT INTO analytics.orders_by_minute (minute, status, source_partition, orders, revenue, source_offset) VALUES ('2024-02-01 09:03:00', 'pending', 3, 2, 33.33, 5)",
    "INSERT INTO analytics.orders_by_minute (minute, status, source_partition, orders, revenue, source_offset) VALUES ('2024-02-01 09:58:00', 'shipped', 2, 3, 10.00, 10)",
    "INSERT INTO analytics.orders_by_minute (minute, status, source_partition, orders, revenue, source_offset) VALUES ('2024-02-01 07:00:00', 'paid', 0, 5, 500.00, 11)",
    "INSERT INTO analytics.product_sales (product_id, source_partition, units, revenue, lines, source_offset) VALUES (5, 0, 2, 39.98, 1, 4), (5, 3, 1, 19.99, 1, 8), \
     (6, 1, 0, 0, 0, 5), (7, 1, 3, 59.97, 2, 5), (8, 2, 1, 5.01, 1, 3)",
    "INSERT INTO analytics.products VALUES (5, 0, 'Espresso', 'coffee', 19.99, 0, 3), \
     (6, 1, 'Kettle', 'equipment', 45, 1, 4), (7, 1, 'Mug', 'accessories', 19.99, 0, 4), \
     (8, 2, 'Filters', 'coffee', 5.01, 0, 1)",
    "INSERT INTO analytics.products VALUES (5, 0, 'Espresso beans', 'coffee', 21.50, 0, 9)",
    "INSERT INTO analytics.customers_by_minute (minute, source_partition, customers, source_offset) VALUES ('2024-02-01 09:00:00', 0, 2, 1), \
     ('2024-02-01 09:00:00', 1, 1, 6), ('2024-02-01 09:30:00', 2, 1, 1), ('2024-01-01 09:00:00', 0, 7, 1)",
];

/// The fixture's range: 2024-02-01 08:00 to 10:00 UTC, one-minute buckets.
const FIXTURE_RANGE: TimeRange = TimeRange {
    from: 1_706_774_400,
    to: 1_706_781_600,
    interval_s: 60,
};

/// What each Store live panel shows for the fixture (TSV; numbers compared
/// by value, since servers print decimals differently).
const FIXTURE_EXPECTED: &[(&str, &str)] = &[
    ("rolling orders", "3\t5\t14"),
    ("rolling revenue", "10.00\t43.33\t634.34"),
    ("average order value", "16.79"),
    ("new customers (in range)", "4"),
    (
        "orders per minute",
        "2024-02-01 09:00:00\t4\n2024-02-01 09:03:00\t2\n2024-02-01 09:58:00\t3",
    ),
    (
        "revenue per minute",
        "2024-02-01 09:00:00\t91.01\n2024-02-01 09:03:00\t33.33\n2024-02-01 09:58:00\t10.00",
    ),
    (
        "status breakdown",
        "paid\t3\t91.01\nshipped\t3\t10.00\npending\t2\t33.33\ncancelled\t1\t10.01",
    ),
    (
        "new customers per minute",
        "2024-02-01 09:00:00\t3\n2024-02-01 09:30:00\t1",
    ),
    (
        "top products",
        "5\tEspresso beans\tcoffee\t3\t59.97\n7\tMug\taccessories\t3\t59.97\n8\tFilters\tcoffee\t1\t5.01",
    ),
    ("top categories", "coffee\t4\t64.98\naccessories\t3\t59.97"),
];

fn fixture_expected(panel: &str) -> &'static str {
    let lower = panel.to_lowercase();
    FIXTURE_EXPECTED
        .iter()
        .find(|(key, _)| lower.contains(key))
        .unwrap_or_else(|| panic!("no fixture expectation for panel {panel}"))
        .1
}

/// Runs `statements`, then each query, on chdb (a current ClickHouse in
/// process); Ok(TSV) or Err(message) per query, and the server version.
/// The project venv's python (scripts/install makes it, with chdb).
fn venv_python() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(p) = std::env::var("STACK_PYTHON") {
        candidates.push(PathBuf::from(p));
    }
    let cache = std::env::var("ONLINE_STORE_CDC_CACHE")
        .map(PathBuf::from)
        .ok()
        .or_else(|| {
            std::env::var("HOME")
                .ok()
                .map(|h| PathBuf::from(h).join(".cache/online-store-cdc"))
        });
    if let Some(cache) = cache {
        candidates.push(cache.join("venv/bin/python"));
    }
    candidates.into_iter().find(|p| p.exists())
}

#[test]
fn store_live_queries_run_on_a_current_clickhouse() {
    let Some(python) = venv_python() else {
        eprintln!(
            "SKIPPED: no project venv python (scripts/install creates it with chdb); \
             the Store live queries were not run on a current ClickHouse"
        );
        return;
    };
    let targets = clickhouse_targets();
    let queries: Vec<String> = targets
        .iter()
        .map(|t| expand_macros(&t.text, FIXTURE_RANGE))
        .collect();
    let mut statements = etl_testkit::analytics_ddl("analytics");
    statements.extend(FIXTURE_ROWS.iter().map(|s| s.to_string()));
    let answer = etl_testkit::chdb(&python, &statements, &queries);
    let version = &answer.version;
    let major: u32 = version.split('.').next().unwrap().parse().unwrap();
    assert!(major >= 24, "not a current ClickHouse: {version}");
    let mut failures = Vec::new();
    for ((target, sql), result) in targets.iter().zip(&queries).zip(&answer.results) {
        match result {
            Err(e) => failures.push(format!("{}: {e}\n{sql}", target.panel)),
            Ok(tsv) => {
                let got = etl_testkit::normalise_numbers(tsv.trim_end());
                let want = etl_testkit::normalise_numbers(fixture_expected(&target.panel));
                if got != want {
                    failures.push(format!("{}: got\n{got}\nwant\n{want}\n{sql}", target.panel));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "on ClickHouse {version}:\n{}",
        failures.join("\n\n")
    );
    eprintln!(
        "{} Store live queries ran on ClickHouse {version} with the expected rows",
        queries.len()
    );
}

/// Runs `sql` on the stack's ClickHouse; the TSV text (wait_end_of_query is
/// set by the sink's client, so a late error is not lost).
async fn clickhouse_tsv(sink: &etl::sink::ClickHouseSink, sql: &str) -> Result<String, String> {
    let mut cursor = sink
        .client()
        .query(sql)
        .fetch_bytes("TSV")
        .map_err(|e| e.to_string())?;
    let bytes = cursor.collect().await.map_err(|e| e.to_string())?;
    String::from_utf8(bytes.to_vec()).map_err(|e| e.to_string())
}

#[tokio::test]
#[ignore = "needs the real stack: run scripts/test"]
async fn store_live_queries_give_the_same_rows_on_the_debian_server() {
    let stack = etl_testkit::Stack::load();
    let db = "dashboards_versions_check";
    let sink = etl_testkit::fresh_analytics_db(&stack, db).await;
    for statement in FIXTURE_ROWS {
        let statement = statement.replace("analytics.", &format!("{db}."));
        sink.client().query(&statement).execute().await.unwrap();
    }
    let mut failures = Vec::new();
    let targets = clickhouse_targets();
    for target in &targets {
        let sql =
            expand_macros(&target.text, FIXTURE_RANGE).replace("analytics.", &format!("{db}."));
        match clickhouse_tsv(&sink, &sql).await {
            Err(e) => failures.push(format!("{}: {e}\n{sql}", target.panel)),
            Ok(tsv) => {
                let got = etl_testkit::normalise_numbers(tsv.trim_end());
                let want = etl_testkit::normalise_numbers(fixture_expected(&target.panel));
                if got != want {
                    failures.push(format!("{}: got\n{got}\nwant\n{want}\n{sql}", target.panel));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    eprintln!(
        "{} Store live queries: same rows on the stack's ClickHouse",
        targets.len()
    );
}

// ------------------------------------------------- the real pipeline ----

/// Unescapes one TSV cell (ClickHouse escapes \t, \n and \\).
fn tsv_cell(cell: &str) -> String {
    let mut out = String::new();
    let mut chars = cell.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('N') => out.push_str("\\N"),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

fn tsv_rows(tsv: &str) -> Vec<Vec<String>> {
    tsv.lines()
        .map(|l| l.split('\t').map(tsv_cell).collect())
        .collect()
}

/// True for a Postgres money text with exactly two decimals ("12.30").
fn is_cents(s: &str) -> bool {
    s.split_once('.')
        .is_some_and(|(units, cents)| cents.len() == 2 && !units.is_empty())
        && Decimal::from_str(s).is_ok()
}

/// The ClickHouse rows, each decimal written with two decimals where Postgres
/// has a money value (a current server prints "10" for 10.00).
fn align_decimals(ch: Vec<Vec<String>>, pg: &[Vec<String>]) -> Vec<Vec<String>> {
    ch.into_iter()
        .enumerate()
        .map(|(r, row)| {
            row.into_iter()
                .enumerate()
                .map(|(c, cell)| {
                    let money = pg
                        .get(r)
                        .and_then(|p| p.get(c))
                        .is_some_and(|p| is_cents(p));
                    match Decimal::from_str(&cell) {
                        Ok(mut d) if money && d.scale() <= 2 => {
                            d.rescale(2);
                            d.to_string()
                        }
                        _ => cell,
                    }
                })
                .collect()
        })
        .collect()
}

/// The Postgres figure each Store live panel shows, over `range`: the same
/// definitions (minute of created_at in UTC; revenue without cancelled
/// orders; windows ending at the range's end), computed from the source rows.
fn postgres_reference(panel: &str, range: TimeRange) -> String {
    let TimeRange {
        from,
        to,
        interval_s: n,
    } = range;
    let f = format!("(to_timestamp({from}) AT TIME ZONE 'UTC')");
    let t = format!("(to_timestamp({to}) AT TIME ZONE 'UTC')");
    let minute = "date_trunc('minute', created_at AT TIME ZONE 'UTC')";
    let bucket =
        format!("to_timestamp(floor(extract(epoch FROM m) / {n}) * {n}) AT TIME ZONE 'UTC'");
    let money = "::numeric(20,2)::text";
    let lower = panel.to_lowercase();
    let per_minute = |table: &str, value: &str, filter: &str| {
        format!(
            "SELECT to_char(b, 'YYYY-MM-DD HH24:MI:SS'), {value} FROM \
             (SELECT {bucket} AS b, status_ok, total_amount FROM \
              (SELECT {minute} AS m, {filter} AS status_ok, {amount} AS total_amount FROM {table}) x \
              WHERE m >= {f} AND m <= {t} AND status_ok) y \
             GROUP BY b ORDER BY b",
            amount = if table == "orders" { "total_amount" } else { "0::numeric" },
        )
    };
    if lower.contains("rolling orders") {
        format!(
            "SELECT (count(*) FILTER (WHERE m > {t} - interval '5 minutes'))::text, \
                    (count(*) FILTER (WHERE m > {t} - interval '1 hour'))::text, count(*)::text \
             FROM (SELECT {minute} AS m FROM orders) o WHERE m > {t} - interval '24 hours' AND m <= {t}"
        )
    } else if lower.contains("rolling revenue") {
        format!(
            "SELECT coalesce(sum(total_amount) FILTER (WHERE m > {t} - interval '5 minutes'), 0){money}, \
                    coalesce(sum(total_amount) FILTER (WHERE m > {t} - interval '1 hour'), 0){money}, \
                    coalesce(sum(total_amount), 0){money} \
             FROM (SELECT {minute} AS m, total_amount FROM orders WHERE status <> 'cancelled') o \
             WHERE m > {t} - interval '24 hours' AND m <= {t}"
        )
    } else if lower.contains("average order value") {
        format!(
            "SELECT round(sum(total_amount) / nullif(count(*), 0), 2){money} \
             FROM (SELECT {minute} AS m, total_amount FROM orders WHERE status <> 'cancelled') o \
             WHERE m >= {f} AND m <= {t}"
        )
    } else if lower.contains("new customers per minute") {
        per_minute(
            "customers",
            &format!("((count(*) * 60)::float8 / {n})::text"),
            "true",
        )
    } else if lower.contains("new customers") {
        format!(
            "SELECT count(*)::text FROM (SELECT {minute} AS m FROM customers) c \
             WHERE m >= {f} AND m <= {t}"
        )
    } else if lower.contains("orders per minute") {
        per_minute(
            "orders",
            &format!("((count(*) * 60)::float8 / {n})::text"),
            "true",
        )
    } else if lower.contains("revenue per minute") {
        per_minute(
            "orders",
            &format!("trunc(sum(total_amount) * 60 / {n}, 2){money}"),
            "status <> 'cancelled'",
        )
    } else if lower.contains("status breakdown") {
        format!(
            "SELECT status, count(*)::text, sum(total_amount){money} \
             FROM (SELECT {minute} AS m, status, total_amount FROM orders) o \
             WHERE m >= {f} AND m <= {t} GROUP BY status ORDER BY count(*) DESC, status COLLATE \"C\""
        )
    } else if lower.contains("top products") {
        format!(
            "SELECT i.product_id::text, p.name, p.category, sum(i.quantity)::text, \
                    sum(i.quantity * i.unit_price){money} \
             FROM order_items i JOIN products p ON p.id = i.product_id \
             GROUP BY i.product_id, p.name, p.category \
             ORDER BY sum(i.quantity * i.unit_price) DESC, i.product_id LIMIT 10"
        )
    } else if lower.contains("top categories") {
        format!(
            "SELECT p.category, sum(i.quantity)::text, sum(i.quantity * i.unit_price){money} \
             FROM order_items i JOIN products p ON p.id = i.product_id \
             GROUP BY p.category \
             ORDER BY sum(i.quantity * i.unit_price) DESC, p.category COLLATE \"C\" LIMIT 10"
        )
    } else {
        panic!("no Postgres reference for panel {panel}: add one")
    }
}

async fn postgres_rows(pg: &tokio_postgres::Client, sql: &str) -> Vec<Vec<String>> {
    pg.query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"))
        .iter()
        .map(|row| {
            (0..row.len())
                .map(|i| {
                    row.get::<_, Option<String>>(i)
                        .unwrap_or_else(|| "\\N".to_owned())
                })
                .collect()
        })
        .collect()
}

fn show(rows: &[Vec<String>]) -> String {
    if rows.is_empty() {
        return "  (no rows)".to_owned();
    }
    rows.iter()
        .map(|r| format!("  {}", r.join(" | ")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// 2024-03-01 00:00:00 UTC: the workload's day is this + seed % 20 days.
const WORKLOAD_EPOCH: i64 = 1_709_251_200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn store_live_panels_equal_postgres_on_the_real_pipeline() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    // Disjoint from the seeds of pipeline_e2e (< 80,003) and fault_suite (< 600,200).
    let seed = 700_000 + now.as_secs() % 100_000;
    eprintln!("seed {seed}");
    let mut run = Run::new("dashboards").await;
    let _processor = run.start_processor();
    let mut workload = run.start_workload(seed, "--size small");
    wait(&mut workload, "small workload");

    let (pg, connection) =
        tokio_postgres::connect(run.stack.get("ETL_POSTGRES_URL"), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);

    // Range 1: the workload's three hours (08:00-11:00 UTC), minute buckets.
    let day = WORKLOAD_EPOCH + (seed % 20) as i64 * 86_400;
    let to = day + 11 * 3600;
    let whole = TimeRange {
        from: to - 3 * 3600,
        to,
        interval_s: 60,
    };
    // Range 2: an hour ending 17 s after the workload's median order that
    // counts as revenue, so the 5-minute windows hold it; neither end on a
    // minute; 5-minute buckets.
    let first_id = 1000 + seed as i64 * 100_000;
    let created: Vec<i64> = pg
        .query(
            "SELECT floor(extract(epoch FROM created_at))::bigint FROM orders \
             WHERE id BETWEEN $1 AND $1 + 99999 AND status <> 'cancelled' AND total_amount > 0 \
             ORDER BY created_at, id",
            &[&first_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // A small workload leaves 15-40 such orders (seeds differ); a handful is
    // enough to place the range.
    assert!(
        created.len() >= 5,
        "the workload made {} orders",
        created.len()
    );
    let median = created[created.len() / 2];
    let hour = TimeRange {
        from: median + 17 - 3600,
        to: median + 17,
        interval_s: 300,
    };

    let sink = run.sink().await;
    let targets = clickhouse_targets();
    let database = format!("{}.", run.database);
    for attempt in 1..=3 {
        // Other tests may write to the shared Postgres meanwhile: compare right
        // after reconcile found ClickHouse caught up, and again if that raced.
        run.caught_up(&format!("before comparing the panels (attempt {attempt})"))
            .await;
        let mut failures = Vec::new();
        let mut summary = Vec::new();
        for (range_name, range) in [
            ("08:00-11:00, 60 s", whole),
            ("1 h to median+17 s, 300 s", hour),
        ] {
            for target in &targets {
                let sql = expand_macros(&target.text, range).replace("analytics.", &database);
                let reference = postgres_reference(&target.panel, range);
                let pg_rows = postgres_rows(&pg, &reference).await;
                let ch_rows = match clickhouse_tsv(&sink, &sql).await {
                    Ok(tsv) => align_decimals(tsv_rows(&tsv), &pg_rows),
                    Err(e) => {
                        failures.push(format!(
                            "{} [{range_name}]: ClickHouse: {e}\n{sql}",
                            target.panel
                        ));
                        continue;
                    }
                };
                // New customers are not placed by the orders' times: the hour
                // around the median order may hold none (Postgres says so too).
                let may_be_empty = range_name.starts_with("1 h")
                    && target.panel.starts_with("New customers")
                    && pg_rows.is_empty();
                if ch_rows != pg_rows || (ch_rows.is_empty() && !may_be_empty) {
                    failures.push(format!(
                        "{} [{range_name}]{}\nClickHouse SQL:\n{sql}\nClickHouse rows:\n{}\n\
                         Postgres SQL:\n{reference}\nPostgres rows:\n{}",
                        target.panel,
                        if ch_rows.is_empty() {
                            ": no rows"
                        } else {
                            ": rows differ"
                        },
                        show(&ch_rows),
                        show(&pg_rows)
                    ));
                } else if ch_rows.is_empty() {
                    summary.push(format!(
                        "{} [{range_name}]: no rows in either",
                        target.panel
                    ));
                } else {
                    summary.push(format!(
                        "{} [{range_name}]: {} rows equal, e.g. {}",
                        target.panel,
                        ch_rows.len(),
                        ch_rows[0].join(" | ")
                    ));
                }
            }
        }
        if failures.is_empty() {
            eprintln!("{}", summary.join("\n"));
            return;
        }
        assert!(
            attempt < 3,
            "Store live panels differ from Postgres:\n\n{}",
            failures.join("\n\n")
        );
        eprintln!(
            "{} panels differ, checking again:\n{}",
            failures.len(),
            failures.join("\n\n")
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
