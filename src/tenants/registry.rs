//! The registry actor: the supervisor of every tenant actor. It starts a tenant's actor on
//! first use, rebuilds it when the tenant changes, restarts it with back-off when it
//! crashes (and marks the tenant failing past `TENANT_MAX_RESTARTS` per window), and stops
//! them all on shutdown. The [`Directory`] it keeps is shared read-only with the
//! [`super::runtime::TenantRuntime`], so routing a call to a running actor costs a map read.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::actor::{TenantActor, TenantArgs};
use super::audit_buffer::AuditBuffer;
use super::backoff::Backoff;
use super::lane::Lane;
use super::messages::{CallError, RegistryMsg, TenantMsg};
use super::status::{ConnectionState, UpstreamStatus};
use super::{ChangeFeed, RuntimeSettings, TenantChange};
use crate::audit::AuditWriter;
use crate::cipher::TokenCipher;
use crate::store::{SharedStore, TenantRecord};
use crate::upstream::{TransportKind, UpstreamTarget};

/// A running tenant actor as the directory lists it.
#[derive(Clone)]
pub struct Running {
    pub actor: ActorRef<TenantMsg>,
    pub version: i64,
    pub status: Arc<Mutex<UpstreamStatus>>,
    /// The actor's ready connection, for calls that need no message (see `lane`).
    pub lane: Arc<Lane>,
    /// The actor's audit buffer, which callers append to without a message.
    pub audit: Arc<AuditBuffer>,
    /// Kept so that a crashed actor restarts with the same tenant (sealed secrets only).
    record: Arc<TenantRecord>,
}

/// Restart history of a tenant whose actor crashed.
struct History {
    recent: VecDeque<Instant>,
    total: u32,
    not_before: Instant,
    failing: bool,
    last_error: String,
    record: TenantRecord,
}

/// Restarts so far and, while a crashed actor waits for its restart, the state to show.
type CrashInfo = (u32, Option<(ConnectionState, String)>);

#[derive(Default)]
pub struct Directory {
    running: RwLock<HashMap<String, Running>>,
    restarts: RwLock<HashMap<String, CrashInfo>>,
}

impl Running {
    /// Whether the actor still takes work: one that idled out drains and closes its
    /// connection before it leaves the directory, and a call must not wait for that.
    pub fn serving(&self) -> bool {
        self.actor.get_status() < ractor::ActorStatus::Draining
    }
}

impl Directory {
    // A poisoned lock is read as it is: the maps hold whole entries, never half-written
    // ones, and treating them as empty would start a second actor for a running tenant.
    fn running(&self) -> RwLockReadGuard<'_, HashMap<String, Running>> {
        self.running.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn running_mut(&self) -> RwLockWriteGuard<'_, HashMap<String, Running>> {
        self.running.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, tenant_id: &str) -> Option<Running> {
        self.running().get(tenant_id).cloned()
    }

    pub fn len(&self) -> usize {
        self.running().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn status(&self, tenant_id: &str) -> UpstreamStatus {
        let mut status = self
            .get(tenant_id)
            .and_then(|r| r.status.lock().ok().map(|s| s.clone()))
            .unwrap_or_else(UpstreamStatus::stopped);
        if let Some((count, crash)) = self
            .restarts
            .read()
            .ok()
            .and_then(|r| r.get(tenant_id).cloned())
        {
            status.restarts = count;
            if let (Some((state, error)), ConnectionState::Stopped) = (crash, status.state) {
                status.state = state;
                status.last_error = Some(error);
            }
        }
        status
    }

    /// How many tenants are in each upstream state, as [`Self::status`] tells each: those
    /// with an actor running and those a crash left restarting or failing. Tenants with
    /// neither (never called, or idle) are not counted.
    pub fn count_by_state(&self) -> Vec<(ConnectionState, usize)> {
        let mut tenants: std::collections::HashSet<String> =
            self.running().keys().cloned().collect();
        if let Ok(restarts) = self.restarts.read() {
            tenants.extend(
                restarts
                    .iter()
                    .filter(|(_, (_, crash))| crash.is_some())
                    .map(|(tenant, _)| tenant.clone()),
            );
        }
        let mut counts: Vec<(ConnectionState, usize)> = ConnectionState::ALL
            .iter()
            .map(|state| (*state, 0))
            .collect();
        for tenant in tenants {
            let state = self.status(&tenant).state;
            if let Some((_, n)) = counts.iter_mut().find(|(s, _)| *s == state) {
                *n += 1;
            }
        }
        counts
    }

    fn insert(&self, tenant_id: String, running: Running) {
        self.running_mut().insert(tenant_id, running);
    }

    /// Removes the entry only if it is still `actor`'s (a newer one may have replaced it).
    fn remove(&self, tenant_id: &str, actor: ActorId) -> Option<Running> {
        let mut r = self.running_mut();
        if r.get(tenant_id).is_some_and(|e| e.actor.get_id() == actor) {
            r.remove(tenant_id)
        } else {
            None
        }
    }

    fn drain(&self) -> Vec<Running> {
        self.running
            .write()
            .map(|mut r| r.drain().map(|(_, v)| v).collect())
            .unwrap_or_default()
    }

    fn set_restarts(&self, tenant_id: &str, count: u32, crash: Option<(ConnectionState, String)>) {
        if let Ok(mut r) = self.restarts.write() {
            r.insert(tenant_id.to_owned(), (count, crash));
        }
    }

    /// The tenant's actor is running again: its crash no longer stands for its state (the
    /// count of restarts stays).
    fn recovered(&self, tenant_id: &str) {
        if let Ok(mut r) = self.restarts.write() {
            if let Some((_, crash)) = r.get_mut(tenant_id) {
                *crash = None;
            }
        }
    }

    /// The tenant changed or is gone: its restart history goes with its old actor.
    fn forget_restarts(&self, tenant_id: &str) {
        if let Ok(mut r) = self.restarts.write() {
            r.remove(tenant_id);
        }
    }
}

pub struct RegistryActor;

pub struct RegistryArgs {
    pub directory: Arc<Directory>,
    pub settings: Arc<RuntimeSettings>,
    pub store: SharedStore,
    /// Takes what a crashed tenant actor's audit buffer held.
    pub audit: AuditWriter,
    pub cipher: TokenCipher,
    pub default_upstream: url::Url,
    pub changes: ChangeFeed,
    pub shutdown: tokio_util::sync::CancellationToken,
}

pub struct RegistryState {
    args: RegistryArgs,
    /// Every tenant actor not yet gone, also those out of the directory that are still
    /// stopping (flushing their audit buffers): shutdown waits for all of them.
    by_actor: HashMap<ActorId, (String, ActorRef<TenantMsg>)>,
    history: HashMap<String, History>,
    /// Each started tenant's tool-list fingerprint, handed from one of its actors to the
    /// next (see `TenantArgs::tools_print`); at most [`TOOL_PRINTS_MAX`].
    tool_prints: HashMap<String, Arc<AtomicU64>>,
    backoff: Backoff,
    changes: RecentChanges,
    /// The callers waiting for a tenant read again before its start, by tenant: one read
    /// at a time for each, however many calls wait.
    reading: HashMap<String, Vec<StartReply>>,
    /// `StopAll` came: no actor starts after it, for the process would exit under it.
    stopping: bool,
}

/// Where a `Start`'s answer goes.
type StartReply = ractor::RpcReplyPort<Result<ActorRef<TenantMsg>, CallError>>;

/// Reads of a tenant that changed again during each, at most, before its callers are
/// told to retry.
const READS_AGAIN: u32 = 3;

/// Why a tenant read again is not started from.
enum ReadAgain {
    /// It could not be read (why).
    Unread(String),
    /// It changed again after the read began.
    ChangedSince,
    /// Deleted or disabled since the caller read it.
    Gone,
}

impl From<ReadAgain> for CallError {
    fn from(again: ReadAgain) -> Self {
        let reason = match again {
            ReadAgain::Unread(why) => why,
            ReadAgain::ChangedSince => "the tenant changed again during this request".into(),
            ReadAgain::Gone => {
                "the tenant was changed, disabled or deleted during this request".into()
            }
        };
        CallError::Unavailable {
            reason,
            retry_after: Duration::from_secs(1),
        }
    }
}

/// How long a record a caller holds may predate a change it has not seen: the caller
/// authenticated (and read its record) before the change, and asks for the actor after.
/// Far longer than the microseconds this normally takes, so a loaded replica is covered.
const STALE_RECORD_WINDOW: Duration = Duration::from_secs(60);
/// How long the registry waits to read a recently changed tenant again before a start.
const REREAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Tool-list fingerprints kept at most (one per tenant started since): past it they are
/// all forgotten, and the next list each tenant loads is told to no MCP session.
const TOOL_PRINTS_MAX: usize = 100_000;

/// The tenants that changed (or were deleted) in the last [`STALE_RECORD_WINDOW`]. A call
/// that starts one of their actors may carry a record read before the change: the registry
/// reads the tenant again rather than start an actor for a deleted or disabled tenant, or
/// with credentials that were just replaced.
#[derive(Default)]
struct RecentChanges {
    tenants: HashMap<String, Instant>,
    /// When every tenant was announced changed (the fleet listener missed notifications).
    all: Option<Instant>,
    /// The tenants read again since `all`: each is read once after it, not on every start.
    settled_since_all: HashSet<String>,
}

impl RecentChanges {
    fn one(&mut self, tenant_id: &str, now: Instant) {
        self.tenants
            .retain(|_, at| now.duration_since(*at) < STALE_RECORD_WINDOW);
        self.tenants.insert(tenant_id.to_owned(), now);
    }

    fn all(&mut self, now: Instant) {
        self.tenants.clear();
        self.settled_since_all.clear();
        self.all = Some(now);
    }

    fn recent(&self, tenant_id: &str, now: Instant) -> bool {
        let fresh = |at: &Instant| now.duration_since(*at) < STALE_RECORD_WINDOW;
        let all =
            self.all.as_ref().is_some_and(fresh) && !self.settled_since_all.contains(tenant_id);
        all || self.tenants.get(tenant_id).is_some_and(fresh)
    }

    /// The tenant was read by a read that began at `read_at`: the changes before it are
    /// settled, and records from then on are current; one after it is not.
    fn settled(&mut self, tenant_id: &str, read_at: Instant) {
        if self
            .tenants
            .get(tenant_id)
            .is_some_and(|changed| *changed <= read_at)
        {
            self.tenants.remove(tenant_id);
        }
        match self.all {
            // A reload announced after the read began: that read does not settle it.
            Some(at) if at > read_at => {}
            Some(at) if read_at.duration_since(at) < STALE_RECORD_WINDOW => {
                self.settled_since_all.insert(tenant_id.to_owned());
            }
            _ => {
                self.all = None;
                self.settled_since_all = HashSet::new();
            }
        }
    }
}

impl Actor for RegistryActor {
    type Msg = RegistryMsg;
    type State = RegistryState;
    type Arguments = RegistryArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RegistryMsg>,
        args: RegistryArgs,
    ) -> Result<RegistryState, ActorProcessingErr> {
        let mut feed = args.changes.subscribe();
        let stop = args.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    next = feed.recv() => match next {
                        Ok(TenantChange::One(id)) => RegistryMsg::Changed(id),
                        Ok(TenantChange::All) => RegistryMsg::ChangedAll,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => RegistryMsg::ChangedAll,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    },
                };
                if myself.cast(msg).is_err() {
                    break;
                }
            }
        });
        Ok(RegistryState {
            backoff: Backoff {
                base: args.settings.restart_base,
                max: Duration::from_secs(30),
            },
            args,
            by_actor: HashMap::new(),
            history: HashMap::new(),
            tool_prints: HashMap::new(),
            changes: RecentChanges::default(),
            reading: HashMap::new(),
            stopping: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<RegistryMsg>,
        msg: RegistryMsg,
        state: &mut RegistryState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RegistryMsg::Start { record, reply } => {
                // A caller that gave up (its request timed out while this mailbox was
                // busy) is not worth a start, nor the store read a start may need.
                if reply.is_closed() {
                    return Ok(());
                }
                // For a minute after a change a caller's record may predate it: the tenant
                // is read again first, off this mailbox, so that a slow store holds up no
                // other tenant's start.
                let served = state.serving(&record).is_some();
                if !served && state.changes.recent(&record.id, Instant::now()) {
                    state.read_again(&myself, record.id, reply);
                    return Ok(());
                }
                let result = state.start(&myself, *record, true).await;
                let _ = reply.send(result);
            }
            RegistryMsg::ReadAgain {
                tenant_id,
                asked_at,
                attempt,
                read,
            } => {
                let mut waiting = state.reading.remove(&tenant_id).unwrap_or_default();
                // Callers that gave up are not worth a start.
                waiting.retain(|reply| !reply.is_closed());
                if waiting.is_empty() {
                    return Ok(());
                }
                let result = match state.read_again_answered(asked_at, *read) {
                    Ok(record) => state.start(&myself, record, true).await,
                    // Changed during the read (a change made here is heard twice: at once,
                    // and a moment later from the database): once more, from now.
                    Err(ReadAgain::ChangedSince) if attempt < READS_AGAIN => {
                        state.reading.insert(tenant_id.clone(), waiting);
                        state.spawn_read(&myself, tenant_id, attempt + 1);
                        return Ok(());
                    }
                    Err(again) => Err(again.into()),
                };
                for reply in waiting {
                    let _ = reply.send(result.clone());
                }
            }
            RegistryMsg::Restart(tenant_id) if !state.stopping => {
                if let Some(record) = state.history.get(&tenant_id).map(|h| h.record.clone()) {
                    if state.args.directory.get(&tenant_id).is_none() {
                        if let Err(err) = state.start(&myself, record, false).await {
                            tracing::warn!(%tenant_id, error = %err, "tenant restart failed");
                        }
                    }
                }
            }
            RegistryMsg::Changed(tenant_id) => {
                state.changes.one(&tenant_id, Instant::now());
                state.stop_tenant(&tenant_id, "tenant changed");
            }
            RegistryMsg::ChangedAll => {
                state.changes.all(Instant::now());
                for running in state.args.directory.drain() {
                    let _ = running.actor.drain();
                }
                // As for one changed tenant: a crashed actor's record may be stale now (a
                // restart pending would start from it), and its back-off belongs to the
                // tenant as it was.
                for tenant_id in std::mem::take(&mut state.history).into_keys() {
                    state.args.directory.forget_restarts(&tenant_id);
                }
            }
            RegistryMsg::Restart(_) => {}
            RegistryMsg::StopAll(reply) => {
                state.stopping = true;
                state.stop_all().await;
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RegistryMsg>,
        event: SupervisionEvent,
        state: &mut RegistryState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                state.crashed(&myself, cell, err.to_string())
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some((tenant_id, _)) = state.by_actor.remove(&cell.get_id()) {
                    state.args.directory.remove(&tenant_id, cell.get_id());
                    tracing::debug!(%tenant_id, ?reason, "tenant actor stopped");
                    crate::metrics::actor_stopped();
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl RegistryState {
    async fn start(
        &mut self,
        myself: &ActorRef<RegistryMsg>,
        record: TenantRecord,
        from_call: bool,
    ) -> Result<ActorRef<TenantMsg>, CallError> {
        if self.stopping {
            // A call that passed the drain's check just before it: its actor would not be
            // waited for, nor its audit buffer written.
            return Err(CallError::Unavailable {
                reason: "the gateway is shutting down".into(),
                retry_after: Duration::from_secs(1),
            });
        }
        let tenant_id = record.id.clone();
        if let Some(actor) = self.serving(&record) {
            return Ok(actor);
        }
        // From here a serving actor runs an older version than `record` (versions only
        // grow), so it is replaced.
        let serving = self.args.directory.get(&tenant_id).filter(Running::serving);
        if serving.is_some() {
            self.stop_tenant(&tenant_id, "tenant changed");
        }
        if let Some(history) = self.history.get(&tenant_id) {
            let now = Instant::now();
            if from_call && now < history.not_before {
                return Err(CallError::Unavailable {
                    reason: format!("tenant restarting after a failure: {}", history.last_error),
                    retry_after: history.not_before - now,
                });
            }
        }
        let target = self.target(&record)?;
        let status = Arc::new(Mutex::new(UpstreamStatus::stopped()));
        let lane = Arc::new(Lane::default());
        let settings = &self.args.settings;
        let audit = Arc::new(AuditBuffer::new(
            settings.audit_buffer,
            settings.audit_batch,
            self.args.audit.clone(),
        ));
        let args = TenantArgs {
            lane: lane.clone(),
            audit_buffer: audit.clone(),
            record: record.clone(),
            target,
            settings: self.args.settings.clone(),
            store: self.args.store.clone(),
            audit: self.args.audit.clone(),
            status: status.clone(),
            changes: self.args.changes.clone(),
            tools_print: self.tools_print(&tenant_id),
        };
        let (actor, _) = Actor::spawn_linked(None, TenantActor, args, myself.get_cell())
            .await
            .map_err(|e| CallError::Unavailable {
                reason: format!("tenant actor did not start: {e}"),
                retry_after: Duration::from_secs(1),
            })?;
        crate::metrics::actor_started();
        self.args.directory.recovered(&tenant_id);
        self.by_actor
            .insert(actor.get_id(), (tenant_id.clone(), actor.clone()));
        self.args.directory.insert(
            tenant_id,
            Running {
                actor: actor.clone(),
                version: record.version,
                status,
                lane,
                audit,
                record: Arc::new(record),
            },
        );
        Ok(actor)
    }

    /// The serving actor of `record`'s tenant, if it runs `record`'s version or a later
    /// one. An actor that is stopping (idle) is not serving; it leaves on its own.
    fn serving(&self, record: &TenantRecord) -> Option<ActorRef<TenantMsg>> {
        let running = self
            .args
            .directory
            .get(&record.id)
            .filter(Running::serving)?;
        (running.version >= record.version).then(|| running.actor.clone())
    }

    /// Has `reply` wait for tenant `tenant_id` read as the store has it now (a caller's
    /// copy may predate a change this registry has heard of), joining a read in flight.
    fn read_again(&mut self, myself: &ActorRef<RegistryMsg>, tenant_id: String, reply: StartReply) {
        use std::collections::hash_map::Entry;
        match self.reading.entry(tenant_id) {
            Entry::Occupied(mut waiting) => waiting.get_mut().push(reply),
            Entry::Vacant(waiting) => {
                let tenant_id = waiting.key().clone();
                waiting.insert(vec![reply]);
                self.spawn_read(myself, tenant_id, 1);
            }
        }
    }

    /// Reads tenant `tenant_id` in a task of its own (bounded by [`REREAD_TIMEOUT`]), and
    /// hands the read back to this mailbox ([`RegistryMsg::ReadAgain`]).
    fn spawn_read(&self, myself: &ActorRef<RegistryMsg>, tenant_id: String, attempt: u32) {
        let (store, me) = (self.args.store.clone(), myself.clone());
        let asked_at = Instant::now();
        tokio::spawn(async move {
            let reading = tokio::time::timeout(REREAD_TIMEOUT, store.get_tenant(&tenant_id));
            let read = match reading.await {
                Ok(Ok(now)) => Ok(now),
                Ok(Err(err)) => Err(format!(
                    "the tenant could not be read again after a change: {err}"
                )),
                Err(_) => {
                    Err("the store was too slow to read the tenant again after a change".into())
                }
            };
            // A registry gone drops its waiting callers' replies: they hear of it.
            let _ = me.cast(RegistryMsg::ReadAgain {
                tenant_id,
                asked_at,
                attempt,
                read: Box::new(read),
            });
        });
    }

    /// The tenant to start from a read begun at `asked_at`: a tenant deleted or disabled
    /// since gets no actor, and one changed again after the read began is not started from
    /// it.
    fn read_again_answered(
        &mut self,
        asked_at: Instant,
        read: Result<Option<TenantRecord>, String>,
    ) -> Result<TenantRecord, ReadAgain> {
        match read.map_err(ReadAgain::Unread)? {
            Some(now) if now.enabled => {
                self.changes.settled(&now.id, asked_at);
                if self.changes.recent(&now.id, Instant::now()) {
                    return Err(ReadAgain::ChangedSince);
                }
                Ok(now)
            }
            _ => Err(ReadAgain::Gone),
        }
    }

    /// The upstream endpoint and credentials of `record`; the token is opened here, and
    /// lives from now on only in the tenant actor's memory.
    fn target(&self, record: &TenantRecord) -> Result<UpstreamTarget, CallError> {
        let token = self
            .args
            .cipher
            .open(&record.id, &record.sealed_token)
            .map_err(|_| {
                CallError::Upstream(
                    "the tenant's upstream token cannot be opened (ENCRYPTION_KEY changed?)".into(),
                )
            })?;
        let url = match &record.upstream_url {
            Some(custom) => url::Url::parse(custom)
                .map_err(|_| CallError::Upstream("the tenant's upstreamUrl is invalid".into()))?,
            None => {
                let mut url = self.args.default_upstream.clone();
                url.query_pairs_mut()
                    .append_pair("integrationKey", &record.integration_key);
                url
            }
        };
        Ok(UpstreamTarget {
            url,
            token,
            transport: match record.upstream_transport {
                crate::store::UpstreamTransport::StreamableHttp => TransportKind::StreamableHttp,
                crate::store::UpstreamTransport::Sse => TransportKind::Sse,
                crate::store::UpstreamTransport::Auto => TransportKind::Auto,
            },
            connect_timeout: self.args.settings.connect_timeout,
            client_name: "switchboard".into(),
            max_in_flight: self.args.settings.max_in_flight,
            call_timeout: self.args.settings.upstream_timeout,
        })
    }

    /// The tenant's tool-list fingerprint, kept for its next actor.
    fn tools_print(&mut self, tenant_id: &str) -> Arc<AtomicU64> {
        if self.tool_prints.len() >= TOOL_PRINTS_MAX && !self.tool_prints.contains_key(tenant_id) {
            self.tool_prints.clear();
        }
        self.tool_prints
            .entry(tenant_id.to_owned())
            .or_default()
            .clone()
    }

    fn stop_tenant(&mut self, tenant_id: &str, reason: &str) {
        let found = self
            .args
            .directory
            .get(tenant_id)
            .and_then(|r| self.args.directory.remove(tenant_id, r.actor.get_id()));
        if let Some(running) = found {
            tracing::debug!(%tenant_id, reason, "stopping tenant actor");
            let _ = running.actor.drain();
        }
        self.history.remove(tenant_id);
        self.args.directory.forget_restarts(tenant_id);
    }

    fn crashed(&mut self, myself: &ActorRef<RegistryMsg>, cell: ActorCell, error: String) {
        let Some((tenant_id, _)) = self.by_actor.remove(&cell.get_id()) else {
            return;
        };
        let Some(running) = self.args.directory.remove(&tenant_id, cell.get_id()) else {
            return;
        };
        crate::metrics::actor_restarted();
        let now = Instant::now();
        let settings = &self.args.settings;
        let history = self
            .history
            .entry(tenant_id.clone())
            .or_insert_with(|| History {
                recent: VecDeque::new(),
                total: 0,
                not_before: now,
                failing: false,
                last_error: String::new(),
                record: running.record.as_ref().clone(),
            });
        history.recent.push_back(now);
        while history
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > settings.restart_window)
        {
            history.recent.pop_front();
        }
        history.total += 1;
        history.last_error = error;
        history.failing = history.recent.len() as u32 > settings.max_restarts;
        let delay = if history.failing {
            Duration::from_secs(30)
        } else {
            self.backoff.delay(history.recent.len() as u32)
        };
        history.not_before = now + delay;
        let crash_state = if history.failing {
            ConnectionState::Failing
        } else {
            ConnectionState::Connecting
        };
        self.args.directory.set_restarts(
            &tenant_id,
            history.total,
            Some((crash_state, history.last_error.clone())),
        );
        tracing::warn!(%tenant_id, restarts = history.total, failing = history.failing, ?delay, "tenant actor crashed");
        if !history.failing {
            myself.send_after(delay, move || RegistryMsg::Restart(tenant_id));
        }
    }

    async fn stop_all(&mut self) {
        let grace = self.args.settings.actor_stop_bound() + Duration::from_secs(1);
        for running in self.args.directory.drain() {
            let _ = running.actor.drain();
        }
        // Those just drained, and those stopped before (a tenant changed, a full reload, an
        // idle one) that are still letting calls finish and writing their audit buffers:
        // the process must not exit under them.
        let stops = self
            .by_actor
            .values()
            .map(|(_, actor)| actor.wait(Some(grace)));
        futures::future::join_all(stops).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_full_reload_each_tenant_is_read_again_once() {
        let mut changes = RecentChanges::default();
        let now = Instant::now();
        assert!(!changes.recent("a", now));
        changes.all(now);
        assert!(changes.recent("a", now) && changes.recent("b", now));
        changes.settled("a", now);
        assert!(!changes.recent("a", now), "read again since the reload");
        assert!(changes.recent("b", now), "not read yet");
        // A change of its own after that makes it recent again.
        changes.one("a", now);
        assert!(changes.recent("a", now));
        changes.settled("a", now);
        assert!(!changes.recent("a", now));
        // A read that began before a change does not settle it, nor a reload after it.
        let later = now + Duration::from_millis(1);
        changes.one("a", later);
        changes.settled("a", now);
        assert!(changes.recent("a", later));
        changes.settled("a", later);
        changes.all(later);
        changes.settled("b", now);
        assert!(changes.recent("b", later), "read before the reload");
        // Another reload: every tenant once more.
        changes.all(now);
        assert!(changes.recent("a", now));
        // Past the window nothing is recent.
        assert!(!changes.recent("b", now + STALE_RECORD_WINDOW));
    }
}
