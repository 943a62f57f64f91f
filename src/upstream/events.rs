//! What the upstream tells its tenant without being asked: tool-list changes and the end of
//! the connection. The rmcp [`ClientHandler`] here only forwards those into the tenant's
//! bounded channel (deciding what to do about them, refresh the cached list or reconnect, is
//! the tenant actor's job). Progress never reaches it: the transport routes each progress
//! notification to its call as it is read ([`super::progress`]), so it keeps its order.

use rmcp::{
    model::{ClientCapabilities, ClientConfig, Implementation, ProtocolVersion},
    service::{NotificationContext, RoleClient},
    ClientHandler,
};
use tokio::sync::mpsc;

/// A notification from the upstream about the whole connection, or its end.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamEvent {
    /// The upstream sent `notifications/tools/list_changed`: a cached tool list is stale.
    ToolListChanged,
    /// The upstream forgot the session, and rmcp opened a new one in the same connection
    /// ([`super::renewal`]): what the old session listed may no longer be what it serves.
    SessionRenewed,
    /// The connection ended (transport closed, upstream gone, or [`super::UpstreamClient::close`]).
    /// Sent once, after which every call fails with [`super::UpstreamError::Closed`].
    Closed,
}

/// The rmcp client handler of one upstream connection.
#[derive(Clone)]
pub(super) struct EventForwarder {
    events: mpsc::Sender<UpstreamEvent>,
    info: ClientConfig,
}

impl EventForwarder {
    /// Where this connection's events go, for its transport's own ([`super::renewal`]).
    pub(super) fn events(&self) -> mpsc::Sender<UpstreamEvent> {
        self.events.clone()
    }

    pub(super) fn new(events: mpsc::Sender<UpstreamEvent>, client_name: &str) -> Self {
        // 2025-11-25 is the newest revision with an `initialize` handshake and sessions; the
        // default (2026-07-28) would move list-changed notifications onto listen subscriptions,
        // which Integration App and most servers do not speak yet.
        let info = ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new(client_name, env!("CARGO_PKG_VERSION")),
        )
        .with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE);
        Self { events, info }
    }
}

impl ClientHandler for EventForwarder {
    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        // Waits for room: a list change must not be lost. rmcp runs each notification handler
        // in its own task, so a slow tenant does not stall the connection.
        let _ = self.events.send(UpstreamEvent::ToolListChanged).await;
    }

    fn get_info(&self) -> ClientConfig {
        self.info.clone()
    }
}
