//! Whether a partition's log still holds what ClickHouse has counted from it.
//!
//! Each stored row carries the offset of the last event it counts, so the
//! highest stored offset of a partition says how far into its log the
//! aggregates already are. A log that ends at or below that offset has started
//! over: the topic was deleted and created again, or the broker lost its data
//! while ClickHouse kept the aggregates (`docker compose down` with Kafka's
//! data not kept, say). Counting on would compare the new log's offsets with
//! the old log's: events at or below them would be skipped as replays, events
//! above them added to totals that already hold the old log. Neither is
//! right, so the processor stops, saying so, when such a partition is
//! assigned.
//!
//! Not caught here: a recreated log that has already grown past the stored
//! offsets when it is assigned. The source guard catches that one: an offset
//! already counted then holds an event whose position in Postgres's log the
//! stored rows do not cover (`aggregate::AggregateState::apply`).

/// A partition whose log ends before the events already stored from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{topic} partition {partition} ends at offset {end}, but analytics.{aggregate} already \
     counts its events up to offset {stored}: the topic started over (it was recreated, or the \
     broker lost its data while ClickHouse kept the aggregates). Counting on would skip or double \
     count events, so the processor stops; rebuild the aggregates (README, \"The source started \
     over\")"
)]
pub struct LogStartedOver {
    pub topic: String,
    pub partition: i32,
    /// The log's end: the offset its next record will get.
    pub end: i64,
    pub aggregate: &'static str,
    /// The highest offset stored from the partition.
    pub stored: i64,
}

/// Checks the partition's log `end` against the highest offset `aggregate`
/// stored from it (None: nothing stored yet).
pub fn check(
    topic: &str,
    partition: i32,
    end: i64,
    aggregate: &'static str,
    stored: Option<i64>,
) -> Result<(), LogStartedOver> {
    match stored {
        // The record at `stored` was read from this log, so the log must
        // reach past it.
        Some(stored) if stored >= end => Err(LogStartedOver {
            topic: topic.to_owned(),
            partition,
            end,
            aggregate,
            stored,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_that_reaches_past_the_stored_offset_goes_on() {
        assert_eq!(check("t", 0, 101, "a", Some(100)), Ok(()));
        assert_eq!(check("t", 0, 5_000, "a", Some(100)), Ok(()));
        assert_eq!(check("t", 0, 0, "a", None), Ok(()));
    }

    #[test]
    fn a_log_that_ends_at_or_before_the_stored_offset_started_over() {
        for end in [0, 42, 100] {
            let err = check(
                "online_store.public.orders",
                3,
                end,
                "orders_by_minute",
                Some(100),
            )
            .unwrap_err();
            assert_eq!((err.partition, err.end, err.stored), (3, end, 100));
            let text = err.to_string();
            assert!(
                text.starts_with(&format!(
                    "online_store.public.orders partition 3 ends at offset {end}, but \
                     analytics.orders_by_minute already counts its events up to offset 100"
                )),
                "{text}"
            );
            assert!(text.contains("rebuild the aggregates"), "{text}");
        }
    }
}
