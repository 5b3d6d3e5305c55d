//! Supervision on top of actix.
//!
//! actix's own `Supervisor` restarts only an actor that stopped, reuses the
//! failed instance and does not catch panics. Here each incarnation runs as
//! its own task, so a panic in a handler ends that task alone; the
//! supervising task sees how it ended, asks the actor kind's
//! [`RestartPolicy`](crate::restart::RestartPolicy) what to do, and starts a
//! fresh instance (built anew by the factory) behind the same [`Supervised`]
//! handle. Past the policy's limit it escalates: the run ends ([`Fatal`]).

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use actix::dev::{channel, ToEnvelope};
use actix::prelude::*;

use crate::aggregate::Unplaceable;
use crate::restart::{ActorKind, Decision, Exit, RestartPolicy, RestartTracker};
use crate::telemetry;

/// Mailbox size of a supervised actor, as actix's default.
const MAILBOX: usize = 16;

/// Where message `M` can be sent right now: None while the actor restarts
/// (or after it ended).
pub type Route<M> = Arc<dyn Fn() -> Option<Recipient<M>> + Send + Sync>;

/// A stable handle on a supervised actor: it follows restarts.
pub struct Supervised<A: Actor> {
    shared: Arc<Slot<A>>,
}

impl<A: Actor> Clone for Supervised<A> {
    fn clone(&self) -> Self {
        Supervised {
            shared: self.shared.clone(),
        }
    }
}

struct Slot<A: Actor> {
    addr: RwLock<Option<Addr<A>>>,
    stop_requested: AtomicBool,
    name: String,
    /// Messages sent and not yet taken, across incarnations.
    mailbox: telemetry::Mailbox,
}

impl<A: Actor> Slot<A> {
    /// Installs a new incarnation's address, unless stopped meanwhile.
    fn install(&self, addr: Addr<A>) -> bool {
        let mut slot = self.addr.write().unwrap_or_else(|p| p.into_inner());
        if self.stop_requested.load(Ordering::SeqCst) {
            return false;
        }
        *slot = Some(addr);
        true
    }

    fn clear(&self) {
        *self.addr.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

impl<A: Actor> Supervised<A> {
    /// The current incarnation; None once the actor has ended for good.
    pub fn addr(&self) -> Option<Addr<A>> {
        self.shared
            .addr
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A route to message `M` that always reaches the current incarnation.
    pub fn route<M>(&self) -> Route<M>
    where
        A: Handler<M>,
        A::Context: ToEnvelope<A, M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        let this = self.clone();
        Arc::new(move || this.addr().map(Addr::recipient))
    }

    /// The gauge of its waiting messages: a message sent to it carries a
    /// `mailbox().enqueued()` guard, dropped when handled.
    pub fn mailbox(&self) -> &telemetry::Mailbox {
        &self.shared.mailbox
    }

    /// Ends the actor on purpose: it is not restarted. It stops once the
    /// messages already in its mailbox are handled.
    pub fn stop(&self) {
        self.shared.stop_requested.store(true, Ordering::SeqCst);
        self.shared.clear();
        telemetry::Mailbox::forget(&self.shared.name);
    }
}

/// Lets an actor end itself as failed (rather than by panicking): the
/// supervisor then treats the exit as abnormal, with this reason.
#[derive(Clone, Default)]
pub struct Failure(Arc<Mutex<Option<String>>>);

impl Failure {
    pub fn fail<A: Actor<Context = Context<A>>>(&self, ctx: &mut Context<A>, reason: String) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        ctx.stop();
    }

    fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// What the process is told when an actor exceeds its restart policy.
#[derive(Debug, Clone)]
pub struct Escalation {
    pub kind: ActorKind,
    pub name: String,
    pub reason: String,
}

/// Why the pipeline must end at once. `app::run` returns the matching
/// outcome; the actor that reports it stops applying and flushing first.
#[derive(Debug, Clone)]
pub enum Fatal {
    /// An actor failed more often than its restart policy allows.
    Escalated(Escalation),
    /// An aggregate holds a value its table cannot store.
    Unstorable {
        aggregate: &'static str,
        error: String,
    },
    /// An event cannot be placed in its partition's history.
    Unplaceable(Unplaceable),
}

/// What every supervised actor shares: where fatal errors go.
#[derive(Clone)]
pub struct Supervision {
    fatal: tokio::sync::mpsc::UnboundedSender<Fatal>,
}

impl Supervision {
    pub fn new(fatal: tokio::sync::mpsc::UnboundedSender<Fatal>) -> Supervision {
        Supervision { fatal }
    }

    /// Ends the run: nothing can go on after `fatal`.
    pub fn report(&self, fatal: Fatal) {
        // Fails only once the run has ended already.
        let _ = self.fatal.send(fatal);
    }

    /// Starts `make()` on `arbiter` under `policy`. After each restart (the
    /// new incarnation is reachable by then) `restarted` runs: it is where the
    /// state the failed instance held in memory is rebuilt from durable state.
    pub fn start<A, F, R>(
        &self,
        arbiter: &ArbiterHandle,
        kind: ActorKind,
        name: String,
        policy: RestartPolicy,
        make: F,
        restarted: R,
    ) -> Supervised<A>
    where
        A: Actor<Context = Context<A>>,
        F: Fn(Failure) -> A + Send + 'static,
        R: Fn() + Send + 'static,
    {
        let (tx, rx) = channel::channel(MAILBOX);
        let shared = Arc::new(Slot {
            addr: RwLock::new(Some(Addr::new(tx))),
            stop_requested: AtomicBool::new(false),
            mailbox: telemetry::Mailbox::named(&name),
            name: name.clone(),
        });
        let slot = shared.clone();
        let supervision = self.clone();
        arbiter.spawn(async move {
            let mut tracker = RestartTracker::new(kind, policy, Instant::now());
            let mut mailbox = Some(rx);
            loop {
                let rx = match mailbox.take() {
                    Some(rx) => rx,
                    None => {
                        let (tx, rx) = channel::channel(MAILBOX);
                        if !slot.install(Addr::new(tx)) {
                            return;
                        }
                        rx
                    }
                };
                let failure = Failure::default();
                let incarnation = Context::with_receiver(rx).into_future(make(failure.clone()));
                let task = tokio::task::spawn_local(incarnation);
                if tracker.restarts() > 0 {
                    restarted();
                }
                let ended = task.await;
                if slot.stop_requested.load(Ordering::SeqCst) {
                    return;
                }
                let exit = match ended {
                    Err(e) if e.is_panic() => Exit::Panicked(panic_message(e.into_panic())),
                    Err(e) => Exit::Failed(e.to_string()),
                    Ok(()) => failure.take().map_or(Exit::Normal, Exit::Failed),
                };
                telemetry::actor_exit(kind, &exit);
                match tracker.on_exit(&exit, Instant::now(), fastrand::f64()) {
                    Decision::Restart { after } => {
                        tracing::warn!(kind = kind.as_str(), actor = %name, %exit, ?after, "actor ended; restarting it");
                        slot.clear();
                        tokio::time::sleep(after).await;
                        tracker.restarted(Instant::now());
                        telemetry::restarted(kind);
                    }
                    Decision::Stop => {
                        tracing::info!(kind = kind.as_str(), actor = %name, %exit, "actor ended; not restarted (policy)");
                        slot.clear();
                        return;
                    }
                    Decision::Escalate { reason } => {
                        slot.clear();
                        supervision.report(Fatal::Escalated(Escalation { kind, name, reason }));
                        return;
                    }
                }
            }
        });
        Supervised { shared }
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "a panic with a non-text payload".to_owned(),
        },
    }
}
