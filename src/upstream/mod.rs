//! The upstream side of the gateway: one MCP client connection per tenant, to that tenant's
//! upstream MCP server, carrying that tenant's credentials and nobody else's.
//!
//! This module owns the transports (Streamable HTTP through rmcp, legacy HTTP+SSE through our own
//! [`sse`] transport, and the `auto` choice between them), the rmcp client session, and the
//! cancellation of calls that time out or are abandoned. It does not cache tool lists, retry or
//! reconnect: the tenant actor owns the cache and its supervisor owns reconnection, so that one
//! place decides what a failure means for the tenant.

mod client;
mod connect;
mod error;
mod events;
mod progress;
mod renewal;
mod sse;

use std::time::Duration;

use crate::config::Secret;

pub use client::UpstreamClient;
pub use error::{UpstreamError, UpstreamFailure};
pub use events::UpstreamEvent;

/// Where one call's progress from the upstream goes ([`UpstreamClient::call_tool`]): the
/// notifications as the upstream sent them, still with the gateway's own progress token, for
/// the caller to re-address to its client. Bounded, so a slow caller slows only its own call's
/// progress.
pub type ProgressSink = tokio::sync::mpsc::Sender<rmcp::model::ProgressNotificationParam>;

/// How to reach an upstream MCP server.
///
/// Mirrors `store::UpstreamTransport` (`streamable-http`, `sse`, `auto`); kept here so that this
/// module builds on its own. The two are reconciled when the store lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// MCP Streamable HTTP (protocol 2025-03-26 and later): one endpoint for POST and GET.
    #[default]
    StreamableHttp,
    /// Legacy HTTP+SSE (protocol 2024-11-05): GET an event stream, POST to the endpoint it names.
    Sse,
    /// Streamable HTTP first; legacy SSE when the server answers the first POST with an HTTP 4xx.
    Auto,
}

/// Everything needed to open one tenant's upstream connection.
///
/// `Debug` is safe to log: the token is a [`Secret`], and the URL carries no credential (the
/// token travels only in the `Authorization` header).
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    /// The full endpoint URL, `integrationKey` already in its query when relevant.
    pub url: url::Url,
    /// Sent as `Authorization: Bearer <token>` on every HTTP request to the upstream.
    pub token: Secret,
    pub transport: TransportKind,
    /// Bounds the TCP/TLS connect of every HTTP request, and separately the whole MCP
    /// `initialize` handshake of [`UpstreamClient::connect`].
    pub connect_timeout: Duration,
    /// `clientInfo.name` sent in `initialize`, e.g. `"switchboard"`.
    pub client_name: String,
    /// How long a call may take (`UPSTREAM_TIMEOUT_MS`): a legacy SSE POST, which its call
    /// gives up on by then, is let go of a connect timeout after it.
    pub call_timeout: Duration,
    /// The tenant's calls in flight at most (`TENANT_MAX_IN_FLIGHT`): the session takes at
    /// least as many requests at once, so that none of them queues inside it.
    pub max_in_flight: usize,
}
