//! The dead-letter topic: events the processor cannot use, kept with why.
//!
//! Each dead letter carries the original key and bytes, and headers naming
//! the reason and the source position, so that nothing is dropped silently
//! and a fixed processor (or a person) can take them up again. Delivery is at
//! least once: after a crash an event may be dead-lettered again; the source
//! position in the headers (and the key) identifies it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

/// Header names of a dead letter.
pub const REASON: &str = "reason";
pub const ERROR: &str = "error";
pub const SOURCE_TOPIC: &str = "source.topic";
pub const SOURCE_PARTITION: &str = "source.partition";
pub const SOURCE_OFFSET: &str = "source.offset";

/// One event that could not be used.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// A short machine-readable reason, e.g. `malformed_json`.
    pub reason: &'static str,
    /// The error in words.
    pub error: String,
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
}

#[derive(Clone)]
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

/// How long one dead letter may take to be acknowledged before the partition
/// actor fails (and is restarted, replaying the event).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

impl DeadLetters {
    pub fn new(brokers: &str, topic: &str) -> Result<DeadLetters, KafkaError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            )
            .create()?;
        Ok(DeadLetters {
            producer,
            topic: topic.to_owned(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Produces `letter` and waits until the broker has it.
    pub async fn send(&self, letter: &DeadLetter) -> Result<(), KafkaError> {
        let partition = letter.partition.to_string();
        let offset = letter.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(header(REASON, letter.reason))
            .insert(header(ERROR, &letter.error))
            .insert(header(SOURCE_TOPIC, &letter.topic))
            .insert(header(SOURCE_PARTITION, &partition))
            .insert(header(SOURCE_OFFSET, &offset));
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key.as_ref());
        }
        if let Some(value) = &letter.value {
            record = record.payload(value.as_ref());
        }
        self.producer
            .send(record, Timeout::After(DELIVERY_TIMEOUT))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}
