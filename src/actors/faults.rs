//! Injected faults (settings `ETL_FAULT_*`), for the fault tests: each actor
//! draws from its own seeded generator so a run can be repeated.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::FaultConfig;
use crate::restart::ActorKind;

/// Panics an actor of one kind on a share of its messages.
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
