//! A bad setting stops `etl-processor` before it does anything, with exit
//! code 2 and a message that names the setting and the reason.

use std::process::Command;

fn start(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_etl-processor"));
    cmd.arg("run");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ETL_")) {
        cmd.env_remove(k);
    }
    let out = cmd.envs(env.iter().copied()).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The process must refuse to start, saying `says`.
fn refused(env: &[(&str, &str)], says: &str) {
    let (code, stderr) = start(env);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(says), "expected {says:?} in: {stderr}");
}

#[test]
fn a_bad_value_names_the_setting() {
    refused(
        &[("ETL_FLUSH_INTERVAL_MS", "soon")],
        "setting ETL_FLUSH_INTERVAL_MS (from the environment): \"soon\"",
    );
}

#[test]
fn a_misspelt_setting_is_not_ignored() {
    refused(
        &[("ETL_KAFKA_BROKER", "127.0.0.1:9092")],
        "setting ETL_KAFKA_BROKER (from the environment): unknown setting",
    );
}

#[test]
fn a_bad_log_filter_names_the_setting() {
    refused(&[("ETL_LOG", "etl=loud")], "setting ETL_LOG");
}

#[test]
fn a_missing_config_file_names_the_file() {
    refused(
        &[("ETL_CONFIG_FILE", "/nonexistent/etl.toml")],
        "config file /nonexistent/etl.toml",
    );
}
