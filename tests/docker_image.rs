//! The processor's and the tools' images, built for real from the repository's
//! Dockerfile and `.dockerignore`, then run the way `docker-compose.yml` runs
//! them: the processor as uid 10001, passing its compose healthcheck from
//! inside, consuming the native stack with host networking until `reconcile`
//! is exact after a `loadgen` workload that ran in the tools' image.
//!
//! Needs a Docker engine (`scripts/docker-engine up`) and the native stack
//! (`scripts/stack up`); `scripts/test` starts both. The base images are local
//! stand-ins (`scripts/docker-stand-ins`), since none can be pulled here. Without
//! an engine this test fails; where `scripts/test` cannot start one, it leaves
//! the test out (`--skip`) and says SKIPPED with the reason.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use etl_testkit::pipeline::Run;
use etl_testkit::{eventually, repo_root};
use serde_yaml_ng::Value;

/// docker-compose.yml, parsed.
fn compose() -> Value {
    let text = std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap();
    serde_yaml_ng::from_str(&text).unwrap()
}

fn service(compose: &Value, name: &str) -> Value {
    compose["services"][name].clone()
}

/// `${NAME:-default}` becomes its default: the values compose uses without a `.env` override.
fn with_defaults(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closed ${") + start;
        let inner = &rest[start + 2..end];
        let (_, default) = inner
            .split_once(":-")
            .unwrap_or_else(|| panic!("${{{inner}}} has no default"));
        out.push_str(default);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .unwrap_or_else(|| panic!("a list: {value:?}"))
        .iter()
        .map(|v| with_defaults(v.as_str().expect("a string")))
        .collect()
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("the docker client runs")
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A container of this test; removed when the test ends, also on failure.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.0]);
    }
}

impl Container {
    /// `docker run -d --network host` with `env`, `IMAGE ARGS`.
    fn start(name: String, image: &str, env: &BTreeMap<String, String>, args: &[String]) -> Self {
        let _ = docker(&["rm", "-f", &name]);
        let mut cmd = vec![
            "run".to_owned(),
            "-d".into(),
            "--name".into(),
            name.clone(),
            "--network".into(),
            "host".into(),
        ];
        for (k, v) in env {
            cmd.push("-e".into());
            cmd.push(format!("{k}={v}"));
        }
        cmd.push(image.to_owned());
        cmd.extend(args.iter().cloned());
        let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
        docker_ok(&refs);
        Container(name)
    }

    fn logs(&self) -> String {
        let out = docker(&["logs", &self.0]);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// `docker stop` (SIGTERM, then SIGKILL after 30 s); the exit code.
    fn stop(&self) -> i64 {
        docker_ok(&["stop", "-t", "30", &self.0]);
        docker_ok(&["inspect", "--format", "{{.State.ExitCode}}", &self.0])
            .parse()
            .unwrap()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn engine_answers() {
    let info = Command::new("docker").args(["info"]).output();
    match info {
        Ok(out) if out.status.success() => {}
        other => {
            panic!("no Docker engine answers ({other:?}): start one with scripts/docker-engine up")
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a Docker engine and the stack (scripts/test)"]
async fn the_image_builds_and_runs_the_pipeline_to_an_exact_reconcile() {
    engine_answers();
    let compose = compose();
    let processor = service(&compose, "etl_processor");
    let loadgen = service(&compose, "loadgen");
    let image = processor["image"]
        .as_str()
        .expect("etl_processor names its image")
        .to_owned();

    // --- build: the stand-in bases, then the repository's Dockerfile as it is.
    let status = Command::new(repo_root().join("scripts/docker-stand-ins"))
        .status()
        .unwrap();
    assert!(status.success(), "scripts/docker-stand-ins: {status}");
    let started = Instant::now();
    let repo = repo_root();
    // The builder stage gets a tag of its own, so that its dependency layer (minutes to build)
    // stays referenced as a cache and the builder images of earlier runs can be pruned.
    let builder = format!("{image}-builder");
    let tools_image = loadgen["image"]
        .as_str()
        .expect("loadgen names its image")
        .to_owned();
    assert_ne!(tools_image, image, "loadgen runs the tools' image");
    for args in [
        vec!["build", "--target", "builder", "-t", &builder],
        vec!["build", "--target", "tools", "-t", &tools_image],
        // No target: the Dockerfile's last stage, the processor's.
        vec!["build", "-t", &image],
    ] {
        let out = Command::new("docker")
            .args(args)
            .arg(&repo)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Untagged leftovers of earlier builds on the stand-ins (a builder image is 3 GB).
    docker_ok(&[
        "image",
        "prune",
        "--force",
        "--filter",
        "label=online-store-cdc.stand-in",
    ]);
    let size = |image: &str| -> u64 {
        docker_ok(&["image", "inspect", "--format", "{{.Size}}", image])
            .parse()
            .unwrap()
    };
    eprintln!(
        "docker_image: built {image} ({} MB) and {tools_image} ({} MB) in {:.0?}",
        size(&image) / 1_000_000,
        size(&tools_image) / 1_000_000,
        started.elapsed(),
    );
    // Small: Debian slim (75 MB), CA certificates and the binary without debug info (about 20 MB).
    for image in [&image, &tools_image] {
        assert!(
            size(image) < 150_000_000,
            "{image} is {} bytes: the build toolchain leaked into it?",
            size(image)
        );
    }

    // --- the processor's image holds the processor alone: no tools binary,
    // and no tools' command in the processor.
    let listing = docker_ok(&[
        "run",
        "--rm",
        "--entrypoint",
        "ls",
        &image,
        "/usr/local/bin",
    ]);
    assert_eq!(listing, "etl-processor", "the processor image's binaries");
    let help = docker_ok(&["run", "--rm", &image, "--help"]);
    for command in ["run", "replay", "reconcile", "rebuild"] {
        assert!(help.contains(command), "etl-processor --help: {help}");
    }
    for command in ["loadgen", "produce", "bench"] {
        assert!(!help.contains(command), "etl-processor --help: {help}");
    }

    // --- non-root: the image's user and the uid a container really runs as.
    assert_eq!(
        docker_ok(&["image", "inspect", "--format", "{{.Config.User}}", &image]),
        "10001:10001"
    );
    assert_eq!(
        docker_ok(&["run", "--rm", "--entrypoint", "id", &image, "-u"]),
        "10001"
    );

    // --- the release build has no fault injection: it refuses to start
    // with a setting that would switch a replay guard off.
    let refused = docker(&[
        "run",
        "--rm",
        "-e",
        "ETL_FAULT_NO_OFFSET_GUARD=true",
        &image,
    ]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(
        said.contains("setting ETL_FAULT_NO_OFFSET_GUARD (from the environment): this build has no fault injection"),
        "{said}"
    );

    // ... and holds none of the fault injection's code: its messages are in
    // the build the tests run (with the feature), and not in the image's.
    let markers = ["(ETL_FAULT_PANIC)", "(ETL_FAULT_INSERT_FAILURE_RATE)"];
    let tested = std::fs::read(env!("CARGO_BIN_EXE_etl-processor")).expect("the tested binary");
    let released = docker(&[
        "run",
        "--rm",
        "--entrypoint",
        "cat",
        &image,
        "/usr/local/bin/etl-processor",
    ]);
    assert!(released.status.success() && released.stdout.len() > 1_000_000);
    let holds =
        |binary: &[u8], marker: &str| binary.windows(marker.len()).any(|w| w == marker.as_bytes());
    for marker in markers {
        if cfg!(feature = "faults") {
            assert!(holds(&tested, marker), "the faults build lacks {marker}");
        }
        assert!(
            !holds(&released.stdout, marker),
            "the release image holds {marker}"
        );
    }

    // --- the processor, as compose runs it, against the native stack.
    let run = Run::new("docker_image").await;
    let metrics_port = free_port();
    let mut env: BTreeMap<String, String> = run
        .processor_command(&[])
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_str()?.to_owned(), v?.to_str()?.to_owned())))
        .collect();
    env.insert(
        "ETL_METRICS_ADDR".into(),
        format!("127.0.0.1:{metrics_port}"),
    );
    let container = Container::start(
        format!("etl-{}", run.database),
        &image,
        &env,
        &strings(&processor["command"]),
    );

    // Its compose healthcheck, run inside the container (on the port this test picked).
    let check = strings(&processor["healthcheck"]["test"]);
    assert_eq!(check[0], "CMD", "an exec-form healthcheck: {check:?}");
    let check: Vec<String> = check[1..]
        .iter()
        .map(|a| a.replace("9464", &metrics_port.to_string()))
        .collect();
    let mut exec = vec!["exec".to_owned(), container.0.clone()];
    exec.extend(check);
    let exec: Vec<&str> = exec.iter().map(String::as_str).collect();
    eventually(
        "the container's healthcheck to pass",
        Duration::from_secs(120),
        || async { docker(&exec).status.success().then_some(()) },
    )
    .await;

    // --- loadgen, as compose runs it, in the tools' image.
    let loadgen_env: BTreeMap<String, String> = [
        ("ETL_POSTGRES_URL", run.stack.get("ETL_POSTGRES_URL")),
        ("ETL_LOG", "info"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for key in loadgen["environment"].as_mapping().unwrap().keys() {
        let key = key.as_str().unwrap();
        assert!(
            loadgen_env.contains_key(key),
            "compose gives loadgen {key}; this test must too"
        );
    }
    let workload = Container::start(
        format!("loadgen-{}", run.database),
        &tools_image,
        &loadgen_env,
        &strings(&loadgen["command"]),
    );
    eventually(
        "loadgen to write 20 orders",
        Duration::from_secs(120),
        || async {
            let logs = workload.logs();
            let orders = logs
                .lines()
                .filter(|l| l.contains("orders="))
                .filter_map(|l| l.split("orders=").nth(1)?.split_whitespace().next())
                .filter_map(|n| n.parse::<u64>().ok())
                .max()?;
            (orders >= 20).then_some(())
        },
    )
    .await;
    assert_eq!(workload.stop(), 0, "loadgen exits 0 on SIGTERM");
    let logs = workload.logs();
    let summary = logs
        .lines()
        .find(|l| l.starts_with("loadgen: summary:"))
        .unwrap_or_else(|| panic!("loadgen printed no summary:\n{logs}"));
    eprintln!("docker_image: {summary}");

    // --- exact: the containerised processor caught up with everything loadgen wrote.
    let report = run.caught_up("after loadgen in a container").await;
    assert!(report.compared > 0);
    let reconcile_args = ["reconcile".to_owned()];
    let reconciler = Container::start(
        format!("reconcile-{}", run.database),
        &image,
        &env,
        &reconcile_args,
    );
    let code: i64 = eventually(
        "reconcile in the image to finish",
        Duration::from_secs(120),
        || async {
            let state = docker_ok(&[
                "inspect",
                "--format",
                "{{.State.Running}} {{.State.ExitCode}}",
                &reconciler.0,
            ]);
            let (running, code) = state.split_once(' ')?;
            (running == "false").then(|| code.parse().unwrap())
        },
    )
    .await;
    assert_eq!(
        code,
        0,
        "reconcile in the image is exact:\n{}",
        reconciler.logs()
    );

    assert_eq!(
        container.stop(),
        0,
        "the processor exits 0 on SIGTERM:\n{}",
        container.logs()
    );
}
