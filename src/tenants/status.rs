//! What the operator sees of a tenant's runtime: the state of its upstream connection.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    /// No connection: no actor runs (never called, idle, or stopped), or its actor runs
    /// but has not connected yet, or its last connection attempt or connection failed
    /// (fewer failures in a row than the failing threshold; the next call connects again).
    Stopped,
    Connecting,
    Ready,
    /// Either its actor restarted too often within the window (calls get 503 `unavailable`
    /// until the back-off ends), or its upstream failed too many times in a row (calls get
    /// 502 `upstream_error` with `Retry-After`, without trying the upstream, until the
    /// back-off ends).
    Failing,
}

impl ConnectionState {
    pub const ALL: [Self; 4] = [Self::Stopped, Self::Connecting, Self::Ready, Self::Failing];

    /// As the API and the metrics label say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Connecting => "connecting",
            Self::Ready => "ready",
            Self::Failing => "failing",
        }
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamStatus {
    pub state: ConnectionState,
    pub tool_count: Option<usize>,
    pub restarts: u32,
    pub last_error: Option<String>,
}

impl UpstreamStatus {
    pub fn stopped() -> Self {
        Self {
            state: ConnectionState::Stopped,
            tool_count: None,
            restarts: 0,
            last_error: None,
        }
    }
}
