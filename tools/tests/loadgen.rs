//! `etl-tools loadgen`: what it reports is what it wrote, at the rate it
//! was asked for, and every order it wrote is consistent (its total is the sum
//! of its lines). The stack tests count the rows loadgen's customers got
//! since the test started, so they assume no other loadgen writes to the
//! stack's Postgres meanwhile (they run one at a time among themselves).

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::process::Command;

/// One stack test at a time: they count rows by time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

use etl_tools::loadgen::{APPLICATION_NAME, EMAIL_PATTERN};

fn loadgen(args: &[&str], postgres_url: Option<&str>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_etl-tools"));
    cmd.arg("loadgen").args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ETL_")) {
        cmd.env_remove(k);
    }
    if let Some(url) = postgres_url {
        cmd.env("ETL_POSTGRES_URL", url);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// The `key=value` pairs of the final summary line.
fn summary(stderr: &str) -> HashMap<String, String> {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("loadgen: summary:"))
        .unwrap_or_else(|| panic!("no summary line in:\n{stderr}"));
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| {
            let v = v.trim_end_matches("/s");
            let v = if k == "elapsed" {
                v.trim_end_matches('s')
            } else {
                v
            };
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn number<T: std::str::FromStr>(summary: &HashMap<String, String>, key: &str) -> T {
    summary
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("summary has no number {key}: {summary:?}"))
}

fn seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

async fn postgres(url: &str) -> tokio_postgres::Client {
    let (pg, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    pg
}

/// The server's clock, as text for `$1::text::timestamptz`.
async fn server_now(pg: &tokio_postgres::Client) -> String {
    pg.query_one("SELECT now()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// What a stack test starts from: the stack to itself among these tests,
/// Postgres, the server's clock before loadgen runs, and a fresh seed.
struct StackRun {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    url: String,
    pg: tokio_postgres::Client,
    since: String,
    seed: String,
}

impl StackRun {
    async fn start() -> StackRun {
        let _serial = SERIAL.lock().await;
        let url = etl_testkit::Stack::load()
            .get("ETL_POSTGRES_URL")
            .to_owned();
        let pg = postgres(&url).await;
        let since = server_now(&pg).await;
        StackRun {
            _serial,
            url,
            pg,
            since,
            seed: seed().to_string(),
        }
    }
}

/// Checks the rows loadgen's customers got since `since` against what the
/// run reported, and the consistency of every order loadgen ever wrote.
async fn check_rows(pg: &tokio_postgres::Client, since: &str, s: &HashMap<String, String>) {
    let count = |sql: &'static str| async move {
        pg.query_one(sql, &[&since, &EMAIL_PATTERN])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
            .get::<_, i64>(0)
    };
    let orders = count(
        "SELECT count(*) FROM orders o JOIN customers c ON c.id = o.customer_id \
         WHERE o.created_at >= $1::text::timestamptz AND c.email LIKE $2",
    )
    .await;
    let created: i64 = number(s, "orders");
    let deleted: i64 = number(s, "deleted");
    assert!(created > 0, "{s:?}");
    assert_eq!(
        orders,
        created - deleted,
        "orders in Postgres vs reported created - deleted: {s:?}"
    );
    let lines = count(
        "SELECT count(*) FROM order_items i JOIN orders o ON o.id = i.order_id \
         JOIN customers c ON c.id = o.customer_id \
         WHERE o.created_at >= $1::text::timestamptz AND c.email LIKE $2",
    )
    .await;
    let reported: i64 = number(s, "lines");
    let reported_deleted: i64 = number(s, "lines_deleted");
    assert_eq!(lines, reported - reported_deleted, "order lines: {s:?}");
    let customers =
        count("SELECT count(*) FROM customers WHERE created_at >= $1::text::timestamptz AND email LIKE $2")
            .await;
    assert_eq!(customers, number::<i64>(s, "customers"), "customers: {s:?}");

    // Every order loadgen ever wrote: its total is the sum of its lines, its
    // status is one of the lifecycle's, it has at least one line.
    let rows = pg
        .query(
            "SELECT o.id, o.status, o.total_amount::text, coalesce(sum(i.quantity * i.unit_price), 0)::text, count(i.id) \
             FROM orders o JOIN customers c ON c.id = o.customer_id LEFT JOIN order_items i ON i.order_id = o.id \
             WHERE c.email LIKE $1 GROUP BY o.id",
            &[&EMAIL_PATTERN],
        )
        .await
        .unwrap();
    assert!(rows.len() as i64 >= orders);
    for row in &rows {
        let (id, status, total, sum, lines): (i64, &str, &str, &str, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        assert_eq!(
            total, sum,
            "order {id}: total_amount is not the sum of its lines"
        );
        assert!(
            ["pending", "paid", "shipped", "delivered", "cancelled"].contains(&status),
            "order {id}: status {status:?}"
        );
        assert!((1..=5).contains(&lines), "order {id}: {lines} lines");
    }

    // The lifecycle moved: some of this run's orders left pending, and each
    // change stamped updated_at (now(), after created_at).
    let moved = count(
        "SELECT count(*) FROM orders o JOIN customers c ON c.id = o.customer_id \
         WHERE o.created_at >= $1::text::timestamptz AND c.email LIKE $2 AND o.status <> 'pending'",
    )
    .await;
    assert!(moved > 0, "no order of the run left pending: {s:?}");
    let unstamped = count(
        "SELECT count(*) FROM orders o JOIN customers c ON c.id = o.customer_id \
         WHERE o.created_at >= $1::text::timestamptz AND c.email LIKE $2 \
         AND o.status <> 'pending' AND o.updated_at <= o.created_at",
    )
    .await;
    assert_eq!(unstamped, 0, "status changes must set updated_at");
}

#[tokio::test]
#[ignore = "needs the real stack: run scripts/test"]
async fn writes_what_it_reports_at_the_target_rate() {
    let StackRun {
        _serial,
        url,
        pg,
        since,
        seed,
    } = StackRun::start().await;
    let url = url.as_str();
    eprintln!("seed {seed}");

    let started = Instant::now();
    let out = loadgen(
        &["--rate", "40", "--duration", "5", "--seed", &seed],
        Some(url),
    )
    .output()
    .await
    .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(took < Duration::from_secs(15), "took {took:?}");

    let s = summary(&stderr);
    assert_eq!(s["seed"], seed);
    let achieved: f64 = number(&s, "achieved");
    assert!(
        (32.0..=48.0).contains(&achieved),
        "achieved {achieved}/s, asked for 40/s"
    );
    let elapsed: f64 = number(&s, "elapsed");
    assert!((4.5..=5.5).contains(&elapsed), "elapsed {elapsed}s");
    let orders: i64 = number(&s, "orders");
    assert!(
        (160..=240).contains(&orders),
        "{orders} orders in 5 s at 40/s"
    );
    assert_eq!(number::<i64>(&s, "failed"), 0, "{s:?}");
    check_rows(&pg, &since, &s).await;
}

#[tokio::test]
#[ignore = "needs the real stack: run scripts/test"]
async fn sigterm_stops_after_the_current_transaction() {
    let StackRun {
        _serial,
        url,
        pg,
        since,
        seed,
    } = StackRun::start().await;
    let url = url.as_str();

    let child = loadgen(&["--rate", "100", "--seed", &seed], Some(url))
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output())
        .await
        .expect("loadgen did not exit within 5 s of SIGTERM")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    let s = summary(&stderr);
    assert_eq!(number::<i64>(&s, "failed"), 0, "{s:?}");
    check_rows(&pg, &since, &s).await;
}

#[tokio::test]
#[ignore = "needs the real stack: run scripts/test"]
async fn a_lost_connection_is_re_established() {
    let StackRun {
        _serial,
        url,
        pg,
        since,
        seed,
    } = StackRun::start().await;
    let url = url.as_str();

    let child = loadgen(
        &["--rate", "40", "--duration", "6", "--seed", &seed],
        Some(url),
    )
    .spawn()
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Loadgen's session alone, by its pid: first find it, then end it.
    let pids: Vec<i32> = pg
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&APPLICATION_NAME],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pids.len(), 1, "loadgen's session: {pids:?}");
    let ended: bool = pg
        .query_one("SELECT pg_terminate_backend($1)", &[&pids[0]])
        .await
        .unwrap()
        .get(0);
    assert!(ended);
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("loadgen did not finish")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("reconnected to Postgres"), "{stderr}");
    let s = summary(&stderr);
    // The operation that found the connection gone failed (nothing of it was
    // written). The only other failures allowed are its orphans: operations of
    // the same step on what it would have created (an edit of the new order).
    let count = |suffix: &str| -> i64 {
        s.iter()
            .filter(|(k, _)| k.contains('/') && k.ends_with(suffix))
            .map(|(_, v)| {
                v.trim_matches(|c: char| !c.is_ascii_digit())
                    .parse::<i64>()
                    .unwrap()
            })
            .sum()
    };
    let lost = count("/connection");
    assert!((1..=2).contains(&lost), "{s:?}");
    let failed: i64 = number(&s, "failed");
    assert_eq!(failed, lost + count("/orphan"), "{s:?}");
    assert!(failed - lost <= 3, "{s:?}");
    // It went on after reconnecting: most of the 240 orders were written.
    assert!(number::<i64>(&s, "orders") >= 200, "{s:?}");
    check_rows(&pg, &since, &s).await;
}

#[tokio::test]
async fn rate_zero_exits_at_once() {
    let started = Instant::now();
    // No ETL_POSTGRES_URL either: a turned-off service needs nothing.
    let out = loadgen(&["--rate", "0"], None).output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn a_missing_postgres_url_stops_start_up() {
    let out = loadgen(&["--rate", "5", "--duration", "1"], None)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("setting ETL_POSTGRES_URL is required"),
        "{stderr}"
    );
}

#[tokio::test]
async fn bad_flags_are_refused() {
    for args in [["--rate", "-1"], ["--rate", "fast"], ["--duration", "0"]] {
        let out = loadgen(&args, Some("postgres://nobody@127.0.0.1:1/none"))
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(args[0]), "{args:?}: {stderr}");
    }
}
