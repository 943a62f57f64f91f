//! Bounds on MCP sessions: at most `MCP_MAX_SESSIONS` open in the process and
//! `MCP_MAX_SESSIONS_PER_TENANT` per tenant, each bound to the tenant that opened it.
//!
//! rmcp's session manager cannot see the request that creates a session, so the gate
//! reserves a slot before an `initialize` reaches rmcp (or before a session sealed by
//! another replica is rebuilt here) and hands the reservation over in a task-local;
//! [`BoundedSessions::create_session`] and `restore_session` turn it into an open session,
//! and `close_session` (DELETE, idle timeout, or the session's end) gives the slot back.
//! New sessions get a sealed id ([`super::sealed`]) that any replica can rebuild from.
//!
//! A session the client ended (`DELETE`) is recorded in the store by its id's digest (see
//! the gate), so its still well-sealed id is never rebuilt; on PostgreSQL every replica
//! hears of it ([`BoundedSessions::end_copy`]) and ends its own copy. Here the digests are
//! remembered too, so an ended id asked for again costs no query.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::Stream;
use rmcp::model::{ClientJsonRpcMessage, InitializeRequestParams, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::local::{
    LocalSessionManager, LocalSessionManagerError, LocalSessionWorker,
};
use rmcp::transport::streamable_http_server::session::{
    RestoreOutcome, ServerSseMessage, SessionId, SessionManager,
};
use rmcp::transport::WorkerTransport;

use super::fast_path::InFlight;
use super::sealed::{SealError, SessionClaims, SessionSeal, SESSION_ID_LIFETIME};
use crate::store::{answered_within, SharedStore, STORE_WAIT};

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
    owners: HashMap<SessionId, Owner>,
    /// Open sessions by their ids' digests, to find the one another replica says ended.
    by_digest: HashMap<String, SessionId>,
    /// Digests of sessions clients ended (here or elsewhere), so they are not rebuilt.
    ended: HashMap<String, Instant>,
    /// The same, oldest first, so that forgetting the oldest never scans the map (it runs
    /// under the lock every MCP request takes, for every session ended in the fleet).
    ended_order: VecDeque<(Instant, String)>,
}

impl State {
    /// Forgets ended sessions, oldest first, while they are past [`ENDED_TTL`] or more than
    /// `keep` are remembered.
    fn forget_ended(&mut self, now: Instant, keep: usize) {
        while let Some((at, _)) = self.ended_order.front() {
            let expired = now.duration_since(*at) >= ENDED_TTL;
            if !expired && self.ended_order.len() <= keep {
                break;
            }
            let Some((at, digest)) = self.ended_order.pop_front() else {
                break;
            };
            // Ended again since: the map holds the later time, and a later queue entry.
            if self.ended.get(&digest) == Some(&at) {
                self.ended.remove(&digest);
            }
        }
    }
}

/// Whose an open session is, and its id's digest.
struct Owner {
    tenant: String,
    digest: String,
    /// The tenant's API key hash when the session was opened (or rebuilt here): a session
    /// opened under a key since rotated ends ([`BoundedSessions::end_for_old_credentials`]).
    key: Vec<u8>,
    /// Ended by its client through another replica, and being closed here: the gate
    /// treats it as ended already rather than hand rmcp a session about to go.
    ending: bool,
    /// When rmcp last saw a request of the session (its idle timer starts again from each):
    /// calls the gate serves itself ([`super::fast_path`]) keep it alive only through this.
    seen_by_rmcp: Instant,
    /// When its client last sent a request of it, whoever served it: what keeps a session
    /// from idling out ([`SessionLimits::idle`]). rmcp's own timer restarts on what the
    /// server sends as well, such as a tool-list change, which would keep a session its
    /// client abandoned open for as long as its tenant's tools keep changing.
    heard: Instant,
}

/// The digest by which a session id is remembered and announced to the fleet: the id
/// itself is a credential-bound secret, and long.
pub fn digest(id: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// How long this replica remembers a session ended by `DELETE` (past that its id no longer
/// opens), and how many it remembers; the store's record, which the gate asks before it
/// rebuilds a session, is the full one.
const ENDED_TTL: Duration = SESSION_ID_LIFETIME;
const ENDED_MAX: usize = 100_000;

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
        crate::metrics::mcp_sessions(1);
        Ok(Reservation {
            limits: self.clone(),
            tenant: Some(tenant.to_owned()),
            key: Vec::new(),
        })
    }

    /// The sessions open here for `tenant` (not those ending), with the key hash each was
    /// opened under.
    pub fn sessions_of(&self, tenant: &str) -> Vec<(SessionId, Vec<u8>)> {
        let state = self.lock();
        let open = state
            .owners
            .iter()
            .filter(|(_, owner)| !owner.ending && owner.tenant == tenant);
        open.map(|(id, owner)| (id.clone(), owner.key.clone()))
            .collect()
    }

    /// The tenants with sessions open here.
    pub fn tenants_with_sessions(&self) -> Vec<String> {
        let state = self.lock();
        let tenants: std::collections::HashSet<&String> =
            state.owners.values().map(|owner| &owner.tenant).collect();
        tenants.into_iter().cloned().collect()
    }

    /// The tenant that opened session `id`, if it is open (and not being ended).
    pub fn owner(&self, id: &str) -> Option<String> {
        let state = self.lock();
        let owner = state.owners.get(id).filter(|owner| !owner.ending)?;
        Some(owner.tenant.clone())
    }

    /// As [`Self::owner`], for a request of `tenant` in session `id`: when that is the
    /// session's own tenant, its client is heard from, and the session is not idle.
    pub fn owner_hearing(&self, id: &str, tenant: &str) -> Option<String> {
        let mut state = self.lock();
        let owner = state.owners.get_mut(id).filter(|owner| !owner.ending)?;
        if owner.tenant == tenant {
            owner.heard = Instant::now();
        }
        Some(owner.tenant.clone())
    }

    /// The sessions open here whose client sent nothing for `longer_than`.
    pub fn idle(&self, longer_than: Duration) -> Vec<SessionId> {
        let state = self.lock();
        let idle = state
            .owners
            .iter()
            .filter(|(_, owner)| !owner.ending && owner.heard.elapsed() > longer_than);
        idle.map(|(id, _)| id.clone()).collect()
    }

    /// Whether session `id` is open here and not ending.
    pub fn is_open(&self, id: &str) -> bool {
        let state = self.lock();
        state.owners.get(id).is_some_and(|owner| !owner.ending)
    }

    /// Whether the gate may serve a request of session `id` itself ([`super::fast_path`]):
    /// the session is open here for `tenant`, not ending, and rmcp saw one of its requests
    /// less than `within` ago (so that its idle timer, which only rmcp's requests restart,
    /// is far from running out). When it may, the session's client is heard from, as in
    /// [`Self::owner_hearing`]: this request does not pass there.
    pub fn serves_itself(&self, id: &str, tenant: &str, within: Duration) -> bool {
        let mut state = self.lock();
        let Some(owner) = state.owners.get_mut(id) else {
            return false;
        };
        let serves =
            !owner.ending && owner.tenant == tenant && owner.seen_by_rmcp.elapsed() < within;
        if serves {
            owner.heard = Instant::now();
        }
        serves
    }

    /// Notes that a request of session `id` goes to rmcp (which restarts its idle timer).
    pub fn seen_by_rmcp(&self, id: &str) {
        if let Some(owner) = self.lock().owners.get_mut(id) {
            owner.seen_by_rmcp = Instant::now();
        }
    }

    /// Remembers that the client ended the session whose id has `digest` (DELETE, here or
    /// through another replica), so this replica does not rebuild it from its id; returns
    /// the id of this replica's copy if one is still open, for the caller to close.
    /// Bounded: expired entries go first; past the cap, the oldest.
    pub fn ended(&self, digest: String) -> Option<SessionId> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let now = Instant::now();
        state.forget_ended(now, ENDED_MAX - 1);
        let open = state.by_digest.get(&digest).cloned();
        if let Some(owner) = open.as_ref().and_then(|id| state.owners.get_mut(id)) {
            owner.ending = true;
        }
        state.ended.insert(digest.clone(), now);
        state.ended_order.push_back((now, digest));
        open
    }

    /// Whether this replica knows that the client ended the session whose id has `digest`
    /// (through this replica, or through another that told this one).
    pub fn was_ended(&self, digest: &str) -> bool {
        self.lock()
            .ended
            .get(digest)
            .is_some_and(|at| at.elapsed() < ENDED_TTL)
    }

    /// The digests of the sessions open here (not those being ended).
    pub fn open_digests(&self) -> Vec<String> {
        let state = self.lock();
        let open = state.owners.values().filter(|owner| !owner.ending);
        open.map(|owner| owner.digest.clone()).collect()
    }

    /// Sessions open (and reserved) now, in total and for `tenant`.
    pub fn open(&self, tenant: &str) -> (usize, usize) {
        let state = self.lock();
        let mine = state.per_tenant.get(tenant).copied().unwrap_or(0);
        (state.total, mine)
    }

    /// Makes `reservation` the slot of open session `id`; false, and the slot given back,
    /// when the session was ended meanwhile (a `DELETE`, here or elsewhere, while rmcp
    /// rebuilt it): the caller closes what rmcp opened.
    fn bind(&self, mut reservation: Reservation, id: SessionId) -> bool {
        let digest = digest(&id);
        if let Some(tenant) = reservation.tenant.take() {
            let mut state = self.lock();
            if state.ended.contains_key(&digest) {
                release(&mut state, &tenant);
                return false;
            }
            state.by_digest.insert(digest.clone(), id.clone());
            let owner = Owner {
                tenant,
                digest,
                key: std::mem::take(&mut reservation.key),
                ending: false,
                seen_by_rmcp: Instant::now(),
                heard: Instant::now(),
            };
            state.owners.insert(id, owner);
        }
        true
    }

    fn close(&self, id: &SessionId) {
        let mut state = self.lock();
        if let Some(owner) = state.owners.remove(id) {
            state.by_digest.remove(&owner.digest);
            release(&mut state, &owner.tenant);
        }
    }
}

fn release(state: &mut State, tenant: &str) {
    state.total = state.total.saturating_sub(1);
    crate::metrics::mcp_sessions(-1);
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
    /// The API key hash of the tenant record the request authenticated with.
    key: Vec<u8>,
}

impl Reservation {
    /// The slot of a session opened under the tenant's API key with this hash.
    pub fn under_key(mut self, key: &[u8]) -> Self {
        self.key = key.to_vec();
        self
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(tenant) = self.tenant.take() {
            release(&mut self.limits.lock(), &tenant);
        }
    }
}

/// What the gate hands to the session manager for the request being served.
pub struct Pending {
    reservation: Reservation,
    /// The `initialize` parameters of a request that opens a new session, sealed into its
    /// id; `None` when a known (sealed) session is being rebuilt on this replica.
    params: Option<InitializeRequestParams>,
}

impl Pending {
    /// A new session, opened by an `initialize` with `params`.
    pub fn open(reservation: Reservation, params: InitializeRequestParams) -> Self {
        let params = Some(params);
        Self {
            reservation,
            params,
        }
    }

    /// A session opened elsewhere (its id opened and names this tenant), rebuilt here.
    pub fn restore(reservation: Reservation) -> Self {
        Self {
            reservation,
            params: None,
        }
    }
}

tokio::task_local! {
    /// The reservation of the request being served, for the session manager to claim.
    static PENDING: RefCell<Option<Pending>>;
}

/// Runs `future` (the rest of the request) with `pending` available to
/// [`BoundedSessions`]. Unclaimed, its slot is released when the request ends.
pub async fn with_pending<F: std::future::Future>(pending: Pending, future: F) -> F::Output {
    PENDING.scope(RefCell::new(Some(pending)), future).await
}

fn take_pending() -> Option<Pending> {
    PENDING.try_with(|r| r.borrow_mut().take()).ok().flatten()
}

#[derive(Debug, thiserror::Error)]
pub enum BoundedError {
    /// A session was asked for without a reservation (not through the gate).
    #[error("no session slot was reserved for this request")]
    NotReserved,
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The fresh sealed id was already in use (a repeated nonce): refuse rather than share.
    #[error("a new session id collided with an open session")]
    Collision,
    #[error(transparent)]
    Local(#[from] LocalSessionManagerError),
}

/// rmcp's in-memory session manager, with the bounds of [`SessionLimits`] and sealed ids:
/// the sessions in memory are this replica's working copies of sessions whose state lives
/// in their ids.
pub struct BoundedSessions {
    inner: LocalSessionManager,
    limits: Arc<SessionLimits>,
    seal: SessionSeal,
    /// The calls the gate serves itself, cancelled with their session.
    fast_calls: Arc<InFlight>,
}

impl BoundedSessions {
    pub fn new(
        inner: LocalSessionManager,
        limits: Arc<SessionLimits>,
        seal: SessionSeal,
        fast_calls: Arc<InFlight>,
    ) -> Self {
        Self {
            inner,
            limits,
            seal,
            fast_calls,
        }
    }

    /// The digests of the sessions open here.
    pub fn open_digests(&self) -> Vec<String> {
        self.limits.open_digests()
    }

    /// Closes the sessions whose client sent nothing for `longer_than` (see
    /// [`SessionLimits::idle`]); their slots are given back.
    pub async fn close_idle(&self, longer_than: Duration) {
        for id in self.limits.idle(longer_than) {
            tracing::debug!("closing an idle MCP session");
            if let Err(error) = self.close_session(&id).await {
                tracing::debug!(%error, "could not close an idle MCP session");
            }
        }
    }

    /// The tenants with sessions open here.
    pub fn tenants_with_sessions(&self) -> Vec<String> {
        self.limits.tenants_with_sessions()
    }

    /// Ends the sessions open here of `tenant` that its credentials no longer open: all of
    /// them for a tenant deleted or disabled, those opened under an API key since rotated.
    /// Each of their requests is refused anyway; this gives their slots back, and ends their
    /// streams. Should the store not answer, it is asked again, with back-off, in a task of
    /// its own (the changes after this one must not wait behind it), for as long as the
    /// tenant has sessions open here.
    pub async fn end_for_old_credentials(self: &Arc<Self>, tenant: &str, store: &SharedStore) {
        if self.check_credentials(tenant, store).await {
            return;
        }
        let (me, tenant, store) = (self.clone(), tenant.to_owned(), store.clone());
        tokio::spawn(async move {
            let mut wait = Duration::from_secs(1);
            while !me.limits.sessions_of(&tenant).is_empty() {
                tokio::time::sleep(wait).await;
                if me.check_credentials(&tenant, &store).await {
                    return;
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        });
    }

    /// [`Self::end_for_old_credentials`] once; false when the store could not be asked.
    async fn check_credentials(&self, tenant: &str, store: &SharedStore) -> bool {
        let open = self.limits.sessions_of(tenant);
        if open.is_empty() {
            return true;
        }
        let now = match answered_within(STORE_WAIT, store.get_tenant(tenant)).await {
            Ok(now) => now,
            Err(error) => {
                tracing::warn!(%error, tenant_id = %tenant, "could not check a changed tenant's MCP sessions; will try again");
                return false;
            }
        };
        for (id, key) in open {
            let opens = now
                .as_ref()
                .is_some_and(|record| record.enabled && record.api_key_hash == key);
            if opens {
                continue;
            }
            tracing::debug!(tenant_id = %tenant, "ending an MCP session its credentials no longer open");
            if let Err(error) = self.close_session(&id).await {
                tracing::debug!(%error, "could not end an MCP session of a changed tenant");
            }
        }
        true
    }

    /// Ends this replica's copy of the session whose id has `digest`, which its client
    /// ended through another replica, and remembers it as ended.
    pub async fn end_copy(&self, digest: String) {
        let Some(id) = self.limits.ended(digest) else {
            return;
        };
        if let Err(error) = self.close_session(&id).await {
            tracing::debug!(%error, "could not end a copy of a session ended elsewhere");
        }
    }
}

impl SessionManager for BoundedSessions {
    type Error = BoundedError;
    type Transport = WorkerTransport<LocalSessionWorker>;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let pending = take_pending().ok_or(BoundedError::NotReserved)?;
        let params = pending.params.ok_or(BoundedError::NotReserved)?;
        let tenant = pending.reservation.tenant.clone().unwrap_or_default();
        let claims = SessionClaims::new(tenant, params);
        let id: SessionId = self.seal.seal(&claims)?.into();
        // rmcp's local manager makes a session under an id of our choosing through its
        // restore entry point.
        match self.inner.restore_session(id.clone()).await? {
            // A fresh random id: no end of it can have been heard.
            RestoreOutcome::Restored(transport)
                if self.limits.bind(pending.reservation, id.clone()) =>
            {
                Ok((id, transport))
            }
            _ => Err(BoundedError::Collision),
        }
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
        // rmcp cancels the requests of a session it closes; the gate's own calls too.
        self.fast_calls.cancel_session(id);
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

    /// Rebuilds here a session opened on another replica (or before a restart). rmcp calls
    /// this after our session store opened the id, and the gate checked that it names the
    /// authenticated tenant and reserved the slot. It also calls it for a request of a
    /// session that closed here after the gate saw it open (a `DELETE` or the idle timeout
    /// in between), with no slot reserved: that session is gone (404, and the client
    /// initialises again), as is one whose end was heard meanwhile.
    async fn restore_session(
        &self,
        id: SessionId,
    ) -> Result<RestoreOutcome<Self::Transport>, Self::Error> {
        let Some(pending) = take_pending() else {
            return Ok(RestoreOutcome::NotSupported);
        };
        if self.limits.was_ended(&digest(&id)) {
            return Ok(RestoreOutcome::NotSupported);
        }
        let outcome = self.inner.restore_session(id.clone()).await?;
        if matches!(outcome, RestoreOutcome::Restored(_))
            && !self.limits.bind(pending.reservation, id.clone())
        {
            // Ended while rmcp rebuilt it: what it rebuilt goes.
            drop(outcome);
            if let Err(error) = self.inner.close_session(&id).await {
                tracing::debug!(%error, "could not close a session ended as it was rebuilt");
            }
            return Ok(RestoreOutcome::NotSupported);
        }
        Ok(outcome)
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

    #[test]
    fn a_session_is_idle_until_its_own_tenant_is_heard_in_it() {
        let limits = SessionLimits::new(3, 3);
        let id: SessionId = "s1".to_owned().into();
        limits.bind(limits.reserve("a").expect("slot"), id.clone());
        std::thread::sleep(Duration::from_millis(20));
        let quiet = Duration::from_millis(10);
        assert_eq!(limits.idle(quiet), std::slice::from_ref(&id));
        // Another tenant's request in it is no sign of its client.
        assert_eq!(limits.owner_hearing("s1", "b").as_deref(), Some("a"));
        assert_eq!(limits.idle(quiet), std::slice::from_ref(&id));
        assert_eq!(limits.owner_hearing("s1", "a").as_deref(), Some("a"));
        assert!(limits.idle(quiet).is_empty());
        std::thread::sleep(Duration::from_millis(20));
        // A call the gate serves itself is heard too.
        assert!(limits.serves_itself("s1", "a", Duration::from_secs(60)));
        assert!(limits.idle(quiet).is_empty());
    }

    #[test]
    fn an_ended_session_is_remembered_by_digest_and_its_open_copy_named() {
        let limits = SessionLimits::new(3, 3);
        assert!(!limits.was_ended(&digest("s1")));
        let id: SessionId = "s1".to_owned().into();
        limits.bind(limits.reserve("a").expect("slot"), id.clone());
        assert_eq!(limits.open_digests(), vec![digest("s1")]);
        // Ended elsewhere while open here: the copy to close is named, and the id is ended
        // (no longer served as open) while it closes.
        assert_eq!(limits.ended(digest("s1")), Some(id.clone()));
        assert!(limits.was_ended(&digest("s1")));
        assert_eq!(limits.owner("s1"), None);
        assert!(limits.open_digests().is_empty());
        assert!(!limits.was_ended(&digest("s2")));
        limits.close(&id);
        assert_eq!(limits.open("a"), (0, 0));
        // No copy open: nothing to close, and still ended.
        assert_eq!(limits.ended(digest("s1")), None);
        assert_eq!(limits.ended(digest("s2")), None);
        assert!(limits.was_ended(&digest("s2")));
        // Ended while rmcp rebuilt it here: it is not bound, and its slot is given back.
        let rebuilt: SessionId = "s2".to_owned().into();
        assert!(!limits.bind(limits.reserve("a").expect("slot"), rebuilt));
        assert_eq!(limits.owner("s2"), None);
        assert_eq!(limits.open("a"), (0, 0));
        assert_eq!(digest("s1").len(), 64);
        assert_ne!(digest("s1"), digest("s2"));
    }

    #[test]
    fn past_the_cap_the_oldest_ended_session_is_forgotten_first() {
        let limits = SessionLimits::new(1, 1);
        let first = "first".to_owned();
        limits.ended(first.clone());
        for n in 1..ENDED_MAX - 1 {
            limits.ended(format!("d{n}"));
        }
        // Ended again: now the newest, so it outlives the ones ended after it the first time.
        limits.ended("d1".to_owned());
        assert!(limits.was_ended(&first));
        limits.ended("one more".to_owned());
        assert!(!limits.was_ended(&first), "the oldest goes first");
        assert!(limits.was_ended("d1") && limits.was_ended("d2"));
        limits.ended("two more".to_owned());
        limits.ended("three more".to_owned());
        assert!(!limits.was_ended("d2"), "d2 was the oldest left");
        assert!(limits.was_ended("d1") && limits.was_ended("d3"));
        let state = limits.lock();
        assert!(state.ended.len() <= ENDED_MAX && state.ended_order.len() <= ENDED_MAX);
    }
}
