//! The test kit, shared by the integration tests and the tools' benches: the
//! endpoints of the running stack (`scripts/stack up` writes them to
//! `$STACK_DIR/stack.env`), fresh per-test ClickHouse databases built from
//! `init/clickhouse`, the processor run as a child process (`pipeline`),
//! librdkafka's mock cluster (`mock_broker`), and random damage to messages
//! (`damage`). Nothing of it ships in the processor.

pub mod damage;
pub mod mock_broker;
pub mod pipeline;

pub use damage::damaged;
pub use mock_broker::MockBroker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use etl::config::{ClickHouseConfig, Validation};
use etl::sink::ClickHouseSink;

/// The repository's root (the test kit is one of its workspace members).
pub fn repo_root() -> PathBuf {
    let kit = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    kit.parent()
        .expect("the test kit lies in the repository")
        .to_owned()
}

/// A binary of this workspace, built next to the running test or tool
/// (`target/<profile>/<name>`): `etl-processor`, or `etl-tools`, whose tests
/// a workspace build compiles alongside. A binary of another package has no
/// `CARGO_BIN_EXE_` variable, hence the lookup.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .context("the running executable has no directory")?;
    // A test runs from target/<profile>/deps, a binary from target/<profile>.
    let profile = match dir.parent() {
        Some(parent) if dir.ends_with("deps") => parent,
        _ => dir,
    };
    let binary = profile.join(name);
    anyhow::ensure!(
        binary.is_file(),
        "{} is not built: build the workspace first (cargo build --workspace, with the same profile)",
        binary.display()
    );
    Ok(binary)
}

/// The stack's endpoints. Panics (the test fails) when the stack is not up:
/// these tests prove the pipeline on real services and must not pass without.
pub struct Stack {
    vars: HashMap<String, String>,
}

impl Stack {
    pub fn load() -> Stack {
        let dir = std::env::var("STACK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo_root().join(".stack"));
        let file = dir.join("stack.env");
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
            panic!(
                "{}: {e}. These tests need the real stack: run scripts/test (or scripts/stack up)",
                file.display()
            )
        });
        let vars = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| {
                (
                    k.trim().to_owned(),
                    v.trim().trim_matches('"').trim_matches('\'').to_owned(),
                )
            })
            .collect();
        Stack { vars }
    }

    pub fn get(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .unwrap_or_else(|| panic!("stack.env has no {key}"))
    }

    pub fn vars(&self) -> &HashMap<String, String> {
        &self.vars
    }

    pub fn clickhouse_config(&self, database: &str) -> ClickHouseConfig {
        ClickHouseConfig {
            url: self.get("ETL_CLICKHOUSE_URL").to_owned(),
            database: database.to_owned(),
            user: None,
            password: None,
            validation: Validation::Auto,
        }
    }
}

pub use etl::sink::clickhouse::analytics_ddl;

/// A new, empty analytics database named `db` (dropped first if it exists).
pub async fn fresh_analytics_db(stack: &Stack, db: &str) -> ClickHouseSink {
    let admin = ClickHouseSink::connect(&stack.clickhouse_config("default"))
        .await
        .unwrap();
    admin
        .create_analytics_db(db)
        .await
        .unwrap_or_else(|e| panic!("creating {db}: {e}"));
    ClickHouseSink::connect(&stack.clickhouse_config(db))
        .await
        .unwrap()
}

/// Polls `check` until it returns Some or the deadline passes.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// What a current ClickHouse (chdb, embedded) answered: its version and, per
/// query, the TSV text or the error.
pub struct ChdbAnswer {
    pub version: String,
    pub results: Vec<Result<String, String>>,
}

/// Runs `statements`, then `queries`, in one chdb session, with `python`
/// (the project venv's, which has chdb).
pub fn chdb(python: &std::path::Path, statements: &[String], queries: &[String]) -> ChdbAnswer {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let request = serde_json::json!({ "statements": statements, "queries": queries });
    let mut child = Command::new(python)
        .arg(repo_root().join("tests/chdb_runner.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "chdb ({}) failed: {}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| match r["ok"].as_str() {
            Some(tsv) => Ok(tsv.to_owned()),
            None => Err(r["error"].as_str().unwrap_or("?").to_owned()),
        })
        .collect();
    ChdbAnswer {
        version: answer["version"].as_str().unwrap().to_owned(),
        results,
    }
}

/// TSV with every number written the same way ("10", "10.00" and "10.0"
/// differ only in how a server version prints them).
pub fn normalise_numbers(tsv: &str) -> String {
    tsv.lines()
        .map(|line| {
            line.split('\t')
                .map(|cell| match cell.parse::<rust_decimal::Decimal>() {
                    Ok(d) => d.normalize().to_string(),
                    Err(_) => cell.to_owned(),
                })
                .collect::<Vec<_>>()
                .join("\t")
        })
        .collect::<Vec<_>>()
        .join("\n")
}
