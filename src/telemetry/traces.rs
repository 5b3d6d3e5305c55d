//! Logs and traces. Logs go to stderr through `tracing`; when an OTLP
//! endpoint is set, the spans of the `etl` crate also go there, as one trace
//! per batch: `process batch` (the source hands a partition's records on)
//! -> `decode` (partition actor) -> `aggregate` (aggregator actor); each
//! `flush` span links the batches whose changes it made durable, and its
//! `insert` child is the sink actor's write. A batch whose first record
//! carries a W3C `traceparent` header continues that trace; the trace
//! contexts of its other records become links.

use std::process::ExitCode;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{Config, TelemetryConfig};
use crate::source::RecordBatch;

/// The most links a span carries (a flush after a long outage may cover
/// thousands of batches).
pub const MAX_LINKS: usize = 128;

/// Keeps the trace exporter alive; `shutdown` sends what is buffered.
pub struct Tracing {
    /// The binary's name, for its messages and as the traces' service.
    program: &'static str,
    provider: Option<SdkTracerProvider>,
}

impl Tracing {
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("{}: sending the last spans failed: {e}", self.program);
            }
        }
    }

    /// What every binary does last: a command's error is logged and printed
    /// (exit code 1), and the last spans are sent.
    pub fn finish(self, result: anyhow::Result<ExitCode>) -> ExitCode {
        let code = result.unwrap_or_else(|e| {
            tracing::error!("{e:#}");
            eprintln!("{}: {e:#}", self.program);
            ExitCode::FAILURE
        });
        self.shutdown();
        code
    }
}

/// What every binary of the project does first: reads the configuration
/// and installs logs and traces. On a bad setting it prints which one and
/// why, prefixed with `program`, and returns the exit code for it (2).
pub fn configure(program: &'static str) -> Result<(Config, Tracing), ExitCode> {
    let bad_setting = |message: String| {
        eprintln!("{program}: {message}");
        ExitCode::from(2)
    };
    let config = Config::from_process().map_err(|e| bad_setting(e.to_string()))?;
    let filter = EnvFilter::try_new(&config.log).map_err(|e| {
        bad_setting(format!(
            "setting ETL_LOG: {:?} is not a log filter: {e}",
            config.log
        ))
    })?;
    let tracing = init(program, filter, &config.telemetry).map_err(|e| {
        bad_setting(format!(
            "setting ETL_OTEL_ENDPOINT: cannot export traces: {e:#}"
        ))
    })?;
    Ok((config, tracing))
}

/// Installs the global subscriber: `log` filters what reaches stderr; the
/// crate's spans go to the OTLP endpoint, if one is set, whatever `log`
/// says, as those of service `program`.
fn init(
    program: &'static str,
    log: EnvFilter,
    config: &TelemetryConfig,
) -> anyhow::Result<Tracing> {
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(log);
    let Some(endpoint) = &config.otel_endpoint else {
        tracing_subscriber::registry().with(stderr).init();
        return Ok(Tracing {
            program,
            provider: None,
        });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .with_timeout(std::time::Duration::from_secs(5))
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(Resource::builder().with_service_name(program).build())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("etl"))
        .with_filter(Targets::new().with_target("etl", tracing::Level::INFO));
    tracing_subscriber::registry()
        .with(stderr)
        .with(spans)
        .init();
    Ok(Tracing {
        program,
        provider: Some(provider),
    })
}

/// The W3C trace context headers of one Kafka record.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceHeaders {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

impl TraceHeaders {
    /// From a record's headers; None when it has no `traceparent`.
    pub fn from_kafka<H: rdkafka::message::Headers>(headers: &H) -> Option<TraceHeaders> {
        let mut found = None;
        let mut state = None;
        for h in headers.iter() {
            let value = || h.value.and_then(|v| std::str::from_utf8(v).ok());
            if h.key.eq_ignore_ascii_case("traceparent") {
                found = value().map(str::to_owned);
            } else if h.key.eq_ignore_ascii_case("tracestate") {
                state = value().map(str::to_owned);
            }
        }
        Some(TraceHeaders {
            traceparent: found?,
            tracestate: state,
        })
    }

    fn span_context(&self) -> SpanContext {
        let cx = TraceContextPropagator::new().extract(self);
        cx.span().span_context().clone()
    }
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(&self.traceparent),
            "tracestate" => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// The root span of a batch, with the OpenTelemetry messaging attributes.
pub fn batch_span(batch: &RecordBatch, group: &str) -> Span {
    let (first, last) = match (batch.records.first(), batch.records.last()) {
        (Some(f), Some(l)) => (f.offset, l.offset),
        _ => (-1, -1),
    };
    let span = tracing::info_span!(
        "process batch",
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = &*batch.topic,
        messaging.destination.partition.id = batch.partition.to_string(),
        messaging.consumer.group.name = group,
        messaging.batch.message_count = batch.records.len(),
        messaging.kafka.offset = first,
        etl.offset.last = last,
    );
    let mut contexts = batch
        .records
        .iter()
        .filter_map(|r| r.trace.as_ref())
        .map(TraceHeaders::span_context)
        .filter(SpanContext::is_valid);
    if let Some(parent) = contexts.next() {
        let cx = opentelemetry::Context::new().with_remote_span_context(parent);
        let _ = span.set_parent(cx);
        for linked in contexts.take(MAX_LINKS) {
            span.add_link(linked);
        }
    }
    span
}

/// The OpenTelemetry identity of `span`, to link to; None if it is not
/// exported (no endpoint, or not sampled).
pub fn link_to(span: &Span) -> Option<SpanContext> {
    let context = span.context().span().span_context().clone();
    (context.is_valid() && context.is_sampled()).then_some(context)
}
