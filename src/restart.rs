//! Restart policies for supervised actors, in the style of Erlang/OTP
//! supervisors: which exits restart an actor, how long to wait first, and
//! when repeated failures are escalated instead of retried.
//!
//! This is pure logic with an explicit clock: no actix, no tokio, no I/O. The
//! runtime reports each exit it did not ask for to a [`RestartTracker`] and
//! carries out the [`Decision`]; tests drive the same code with fixed
//! [`Instant`]s and fixed jitter.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// Which exits restart an actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Restarted whatever the exit: the actor is meant to run for as long as
    /// the pipeline does, so even a normal exit was not supposed to happen.
    Permanent,
    /// Restarted only after an abnormal exit (a failure or a panic); a normal
    /// exit means its work is done, and it ends quietly.
    Transient,
    /// Never restarted: a normal exit ends it quietly and an abnormal exit is
    /// escalated at once, for actors whose state cannot be rebuilt.
    Temporary,
}

impl Restart {
    /// The word used for it in a policy spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Restart::Permanent => "permanent",
            Restart::Transient => "transient",
            Restart::Temporary => "temporary",
        }
    }

    fn from_word(word: &str) -> Option<Restart> {
        match word {
            "permanent" => Some(Restart::Permanent),
            "transient" => Some(Restart::Transient),
            "temporary" => Some(Restart::Temporary),
            _ => None,
        }
    }
}

impl fmt::Display for Restart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an actor ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It stopped on its own, without an error.
    Normal,
    /// It stopped with an error it reported.
    Failed(String),
    /// It panicked; the payload is the panic message.
    Panicked(String),
}

impl Exit {
    /// Whether the exit was a failure or a panic, which is what transient
    /// actors are restarted for.
    pub fn is_abnormal(&self) -> bool {
        !matches!(self, Exit::Normal)
    }
}

/// `exited normally`, `failed: MESSAGE` or `panicked: MESSAGE`, as quoted in
/// escalation reasons.
impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Normal => f.write_str("exited normally"),
            Exit::Failed(message) => write!(f, "failed: {message}"),
            Exit::Panicked(message) => write!(f, "panicked: {message}"),
        }
    }
}

/// The kinds of supervised actor, each with its own default policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActorKind {
    /// One per assigned Kafka partition.
    Partition,
    /// One per table.
    Aggregator,
    /// The ClickHouse writer.
    Sink,
}

impl ActorKind {
    /// Every kind, for looking one up by name.
    pub const ALL: [ActorKind; 3] = [ActorKind::Partition, ActorKind::Aggregator, ActorKind::Sink];

    /// The name used in configuration, metrics and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::Partition => "partition",
            ActorKind::Aggregator => "aggregator",
            ActorKind::Sink => "sink",
        }
    }
}

impl fmt::Display for ActorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When and how quickly an actor is restarted.
///
/// At most `max_restarts` restarts are allowed within any sliding window of
/// `within`; one more failure is escalated. `max_restarts = 0` is allowed and
/// means "escalate on the first failure" (for a permanent or transient actor
/// whose failures should reach the supervisor without a retry); it makes no
/// difference to a temporary actor, which is never restarted.
///
/// Restarts wait an exponential backoff with equal jitter, so a crash loop
/// does not hammer Kafka or ClickHouse and restarts of many actors do not
/// line up, yet never collapse to zero: the `n`th consecutive restart (from
/// 0) waits between half and all of `min(backoff_min * 2^n, backoff_max)`.
/// Once an incarnation has run `reset_after` without failing, the next
/// restart starts again from `backoff_min`.
///
/// Written and read as a spec such as
/// `permanent max=10 within=60s backoff=100ms..5s reset=30s`; see
/// [`RestartPolicy::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub restart: Restart,
    pub max_restarts: u32,
    pub within: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub reset_after: Duration,
}

const EXPECTED_PARTS: &str =
    "expected permanent, transient, temporary, max=N, within=DUR, backoff=DUR..DUR or reset=DUR";
const EXPECTED_DURATION: &str = "expected a duration such as 250ms, 30s or 2m";

impl RestartPolicy {
    /// The policy an actor of `kind` gets unless configured otherwise.
    ///
    /// Aggregators restart less often and back off longer than the others:
    /// rebuilding one replays its table's state, which is the expensive part.
    pub fn default_for(kind: ActorKind) -> RestartPolicy {
        match kind {
            ActorKind::Partition | ActorKind::Sink => RestartPolicy {
                restart: Restart::Permanent,
                max_restarts: 10,
                within: Duration::from_secs(60),
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(5),
                reset_after: Duration::from_secs(30),
            },
            ActorKind::Aggregator => RestartPolicy {
                restart: Restart::Permanent,
                max_restarts: 5,
                within: Duration::from_secs(60),
                backoff_min: Duration::from_millis(200),
                backoff_max: Duration::from_secs(10),
                reset_after: Duration::from_secs(60),
            },
        }
    }

    /// Reads a spec, taking every part it leaves out from `defaults` (the
    /// kind's defaults), so configuration only names what it changes.
    ///
    /// The spec is whitespace-separated parts, each optional, in any order:
    /// a restart type (`permanent`, `transient` or `temporary`), `max=N`,
    /// `within=DUR`, `backoff=DUR..DUR` and `reset=DUR`, where `DUR` is a
    /// whole number with the unit `ms`, `s` or `m` (`250ms`, `30s`, `2m`).
    /// An empty spec gives `defaults`.
    ///
    /// Rejected, with one sentence naming the part: unknown parts, a part
    /// given twice, a zero `within` (no window to count restarts in) and a
    /// backoff whose minimum exceeds its maximum. A zero backoff or a zero
    /// `reset` is allowed (restart at once; never grow the backoff).
    pub fn parse(spec: &str, defaults: &RestartPolicy) -> Result<RestartPolicy, String> {
        let mut policy = *defaults;
        let mut seen_restart = false;
        let mut seen_max = false;
        let mut seen_within = false;
        let mut seen_backoff = false;
        let mut seen_reset = false;
        for part in spec.split_whitespace() {
            if let Some(restart) = Restart::from_word(part) {
                once(part, "the restart type", &mut seen_restart)?;
                policy.restart = restart;
                continue;
            }
            let Some((key, value)) = part.split_once('=') else {
                return Err(format!("\"{part}\": unknown part; {EXPECTED_PARTS}"));
            };
            match key {
                "max" => {
                    once(part, "max", &mut seen_max)?;
                    policy.max_restarts = parse_count(value).ok_or_else(|| {
                        format!(
                            "\"{part}\": expected a whole number of restarts from 0 to {}, \
                             such as max=10",
                            u32::MAX
                        )
                    })?;
                }
                "within" => {
                    once(part, "within", &mut seen_within)?;
                    let within = parse_duration(value)
                        .ok_or_else(|| format!("\"{part}\": {EXPECTED_DURATION}"))?;
                    if within.is_zero() {
                        return Err(format!("\"{part}\": the window must be longer than zero"));
                    }
                    policy.within = within;
                }
                "backoff" => {
                    once(part, "backoff", &mut seen_backoff)?;
                    let (min, max) = value
                        .split_once("..")
                        .and_then(|(min, max)| Some((parse_duration(min)?, parse_duration(max)?)))
                        .ok_or_else(|| {
                            format!(
                                "\"{part}\": expected two durations MIN..MAX, \
                                 such as backoff=100ms..5s"
                            )
                        })?;
                    if min > max {
                        return Err(format!(
                            "\"{part}\": the minimum must not exceed the maximum"
                        ));
                    }
                    policy.backoff_min = min;
                    policy.backoff_max = max;
                }
                "reset" => {
                    once(part, "reset", &mut seen_reset)?;
                    policy.reset_after = parse_duration(value)
                        .ok_or_else(|| format!("\"{part}\": {EXPECTED_DURATION}"))?;
                }
                _ => return Err(format!("\"{part}\": unknown part; {EXPECTED_PARTS}")),
            }
        }
        Ok(policy)
    }

    /// The delay before a restart that follows `consecutive` earlier restarts
    /// without a stable period in between.
    ///
    /// `jitter` picks the point in the upper half of the backoff: 0 gives
    /// half of it, values towards 1 all of it. It is clamped to `[0, 1]`, and
    /// NaN counts as 0, so a bad random number cannot stretch or skip a wait.
    pub fn backoff(&self, consecutive: u32, jitter: f64) -> Duration {
        let full = 1u32
            .checked_shl(consecutive)
            .and_then(|factor| self.backoff_min.checked_mul(factor))
            .map_or(self.backoff_max, |delay| delay.min(self.backoff_max));
        let jitter = if jitter.is_nan() {
            0.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        let half = full / 2;
        // In whole nanoseconds, rounded, so a given jitter gives an exact,
        // testable delay; exact in f64 up to about 104 days.
        let extra = (half.as_nanos() as f64 * jitter).round() as u64;
        (full - half) + Duration::from_nanos(extra).min(half)
    }
}

/// Marks a part as seen, failing if it already was.
fn once(part: &str, what: &str, seen: &mut bool) -> Result<(), String> {
    if std::mem::replace(seen, true) {
        Err(format!("\"{part}\": {what} is given more than once"))
    } else {
        Ok(())
    }
}

/// A plain decimal `u32`: no sign, which `str::parse` would allow.
fn parse_count(text: &str) -> Option<u32> {
    if text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse().ok()
    } else {
        None
    }
}

/// `250ms`, `30s` or `2m`; `None` for anything else or an overflow.
fn parse_duration(text: &str) -> Option<Duration> {
    let (number, unit_millis) = if let Some(number) = text.strip_suffix("ms") {
        (number, 1)
    } else if let Some(number) = text.strip_suffix('s') {
        (number, 1_000)
    } else if let Some(number) = text.strip_suffix('m') {
        (number, 60_000)
    } else {
        return None;
    };
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let millis = number.parse::<u64>().ok()?.checked_mul(unit_millis)?;
    Some(Duration::from_millis(millis))
}

/// Whole seconds as `Ns`, anything else as `Nms` (sub-millisecond parts,
/// which a spec cannot express, are dropped).
struct SpecDuration(Duration);

impl fmt::Display for SpecDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.subsec_nanos() == 0 {
            write!(f, "{}s", self.0.as_secs())
        } else {
            write!(f, "{}ms", self.0.as_millis())
        }
    }
}

/// The full spec, every part present, e.g.
/// `permanent max=10 within=60s backoff=100ms..5s reset=30s`; it parses back
/// to the same policy for any durations in whole milliseconds.
impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} max={} within={} backoff={}..{} reset={}",
            self.restart,
            self.max_restarts,
            SpecDuration(self.within),
            SpecDuration(self.backoff_min),
            SpecDuration(self.backoff_max),
            SpecDuration(self.reset_after),
        )
    }
}

/// What the runtime does with an actor that has exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start a new incarnation after waiting `after`, then call
    /// [`RestartTracker::restarted`].
    Restart { after: Duration },
    /// Let it end: its work is done.
    Stop,
    /// Do not restart it; hand the failure to whatever supervises this one.
    Escalate { reason: String },
}

/// The restart history of one supervised actor, which its policy's decisions
/// depend on.
#[derive(Debug, Clone)]
pub struct RestartTracker {
    kind: ActorKind,
    policy: RestartPolicy,
    /// When each restart inside the window happened, oldest first.
    restarts: VecDeque<Instant>,
    /// Restarts since the last stable incarnation: the backoff exponent.
    consecutive: u32,
    /// Restarts over the tracker's whole life.
    total: u64,
    /// When the current incarnation started.
    started: Instant,
}

impl RestartTracker {
    /// A tracker for an actor of `kind` (which prefixes escalation reasons)
    /// whose first incarnation started at `started`.
    pub fn new(kind: ActorKind, policy: RestartPolicy, started: Instant) -> RestartTracker {
        RestartTracker {
            kind,
            policy,
            restarts: VecDeque::new(),
            consecutive: 0,
            total: 0,
            started,
        }
    }

    /// Decides what happens to the actor after `exit` at `now`.
    ///
    /// Call it only for exits the runtime did not request: that is why a
    /// normal exit of a permanent actor is restarted, and counted against the
    /// limit, like a failure. `jitter` is a random number in `[0, 1)` (see
    /// [`RestartPolicy::backoff`]); tests pass fixed values.
    ///
    /// A restart leaves the window exactly `within` after it happened.
    pub fn on_exit(&mut self, exit: &Exit, now: Instant, jitter: f64) -> Decision {
        match (self.policy.restart, exit.is_abnormal()) {
            (Restart::Transient | Restart::Temporary, false) => return Decision::Stop,
            (Restart::Temporary, true) => {
                return Decision::Escalate {
                    reason: format!(
                        "{}: {exit}; a temporary actor is never restarted",
                        self.kind
                    ),
                }
            }
            (Restart::Permanent, _) | (Restart::Transient, true) => {}
        }
        self.forget_expired(now);
        let max = self.policy.max_restarts;
        if self.restarts.len() >= max as usize {
            let failures = self.restarts.len() + 1;
            let (noun, verb) = if failures == 1 {
                ("failure", "exceeds")
            } else {
                ("failures", "exceed")
            };
            let limit = if max == 1 { "restart" } else { "restarts" };
            return Decision::Escalate {
                reason: format!(
                    "{}: {failures} {noun} within {} {verb} the limit of {max} {limit} \
                     (last: {exit})",
                    self.kind,
                    SpecDuration(self.policy.within),
                ),
            };
        }
        if now.saturating_duration_since(self.started) >= self.policy.reset_after {
            self.consecutive = 0;
        }
        let after = self.policy.backoff(self.consecutive, jitter);
        self.consecutive = self.consecutive.saturating_add(1);
        self.total = self.total.saturating_add(1);
        self.restarts.push_back(now);
        Decision::Restart { after }
    }

    /// Marks the start of the new incarnation, from which its stable time is
    /// measured for the backoff reset.
    pub fn restarted(&mut self, now: Instant) {
        self.started = now;
    }

    /// How many restarts count against the limit at `now`.
    #[cfg(test)]
    pub fn restarts_in_window(&self, now: Instant) -> usize {
        self.restarts
            .iter()
            .filter(|&&at| !self.expired(at, now))
            .count()
    }

    /// Restarts since the last stable incarnation (the backoff exponent).
    #[cfg(test)]
    pub fn consecutive_restarts(&self) -> u32 {
        self.consecutive
    }

    /// Restarts decided over the tracker's whole life: above zero, the
    /// current incarnation is not the first and has state to rebuild.
    pub fn restarts(&self) -> u64 {
        self.total
    }

    fn expired(&self, at: Instant, now: Instant) -> bool {
        now.saturating_duration_since(at) >= self.policy.within
    }

    fn forget_expired(&mut self, now: Instant) {
        while let Some(&oldest) = self.restarts.front() {
            if !self.expired(oldest, now) {
                break;
            }
            self.restarts.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    fn boom() -> Exit {
        Exit::Panicked("boom".to_string())
    }

    /// Fails the actor once per `every`, restarting it at once each time,
    /// and returns the delays; panics on anything but a restart.
    fn delays(
        tracker: &mut RestartTracker,
        t0: Instant,
        every: Duration,
        count: u32,
        jitter: f64,
    ) -> Vec<Duration> {
        (1..=count)
            .map(|i| {
                let now = t0 + every * i;
                match tracker.on_exit(&boom(), now, jitter) {
                    Decision::Restart { after } => {
                        tracker.restarted(now);
                        after
                    }
                    other => panic!("failure {i}: expected a restart, got {other:?}"),
                }
            })
            .collect()
    }

    fn partition_tracker(t0: Instant) -> RestartTracker {
        RestartTracker::new(
            ActorKind::Partition,
            RestartPolicy::default_for(ActorKind::Partition),
            t0,
        )
    }

    #[test]
    fn backoff_with_zero_jitter_is_half_of_each_doubling_capped_step() {
        let t0 = Instant::now();
        let mut tracker = partition_tracker(t0);
        assert_eq!(
            delays(&mut tracker, t0, ms(1_000), 10, 0.0),
            [50, 100, 200, 400, 800, 1_600, 2_500, 2_500, 2_500, 2_500].map(ms)
        );
        assert_eq!(tracker.consecutive_restarts(), 10);
    }

    #[test]
    fn backoff_with_jitter_near_one_is_almost_each_full_step() {
        let t0 = Instant::now();
        let mut tracker = partition_tracker(t0);
        assert_eq!(
            delays(&mut tracker, t0, ms(1_000), 10, 0.999),
            [
                99_950, 199_900, 399_800, 799_600, 1_599_200, 3_198_400, 4_997_500, 4_997_500,
                4_997_500, 4_997_500
            ]
            .map(us)
        );
    }

    #[test]
    fn backoff_clamps_jitter_and_never_overflows() {
        let policy = RestartPolicy::default_for(ActorKind::Aggregator);
        assert_eq!(policy.backoff(0, 0.5), ms(150));
        assert_eq!(policy.backoff(0, 1.0), ms(200));
        assert_eq!(policy.backoff(0, 7.0), ms(200));
        assert_eq!(policy.backoff(0, -1.0), ms(100));
        assert_eq!(policy.backoff(0, f64::NAN), ms(100));
        assert_eq!(policy.backoff(5, 0.0), ms(3_200));
        assert_eq!(policy.backoff(6, 0.0), ms(5_000));
        assert_eq!(policy.backoff(31, 0.0), ms(5_000));
        assert_eq!(policy.backoff(32, 0.0), ms(5_000));
        assert_eq!(policy.backoff(u32::MAX, 1.0), ms(10_000));
    }

    #[test]
    fn zero_backoff_restarts_at_once() {
        let defaults = RestartPolicy::default_for(ActorKind::Sink);
        let policy = RestartPolicy::parse("backoff=0ms..0ms", &defaults).unwrap();
        let t0 = Instant::now();
        let mut tracker = RestartTracker::new(ActorKind::Sink, policy, t0);
        assert_eq!(
            delays(&mut tracker, t0, ms(10), 3, 0.999),
            [ms(0), ms(0), ms(0)]
        );
    }

    #[test]
    fn failures_inside_the_window_escalate_one_past_the_limit() {
        let t0 = Instant::now();
        let mut tracker = RestartTracker::new(
            ActorKind::Aggregator,
            RestartPolicy::default_for(ActorKind::Aggregator),
            t0,
        );
        assert_eq!(
            delays(&mut tracker, t0, ms(1_000), 5, 0.0),
            [100, 200, 400, 800, 1_600].map(ms)
        );
        assert_eq!(tracker.restarts_in_window(t0 + ms(6_000)), 5);
        assert_eq!(
            tracker.on_exit(&boom(), t0 + ms(6_000), 0.0),
            Decision::Escalate {
                reason: "aggregator: 6 failures within 60s exceed the limit of 5 restarts \
                         (last: panicked: boom)"
                    .to_string()
            }
        );
    }

    #[test]
    fn failures_spread_over_more_than_the_window_never_escalate() {
        let t0 = Instant::now();
        let mut tracker = RestartTracker::new(
            ActorKind::Aggregator,
            RestartPolicy::default_for(ActorKind::Aggregator),
            t0,
        );
        // Five per 60s: each failure finds the one 60s before it just gone.
        let waits = delays(&mut tracker, t0, ms(12_000), 100, 0.0);
        assert_eq!(waits.len(), 100);
        assert_eq!(waits[99], ms(5_000));
        assert_eq!(tracker.restarts_in_window(t0 + ms(1_211_999)), 5);
        assert_eq!(tracker.restarts_in_window(t0 + ms(1_212_000)), 4);
    }

    #[test]
    fn a_restart_leaves_the_window_exactly_within_after_it() {
        let t0 = Instant::now();
        let defaults = RestartPolicy::default_for(ActorKind::Partition);
        let policy = RestartPolicy::parse("max=2 within=10s", &defaults).unwrap();
        let mut tracker = RestartTracker::new(ActorKind::Partition, policy, t0);
        assert_eq!(delays(&mut tracker, t0, ms(1), 2, 0.0), [ms(50), ms(100)]);
        assert_eq!(tracker.restarts_in_window(t0 + ms(10_000)), 2);
        assert_eq!(tracker.restarts_in_window(t0 + ms(10_001)), 1);
        assert_eq!(tracker.restarts_in_window(t0 + ms(10_002)), 0);
        let escalated = tracker.on_exit(&Exit::Failed("io".into()), t0 + ms(10_000), 0.0);
        assert_eq!(
            escalated,
            Decision::Escalate {
                reason: "partition: 3 failures within 10s exceed the limit of 2 restarts \
                         (last: failed: io)"
                    .to_string()
            }
        );
        let mut tracker = RestartTracker::new(ActorKind::Partition, policy, t0);
        assert_eq!(delays(&mut tracker, t0, ms(1), 2, 0.0), [ms(50), ms(100)]);
        assert_eq!(
            tracker.on_exit(&boom(), t0 + ms(10_001), 0.0),
            Decision::Restart { after: ms(200) }
        );
        assert_eq!(tracker.restarts_in_window(t0 + ms(10_001)), 2);
    }

    #[test]
    fn backoff_resets_after_a_stable_incarnation() {
        let t0 = Instant::now();
        let mut tracker = partition_tracker(t0);
        assert_eq!(tracker.restarts(), 0);
        assert_eq!(
            delays(&mut tracker, t0, ms(100), 3, 0.0),
            [ms(50), ms(100), ms(200)]
        );
        // The last incarnation started at 300ms; 29.999s is not stable yet.
        let now = t0 + ms(300 + 29_999);
        assert_eq!(
            tracker.on_exit(&boom(), now, 0.0),
            Decision::Restart { after: ms(400) }
        );
        tracker.restarted(now);
        let now = now + ms(30_000);
        assert_eq!(
            tracker.on_exit(&boom(), now, 0.0),
            Decision::Restart { after: ms(50) }
        );
        assert_eq!(tracker.consecutive_restarts(), 1);
        assert_eq!(tracker.restarts(), 5);
        tracker.restarted(now);
        assert_eq!(
            tracker.on_exit(&boom(), now + ms(1), 0.0),
            Decision::Restart { after: ms(100) }
        );
    }

    #[test]
    fn the_stable_time_counts_from_the_new_incarnation() {
        let t0 = Instant::now();
        let mut tracker = partition_tracker(t0);
        assert_eq!(
            tracker.on_exit(&boom(), t0 + ms(1), 0.0),
            Decision::Restart { after: ms(50) }
        );
        // Restarted late: 40s after the first start but only 20s after its own.
        tracker.restarted(t0 + ms(20_000));
        assert_eq!(
            tracker.on_exit(&boom(), t0 + ms(40_000), 0.0),
            Decision::Restart { after: ms(100) }
        );
    }

    #[test]
    fn normal_exit_restarts_only_permanent_actors() {
        let t0 = Instant::now();
        let defaults = RestartPolicy::default_for(ActorKind::Sink);
        let decide = |spec: &str| {
            let policy = RestartPolicy::parse(spec, &defaults).unwrap();
            RestartTracker::new(ActorKind::Sink, policy, t0).on_exit(&Exit::Normal, t0 + ms(5), 0.0)
        };
        assert_eq!(decide("permanent"), Decision::Restart { after: ms(50) });
        assert_eq!(decide("transient"), Decision::Stop);
        assert_eq!(decide("temporary"), Decision::Stop);
    }

    #[test]
    fn normal_exits_of_a_permanent_actor_count_against_the_limit() {
        let t0 = Instant::now();
        let defaults = RestartPolicy::default_for(ActorKind::Sink);
        let policy = RestartPolicy::parse("max=1", &defaults).unwrap();
        let mut tracker = RestartTracker::new(ActorKind::Sink, policy, t0);
        assert_eq!(
            tracker.on_exit(&Exit::Normal, t0 + ms(1), 0.0),
            Decision::Restart { after: ms(50) }
        );
        tracker.restarted(t0 + ms(51));
        assert_eq!(tracker.restarts_in_window(t0 + ms(52)), 1);
        assert_eq!(
            tracker.on_exit(&Exit::Normal, t0 + ms(52), 0.0),
            Decision::Escalate {
                reason: "sink: 2 failures within 60s exceed the limit of 1 restart \
                         (last: exited normally)"
                    .to_string()
            }
        );
    }

    #[test]
    fn transient_actors_restart_after_failures_and_panics() {
        let t0 = Instant::now();
        let defaults = RestartPolicy::default_for(ActorKind::Partition);
        let policy = RestartPolicy::parse("transient", &defaults).unwrap();
        let mut tracker = RestartTracker::new(ActorKind::Partition, policy, t0);
        assert_eq!(
            tracker.on_exit(&Exit::Failed("x".into()), t0 + ms(1), 0.0),
            Decision::Restart { after: ms(50) }
        );
        tracker.restarted(t0 + ms(2));
        assert_eq!(
            tracker.on_exit(&boom(), t0 + ms(3), 0.0),
            Decision::Restart { after: ms(100) }
        );
        tracker.restarted(t0 + ms(4));
        assert_eq!(
            tracker.on_exit(&Exit::Normal, t0 + ms(5), 0.0),
            Decision::Stop
        );
    }

    #[test]
    fn temporary_actors_escalate_at_once() {
        let t0 = Instant::now();
        let defaults = RestartPolicy::default_for(ActorKind::Aggregator);
        let policy = RestartPolicy::parse("temporary", &defaults).unwrap();
        let mut tracker = RestartTracker::new(ActorKind::Aggregator, policy, t0);
        assert_eq!(
            tracker.on_exit(&boom(), t0 + ms(1), 0.0),
            Decision::Escalate {
                reason: "aggregator: panicked: boom; a temporary actor is never restarted"
                    .to_string()
            }
        );
        assert_eq!(
            tracker.on_exit(&Exit::Failed("lost".into()), t0 + ms(2), 0.0),
            Decision::Escalate {
                reason: "aggregator: failed: lost; a temporary actor is never restarted"
                    .to_string()
            }
        );
        assert_eq!(tracker.restarts_in_window(t0 + ms(2)), 0);
        assert_eq!(tracker.restarts(), 0);
    }

    #[test]
    fn max_zero_escalates_on_the_first_failure() {
        let t0 = Instant::now();
        let defaults = RestartPolicy::default_for(ActorKind::Sink);
        let policy = RestartPolicy::parse("transient max=0", &defaults).unwrap();
        let mut tracker = RestartTracker::new(ActorKind::Sink, policy, t0);
        assert_eq!(
            tracker.on_exit(&Exit::Failed("disk full".into()), t0 + ms(1), 0.0),
            Decision::Escalate {
                reason: "sink: 1 failure within 60s exceeds the limit of 0 restarts \
                         (last: failed: disk full)"
                    .to_string()
            }
        );
        assert_eq!(
            tracker.on_exit(&Exit::Normal, t0 + ms(2), 0.0),
            Decision::Stop
        );
    }

    #[test]
    fn exits_describe_themselves() {
        assert!(!Exit::Normal.is_abnormal());
        assert!(Exit::Failed("x".into()).is_abnormal());
        assert!(boom().is_abnormal());
        assert_eq!(Exit::Normal.to_string(), "exited normally");
        assert_eq!(Exit::Failed("x".into()).to_string(), "failed: x");
        assert_eq!(boom().to_string(), "panicked: boom");
    }

    #[test]
    fn defaults_per_kind() {
        assert_eq!(ActorKind::Partition.as_str(), "partition");
        assert_eq!(ActorKind::Aggregator.as_str(), "aggregator");
        assert_eq!(ActorKind::Sink.as_str(), "sink");
        assert_eq!(
            RestartPolicy::default_for(ActorKind::Partition),
            RestartPolicy {
                restart: Restart::Permanent,
                max_restarts: 10,
                within: ms(60_000),
                backoff_min: ms(100),
                backoff_max: ms(5_000),
                reset_after: ms(30_000),
            }
        );
        assert_eq!(
            RestartPolicy::default_for(ActorKind::Aggregator),
            RestartPolicy {
                restart: Restart::Permanent,
                max_restarts: 5,
                within: ms(60_000),
                backoff_min: ms(200),
                backoff_max: ms(10_000),
                reset_after: ms(60_000),
            }
        );
        assert_eq!(
            RestartPolicy::default_for(ActorKind::Sink),
            RestartPolicy::default_for(ActorKind::Partition)
        );
    }

    #[test]
    fn parse_keeps_defaults_for_omitted_parts() {
        let defaults = RestartPolicy::default_for(ActorKind::Aggregator);
        assert_eq!(RestartPolicy::parse("", &defaults), Ok(defaults));
        assert_eq!(RestartPolicy::parse("  \t ", &defaults), Ok(defaults));
        assert_eq!(
            RestartPolicy::parse("max=3", &defaults),
            Ok(RestartPolicy {
                max_restarts: 3,
                ..defaults
            })
        );
        assert_eq!(
            RestartPolicy::parse(" reset=2m  transient\tbackoff=250ms..30s ", &defaults),
            Ok(RestartPolicy {
                restart: Restart::Transient,
                backoff_min: ms(250),
                backoff_max: ms(30_000),
                reset_after: ms(120_000),
                ..defaults
            })
        );
    }

    #[test]
    fn parse_reads_every_part_in_any_order() {
        let defaults = RestartPolicy::default_for(ActorKind::Partition);
        assert_eq!(
            RestartPolicy::parse(
                "within=90s backoff=1s..1s reset=0ms max=0 temporary",
                &defaults
            ),
            Ok(RestartPolicy {
                restart: Restart::Temporary,
                max_restarts: 0,
                within: ms(90_000),
                backoff_min: ms(1_000),
                backoff_max: ms(1_000),
                reset_after: ms(0),
            })
        );
    }

    #[test]
    fn parse_errors_name_the_part_and_what_was_expected() {
        let defaults = RestartPolicy::default_for(ActorKind::Sink);
        let error = |spec: &str| RestartPolicy::parse(spec, &defaults).unwrap_err();
        let unknown = "unknown part; expected permanent, transient, temporary, max=N, \
                       within=DUR, backoff=DUR..DUR or reset=DUR";
        assert_eq!(error("forever"), format!("\"forever\": {unknown}"));
        assert_eq!(error("Permanent"), format!("\"Permanent\": {unknown}"));
        assert_eq!(error("maxx=3"), format!("\"maxx=3\": {unknown}"));
        assert_eq!(error("max=1 =1"), format!("\"=1\": {unknown}"));
        let max = "expected a whole number of restarts from 0 to 4294967295, such as max=10";
        assert_eq!(error("max="), format!("\"max=\": {max}"));
        assert_eq!(error("max=-1"), format!("\"max=-1\": {max}"));
        assert_eq!(error("max=+1"), format!("\"max=+1\": {max}"));
        assert_eq!(error("max=ten"), format!("\"max=ten\": {max}"));
        assert_eq!(
            error("max=4294967296"),
            format!("\"max=4294967296\": {max}")
        );
        let duration = "expected a duration such as 250ms, 30s or 2m";
        assert_eq!(error("within=60"), format!("\"within=60\": {duration}"));
        assert_eq!(error("within=1h"), format!("\"within=1h\": {duration}"));
        assert_eq!(error("within=s"), format!("\"within=s\": {duration}"));
        assert_eq!(error("within=1.5s"), format!("\"within=1.5s\": {duration}"));
        assert_eq!(error("within=+5s"), format!("\"within=+5s\": {duration}"));
        assert_eq!(error("reset=30S"), format!("\"reset=30S\": {duration}"));
        assert_eq!(
            error("reset=99999999999999999999m"),
            format!("\"reset=99999999999999999999m\": {duration}")
        );
        assert_eq!(
            error("reset=999999999999999999m"),
            format!("\"reset=999999999999999999m\": {duration}")
        );
        assert_eq!(
            error("within=0s"),
            "\"within=0s\": the window must be longer than zero"
        );
        let backoff = "expected two durations MIN..MAX, such as backoff=100ms..5s";
        assert_eq!(error("backoff=5s"), format!("\"backoff=5s\": {backoff}"));
        assert_eq!(
            error("backoff=5s.."),
            format!("\"backoff=5s..\": {backoff}")
        );
        assert_eq!(
            error("backoff=x..5s"),
            format!("\"backoff=x..5s\": {backoff}")
        );
        assert_eq!(
            error("backoff=1s..2s..3s"),
            format!("\"backoff=1s..2s..3s\": {backoff}")
        );
        assert_eq!(
            error("backoff=5s..1s"),
            "\"backoff=5s..1s\": the minimum must not exceed the maximum"
        );
        assert_eq!(
            error("transient permanent"),
            "\"permanent\": the restart type is given more than once"
        );
        assert_eq!(
            error("temporary temporary"),
            "\"temporary\": the restart type is given more than once"
        );
        assert_eq!(
            error("max=1 max=2"),
            "\"max=2\": max is given more than once"
        );
        assert_eq!(
            error("within=1s within=1s"),
            "\"within=1s\": within is given more than once"
        );
        assert_eq!(
            error("backoff=1s..2s backoff=1s..2s"),
            "\"backoff=1s..2s\": backoff is given more than once"
        );
        assert_eq!(
            error("reset=1s reset=2s"),
            "\"reset=2s\": reset is given more than once"
        );
    }

    #[test]
    fn display_prints_the_spec_grammar() {
        assert_eq!(
            RestartPolicy::default_for(ActorKind::Partition).to_string(),
            "permanent max=10 within=60s backoff=100ms..5s reset=30s"
        );
        assert_eq!(
            RestartPolicy::default_for(ActorKind::Aggregator).to_string(),
            "permanent max=5 within=60s backoff=200ms..10s reset=60s"
        );
        let defaults = RestartPolicy::default_for(ActorKind::Sink);
        assert_eq!(
            RestartPolicy::parse("transient within=2m backoff=0m..1500ms", &defaults)
                .unwrap()
                .to_string(),
            "transient max=10 within=120s backoff=0s..1500ms reset=30s"
        );
    }

    #[test]
    fn display_round_trips_through_parse() {
        let other = RestartPolicy::default_for(ActorKind::Aggregator);
        let mut policies = vec![
            RestartPolicy::default_for(ActorKind::Partition),
            RestartPolicy::default_for(ActorKind::Aggregator),
            RestartPolicy::default_for(ActorKind::Sink),
        ];
        for spec in [
            "temporary max=0 within=1ms backoff=0ms..0ms reset=0s",
            "transient max=4294967295 within=3m backoff=1ms..1001ms reset=61s",
            "permanent max=7 within=100000ms backoff=2s..2m reset=250ms",
        ] {
            policies.push(RestartPolicy::parse(spec, &other).unwrap());
        }
        for policy in policies {
            assert_eq!(
                RestartPolicy::parse(&policy.to_string(), &other),
                Ok(policy),
                "{policy}"
            );
        }
    }
}
