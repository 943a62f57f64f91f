//! The downstream MCP endpoint: each tenant's tools as an MCP server over Streamable HTTP
//! at `/mcp/{tenantId}` (rmcp's server), through the same tenant actor, limits and audit
//! as the REST route. The gate ([`gate`]) authenticates before rmcp sees a request; the
//! handler ([`handler`]) reads the tenant from the request; the gate serves a session's
//! plain `tools/call`s itself, without rmcp's server ([`fast_path`]); [`sessions`] bounds sessions;
//! [`sealed`] puts each session's state in its id, so any replica serves any session.
//! It does not talk to upstreams itself: `tenants::runtime` does.

pub mod errors;
pub mod fast_path;
pub mod gate;
pub mod handler;
pub mod notify;
pub mod progress;
pub mod replay;
pub mod sealed;
pub mod sessions;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::http::AppState;
use crate::store::SharedStore;
use crate::tenants::SessionEnd;
use fast_path::FastPath;
use gate::Gate;
use handler::{CallSettings, TenantMcp};
use sealed::{SealedSessionStore, SessionSeal};
use sessions::{BoundedSessions, SessionLimits};

pub type McpService = StreamableHttpService<TenantMcp, BoundedSessions>;

/// `/mcp/{tenantId}` with its gate, for the application router (which adds the request
/// context, CORS and timeout layers around it).
pub fn routes(state: &AppState) -> Router<AppState> {
    let config = &state.config;
    let limits = SessionLimits::new(config.mcp_max_sessions, config.mcp_max_sessions_per_tenant);
    let seal = SessionSeal::new(state.admin.cipher().clone());
    let fast_within = config.mcp_session_idle / 10;
    let fast_calls = Arc::new(fast_path::InFlight::default());
    let mut local = LocalSessionManager::default();
    // Idle sessions end, and give their slot back: a session whose client sent nothing for
    // `MCP_SESSION_IDLE_SECS` and `REQUEST_TIMEOUT_MS` more (a call may run that long) is
    // closed within a tenth more ([`close_idle_sessions`]). rmcp's own idle timer stays as
    // a backstop: it restarts only on what rmcp sees, and the gate passes it one request
    // at least every `fast_within` while a session is in use.
    let idle_after = config.mcp_session_idle + config.request_timeout;
    local.session_config.keep_alive = Some(idle_after + fast_within);
    let sessions = Arc::new(BoundedSessions::new(
        local,
        limits.clone(),
        seal.clone(),
        fast_calls.clone(),
    ));
    let gate = Gate {
        auth: state.auth.clone(),
        limits: limits.clone(),
        seal: seal.clone(),
        max_body_bytes: config.max_body_bytes,
        store: state.store.clone(),
        audit: state.audit.clone(),
        auth_limiter: state.auth_limiter.clone(),
        lifecycle: state.lifecycle.clone(),
        tenants: state.tenants.clone(),
        fast: Arc::new(FastPath {
            runtime: state.tenants.clone(),
            settings: call_settings(config),
            in_flight: fast_calls.clone(),
            sessions: state.lifecycle.sessions.clone(),
            limits: limits.clone(),
        }),
        fast_within,
        sessions: sessions.clone(),
    };
    state.lifecycle.tasks.spawn(close_idle_sessions(
        sessions.clone(),
        idle_after,
        fast_within,
        state.lifecycle.sessions.clone(),
    ));
    state.lifecycle.tasks.spawn(forget_expired_streams(
        fast_calls,
        state.lifecycle.token.clone(),
    ));
    state.lifecycle.tasks.spawn(end_sessions_of_changed_tenants(
        state.tenants.tenant_changes(),
        sessions.clone(),
        state.store.clone(),
        state.lifecycle.sessions.clone(),
    ));
    state.lifecycle.tasks.spawn(end_copies_ended_elsewhere(
        state.tenants.remote_session_ends(),
        sessions.clone(),
        state.store.clone(),
        state.lifecycle.sessions.clone(),
    ));
    Router::new()
        .route_service("/mcp/{tenantId}", service(state, sessions, seal))
        // In an `Arc`: axum clones a layer's state for every request.
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::new(gate),
            gate::gate,
        ))
}

/// Closes, every `every` until MCP sessions close, the sessions whose client sent nothing
/// for `idle_after`.
async fn close_idle_sessions(
    sessions: Arc<BoundedSessions>,
    idle_after: Duration,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => sessions.close_idle(idle_after).await,
        }
    }
}

/// Forgets, every [`replay::SWEEP_EVERY`] until shutdown, the fast path's ended streams
/// kept past their time: streams opening and ending do it as well, but a quiet gateway
/// would hold the last ones.
async fn forget_expired_streams(calls: Arc<fast_path::InFlight>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(replay::SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => calls.replays.forget_expired(),
        }
    }
}

/// Ends, as tenants change, their sessions that their credentials no longer open (deleted,
/// disabled, the key they were opened under rotated): API.md's "stops working at once" for
/// what a session holds too (its slot under the caps, its stream).
async fn end_sessions_of_changed_tenants(
    mut changes: broadcast::Receiver<crate::tenants::TenantChange>,
    sessions: Arc<BoundedSessions>,
    store: SharedStore,
    stop: CancellationToken,
) {
    use crate::tenants::TenantChange;
    while let Some(heard) = next_heard(&mut changes, &stop).await {
        let tenants = match heard {
            Ok(TenantChange::One(tenant)) => vec![tenant],
            // Any tenant may have changed.
            Ok(TenantChange::All) | Err(_) => sessions.tenants_with_sessions(),
        };
        for tenant in tenants {
            sessions.end_for_old_credentials(&tenant, &store).await;
        }
    }
}

/// Ends this replica's copies of the sessions that clients ended through other replicas
/// (PostgreSQL fleets), until MCP sessions close. When some ends may have been missed (the
/// fleet listener reconnected, or this task fell behind it), every open copy is checked
/// against the store's record of ended sessions instead.
async fn end_copies_ended_elsewhere(
    mut ends: broadcast::Receiver<SessionEnd>,
    sessions: Arc<BoundedSessions>,
    store: SharedStore,
    stop: CancellationToken,
) {
    while let Some(heard) = next_heard(&mut ends, &stop).await {
        match heard {
            Ok(SessionEnd::One(digest)) => sessions.end_copy(digest).await,
            Ok(SessionEnd::Recheck) => recheck_copies(&sessions, &store).await,
            Err(missed) => {
                tracing::warn!(
                    missed,
                    "fell behind the MCP sessions ended on other replicas"
                );
                recheck_copies(&sessions, &store).await;
            }
        }
    }
}

/// The next message of `feed`, or how many this receiver missed when it fell behind;
/// `None` once `stop` is cancelled or the feed is closed.
async fn next_heard<T: Clone>(
    feed: &mut broadcast::Receiver<T>,
    stop: &CancellationToken,
) -> Option<Result<T, u64>> {
    tokio::select! {
        _ = stop.cancelled() => None,
        heard = feed.recv() => match heard {
            Ok(message) => Some(Ok(message)),
            Err(broadcast::error::RecvError::Lagged(missed)) => Some(Err(missed)),
            Err(broadcast::error::RecvError::Closed) => None,
        },
    }
}

/// Ends the copies open here of sessions the store records as ended. Should the store not
/// answer, the copies last until their idle timeout (the tenant's credential is still
/// checked on every request they serve).
async fn recheck_copies(sessions: &BoundedSessions, store: &SharedStore) {
    let open = sessions.open_digests();
    let asked = store.ended_sessions(&open);
    match crate::store::answered_within(crate::store::STORE_WAIT, asked).await {
        Ok(ended) => {
            for digest in ended {
                sessions.end_copy(digest).await;
            }
        }
        Err(error) => {
            tracing::warn!(%error, "could not check open MCP sessions against ended ones")
        }
    }
}

fn service(state: &AppState, sessions: Arc<BoundedSessions>, seal: SessionSeal) -> McpService {
    let config = &state.config;
    let sessions_token = state.lifecycle.sessions.clone();
    let mut server_config = StreamableHttpServerConfig::default()
        // The gateway runs behind proxies under names it cannot know; every request must
        // carry a tenant credential, which a DNS-rebinding page cannot add.
        .disable_allowed_hosts()
        .with_json_response(true)
        .with_max_request_body_bytes(config.max_body_bytes)
        .with_cancellation_token(sessions_token.child_token());
    // A session unknown here is looked up in this "store", which opens the id itself: a
    // session opened on another replica is rebuilt here, already initialised.
    server_config.session_store = Some(Arc::new(SealedSessionStore::new(seal.clone())));
    let runtime = state.tenants.clone();
    let lifecycle = state.lifecycle.clone();
    let settings = call_settings(config);
    StreamableHttpService::new(
        move || {
            Ok(TenantMcp::new(
                runtime.clone(),
                lifecycle.clone(),
                sessions_token.clone(),
                settings,
            ))
        },
        sessions,
        server_config,
    )
}

fn call_settings(config: &crate::config::Config) -> CallSettings {
    CallSettings {
        audit_arguments: config.audit_arguments,
        request_timeout: config.request_timeout,
    }
}
