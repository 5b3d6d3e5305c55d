//! `etl-processor replay` on real Debezium captures prints exactly the
//! aggregates of the final database state (expected_aggregates.jsonl was
//! computed by GROUP BY in Postgres when the capture was made).

mod common;

use std::process::Command;

fn replay(fixture: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_etl-processor"))
        .args(["replay", common::fixture(fixture).to_str().unwrap()])
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
    std::fs::read_to_string(common::fixture("expected_aggregates.jsonl")).unwrap()
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
    let capture = std::fs::read_to_string(common::fixture("schemas_off_string.jsonl")).unwrap();
    let doubled = std::env::temp_dir().join(format!("doubled-{}.jsonl", std::process::id()));
    std::fs::write(&doubled, format!("{capture}{capture}")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_etl-processor"))
        .args(["replay", doubled.to_str().unwrap()])
        .output()
        .unwrap();
    std::fs::remove_file(&doubled).ok();
    assert_ne!(String::from_utf8(out.stdout).unwrap(), expected());
}

#[test]
fn a_malformed_line_fails_with_its_line_number() {
    let bad = std::env::temp_dir().join(format!("bad-{}.jsonl", std::process::id()));
    std::fs::write(
        &bad,
        "{\"topic\":\"online_store.public.orders\",\"key\":null,\"value\":{\"op\":\"c\",\"after\":{\"id\":\"x\"}}}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_etl-processor"))
        .args(["replay", bad.to_str().unwrap()])
        .output()
        .unwrap();
    std::fs::remove_file(&bad).ok();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 1") && stderr.contains("bad_field"),
        "{stderr}"
    );
}
