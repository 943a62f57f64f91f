//! Bounds on MCP sessions: at most `MCP_MAX_SESSIONS` open in the process and
//! `MCP_MAX_SESSIONS_PER_TENANT` per tenant, each bound to the tenant that opened it.
//!
//! rmcp's session manager cannot see the request that creates a session, so the gate
//! reserves a slot before an `initialize` reaches rmcp and hands the reservation over in a
//! task-local; [`BoundedSessions::create_session`] turns it into an open session, and
//! `close_session` (DELETE, idle timeout, or the session's end) gives the slot back.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::Stream;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::local::{
    LocalSessionManager, LocalSessionManagerError, LocalSessionWorker,
};
use rmcp::transport::streamable_http_server::session::{
    RestoreOutcome, ServerSseMessage, SessionId, SessionManager,
};
use rmcp::transport::WorkerTransport;

/// Which bound a new session would cross.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitError {
    Total,
    Tenant,
}

/// Session counts and owners. One std mutex: every critical section is a few map operations
/// and never awaits.
pub struct SessionLimits {
    max_total: usize,
    max_per_tenant: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Open sessions plus reservations not yet turned into sessions.
    total: usize,
    per_tenant: HashMap<String, usize>,
    owners: HashMap<SessionId, String>,
}

impl SessionLimits {
    pub fn new(max_total: usize, max_per_tenant: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_tenant,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves consistent counts (no await, no partial
        // update that matters), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot for a new session of `tenant`, or says which bound is reached.
    pub fn reserve(self: &Arc<Self>, tenant: &str) -> Result<Reservation, LimitError> {
        let mut state = self.lock();
        if state.total >= self.max_total {
            return Err(LimitError::Total);
        }
        let count = state.per_tenant.entry(tenant.to_owned()).or_insert(0);
        if *count >= self.max_per_tenant {
            return Err(LimitError::Tenant);
        }
        *count += 1;
        state.total += 1;
        Ok(Reservation {
            limits: self.clone(),
            tenant: Some(tenant.to_owned()),
        })
    }

    /// The tenant that opened session `id`, if it is open.
    pub fn owner(&self, id: &str) -> Option<String> {
        self.lock().owners.get(id).cloned()
    }

    /// Sessions open (and reserved) now, in total and for `tenant`.
    pub fn open(&self, tenant: &str) -> (usize, usize) {
        let state = self.lock();
        let mine = state.per_tenant.get(tenant).copied().unwrap_or(0);
        (state.total, mine)
    }

    fn bind(&self, mut reservation: Reservation, id: SessionId) {
        if let Some(tenant) = reservation.tenant.take() {
            self.lock().owners.insert(id, tenant);
        }
    }

    fn close(&self, id: &SessionId) {
        let mut state = self.lock();
        if let Some(tenant) = state.owners.remove(id) {
            release(&mut state, &tenant);
        }
    }
}

fn release(state: &mut State, tenant: &str) {
    state.total = state.total.saturating_sub(1);
    if let Some(count) = state.per_tenant.get_mut(tenant) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            state.per_tenant.remove(tenant);
        }
    }
}

/// A slot taken for a session that is not open yet; dropping it gives the slot back.
pub struct Reservation {
    limits: Arc<SessionLimits>,
    tenant: Option<String>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(tenant) = self.tenant.take() {
            release(&mut self.limits.lock(), &tenant);
        }
    }
}

tokio::task_local! {
    /// The reservation of the request being served, for `create_session` to claim.
    static PENDING: RefCell<Option<Reservation>>;
}

/// Runs `future` (the rest of the request) with `reservation` available to
/// [`BoundedSessions::create_session`]. Unclaimed, it is released when the request ends.
pub async fn with_reservation<F: std::future::Future>(
    reservation: Reservation,
    future: F,
) -> F::Output {
    PENDING.scope(RefCell::new(Some(reservation)), future).await
}

fn take_reservation() -> Option<Reservation> {
    PENDING.try_with(|r| r.borrow_mut().take()).ok().flatten()
}

#[derive(Debug, thiserror::Error)]
pub enum BoundedError {
    /// A session was asked for without a reservation (not through the gate).
    #[error("no session slot was reserved for this request")]
    NotReserved,
    #[error(transparent)]
    Local(#[from] LocalSessionManagerError),
}

/// rmcp's in-memory session manager, with the bounds of [`SessionLimits`].
pub struct BoundedSessions {
    inner: LocalSessionManager,
    limits: Arc<SessionLimits>,
}

impl BoundedSessions {
    pub fn new(inner: LocalSessionManager, limits: Arc<SessionLimits>) -> Self {
        Self { inner, limits }
    }
}

impl SessionManager for BoundedSessions {
    type Error = BoundedError;
    type Transport = WorkerTransport<LocalSessionWorker>;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let reservation = take_reservation().ok_or(BoundedError::NotReserved)?;
        let (id, transport) = self.inner.create_session().await?;
        self.limits.bind(reservation, id.clone());
        Ok((id, transport))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        Ok(self.inner.initialize_session(id, message).await?)
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        Ok(self.inner.has_session(id).await?)
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        self.limits.close(id);
        Ok(self.inner.close_session(id).await?)
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.create_stream(id, message).await?)
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        Ok(self.inner.accept_message(id, message).await?)
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.create_standalone_stream(id).await?)
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.resume(id, last_event_id).await?)
    }

    async fn restore_session(
        &self,
        _id: SessionId,
    ) -> Result<RestoreOutcome<Self::Transport>, Self::Error> {
        // No external session store: a session lives in the process that opened it.
        Ok(RestoreOutcome::NotSupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_count_until_dropped_and_bind_to_their_tenant() {
        let limits = SessionLimits::new(3, 2);
        let a1 = limits.reserve("a").expect("first");
        let a2 = limits.reserve("a").expect("second");
        assert_eq!(limits.reserve("a").err(), Some(LimitError::Tenant));
        let b1 = limits.reserve("b").expect("b");
        assert_eq!(limits.reserve("c").err(), Some(LimitError::Total));
        drop(a2);
        assert_eq!(limits.open("a"), (2, 1));
        let id: SessionId = "s1".to_owned().into();
        limits.bind(a1, id.clone());
        assert_eq!(limits.owner("s1").as_deref(), Some("a"));
        assert_eq!(limits.open("a"), (2, 1));
        limits.close(&id);
        limits.close(&id);
        assert_eq!(limits.open("a"), (1, 0));
        drop(b1);
        assert_eq!(limits.open("b"), (0, 0));
    }
}
