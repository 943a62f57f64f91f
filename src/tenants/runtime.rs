//! The handle the HTTP and MCP layers hold to reach tenant actors. A call finds the
//! tenant's actor (a directory read, or a start through the registry), takes a [`Lease`]
//! (from the actor's lane when the tenant is ready, else by asking the actor), checks the
//! tool against the cached list and runs the upstream call in the caller's own task, so
//! no actor mailbox waits on the upstream.

use std::sync::Arc;
use std::time::Duration;

use ractor::{rpc::CallResult, Actor, ActorRef};
use rmcp::model::CallToolResult;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::audit_buffer::Appended;
use super::messages::{CallError, RegistryMsg, TenantMsg, ToolList};
use super::registry::{Directory, RegistryActor, RegistryArgs, Running};
use super::status::{ConnectionState, UpstreamStatus};
use super::{ChangeFeed, RuntimeSettings};
use crate::audit::AuditWriter;
use crate::cipher::TokenCipher;
use crate::store::{AuditRecord, SharedStore, TenantRecord};
use crate::upstream::{ProgressSink, UpstreamError};

/// How long a message to the registry (or an actor's subscription) may wait for its
/// answer. They answer at once (the slow work is in tasks), so this only bounds a wedged
/// actor. A lease or a tool list waits longer: see `RuntimeSettings::actor_reply_bound`.
const ACTOR_REPLY: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct TenantRuntime {
    registry: ActorRef<RegistryMsg>,
    directory: Arc<Directory>,
    settings: Arc<RuntimeSettings>,
    audit: AuditWriter,
    changes: ChangeFeed,
}

impl TenantRuntime {
    /// Starts the registry actor. Tenant actors start later, on first use.
    pub async fn start(
        settings: RuntimeSettings,
        store: SharedStore,
        audit: AuditWriter,
        cipher: TokenCipher,
        default_upstream: url::Url,
        changes: ChangeFeed,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let settings = Arc::new(settings);
        let directory = Arc::new(Directory::default());
        let args = RegistryArgs {
            directory: directory.clone(),
            settings: settings.clone(),
            store,
            audit: audit.clone(),
            cipher,
            default_upstream,
            changes: changes.clone(),
            shutdown,
        };
        let (registry, _) = Actor::spawn(None, RegistryActor, args).await?;
        Ok(Self {
            registry,
            directory,
            settings,
            audit,
            changes,
        })
    }

    /// Tenant actors running now.
    pub fn active_count(&self) -> usize {
        self.directory.len()
    }

    /// Replicas this one counts in the fleet (1 when alone); see `RuntimeSettings::replicas`.
    pub fn replica_count(&self) -> u32 {
        self.settings.replica_count()
    }

    /// Tenants by the state of their upstream connection (see `Directory::count_by_state`),
    /// for the metrics.
    pub fn count_by_state(&self) -> Vec<(ConnectionState, usize)> {
        self.directory.count_by_state()
    }

    pub async fn status(&self, tenant_id: &str) -> UpstreamStatus {
        self.directory.status(tenant_id)
    }

    /// The tenant's tools (cached; `refresh` discovers them again).
    pub async fn list_tools(
        &self,
        tenant: &TenantRecord,
        refresh: bool,
    ) -> Result<Arc<ToolList>, CallError> {
        let listed = async {
            let actor = self.actor_for(tenant).await?;
            let (_, tools) = self
                .ask_tenant(tenant, actor, |reply| TenantMsg::Tools {
                    refresh,
                    spent: false,
                    reply,
                })
                .await?;
            Ok(tools)
        };
        counted_if_limited(listed.await)
    }

    /// Spends one request of the tenant's rate limit on MCP session work that does not reach
    /// the upstream but costs the gateway: an `initialize` (a session). `RateLimited` past
    /// the limit.
    pub async fn spend_rate_limit(&self, tenant: &TenantRecord) -> Result<(), CallError> {
        let replicas = self.settings.replica_count();
        if let Some(spent) = self
            .running(tenant)
            .and_then(|running| running.lane.try_spend(replicas))
        {
            return counted_if_limited(spent);
        }
        let spent = async {
            let actor = self.actor_for(tenant).await?;
            self.ask_tenant(tenant, actor, TenantMsg::Spend)
                .await
                .map(drop)
        };
        counted_if_limited(spent.await)
    }

    /// Calls `tool` on the tenant's upstream and returns its result unchanged. A tool the
    /// tenant does not have is `UnknownTool`, and never reaches the upstream. Counted in
    /// the tool-call metrics by outcome. With `progress` (an MCP caller that asked for it),
    /// the upstream's progress on this call goes there before the result.
    pub async fn call_tool(
        &self,
        tenant: &TenantRecord,
        tool: &str,
        arguments: Option<Map<String, Value>>,
        progress: Option<ProgressSink>,
    ) -> Result<CallToolResult, CallError> {
        // Boxed: the call's own state (rmcp's request and answer, the timeout, the progress
        // relay) is ~7 KB. Inline, it made every future that awaits this one as large, and
        // each move of those (axum boxing the REST handler's future, rmcp spawning a task per
        // MCP request) copied it whole. Callgrind counts 2.6% (REST) and 10% (`/mcp`) fewer
        // instructions per call boxed, much of it bytes of `rep movsb`; in time, a small gain
        // (README, Performance).
        let mut known = false;
        let call = self.call_tool_uncounted(tenant, tool, arguments, progress, &mut known);
        let result = Box::pin(call).await;
        // A call that ended before its name was confirmed in the tenant's list (refused as
        // unknown, or for a limit by the actor, which may refuse before it has a list) gets
        // no series of its own: the name is the caller's
        // own text, and one tenant's guesses would use up the cap on tool labels that all
        // tenants share.
        let tool = if known { tool } else { crate::metrics::OTHER };
        crate::metrics::tool_call(&tenant.id, tool, call_outcome(&result));
        result
    }

    async fn call_tool_uncounted(
        &self,
        tenant: &TenantRecord,
        tool: &str,
        arguments: Option<Map<String, Value>>,
        progress: Option<ProgressSink>,
        known: &mut bool,
    ) -> Result<CallToolResult, CallError> {
        // A ready tenant's lane answers without a message; anything else asks the actor.
        let running = self.running(tenant);
        let from_lane = running
            .as_ref()
            .and_then(|r| r.lane.try_lease(self.settings.replica_count(), tool));
        let lease_of = |reply| TenantMsg::Lease {
            tool: tool.to_owned(),
            reply,
        };
        let (mut actor, mut lease, lane) = match (running, from_lane) {
            (Some(running), Some(lease)) => {
                // The lane refuses for the limits only a name it found in its fresh list:
                // such a refusal is counted under the tool's own label.
                *known = matches!(
                    lease,
                    Ok(_) | Err(CallError::RateLimited { .. } | CallError::Busy { .. })
                );
                (running.actor, lease?, Some(running.lane))
            }
            (running, _) => {
                let actor = match running {
                    Some(running) => running.actor,
                    None => self.start_actor(tenant).await?,
                };
                let (actor, lease) = self.ask_tenant(tenant, actor, lease_of).await?;
                (actor, lease, None)
            }
        };
        // A lease from the lane was taken only for a name in its list. One from the actor
        // may have come without a list, or with one that turned fresh while it connected.
        if lane.is_none() {
            let (answered_by, tools) = match &lease.tools {
                Some(tools) => (actor.clone(), tools.clone()),
                None => {
                    let tools = |reply| TenantMsg::Tools {
                        refresh: false,
                        spent: true,
                        reply,
                    };
                    self.ask_tenant(tenant, actor.clone(), tools).await?
                }
            };
            if !tools.contains(tool) {
                return Err(CallError::UnknownTool(tool.to_owned()));
            }
            if answered_by.get_id() != actor.get_id() {
                // The actor stopped as it was asked (a change, a reload, idling out), and a
                // new one answered: the call runs on the new one's connection, with the
                // tenant as it is now, not on the old one, which closes.
                drop(lease);
                (actor, lease) = self.ask_tenant(tenant, answered_by, lease_of).await?;
            }
        }
        *known = true;
        let started = std::time::Instant::now();
        let result = lease
            .client
            .call_tool(tool, arguments, self.settings.upstream_timeout, progress)
            .await;
        let failure = result.as_ref().err().and_then(UpstreamError::failure);
        if matches!(result, Err(UpstreamError::Timeout)) {
            // Says nothing of the connection by itself: it neither counts towards failing
            // nor resets the count (an upstream that takes sessions and then answers
            // nothing must still end up failing). The ping it leads to decides.
            if let Some(lane) = &lane {
                lane.mark_used();
            }
            let _ = actor.cast(TenantMsg::TimedOut {
                generation: lease.generation,
            });
        } else {
            // A success on the lane's lease tells the actor only what it needs (see `lane`).
            let report = match (&failure, &lane) {
                (None, Some(lane)) => lane.report_success(),
                _ => true,
            };
            if report {
                let _ = actor.cast(TenantMsg::Outcome {
                    generation: lease.generation,
                    failure,
                });
            }
        }
        let result = result.map_err(CallError::from);
        crate::metrics::upstream_latency(call_outcome(&result), started.elapsed());
        result
    }

    /// Hands a tool-call event to the tenant's audit buffer (written in batches by its
    /// actor). When the actor is gone already, the audit writer's queue takes it.
    pub fn audit(&self, tenant_id: &str, event: AuditRecord) {
        match self.directory.get(tenant_id) {
            Some(running) => {
                if running.audit.append(event) == Appended::BatchFull {
                    // A wake-up only. Should the actor be gone, its buffer goes to the
                    // writer as the actor drops.
                    let _ = running.actor.cast(TenantMsg::AuditBatch);
                }
            }
            None => self.audit.queue(event),
        }
    }

    /// A token cancelled when `tenant`'s actor (started now if need be) stops: idle,
    /// changed, deleted or crashed.
    pub async fn actor_stop(&self, tenant: &TenantRecord) -> Result<CancellationToken, CallError> {
        let actor = self.actor_for(tenant).await?;
        match actor.call(TenantMsg::WatchStop, Some(ACTOR_REPLY)).await {
            Ok(CallResult::Success(stop)) => Ok(stop),
            _ => Err(gone()),
        }
    }

    /// Tenant ids whose tool lists changed, as this replica's tenant actors and the other
    /// replicas (PostgreSQL fleets) found, for downstream MCP sessions to pass on.
    pub fn tool_changes(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changes.subscribe_tools()
    }

    /// Tenants that changed (here or, on PostgreSQL, through other replicas), as the
    /// credential cache and the registry hear of them.
    pub fn tenant_changes(&self) -> tokio::sync::broadcast::Receiver<super::TenantChange> {
        self.changes.subscribe()
    }

    /// The change feed's counts ([`super::ChangeFeed::changes_told`] and
    /// [`super::ChangeFeed::published`]).
    pub fn changes(&self) -> &super::ChangeFeed {
        &self.changes
    }

    /// MCP sessions whose clients ended them through other replicas (PostgreSQL fleets),
    /// for this replica to end its copies.
    pub fn remote_session_ends(&self) -> tokio::sync::broadcast::Receiver<super::SessionEnd> {
        self.changes.subscribe_sessions_ended()
    }

    /// Stops every tenant actor (their audit buffers are flushed) and then the registry.
    pub async fn shutdown(&self) {
        let wait = self.settings.actor_stop_bound() + Duration::from_secs(2);
        let _ = self.registry.call(RegistryMsg::StopAll, Some(wait)).await;
        let _ = self.registry.stop_and_wait(None, Some(wait)).await;
    }

    /// Announces that any tenant may have changed, as the fleet listener does when it
    /// reconnects (for tests of what a full reload does).
    #[doc(hidden)]
    pub fn announce_all_changed(&self) {
        self.changes.publish_all();
    }

    /// Fault injection for supervision tests: makes the tenant's actor panic.
    #[doc(hidden)]
    pub fn inject_panic(&self, tenant_id: &str) -> bool {
        self.directory
            .get(tenant_id)
            .is_some_and(|r| r.actor.cast(TenantMsg::Panic).is_ok())
    }

    /// The tenant's running actor, unless it runs an older version of the tenant or is
    /// stopping (then the registry starts another).
    fn running(&self, tenant: &TenantRecord) -> Option<Running> {
        self.directory
            .get(&tenant.id)
            .filter(|r| r.version >= tenant.version && r.serving())
    }

    async fn actor_for(&self, tenant: &TenantRecord) -> Result<ActorRef<TenantMsg>, CallError> {
        match self.running(tenant) {
            Some(running) => Ok(running.actor),
            None => self.start_actor(tenant).await,
        }
    }

    /// Asks the tenant's `actor`. One that stopped taking messages between being found and
    /// being asked (it idled out just then) is replaced through the registry, once: the
    /// tenant is healthy, and its caller must not get a 503 for that race.
    async fn ask_tenant<T: Send + 'static>(
        &self,
        tenant: &TenantRecord,
        actor: ActorRef<TenantMsg>,
        build: impl Fn(ractor::RpcReplyPort<Result<T, CallError>>) -> TenantMsg,
    ) -> Result<(ActorRef<TenantMsg>, T), CallError> {
        let wait = self.settings.actor_reply_bound();
        match try_ask(&actor, wait, &build).await {
            Asked::Answered(answer) => answer.map(|t| (actor, t)),
            Asked::Gone => Err(gone()),
            Asked::Refused => {
                let actor = self.start_actor(tenant).await?;
                let answer = ask(&actor, wait, build).await?;
                Ok((actor, answer))
            }
        }
    }

    /// Starts (or rebuilds, if older) the tenant's actor through the registry.
    async fn start_actor(&self, tenant: &TenantRecord) -> Result<ActorRef<TenantMsg>, CallError> {
        let record = Box::new(tenant.clone());
        ask(&self.registry, ACTOR_REPLY, |reply| RegistryMsg::Start {
            record,
            reply,
        })
        .await
    }
}

/// The audit outcome of a tool call (API.md), also its metrics label.
fn call_outcome(result: &Result<CallToolResult, CallError>) -> &'static str {
    crate::audit::call_outcome(result.as_ref().map(|r| r.is_error == Some(true)))
}

/// Sends a request to an actor and waits for its answer; a gone or wedged actor is a 503.
async fn ask<M, T>(
    actor: &ActorRef<M>,
    wait: Duration,
    build: impl FnOnce(ractor::RpcReplyPort<Result<T, CallError>>) -> M,
) -> Result<T, CallError>
where
    M: ractor::Message,
    T: Send + 'static,
{
    match try_ask(actor, wait, build).await {
        Asked::Answered(answer) => answer,
        Asked::Refused | Asked::Gone => Err(gone()),
    }
}

/// What became of a request to an actor.
enum Asked<T> {
    Answered(Result<T, CallError>),
    /// It was not taken, or taken and let go unanswered as the actor stopped: the actor is
    /// draining or stopped (so another may be asked).
    Refused,
    /// It was taken and not answered in time, or dropped unanswered by a running actor.
    Gone,
}

async fn try_ask<M, T>(
    actor: &ActorRef<M>,
    wait: Duration,
    build: impl FnOnce(ractor::RpcReplyPort<Result<T, CallError>>) -> M,
) -> Asked<T>
where
    M: ractor::Message,
    T: Send + 'static,
{
    match actor.call(build, Some(wait)).await {
        Ok(CallResult::Success(result)) => Asked::Answered(result),
        Err(ractor::MessagingErr::SendErr(_) | ractor::MessagingErr::ChannelClosed) => {
            Asked::Refused
        }
        // A tenant actor drops the requests still waiting on it when it stops (see
        // `TenantState::let_waiters_go`): nothing was handed out for them.
        Ok(CallResult::SenderError) if !ractor::ACTIVE_STATES.contains(&actor.get_status()) => {
            Asked::Refused
        }
        _ => Asked::Gone,
    }
}

fn gone() -> CallError {
    CallError::Unavailable {
        reason: "the tenant is restarting".into(),
        retry_after: Duration::from_secs(1),
    }
}

/// `result`, counted in `switchboard_rate_limited_total{scope="tenant"}` when it is the
/// tenant's 429 (its rate limit, or its calls in flight): for the requests other than tool
/// calls that spend the limit (tool calls are counted with their outcome).
fn counted_if_limited<T>(result: Result<T, CallError>) -> Result<T, CallError> {
    if matches!(
        result,
        Err(CallError::RateLimited { .. } | CallError::Busy { .. })
    ) {
        crate::metrics::rate_limited("tenant");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn of five arguments returns, without calling it.
    fn future_size<A, B, C, D, E, F: std::future::Future>(_: impl Fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Answers every request with 7.
    struct Answers;

    impl Actor for Answers {
        type Msg = ractor::RpcReplyPort<Result<u8, CallError>>;
        type State = ();
        type Arguments = ();

        async fn pre_start(
            &self,
            _: ActorRef<Self::Msg>,
            _: (),
        ) -> Result<(), ractor::ActorProcessingErr> {
            Ok(())
        }

        async fn handle(
            &self,
            _: ActorRef<Self::Msg>,
            reply: Self::Msg,
            _: &mut (),
        ) -> Result<(), ractor::ActorProcessingErr> {
            let _ = reply.send(Ok(7));
            Ok(())
        }
    }

    /// A request an actor did not take (it had stopped) is told apart from one it took and
    /// left unanswered: only the first may go to a new actor.
    #[tokio::test]
    async fn a_request_to_a_stopped_actor_is_refused() {
        let (actor, handle) = Actor::spawn(None, Answers, ()).await.expect("spawned");
        let wait = Duration::from_secs(1);
        assert!(matches!(
            try_ask(&actor, wait, |reply| reply).await,
            Asked::Answered(Ok(7))
        ));
        actor.drain().expect("drained");
        handle.await.expect("stopped");
        assert!(matches!(
            try_ask(&actor, wait, |reply| reply).await,
            Asked::Refused
        ));
    }

    /// A tenant of the gateway made by [`crate::config::Config::for_tests`].
    fn tenant(cipher: &TokenCipher) -> TenantRecord {
        let id = crate::auth::keys::new_tenant_id();
        let token = crate::config::Secret::new("upstream-token");
        let now = chrono::Utc::now();
        TenantRecord {
            sealed_token: cipher.seal(&id, &token).expect("sealed"),
            id,
            name: None,
            integration_key: "key".into(),
            api_key_hash: vec![0; 32],
            upstream_url: None,
            upstream_transport: crate::store::UpstreamTransport::default(),
            enabled: true,
            rate_limit: None,
            created_at: now,
            updated_at: now,
            version: 1,
        }
    }

    /// A call that passed the drain's check just before the shutdown's `StopAll` gets no
    /// new actor after it: the shutdown would not wait for that actor, nor for its audit
    /// buffer, before the process exits.
    #[tokio::test]
    async fn no_actor_starts_after_stop_all() {
        let config = crate::config::Config::for_tests();
        let store: SharedStore = Arc::new(
            crate::store::sqlite::SqliteStore::open(":memory:")
                .await
                .expect("opened"),
        );
        store.migrate().await.expect("migrated");
        let lifecycle = crate::shutdown::Lifecycle::new(CancellationToken::new());
        let budget = Arc::new(crate::audit::budget::AuditBudget::new(usize::MAX));
        let audit = AuditWriter::start(store.clone(), &lifecycle, Duration::from_secs(1), budget);
        let cipher = TokenCipher::new(&config.encryption_key);
        let runtime = TenantRuntime::start(
            RuntimeSettings::from_config(&config),
            store,
            audit,
            cipher.clone(),
            config.upstream_mcp_url.clone(),
            ChangeFeed::new(16),
            CancellationToken::new(),
        )
        .await
        .expect("started");
        runtime
            .actor_for(&tenant(&cipher))
            .await
            .expect("an actor before the stop");
        let wait = Some(Duration::from_secs(30));
        let stopped = runtime.registry.call(RegistryMsg::StopAll, wait).await;
        assert!(matches!(stopped, Ok(CallResult::Success(()))));
        let after = runtime.actor_for(&tenant(&cipher)).await;
        assert!(
            matches!(after, Err(CallError::Unavailable { .. })),
            "an actor started after StopAll: {:?}",
            after.map(|actor| actor.get_id())
        );
        assert_eq!(runtime.active_count(), 0);
    }

    #[test]
    fn a_tool_call_is_a_small_future_to_move() {
        // Inline, the upstream call's state made this future several KB (README, Performance).
        let size = future_size(TenantRuntime::call_tool);
        assert!(
            size <= 512,
            "TenantRuntime::call_tool's future is {size} bytes"
        );
    }
}
