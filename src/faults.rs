//! Injected faults, for the fault and upstream tests' negative controls.
//! Compiled only with the cargo feature `faults`, which `scripts/test`
//! builds with. Any other build, the release binary among them, refuses
//! every `ETL_FAULT_*` setting at start-up: nothing in it can panic an
//! actor on purpose, fail an insert, or switch a replay guard off.

use crate::config::{ConfigError, Settings};
use crate::restart::ActorKind;

/// The settings of this module, known in every build so that a release
/// build can say why it refuses them.
pub const SETTINGS: [&str; 6] = [
    "ETL_FAULT_PANIC",
    "ETL_FAULT_INSERT_FAILURE_RATE",
    "ETL_FAULT_FLUSH_DELAY_MS",
    "ETL_FAULT_NO_OFFSET_GUARD",
    "ETL_FAULT_NO_POSITION_GUARD",
    "ETL_FAULT_SEED",
];

#[cfg(feature = "faults")]
pub use injected::{FaultConfig, PanicInjector};
#[cfg(not(feature = "faults"))]
pub use none::{FaultConfig, PanicInjector};

#[cfg(feature = "faults")]
mod injected {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::{ActorKind, ConfigError, Settings};
    use crate::aggregate::{Aggregate, AggregateState};
    use crate::sink::SinkError;

    /// Faults to inject. All off by default.
    #[derive(Debug, Clone, PartialEq, Default)]
    pub struct FaultConfig {
        /// Chance that an actor of the kind panics on a message, by kind.
        pub panic_rate: Vec<(ActorKind, f64)>,
        /// Chance that a ClickHouse insert fails before it is sent.
        pub insert_failure_rate: f64,
        /// Added before every ClickHouse insert.
        pub flush_delay: Duration,
        /// Applies replayed events again (no offset guard): the fault
        /// suite's negative control.
        pub no_offset_guard: bool,
        /// Applies events the source sent again at new offsets (no position
        /// guard): the upstream tests' negative control.
        pub no_position_guard: bool,
        pub seed: u64,
    }

    impl FaultConfig {
        pub fn from_settings(s: &Settings) -> Result<FaultConfig, ConfigError> {
            Ok(FaultConfig {
                panic_rate: panic_rates(s, "ETL_FAULT_PANIC")?,
                insert_failure_rate: s.parsed(
                    "ETL_FAULT_INSERT_FAILURE_RATE",
                    0.0,
                    |r: &f64| crate::config::valid_rate(*r),
                )?,
                flush_delay: s.millis("ETL_FAULT_FLUSH_DELAY_MS", 0, 0, 600_000)?,
                no_offset_guard: s.parsed("ETL_FAULT_NO_OFFSET_GUARD", false, |_| Ok(()))?,
                no_position_guard: s.parsed("ETL_FAULT_NO_POSITION_GUARD", false, |_| Ok(()))?,
                seed: s.parsed("ETL_FAULT_SEED", 0, |_| Ok(()))?,
            })
        }

        pub fn panic_rate(&self, kind: ActorKind) -> f64 {
            self.panic_rate
                .iter()
                .find(|(k, _)| *k == kind)
                .map_or(0.0, |(_, r)| *r)
        }

        pub fn any(&self) -> bool {
            self != &FaultConfig {
                seed: self.seed,
                ..FaultConfig::default()
            }
        }

        /// Before each insert attempt: the delay, then maybe a failure.
        pub async fn before_insert(&self, rng: &mut fastrand::Rng) -> Result<(), SinkError> {
            if !self.flush_delay.is_zero() {
                tokio::time::sleep(self.flush_delay).await;
            }
            if rng.f64() < self.insert_failure_rate {
                return Err(SinkError::Injected);
            }
            Ok(())
        }

        /// `state` without the guards these settings switch off.
        pub fn guard<A: Aggregate>(&self, mut state: AggregateState<A>) -> AggregateState<A> {
            if self.no_offset_guard {
                state = state.without_offset_guard();
            }
            if self.no_position_guard {
                state = state.without_position_guard();
            }
            state
        }
    }

    /// `kind=rate ...`, e.g. `partition=0.01 aggregator=0.001`.
    fn panic_rates(s: &Settings, name: &str) -> Result<Vec<(ActorKind, f64)>, ConfigError> {
        let Some(spec) = s.optional(name) else {
            return Ok(Vec::new());
        };
        let mut rates = Vec::new();
        for part in spec.split_whitespace() {
            let parsed = part.split_once('=').and_then(|(kind, rate)| {
                let kind = ActorKind::ALL.into_iter().find(|k| k.as_str() == kind)?;
                Some((kind, rate.parse::<f64>().ok()?))
            });
            match parsed {
                Some((kind, rate)) if crate::config::valid_rate(rate).is_ok() => {
                    rates.push((kind, rate))
                }
                _ => {
                    let why = format!("{part:?} is not KIND=RATE with KIND partition, aggregator or sink and RATE between 0 and 1");
                    return Err(s.invalid(name, why));
                }
            }
        }
        Ok(rates)
    }

    /// Panics an actor of one kind on a share of its messages; each
    /// instance draws from its own seeded generator, so a run can be
    /// repeated.
    pub struct PanicInjector {
        rate: f64,
        rng: fastrand::Rng,
    }

    impl PanicInjector {
        pub fn new(faults: &FaultConfig, kind: ActorKind) -> PanicInjector {
            // Every instance (and so every incarnation) draws a different sequence.
            static INSTANCES: AtomicU64 = AtomicU64::new(0);
            let instance = INSTANCES.fetch_add(1, Ordering::Relaxed);
            PanicInjector {
                rate: faults.panic_rate(kind),
                rng: fastrand::Rng::with_seed(
                    faults.seed ^ instance.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ),
            }
        }

        pub fn maybe_panic(&mut self, actor: &str) {
            if self.rate > 0.0 && self.rng.f64() < self.rate {
                panic!("injected panic in {actor} (ETL_FAULT_PANIC)");
            }
        }
    }
}

/// What a build without fault injection has in its place: nothing to
/// inject, and no way to ask for it.
#[cfg(not(feature = "faults"))]
mod none {
    use super::{ActorKind, ConfigError, Settings, SETTINGS};
    use crate::aggregate::{Aggregate, AggregateState};
    use crate::sink::SinkError;

    #[derive(Debug, Clone, PartialEq, Default)]
    pub struct FaultConfig;

    impl FaultConfig {
        pub fn from_settings(s: &Settings) -> Result<FaultConfig, ConfigError> {
            match SETTINGS.into_iter().find(|name| s.optional(name).is_some()) {
                Some(name) => Err(s.invalid(
                    name,
                    "this build has no fault injection: it is for the fault tests' builds \
                     (cargo feature `faults`)"
                        .to_owned(),
                )),
                None => Ok(FaultConfig),
            }
        }

        pub fn any(&self) -> bool {
            false
        }

        pub async fn before_insert(&self, _: &mut fastrand::Rng) -> Result<(), SinkError> {
            Ok(())
        }

        pub fn guard<A: Aggregate>(&self, state: AggregateState<A>) -> AggregateState<A> {
            state
        }
    }

    pub struct PanicInjector;

    impl PanicInjector {
        pub fn new(_: &FaultConfig, _: ActorKind) -> PanicInjector {
            PanicInjector
        }

        pub fn maybe_panic(&mut self, _: &str) {}
    }
}
