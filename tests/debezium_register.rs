//! `debezium/register.py` (the compose stack's `debezium-register` one-shot) against a fake Kafka
//! Connect REST API served by this test.
//!
//! A fake, because the real Kafka Connect REST server cannot run on this machine: no image can be
//! pulled for the debezium/connect image, and Connect's own REST server dies at start with the
//! jars available here (see stack-facts.md in the shared notes, "Debezium (the real connector)").
//! The fake answers the endpoints register.py uses the way Connect does: `GET /`, `GET` and
//! `PUT /connectors/<name>/config` (GET includes "name" in the config; PUT answers 201 when it
//! created the connector, 200 when it updated it) and `GET /connectors/<name>/status`.
//!
//! The connector's credentials are `${env:...}` placeholders, resolved by the worker's config
//! provider when it starts the connector. Connect stores the config as PUT and its GET returns it
//! raw, placeholders unresolved (AbstractHerder.connectorInfo reads
//! ClusterConfigState.rawConnectorConfig), as this fake does: so comparing configs stays stable.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

const NAME: &str = "online-store-postgres";
const TRACE: &str = "org.apache.kafka.connect.errors.ConnectException: \
    FATAL: password authentication failed for user \"postgres\"\n\tat io.debezium.fake.Trace(Fake.java:1)";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The connector document register.py reads by default.
fn connector_file() -> (String, Map<String, Value>) {
    let text = std::fs::read_to_string(repo().join("debezium/online-store-connector.json"))
        .expect("read debezium/online-store-connector.json");
    let doc: Value = serde_json::from_str(&text).expect("the connector file is JSON");
    let name = doc["name"].as_str().expect("name").to_string();
    let config = doc["config"].as_object().expect("config object").clone();
    (name, config)
}

#[derive(Clone, Copy, PartialEq)]
enum TaskOutcome {
    Running,
    Failed,
}

struct Fake {
    /// The stored config, as Connect returns it (with "name"), or None: not registered.
    config: Option<Map<String, Value>>,
    outcome: TaskOutcome,
    /// `GET /` answers 503 this many times first (Connect still starting).
    root_unavailable: u32,
    /// `GET .../status` shows no task yet this many times first (tasks being assigned).
    status_without_tasks: u32,
    /// PUT answers 400 (Connect's answer to an invalid config).
    reject_put: bool,
    /// (path, JSON body) of every PUT.
    puts: Vec<(String, Value)>,
}

type Shared = Arc<Mutex<Fake>>;

fn not_found(name: &str) -> (StatusCode, Json<Value>) {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error_code": 404, "message": format!("Connector {name} not found")})),
    )
}

async fn root(State(fake): State<Shared>) -> (StatusCode, Json<Value>) {
    let mut fake = fake.lock().unwrap();
    if fake.root_unavailable > 0 {
        fake.root_unavailable -= 1;
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error_code": 503, "message": "starting"})),
        );
    }
    (
        StatusCode::OK,
        Json(json!({"version": "4.3.0", "commit": "fake", "kafka_cluster_id": "fake"})),
    )
}

async fn get_config(
    State(fake): State<Shared>,
    Path(name): Path<String>,
) -> (StatusCode, Json<Value>) {
    let fake = fake.lock().unwrap();
    match (&fake.config, name == NAME) {
        (Some(config), true) => (StatusCode::OK, Json(Value::Object(config.clone()))),
        _ => not_found(&name),
    }
}

async fn put_config(
    State(fake): State<Shared>,
    Path(name): Path<String>,
    body: Bytes,
) -> (StatusCode, Json<Value>) {
    let mut fake = fake.lock().unwrap();
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error_code": 400, "message": format!("bad JSON: {e}")})),
            )
        }
    };
    fake.puts
        .push((format!("/connectors/{name}/config"), body.clone()));
    if fake.reject_put {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error_code": 400, "message":
                "Connector configuration is invalid and contains the following 1 error(s):\nslot.name is invalid"})),
        );
    }
    let mut stored = body.as_object().cloned().unwrap_or_default();
    stored.insert("name".into(), Value::String(name.clone()));
    let created = fake.config.replace(stored.clone()).is_none();
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (
        status,
        Json(json!({"name": name, "config": stored, "tasks": [], "type": "source"})),
    )
}

async fn get_status(
    State(fake): State<Shared>,
    Path(name): Path<String>,
) -> (StatusCode, Json<Value>) {
    let mut fake = fake.lock().unwrap();
    if fake.config.is_none() || name != NAME {
        return not_found(&name);
    }
    let worker = "fake-connect:8083";
    let tasks = if fake.status_without_tasks > 0 {
        fake.status_without_tasks -= 1;
        json!([])
    } else if fake.outcome == TaskOutcome::Failed {
        json!([{"id": 0, "state": "FAILED", "worker_id": worker, "trace": TRACE}])
    } else {
        json!([{"id": 0, "state": "RUNNING", "worker_id": worker}])
    };
    (
        StatusCode::OK,
        Json(json!({
            "name": name,
            "connector": {"state": "RUNNING", "worker_id": worker},
            "tasks": tasks,
            "type": "source",
        })),
    )
}

/// Serves the fake on a free loopback port; returns its URL and state.
async fn serve(fake: Fake) -> (String, Shared) {
    let shared: Shared = Arc::new(Mutex::new(fake));
    let app = Router::new()
        .route("/", get(root))
        .route("/connectors/{name}/config", get(get_config).put(put_config))
        .route("/connectors/{name}/status", get(get_status))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, shared)
}

fn fake(config: Option<Map<String, Value>>) -> Fake {
    Fake {
        config,
        outcome: TaskOutcome::Running,
        root_unavailable: 0,
        status_without_tasks: 0,
        reject_put: false,
        puts: Vec::new(),
    }
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs register.py (default --config: the repo's connector JSON) with short deadlines.
async fn register(url: &str, wait_timeout: &str) -> Run {
    let started = Instant::now();
    let child = tokio::process::Command::new("python3")
        .arg(repo().join("debezium/register.py"))
        .args(["--connect-url", url])
        .args(["--wait-timeout", wait_timeout])
        .args(["--status-timeout", "5"])
        .args(["--interval", "0.05"])
        .env_remove("CONNECT_URL")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .expect("register.py did not finish within 60 s")
        .expect("run python3 (is Python 3 installed?)");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

fn show(run: &Run) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        run.code, run.stdout, run.stderr
    )
}

/// The config as Connect stores it: the file's plus "name".
fn stored(config: &Map<String, Value>) -> Map<String, Value> {
    let mut stored = config.clone();
    stored.insert("name".into(), Value::String(NAME.into()));
    stored
}

#[tokio::test]
async fn missing_connector_is_created_with_the_files_config_then_left_alone() {
    let (name, config) = connector_file();
    assert_eq!(
        name, NAME,
        "the connector file's name changed; update NAME in this test"
    );
    let mut missing = fake(None);
    missing.root_unavailable = 2;
    missing.status_without_tasks = 2;
    let (url, state) = serve(missing).await;

    // (1) Not registered: exactly one PUT of the file's config, then RUNNING.
    let run = register(&url, "10").await;
    assert_eq!(
        run.code,
        Some(0),
        "first registration failed:\n{}",
        show(&run)
    );
    {
        let state = state.lock().unwrap();
        assert_eq!(
            state.puts.len(),
            1,
            "expected exactly one PUT, got {:?}\n{}",
            state.puts,
            show(&run)
        );
        let (path, body) = &state.puts[0];
        assert_eq!(path, &format!("/connectors/{NAME}/config"), "PUT path");
        assert_eq!(
            body,
            &Value::Object(config.clone()),
            "the PUT body is not the file's \"config\" object"
        );
        // The placeholders go to Connect as they are; its worker resolves them.
        for (key, placeholder) in CREDENTIALS {
            assert_eq!(
                body[key], placeholder,
                "the PUT body's {key} is not the placeholder {placeholder}"
            );
        }
        assert_eq!(
            state.status_without_tasks,
            0,
            "register.py stopped before the status showed the task RUNNING:\n{}",
            show(&run)
        );
    }
    assert!(
        run.stdout.contains("RUNNING with 1 task(s) RUNNING"),
        "register.py does not report the RUNNING state:\n{}",
        show(&run)
    );

    // (2) Registered with the same config (GET returns it with "name", as Connect does): no PUT.
    let run = register(&url, "10").await;
    assert_eq!(run.code, Some(0), "second run failed:\n{}", show(&run));
    assert_eq!(
        state.lock().unwrap().puts.len(),
        1,
        "the second run PUT although the config was unchanged:\n{}",
        show(&run)
    );
    assert!(
        run.stdout.contains("nothing changed"),
        "the second run does not say it changed nothing:\n{}",
        show(&run)
    );
}

/// The connector file's credentials: placeholders for the worker's `env` config provider.
const CREDENTIALS: [(&str, &str); 2] = [
    ("database.user", "${env:POSTGRES_USER}"),
    ("database.password", "${env:POSTGRES_PASSWORD}"),
];

#[test]
fn the_connector_file_holds_placeholders_not_credentials() {
    let (_, config) = connector_file();
    for (key, placeholder) in CREDENTIALS {
        assert_eq!(
            config.get(key).and_then(Value::as_str),
            Some(placeholder),
            "the connector file's {key}: the credentials live in .env, the file names them"
        );
    }
}

#[tokio::test]
async fn credentials_stored_literally_are_replaced_by_the_placeholders() {
    // A connector registered before the credentials came from .env: Connect holds them literally.
    let (_, config) = connector_file();
    let mut old = stored(&config);
    old.insert("database.user".into(), Value::String("postgres".into()));
    old.insert(
        "database.password".into(),
        Value::String("literal-secret-42".into()),
    );
    let (url, state) = serve(fake(Some(old))).await;

    let run = register(&url, "10").await;
    assert_eq!(run.code, Some(0), "update failed:\n{}", show(&run));
    {
        let state = state.lock().unwrap();
        assert_eq!(state.puts.len(), 1, "expected one PUT:\n{}", show(&run));
        assert_eq!(
            state.config.as_ref(),
            Some(&stored(&config)),
            "Connect does not hold the file's config (with placeholders) after the update"
        );
    }
    assert!(
        run.stdout.contains("database.password") && run.stdout.contains("database.user"),
        "register.py does not name the settings that differed:\n{}",
        show(&run)
    );
    assert!(
        !run.stdout.contains("literal-secret-42") && !run.stderr.contains("literal-secret-42"),
        "register.py printed a stored password:\n{}",
        show(&run)
    );

    // Connect returns the placeholders as stored: the next run changes nothing.
    let run = register(&url, "10").await;
    assert_eq!(run.code, Some(0), "second run failed:\n{}", show(&run));
    assert_eq!(state.lock().unwrap().puts.len(), 1, "{}", show(&run));
    assert!(run.stdout.contains("nothing changed"), "{}", show(&run));
}

#[tokio::test]
async fn a_different_config_is_replaced_with_one_put() {
    let (_, config) = connector_file();
    let mut drifted = stored(&config);
    drifted.insert("snapshot.mode".into(), Value::String("never".into()));
    drifted.insert("obsolete.setting".into(), Value::String("x".into()));
    let (url, state) = serve(fake(Some(drifted))).await;

    let run = register(&url, "10").await;
    assert_eq!(run.code, Some(0), "update failed:\n{}", show(&run));
    let state = state.lock().unwrap();
    assert_eq!(
        state.puts.len(),
        1,
        "expected exactly one PUT for a changed config, got {}:\n{}",
        state.puts.len(),
        show(&run)
    );
    assert_eq!(
        state.puts[0].1,
        Value::Object(config.clone()),
        "the PUT body is not the file's config"
    );
    assert_eq!(
        state.config.as_ref(),
        Some(&stored(&config)),
        "the fake does not hold the file's config after the update"
    );
    assert!(
        run.stdout.contains("snapshot.mode") && run.stdout.contains("obsolete.setting"),
        "register.py does not name the settings that differed:\n{}",
        show(&run)
    );
}

#[tokio::test]
async fn a_failed_task_exits_non_zero_with_its_trace() {
    let (_, config) = connector_file();
    let mut failing = fake(Some(stored(&config)));
    failing.outcome = TaskOutcome::Failed;
    let (url, state) = serve(failing).await;

    let run = register(&url, "10").await;
    assert_ne!(
        run.code,
        Some(0),
        "a FAILED task must fail the registration:\n{}",
        show(&run)
    );
    assert!(
        run.code.is_some(),
        "register.py was killed:\n{}",
        show(&run)
    );
    assert!(
        run.stderr.contains("password authentication failed")
            && run.stderr.contains("io.debezium.fake.Trace"),
        "stderr does not carry the task's trace:\n{}",
        show(&run)
    );
    assert!(
        run.elapsed < Duration::from_secs(4),
        "register.py waited for the status deadline instead of failing at once ({:?})",
        run.elapsed
    );
    assert!(
        state.lock().unwrap().puts.is_empty(),
        "unchanged config, yet a PUT was sent"
    );
}

#[tokio::test]
async fn a_rejected_config_exits_non_zero_with_connects_message() {
    let mut rejecting = fake(None);
    rejecting.reject_put = true;
    let (url, _) = serve(rejecting).await;
    let run = register(&url, "10").await;
    assert_eq!(
        run.code,
        Some(1),
        "a 400 on PUT must fail with exit 1:\n{}",
        show(&run)
    );
    assert!(
        run.stderr.contains("HTTP 400") && run.stderr.contains("slot.name is invalid"),
        "stderr does not show Connect's answer:\n{}",
        show(&run)
    );
}

#[tokio::test]
async fn connect_that_never_answers_fails_within_the_deadline() {
    // A server that accepts connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            keep.lock().unwrap().push(socket);
        }
    });
    let run = register(&url, "1.5").await;
    assert_eq!(
        run.code,
        Some(1),
        "silent Connect must fail with exit 1:\n{}",
        show(&run)
    );
    assert!(
        run.stderr.contains("did not answer within 1.5 s"),
        "stderr does not say Connect did not answer in time:\n{}",
        show(&run)
    );
    assert!(
        run.elapsed >= Duration::from_millis(1400) && run.elapsed < Duration::from_secs(8),
        "the 1.5 s deadline was not kept: {:?}",
        run.elapsed
    );

    // Nothing listening at all (connection refused): the same.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let run = register(&url, "1").await;
    assert_eq!(
        run.code,
        Some(1),
        "unreachable Connect must fail with exit 1:\n{}",
        show(&run)
    );
    assert!(
        run.stderr.contains("did not answer") && run.elapsed < Duration::from_secs(8),
        "unreachable Connect: wrong message or deadline not kept ({:?}):\n{}",
        run.elapsed,
        show(&run)
    );
}
