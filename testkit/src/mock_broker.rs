//! librdkafka's mock cluster, in the process that starts it: a Kafka-protocol
//! broker for the in-process runtime tests and the pipeline and memory
//! benches, with no stack to start.

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer as _};

/// librdkafka's mock cluster, owned by an idle producer (the cluster lives
/// as long as it does).
pub struct MockBroker {
    owner: BaseProducer,
    pub bootstrap: String,
}

impl MockBroker {
    pub fn start() -> anyhow::Result<MockBroker> {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", "1")
            .create()
            .context("starting librdkafka's mock cluster")?;
        let bootstrap = owner
            .client()
            .mock_cluster()
            .context("the client has no mock cluster")?
            .bootstrap_servers();
        // Groups form at once instead of after the default 3 s delay.
        // SAFETY: the mock cluster belongs to `owner`'s client, alive here.
        unsafe {
            let cluster =
                rdkafka::bindings::rd_kafka_handle_mock_cluster(owner.client().native_ptr());
            anyhow::ensure!(!cluster.is_null(), "the client has no mock cluster");
            rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
        }
        Ok(MockBroker { owner, bootstrap })
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        self.owner
            .client()
            .mock_cluster()
            .context("the client has no mock cluster")?
            .create_topic(topic, partitions, 1)
            .with_context(|| format!("creating topic {topic} on the mock cluster"))
    }
}
