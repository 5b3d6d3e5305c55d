//! The metrics, as OpenTelemetry instruments exported in the Prometheus text
//! format (served at /metrics by `http`).
//!
//! Counters and gauges are observed from `telemetry::counters()` at each
//! scrape, so the hot path only bumps atomics; the two histograms (batch
//! size, flush latency) are recorded where they happen. Names follow the
//! Prometheus conventions after the exporter's suffixes: a counter `x`
//! becomes `x_total`, a unit `s` appends `_seconds`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::metrics::{Histogram, Meter, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::Resource;
use prometheus::{Encoder, Registry, TextEncoder};

use super::{counters, Counters};

/// The instruments recorded on the data path; unset until `install`.
struct Recorders {
    batch_size: Histogram<u64>,
    flush_duration: Histogram<f64>,
}

static RECORDERS: OnceLock<Recorders> = OnceLock::new();

/// Owns the meter provider; `render` writes the current metrics.
pub struct Metrics {
    registry: Registry,
    _provider: SdkMeterProvider,
}

impl Metrics {
    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// Sets up the exporter and every instrument. Call once, at start-up.
pub fn install() -> anyhow::Result<Metrics> {
    let registry = Registry::new();
    let exporter = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .build()?;
    let provider = SdkMeterProvider::builder()
        .with_reader(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name("etl-processor")
                .build(),
        )
        .build();
    let meter = provider.meter("etl");
    // Counters whose labels are known up front start at 0, so a dashboard
    // shows "none yet" rather than "no data".
    let c = counters();
    for kind in crate::cdc::DecodeErrorKind::ALL {
        c.dead_letters.entry(kind.as_str()).or_default();
    }
    for kind in crate::restart::ActorKind::ALL {
        c.restarts.entry(kind).or_default();
    }
    observe_counters(&meter);
    observe_gauges(&meter);
    let recorders = Recorders {
        batch_size: meter
            .u64_histogram("etl_batch_size_records")
            .with_unit("{record}")
            .with_description("Records per batch handed to a partition actor")
            .with_boundaries(vec![
                1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
            ])
            .build(),
        flush_duration: meter
            .f64_histogram("etl_flush_duration")
            .with_unit("s")
            .with_description(
                "Time to write an aggregate's dirty rows to ClickHouse, retries included",
            )
            .with_boundaries(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ])
            .build(),
    };
    if RECORDERS.set(recorders).is_err() {
        anyhow::bail!("metrics are already installed");
    }
    Ok(Metrics {
        registry,
        _provider: provider,
    })
}

pub fn record_batch(records: usize) {
    if let Some(r) = RECORDERS.get() {
        r.batch_size.record(records as u64, &[]);
    }
}

pub fn record_flush(aggregate: &'static str, took: Duration) {
    if let Some(r) = RECORDERS.get() {
        r.flush_duration
            .record(took.as_secs_f64(), &[KeyValue::new("aggregate", aggregate)]);
    }
}

/// A monotonic counter observed from a map of atomics: `labels` turns a key
/// into its label set.
macro_rules! counter_from_map {
    ($meter:expr, $name:literal, $help:literal, $field:ident, $labels:expr) => {
        $meter
            .u64_observable_counter($name)
            .with_description($help)
            .with_callback(|observer| {
                for e in counters().$field.iter() {
                    let labels: Vec<KeyValue> = $labels(e.key());
                    observer.observe(e.value().load(Ordering::Relaxed), &labels);
                }
            })
            .build()
    };
}

fn observe_counters(meter: &Meter) {
    counter_from_map!(
        meter,
        "etl_events",
        "Change events decoded, by source table and operation",
        events,
        |(table, op): &(crate::cdc::Table, &'static str)| vec![
            KeyValue::new("table", table.name()),
            KeyValue::new("op", *op)
        ]
    );
    counter_from_map!(
        meter,
        "etl_rows_flushed",
        "Aggregate rows written to ClickHouse",
        rows_flushed,
        |aggregate: &&'static str| vec![KeyValue::new("aggregate", *aggregate)]
    );
    counter_from_map!(
        meter,
        "etl_key_reads",
        "Reads of rows by key from ClickHouse, for events that touched keys not held in memory",
        key_reads,
        |aggregate: &&'static str| vec![KeyValue::new("aggregate", *aggregate)]
    );
    counter_from_map!(
        meter,
        "etl_rows_read_back",
        "Aggregate rows read back from ClickHouse by key",
        rows_read_back,
        |aggregate: &&'static str| vec![KeyValue::new("aggregate", *aggregate)]
    );
    counter_from_map!(
        meter,
        "etl_rows_evicted",
        "Written aggregate rows dropped from memory to keep under ETL_STATE_MAX_ROWS",
        rows_evicted,
        |aggregate: &&'static str| vec![KeyValue::new("aggregate", *aggregate)]
    );
    counter_from_map!(
        meter,
        "etl_dead_letters",
        "Events sent to the dead-letter topic, by reason",
        dead_letters,
        |reason: &&'static str| vec![KeyValue::new("reason", *reason)]
    );
    counter_from_map!(
        meter,
        "etl_actor_restarts",
        "Actors restarted by their supervisor, by kind",
        restarts,
        |kind: &crate::restart::ActorKind| vec![KeyValue::new("kind", kind.as_str())]
    );
    counter_from_map!(
        meter,
        "etl_insert_retries",
        "ClickHouse inserts that failed and were retried",
        insert_retries,
        |aggregate: &&'static str| vec![KeyValue::new("aggregate", *aggregate)]
    );
    counter_from_map!(
        meter,
        "etl_rewinds",
        "Partitions replayed from their last commit after an actor restart",
        rewinds,
        |topic: &String| vec![KeyValue::new("topic", topic.clone())]
    );
    counter_from_map!(
        meter,
        "etl_source_repeats_skipped",
        "Events skipped because the source sent them again at new offsets (their position was applied)",
        source_repeats,
        |aggregate: &&'static str| vec![KeyValue::new("aggregate", *aggregate)]
    );
    counter_from_map!(
        meter,
        "etl_new_snapshots",
        "New snapshots of the source that replaced a partition's rows",
        new_snapshots,
        |aggregate: &&'static str| vec![KeyValue::new("aggregate", *aggregate)]
    );
    counter_from_map!(
        meter,
        "etl_replays_skipped",
        "Key updates skipped because their event was already applied",
        replays_skipped,
        |aggregate: &&'static str| vec![KeyValue::new("aggregate", *aggregate)]
    );
    counter_from_atomic(
        meter,
        "etl_consumer_pauses",
        "Times the consumer paused its partitions for backpressure",
        |c| &c.pauses,
    );
    counter_from_atomic(
        meter,
        "etl_partitions_revoked",
        "Partitions whose revoke began (rebalances taking them away)",
        |c| &c.partitions_revoked,
    );
    counter_from_atomic(
        meter,
        "etl_release_deadline_misses",
        "Revokes that missed their release deadline: their partitions were handed over as lost",
        |c| &c.release_deadline_misses,
    );
    counter_from_atomic(
        meter,
        "etl_stale_batches",
        "Batches dropped unapplied, decoded under a lease from before a rewind (or none, after a restart): fetched again from the last commit",
        |c| &c.stale_batches,
    );
}

/// A monotonic counter without labels, observed from one atomic.
fn counter_from_atomic(
    meter: &Meter,
    name: &'static str,
    help: &'static str,
    field: fn(&Counters) -> &AtomicU64,
) {
    meter
        .u64_observable_counter(name)
        .with_description(help)
        .with_callback(move |observer| {
            observer.observe(field(counters()).load(Ordering::Relaxed), &[]);
        })
        .build();
}

fn observe_gauges(meter: &Meter) {
    meter
        .i64_observable_gauge("etl_consumer_lag_messages")
        .with_unit("{message}")
        .with_description(
            "Messages in a partition past the group's committed offset (as of the consumer's last statistics)",
        )
        .with_callback(|observer| {
            let lag = counters()
                .consumer_lag
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            for (topic, partition, messages) in lag {
                observer.observe(
                    messages,
                    &[
                        KeyValue::new("topic", topic),
                        KeyValue::new("partition", i64::from(partition)),
                    ],
                );
            }
        })
        .build();
    meter
        .i64_observable_gauge("etl_mailbox_depth_messages")
        .with_unit("{message}")
        .with_description("Messages waiting in a supervised actor's mailbox")
        .with_callback(|observer| {
            for e in counters().mailboxes.iter() {
                observer.observe(
                    e.value().load(Ordering::Relaxed),
                    &[KeyValue::new("actor", e.key().clone())],
                );
            }
        })
        .build();
    meter
        .i64_observable_gauge("etl_rows_held")
        .with_unit("{row}")
        .with_description("Aggregate rows held in memory, as of the aggregate's last flush")
        .with_callback(|observer| {
            for e in counters().rows_held.iter() {
                observer.observe(
                    e.value().load(Ordering::Relaxed),
                    &[KeyValue::new("aggregate", *e.key())],
                );
            }
        })
        .build();
    meter
        .f64_observable_gauge("etl_freshness")
        .with_unit("s")
        .with_description(
            "Age of the newest event applied, by source table: now minus its commit time in Postgres",
        )
        .with_callback(|observer| {
            for (table, age) in super::freshness() {
                observer.observe(age.as_secs_f64(), &[KeyValue::new("table", table.name())]);
            }
        })
        .build();
}
