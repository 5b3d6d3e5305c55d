//! `etl-processor replay` on real Debezium captures prints exactly the
//! aggregates of the final database state (expected_aggregates.jsonl was
//! computed by GROUP BY in Postgres when the capture was made).

use std::process::Command;

fn replay(fixture: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_etl-processor"))
        .args(["replay", etl_testkit::fixture(fixture).to_str().unwrap()])
        .env_remove("ETL_TOPIC_PREFIX")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn expected() -> String {
    std::fs::read_to_string(etl_testkit::fixture("expected_aggregates.jsonl")).unwrap()
}

#[test]
fn schemas_on_with_precise_decimals() {
    assert_eq!(replay("schemas_on_precise.jsonl"), expected());
}

#[test]
fn schemas_off_with_string_decimals() {
    assert_eq!(replay("schemas_off_string.jsonl"), expected());
}

#[test]
fn schemas_off_with_double_decimals() {
    assert_eq!(replay("schemas_off_double.jsonl"), expected());
}

#[test]
fn the_output_follows_the_events_not_a_fixed_answer() {
    // The same capture twice is a different history (every row created
    // twice), so the report must change with it.
    let capture =
        std::fs::read_to_string(etl_testkit::fixture("schemas_off_string.jsonl")).unwrap();
    let doubled = std::env::temp_dir().join(format!("doubled-{}.jsonl", std::process::id()));
    std::fs::write(&doubled, format!("{capture}{capture}")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_etl-processor"))
        .args(["replay", doubled.to_str().unwrap()])
        .output()
        .unwrap();
    std::fs::remove_file(&doubled).ok();
    assert_ne!(String::from_utf8(out.stdout).unwrap(), expected());
}

/// Runs `replay` on a file: (exit code, stdout, stderr).
fn replay_file(path: &std::path::Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_etl-processor"))
        .args(["replay", path.to_str().unwrap()])
        .env_remove("ETL_TOPIC_PREFIX")
        .env("ETL_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Writes `text` to a temporary file for one test.
fn temp_capture(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{name}-{}.jsonl", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

/// An event that does not decode is a dead letter, as in the pipeline: its
/// line and reason go to stderr, the replay goes on, the aggregates leave it
/// out, and the exit code says that something was left out.
#[test]
fn an_undecodable_event_is_a_dead_letter_and_the_replay_goes_on() {
    let bad = r#"{"topic":"online_store.public.orders","key":null,"value":{"op":"c","after":{"id":"x"}}}"#;
    let good = r#"{"topic":"online_store.public.customers","key":{"id":1},"value":{"before":null,"after":{"id":1,"email":"a@b.c","full_name":"A","created_at":"2024-01-02T10:00:00Z"},"op":"c","source":{"sequence":"[null,\"7\"]","lsn":7}}}"#;
    let path = temp_capture("bad", &format!("{bad}\n{good}\n{bad}\n"));
    let (code, stdout, stderr) = replay_file(&path);
    std::fs::remove_file(&path).ok();
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stdout,
        "{\"aggregate\":\"customers_by_minute\",\"minute\":\"2024-01-02T10:00:00Z\",\"customers\":1}\n"
    );
    let letter = |line| {
        format!(
            "replay: line {line} (online_store.public.orders): dead letter: bad_field: column id: \
             expected an integer, got \"x\""
        )
    };
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            letter(1),
            letter(3),
            "replay: 2 events would go to the dead-letter topic (bad_field 2); the aggregates \
             leave them out"
                .to_owned(),
        ]
    );
}

#[test]
fn a_line_that_is_not_a_captured_record_stops_the_replay_with_its_number() {
    let good = r#"{"topic":"online_store.public.customers","key":{"id":1},"value":{"before":null,"after":{"id":1,"email":"a@b.c","full_name":"A","created_at":"2024-01-02T10:00:00Z"},"op":"c"}}"#;
    let path = temp_capture("not-a-capture", &format!("{good}\n{{\"value\":1}}\n"));
    let (code, stdout, stderr) = replay_file(&path);
    std::fs::remove_file(&path).ok();
    assert_eq!(code, Some(1));
    assert_eq!(stdout, "");
    assert!(
        stderr.contains("line 2: not a {topic, key, value} object"),
        "{stderr}"
    );
}

/// A capture of tables in REPLICA IDENTITY DEFAULT: the updates and deletes
/// of the tables whose aggregates subtract are dead letters, each named on
/// stderr with the table and the fix; everything else is applied, the
/// products dimension's updates and deletes included.
#[test]
fn a_replica_identity_default_capture_replays_like_the_pipeline() {
    // The snapshot and the creates; none of the 10 updates and deletes of
    // customers, orders and order_items.
    let expected = [
        r#"{"aggregate":"customers_by_minute","minute":"2024-01-02T10:00:00Z","customers":3}"#,
        r#"{"aggregate":"customers_by_minute","minute":"2024-01-02T10:01:00Z","customers":2}"#,
        r#"{"aggregate":"customers_by_minute","minute":"2024-01-03T08:15:00Z","customers":1}"#,
        r#"{"aggregate":"orders_by_minute","minute":"2024-02-01T09:00:00Z","status":"delivered","orders":1,"revenue":"39.98"}"#,
        r#"{"aggregate":"orders_by_minute","minute":"2024-02-01T09:00:00Z","status":"pending","orders":1,"revenue":"49.49"}"#,
        r#"{"aggregate":"orders_by_minute","minute":"2024-02-01T09:30:00Z","status":"pending","orders":1,"revenue":"45.00"}"#,
        r#"{"aggregate":"product_sales","product_id":1,"units":2,"revenue":"39.98","lines":1}"#,
        r#"{"aggregate":"product_sales","product_id":2,"units":2,"revenue":"90.00","lines":2}"#,
        r#"{"aggregate":"product_sales","product_id":3,"units":1,"revenue":"4.49","lines":1}"#,
    ];
    let letters = [
        (14, "customers", "u"),
        (15, "customers", "d"),
        (18, "customers", "d"),
        (31, "orders", "u"),
        (32, "order_items", "u"),
        (33, "orders", "u"),
        (34, "order_items", "d"),
        (36, "orders", "u"),
        (37, "orders", "d"),
        (39, "order_items", "d"),
    ];
    for fixture in [
        "replica_identity_default_schemas_off_string.jsonl",
        "replica_identity_default_schemas_off_double.jsonl",
        "replica_identity_default_schemas_on_precise.jsonl",
    ] {
        let (code, stdout, stderr) = replay_file(&etl_testkit::fixture(fixture));
        assert_eq!(code, Some(1), "{fixture}: {stderr}");
        assert_eq!(stdout.lines().collect::<Vec<_>>(), expected, "{fixture}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), letters.len() + 1, "{fixture}: {stderr}");
        for ((line, table, op), text) in letters.iter().zip(&lines) {
            let start = format!(
                "replay: line {line} (online_store.public.{table}): dead letter: missing_before: \
                 {table} op {op}: "
            );
            let end = format!(
                "; the aggregates of {table} subtract the old row, which Debezium sends only for \
                 a table with REPLICA IDENTITY FULL: run ALTER TABLE {table} REPLICA IDENTITY FULL"
            );
            assert!(
                text.starts_with(&start) && text.ends_with(&end),
                "{fixture}: {text}"
            );
        }
        assert_eq!(
            lines[letters.len()],
            "replay: 10 events would go to the dead-letter topic (missing_before 10); the \
             aggregates leave them out"
        );
    }
}

/// A clean capture prints nothing on stderr besides logs and exits 0.
#[test]
fn a_capture_without_dead_letters_exits_0_and_says_nothing() {
    let (code, stdout, stderr) = replay_file(&etl_testkit::fixture("schemas_off_string.jsonl"));
    assert_eq!(code, Some(0));
    assert_eq!(stdout, expected());
    assert_eq!(stderr, "");
}

/// A real redelivery: the engine was SIGKILLed before it stored its offsets
/// and sent 4 transactions again (docs/SOURCE-POSITIONS.md, 6a). Replayed
/// after the first delivery, as a consumer reads them, they change nothing:
/// their positions were applied already.
#[test]
fn events_the_connector_sent_again_after_a_kill_change_nothing() {
    let first =
        std::fs::read_to_string(etl_testkit::fixture("positions/streaming-txmeta.jsonl")).unwrap();
    let again = std::fs::read_to_string(etl_testkit::fixture(
        "positions/redelivered-after-sigkill.jsonl",
    ))
    .unwrap();
    let once = temp_capture("delivered-once", &first);
    let twice = temp_capture("delivered-twice", &format!("{first}{again}"));
    let (code, expected, _) = replay_file(&once);
    assert_eq!(code, Some(0));
    let (code, out, err) = replay_file(&twice);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, expected);
    // The redelivered transactions touch orders and order items: without
    // the positions they would have counted again.
    assert!(
        out.contains(r#""aggregate":"orders_by_minute""#)
            && out.contains(r#""aggregate":"product_sales""#),
        "{out}"
    );
    let _ = std::fs::remove_file(once);
    let _ = std::fs::remove_file(twice);
}
