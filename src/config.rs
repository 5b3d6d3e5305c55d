//! Configuration: environment variables, optionally on top of a TOML file.
//!
//! Every setting is an `ETL_*` variable; the file (`ETL_CONFIG_FILE`) uses the
//! same names in lower case without the prefix (`ETL_FLUSH_INTERVAL_MS` ->
//! `flush_interval_ms`). The environment wins. A bad value stops start-up with
//! an error that names the setting, where it came from, and why.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::faults::FaultConfig;
use crate::restart::{ActorKind, RestartPolicy};

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub clickhouse: ClickHouseConfig,
    pub flush: FlushConfig,
    pub supervision: SupervisionConfig,
    pub faults: FaultConfig,
    /// Where events that cannot be decoded go, with the reason in a header.
    pub dead_letter_topic: String,
    /// Threads that decode partitions' batches (each partition on one of
    /// them, so its batches stay in order).
    pub decode_threads: usize,
    /// How long SIGTERM/SIGINT may take to flush and commit before the process
    /// exits without them (the next start replays what was not committed).
    pub shutdown_timeout: Duration,
    /// What the processor does when its source started over (the cases of
    /// exit code 5): stop, or rebuild the aggregates and go on.
    pub on_started_over: OnStartedOver,
    /// How long a rebuild reads on, waiting for the newest snapshot to
    /// finish, before it gives up.
    pub rebuild_snapshot_wait: Duration,
    /// Postgres connection URL; only `reconcile` needs it.
    pub postgres_url: Option<String>,
    /// The log filter (tracing's EnvFilter syntax), checked at start-up.
    pub log: String,
    pub telemetry: TelemetryConfig,
}

/// What the processor does when its source started over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStartedOver {
    /// Exit with code 5; the live tables keep what was counted before.
    Stop,
    /// Rebuild the aggregates from the newest snapshot, then go on.
    Rebuild,
}

impl FromStr for OnStartedOver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "stop" => Ok(OnStartedOver::Stop),
            "rebuild" => Ok(OnStartedOver::Rebuild),
            _ => Err("expected stop or rebuild".into()),
        }
    }
}

/// Where the processor reports on itself.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// Serves /metrics (Prometheus), /health/live and /health/ready; None: off.
    /// Port 0 picks a free port (logged at start-up).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// OTLP/HTTP endpoint for traces (spans go to `<endpoint>/v1/traces`);
    /// None: no traces are exported.
    pub otel_endpoint: Option<String>,
    /// Share of batch traces kept (a trace started upstream keeps its
    /// parent's decision).
    pub sample_ratio: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    /// Debezium's `topic.prefix`: topics are `<prefix>.public.<table>`.
    pub topic_prefix: String,
    pub session_timeout: Duration,
    /// At most this many records are gathered by one poll (all partitions).
    pub batch_max_records: usize,
    /// Records handed on but not yet applied; past it the partitions pause.
    pub max_inflight_records: usize,
    /// Flushed offsets are committed at most this often (0: after every flush).
    pub commit_interval: Duration,
    /// librdkafka's pre-fetch queue (`queued.max.messages.kbytes`): records
    /// fetched ahead of the pipeline, a large part of the resident memory.
    pub prefetch_kbytes: u32,
    /// librdkafka's `max.poll.interval.ms`: the longest a rebalance waits
    /// for this member, and the longest between two polls.
    pub max_poll_interval: Duration,
}

impl KafkaConfig {
    /// How long each rebalance callback may take, half the poll interval,
    /// so that the member answers the rebalance in time, with room for the
    /// other callback: revoked partitions not drained and flushed by then
    /// count as lost; assigned ones not loaded by then end the run (the
    /// loads never wait longer, nor does a rewind's, which holds the poll
    /// loop as well).
    pub fn rebalance_deadline(&self) -> Duration {
        self.max_poll_interval / 2
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClickHouseConfig {
    pub url: String,
    pub database: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub validation: Validation,
}

/// The clickhouse crate's row validation needs a server that speaks
/// RowBinaryWithNamesAndTypes; old servers (18.x) do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// On for servers that support it, off otherwise.
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FlushConfig {
    /// Aggregates are written at least this often while they change.
    pub interval: Duration,
    /// ... and as soon as this many rows are dirty.
    pub max_rows: usize,
    /// ... and as soon as the consumer has caught up, but no
    /// sooner than this after the previous write: the most inserts per
    /// second into each table while events trickle in.
    pub min_interval: Duration,
    /// The rows each aggregate keeps in memory once they are written: past
    /// it, those least recently touched are dropped after a flush, and read
    /// back from ClickHouse when an event touches them again.
    pub held_rows: usize,
}

/// The restart policy of each actor kind.
#[derive(Debug, Clone, PartialEq)]
pub struct SupervisionConfig {
    pub partition: RestartPolicy,
    pub aggregator: RestartPolicy,
    pub sink: RestartPolicy,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("setting {name} ({origin}): {why}")]
    Invalid {
        name: String,
        origin: Origin,
        why: String,
    },
    #[error("setting {name} is required: {why}")]
    Missing { name: String, why: String },
    #[error("config file {path}: {why}")]
    File { path: String, why: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    Environment,
    File(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Environment => f.write_str("from the environment"),
            Origin::File(path) => write!(f, "from {path}"),
        }
    }
}

/// Raw settings by `ETL_*` name, with where each came from.
pub struct Settings {
    values: HashMap<String, (String, Origin)>,
}

impl Settings {
    /// The process environment over the file named by `ETL_CONFIG_FILE`.
    pub fn from_process() -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let file = match env.get("ETL_CONFIG_FILE") {
            Some(path) => Some((
                path.clone(),
                std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                    path: path.clone(),
                    why: e.to_string(),
                })?,
            )),
            None => None,
        };
        Settings::from_sources(env, file)
    }

    pub fn from_sources(
        env: HashMap<String, String>,
        file: Option<(String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut values = HashMap::new();
        if let Some((path, text)) = file {
            let table: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::File {
                        path: path.clone(),
                        why: e.to_string(),
                    })?;
            for (key, value) in table {
                let name = format!("ETL_{}", key.to_ascii_uppercase());
                if !known(&name) || name == "ETL_CONFIG_FILE" {
                    return Err(ConfigError::File {
                        path,
                        why: format!("unknown setting {key:?} (known: {})", known_file_keys()),
                    });
                }
                let text = match value {
                    toml::Value::String(s) => s,
                    other => other.to_string(),
                };
                values.insert(name, (text, Origin::File(path.clone())));
            }
        }
        for (name, value) in env {
            if !name.starts_with("ETL_") {
                continue;
            }
            // A misspelt setting would otherwise be ignored without a word.
            if !known(&name) {
                return Err(ConfigError::Invalid {
                    name,
                    origin: Origin::Environment,
                    why: format!("unknown setting (known: {})", KNOWN.join(", ")),
                });
            }
            values.insert(name, (value, Origin::Environment));
        }
        Ok(Settings { values })
    }

    fn raw(&self, name: &str) -> Option<&(String, Origin)> {
        self.values.get(name).filter(|(v, _)| !v.trim().is_empty())
    }

    /// The error for a bad value of `name`, saying where the value came from.
    pub(crate) fn invalid(&self, name: &str, why: String) -> ConfigError {
        let origin = self
            .raw(name)
            .map_or(Origin::Environment, |(_, o)| o.clone());
        ConfigError::Invalid {
            name: name.to_owned(),
            origin,
            why,
        }
    }

    fn string(&self, name: &str, default: &str) -> String {
        self.raw(name)
            .map(|(v, _)| v.trim().to_owned())
            .unwrap_or_else(|| default.to_owned())
    }

    pub(crate) fn optional(&self, name: &str) -> Option<String> {
        self.raw(name).map(|(v, _)| v.trim().to_owned())
    }

    pub(crate) fn parsed<T>(
        &self,
        name: &str,
        default: T,
        check: impl Fn(&T) -> Result<(), String>,
    ) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let Some((text, origin)) = self.raw(name) else {
            return Ok(default);
        };
        let invalid = |why: String| ConfigError::Invalid {
            name: name.to_owned(),
            origin: origin.clone(),
            why,
        };
        let value = text
            .trim()
            .parse::<T>()
            .map_err(|e| invalid(format!("{text:?}: {e}")))?;
        check(&value).map_err(|why| invalid(format!("{text:?}: {why}")))?;
        Ok(value)
    }

    /// The error for setting `name` whose value stands in the wrong
    /// relation to setting `other`'s.
    fn out_of_order(
        &self,
        (name, value): (&str, Duration),
        relation: &str,
        (other, bound): (&str, Duration),
        why: &str,
    ) -> ConfigError {
        let text = format!(
            "{} ms is {relation} {other} ({} ms){why}",
            value.as_millis(),
            bound.as_millis()
        );
        self.invalid(name, text)
    }

    pub(crate) fn millis(
        &self,
        name: &str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<Duration, ConfigError> {
        let ms = self.parsed(name, default, |&ms| {
            if (min..=max).contains(&ms) {
                Ok(())
            } else {
                Err(format!("must be between {min} and {max} milliseconds"))
            }
        })?;
        Ok(Duration::from_millis(ms))
    }

    fn policy(&self, name: &str, kind: ActorKind) -> Result<RestartPolicy, ConfigError> {
        let defaults = RestartPolicy::default_for(kind);
        match self.optional(name) {
            None => Ok(defaults),
            Some(spec) => RestartPolicy::parse(&spec, &defaults)
                .map_err(|why| self.invalid(name, format!("{spec:?}: {why}"))),
        }
    }

    fn url(&self, name: &str, default: &str, schemes: &[&str]) -> Result<String, ConfigError> {
        let url = self.string(name, default);
        if !schemes.iter().any(|s| url.starts_with(&format!("{s}://"))) {
            let why = format!("{url:?} is not a {} URL", schemes.join(" or "));
            return Err(self.invalid(name, why));
        }
        Ok(url)
    }
}

/// Every setting, by environment name.
/// Whether `name` is a setting; the fault settings are, in every build, so
/// that one without fault injection can say why it refuses them.
fn known(name: &str) -> bool {
    KNOWN.contains(&name) || crate::faults::SETTINGS.contains(&name)
}

const KNOWN: &[&str] = &[
    "ETL_CONFIG_FILE",
    "ETL_KAFKA_BROKERS",
    "ETL_KAFKA_GROUP_ID",
    "ETL_TOPIC_PREFIX",
    "ETL_KAFKA_SESSION_TIMEOUT_MS",
    "ETL_BATCH_MAX_RECORDS",
    "ETL_CLICKHOUSE_URL",
    "ETL_CLICKHOUSE_DATABASE",
    "ETL_CLICKHOUSE_USER",
    "ETL_CLICKHOUSE_PASSWORD",
    "ETL_CLICKHOUSE_VALIDATION",
    "ETL_FLUSH_INTERVAL_MS",
    "ETL_FLUSH_MAX_ROWS",
    "ETL_FLUSH_MIN_INTERVAL_MS",
    "ETL_STATE_MAX_ROWS",
    "ETL_POSTGRES_URL",
    "ETL_LOG",
    "ETL_MAX_INFLIGHT_RECORDS",
    "ETL_KAFKA_PREFETCH_KBYTES",
    "ETL_KAFKA_MAX_POLL_INTERVAL_MS",
    "ETL_COMMIT_INTERVAL_MS",
    "ETL_DECODE_THREADS",
    "ETL_DEAD_LETTER_TOPIC",
    "ETL_SHUTDOWN_TIMEOUT_MS",
    "ETL_ON_SOURCE_STARTED_OVER",
    "ETL_REBUILD_SNAPSHOT_WAIT_MS",
    "ETL_RESTART_PARTITION",
    "ETL_RESTART_AGGREGATOR",
    "ETL_RESTART_SINK",
    "ETL_METRICS_ADDR",
    "ETL_OTEL_ENDPOINT",
    "ETL_OTEL_SAMPLE_RATIO",
];

fn known_file_keys() -> String {
    KNOWN
        .iter()
        .filter(|n| **n != "ETL_CONFIG_FILE")
        .map(|n| n.trim_start_matches("ETL_").to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(", ")
}

impl FromStr for Validation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Validation::Auto),
            "on" | "true" => Ok(Validation::On),
            "off" | "false" => Ok(Validation::Off),
            _ => Err("expected auto, on or off".into()),
        }
    }
}

pub(crate) fn valid_rate(rate: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&rate) {
        Ok(())
    } else {
        Err("must be between 0 and 1".into())
    }
}

fn at_least(min: usize) -> impl Fn(&usize) -> Result<(), String> {
    move |&v| {
        if v >= min {
            Ok(())
        } else {
            Err(format!("must be at least {min}"))
        }
    }
}

/// One decoding thread per core the process may use.
fn default_decode_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// librdkafka's bounds for `queued.max.messages.kbytes`.
fn prefetch_kbytes(kbytes: &u32) -> Result<(), String> {
    if (1..=2_097_151).contains(kbytes) {
        Ok(())
    } else {
        Err("must be between 1 and 2097151 (KiB)".into())
    }
}

fn flush_config(s: &Settings) -> Result<FlushConfig, ConfigError> {
    let interval = s.millis("ETL_FLUSH_INTERVAL_MS", 1_000, 10, 60_000)?;
    let min_interval = match s.optional("ETL_FLUSH_MIN_INTERVAL_MS") {
        Some(_) => s.millis("ETL_FLUSH_MIN_INTERVAL_MS", 200, 0, 60_000)?,
        // The default gives way to a shorter timer; a value set must fit.
        None => Duration::from_millis(200).min(interval),
    };
    let flush = FlushConfig {
        interval,
        max_rows: s.parsed("ETL_FLUSH_MAX_ROWS", 50_000, at_least(1))?,
        min_interval,
        held_rows: s.parsed("ETL_STATE_MAX_ROWS", 200_000, at_least(1))?,
    };
    if flush.min_interval > flush.interval {
        return Err(s.out_of_order(
            ("ETL_FLUSH_MIN_INTERVAL_MS", flush.min_interval),
            "more than",
            ("ETL_FLUSH_INTERVAL_MS", flush.interval),
            ", which writes at least that often",
        ));
    }
    Ok(flush)
}

impl Config {
    pub fn from_process() -> Result<Config, ConfigError> {
        Config::from_settings(&Settings::from_process()?)
    }

    pub fn from_settings(s: &Settings) -> Result<Config, ConfigError> {
        let config = Config::read(s)?;
        let kafka = &config.kafka;
        // librdkafka refuses a consumer whose session outlives its poll interval.
        if kafka.max_poll_interval < kafka.session_timeout {
            return Err(s.out_of_order(
                ("ETL_KAFKA_MAX_POLL_INTERVAL_MS", kafka.max_poll_interval),
                "less than",
                ("ETL_KAFKA_SESSION_TIMEOUT_MS", kafka.session_timeout),
                "",
            ));
        }
        Ok(config)
    }

    fn read(s: &Settings) -> Result<Config, ConfigError> {
        let brokers = s.string("ETL_KAFKA_BROKERS", "127.0.0.1:9092");
        let valid_broker = |b: &str| match b.trim().rsplit_once(':') {
            Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
            None => false,
        };
        if !brokers.split(',').all(valid_broker) {
            let why = format!("{brokers:?} is not a comma-separated list of host:port");
            return Err(s.invalid("ETL_KAFKA_BROKERS", why));
        }
        Ok(Config {
            kafka: KafkaConfig {
                brokers,
                group_id: s.string("ETL_KAFKA_GROUP_ID", "etl-processor"),
                topic_prefix: s.string("ETL_TOPIC_PREFIX", "online_store"),
                session_timeout: s.millis(
                    "ETL_KAFKA_SESSION_TIMEOUT_MS",
                    10_000,
                    // Brokers refuse less (group.min.session.timeout.ms).
                    6_000,
                    300_000,
                )?,
                batch_max_records: s.parsed("ETL_BATCH_MAX_RECORDS", 5_000, at_least(1))?,
                max_inflight_records: s.parsed("ETL_MAX_INFLIGHT_RECORDS", 20_000, at_least(1))?,
                commit_interval: s.millis("ETL_COMMIT_INTERVAL_MS", 0, 0, 60_000)?,
                prefetch_kbytes: s.parsed("ETL_KAFKA_PREFETCH_KBYTES", 8_192, prefetch_kbytes)?,
                max_poll_interval: s.millis(
                    "ETL_KAFKA_MAX_POLL_INTERVAL_MS",
                    300_000,
                    10_000,
                    86_400_000,
                )?,
            },
            clickhouse: ClickHouseConfig {
                url: s.url(
                    "ETL_CLICKHOUSE_URL",
                    "http://127.0.0.1:8123",
                    &["http", "https"],
                )?,
                database: s.string("ETL_CLICKHOUSE_DATABASE", "analytics"),
                user: s.optional("ETL_CLICKHOUSE_USER"),
                password: s.optional("ETL_CLICKHOUSE_PASSWORD"),
                validation: s.parsed("ETL_CLICKHOUSE_VALIDATION", Validation::Auto, |_| Ok(()))?,
            },
            flush: flush_config(s)?,
            supervision: SupervisionConfig {
                partition: s.policy("ETL_RESTART_PARTITION", ActorKind::Partition)?,
                aggregator: s.policy("ETL_RESTART_AGGREGATOR", ActorKind::Aggregator)?,
                sink: s.policy("ETL_RESTART_SINK", ActorKind::Sink)?,
            },
            faults: FaultConfig::from_settings(s)?,
            dead_letter_topic: s.string(
                "ETL_DEAD_LETTER_TOPIC",
                &format!(
                    "{}.dead_letter",
                    s.string("ETL_TOPIC_PREFIX", "online_store")
                ),
            ),
            decode_threads: s.parsed("ETL_DECODE_THREADS", default_decode_threads(), |&n| {
                if (1..=256).contains(&n) {
                    Ok(())
                } else {
                    Err("must be between 1 and 256".into())
                }
            })?,
            shutdown_timeout: s.millis("ETL_SHUTDOWN_TIMEOUT_MS", 30_000, 1_000, 600_000)?,
            on_started_over: s.parsed("ETL_ON_SOURCE_STARTED_OVER", OnStartedOver::Stop, |_| {
                Ok(())
            })?,
            rebuild_snapshot_wait: s.millis(
                "ETL_REBUILD_SNAPSHOT_WAIT_MS",
                600_000,
                0,
                86_400_000,
            )?,
            log: s.string("ETL_LOG", "info"),
            telemetry: TelemetryConfig {
                metrics_addr: match s.string("ETL_METRICS_ADDR", "127.0.0.1:9464").as_str() {
                    "off" => None,
                    _ => Some(s.parsed(
                        "ETL_METRICS_ADDR",
                        ([127, 0, 0, 1], 9464).into(),
                        |_| Ok(()),
                    )?),
                },
                otel_endpoint: match s.optional("ETL_OTEL_ENDPOINT") {
                    Some(_) => Some(s.url("ETL_OTEL_ENDPOINT", "", &["http", "https"])?),
                    None => None,
                },
                sample_ratio: s.parsed("ETL_OTEL_SAMPLE_RATIO", 1.0, |r: &f64| valid_rate(*r))?,
            },
            postgres_url: match s.optional("ETL_POSTGRES_URL") {
                Some(_) => Some(s.url("ETL_POSTGRES_URL", "", &["postgres", "postgresql"])?),
                None => None,
            },
        })
    }

    /// For `reconcile`, which cannot work without Postgres.
    pub fn require_postgres(&self) -> Result<&str, ConfigError> {
        self.postgres_url.as_deref().ok_or_else(|| ConfigError::Missing {
            name: "ETL_POSTGRES_URL".into(),
            why: "reconcile reads the source tables (e.g. postgres://user@host:5432/online_store)".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(env: &[(&str, &str)], file: Option<&str>) -> Result<Config, ConfigError> {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let file = file.map(|t| ("etl.toml".to_string(), t.to_string()));
        Config::from_settings(&Settings::from_sources(env, file)?)
    }

    #[test]
    fn defaults_need_no_settings() {
        let c = config(&[], None).unwrap();
        assert_eq!(c.flush.interval, Duration::from_secs(1));
        assert_eq!(c.kafka.topic_prefix, "online_store");
        assert_eq!(c.clickhouse.validation, Validation::Auto);
        assert_eq!(
            c.telemetry.metrics_addr,
            Some(([127, 0, 0, 1], 9464).into())
        );
        assert_eq!(c.telemetry.otel_endpoint, None);
    }

    #[test]
    fn telemetry_settings() {
        let c = config(
            &[
                ("ETL_METRICS_ADDR", "0.0.0.0:0"),
                ("ETL_OTEL_ENDPOINT", "http://collector:4318"),
                ("ETL_OTEL_SAMPLE_RATIO", "0.25"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(c.telemetry.metrics_addr, Some(([0, 0, 0, 0], 0).into()));
        assert_eq!(
            c.telemetry.otel_endpoint.as_deref(),
            Some("http://collector:4318")
        );
        assert_eq!(c.telemetry.sample_ratio, 0.25);
        let off = config(&[("ETL_METRICS_ADDR", "off")], None).unwrap();
        assert_eq!(off.telemetry.metrics_addr, None);
        for (name, value) in [
            ("ETL_METRICS_ADDR", "localhost"),
            ("ETL_OTEL_ENDPOINT", "collector:4318"),
            ("ETL_OTEL_SAMPLE_RATIO", "2"),
        ] {
            let err = config(&[(name, value)], None).unwrap_err().to_string();
            assert!(err.starts_with(&format!("setting {name}")), "{err}");
        }
    }

    #[test]
    fn the_source_started_over_policy_stops_unless_told_to_rebuild() {
        let c = config(&[], None).unwrap();
        assert_eq!(c.on_started_over, OnStartedOver::Stop);
        assert_eq!(c.rebuild_snapshot_wait, Duration::from_secs(600));
        let c = config(&[("ETL_ON_SOURCE_STARTED_OVER", "Rebuild")], None).unwrap();
        assert_eq!(c.on_started_over, OnStartedOver::Rebuild);
        let err = config(&[("ETL_ON_SOURCE_STARTED_OVER", "restart")], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "setting ETL_ON_SOURCE_STARTED_OVER (from the environment): \"restart\""
            ) && err.ends_with("expected stop or rebuild"),
            "{err}"
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = config(
            &[("ETL_FLUSH_INTERVAL_MS", "250")],
            Some("flush_interval_ms = 500\nclickhouse_database = \"stats\""),
        )
        .unwrap();
        assert_eq!(c.flush.interval, Duration::from_millis(250));
        assert_eq!(c.clickhouse.database, "stats");
    }

    #[test]
    fn bad_values_name_the_setting_and_the_reason() {
        let err = config(&[("ETL_FLUSH_INTERVAL_MS", "soon")], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("setting ETL_FLUSH_INTERVAL_MS (from the environment): \"soon\""),
            "{err}"
        );
        let err = config(&[], Some("flush_interval_ms = 0"))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "setting ETL_FLUSH_INTERVAL_MS (from etl.toml): \"0\": must be between 10 and 60000 milliseconds");
        let err = config(&[("ETL_DECODE_THREADS", "0")], None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "setting ETL_DECODE_THREADS (from the environment): \"0\": must be between 1 and 256"
        );
        let err = config(&[("ETL_KAFKA_BROKERS", "localhost")], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ETL_KAFKA_BROKERS") && err.contains("host:port"),
            "{err}"
        );
        let err = config(&[("ETL_CLICKHOUSE_URL", "127.0.0.1:8123")], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ETL_CLICKHOUSE_URL") && err.contains("http"),
            "{err}"
        );
        let err = config(&[("ETL_KAFKA_PREFETCH_KBYTES", "0")], None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "setting ETL_KAFKA_PREFETCH_KBYTES (from the environment): \"0\": must be between 1 and 2097151 (KiB)"
        );
        let prefetch = config(&[("ETL_KAFKA_PREFETCH_KBYTES", "4096")], None).unwrap();
        assert_eq!(prefetch.kafka.prefetch_kbytes, 4096);
        let err = config(&[("ETL_KAFKA_BROKERS", ":9092")], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ETL_KAFKA_BROKERS"), "{err}");
        let err = config(&[("ETL_FLUSH_INTERVL_MS", "5")], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("setting ETL_FLUSH_INTERVL_MS (from the environment): unknown setting"),
            "{err}"
        );
        let err = config(&[], Some("config_file = \"other.toml\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown setting \"config_file\""), "{err}");
        let err = config(&[], Some("flush_intervl_ms = 5"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown setting \"flush_intervl_ms\""),
            "{err}"
        );
    }

    #[test]
    fn the_minimum_flush_interval_fits_under_the_timer() {
        let c = config(&[], None).unwrap();
        assert_eq!(c.flush.min_interval, Duration::from_millis(200));
        let c = config(&[("ETL_FLUSH_MIN_INTERVAL_MS", "0")], None).unwrap();
        assert_eq!(c.flush.min_interval, Duration::ZERO);
        let c = config(&[("ETL_FLUSH_INTERVAL_MS", "100")], None).unwrap();
        assert_eq!(c.flush.min_interval, Duration::from_millis(100));
        let err = config(
            &[
                ("ETL_FLUSH_INTERVAL_MS", "500"),
                ("ETL_FLUSH_MIN_INTERVAL_MS", "800"),
            ],
            None,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "setting ETL_FLUSH_MIN_INTERVAL_MS (from the environment): 800 ms is more than \
             ETL_FLUSH_INTERVAL_MS (500 ms), which writes at least that often"
        );
    }

    #[test]
    fn the_poll_interval_outlasts_the_session_and_gives_releases_half() {
        let c = config(&[], None).unwrap();
        assert_eq!(c.kafka.max_poll_interval, Duration::from_secs(300));
        assert_eq!(c.kafka.rebalance_deadline(), Duration::from_secs(150));
        let err = config(
            &[
                ("ETL_KAFKA_MAX_POLL_INTERVAL_MS", "10000"),
                ("ETL_KAFKA_SESSION_TIMEOUT_MS", "20000"),
            ],
            None,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "setting ETL_KAFKA_MAX_POLL_INTERVAL_MS (from the environment): 10000 ms is less than \
             ETL_KAFKA_SESSION_TIMEOUT_MS (20000 ms)"
        );
    }

    #[test]
    fn restart_policies_are_per_actor_kind() {
        let c = config(&[("ETL_RESTART_AGGREGATOR", "transient max=2")], None).unwrap();
        let aggregator = RestartPolicy::parse(
            "transient max=2",
            &RestartPolicy::default_for(ActorKind::Aggregator),
        );
        assert_eq!(c.supervision.aggregator, aggregator.unwrap());
        assert_eq!(
            c.supervision.partition,
            RestartPolicy::default_for(ActorKind::Partition)
        );
        assert!(!c.faults.any());
        assert_eq!(c.dead_letter_topic, "online_store.dead_letter");

        let err = config(&[("ETL_RESTART_SINK", "forever")], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("setting ETL_RESTART_SINK (from the environment): \"forever\": \"forever\": unknown part"),
            "{err}"
        );
    }

    #[cfg(feature = "faults")]
    #[test]
    fn faults_are_per_actor_kind() {
        let c = config(&[("ETL_FAULT_PANIC", "partition=0.5 sink=1")], None).unwrap();
        assert_eq!(c.faults.panic_rate(ActorKind::Partition), 0.5);
        assert_eq!(c.faults.panic_rate(ActorKind::Aggregator), 0.0);
        assert_eq!(c.faults.panic_rate(ActorKind::Sink), 1.0);
        assert!(c.faults.any());
        assert!(!config(&[], None).unwrap().faults.any());

        let err = config(&[("ETL_FAULT_PANIC", "decoder=0.1")], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "setting ETL_FAULT_PANIC (from the environment): \"decoder=0.1\" is not KIND=RATE"
            ),
            "{err}"
        );
        let err = config(&[("ETL_FAULT_PANIC", "sink=2")], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("between 0 and 1"), "{err}");
    }

    #[cfg(not(feature = "faults"))]
    #[test]
    fn a_build_without_fault_injection_refuses_every_fault_setting() {
        for name in crate::faults::SETTINGS {
            let err = config(&[(name, "true")], None).unwrap_err().to_string();
            assert_eq!(
                err,
                format!(
                    "setting {name} (from the environment): this build has no fault injection: \
                     it is for the fault tests' builds (cargo feature `faults`)"
                )
            );
        }
    }

    #[test]
    fn reconcile_requires_postgres() {
        let err = config(&[], None)
            .unwrap()
            .require_postgres()
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("setting ETL_POSTGRES_URL is required"),
            "{err}"
        );
    }
}
