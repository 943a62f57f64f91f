//! The fast lane of a ready tenant: what a call needs to take a [`Lease`] (the connection,
//! the tool list, the rate limiter and the in-flight permits), published by the tenant's
//! actor so that a call on a ready tenant costs no message round trip to the actor.
//!
//! The actor stays the only writer: it publishes the lane when its connection is ready and
//! its tool list fresh, and withdraws it whenever either stops being true (a failure, a
//! closed session, a tool-list change, a stop). Anything the lane cannot answer (no
//! connection yet, an expired list, a changed replica count) goes the slow way, through the
//! actor, exactly as before. Calls taken here still report their outcome to the actor,
//! which keeps counting failures and seeing the tenant in use.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use governor::DefaultDirectRateLimiter;
use tokio::sync::Semaphore;

use super::actor::{admit, take_permit};
use super::messages::{CallError, Lease, ToolList};
use crate::upstream::UpstreamClient;

#[derive(Default)]
pub struct Lane(RwLock<Option<Ready>>);

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
    /// A lease on the ready connection, or the refusal the actor would give (rate limited,
    /// busy). `None` when the lane cannot tell: the call goes through the actor.
    pub fn try_lease(&self, replicas: u32) -> Option<Result<Lease, CallError>> {
        let guard = self.0.read().ok()?;
        let ready = guard.as_ref()?;
        if ready.replicas != replicas || Instant::now() >= ready.tools_until {
            return None;
        }
        let lease = admit(&ready.limiter)
            .and_then(|()| take_permit(&ready.in_flight))
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
        let guard = self.0.read().ok()?;
        let ready = guard.as_ref()?;
        (ready.replicas == replicas).then(|| admit(&ready.limiter))
    }

    /// Publishes `ready`, or withdraws the lane with `None` (actor only).
    pub(super) fn set(&self, ready: Option<Ready>) {
        if let Ok(mut lane) = self.0.write() {
            *lane = ready;
        }
    }
}
