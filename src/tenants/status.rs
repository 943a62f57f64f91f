//! What the operator sees of a tenant's runtime: the state of its upstream connection.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    /// No actor runs (never called, idle, or stopped).
    Stopped,
    Connecting,
    Ready,
    /// Restarted too often within the window; calls get 503 until the back-off ends.
    Failing,
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
