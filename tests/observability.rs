//! The processor's metrics, health endpoints and traces on the real stack:
//! after a workload, /metrics counts exactly the events and dead letters in
//! the topics, every metric the Pipeline dashboard uses is there, the
//! stack's Prometheus scrapes it for real, and an OTLP receiver inside the
//! test receives the span tree of batches (a trace started upstream, in a
//! Kafka `traceparent` header, is continued).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use etl::cdc::{self, Decoded, Table};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

use etl_testkit::eventually;
use etl_testkit::pipeline::{wait, Run, PARTITIONS, TABLES};

// ----------------------------------------------------------- OTLP receiver --

/// An OTLP/HTTP trace receiver (what a collector does): keeps every span.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/v1/traces", post(receive))
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver {
            url: format!("http://{addr}"),
            spans,
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

async fn receive(State(spans): State<Arc<Mutex<Vec<Span>>>>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf request");
    let mut all = spans.lock().unwrap();
    for resource in request.resource_spans {
        for scope in resource.scope_spans {
            all.extend(scope.spans);
        }
    }
    Vec::new() // an empty ExportTraceServiceResponse
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|a| a.key == key)?;
    Some(match value.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

// ------------------------------------------------------------- /metrics --

/// `name{labels}` -> value, from the Prometheus text format.
type Samples = BTreeMap<String, f64>;

fn parse_metrics(text: &str) -> Samples {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

/// The labels of a series, without the exporter's scope label.
fn labels(series: &str) -> (String, BTreeMap<String, String>) {
    let (name, rest) = series.split_once('{').unwrap_or((series, "}"));
    let labels = rest
        .trim_end_matches('}')
        .split("\",")
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once("=\"")?;
            Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
        })
        .filter(|(k, _)| k != "otel_scope_name")
        .collect();
    (name.to_owned(), labels)
}

/// Sum of the samples of `name` whose labels include `with`.
fn sum(samples: &Samples, name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let (n, l) = labels(series);
            n == name
                && with
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// What /metrics must count after reading the topics: events by (table, op
/// label) and dead letters by reason, by decoding every record here.
fn expected_counts(run: &Run) -> (BTreeMap<(String, String), u64>, BTreeMap<String, u64>) {
    let mut events = BTreeMap::new();
    let mut dead_letters = BTreeMap::new();
    for name in TABLES {
        let table = Table::ALL.into_iter().find(|t| t.name() == name).unwrap();
        for record in run.read_topic(&run.table_topic(name), PARTITIONS) {
            let op = match cdc::decode(table, record.value.as_deref()) {
                Ok(Decoded::Change(change, _)) => change.op().label(),
                Ok(Decoded::Truncate) => "truncate",
                Ok(Decoded::Tombstone) => continue,
                Err(e) => {
                    *dead_letters.entry(e.kind.as_str().to_owned()).or_insert(0) += 1;
                    continue;
                }
            };
            *events.entry((name.to_owned(), op.to_owned())).or_insert(0) += 1;
        }
    }
    (events, dead_letters)
}

/// The metric names a dashboard mentions.
fn dashboard_metrics(file: &str) -> Vec<String> {
    let path = etl_testkit::repo_root().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("etl_"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

// ---------------------------------------------------------------- tests --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real stack: run scripts/test"]
async fn metrics_health_and_traces_of_a_workload() {
    let test_started = Instant::now();
    let receiver = Receiver::start().await;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let seed = now.as_secs() % 40_000 * 2 + 1;
    eprintln!("seed {seed}");
    let mut run = Run::new("observability").await;
    run.set("ETL_OTEL_ENDPOINT", &receiver.url)
        .set("ETL_FLUSH_INTERVAL_MS", 500)
        // The SDK's batch span processor: export every 200 ms, not every 5 s.
        .set("OTEL_BSP_SCHEDULE_DELAY", 200);
    let mut processor = run.start_processor();
    let base = run.metrics_base_url(1).await;
    assert_eq!(get(&format!("{base}/health/live")).await.0, 200);

    let mut workload = run.start_workload(seed, "--size small");
    wait(&mut workload, "small workload");
    run.caught_up("after the workload").await;

    // --- /metrics counts exactly what is in the topics.
    let (events, dead_letters) = expected_counts(&run);
    let total_events: u64 = events.values().sum();
    assert!(
        total_events > 200,
        "too few events to mean anything: {events:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let partitions: Vec<(String, i32)> = TABLES
        .iter()
        .flat_map(|t| (0..PARTITIONS).map(|p| (run.table_topic(t), p)))
        .collect();
    let samples = loop {
        let samples = parse_metrics(&get(&format!("{base}/metrics")).await.1);
        let miscounted: Vec<String> = events
            .iter()
            .filter_map(|((table, op), n)| {
                let counted = sum(
                    &samples,
                    "etl_events_total",
                    &[("table", table), ("op", op)],
                );
                (counted != *n as f64)
                    .then(|| format!("{table}/{op}: {counted} counted, {n} in the topics"))
            })
            .collect();
        let lagging: Vec<String> = partitions
            .iter()
            .filter(|(topic, p)| {
                let with = [("topic", topic.as_str()), ("partition", &*p.to_string())];
                let present = samples.keys().any(|s| {
                    let (n, l) = labels(s);
                    n == "etl_consumer_lag_messages"
                        && with
                            .iter()
                            .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
                });
                !present || sum(&samples, "etl_consumer_lag_messages", &with) != 0.0
            })
            .map(|(topic, p)| format!("{topic}/{p}"))
            .collect();
        if miscounted.is_empty() && lagging.is_empty() {
            break samples;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics after 60 s: events {miscounted:?}; lag not 0 (or missing) for {lagging:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let counted_total = sum(&samples, "etl_events_total", &[]);
    assert_eq!(
        counted_total, total_events as f64,
        "etl_events_total counts an event the topics do not hold: {events:?}"
    );
    for reason in etl::cdc::DecodeErrorKind::ALL.map(|k| k.as_str()) {
        let expected = dead_letters.get(reason).copied().unwrap_or(0) as f64;
        assert_eq!(
            sum(&samples, "etl_dead_letters_total", &[("reason", reason)]),
            expected,
            "dead letters of reason {reason}"
        );
    }
    for kind in ["partition", "aggregator", "sink"] {
        assert_eq!(
            sum(&samples, "etl_actor_restarts_total", &[("kind", kind)]),
            0.0,
            "no {kind} restarted in this run"
        );
    }
    for aggregate in etl::registry::names() {
        let with = [("aggregate", aggregate)];
        assert!(
            sum(&samples, "etl_rows_flushed_total", &with) > 0.0,
            "{aggregate} rows flushed"
        );
        assert!(
            sum(&samples, "etl_flush_duration_seconds_count", &with) > 0.0,
            "{aggregate} flush latency"
        );
        let mailbox = [("actor", &*format!("aggregator {aggregate}"))];
        assert!(
            samples
                .keys()
                .any(|s| s.starts_with("etl_mailbox_depth_messages")
                    && labels(s).1.get("actor").map(String::as_str) == Some(mailbox[0].1)),
            "mailbox depth of the {aggregate} aggregator"
        );
    }
    assert!(sum(&samples, "etl_batch_size_records_count", &[]) > 0.0);
    assert!(
        sum(&samples, "etl_batch_size_records_sum", &[]) >= total_events as f64,
        "batches hold every event (and the tombstones)"
    );
    // The newest applied events were committed in Postgres during this test.
    for table in TABLES {
        let age = sum(&samples, "etl_freshness_seconds", &[("table", table)]);
        assert!(
            age > 0.0 && age <= test_started.elapsed().as_secs_f64(),
            "freshness of {table}: {age} s, test running for {:?}",
            test_started.elapsed()
        );
    }
    let (status, body) = get(&format!("{base}/health/ready")).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ready"}"#));

    // --- Every metric the Pipeline dashboard uses is on /metrics.
    let series_names: Vec<String> = samples.keys().map(|s| labels(s).0).collect();
    let dashboard = dashboard_metrics("grafana/provisioning/dashboards/pipeline.json");
    assert!(
        dashboard.len() >= 6,
        "the Pipeline dashboard uses {dashboard:?}"
    );
    for metric in &dashboard {
        // A histogram is exported as its _bucket, _sum and _count series.
        let exported = |n: &String| {
            n == metric
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|x| *n == format!("{metric}{x}"))
        };
        assert!(
            series_names.iter().any(exported),
            "the Pipeline dashboard uses {metric}, which /metrics does not have"
        );
    }

    // --- The stack's Prometheus scrapes the processor for real.
    let prometheus = run.stack.get("PROMETHEUS_URL").to_owned();
    let targets = std::path::PathBuf::from(run.stack.get("PROMETHEUS_TARGETS"))
        .join(format!("{}.json", run.database));
    let address = base.trim_start_matches("http://");
    std::fs::write(
        &targets,
        format!(
            r#"[{{"targets": ["{address}"], "labels": {{"run": "{}"}}}}]"#,
            run.database
        ),
    )
    .unwrap();
    let query = format!("sum(etl_events_total{{run=\"{}\"}})", run.database);
    let scraped = eventually(
        "Prometheus to scrape the processor's event count",
        Duration::from_secs(60),
        || async {
            let response = reqwest::Client::new()
                .get(format!("{prometheus}/api/v1/query"))
                .query(&[("query", &query)])
                .send()
                .await
                .ok()?;
            let body: serde_json::Value = response.json().await.ok()?;
            let value = body["data"]["result"][0]["value"][1].as_str()?;
            let value: f64 = value.parse().ok()?;
            (value == total_events as f64).then_some(value)
        },
    )
    .await;
    std::fs::remove_file(&targets).unwrap();
    eprintln!("Prometheus scraped {scraped} events, as /metrics counts");

    // --- Traces: the span tree of a batch of the orders topic.
    let orders_topic = run.table_topic("orders");
    let spans = eventually(
        "the span tree of a batch",
        Duration::from_secs(30),
        || async {
            let spans = receiver.spans();
            let tree = spans.iter().find(|batch| {
                batch.name == "process batch"
                    && attribute(batch, "messaging.destination.name").as_deref()
                        == Some(&*orders_topic)
                    && ["decode", "aggregate"].iter().all(|child| {
                        spans.iter().any(|s| {
                            s.name == *child
                                && s.trace_id == batch.trace_id
                                && s.parent_span_id == batch.span_id
                        })
                    })
            });
            let linked = tree.is_some_and(|batch| {
                spans.iter().any(|flush| {
                    flush.name == "flush"
                        && flush.links.iter().any(|l| l.span_id == batch.span_id)
                        && spans
                            .iter()
                            .any(|s| s.name == "insert" && s.parent_span_id == flush.span_id)
                })
            });
            linked.then_some(spans)
        },
    )
    .await;
    let batch = spans
        .iter()
        .find(|s| {
            s.name == "process batch"
                && attribute(s, "messaging.destination.name").as_deref() == Some(&*orders_topic)
        })
        .unwrap();
    assert_eq!(
        attribute(batch, "messaging.system").as_deref(),
        Some("kafka")
    );
    assert_eq!(
        attribute(batch, "messaging.consumer.group.name").as_deref(),
        Some(&*run.group)
    );
    let partition: i32 = attribute(batch, "messaging.destination.partition.id")
        .unwrap()
        .parse()
        .unwrap();
    assert!((0..PARTITIONS).contains(&partition));
    let first: i64 = attribute(batch, "messaging.kafka.offset")
        .unwrap()
        .parse()
        .unwrap();
    let last: i64 = attribute(batch, "etl.offset.last")
        .unwrap()
        .parse()
        .unwrap();
    let count: i64 = attribute(batch, "messaging.batch.message_count")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(last - first + 1, count, "a batch is consecutive offsets");
    assert_eq!(batch.kind, 5, "SPAN_KIND_CONSUMER");
    eprintln!(
        "{} spans received; e.g. a batch of {count} records at {orders_topic}/{partition}@{first}",
        spans.len()
    );
    processor.terminate();

    // --- A trace started upstream continues through the batch.
    trace_context_from_kafka_headers(&receiver).await;
}

/// A record with a W3C `traceparent` header: its batch span is a child of
/// that remote span, in the same trace.
async fn trace_context_from_kafka_headers(receiver: &Receiver) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let mut run = Run::new("traceparent").await;
    // Topics of its own: nothing else reads or writes them.
    let prefix = run.database.clone();
    let topic = format!("{prefix}.public.customers");
    run.create_topic(&topic, 1);
    run.set("ETL_TOPIC_PREFIX", &prefix)
        .set("ETL_OTEL_ENDPOINT", &receiver.url)
        .set("ETL_OTEL_SAMPLE_RATIO", 0) // only traces started upstream are kept
        .set("OTEL_BSP_SCHEDULE_DELAY", 200);
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", run.stack.get("ETL_KAFKA_BROKERS"))
        .create()
        .unwrap();
    let value = r#"{"before":null,"after":{"id":7,"email":"t@example.test","full_name":"T","created_at":"2024-03-01T08:00:00Z"},"source":{"ts_ms":1709280000000},"op":"c"}"#;
    let traceparent = format!("00-{trace_id}-{parent_id}-01");
    let headers = OwnedHeaders::new().insert(Header {
        key: "traceparent",
        value: Some(&traceparent),
    });
    producer
        .send(
            FutureRecord::to(&topic)
                .key("7")
                .payload(value)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let mut processor = run.start_processor();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let batch = eventually(
        "the batch span of the traced record",
        Duration::from_secs(60),
        || async {
            receiver.spans().into_iter().find(|s| {
                s.name == "process batch"
                    && attribute(s, "messaging.destination.name").as_deref() == Some(&*topic)
            })
        },
    )
    .await;
    assert_eq!(
        hex(&batch.trace_id),
        trace_id,
        "the batch continues the upstream trace"
    );
    assert_eq!(hex(&batch.parent_span_id), parent_id);
    // Sampling is 0 for new traces: the upstream decision (sampled) is kept,
    // and only that trace's batches were exported from this processor.
    eventually(
        "the decode and aggregate spans of the traced batch",
        Duration::from_secs(30),
        || async {
            let spans = receiver.spans();
            ["decode", "aggregate"]
                .iter()
                .all(|n| {
                    spans
                        .iter()
                        .any(|s| s.name == *n && s.parent_span_id == batch.span_id)
                })
                .then_some(())
        },
    )
    .await;
    processor.terminate();
}

/// The repo's prometheus.yml (the compose stack's) is a valid config.
#[test]
fn promtool_accepts_the_prometheus_config() {
    let config = etl_testkit::repo_root().join("prometheus.yml");
    let out = Command::new("promtool")
        .args(["check", "config", "--syntax-only"])
        .arg(&config)
        .output()
        .expect("promtool runs (scripts/install installs it)");
    assert!(
        out.status.success(),
        "promtool check config {}:\n{}{}",
        config.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_metrics_parser_reads_labels() {
    let samples = parse_metrics(
        "# HELP x\netl_events_total{op=\"insert\",table=\"orders\",otel_scope_name=\"etl\"} 3\netl_events_total{op=\"update\",table=\"orders\",otel_scope_name=\"etl\"} 4\n",
    );
    assert_eq!(sum(&samples, "etl_events_total", &[]), 7.0);
    assert_eq!(sum(&samples, "etl_events_total", &[("op", "update")]), 4.0);
}
