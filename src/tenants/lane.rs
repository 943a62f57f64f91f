//! The fast lane of a ready tenant: what a call needs to take a [`Lease`] (the connection,
//! the tool list, the rate limiter and the in-flight permits), published by the tenant's
//! actor so that a call on a ready tenant costs no message round trip to the actor.
//!
//! The actor stays the only writer: it publishes the lane when its connection is ready and
//! its tool list fresh, and withdraws it whenever either stops being true (a failure, a
//! closed session, a tool-list change, a stop). Anything the lane cannot answer (no
//! connection yet, an expired list, a changed replica count) goes the slow way, through the
//! actor, exactly as before. Calls taken here report their outcome to the actor only when
//! it needs it: a transport failure always, a success while the actor counts failures in
//! a row (the success resets the count). Otherwise a call only marks the lane used, which
//! the actor's tick reads, so a call on a ready tenant sends the actor no message at all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use governor::DefaultDirectRateLimiter;
use tokio::sync::Semaphore;

use super::actor::{admit, take_permit};
use super::messages::{CallError, Lease, ToolList};
use crate::upstream::UpstreamClient;

#[derive(Default)]
pub struct Lane {
    ready: RwLock<Option<Ready>>,
    /// Set by the calls that end quietly (see [`Lane::report_success`]), taken by the
    /// actor's tick: the tenant is in use.
    used: AtomicBool,
    /// Whether the actor counts transport failures in a row, which a success resets.
    counting_failures: AtomicBool,
}

/// A ready tenant, as its actor last published it.
pub(super) struct Ready {
    pub client: UpstreamClient,
    pub generation: u64,
    pub tools: Arc<ToolList>,
    /// When `tools` stops being fresh (the tool-list TTL).
    pub tools_until: Instant,
    pub limiter: Arc<DefaultDirectRateLimiter>,
    /// The replica count `limiter` was built for.
    pub replicas: u32,
    pub in_flight: Arc<Semaphore>,
}

impl Lane {
    /// A lease on the ready connection for a call of `tool`, or the refusal the actor would
    /// give (unknown tool, rate limited, busy). `None` when the lane cannot tell: the call
    /// goes through the actor.
    pub fn try_lease(&self, replicas: u32, tool: &str) -> Option<Result<Lease, CallError>> {
        let guard = self.ready.read().ok()?;
        let ready = guard.as_ref()?;
        if ready.replicas != replicas || Instant::now() >= ready.tools_until {
            return None;
        }
        // Checked before the limit is spent: an unknown tool never reaches the upstream.
        if !ready.tools.contains(tool) {
            return Some(Err(CallError::UnknownTool(tool.to_owned())));
        }
        // A place in flight first: a call refused as busy never reaches the upstream, so
        // it spends no part of the limit (the place goes back if the limit refuses).
        let lease = take_permit(&ready.in_flight)
            .and_then(|permit| admit(&ready.limiter).map(|()| permit))
            .map(|permit| Lease {
                client: ready.client.clone(),
                generation: ready.generation,
                tools: Some(ready.tools.clone()),
                _permit: permit,
            });
        Some(lease)
    }

    /// One request of the tenant's rate limit spent (see `TenantMsg::Spend`), or `None` when
    /// the lane cannot tell: the actor is asked.
    pub fn try_spend(&self, replicas: u32) -> Option<Result<(), CallError>> {
        let guard = self.ready.read().ok()?;
        let ready = guard.as_ref()?;
        (ready.replicas == replicas).then(|| admit(&ready.limiter))
    }

    /// Publishes `ready`, or withdraws the lane with `None` (actor only).
    pub(super) fn set(&self, ready: Option<Ready>) {
        if let Ok(mut lane) = self.ready.write() {
            *lane = ready;
        }
    }

    /// A call on a lease from this lane succeeded: whether the actor must hear of it (an
    /// `Outcome`), which it must only while it counts failures in a row. Either way the
    /// tenant counts as in use at the actor's next tick.
    pub fn report_success(&self) -> bool {
        self.mark_used();
        self.counting_failures.load(Ordering::Relaxed)
    }

    /// Tells the actor, on its next tick, that the tenant is in use.
    pub fn mark_used(&self) {
        // Read first: under load the flag is already set, and a load keeps the cache
        // line shared between the cores where a store would bounce it.
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }

    /// Whether calls ended quietly since the last time (actor only).
    pub(super) fn take_used(&self) -> bool {
        self.used.swap(false, Ordering::Relaxed)
    }

    /// Whether the actor counts failures in a row (actor only).
    pub(super) fn set_counting_failures(&self, counting: bool) {
        self.counting_failures.store(counting, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_is_reported_only_while_failures_are_counted_and_marks_the_lane_used() {
        let lane = Lane::default();
        assert!(!lane.take_used(), "no call yet");
        assert!(!lane.report_success(), "no failures counted: no message");
        assert!(!lane.report_success());
        assert!(lane.take_used(), "the tick sees the calls");
        assert!(!lane.take_used(), "once");
        lane.set_counting_failures(true);
        assert!(
            lane.report_success(),
            "a success resets the count: the actor hears of it"
        );
        assert!(lane.take_used());
    }
}
