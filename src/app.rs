//! Wiring and the order of things: open the store and migrate, build the credential
//! checker, tenant admin and tenant runtime, serve HTTP; on shutdown, drain in the order
//! DESIGN.md gives (readiness off, in-flight work finishes, actors stop and flush, queued
//! audit events are written, background tasks end).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::audit::{budget::AuditBudget, AuditWriter};
use crate::auth::Authenticator;
use crate::cipher::TokenCipher;
use crate::config::Config;
use crate::http::{self, AppParts, AppState};
use crate::shutdown::Lifecycle;
use crate::store::{self, SharedStore};
use crate::tenants::admin::TenantAdmin;
use crate::tenants::runtime::TenantRuntime;
use crate::tenants::{ChangeFeed, RuntimeSettings};

/// A built application, not yet serving.
pub struct App {
    pub state: AppState,
}

impl App {
    /// Opens the store (applying migrations) and builds every component.
    pub async fn build(config: Config, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let store = store::open(config.database_url.as_deref(), config.database_pool_size).await?;
        let applied = store.migrate().await?;
        if !applied.is_empty() {
            tracing::info!(?applied, backend = store.backend(), "migrations applied");
        }
        Self::with_store(config, store, shutdown).await
    }

    /// Builds every component on a store that is already open and migrated.
    pub async fn with_store(
        config: Config,
        store: SharedStore,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        crate::metrics::install();
        crate::metrics::set_series_cap(config.metrics_max_tenant_series);
        let lifecycle = Arc::new(Lifecycle::new(shutdown.clone()));
        crate::audit::spawn_retention(store.clone(), config.audit_retention_days, &lifecycle);
        // What audit events waiting for the store may hold in memory: the writer's queue
        // and every tenant's buffer (which takes it from the writer) together.
        let audit_budget = Arc::new(AuditBudget::new(config.audit_buffer_bytes));
        let audit = AuditWriter::start(
            store.clone(),
            &lifecycle,
            config.drain_timeout,
            audit_budget,
        );
        let changes = ChangeFeed::new(1024);
        let cipher = TokenCipher::new(&config.encryption_key);
        let auth = Arc::new(Authenticator::new(&config, store.clone(), &changes));
        let settings = RuntimeSettings::from_config(&config);
        let replicas = settings.replicas.clone();
        let tenants = TenantRuntime::start(
            settings,
            store.clone(),
            audit.clone(),
            cipher.clone(),
            config.upstream_mcp_url.clone(),
            changes.clone(),
            shutdown,
        )
        .await?;
        // After the registry subscribed to `changes`, so no announcement is missed.
        let fleet = [
            store.listen_changes(changes.clone(), lifecycle.token.clone()),
            store.replica_heartbeat(replicas, lifecycle.token.clone()),
        ];
        for task in fleet.into_iter().flatten() {
            lifecycle.tasks.spawn(task);
        }
        let admin = Arc::new(TenantAdmin::new(
            store.clone(),
            audit.clone(),
            cipher,
            changes,
        ));
        let auth_limiter = Arc::new(http::ratelimit::AuthLimiter::new(&config));
        auth_limiter.spawn_cleanup(&lifecycle);
        Ok(Self {
            state: AppState::new(AppParts {
                config,
                store,
                audit,
                auth,
                admin,
                tenants,
                lifecycle,
                auth_limiter,
                probe: Arc::default(),
            }),
        })
    }

    /// Serves on `listener` until the lifecycle token is cancelled, then drains.
    pub async fn serve(self, listener: TcpListener) -> anyhow::Result<()> {
        let state = self.state;
        let lifecycle = state.lifecycle.clone();
        let drain_timeout = state.config.drain_timeout;
        let router = http::router(state.clone());
        // TCP_NODELAY: an answer written in parts (rmcp's JSON responses are) would
        // otherwise wait for the client's delayed ACK, ~40 ms per call on Linux.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let stop_accepting = CancellationToken::new();
        let server = {
            let stop = stop_accepting.clone();
            tokio::spawn(async move {
                axum::serve(
                    listener,
                    router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
                )
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
            })
        };
        lifecycle.token.cancelled().await;
        tracing::info!("shutdown requested: draining");
        lifecycle.start_drain();
        if !lifecycle.wait_idle(drain_timeout).await {
            tracing::warn!("drain timeout reached with requests still in flight");
        }
        // MCP sessions hold open streams; end them so the server can stop accepting.
        lifecycle.sessions.cancel();
        stop_accepting.cancel();
        match tokio::time::timeout(drain_timeout, server).await {
            Ok(joined) => joined??,
            Err(_) => tracing::warn!("HTTP server did not stop within the drain timeout"),
        }
        // In-flight calls are done: stop the tenant actors, which flush their audit buffers.
        state.tenants.shutdown().await;
        // Admin changes whose callers went away end, then nothing writes audit events any
        // more: the queued ones are written now.
        state.admin.finish(drain_timeout).await;
        state.audit.close(drain_timeout).await;
        // The background tasks (fleet listener and heartbeat, audit retention, clean-ups)
        // end on the shutdown token; one stuck on a database that stopped answering must
        // not keep the process from exiting.
        lifecycle.tasks.close();
        if tokio::time::timeout(drain_timeout, lifecycle.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within the drain timeout");
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Builds the application and serves it on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    App::build(config, shutdown).await?.serve(listener).await
}
