//! Tenants: their administration ([`admin`]), and (with the actors) their runtime.
//! A change to a tenant is announced on the [`ChangeFeed`], which the registry listens
//! to so that it rebuilds or stops that tenant's actor.

pub mod actor;
pub mod admin;
pub mod announce;
pub mod audit_buffer;
pub mod backoff;
pub mod lane;
pub mod messages;
pub mod registry;
pub mod runtime;
pub mod status;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::config::Config;

/// The numbers the tenant runtime works by, all from the configuration.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    pub upstream_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_in_flight: usize,
    pub tool_ttl: Duration,
    pub idle: Duration,
    /// Transport failures in a row before the tenant is marked failing.
    pub failure_threshold: u32,
    pub max_restarts: u32,
    pub restart_window: Duration,
    pub restart_base: Duration,
    pub rate_per_second: u32,
    pub rate_burst: u32,
    pub audit_buffer: usize,
    pub audit_batch: usize,
    /// How long a stopping actor waits for its leased calls and audit writes.
    pub stop_grace: Duration,
    /// Replicas sharing the database (1 alone or on SQLite), kept current by the
    /// heartbeat in [`crate::store::replicas`]; each replica takes 1/N of a rate limit.
    pub replicas: Arc<AtomicU32>,
}

impl RuntimeSettings {
    pub fn from_config(config: &Config) -> Self {
        Self {
            upstream_timeout: config.upstream_timeout,
            connect_timeout: config.upstream_connect_timeout,
            max_in_flight: config.tenant_max_in_flight,
            tool_ttl: config.tool_cache_ttl,
            idle: config.tenant_idle,
            failure_threshold: 10,
            max_restarts: config.tenant_max_restarts,
            restart_window: config.tenant_restart_window,
            restart_base: Duration::from_millis(100),
            rate_per_second: config.tenant_rate_limit,
            rate_burst: config.tenant_rate_burst,
            audit_buffer: config.audit_buffer_size,
            audit_batch: config.audit_batch_size,
            stop_grace: config.drain_timeout,
            replicas: Arc::new(AtomicU32::new(1)),
        }
    }

    /// The longest a stopping actor takes: `stop_grace` for its leased calls, then as long
    /// again for its last audit writes. Who waits for actors to stop waits this long.
    pub fn actor_stop_bound(&self) -> Duration {
        self.stop_grace * 2
    }

    /// How long a call may wait for an actor's answer to a lease or a tool list: the answer
    /// can wait for a connect (twice the connect timeout with `auto`: Streamable HTTP, then
    /// SSE) and then tool-list discoveries (the upstream timeout each): the rest of one
    /// running when it came, which may turn out stale, and the loads again after it
    /// (`actor::MAX_STALE_LOADS`). Shorter, a slow but working upstream would get its
    /// callers 503 "restarting"; the request's own timeout (504) cuts a wait this long.
    pub fn actor_reply_bound(&self) -> Duration {
        let loads = actor::MAX_STALE_LOADS + 1;
        let slowest =
            self.connect_timeout * 2 + self.upstream_timeout * loads + Duration::from_secs(5);
        slowest.max(Duration::from_secs(30))
    }

    /// The replica count now (at least 1).
    pub fn replica_count(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// How often an actor checks for idleness and flushes its audit buffer.
    pub fn tick_interval(&self) -> Duration {
        (self.idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }
}

/// One announcement on the [`ChangeFeed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantChange {
    /// This tenant changed, was disabled or deleted, or had its key rotated.
    One(String),
    /// Anything may have changed (the fleet listener reconnected and may have missed
    /// notifications): drop everything held in memory about every tenant.
    All,
}

/// What the fleet listener heard about MCP sessions clients ended on other replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client ended, through another replica, the session whose id has this digest.
    One(String),
    /// Some ends may have been missed (the listener reconnected): check every open copy
    /// against the store's record of ended sessions.
    Recheck,
}

/// Announces "tenant X changed (or was deleted)" to whoever keeps tenant state in memory.
/// Fed locally by [`admin`] and, on PostgreSQL, by the fleet listener with the changes
/// other replicas made ([`crate::store::change_feed`]).
///
/// It also carries what other replicas heard that this one's MCP sessions must know:
/// "tenant X's upstream tool list changed" (for its open sessions), and "the client ended
/// the MCP session with this digest" (so this replica's copy of it ends too).
#[derive(Clone)]
pub struct ChangeFeed {
    sender: broadcast::Sender<TenantChange>,
    tools: broadcast::Sender<String>,
    sessions_ended: broadcast::Sender<SessionEnd>,
    /// Whether the feed hears every change made anywhere: always alone (SQLite); on
    /// PostgreSQL only while the fleet listener is connected. While it is not, what was
    /// read of a tenant may have changed through another replica unheard.
    hearing: Arc<std::sync::atomic::AtomicBool>,
    /// How many tenant changes were published, counted before each is sent, and how many
    /// were sent, counted after: see [`Self::changes_told`].
    published: Arc<std::sync::atomic::AtomicU64>,
    told: Arc<std::sync::atomic::AtomicU64>,
}

impl ChangeFeed {
    /// `capacity` bounds the backlog of a slow listener; a listener that lags reloads all.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        let (tools, _) = broadcast::channel(capacity.max(1));
        let (sessions_ended, _) = broadcast::channel(capacity.max(1));
        Self {
            sender,
            tools,
            sessions_ended,
            hearing: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            published: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            told: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Whether every change made anywhere is heard now (see the field).
    pub fn hearing(&self) -> bool {
        self.hearing.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The fleet listener is connected (`true`), or not.
    pub fn set_hearing(&self, on: bool) {
        self.hearing.store(on, std::sync::atomic::Ordering::Release);
    }

    pub fn publish(&self, tenant_id: &str) {
        self.send_counted(TenantChange::One(tenant_id.to_owned()));
    }

    /// Asks every listener for a full reload.
    pub fn publish_all(&self) {
        self.send_counted(TenantChange::All);
    }

    fn send_counted(&self, change: TenantChange) {
        use std::sync::atomic::Ordering;
        self.published.fetch_add(1, Ordering::AcqRel);
        // No listener is fine: nothing is cached then.
        let _ = self.sender.send(change);
        self.told.fetch_add(1, Ordering::AcqRel);
    }

    /// How many tenant changes had been sent to every listener (the credential cache
    /// among them) by now. Whoever notes this before reading a tenant's credentials, and
    /// finds [`Self::published`] the same after acting on them, knows that no change was
    /// sent in between: one sent before the read reached the cache first (the read saw
    /// it), and one counted after the note is in the later count.
    pub fn changes_told(&self) -> u64 {
        self.told.load(std::sync::atomic::Ordering::Acquire)
    }

    /// How many tenant changes have been published so far, counted as each is about to
    /// be sent.
    pub fn published(&self) -> u64 {
        self.published.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<TenantChange> {
        self.sender.subscribe()
    }

    /// `tenant_id`'s tool list changed, as its actor here or another replica found.
    pub fn publish_tools_changed(&self, tenant_id: &str) {
        // No open session of any tenant is fine: nobody to tell.
        let _ = self.tools.send(tenant_id.to_owned());
    }

    /// Tenant ids whose tool lists changed, here or on other replicas.
    pub fn subscribe_tools(&self) -> broadcast::Receiver<String> {
        self.tools.subscribe()
    }

    /// A client ended, through another replica, the MCP session whose id has this digest.
    pub fn publish_session_ended(&self, digest: &str) {
        // No MCP endpoint listening is fine: no copies of sessions to end.
        let _ = self.sessions_ended.send(SessionEnd::One(digest.to_owned()));
    }

    /// Session ends may have been missed: open copies are to be checked against the store.
    pub fn publish_sessions_recheck(&self) {
        let _ = self.sessions_ended.send(SessionEnd::Recheck);
    }

    /// MCP sessions that clients ended through other replicas.
    pub fn subscribe_sessions_ended(&self) -> broadcast::Receiver<SessionEnd> {
        self.sessions_ended.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_waits_for_the_slowest_connect_and_list_an_actor_may_be_doing() {
        let mut settings = RuntimeSettings::from_config(&Config::for_tests());
        settings.connect_timeout = Duration::from_secs(10);
        settings.upstream_timeout = Duration::from_secs(30);
        // `auto` connects twice at worst, then lists the tools: a load that turns out stale
        // and the loads again after it.
        assert!(settings.actor_reply_bound() > Duration::from_secs(2 * 10 + 3 * 30));
        settings.connect_timeout = Duration::from_millis(100);
        settings.upstream_timeout = Duration::from_millis(200);
        assert_eq!(settings.actor_reply_bound(), Duration::from_secs(30));
    }
}
