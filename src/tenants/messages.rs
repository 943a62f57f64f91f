//! The messages tenant actors and the registry answer, and the errors a call can end in.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use ractor::{ActorRef, RpcReplyPort};
use rmcp::model::Tool;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::store::{AuditRecord, TenantRecord};
use crate::upstream::{UpstreamClient, UpstreamError, UpstreamEvent, UpstreamFailure};

/// The longest tool name a call may name, in bytes: four times what MCP advises (128
/// characters). A longer one is refused as the caller's mistake before it is audited, so a
/// tenant cannot write audit rows of a request body's size at no cost to its rate limit (an
/// unknown tool is refused from the cached list without spending it).
pub const LONGEST_TOOL_NAME: usize = 512;

/// A tenant's tools as its upstream listed them, with an index for name lookups.
#[derive(Debug)]
pub struct ToolList {
    pub tools: Vec<Tool>,
    names: HashSet<String>,
}

impl ToolList {
    pub fn new(tools: Vec<Tool>) -> Self {
        let names = tools.iter().map(|t| t.name.to_string()).collect();
        Self { tools, names }
    }

    /// A digest of the whole list (names, descriptions, schemas), never 0, to tell one list
    /// from another without keeping it.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{DefaultHasher, Hasher};
        let mut hasher = DefaultHasher::new();
        hasher.write(&serde_json::to_vec(&self.tools).unwrap_or_default());
        hasher.finish().max(1)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}

/// The right to make one upstream call: a clone of the tenant's connection and one of its
/// in-flight permits. The call runs in the caller's task, never in the actor.
pub struct Lease {
    pub client: UpstreamClient,
    /// Which connection this is, so a failure report cannot tear down a newer one.
    pub generation: u64,
    /// The cached tool list, when there is one.
    pub tools: Option<Arc<ToolList>>,
    pub(super) _permit: OwnedSemaphorePermit,
}

/// Why a tenant call did not reach (or come back from) the upstream.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum CallError {
    #[error("unknown tool {0}")]
    UnknownTool(String),
    #[error("upstream error: {0}")]
    Upstream(String),
    #[error("upstream timeout")]
    Timeout,
    /// The tenant's upstream failed too many times in a row (`Failing`): it is not tried
    /// again before `retry_after`. API.md's 502: the upstream could not be reached.
    #[error("upstream failing: {reason}")]
    Failing {
        reason: String,
        retry_after: Duration,
    },
    /// The tenant is restarting (a crashed actor's back-off, a change in flight); retry after
    /// the given time.
    #[error("tenant unavailable: {reason}")]
    Unavailable {
        reason: String,
        retry_after: Duration,
    },
    /// The tenant's in-flight limit is reached.
    #[error("too many calls in flight")]
    Busy { retry_after: Duration },
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
}

impl From<UpstreamError> for CallError {
    fn from(err: UpstreamError) -> Self {
        match err {
            UpstreamError::Timeout => Self::Timeout,
            // The upstream's limit on the tenant's own credential: the tenant's limit, as
            // API.md's 429 says, with the upstream's wait when it gave one.
            UpstreamError::Throttled { retry_after } => Self::RateLimited {
                retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
            },
            other => Self::Upstream(other.to_string()),
        }
    }
}

/// The outcome of one audit batch write: how many events were written, or the batch back.
pub type AuditWrite = Result<usize, Vec<AuditRecord>>;

pub enum TenantMsg {
    /// Lend a connection for one call of `tool` (connecting first when needed). A tool not
    /// in a fresh tool list is refused before the rate limit is spent.
    Lease {
        tool: String,
        reply: RpcReplyPort<Result<Lease, CallError>>,
    },
    /// The tool list, from the cache or discovered again (`refresh`). `spent`: the request
    /// has spent the rate limit already (a tool call, whose lease came without a list).
    Tools {
        refresh: bool,
        spent: bool,
        reply: RpcReplyPort<Result<Arc<ToolList>, CallError>>,
    },
    /// Spend one request of the tenant's rate limit on work that does not reach the upstream
    /// but costs the gateway: an MCP session's `initialize`.
    Spend(RpcReplyPort<Result<(), CallError>>),
    /// How a leased call ended: transport failures count towards marking the tenant failing.
    /// A call leased from the lane sends it for a failure, and for a success only while the
    /// actor counts failures in a row (see `lane`); a call leased from the actor always. A
    /// call that timed out sends `TimedOut` instead: it neither counts nor resets the count.
    Outcome {
        generation: u64,
        failure: Option<UpstreamFailure>,
    },
    /// A call or tool listing on connection `generation` got no answer in time: the actor
    /// pings the upstream, one ping at a time, to tell a slow tool from a silent upstream.
    TimedOut {
        generation: u64,
    },
    /// The ping's outcome: no answer in time means the connection is dropped as failed.
    Pinged {
        generation: u64,
        result: Result<(), UpstreamError>,
    },
    /// The audit buffer holds a whole batch (see `audit_buffer`): write it.
    AuditBatch,
    /// A token cancelled when this actor stops (or crashes): the end of a downstream
    /// `subscriptions/listen` stream, which then authenticates again.
    WatchStop(RpcReplyPort<CancellationToken>),
    Connected {
        generation: u64,
        result: Result<UpstreamClient, UpstreamError>,
    },
    ToolsLoaded {
        generation: u64,
        /// The tool-list epoch the load started in (see `TenantState::tools_epoch`).
        epoch: u64,
        result: Result<Vec<Tool>, UpstreamError>,
    },
    Upstream {
        generation: u64,
        event: UpstreamEvent,
    },
    /// The audit batch write in flight has ended; its outcome is its task's output.
    AuditWritten,
    Tick,
    /// Fault injection for the supervision tests: the handler panics.
    #[doc(hidden)]
    Panic,
}

pub enum RegistryMsg {
    /// The running actor for `record`'s tenant, started (or rebuilt, if older) as needed.
    Start {
        record: Box<TenantRecord>,
        reply: RpcReplyPort<Result<ActorRef<TenantMsg>, CallError>>,
    },
    /// A tenant that `Start`s wait for, read again (it changed lately) off the registry's
    /// mailbox: the read began at `asked_at`, the `attempt`th for these waiters; `read` is
    /// the tenant as the store had it then, or why it could not be read.
    ReadAgain {
        tenant_id: String,
        asked_at: std::time::Instant,
        attempt: u32,
        read: Box<Result<Option<TenantRecord>, String>>,
    },
    /// The tenant changed or was deleted: stop its actor; the next call starts a fresh one.
    Changed(String),
    /// Change notifications were missed: stop every actor so each reloads its tenant.
    ChangedAll,
    /// A crashed tenant's back-off ended: start it again.
    Restart(String),
    /// Stop every tenant actor (flushing their audit buffers) and answer when done.
    StopAll(RpcReplyPort<()>),
}
