//! Checks of the Docker path that run without a Docker engine: docker-compose.yml, .env, the
//! Dockerfile, prometheus.yml, the OpenTelemetry collector config and the Debezium registration
//! service. The files are parsed (YAML, JSON) and cross-checked against each other and the repo:
//! service names, ports, volumes, mounts, healthchecks, dependencies, image pins, variables, and
//! that what one file names (a host, a port, a path, a setting) is what another one serves.
//!
//! Variables are resolved the way `docker compose` does, from `.env` only (never from the shell
//! running the test). One test also runs a real validator on the file: Debian's `docker-compose`
//! (1.29), whose `config` checks it against the Compose specification's JSON schema and more.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

// ---------------------------------------------------------------------------------------------
// What the stack must look like.

/// Every service and the (host port, container port) pairs it publishes.
const SERVICES: &[(&str, &[(u16, u16)])] = &[
    ("postgres", &[(5432, 5432)]),
    ("zookeeper", &[(2181, 2181)]),
    ("kafka", &[(9092, 9092)]),
    ("debezium", &[(8083, 8083)]),
    ("debezium-register", &[]),
    ("clickhouse", &[(8123, 8123), (9000, 9000)]),
    ("prometheus", &[(9090, 9090)]),
    ("grafana", &[(3000, 3000)]),
    ("etl_processor", &[(9464, 9464)]),
    (
        "otel-collector",
        &[(4317, 4317), (4318, 4318), (13133, 13133)],
    ),
    ("jaeger", &[(16686, 16686)]),
    ("loadgen", &[]),
];

/// Named volumes: (volume, service, mount point). The Kafka and ZooKeeper paths are where the
/// confluentinc/cp-kafka and cp-zookeeper images keep their data (log.dirs, dataDir, dataLogDir).
const NAMED_VOLUMES: &[(&str, &str, &str)] = &[
    ("postgres_data", "postgres", "/var/lib/postgresql/data"),
    ("zookeeper_data", "zookeeper", "/var/lib/zookeeper/data"),
    ("zookeeper_log", "zookeeper", "/var/lib/zookeeper/log"),
    ("kafka_data", "kafka", "/var/lib/kafka/data"),
    ("clickhouse_data", "clickhouse", "/var/lib/clickhouse"),
    ("prometheus_data", "prometheus", "/prometheus"),
    ("grafana_data", "grafana", "/var/lib/grafana"),
];

/// Bind mounts that must be there: (service, host path, container path).
const BIND_MOUNTS: &[(&str, &str, &str)] = &[
    ("postgres", "./init/postgres", "/docker-entrypoint-initdb.d"),
    (
        "clickhouse",
        "./init/clickhouse",
        "/docker-entrypoint-initdb.d",
    ),
    (
        "clickhouse",
        "./init/clickhouse/config.d/prometheus.xml",
        "/etc/clickhouse-server/config.d/prometheus.xml",
    ),
    (
        "prometheus",
        "./prometheus.yml",
        "/etc/prometheus/prometheus.yml",
    ),
    (
        "grafana",
        "./grafana/provisioning",
        "/etc/grafana/provisioning",
    ),
    ("debezium-register", "./debezium", "/debezium"),
    (
        "otel-collector",
        "./otel/otel-collector-config.yaml",
        "/etc/otelcol-contrib/config.yaml",
    ),
];

/// Services that run once and exit (others wait for them with service_completed_successfully).
const ONE_SHOT: &[&str] = &["debezium-register"];

/// Long-running services without a Docker healthcheck, and why. Nothing may wait for them to be
/// healthy (that would wait forever).
const NO_HEALTHCHECK: &[(&str, &str)] = &[
    (
        "otel-collector",
        "its image holds only the collector binary: no shell or HTTP client to run a check with",
    ),
    (
        "loadgen",
        "a client with no endpoint; restart: on-failure covers its only failure mode",
    ),
];

/// A string each service's healthcheck must contain: it checks the right thing.
const HEALTHCHECK_NEEDLES: &[(&str, &str)] = &[
    ("postgres", "pg_isready"),
    ("zookeeper", "2181"),
    ("kafka", "29092"),
    ("debezium", "8083"),
    ("clickhouse", "EXISTS TABLE analytics."),
    ("prometheus", "/-/ready"),
    ("grafana", "/api/health"),
    ("etl_processor", "/health/ready"),
    ("jaeger", ":13133/status"),
];

/// Dependencies that must exist: (service, depends on, condition).
const REQUIRED_DEPENDENCIES: &[(&str, &str, &str)] = &[
    ("kafka", "zookeeper", "service_healthy"),
    ("debezium", "kafka", "service_healthy"),
    ("debezium", "postgres", "service_healthy"),
    ("debezium-register", "debezium", "service_healthy"),
    ("etl_processor", "kafka", "service_healthy"),
    ("etl_processor", "clickhouse", "service_healthy"),
    ("loadgen", "postgres", "service_healthy"),
    (
        "loadgen",
        "debezium-register",
        "service_completed_successfully",
    ),
];

/// Image repository (and version prefix) of each service that does not build from the Dockerfile.
const IMAGES: &[(&str, &str)] = &[
    ("postgres", "postgres:15."),
    ("zookeeper", "confluentinc/cp-zookeeper:"),
    ("kafka", "confluentinc/cp-kafka:"),
    ("debezium", "quay.io/debezium/connect:3."),
    ("debezium-register", "python:3.12"),
    ("clickhouse", "clickhouse/clickhouse-server:2"),
    ("prometheus", "prom/prometheus:v"),
    ("grafana", "grafana/grafana:11."),
    ("otel-collector", "otel/opentelemetry-collector-contrib:"),
    ("jaeger", "jaegertracing/jaeger:2."),
];

/// Services that run an image of the repo's Dockerfile...
const BUILT: &[&str] = &["etl_processor", "loadgen"];
/// ...each the image of its own stage: the processor's (the last, what a plain `docker build`
/// gives), and the tools'.
const STAGES: &[(&str, &str)] = &[("etl_processor", "processor"), ("loadgen", "tools")];

/// Variables of `.env` that Compose itself reads rather than the file.
const COMPOSE_SETTINGS: &[(&str, &str)] = &[("COMPOSE_PROJECT_NAME", "online-store-cdc")];

// ---------------------------------------------------------------------------------------------
// Reading the files.

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    serde_yaml_ng::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

/// `.env` as KEY -> value (blank lines and comments skipped, surrounding quotes removed).
fn dotenv() -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for (n, line) in read(".env").lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!(".env line {}: {line:?} is not KEY=VALUE", n + 1));
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        let key = key.trim().to_string();
        assert!(
            vars.insert(key.clone(), value.to_string()).is_none(),
            ".env defines {key} twice"
        );
    }
    vars
}

/// One use of a variable in the compose file.
#[derive(Debug)]
struct VarUse {
    name: String,
    default: Option<String>,
}

/// Compose-style interpolation: `$$`, `$NAME`, `${NAME}`, `${NAME:-default}`, `${NAME-default}`,
/// `${NAME:?err}`, `${NAME?err}`, `${NAME:+alt}`, `${NAME+alt}`. Unset variables without a
/// default become "" (as compose does, with a warning). Every use is recorded.
fn interpolate(text: &str, env: &BTreeMap<String, String>, uses: &mut Vec<VarUse>) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '$' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        match chars.get(i + 1) {
            Some('$') => {
                out.push('$');
                i += 2;
            }
            Some('{') => {
                // Find the matching brace (defaults may hold nested ${...}).
                let mut depth = 1;
                let mut j = i + 2;
                while j < chars.len() && depth > 0 {
                    if chars[j] == '{' && chars[j - 1] == '$' {
                        depth += 1;
                    } else if chars[j] == '}' {
                        depth -= 1;
                    }
                    j += 1;
                }
                assert!(depth == 0, "unclosed ${{ in {text:?}");
                let body: String = chars[i + 2..j - 1].iter().collect();
                let name_len = body
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(body.len());
                let (name, rest) = body.split_at(name_len);
                assert!(!name.is_empty(), "empty variable name in {text:?}");
                let value = env.get(name);
                let set_non_empty = value.is_some_and(|v| !v.is_empty());
                let (resolved, default) = if let Some(d) = rest.strip_prefix(":-") {
                    let d = interpolate(d, env, uses);
                    let r = if set_non_empty {
                        value.unwrap().clone()
                    } else {
                        d.clone()
                    };
                    (r, Some(d))
                } else if let Some(d) = rest.strip_prefix(":+") {
                    let d = interpolate(d, env, uses);
                    (
                        if set_non_empty { d } else { String::new() },
                        Some(String::new()),
                    )
                } else if let Some(d) = rest.strip_prefix('+') {
                    let d = interpolate(d, env, uses);
                    (
                        if value.is_some() { d } else { String::new() },
                        Some(String::new()),
                    )
                } else if let Some(d) = rest.strip_prefix('-') {
                    let d = interpolate(d, env, uses);
                    (value.cloned().unwrap_or_else(|| d.clone()), Some(d))
                } else if rest.starts_with(":?") || rest.starts_with('?') || rest.is_empty() {
                    (value.cloned().unwrap_or_default(), None)
                } else {
                    panic!("unsupported interpolation ${{{body}}} in {text:?}");
                };
                uses.push(VarUse {
                    name: name.to_string(),
                    default,
                });
                out.push_str(&resolved);
                i = j;
            }
            Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
                let mut j = i + 1;
                while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                let name: String = chars[i + 1..j].iter().collect();
                out.push_str(env.get(&name).map(String::as_str).unwrap_or(""));
                uses.push(VarUse {
                    name,
                    default: None,
                });
                i = j;
            }
            _ => {
                out.push('$');
                i += 1;
            }
        }
    }
    out
}

/// The compose file with every string value interpolated from `.env`, and every variable use.
struct Compose {
    doc: Value,
    uses: Vec<VarUse>,
}

fn resolve_all(value: &Value, env: &BTreeMap<String, String>, uses: &mut Vec<VarUse>) -> Value {
    match value {
        Value::String(s) => Value::String(interpolate(s, env, uses)),
        Value::Sequence(items) => {
            Value::Sequence(items.iter().map(|v| resolve_all(v, env, uses)).collect())
        }
        Value::Mapping(map) => Value::Mapping(
            map.iter()
                .map(|(k, v)| (k.clone(), resolve_all(v, env, uses)))
                .collect::<Mapping>(),
        ),
        Value::Tagged(t) => resolve_all(&t.value, env, uses),
        other => other.clone(),
    }
}

fn compose() -> Compose {
    compose_with(&dotenv())
}

/// The compose file resolved with other settings than `.env`'s.
fn compose_with(env: &BTreeMap<String, String>) -> Compose {
    let raw = yaml("docker-compose.yml");
    let mut uses = Vec::new();
    let doc = resolve_all(&raw, env, &mut uses);
    Compose { doc, uses }
}

impl Compose {
    fn services(&self) -> &Mapping {
        self.doc
            .get("services")
            .and_then(Value::as_mapping)
            .expect("docker-compose.yml has no `services:` mapping")
    }

    fn service(&self, name: &str) -> &Value {
        self.services()
            .get(name)
            .unwrap_or_else(|| panic!("docker-compose.yml has no service {name:?}"))
    }

    fn names(&self) -> BTreeSet<String> {
        self.services()
            .keys()
            .map(|k| k.as_str().expect("service names are strings").to_string())
            .collect()
    }

    /// The service's environment as KEY -> value (map or list form).
    fn env(&self, service: &str) -> BTreeMap<String, String> {
        match self.service(service).get("environment") {
            None => BTreeMap::new(),
            Some(Value::Mapping(m)) => m.iter().map(|(k, v)| (scalar(k), scalar(v))).collect(),
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|item| {
                    let s = scalar(item);
                    let (k, v) = s.split_once('=').unwrap_or((&s, ""));
                    (k.to_string(), v.to_string())
                })
                .collect(),
            Some(other) => panic!("{service}: environment is neither a map nor a list: {other:?}"),
        }
    }

    fn env_var(&self, service: &str, key: &str) -> String {
        self.env(service)
            .remove(key)
            .unwrap_or_else(|| panic!("service {service} does not set {key}"))
    }

    /// (host ip, host port, container port) of each published port.
    fn ports(&self, service: &str) -> Vec<(String, u16, u16)> {
        let Some(ports) = self.service(service).get("ports") else {
            return Vec::new();
        };
        let ports = ports
            .as_sequence()
            .unwrap_or_else(|| panic!("{service}: ports is not a list"));
        ports
            .iter()
            .map(|p| match p {
                Value::Mapping(m) => {
                    let get = |k: &str| m.get(k).map(scalar).unwrap_or_default();
                    (
                        get("host_ip"),
                        port_number(service, &get("published")),
                        port_number(service, &get("target")),
                    )
                }
                other => {
                    let spec = scalar(other);
                    let spec = spec.split('/').next().unwrap().to_string();
                    let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
                    match parts.as_slice() {
                        [container, host, ip] => (
                            ip.to_string(),
                            port_number(service, host),
                            port_number(service, container),
                        ),
                        [container, host] => (
                            String::new(),
                            port_number(service, host),
                            port_number(service, container),
                        ),
                        _ => panic!(
                            "{service}: port {spec:?} publishes no fixed host port (use HOST:CONTAINER)"
                        ),
                    }
                }
            })
            .collect()
    }

    /// Every mount: (source, target, read-only). A source starting with `.` or `/` is a bind mount.
    fn mounts(&self, service: &str) -> Vec<(String, String, bool)> {
        let Some(volumes) = self.service(service).get("volumes") else {
            return Vec::new();
        };
        volumes
            .as_sequence()
            .unwrap_or_else(|| panic!("{service}: volumes is not a list"))
            .iter()
            .map(|v| match v {
                Value::Mapping(m) => (
                    m.get("source").map(scalar).unwrap_or_default(),
                    m.get("target").map(scalar).unwrap_or_default(),
                    m.get("read_only").and_then(Value::as_bool).unwrap_or(false),
                ),
                other => {
                    let spec = scalar(other);
                    let parts: Vec<&str> = spec.split(':').collect();
                    match parts.as_slice() {
                        [source, target] => (source.to_string(), target.to_string(), false),
                        [source, target, mode] => (
                            source.to_string(),
                            target.to_string(),
                            mode.split(',').any(|m| m == "ro"),
                        ),
                        _ => panic!("{service}: volume {spec:?} is not SOURCE:TARGET[:MODE]"),
                    }
                }
            })
            .collect()
    }

    /// Host path (repo-relative) of a container path, through the service's bind mounts.
    fn host_path_of(&self, service: &str, container_path: &str) -> Option<PathBuf> {
        self.mounts(service)
            .into_iter()
            .filter(|(source, _, _)| is_bind(source))
            .find_map(|(source, target, _)| {
                let rest = container_path.strip_prefix(target.trim_end_matches('/'))?;
                if !(rest.is_empty() || rest.starts_with('/')) {
                    return None;
                }
                let host = repo().join(source.trim_start_matches("./"));
                let rest = rest.trim_start_matches('/');
                Some(if rest.is_empty() {
                    host
                } else {
                    host.join(rest)
                })
            })
    }

    /// depends_on as dependency -> condition (the long form is required).
    fn depends_on(&self, service: &str) -> BTreeMap<String, String> {
        match self.service(service).get("depends_on") {
            None => BTreeMap::new(),
            Some(Value::Mapping(m)) => m
                .iter()
                .map(|(dep, spec)| {
                    let dep = scalar(dep);
                    let condition = spec.get("condition").map(scalar).unwrap_or_else(|| {
                        panic!("{service}: depends_on {dep} has no condition")
                    });
                    (dep, condition)
                })
                .collect(),
            Some(other) => panic!(
                "{service}: depends_on must be the long form (service: {{condition: ...}}), not {other:?}"
            ),
        }
    }

    fn command(&self, service: &str) -> Vec<String> {
        match self.service(service).get("command") {
            None => Vec::new(),
            Some(Value::Sequence(items)) => items.iter().map(scalar).collect(),
            Some(other) => scalar(other)
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        }
    }

    /// The healthcheck's test as one string ("" if none or disabled).
    fn healthcheck(&self, service: &str) -> String {
        let Some(hc) = self.service(service).get("healthcheck") else {
            return String::new();
        };
        if hc.get("disable").and_then(Value::as_bool) == Some(true) {
            return String::new();
        }
        let test = match hc.get("test") {
            Some(Value::Sequence(items)) => items.iter().map(scalar).collect::<Vec<_>>(),
            Some(other) => vec![scalar(other)],
            None => Vec::new(),
        };
        if test.first().map(String::as_str) == Some("NONE") {
            return String::new();
        }
        test.join(" ")
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => panic!("expected a scalar, found {other:?}"),
    }
}

fn port_number(service: &str, text: &str) -> u16 {
    text.parse()
        .unwrap_or_else(|_| panic!("{service}: {text:?} is not a port number"))
}

fn is_bind(source: &str) -> bool {
    source.starts_with('.') || source.starts_with('/') || source.starts_with('~')
}

/// "host:port" of a URL or an address.
fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next().unwrap();
    let authority = authority.rsplit('@').next().unwrap();
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{url:?} has no explicit port"));
    (
        host.to_string(),
        port.parse().unwrap_or_else(|_| panic!("{url:?}: bad port")),
    )
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn compose_file_declares_exactly_the_stack_services() {
    let compose = compose();
    let have = compose.names();
    let want: BTreeSet<String> = SERVICES.iter().map(|(s, _)| s.to_string()).collect();
    let missing: Vec<_> = want.difference(&have).collect();
    let extra: Vec<_> = have.difference(&want).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "docker-compose.yml services differ from the stack: missing {missing:?}, unexpected {extra:?}"
    );
    assert!(
        compose.doc.get("version").is_none(),
        "drop the obsolete top-level `version:` key (Compose v2 ignores it and warns)"
    );
}

#[test]
fn published_ports_are_exactly_the_documented_ones() {
    let compose = compose();
    let bind = dotenv().get("BIND_ADDRESS").cloned().unwrap_or_default();
    for (service, want) in SERVICES {
        let ports = compose.ports(service);
        let have: BTreeSet<(u16, u16)> = ports.iter().map(|(_, h, c)| (*h, *c)).collect();
        let want: BTreeSet<(u16, u16)> = want.iter().copied().collect();
        assert_eq!(
            have, want,
            "{service} publishes (host, container) ports {have:?}, expected {want:?}"
        );
        for (ip, host, _) in &ports {
            assert_eq!(
                ip, &bind,
                "{service} publishes port {host} on {ip:?}; every port binds to ${{BIND_ADDRESS}} ({bind:?} in .env)"
            );
        }
    }
}

#[test]
fn named_volumes_are_declared_and_mounted() {
    let compose = compose();
    let declared: BTreeSet<String> = compose
        .doc
        .get("volumes")
        .and_then(Value::as_mapping)
        .expect("docker-compose.yml has no top-level `volumes:`")
        .keys()
        .map(scalar)
        .collect();
    for (volume, service, target) in NAMED_VOLUMES {
        assert!(
            declared.contains(*volume),
            "top-level volumes: does not declare {volume}"
        );
        let mounted = compose
            .mounts(service)
            .into_iter()
            .any(|(source, t, _)| source == *volume && t == *target);
        assert!(
            mounted,
            "{service} does not mount volume {volume} at {target}"
        );
    }
    let mut used = BTreeSet::new();
    for service in compose.names() {
        for (source, target, _) in compose.mounts(&service) {
            if !is_bind(&source) {
                assert!(
                    declared.contains(&source),
                    "{service} mounts named volume {source:?} at {target} but the top-level volumes: does not declare it"
                );
                used.insert(source);
            }
        }
    }
    let unused: Vec<_> = declared.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "declared volumes no service mounts: {unused:?}"
    );
}

#[test]
fn bind_mounts_exist_in_the_repo_and_are_read_only() {
    let compose = compose();
    for (service, source, target) in BIND_MOUNTS {
        let found = compose
            .mounts(service)
            .into_iter()
            .any(|(s, t, _)| s == *source && t == *target);
        assert!(found, "{service} does not bind-mount {source} at {target}");
    }
    for service in compose.names() {
        for (source, target, read_only) in compose.mounts(&service) {
            if !is_bind(&source) {
                continue;
            }
            assert!(
                source.starts_with("./"),
                "{service} bind-mounts {source:?}: use a path relative to the repo (./...), not a machine path"
            );
            let host = repo().join(source.trim_start_matches("./"));
            assert!(
                host.exists(),
                "{service} bind-mounts {source} at {target}, but {source} does not exist in the repo \
                 (Docker would create an empty directory there)"
            );
            let file_like = Path::new(&target).extension().is_some_and(|e| {
                ["yml", "yaml", "xml", "json", "py", "conf", "sql"].contains(&e.to_str().unwrap())
            });
            assert_eq!(
                host.is_file(),
                file_like,
                "{service}: {source} is a {} but is mounted at {target}, which looks like a {}",
                if host.is_file() { "file" } else { "directory" },
                if file_like { "file" } else { "directory" }
            );
            assert!(
                read_only,
                "{service}: bind mount {source}:{target} should be read-only (:ro)"
            );
        }
    }
}

#[test]
fn long_running_services_have_healthchecks() {
    let compose = compose();
    let exempt: BTreeMap<&str, &str> = NO_HEALTHCHECK.iter().copied().collect();
    for service in compose.names() {
        let check = compose.healthcheck(&service);
        if ONE_SHOT.contains(&service.as_str()) {
            let restart = compose
                .service(&service)
                .get("restart")
                .map(scalar)
                .unwrap_or_else(|| "no".into());
            assert!(
                restart == "no" || restart.starts_with("on-failure"),
                "one-shot service {service} has restart: {restart}; a one-shot must be able to finish (no / on-failure)"
            );
            continue;
        }
        if let Some(why) = exempt.get(service.as_str()) {
            assert!(
                check.is_empty(),
                "{service} now has a healthcheck: remove it from NO_HEALTHCHECK ({why})"
            );
            continue;
        }
        assert!(
            !check.is_empty(),
            "long-running service {service} has no healthcheck (or it is disabled)"
        );
        let restart = compose
            .service(&service)
            .get("restart")
            .map(scalar)
            .unwrap_or_default();
        assert!(
            restart == "unless-stopped" || restart == "always" || restart.starts_with("on-failure"),
            "long-running service {service} has restart: {restart:?}; it should come back after a crash"
        );
    }
    for (service, needle) in HEALTHCHECK_NEEDLES {
        let check = compose.healthcheck(service);
        assert!(
            check.contains(needle),
            "{service}'s healthcheck {check:?} does not check {needle:?}"
        );
    }
}

#[test]
fn depends_on_names_defined_services_with_conditions() {
    let compose = compose();
    let names = compose.names();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for service in &names {
        for (dep, condition) in compose.depends_on(service) {
            assert!(
                names.contains(&dep),
                "{service} depends on {dep:?}, which is not a service"
            );
            match condition.as_str() {
                "service_healthy" => assert!(
                    !compose.healthcheck(&dep).is_empty(),
                    "{service} waits for {dep} to be healthy, but {dep} has no healthcheck: it would wait forever"
                ),
                "service_completed_successfully" => assert!(
                    ONE_SHOT.contains(&dep.as_str()),
                    "{service} waits for {dep} to complete, but {dep} is not a one-shot service"
                ),
                "service_started" => {}
                other => panic!("{service} depends on {dep} with unknown condition {other:?}"),
            }
            graph.entry(service.clone()).or_default().insert(dep);
        }
    }
    for (service, dep, condition) in REQUIRED_DEPENDENCIES {
        let have = compose.depends_on(service);
        assert_eq!(
            have.get(*dep).map(String::as_str),
            Some(*condition),
            "{service} must depend on {dep} with condition {condition} (has {have:?})"
        );
    }
    // No cycles: repeatedly remove services whose dependencies are all removed.
    let mut left: BTreeSet<String> = names.clone();
    loop {
        let ready: Vec<String> = left
            .iter()
            .filter(|s| {
                graph
                    .get(*s)
                    .is_none_or(|deps| deps.iter().all(|d| !left.contains(d)))
            })
            .cloned()
            .collect();
        if ready.is_empty() {
            break;
        }
        for s in ready {
            left.remove(&s);
        }
    }
    assert!(left.is_empty(), "depends_on has a cycle among {left:?}");
}

#[test]
fn images_are_pinned() {
    let compose = compose();
    let images: BTreeMap<&str, &str> = IMAGES.iter().copied().collect();
    for service in compose.names() {
        let spec = compose.service(&service);
        if BUILT.contains(&service.as_str()) {
            // The project's own images: processor_and_loadgen_build_their_own_stages.
            continue;
        }
        let image = spec
            .get("image")
            .map(scalar)
            .unwrap_or_else(|| panic!("{service} has neither build nor image"));
        let (name, digest) = image.split_once('@').unwrap_or((&image, ""));
        let last = name.rsplit('/').next().unwrap();
        let tag = last.split_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            !tag.is_empty() || !digest.is_empty(),
            "{service}: image {image:?} has no tag: pin a version"
        );
        assert!(
            tag != "latest" && tag.chars().any(|c| c.is_ascii_digit()),
            "{service}: image {image:?} is not pinned to a version"
        );
        let prefix = images.get(service.as_str()).unwrap_or_else(|| {
            panic!("{service} uses image {image:?}, but the test lists no image for it")
        });
        assert!(
            image.starts_with(prefix),
            "{service}: image {image:?} is not {prefix}..."
        );
    }
}

#[test]
fn every_variable_has_a_default_or_is_in_dotenv() {
    let compose = compose();
    let env = dotenv();
    let mut used = BTreeSet::new();
    for VarUse { name, default } in &compose.uses {
        used.insert(name.clone());
        match (default, env.get(name)) {
            (None, None) => panic!("${{{name}}} has no default and .env does not define it"),
            (Some(d), Some(v)) if d != v && !d.is_empty() => panic!(
                "${{{name}:-{d}}} disagrees with .env ({name}={v}): keep the fallback equal to the .env default"
            ),
            _ => {}
        }
    }
    let unused: Vec<_> = env
        .keys()
        .filter(|k| !used.contains(*k) && !COMPOSE_SETTINGS.iter().any(|(c, _)| c == k))
        .collect();
    assert!(
        unused.is_empty(),
        ".env defines variables docker-compose.yml never uses: {unused:?}"
    );
    // One comment line above each setting.
    let text = read(".env");
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            let above = if i > 0 { lines[i - 1].trim_start() } else { "" };
            assert!(
                above.starts_with('#'),
                ".env: {line:?} has no comment line above it"
            );
        }
    }
}

#[test]
fn dockerfile_is_multi_stage_pinned_and_runs_as_non_root() {
    let text = read("Dockerfile");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    // (stage, the user it runs as): a stage built FROM an earlier one inherits its USER.
    let mut stages: Vec<(String, Option<String>)> = Vec::new();
    let mut from_count = 0;
    let mut user_in_last_stage: Option<String> = None;
    for line in &lines {
        let mut words = line.split_whitespace();
        let instruction = words.next().unwrap().to_ascii_uppercase();
        if instruction == "FROM" {
            if let Some(last) = stages.last_mut() {
                last.1 = user_in_last_stage.clone();
            }
            from_count += 1;
            let args: Vec<&str> = words.filter(|w| !w.starts_with("--")).collect();
            let image = args.first().expect("FROM without an image");
            let earlier_stage = stages.iter().find(|(s, _)| s == image);
            user_in_last_stage = earlier_stage.and_then(|(_, user)| user.clone());
            let name = args
                .iter()
                .position(|w| w.eq_ignore_ascii_case("AS"))
                .map(|pos| args[pos + 1].to_string())
                .unwrap_or_default();
            let earlier_stage = earlier_stage.is_some();
            stages.push((name, None));
            if earlier_stage {
                continue;
            }
            let tag = image
                .rsplit('/')
                .next()
                .unwrap()
                .split_once(':')
                .map(|(_, t)| t);
            assert!(
                tag.is_some_and(|t| t != "latest" && t.chars().any(|c| c.is_ascii_digit())),
                "Dockerfile: `{line}` does not pin its base image to a version"
            );
        } else if instruction == "USER" {
            user_in_last_stage = words.next().map(str::to_string);
        }
    }
    assert!(
        from_count >= 2,
        "Dockerfile has {from_count} FROM stage(s); build and runtime must be separate"
    );
    let user = user_in_last_stage
        .expect("the runtime stage of the Dockerfile sets no USER (it would run as root)");
    let who = user.split(':').next().unwrap();
    assert!(
        who != "root" && who != "0",
        "the runtime stage runs as {user:?}; use a non-root user"
    );
    for needle in [
        "cargo build --release --locked --bin etl-processor --bin etl-tools",
        "EXPOSE 9464",
        "ENTRYPOINT [\"etl-processor\"]",
        "CMD [\"run\"]",
        "ENTRYPOINT [\"etl-tools\"]",
    ] {
        assert!(text.contains(needle), "Dockerfile lacks `{needle}`");
    }
    let ignore = read(".dockerignore");
    for needle in ["target", ".git", ".stack", ".env"] {
        assert!(
            ignore
                .lines()
                .any(|l| l.trim().trim_end_matches('/').trim_start_matches('/') == needle),
            ".dockerignore does not exclude {needle}"
        );
    }
}

/// ETL_* names the processor accepts (an unknown one stops it at start-up with exit code 2).
fn known_settings() -> BTreeSet<String> {
    let text = read("src/config.rs");
    let block = text
        .split_once("const KNOWN: &[&str] = &[")
        .and_then(|(_, rest)| rest.split_once("];"))
        .map(|(block, _)| block.to_string())
        .unwrap_or(text);
    block
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("ETL_"))
        .map(str::to_string)
        .collect()
}

#[test]
fn processor_settings_are_known_and_point_at_the_services() {
    let compose = compose();
    let known = known_settings();
    for service in BUILT {
        for key in compose.env(service).keys() {
            if key.starts_with("ETL_") {
                assert!(
                    known.contains(key),
                    "{service} sets {key}, which src/config.rs does not know: the processor would exit 2"
                );
            }
        }
    }
    let env = compose.env("etl_processor");
    let get = |k: &str| {
        env.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("etl_processor does not set {k}"))
    };
    assert_eq!(get("ETL_KAFKA_BROKERS"), "kafka:29092", "ETL_KAFKA_BROKERS");
    assert_eq!(
        get("ETL_CLICKHOUSE_URL"),
        "http://clickhouse:8123",
        "ETL_CLICKHOUSE_URL"
    );
    assert_eq!(
        get("ETL_CLICKHOUSE_DATABASE"),
        "analytics",
        "ETL_CLICKHOUSE_DATABASE"
    );
    assert_eq!(get("ETL_METRICS_ADDR"), "0.0.0.0:9464", "ETL_METRICS_ADDR");
    assert_eq!(
        get("ETL_OTEL_ENDPOINT"),
        "http://otel-collector:4318",
        "ETL_OTEL_ENDPOINT"
    );
    assert_eq!(
        compose.command("etl_processor"),
        ["run"],
        "etl_processor must run `etl-processor run`"
    );

    // ClickHouse credentials: the processor and Grafana use the server's.
    let ch = compose.env("clickhouse");
    for (service, user_key, password_key) in [
        (
            "etl_processor",
            "ETL_CLICKHOUSE_USER",
            "ETL_CLICKHOUSE_PASSWORD",
        ),
        ("grafana", "CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD"),
    ] {
        assert_eq!(
            compose.env_var(service, user_key),
            ch["CLICKHOUSE_USER"],
            "{service}'s {user_key} differs from the ClickHouse server's CLICKHOUSE_USER"
        );
        assert_eq!(
            compose.env_var(service, password_key),
            ch["CLICKHOUSE_PASSWORD"],
            "{service}'s {password_key} differs from the ClickHouse server's CLICKHOUSE_PASSWORD"
        );
    }
    if ch["CLICKHOUSE_PASSWORD"].is_empty() {
        assert_eq!(
            ch.get("CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT").map(String::as_str),
            Some("1"),
            "an empty ClickHouse password needs CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT=1 for network access"
        );
    }

    // Postgres URL: the server's user, password and database.
    let pg = compose.env("postgres");
    let want = format!(
        "postgres://{}:{}@postgres:5432/{}",
        pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]
    );
    for service in BUILT {
        assert_eq!(
            compose.env_var(service, "ETL_POSTGRES_URL"),
            want,
            "{service}'s ETL_POSTGRES_URL does not match the postgres service's credentials and database"
        );
    }
    assert_eq!(pg["POSTGRES_DB"], "online_store", "postgres POSTGRES_DB");
    assert!(
        compose
            .command("postgres")
            .join(" ")
            .contains("wal_level=logical"),
        "postgres must run with wal_level=logical for Debezium"
    );

    // The metrics/health port is the one published and health-checked.
    let (_, metrics_port) = host_port(&get("ETL_METRICS_ADDR"));
    assert!(
        compose
            .ports("etl_processor")
            .iter()
            .any(|(_, _, c)| *c == metrics_port),
        "etl_processor does not publish its metrics port {metrics_port}"
    );
    assert!(
        compose
            .healthcheck("etl_processor")
            .contains(&metrics_port.to_string()),
        "etl_processor's healthcheck does not use its metrics port {metrics_port}"
    );
    // The OTLP endpoint is the collector's HTTP receiver.
    let (host, port) = host_port(&get("ETL_OTEL_ENDPOINT"));
    assert!(
        compose.names().contains(&host),
        "ETL_OTEL_ENDPOINT names {host}, not a service"
    );
    assert_eq!(
        port,
        otel_receiver_port("http"),
        "ETL_OTEL_ENDPOINT's port is not the collector's OTLP/HTTP receiver"
    );
}

#[test]
fn loadgen_runs_the_tools_image_and_can_be_turned_off() {
    let compose = compose();
    let command = compose.command("loadgen");
    assert_eq!(
        command.first().map(String::as_str),
        Some("loadgen"),
        "loadgen must run `etl-tools loadgen ...` (the tools image's entrypoint is etl-tools), got {command:?}"
    );
    let rate = command
        .iter()
        .position(|a| a == "--rate")
        .and_then(|i| command.get(i + 1))
        .unwrap_or_else(|| panic!("loadgen's command {command:?} has no --rate"));
    assert_eq!(
        rate,
        &dotenv()["LOADGEN_RATE"],
        "loadgen's --rate is not ${{LOADGEN_RATE}}"
    );
    let raw = yaml("docker-compose.yml");
    let raw_command = serde_yaml_ng::to_string(&raw["services"]["loadgen"]["command"]).unwrap();
    assert!(
        raw_command.contains("${LOADGEN_RATE"),
        "loadgen's --rate does not come from LOADGEN_RATE"
    );
    let restart = compose
        .service("loadgen")
        .get("restart")
        .map(scalar)
        .unwrap_or_default();
    assert!(
        restart.starts_with("on-failure"),
        "loadgen has restart: {restart:?}; on-failure lets --rate 0 (exit 0) stay stopped"
    );
    let env_text = read(".env");
    assert!(
        env_text.contains("docker compose stop loadgen"),
        ".env does not say how to turn the load generator off (docker compose stop loadgen)"
    );
}

#[test]
fn kafka_listeners_serve_the_services_and_the_host() {
    let compose = compose();
    let env = compose.env("kafka");
    let advertised = &env["KAFKA_ADVERTISED_LISTENERS"];
    assert!(
        advertised.contains("://kafka:29092") && advertised.contains("://localhost:9092"),
        "KAFKA_ADVERTISED_LISTENERS {advertised:?} must advertise kafka:29092 (services) and localhost:9092 (host)"
    );
    let listeners = &env["KAFKA_LISTENERS"];
    assert!(
        listeners.contains(":29092") && listeners.contains(":9092"),
        "KAFKA_LISTENERS {listeners:?} must listen on 29092 and 9092"
    );
    for name in advertised
        .split(',')
        .map(|l| l.split("://").next().unwrap())
    {
        assert!(
            env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].contains(&format!("{name}:")),
            "listener {name} has no entry in KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"
        );
    }
    for (key, want) in [
        ("KAFKA_BROKER_ID", "1"),
        ("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "true"),
        ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1"),
        ("KAFKA_ZOOKEEPER_CONNECT", "zookeeper:2181"),
    ] {
        assert_eq!(env.get(key).map(String::as_str), Some(want), "kafka {key}");
    }
    assert_eq!(
        compose.env_var("debezium", "BOOTSTRAP_SERVERS"),
        "kafka:29092",
        "debezium's BOOTSTRAP_SERVERS must be the internal listener"
    );
    for key in [
        "GROUP_ID",
        "CONFIG_STORAGE_TOPIC",
        "OFFSET_STORAGE_TOPIC",
        "STATUS_STORAGE_TOPIC",
    ] {
        assert!(
            !compose.env_var("debezium", key).is_empty(),
            "debezium's {key} is empty"
        );
    }
}

#[test]
fn debezium_register_runs_the_script_with_the_connector_json() {
    let compose = compose();
    let command = compose.command("debezium-register");
    assert!(
        command.first().is_some_and(|c| c.starts_with("python3")),
        "debezium-register must run python3, got {command:?}"
    );
    let script = command
        .iter()
        .find(|a| a.ends_with("register.py"))
        .unwrap_or_else(|| {
            panic!("debezium-register's command {command:?} does not run register.py")
        });
    let script_host = compose
        .host_path_of("debezium-register", script)
        .unwrap_or_else(|| panic!("{script} is not inside a bind mount of debezium-register"));
    assert_eq!(
        script_host,
        repo().join("debezium/register.py"),
        "debezium-register runs {script}, which is not the repo's debezium/register.py"
    );
    assert!(script_host.is_file(), "debezium/register.py does not exist");

    let arg = |flag: &str| {
        command
            .iter()
            .position(|a| a == flag)
            .and_then(|i| command.get(i + 1))
            .cloned()
            .unwrap_or_else(|| panic!("debezium-register's command {command:?} has no {flag}"))
    };
    let config = arg("--config");
    let config_host = compose
        .host_path_of("debezium-register", &config)
        .unwrap_or_else(|| {
            panic!("--config {config} is not inside a bind mount of debezium-register")
        });
    assert_eq!(
        config_host,
        repo().join("debezium/online-store-connector.json"),
        "--config {config} is not the repo's debezium/online-store-connector.json"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&read("debezium/online-store-connector.json"))
            .expect("debezium/online-store-connector.json is not JSON");
    let name = doc["name"]
        .as_str()
        .expect("the connector JSON has no string \"name\"");
    assert!(!name.is_empty(), "the connector JSON's name is empty");
    let config = doc["config"]
        .as_object()
        .expect("the connector JSON has no \"config\" object");
    let script_text = read("debezium/register.py");
    for needle in [
        "[\"name\"]",
        "[\"config\"]",
        "/connectors/",
        "/config",
        "/status",
        "\"PUT\"",
    ] {
        assert!(
            script_text.contains(needle),
            "register.py does not use {needle}: it must read the document's name/config and PUT .../config"
        );
    }

    // The connector reaches the postgres service with its credentials.
    let pg = compose.env("postgres");
    let setting = |k: &str| {
        config
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        compose.names().contains(&setting("database.hostname")),
        "database.hostname {:?} is not a compose service",
        setting("database.hostname")
    );
    assert_eq!(setting("database.port"), "5432", "database.port");
    assert_eq!(
        setting("database.dbname"),
        pg["POSTGRES_DB"],
        "database.dbname vs POSTGRES_DB"
    );
    // (Its credentials: connector_credentials_come_from_dotenv_through_a_config_provider.)

    // And it talks to the debezium service.
    let (host, port) = host_port(&arg("--connect-url"));
    assert_eq!(
        host, "debezium",
        "--connect-url does not name the debezium service"
    );
    assert!(
        compose.ports("debezium").iter().any(|(_, _, c)| *c == port),
        "--connect-url port {port} is not the port debezium serves"
    );
}

#[test]
fn prometheus_scrapes_the_compose_services() {
    let compose = compose();
    let prom = yaml("prometheus.yml");
    assert_eq!(
        prom["global"]["scrape_interval"].as_str(),
        Some("5s"),
        "prometheus.yml global.scrape_interval"
    );
    let jobs: BTreeMap<String, (Vec<String>, String)> = prom["scrape_configs"]
        .as_sequence()
        .expect("prometheus.yml has no scrape_configs list")
        .iter()
        .map(|job| {
            let name = job["job_name"]
                .as_str()
                .expect("a job without job_name")
                .to_string();
            let targets = job["static_configs"]
                .as_sequence()
                .into_iter()
                .flatten()
                .flat_map(|c| c["targets"].as_sequence().cloned().unwrap_or_default())
                .map(|t| scalar(&t))
                .collect();
            let path = job["metrics_path"]
                .as_str()
                .unwrap_or("/metrics")
                .to_string();
            (name, (targets, path))
        })
        .collect();
    for (job, target) in [
        ("etl_processor", "etl_processor:9464"),
        ("clickhouse", "clickhouse:9363"),
        ("prometheus", "localhost:9090"),
    ] {
        let (targets, path) = jobs
            .get(job)
            .unwrap_or_else(|| panic!("prometheus.yml has no job {job}"));
        assert_eq!(targets, &[target], "prometheus.yml job {job} targets");
        assert_eq!(path, "/metrics", "prometheus.yml job {job} metrics_path");
    }

    // Each target is a service on a port it serves.
    let (_, metrics_port) = host_port(&compose.env_var("etl_processor", "ETL_METRICS_ADDR"));
    assert_eq!(
        metrics_port, 9464,
        "ETL_METRICS_ADDR's port is not the one prometheus scrapes"
    );
    let xml = read("init/clickhouse/config.d/prometheus.xml");
    let tag = |t: &str| {
        xml.split_once(&format!("<{t}>"))
            .and_then(|(_, r)| r.split_once(&format!("</{t}>")))
            .map(|(v, _)| v.trim().to_string())
            .unwrap_or_else(|| panic!("prometheus.xml has no <{t}>"))
    };
    assert!(
        xml.contains("<clickhouse>"),
        "prometheus.xml's root element must be <clickhouse>"
    );
    assert_eq!(
        tag("port"),
        "9363",
        "ClickHouse's Prometheus port (prometheus.xml)"
    );
    assert_eq!(
        tag("endpoint"),
        "/metrics",
        "ClickHouse's Prometheus endpoint (prometheus.xml)"
    );
    for t in ["metrics", "events", "asynchronous_metrics"] {
        assert_eq!(tag(t), "true", "prometheus.xml <{t}>");
    }
    let mounted = compose.host_path_of(
        "clickhouse",
        "/etc/clickhouse-server/config.d/prometheus.xml",
    );
    assert_eq!(
        mounted,
        Some(repo().join("init/clickhouse/config.d/prometheus.xml")),
        "clickhouse does not mount init/clickhouse/config.d/prometheus.xml into its config.d"
    );
    assert_eq!(
        compose.host_path_of("prometheus", "/etc/prometheus/prometheus.yml"),
        Some(repo().join("prometheus.yml")),
        "prometheus does not mount the repo's prometheus.yml"
    );
}

fn otel_config() -> Value {
    yaml("otel/otel-collector-config.yaml")
}

fn otel_receiver_port(protocol: &str) -> u16 {
    let config = otel_config();
    let endpoint = config["receivers"]["otlp"]["protocols"][protocol]["endpoint"]
        .as_str()
        .unwrap_or_else(|| panic!("the collector's otlp receiver has no {protocol} endpoint"))
        .to_string();
    host_port(&endpoint).1
}

#[test]
fn otel_collector_receives_otlp_and_exports_to_jaeger() {
    let compose = compose();
    let config = otel_config();
    assert_eq!(otel_receiver_port("grpc"), 4317, "OTLP/gRPC receiver port");
    assert_eq!(otel_receiver_port("http"), 4318, "OTLP/HTTP receiver port");
    let exporter = &config["exporters"]["otlp"];
    let (host, port) = host_port(
        exporter["endpoint"]
            .as_str()
            .expect("exporters.otlp has no endpoint"),
    );
    assert_eq!(
        (host.as_str(), port),
        ("jaeger", 4317),
        "exporters.otlp.endpoint"
    );
    assert!(
        compose.names().contains("jaeger"),
        "the collector exports to jaeger, which is not a service"
    );
    assert_eq!(
        exporter["tls"]["insecure"].as_bool(),
        Some(true),
        "exporters.otlp.tls.insecure must be true (jaeger serves plain gRPC on 4317)"
    );
    assert!(
        config["exporters"]["debug"].is_mapping(),
        "no debug exporter"
    );
    let pipeline = &config["service"]["pipelines"]["traces"];
    let list = |k: &str| -> Vec<String> {
        pipeline[k]
            .as_sequence()
            .unwrap_or_else(|| panic!("the traces pipeline has no {k}"))
            .iter()
            .map(scalar)
            .collect()
    };
    assert_eq!(list("receivers"), ["otlp"], "traces pipeline receivers");
    assert_eq!(
        list("processors"),
        ["memory_limiter", "batch"],
        "traces pipeline processors (memory_limiter first)"
    );
    let exporters: BTreeSet<String> = list("exporters").into_iter().collect();
    assert_eq!(
        exporters,
        BTreeSet::from(["otlp".to_string(), "debug".to_string()]),
        "traces pipeline exporters"
    );
    for component in ["receivers", "processors", "exporters"] {
        for name in list(component) {
            assert!(
                config[component].get(&name).is_some(),
                "the traces pipeline uses {component}.{name}, which is not defined"
            );
        }
    }
    let health = config["extensions"]["health_check"]["endpoint"]
        .as_str()
        .expect("no health_check extension endpoint");
    assert_eq!(host_port(health).1, 13133, "health_check extension port");
    assert!(
        config["service"]["extensions"]
            .as_sequence()
            .is_some_and(|e| e.iter().any(|x| x.as_str() == Some("health_check"))),
        "service.extensions does not enable health_check"
    );
    // The file the collector is told to read is the mounted one.
    let command = compose.command("otel-collector");
    let path = command
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .unwrap_or_else(|| panic!("otel-collector's command {command:?} has no --config="));
    assert_eq!(
        compose.host_path_of("otel-collector", path),
        Some(repo().join("otel/otel-collector-config.yaml")),
        "otel-collector reads {path}, which is not the mounted otel/otel-collector-config.yaml"
    );
}

/// Names of the `$VAR` / `${VAR}` references in every string of a YAML document.
fn env_references(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(pos) = rest.find('$') {
                rest = &rest[pos + 1..];
                if let Some(after) = rest.strip_prefix('$') {
                    rest = after;
                    continue;
                }
                let body = rest.strip_prefix('{').unwrap_or(rest);
                let len = body
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(body.len());
                if len > 0 {
                    out.insert(body[..len].to_string());
                }
            }
        }
        Value::Sequence(items) => items.iter().for_each(|v| env_references(v, out)),
        Value::Mapping(map) => map.values().for_each(|v| env_references(v, out)),
        _ => {}
    }
}

fn yaml_files(dir: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(repo().join(dir))
        .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yml") || n.ends_with(".yaml"))
        .map(|n| format!("{dir}/{n}"))
        .collect();
    files.sort();
    files
}

#[test]
fn grafana_provisioning_reaches_the_compose_services() {
    let compose = compose();
    let grafana_env = compose.env("grafana");
    let mut uids = BTreeSet::new();
    let datasource_files = yaml_files("grafana/provisioning/datasources");
    assert!(
        !datasource_files.is_empty(),
        "grafana/provisioning/datasources has no yml"
    );
    for file in &datasource_files {
        let doc = yaml(file);
        let mut vars = BTreeSet::new();
        env_references(&doc, &mut vars);
        for var in vars {
            assert!(
                grafana_env.contains_key(&var),
                "{file} reads ${var}, which the grafana service's environment does not set"
            );
        }
        for ds in doc["datasources"].as_sequence().into_iter().flatten() {
            let name = ds["name"].as_str().unwrap_or("?");
            if let Some(uid) = ds["uid"].as_str() {
                uids.insert(uid.to_string());
            }
            let (host, port) = match (ds["url"].as_str(), ds["jsonData"]["host"].as_str()) {
                (Some(url), _) => host_port(url),
                (None, Some(host)) => {
                    let port = ds["jsonData"]["port"]
                        .as_u64()
                        .or_else(|| ds["jsonData"]["port"].as_str().and_then(|p| p.parse().ok()))
                        .unwrap_or_else(|| {
                            panic!("{file}: datasource {name} has a host but no port")
                        });
                    (host.to_string(), port as u16)
                }
                (None, None) => continue,
            };
            assert!(
                compose.names().contains(&host),
                "{file}: datasource {name} points at {host}, which is not a compose service"
            );
            assert!(
                compose.ports(&host).iter().any(|(_, _, c)| *c == port),
                "{file}: datasource {name} uses {host}:{port}, a port {host} does not serve"
            );
            if let Some(plugin) = ds["type"].as_str().filter(|t| t.contains('-')) {
                let installed = grafana_env
                    .get("GF_INSTALL_PLUGINS")
                    .cloned()
                    .unwrap_or_default();
                assert!(
                    installed.split(',').any(|p| p.split_whitespace().next() == Some(plugin)),
                    "{file}: datasource {name} needs plugin {plugin}, which GF_INSTALL_PLUGINS ({installed:?}) does not install"
                );
            }
        }
    }
    for uid in ["clickhouse", "prometheus"] {
        assert!(
            uids.contains(uid),
            "no provisioned datasource has uid {uid}"
        );
    }
    let installed = &grafana_env["GF_INSTALL_PLUGINS"];
    let version = installed.split_whitespace().nth(1).unwrap_or("");
    assert!(
        version.split('.').count() == 3 && version.split('.').all(|p| p.parse::<u32>().is_ok()),
        "GF_INSTALL_PLUGINS {installed:?} does not pin the plugin version (id x.y.z)"
    );
    for file in yaml_files("grafana/provisioning/dashboards") {
        for provider in yaml(&file)["providers"].as_sequence().into_iter().flatten() {
            let path = provider["options"]["path"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: a provider without options.path"));
            let host = compose.host_path_of("grafana", path).unwrap_or_else(|| {
                panic!("{file}: provider path {path} is not inside a grafana mount")
            });
            assert!(
                host.is_dir(),
                "{file}: provider path {path} is {}, not a directory",
                host.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The compose fixes of issue 12, one test each.

#[test]
fn kafka_and_zookeeper_keep_their_data_across_down_and_up() {
    // Kafka Connect keeps its configs and offsets in Kafka topics, and the consumer groups their
    // offsets too: all of it lives in Kafka's log.dirs. ZooKeeper holds the cluster id Kafka's data
    // is bound to, so it must persist with it.
    let compose = compose();
    let kafka = compose.env("kafka");
    let log_dirs = kafka
        .get("KAFKA_LOG_DIRS")
        .map(String::as_str)
        .unwrap_or("/var/lib/kafka/data");
    let topics = "the topics, Connect's and the consumer groups' offsets";
    let cluster = "the cluster id Kafka's data belongs to";
    let needs = [
        ("kafka", log_dirs, topics),
        ("zookeeper", "/var/lib/zookeeper/data", cluster),
        ("zookeeper", "/var/lib/zookeeper/log", cluster),
    ];
    for (service, dir, what) in needs {
        let mount = compose
            .mounts(service)
            .into_iter()
            .find(|(_, target, _)| target.trim_end_matches('/') == dir);
        match mount {
            Some((source, _, read_only)) => assert!(
                !is_bind(&source) && !read_only,
                "{service} mounts {source:?} at {dir}: use a writable named volume"
            ),
            None => panic!(
                "{service} keeps {dir} in an anonymous volume: `docker compose down` then `up` \
                 loses it ({what}); mount a named volume"
            ),
        }
    }
    let bootstrap = compose.env_var("debezium", "BOOTSTRAP_SERVERS");
    assert_eq!(
        host_port(&bootstrap).0,
        "kafka",
        "Kafka Connect must store its offsets in the kafka service, whose data persists"
    );
}

#[test]
fn connector_credentials_come_from_dotenv_through_a_config_provider() {
    let doc: serde_json::Value =
        serde_json::from_str(&read("debezium/online-store-connector.json"))
            .expect("debezium/online-store-connector.json is not JSON");
    let config = doc["config"].as_object().expect("no \"config\" object");
    // Unusual credentials in place of .env's, so nothing can agree with them by accident.
    let mut env = dotenv();
    env.insert("POSTGRES_USER".into(), "cdc_user_from_env".into());
    env.insert("POSTGRES_PASSWORD".into(), "pw-from-env-7".into());
    let compose = compose_with(&env);
    let pg = compose.env("postgres");
    let dbz = compose.env("debezium");

    // The worker's config provider "env": Kafka's EnvVarConfigProvider (Kafka >= 3.5, KIP-887).
    // The debezium/connect image turns CONNECT_FOO_BAR into the worker property foo.bar.
    let providers = dbz
        .get("CONNECT_CONFIG_PROVIDERS")
        .cloned()
        .unwrap_or_default();
    assert!(
        providers.split(',').any(|p| p.trim() == "env"),
        "debezium's CONNECT_CONFIG_PROVIDERS {providers:?} does not declare the provider \"env\""
    );
    assert_eq!(
        dbz.get("CONNECT_CONFIG_PROVIDERS_ENV_CLASS")
            .map(String::as_str),
        Some("org.apache.kafka.common.config.provider.EnvVarConfigProvider"),
        "debezium's CONNECT_CONFIG_PROVIDERS_ENV_CLASS"
    );
    let allowed: Option<Vec<String>> = dbz
        .get("CONNECT_CONFIG_PROVIDERS_ENV_PARAM_ALLOWLIST_PATTERN")
        .map(|pattern| {
            // Kept a plain alternation of names, so this test can read it without a regex engine.
            let names: Vec<String> = pattern.split('|').map(str::to_string).collect();
            for name in &names {
                assert!(
                    !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
                    "the allowlist pattern {pattern:?} is not NAME|NAME|..."
                );
            }
            names
        });

    // Every placeholder of the connector resolves in the debezium container.
    let mut placeholders = BTreeMap::new();
    for (key, value) in config {
        let value = value.as_str().unwrap_or_default();
        if let Some(rest) = value.strip_prefix("${") {
            let var = rest
                .strip_prefix("env:")
                .and_then(|r| r.strip_suffix('}'))
                .unwrap_or_else(|| panic!("{key} is {value:?}; only ${{env:NAME}} is provided"));
            assert!(
                dbz.contains_key(var),
                "{key} reads ${{env:{var}}}, which the debezium service's environment does not set"
            );
            if let Some(names) = &allowed {
                assert!(
                    names.iter().any(|n| n == var),
                    "{key} reads {var}, which the provider's allowlist {names:?} refuses"
                );
            }
            placeholders.insert(key.clone(), var.to_string());
        }
    }
    // The credentials are placeholders, whose values are the postgres service's (from .env).
    for (key, pg_key) in [
        ("database.user", "POSTGRES_USER"),
        ("database.password", "POSTGRES_PASSWORD"),
    ] {
        let var = placeholders.get(key).unwrap_or_else(|| {
            panic!(
                "the connector JSON writes {key} as {:?}: use ${{env:{pg_key}}}, so the credentials \
                 are set once, in .env",
                config.get(key)
            )
        });
        assert_eq!(
            dbz[var], pg[pg_key],
            "debezium's {var} (read by {key}) is not the postgres service's {pg_key}"
        );
    }
}

#[test]
fn kafka_advertises_the_external_host_setting() {
    let external = |compose: &Compose| {
        let advertised = compose.env_var("kafka", "KAFKA_ADVERTISED_LISTENERS");
        advertised
            .split(',')
            .find_map(|l| l.strip_prefix("EXTERNAL://"))
            .unwrap_or_else(|| panic!("no EXTERNAL listener in {advertised:?}"))
            .to_string()
    };
    let mut env = dotenv();
    assert_eq!(
        env.get("KAFKA_EXTERNAL_HOST").map(String::as_str),
        Some("localhost"),
        ".env must set KAFKA_EXTERNAL_HOST, localhost by default"
    );
    assert_eq!(external(&compose_with(&env)), "localhost:9092");
    env.insert("KAFKA_EXTERNAL_HOST".into(), "cdc-host.example".into());
    assert_eq!(
        external(&compose_with(&env)),
        "cdc-host.example:9092",
        "the EXTERNAL listener does not follow KAFKA_EXTERNAL_HOST"
    );
    env.remove("KAFKA_EXTERNAL_HOST");
    assert_eq!(
        external(&compose_with(&env)),
        "localhost:9092",
        "without KAFKA_EXTERNAL_HOST the EXTERNAL listener must default to localhost"
    );
}

#[test]
fn clickhouse_healthcheck_passes_only_on_the_final_server() {
    // The clickhouse-server image's entrypoint runs /docker-entrypoint-initdb.d on a temporary
    // server started with `--listen_host=127.0.0.1`, then execs the real server, which listens on
    // all addresses. A check over loopback (or clickhouse-client's default host, localhost) also
    // passes on the temporary one; a check over the container's own address does not.
    let check = compose().healthcheck("clickhouse");
    for loopback in ["127.0.0.1", "localhost", "::1", "0.0.0.0"] {
        assert!(
            !check.contains(loopback),
            "clickhouse's healthcheck {check:?} uses {loopback}, where the temporary init server answers too"
        );
    }
    let calls: Vec<&str> = check.split("clickhouse-client").skip(1).collect();
    assert!(
        !calls.is_empty(),
        "clickhouse's healthcheck {check:?} runs no clickhouse-client"
    );
    for call in calls {
        let call = call.split(['|', ';', '&']).next().unwrap();
        assert!(
            call.contains("--host \"$(hostname)\"") || call.contains("--host $(hostname)"),
            "clickhouse's healthcheck calls clickhouse-client without --host \"$(hostname)\": {call:?}"
        );
    }
    // And the init scripts completed: their last table exists.
    let mut last_table = None;
    let mut files: Vec<_> = std::fs::read_dir(repo().join("init/clickhouse"))
        .expect("list init/clickhouse")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    for file in files {
        let sql = std::fs::read_to_string(&file).unwrap();
        for part in sql.split("CREATE TABLE IF NOT EXISTS ").skip(1) {
            last_table = part.split_whitespace().next().map(str::to_string);
        }
    }
    let last_table = last_table.expect("init/clickhouse creates no table");
    assert!(
        check.contains(&format!("EXISTS TABLE {last_table}")),
        "clickhouse's healthcheck does not check the last table of the init scripts, {last_table}"
    );
}

#[test]
fn processor_and_loadgen_build_their_own_stages() {
    let compose = compose();
    let builders: Vec<String> = compose
        .names()
        .into_iter()
        .filter(|s| compose.service(s).get("build").is_some())
        .collect();
    let mut want: Vec<&str> = STAGES.iter().map(|(service, _)| *service).collect();
    want.sort();
    assert_eq!(builders, want, "the services that build an image");
    let dockerfile_stages = dockerfile_stages();
    assert_eq!(
        dockerfile_stages.last().map(String::as_str),
        Some("processor"),
        "the Dockerfile's last stage (what `docker build .` gives) must be the processor's"
    );
    let mut images = BTreeSet::new();
    for (service, stage) in STAGES {
        let spec = compose.service(service);
        let build = match &spec["build"] {
            Value::Mapping(m) => m,
            other => {
                panic!("{service} builds {other:?}; it must name its Dockerfile stage (target:)")
            }
        };
        let context = build
            .get("context")
            .map(scalar)
            .unwrap_or_else(|| ".".into());
        assert!(
            context == "." || context == "./",
            "{service} builds from {context:?}, expected the repo root"
        );
        let dockerfile = build
            .get("dockerfile")
            .map(scalar)
            .unwrap_or_else(|| "Dockerfile".into());
        assert_eq!(
            dockerfile, "Dockerfile",
            "{service} builds from {dockerfile}"
        );
        assert_eq!(
            build.get("target").map(scalar).as_deref(),
            Some(*stage),
            "{service} must build the Dockerfile's {stage} stage"
        );
        assert!(
            dockerfile_stages.iter().any(|s| s == stage),
            "the Dockerfile has no {stage} stage (stages: {dockerfile_stages:?})"
        );
        let image = spec.get("image").map(scalar).unwrap_or_else(|| {
            panic!(
                "{service} must name the image it builds (image:); without it Compose names it \
                 after the service"
            )
        });
        assert!(
            image.rsplit('/').next().unwrap().contains(':'),
            "{service}'s image {image:?} has no tag"
        );
        assert!(images.insert(image.clone()), "two stages built as {image}");
        assert_eq!(
            spec.get("pull_policy").map(scalar).as_deref(),
            Some("never"),
            "{service}: the image name exists only locally; pull_policy: never keeps Compose from pulling it"
        );
    }
}

/// The names of the Dockerfile's stages (`FROM ... AS name`), in order.
fn dockerfile_stages() -> Vec<String> {
    read("Dockerfile")
        .lines()
        .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| w.eq_ignore_ascii_case("AS"))?;
            words.get(at + 1).map(|w| w.to_string())
        })
        .collect()
}

#[test]
fn jaeger_is_the_maintained_v2_line() {
    let compose = compose();
    let image = compose
        .service("jaeger")
        .get("image")
        .map(scalar)
        .expect("jaeger has no image");
    let (name, tag) = image
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("jaeger's image {image:?} has no tag"));
    assert_eq!(
        name, "jaegertracing/jaeger",
        "Jaeger 1.x (jaegertracing/all-in-one) reached its end of life; use jaegertracing/jaeger (v2)"
    );
    let version: Vec<u32> = tag
        .split('.')
        .map(|p| p.parse().unwrap_or(u32::MAX))
        .collect();
    assert!(
        version.len() == 3 && version[0] == 2 && !version.contains(&u32::MAX),
        "jaeger's image {image:?} is not pinned to a 2.x.y release"
    );
    let env = compose.env("jaeger");
    for v1 in [
        "COLLECTOR_OTLP_ENABLED",
        "SPAN_STORAGE_TYPE",
        "COLLECTOR_ZIPKIN_HOST_PORT",
    ] {
        assert!(
            !env.contains_key(v1),
            "jaeger sets {v1}, a 1.x setting that v2 ignores"
        );
    }
    let check = compose.healthcheck("jaeger");
    assert!(
        check.contains(":13133/status") && !check.contains("14269"),
        "jaeger's healthcheck {check:?} must ask v2's healthcheckv2 extension (:13133/status), \
         not 1.x's admin port 14269"
    );
}

#[test]
fn compose_file_is_valid_for_docker_compose() {
    let tool = "docker-compose";
    let out = std::process::Command::new(tool)
        .current_dir(repo())
        .args(["-f", "docker-compose.yml", "config", "-q"])
        // Variables from .env only, and no daemon needed.
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .env("LANG", "C.UTF-8")
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{tool} is not installed, so docker-compose.yml cannot be validated. Install Debian's: \
             apt-get install -y --no-install-recommends docker-compose"
        ),
        Err(e) => panic!("cannot run {tool}: {e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "`{tool} config` rejects docker-compose.yml ({}):\n{stderr}",
        out.status
    );
    assert!(
        stderr.trim().is_empty(),
        "`{tool} config` accepts docker-compose.yml but warns:\n{stderr}"
    );

    // The project name comes from .env: docker-compose 1.29 refuses a top-level `name:`.
    let compose = compose();
    assert!(
        compose.doc.get("name").is_none(),
        "top-level `name:` is Compose v2 only (docker-compose 1.29 rejects the file); \
         set COMPOSE_PROJECT_NAME in .env"
    );
    let env = dotenv();
    for (key, want) in COMPOSE_SETTINGS {
        assert_eq!(
            env.get(*key).map(String::as_str),
            Some(*want),
            ".env {key} (the names of the containers and data volumes)"
        );
    }
}

/// Connect stores source offsets every 5 s, not every 60 s: a worker that
/// dies then repeats at most seconds of events, and takes its initial
/// snapshot again only if it dies within seconds of it.
#[test]
fn connect_stores_source_offsets_every_few_seconds() {
    let dbz = compose_with(&dotenv()).env("debezium");
    let interval: u64 = dbz
        .get("CONNECT_OFFSET_FLUSH_INTERVAL_MS")
        .expect("debezium sets CONNECT_OFFSET_FLUSH_INTERVAL_MS")
        .parse()
        .expect("a number of milliseconds");
    assert!(interval <= 5_000, "offsets stored every {interval} ms");
}
