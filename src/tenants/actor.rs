//! One actor per tenant. It owns the tenant's upstream connection (and so its credentials),
//! tool-list cache, rate limiter and in-flight limit, and writes the tenant's audit buffer
//! (which callers append to, see [`super::audit_buffer`]). It never waits on the
//! upstream inside a handler: connects, tool listings and audit writes run as tasks that
//! report back by message, and calls run in the caller's task with a [`Lease`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{clock::Clock, DefaultDirectRateLimiter, Quota};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::announce::Coalesced;
use super::audit_buffer::AuditBuffer;
use super::backoff::Backoff;
use super::lane::{self, Lane};
use super::messages::{AuditWrite, CallError, Lease, TenantMsg, ToolList};
use super::status::{ConnectionState, UpstreamStatus};
use super::{ChangeFeed, RuntimeSettings};
use crate::audit::{append_within, AuditWriter, ATTEMPT};
use crate::store::{SharedStore, TenantRecord};
use crate::upstream::{
    UpstreamClient, UpstreamError, UpstreamEvent, UpstreamFailure, UpstreamTarget,
};

/// How often a tenant's tool-list changes reach this replica's MCP sessions at most.
const TELL_EVERY: Duration = Duration::from_millis(100);

pub struct TenantActor;

pub struct TenantArgs {
    pub record: TenantRecord,
    pub target: UpstreamTarget,
    pub settings: Arc<RuntimeSettings>,
    pub store: SharedStore,
    /// Takes the audit batch a crashed actor was writing.
    pub audit: AuditWriter,
    /// The tenant's tool-call events, which this actor writes in batches.
    pub audit_buffer: Arc<AuditBuffer>,
    /// Read by the registry for `GET /api/tenants/{id}` without messaging the actor.
    pub status: Arc<Mutex<UpstreamStatus>>,
    /// Where this actor publishes its ready connection for calls to take without a message.
    pub lane: Arc<Lane>,
    /// Where this actor tells the tenant's MCP sessions that its tool list changed.
    pub changes: ChangeFeed,
    /// The fingerprint of the tenant's tool list as last loaded, kept by the registry
    /// from one actor of the tenant to the next (see `TenantState::tools_print`).
    pub tools_print: Arc<AtomicU64>,
}

enum Connection {
    Idle,
    Connecting(Vec<RpcReplyPort<Result<Lease, CallError>>>),
    Ready(UpstreamClient),
    /// Too many failures in a row: refuse calls until `until`, then try again.
    Failing {
        until: Instant,
    },
}

/// Stale tool-list loads in a row after which waiting calls get the latest list anyway.
pub(super) const MAX_STALE_LOADS: u32 = 2;

pub struct TenantState {
    tenant_id: String,
    target: UpstreamTarget,
    settings: Arc<RuntimeSettings>,
    store: SharedStore,
    status: Arc<Mutex<UpstreamStatus>>,
    connection: Connection,
    /// Bumped per connect attempt; messages about older connections are ignored.
    generation: u64,
    tools: Option<(Arc<ToolList>, Instant)>,
    /// The connection (`generation`) the cached list was loaded on; 0 once that session was
    /// renewed (`UpstreamEvent::SessionRenewed`).
    tools_from: u64,
    /// The fingerprint of the list last loaded, by this actor or the tenant's actor before
    /// it (0: none yet, or after an upstream's own change notice, which the tenant's MCP
    /// sessions were told of already), so that a load that finds another list (after a
    /// refresh, the TTL, a new connection, a change of the tenant) can tell them.
    tools_print: Arc<AtomicU64>,
    tool_waiters: Vec<RpcReplyPort<Result<Arc<ToolList>, CallError>>>,
    /// Bumped whenever a list loaded from before can no longer be trusted: a refresh, a
    /// change notice, a new connection. A load answers only if its epoch is still current.
    tools_epoch: u64,
    /// Whether a load is in flight: one at a time, however often the list changes.
    tools_loading: bool,
    /// The last load of the tool list failed (an error the upstream answered, a list too
    /// long): until one succeeds, a list request that starts a load spends the rate limit
    /// as a call does, or a failure that leaves nothing cached would let every `listTools`
    /// ask the upstream for the whole list again, at any rate.
    list_failed: bool,
    /// Loads in a row that came back stale while calls waited for the list.
    stale_loads: u32,
    in_flight: Arc<Semaphore>,
    limiter: Arc<DefaultDirectRateLimiter>,
    /// The replica count the limiter was built for; a new count rebuilds it.
    limiter_replicas: u32,
    /// Kept to rebuild the limiter when the replica count changes.
    record: TenantRecord,
    failures: u32,
    /// The connection (`generation`) a ping is checking, after a call on it timed out.
    pinging: Option<u64>,
    last_error: Option<String>,
    /// Until when the upstream asked not to be sent another `initialize` (its 429's
    /// `Retry-After`): calls are refused as the tenant's limit until then, with no connect.
    throttled_until: Option<Instant>,
    last_used: Instant,
    /// Cancelled when this state drops (the actor stopped or crashed): see
    /// `TenantMsg::WatchStop`.
    stopped: CancellationToken,
    _stopping: DropGuard,
    /// The process's tool-change feed, which the tenant's MCP sessions hear.
    changes: ChangeFeed,
    /// The tenant's tool-call events, appended by callers; shared with the registry's
    /// directory, and handed to `audit_queue` (closed) when this state drops.
    audit: Arc<AuditBuffer>,
    /// The batch write in flight, and how many events it carries. Its outcome is the
    /// task's output, which the actor takes when the task's `AuditWritten` arrives, or
    /// when it stops; after a crash, `Drop` hands it to `audit_queue`.
    audit_write: Option<(tokio::task::JoinHandle<AuditWrite>, usize)>,
    /// The process's audit writer, which takes the batch a crashed actor was writing: it
    /// retries while the store refuses, and is flushed at shutdown.
    audit_queue: AuditWriter,
    /// Tool-list change announcements to the other replicas, one in flight at a time.
    announcing: Coalesced,
    /// The same to this replica's sessions (see `tell_tool_change`).
    telling: Coalesced,
    ticker: tokio::task::JoinHandle<()>,
    lane: Arc<Lane>,
    /// What the lane shows now (generation, tool list, limiter), to publish only changes.
    lane_shows: Option<LaneShows>,
}

type LaneShows = (u64, Arc<ToolList>, Arc<DefaultDirectRateLimiter>);

/// This replica's share of the tenant's limit: the limit is for the whole fleet, so with
/// `replicas` replicas each allows 1/N of it (rounded up, at least 1).
fn quota(record: &TenantRecord, settings: &RuntimeSettings, replicas: u32) -> Quota {
    let (rps, burst) = match record.rate_limit {
        Some(limit) => (limit.requests_per_second, limit.burst),
        None => (settings.rate_per_second, settings.rate_burst),
    };
    let replicas = replicas.max(1);
    let (rps, burst) = (rps.div_ceil(replicas), burst.div_ceil(replicas));
    let rps = std::num::NonZeroU32::new(rps.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    let burst = std::num::NonZeroU32::new(burst.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    Quota::per_second(rps).allow_burst(burst)
}

impl Actor for TenantActor {
    type Msg = TenantMsg;
    type State = TenantState;
    type Arguments = TenantArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<TenantMsg>,
        args: TenantArgs,
    ) -> Result<TenantState, ActorProcessingErr> {
        let settings = args.settings;
        let tick = settings.tick_interval();
        let me = myself.clone();
        let ticker = tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await;
            loop {
                interval.tick().await;
                if me.cast(TenantMsg::Tick).is_err() {
                    break;
                }
            }
        });
        let stopped = CancellationToken::new();
        let replicas = settings.replica_count();
        set_status(&args.status, |s| s.state = ConnectionState::Stopped);
        Ok(TenantState {
            tenant_id: args.record.id.clone(),
            limiter: Arc::new(DefaultDirectRateLimiter::direct(quota(
                &args.record,
                &settings,
                replicas,
            ))),
            limiter_replicas: replicas,
            record: args.record.clone(),
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            target: args.target,
            store: args.store,
            status: args.status,
            connection: Connection::Idle,
            generation: 0,
            tools: None,
            tools_from: 0,
            tools_print: args.tools_print,
            tool_waiters: Vec::new(),
            tools_epoch: 0,
            tools_loading: false,
            list_failed: false,
            stale_loads: 0,
            failures: 0,
            pinging: None,
            last_error: None,
            throttled_until: None,
            last_used: Instant::now(),
            _stopping: stopped.clone().drop_guard(),
            stopped,
            changes: args.changes,
            audit: args.audit_buffer,
            audit_write: None,
            audit_queue: args.audit,
            announcing: Coalesced::default(),
            telling: Coalesced::default(),
            ticker,
            lane: args.lane,
            lane_shows: None,
            settings,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<TenantMsg>,
        msg: TenantMsg,
        state: &mut TenantState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TenantMsg::Lease { tool, reply } => state.lease(&myself, tool, reply),
            TenantMsg::Tools {
                refresh,
                spent,
                reply,
            } => state.tools(&myself, refresh, spent, reply),
            TenantMsg::Spend(reply) => {
                state.follow_replica_count();
                let _ = reply.send(admit(&state.limiter));
            }
            TenantMsg::Outcome {
                generation,
                failure,
            } => state.outcome(generation, failure),
            TenantMsg::TimedOut { generation } => state.timed_out(&myself, generation),
            TenantMsg::Pinged { generation, result } => state.pinged(generation, result),
            TenantMsg::AuditBatch => state.flush_audit(&myself),
            TenantMsg::WatchStop(reply) => {
                let _ = reply.send(state.stopped.clone());
            }
            TenantMsg::Connected { generation, result } => {
                state.connected(&myself, generation, result)
            }
            TenantMsg::ToolsLoaded {
                generation,
                epoch,
                result,
            } => state.tools_loaded(&myself, generation, epoch, result),
            TenantMsg::Upstream { generation, event } => {
                state.upstream_event(&myself, generation, event)
            }
            TenantMsg::AuditWritten => state.audit_written(&myself).await,
            TenantMsg::Tick => state.tick(&myself),
            TenantMsg::Panic => panic!("injected fault in tenant {}", state.tenant_id),
        }
        state.publish_lane();
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<TenantMsg>,
        state: &mut TenantState,
    ) -> Result<(), ActorProcessingErr> {
        state.ticker.abort();
        state.lane.set(None);
        state.let_waiters_go();
        state.stop().await;
        Ok(())
    }
}

/// However the actor ends (a panic skips `post_stop`), its lane stops serving calls, and
/// its audit buffer is closed: what it still holds, and every event appended later, goes
/// to the audit writer's queue (see [`TenantState::hand_over_audit`]). After a normal stop
/// nothing is left but the events appended since.
impl Drop for TenantState {
    fn drop(&mut self) {
        self.lane.set(None);
        self.hand_over_audit();
    }
}

/// A batch write whose task ended without an outcome (it panicked, or was aborted): its
/// `n` events are lost, and counted so.
fn batch_lost(n: usize) {
    tracing::error!(events = n, "an audit batch write failed: events lost");
    crate::metrics::audit_dropped(n as u64);
    crate::metrics::audit_pending(-(n as i64));
}

fn set_status(status: &Mutex<UpstreamStatus>, change: impl FnOnce(&mut UpstreamStatus)) {
    if let Ok(mut s) = status.lock() {
        change(&mut s);
    }
}

impl TenantState {
    fn lease(
        &mut self,
        myself: &ActorRef<TenantMsg>,
        tool: String,
        reply: RpcReplyPort<Result<Lease, CallError>>,
    ) {
        self.last_used = Instant::now();
        self.follow_replica_count();
        // A name the fresh list does not hold never reaches the upstream, so it spends no
        // part of the limit (nor starts a connection). Without a fresh list the name cannot
        // be checked yet, and the call spends as any call does.
        if self
            .fresh_tools()
            .is_some_and(|tools| !tools.contains(&tool))
        {
            let _ = reply.send(Err(CallError::UnknownTool(tool)));
            return;
        }
        // The limit is spent by a call that goes on towards the upstream: not by one
        // refused as busy (its place in flight taken first), for a failing upstream, or for
        // one that asked to be left alone for a while (a 429 to `initialize`).
        if let Some(failing) = self.backing_off() {
            let _ = reply.send(Err(failing));
            return;
        }
        match &mut self.connection {
            Connection::Ready(client) => {
                let client = client.clone();
                let lease = self
                    .make_lease(client)
                    .and_then(|lease| admit(&self.limiter).map(|()| lease));
                let _ = reply.send(lease);
            }
            Connection::Connecting(waiters) => {
                // Callers that gave up while it connects leave their place, as a list
                // request's do.
                waiters.retain(|waiter| !waiter.is_closed());
                if waiters.len() >= self.settings.max_in_flight {
                    let _ = reply.send(Err(busy()));
                } else if let Err(limited) = admit(&self.limiter) {
                    let _ = reply.send(Err(limited));
                } else {
                    waiters.push(reply);
                }
            }
            // In its back-off it was refused above; past it, connected again.
            Connection::Idle | Connection::Failing { .. } => {
                if let Err(limited) = admit(&self.limiter) {
                    let _ = reply.send(Err(limited));
                    return;
                }
                self.connection = Connection::Connecting(vec![reply]);
                self.start_connect(myself);
            }
        }
    }

    /// Rebuilds the limiter when replicas joined or left (a fresh limiter starts with a
    /// full burst; a fleet changes rarely, so that is fine).
    fn follow_replica_count(&mut self) {
        let replicas = self.settings.replica_count();
        if replicas != self.limiter_replicas {
            self.limiter = Arc::new(DefaultDirectRateLimiter::direct(quota(
                &self.record,
                &self.settings,
                replicas,
            )));
            self.limiter_replicas = replicas;
        }
    }

    fn make_lease(&self, client: UpstreamClient) -> Result<Lease, CallError> {
        let permit = take_permit(&self.in_flight)?;
        Ok(Lease {
            client,
            generation: self.generation,
            tools: self.fresh_tools(),
            _permit: permit,
        })
    }

    fn fresh_tools(&self) -> Option<Arc<ToolList>> {
        self.tools
            .as_ref()
            .filter(|(_, at)| at.elapsed() < self.settings.tool_ttl)
            .map(|(list, _)| list.clone())
    }

    /// Publishes the ready connection with its fresh tool list on the lane, or withdraws
    /// it when there is none; a no-op when nothing the lane shows has changed.
    fn publish_lane(&mut self) {
        self.lane.set_counting_failures(self.failures > 0);
        let ready = match (&self.connection, &self.tools) {
            (Connection::Ready(client), Some((tools, at))) => Some((client, tools, *at)),
            _ => None,
        };
        let unchanged = match (&ready, &self.lane_shows) {
            (None, None) => true,
            (Some((_, tools, _)), Some((generation, shown_tools, limiter))) => {
                *generation == self.generation
                    && Arc::ptr_eq(tools, shown_tools)
                    && Arc::ptr_eq(&self.limiter, limiter)
            }
            _ => false,
        };
        if unchanged {
            return;
        }
        self.lane_shows = ready
            .as_ref()
            .map(|(_, tools, _)| (self.generation, (*tools).clone(), self.limiter.clone()));
        self.lane.set(ready.map(|(client, tools, at)| lane::Ready {
            client: client.clone(),
            generation: self.generation,
            tools: tools.clone(),
            tools_until: at + self.settings.tool_ttl,
            limiter: self.limiter.clone(),
            replicas: self.limiter_replicas,
            in_flight: self.in_flight.clone(),
        }));
    }

    fn start_connect(&mut self, myself: &ActorRef<TenantMsg>) {
        self.generation += 1;
        // A load on the old connection answers nobody now; the new one loads afresh.
        self.tools_epoch += 1;
        let generation = self.generation;
        set_status(&self.status, |s| s.state = ConnectionState::Connecting);
        let (tx, mut rx) = mpsc::channel::<UpstreamEvent>(64);
        let target = self.target.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            let connecting = UpstreamClient::connect(&target, tx);
            let result = survived(connecting, "connecting to the upstream").await;
            let ok = result.is_ok();
            if me
                .cast(TenantMsg::Connected { generation, result })
                .is_err()
                || !ok
            {
                return;
            }
            // Forward what the upstream says on its own until the connection ends.
            while let Some(event) = rx.recv().await {
                let last = event == UpstreamEvent::Closed;
                if me.cast(TenantMsg::Upstream { generation, event }).is_err() || last {
                    break;
                }
            }
        });
    }

    fn connected(
        &mut self,
        myself: &ActorRef<TenantMsg>,
        generation: u64,
        result: Result<UpstreamClient, crate::upstream::UpstreamError>,
    ) {
        if generation != self.generation {
            return;
        }
        let waiters = match std::mem::replace(&mut self.connection, Connection::Idle) {
            Connection::Connecting(waiters) => waiters,
            _ => Vec::new(),
        };
        match result {
            Ok(client) => {
                // Not a success yet: an upstream that accepts sessions and fails what is sent
                // on them must still add up to failing (with back-off), not reconnect for
                // every call. A call that succeeds resets the count.
                self.last_error = None;
                self.connection = Connection::Ready(client.clone());
                set_status(&self.status, |s| {
                    s.state = ConnectionState::Ready;
                    s.last_error = None;
                });
                for waiter in waiters {
                    let _ = waiter.send(self.make_lease(client.clone()));
                }
                // A new session may serve another list (an upstream redeployed as the old
                // one broke), and says nothing of it: a cached list is checked again at
                // once, and serves until the answer comes.
                if !self.tool_waiters.is_empty() || self.tools.is_some() {
                    self.load_tools(myself);
                }
            }
            Err(err) => {
                // The upstream's limit on the tenant's credential (a 429 to `initialize`)
                // is an answer: the callers are told to wait, and it is no failure.
                let throttled = matches!(err, crate::upstream::UpstreamError::Throttled { .. });
                let err = CallError::from(err);
                if throttled {
                    tracing::info!(tenant_id = %self.tenant_id, "upstream refused a connect with 429");
                    if let CallError::RateLimited { retry_after } = &err {
                        self.throttled_until = Some(Instant::now() + *retry_after);
                    }
                    set_status(&self.status, |s| s.state = ConnectionState::Stopped);
                } else {
                    // The reason in our own words, redacted (rmcp's own line is off: `logging`).
                    tracing::warn!(tenant_id = %self.tenant_id, error = %err, "upstream connect failed");
                    self.record_failure(err.to_string());
                }
                for waiter in waiters {
                    let _ = waiter.send(Err(err.clone()));
                }
                for waiter in self.tool_waiters.drain(..) {
                    let _ = waiter.send(Err(err.clone()));
                }
            }
        }
    }

    /// Counts a transport failure; past the threshold the tenant pauses with back-off.
    fn record_failure(&mut self, error: String) {
        self.failures += 1;
        self.last_error = Some(error.clone());
        if self.failures >= self.settings.failure_threshold {
            self.mark_failing(error);
        } else {
            self.connection = Connection::Idle;
            set_status(&self.status, |s| {
                s.state = ConnectionState::Stopped;
                s.last_error = Some(error);
            });
        }
    }

    /// Too many failures in a row: no calls until a back-off that grows with each failure
    /// past the threshold has passed.
    fn mark_failing(&mut self, error: String) {
        let backoff = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        let attempt = self.failures - self.settings.failure_threshold + 1;
        self.connection = Connection::Failing {
            until: Instant::now() + backoff.delay(attempt),
        };
        set_status(&self.status, |s| {
            s.state = ConnectionState::Failing;
            s.last_error = Some(error);
        });
        tracing::warn!(tenant_id = %self.tenant_id, failures = self.failures, "tenant marked failing");
    }

    fn outcome(&mut self, generation: u64, failure: Option<UpstreamFailure>) {
        // Calls through the lane tell the actor here, or through the lane's `used` flag
        // (read on the tick), that the tenant is in use.
        self.last_used = Instant::now();
        if generation != self.generation {
            return;
        }
        match failure {
            None => self.failures = 0,
            Some(UpstreamFailure::Connection(error)) => self.connection_failed(error),
            Some(UpstreamFailure::Request(error)) => self.request_refused(error),
        }
    }

    /// The upstream refused one request on the ready connection (an HTTP 5xx): it counts
    /// towards failing, as an upstream answering every call that way is down behind its
    /// proxy, but the session stays, with the other calls in flight on it. Only past the
    /// threshold is it closed, as the tenant pauses.
    fn request_refused(&mut self, error: String) {
        let Connection::Ready(client) = &self.connection else {
            return;
        };
        self.failures += 1;
        self.last_error = Some(error.clone());
        if self.failures >= self.settings.failure_threshold {
            let client = client.clone();
            tokio::spawn(async move { client.close().await });
            self.mark_failing(error);
        } else {
            set_status(&self.status, |s| s.last_error = Some(error));
        }
    }

    /// A request on connection `generation` got no answer in time. A slow tool does that
    /// too, so it is not a failure by itself: a ping tells (see `UpstreamClient::ping`).
    /// An upstream that answers nothing on an open connection (frozen, or a proxy that
    /// lost its way) would otherwise time every call out for as long as the connection
    /// stays open. An upstream that blocks on a slow tool and says nothing for a whole
    /// `UPSTREAM_TIMEOUT_MS` after it is dropped too: its other calls could not end.
    fn timed_out(&mut self, myself: &ActorRef<TenantMsg>, generation: u64) {
        // In use: the call said so when it was leased, and says so again as it ends.
        self.last_used = Instant::now();
        let Connection::Ready(client) = &self.connection else {
            return;
        };
        if generation != self.generation || self.pinging == Some(generation) {
            return;
        }
        self.pinging = Some(generation);
        let (client, me) = (client.clone(), myself.clone());
        // As long as a call may take: an upstream that says nothing for that long after a
        // call gave up on it cannot serve calls.
        let within = self.settings.upstream_timeout;
        tokio::spawn(async move {
            let result = client.ping(within).await;
            let _ = me.cast(TenantMsg::Pinged { generation, result });
        });
    }

    fn pinged(&mut self, generation: u64, result: Result<(), UpstreamError>) {
        if self.pinging == Some(generation) {
            self.pinging = None;
        }
        let Err(error) = result else { return };
        // A JSON-RPC answer, an error one too, says the upstream is there, and so does a
        // 429; any other HTTP error status fails the ping.
        let unanswered = error.failure().is_some() || matches!(error, UpstreamError::Timeout);
        if !unanswered || generation != self.generation {
            return;
        }
        tracing::warn!(tenant_id = %self.tenant_id, %error, "upstream did not answer a ping after a timeout; its connection is dropped");
        self.connection_failed(format!(
            "a call timed out and a ping then got no answer: {error}"
        ));
    }

    /// The ready connection failed a request: it is suspect, so it is dropped and the next
    /// call reconnects. Only its first failure counts: the other requests in flight on it
    /// fail with it, and one dropped connection under load must not add up to the failing
    /// threshold.
    fn connection_failed(&mut self, error: String) {
        let Connection::Ready(client) = &self.connection else {
            return;
        };
        let client = client.clone();
        tokio::spawn(async move { client.close().await });
        self.record_failure(error);
    }

    /// Why calls are refused now, while a failing upstream's back-off lasts, or the wait
    /// the upstream asked for when it refused a connect with 429.
    fn backing_off(&self) -> Option<CallError> {
        let throttled = self
            .throttled_until
            .and_then(|until| until.checked_duration_since(Instant::now()));
        if let Some(retry_after) = throttled {
            return Some(CallError::RateLimited { retry_after });
        }
        let Connection::Failing { until } = &self.connection else {
            return None;
        };
        let retry_after = until.checked_duration_since(Instant::now())?;
        let reason = self.last_error.clone().unwrap_or_else(|| "failing".into());
        Some(CallError::Failing {
            reason,
            retry_after,
        })
    }

    /// `spent`: the request has spent the rate limit already (a tool call's lease, which
    /// came without a list), so a load it starts spends nothing more.
    fn tools(
        &mut self,
        myself: &ActorRef<TenantMsg>,
        refresh: bool,
        spent: bool,
        reply: RpcReplyPort<Result<Arc<ToolList>, CallError>>,
    ) {
        self.last_used = Instant::now();
        // As many waiting for a load as calls may be in flight (before a refresh spends
        // the rate limit): callers that gave up leave their place, and a list request that
        // finds the list fresh spends nothing and never waits. One that would wait for an
        // upstream in its back-off is refused at once, as a call is, and spends nothing.
        self.tool_waiters.retain(|waiter| !waiter.is_closed());
        let waits = refresh || self.fresh_tools().is_none();
        if waits {
            if let Some(failing) = self.backing_off() {
                let _ = reply.send(Err(failing));
                return;
            }
            // A tool call's request holds a place in flight already (its lease's): the cap
            // is for list requests, which hold none.
            if !spent && self.tool_waiters.len() >= self.settings.max_in_flight {
                let _ = reply.send(Err(busy()));
                return;
            }
        }
        if refresh {
            // A refresh asks the upstream again: it counts against the tenant's rate limit
            // as a tool call does (a cached list costs the upstream nothing, and does not).
            if let Err(limited) = admit(&self.limiter) {
                let _ = reply.send(Err(limited));
                return;
            }
            self.forget_tools();
        } else if !spent
            && self.list_failed
            && self.fresh_tools().is_none()
            && self.tool_waiters.is_empty()
        {
            // This request starts a load after one that failed: it spends as a refresh does.
            if let Err(limited) = admit(&self.limiter) {
                let _ = reply.send(Err(limited));
                return;
            }
        }
        if let Some(list) = self.fresh_tools() {
            let _ = reply.send(Ok(list));
            return;
        }
        self.tool_waiters.push(reply);
        match &self.connection {
            Connection::Ready(_) => self.load_tools(myself),
            Connection::Connecting(_) => {}
            // In its back-off it was refused above; past it, connected again.
            Connection::Idle | Connection::Failing { .. } => {
                self.connection = Connection::Connecting(Vec::new());
                self.start_connect(myself);
            }
        }
    }

    fn load_tools(&mut self, myself: &ActorRef<TenantMsg>) {
        let Connection::Ready(client) = &self.connection else {
            return;
        };
        if self.tools_loading {
            return;
        }
        self.tools_loading = true;
        let epoch = self.tools_epoch;
        let (client, me, generation) = (client.clone(), myself.clone(), self.generation);
        let timeout = self.settings.upstream_timeout;
        tokio::spawn(async move {
            let result = survived(client.list_tools(timeout), "loading the tool list").await;
            let _ = me.cast(TenantMsg::ToolsLoaded {
                generation,
                epoch,
                result,
            });
        });
    }

    /// The cached list is stale; a load in flight started before now answers nobody.
    fn forget_tools(&mut self) {
        self.tools = None;
        self.tools_epoch += 1;
    }

    fn tools_loaded(
        &mut self,
        myself: &ActorRef<TenantMsg>,
        generation: u64,
        epoch: u64,
        result: Result<Vec<rmcp::model::Tool>, UpstreamError>,
    ) {
        self.tools_loading = false;
        self.list_failed = result.is_err();
        if let Err(err) = &result {
            // A transport failure counts as a call's does: with an upstream that is gone,
            // a tenant whose list expired must end up failing, not ready for ever.
            if generation == self.generation {
                match err.failure() {
                    Some(UpstreamFailure::Connection(error)) => self.connection_failed(error),
                    Some(UpstreamFailure::Request(error)) => self.request_refused(error),
                    None => {}
                }
            }
            if matches!(err, UpstreamError::Timeout) {
                self.timed_out(myself, generation);
            }
        }
        let current = epoch == self.tools_epoch;
        if !current {
            // Started before a change, a refresh or a reconnect: its list may predate them.
            // The waiters get a load of the current epoch, on the current connection; but
            // not for ever: an upstream whose list changes faster than it can be listed
            // would starve every call, so past MAX_STALE_LOADS they get the latest.
            if self.tool_waiters.is_empty() {
                self.stale_loads = 0;
                // A new connection's check of the cached list (see `connected`) found this
                // load of an older one running, and did not start: it starts now.
                if self.tools.is_some() && self.tools_from != self.generation {
                    self.load_tools(myself);
                }
                return;
            }
            self.stale_loads += 1;
            match &self.connection {
                Connection::Ready(_) if self.stale_loads <= MAX_STALE_LOADS => {
                    self.load_tools(myself);
                    return;
                }
                Connection::Connecting(_) => return,
                // Changing too fast, or no connection to load on: the waiters get what
                // came, which is not kept.
                _ => {}
            }
        }
        self.stale_loads = 0;
        let result = match result {
            Ok(tools) => {
                let list = Arc::new(ToolList::new(tools));
                if current && generation == self.generation {
                    self.tools = Some((list.clone(), Instant::now()));
                    self.tools_from = generation;
                    let count = list.tools.len();
                    set_status(&self.status, |s| s.tool_count = Some(count));
                    // A list that changed unannounced (found on a new session, by a refresh
                    // or as the cached one expired): the tenant's MCP sessions hear of it as
                    // of an announced change.
                    let print = list.fingerprint();
                    let before = self.tools_print.swap(print, Ordering::Relaxed);
                    if before != 0 && before != print {
                        self.tell_tool_change();
                    }
                }
                Ok(list)
            }
            Err(err) => Err(CallError::from(err)),
        };
        for waiter in self.tool_waiters.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }

    fn upstream_event(
        &mut self,
        myself: &ActorRef<TenantMsg>,
        generation: u64,
        event: UpstreamEvent,
    ) {
        if generation != self.generation {
            return;
        }
        match event {
            UpstreamEvent::ToolListChanged => {
                self.forget_tools();
                // Told below: the next load is not compared with the list before it.
                self.tools_print.store(0, Ordering::Relaxed);
                if !self.tool_waiters.is_empty() {
                    self.load_tools(myself);
                }
                self.tell_tool_change();
            }
            UpstreamEvent::SessionRenewed => {
                // As for a new connection (see `connected`): the new session may serve
                // another list, and says nothing of it. The cached list serves until the
                // check comes; a load running began on the old session, answers nobody,
                // and the check starts when it returns (`tools_loaded`).
                self.tools_epoch += 1;
                self.tools_from = 0;
                if !self.tool_waiters.is_empty() || self.tools.is_some() {
                    self.load_tools(myself);
                }
            }
            UpstreamEvent::Closed => {
                // Ended by the upstream (ours end with a new generation or after a failure
                // was counted): a failure too, or an upstream that drops every session would
                // have every call reconnect.
                if matches!(self.connection, Connection::Ready(_)) {
                    self.record_failure("the upstream ended the session".into());
                }
            }
        }
    }

    /// Tells the tenant's MCP sessions on this replica (the process's tool-change feed) and
    /// on the other replicas (see `announce_tool_change`) that its tool list changed. The
    /// feed is every tenant's: this replica's sessions are told at most every
    /// [`TELL_EVERY`], changes heard meanwhile folded into one more, so that an upstream
    /// sending change after change does not wake every session of every tenant for each.
    fn tell_tool_change(&self) {
        let (changes, tenant_id) = (self.changes.clone(), self.tenant_id.clone());
        self.telling.ask(move || {
            let (changes, tenant_id) = (changes.clone(), tenant_id.clone());
            async move {
                changes.publish_tools_changed(&tenant_id);
                tokio::time::sleep(TELL_EVERY).await;
            }
        });
        self.announce_tool_change();
    }

    /// Tells the other replicas (PostgreSQL NOTIFY) so their sessions of this tenant hear
    /// the change too; a lost announcement only delays other replicas' clients until they
    /// list tools again.
    /// At most one announcement is in flight; changes heard meanwhile are folded into one
    /// more, so an upstream sending change after change does not fill the database pool.
    fn announce_tool_change(&self) {
        let (store, tenant_id) = (self.store.clone(), self.tenant_id.clone());
        self.announcing.ask(move || {
            let (store, tenant_id) = (store.clone(), tenant_id.clone());
            async move {
                let what = format!("a tool-list change of tenant {tenant_id}");
                crate::store::announce(&what, store.announce_tool_change(&tenant_id)).await;
            }
        });
    }

    fn tick(&mut self, myself: &ActorRef<TenantMsg>) {
        self.flush_audit(myself);
        // Quiet first: a lane call marks the lane used before it gives its permit back,
        // so one that ends between the two reads is seen as a use. Callers waiting for a
        // connection or a tool list hold no permit, and are not quiet either: stopping
        // then would refuse them, and their retry on a new actor the same way.
        let waited_on =
            matches!(self.connection, Connection::Connecting(_)) || !self.tool_waiters.is_empty();
        let quiet = self.in_flight.available_permits() == self.settings.max_in_flight && !waited_on;
        if self.lane.take_used() {
            self.last_used = Instant::now();
        }
        let idle = self.last_used.elapsed() >= self.settings.idle;
        if idle && quiet && self.audit.is_empty() && self.audit_write.is_none() {
            // Drained, not stopped: what is queued already (a call's lease) is handled
            // first; later messages are refused to their senders.
            let _ = myself.drain();
        }
    }

    /// Closes the audit buffer, which hands what it holds and every later event to the
    /// audit writer's queue (it retries while the store refuses, and is flushed at
    /// shutdown), and hands over the outcome of a batch write in flight (a failed batch)
    /// too: for a crashed actor, and for a stop whose deadline passed with events left.
    fn hand_over_audit(&mut self) {
        self.audit.close();
        let Some((write, n)) = self.audit_write.take() else {
            return;
        };
        // The batch's bytes stay charged until the writer has its outcome.
        let charged = self.audit.hand_over_in_flight();
        if tokio::runtime::Handle::try_current().is_err() {
            // No runtime left to wait on it in (the process is ending).
            write.abort();
            self.audit_queue.budget().give(charged);
            batch_lost(n);
            return;
        }
        let later = async move {
            match write.await {
                Ok(Ok(written)) => {
                    crate::metrics::audit_pending(-(written as i64));
                    Vec::new()
                }
                // Counted again by the writer's queue.
                Ok(Err(batch)) => {
                    crate::metrics::audit_pending(-(batch.len() as i64));
                    batch
                }
                Err(_) => {
                    batch_lost(n);
                    Vec::new()
                }
            }
        };
        self.audit_queue.queue_later(later, charged);
    }

    fn flush_audit(&mut self, myself: &ActorRef<TenantMsg>) {
        if self.audit_write.is_some() {
            return;
        }
        let batch = self.audit.take_batch();
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        let (store, me) = (self.store.clone(), myself.clone());
        let write = tokio::spawn(async move {
            let written = append_within(&store, &batch, ATTEMPT).await;
            let result = written.map(|()| batch.len()).map_err(|err| {
                tracing::warn!(error = %err, events = batch.len(), "audit batch not written; will retry");
                batch
            });
            // Only a wake-up: the outcome is this task's output, so that it is not lost
            // with the mailbox if the actor crashes before it reads the message.
            let _ = me.cast(TenantMsg::AuditWritten);
            result
        });
        self.audit_write = Some((write, n));
    }

    /// The write in flight told it ended: its outcome is taken (its task is returning, so
    /// the wait is short) and settled.
    async fn audit_written(&mut self, myself: &ActorRef<TenantMsg>) {
        let Some((write, n)) = self.audit_write.take() else {
            return;
        };
        let written = match write.await {
            Ok(result) => self.settle_audit_write(result),
            Err(_) => {
                self.audit.settled();
                batch_lost(n);
                false
            }
        };
        if written && self.audit.has_batch() {
            self.flush_audit(myself);
        }
    }

    /// Counts a written batch, or puts a failed one back in front, in order (the next tick,
    /// or the final flush, retries it). Whether the batch was written.
    fn settle_audit_write(&mut self, result: AuditWrite) -> bool {
        match result {
            Ok(written) => {
                self.audit.settled();
                crate::metrics::audit_pending(-(written as i64));
                true
            }
            Err(batch) => {
                self.audit.put_back(batch);
                false
            }
        }
    }

    /// Lets the callers that wait on this actor go (for a connection, or for a tool list):
    /// what they wait for comes by messages that a stopping actor no longer takes, and one
    /// of them may hold an in-flight permit that [`Self::stop`] waits for. Their replies
    /// dropped by an actor that is stopping, they ask a new one (`runtime::try_ask`).
    fn let_waiters_go(&mut self) {
        self.tool_waiters.clear();
        if let Connection::Connecting(waiters) = &mut self.connection {
            waiters.clear();
        }
    }

    /// Final work when the actor stops: let leased calls finish (bounded), write what is
    /// left in the audit buffer (retrying while the store is down, bounded), close upstream.
    async fn stop(&mut self) {
        let max = u32::try_from(self.settings.max_in_flight).unwrap_or(u32::MAX);
        let _ =
            tokio::time::timeout(self.settings.stop_grace, self.in_flight.acquire_many(max)).await;
        let deadline = Instant::now() + self.settings.stop_grace;
        // A batch still being written when the actor stopped: its outcome could no longer
        // come by message, and a failed one must be written with the rest. Waited for in
        // place, so that a stop cut off here leaves it for `Drop` to hand over.
        if let Some((write, n)) = self.audit_write.as_mut() {
            let n = *n;
            match tokio::time::timeout_at(deadline.into(), write).await {
                Ok(Ok(result)) => {
                    self.audit_write = None;
                    self.settle_audit_write(result);
                }
                Ok(Err(_)) => {
                    self.audit_write = None;
                    self.audit.settled();
                    batch_lost(n);
                }
                // Still running at the deadline: handed over below.
                Err(_) => {}
            }
        }
        while self.audit_write.is_none() && Instant::now() < deadline {
            // Put back unless written, also should this stop be cut off mid-write.
            let batch = self.audit.take_all();
            if batch.is_empty() {
                break;
            }
            // Each attempt bounded too: a store that hangs must not hold the stop for ever.
            let left = deadline.saturating_duration_since(Instant::now());
            match append_within(&self.store, batch.events(), left.min(ATTEMPT)).await {
                Ok(()) => crate::metrics::audit_pending(-(batch.written() as i64)),
                Err(err) => {
                    tracing::warn!(error = %err, "audit flush on stop failed; retrying");
                    drop(batch);
                    let pause = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(pause.min(Duration::from_millis(200))).await;
                }
            }
        }
        let left = self.audit.len();
        if self.audit_write.is_some() || left > 0 {
            tracing::warn!(
                events = left,
                "audit events not written by the actor's stop: handed to the audit writer"
            );
            self.hand_over_audit();
        }
        if let Connection::Ready(client) = &self.connection {
            client.close().await;
        }
        set_status(&self.status, |s| s.state = ConnectionState::Stopped);
    }
}

/// The tenant's rate limit, as both ways to a lease (the actor and its lane) apply it.
pub(super) fn admit(limiter: &DefaultDirectRateLimiter) -> Result<(), CallError> {
    limiter.check().map_err(|not_until| CallError::RateLimited {
        retry_after: not_until.wait_time_from(governor::clock::DefaultClock::default().now()),
    })
}

/// One of the tenant's in-flight permits, or `Busy` when all are taken.
pub(super) fn take_permit(in_flight: &Arc<Semaphore>) -> Result<OwnedSemaphorePermit, CallError> {
    in_flight.clone().try_acquire_owned().map_err(|_| busy())
}

/// What `work` (a task the actor waits on: a connection, a tool list) ends with, a panic
/// in it being a failure like any other: otherwise the actor would wait for its answer
/// for good (connecting, or loading its list, until the tenant goes idle).
async fn survived<T>(
    work: impl std::future::Future<Output = Result<T, UpstreamError>>,
    doing: &str,
) -> Result<T, UpstreamError> {
    use futures::FutureExt as _;
    std::panic::AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .unwrap_or_else(|_| {
            tracing::error!("the gateway failed {doing}: a panic, answered as a failure");
            Err(UpstreamError::Protocol(format!(
                "the gateway failed {doing}"
            )))
        })
}

fn busy() -> CallError {
    CallError::Busy {
        retry_after: Duration::from_secs(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_work_the_actor_waits_on_is_a_failure_it_hears_of() {
        let panicking = async {
            if std::hint::black_box(true) {
                panic!("the upstream client broke");
            }
            Ok(())
        };
        let ended = survived(panicking, "testing").await;
        assert!(
            matches!(ended, Err(UpstreamError::Protocol(_))),
            "{ended:?}"
        );
        assert_eq!(survived(async { Ok(7) }, "testing").await.ok(), Some(7));
    }
}
