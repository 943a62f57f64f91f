//! The fleet's change feed on PostgreSQL: a replica that changes, disables, deletes or
//! re-keys a tenant sends `NOTIFY switchboard_tenants, '<tenant id>'` in the same
//! transaction (see `postgres.rs`), and every replica runs [`listen`], which holds one
//! dedicated connection (not from the pool: a pooled connection would be recycled and
//! lose its LISTEN) and republishes what it hears on the local [`ChangeFeed`].
//!
//! Nothing polls. After every (re)connect the listener publishes a full reload, because
//! notifications sent while it was away are lost: that way a missed notification can only
//! cost a rebuild, never leave a replica stale. The same connection also hears
//! `switchboard_replicas` (replicas joining or leaving, see [`super::replicas`]) and
//! `switchboard_tool_changes` (a tenant's upstream tool list changed, heard by the replica
//! named in the payload; the others pass it to their open MCP sessions of that tenant)
//! and `switchboard_sessions_ended` (a client ended an MCP session through the replica
//! named in the payload; the others end their copies and never rebuild it).
//! A tool change missed while disconnected is not replayed: clients re-list on reconnect.
//! Session ends are recorded in the database as well as announced, so after every
//! (re)connect the listener also asks for this replica's open session copies to be checked
//! against that record.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use crate::tenants::backoff::Backoff;
use crate::tenants::ChangeFeed;

/// The channel tenant changes are announced on; the payload is the tenant id.
pub const TENANTS_CHANNEL: &str = "switchboard_tenants";
/// The channel replicas announce joining and leaving on; the payload is the replica id.
pub const REPLICAS_CHANNEL: &str = "switchboard_replicas";
/// The channel upstream tool-list changes are announced on; payload `<origin>/<tenant id>`.
pub const TOOLS_CHANNEL: &str = "switchboard_tool_changes";
/// The channel ended MCP sessions are announced on; payload `<origin>/<session id digest>`.
pub const SESSIONS_CHANNEL: &str = "switchboard_sessions_ended";

/// The payload of an announcement about `subject` (a tenant id, a session digest) made by
/// replica `origin`.
pub fn origin_payload(origin: &str, subject: &str) -> String {
    format!("{origin}/{subject}")
}

/// Waits between reconnect attempts grow from this to [`RECONNECT_MAX`].
const RECONNECT_BASE: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Why a listening session ended (never carries the connection string).
#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("connection closed by the server")]
    Closed,
}

/// Where the listener delivers what it hears.
pub(super) struct Sinks {
    pub feed: ChangeFeed,
    /// Woken when a replica joins or leaves, so the heartbeat recounts at once.
    pub replicas_changed: Arc<Notify>,
    /// This replica's name in tool-change payloads: its own announcements are skipped
    /// (its sessions heard the change from its tenant actor already).
    pub origin: Arc<str>,
}

/// Listens until `shutdown`, reconnecting with back-off whenever the connection drops.
pub(super) async fn listen(
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    sinks: Sinks,
    shutdown: CancellationToken,
) {
    let backoff = Backoff {
        base: RECONNECT_BASE,
        max: RECONNECT_MAX,
    };
    let mut attempt = 0u32;
    // Until listening, a change another replica makes goes unheard here.
    sinks.feed.set_hearing(false);
    loop {
        let ended = tokio::select! {
            _ = shutdown.cancelled() => return,
            ended = session(&config, &tls, &sinks, &mut attempt) => ended,
        };
        sinks.feed.set_hearing(false);
        attempt += 1;
        let delay = backoff.delay(attempt);
        tracing::warn!(error = %ended, retry_in = ?delay, "fleet change listener disconnected");
        crate::metrics::change_listener_reconnected();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One connection: LISTEN, publish a full reload, then forward notifications until the
/// connection ends. Resets `attempt` once listening.
async fn session(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    sinks: &Sinks,
    attempt: &mut u32,
) -> ListenError {
    let (client, mut connection) = match config.connect(tls.clone()).await {
        Ok(pair) => pair,
        Err(e) => return ListenError::Connect(super::postgres::describe(&e)),
    };
    // The connection only makes progress while polled; its messages are our notifications.
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!(
        "LISTEN {TENANTS_CHANNEL}; LISTEN {REPLICAS_CHANNEL}; LISTEN {TOOLS_CHANNEL}; \
         LISTEN {SESSIONS_CHANNEL}"
    );
    let listening = client.batch_execute(&statement);
    tokio::pin!(listening);
    loop {
        tokio::select! {
            done = &mut listening => match done {
                Ok(()) => break,
                Err(e) => return ListenError::Lost(super::postgres::describe(&e)),
            },
            message = messages.next() => if let Some(ended) = deliver(message, sinks) {
                return ended;
            },
        }
    }
    *attempt = 0;
    tracing::info!("fleet change listener connected");
    // Anything may have changed while we were not listening.
    sinks.feed.publish_all();
    sinks.feed.set_hearing(true);
    sinks.feed.publish_sessions_recheck();
    sinks.replicas_changed.notify_one();
    // `client` stays alive until we return: dropping it would close the connection.
    loop {
        if let Some(ended) = deliver(messages.next().await, sinks) {
            return ended;
        }
    }
}

/// Hands one message from the connection on; `Some` when the connection ended.
fn deliver(
    message: Option<Result<AsyncMessage, tokio_postgres::Error>>,
    sinks: &Sinks,
) -> Option<ListenError> {
    match message {
        Some(Ok(AsyncMessage::Notification(n))) => {
            match n.channel() {
                TENANTS_CHANNEL => sinks.feed.publish(n.payload()),
                REPLICAS_CHANNEL => sinks.replicas_changed.notify_one(),
                TOOLS_CHANNEL => {
                    if let Some(tenant) = from_elsewhere(n.payload(), sinks) {
                        sinks.feed.publish_tools_changed(tenant)
                    }
                }
                SESSIONS_CHANNEL => {
                    if let Some(digest) = from_elsewhere(n.payload(), sinks) {
                        sinks.feed.publish_session_ended(digest)
                    }
                }
                _ => {}
            }
            None
        }
        Some(Ok(_)) => None,
        Some(Err(e)) => Some(ListenError::Lost(super::postgres::describe(&e))),
        None => Some(ListenError::Closed),
    }
}

/// The subject of an [`origin_payload`] announced by another replica; `None` for this
/// replica's own announcements (it acted on them already) and for malformed payloads.
fn from_elsewhere<'a>(payload: &'a str, sinks: &Sinks) -> Option<&'a str> {
    match payload.split_once('/') {
        Some((origin, subject)) if origin != &*sinks.origin => Some(subject),
        _ => None,
    }
}
