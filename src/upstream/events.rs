//! What the upstream tells its tenant without being asked: tool-list changes, progress, and the
//! end of the connection. The rmcp [`ClientHandler`] here only forwards those: tool-list
//! changes and the end into the tenant's bounded channel (deciding what to do about them,
//! refresh the cached list or reconnect, is the tenant actor's job), progress to the one call
//! that is waiting for it (through rmcp's [`ProgressDispatcher`], keyed by the progress token
//! rmcp put on that call's request).

use rmcp::{
    handler::client::progress::ProgressDispatcher,
    model::{
        ClientCapabilities, ClientConfig, Implementation, ProgressNotificationParam,
        ProtocolVersion,
    },
    service::{NotificationContext, RoleClient},
    ClientHandler,
};
use tokio::sync::mpsc;

/// A notification from the upstream about the whole connection, or its end.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamEvent {
    /// The upstream sent `notifications/tools/list_changed`: a cached tool list is stale.
    ToolListChanged,
    /// The connection ended (transport closed, upstream gone, or [`super::UpstreamClient::close`]).
    /// Sent once, after which every call fails with [`super::UpstreamError::Closed`].
    Closed,
}

/// The rmcp client handler of one upstream connection.
#[derive(Clone)]
pub(super) struct EventForwarder {
    events: mpsc::Sender<UpstreamEvent>,
    /// Shared with the connection's [`super::UpstreamClient`], whose calls subscribe to their
    /// own request's token; progress for a token nobody subscribed to is dropped.
    progress: ProgressDispatcher,
    info: ClientConfig,
}

impl EventForwarder {
    pub(super) fn new(
        events: mpsc::Sender<UpstreamEvent>,
        progress: ProgressDispatcher,
        client_name: &str,
    ) -> Self {
        // 2025-11-25 is the newest revision with an `initialize` handshake and sessions; the
        // default (2026-07-28) would move list-changed notifications onto listen subscriptions,
        // which Integration App and most servers do not speak yet.
        let info = ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new(client_name, env!("CARGO_PKG_VERSION")),
        )
        .with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE);
        Self {
            events,
            progress,
            info,
        }
    }
}

impl ClientHandler for EventForwarder {
    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        // Waits for room: a list change must not be lost. rmcp runs each notification handler
        // in its own task, so a slow tenant does not stall the connection.
        let _ = self.events.send(UpstreamEvent::ToolListChanged).await;
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        // Waits only on the subscribed call, which drains its subscription while it waits
        // for the answer; this notification's own task holds nothing else up.
        self.progress.handle_notification(params).await;
    }

    fn get_info(&self) -> ClientConfig {
        self.info.clone()
    }
}
