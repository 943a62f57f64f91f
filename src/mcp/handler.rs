//! [`TenantMcp`]: the MCP server of one tenant, as rmcp's `ServerHandler`. It holds no
//! tenant of its own: every request reads the [`AuthContext`] the gate put in the HTTP
//! request (rmcp passes the request's `http::request::Parts` in the request context), and
//! asks the tenant runtime, so the same actor, limits and audit serve REST and MCP.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, Implementation,
    InitializeRequestParams, InitializeResult, ListToolsResult, PaginatedRequestParams,
    ServerCapabilities, ServerConfig, SubscriptionFilter,
};
use rmcp::service::{RequestContext, SubscriptionContext};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use tokio_util::sync::CancellationToken;

use super::errors::{call_error, no_tenant};
use super::notify::{self, Forwarder};
use super::progress::{run_relaying, ProgressRelay};
use crate::audit;
use crate::audit::pending::PendingCall;
use crate::auth::AuthContext;
use crate::http::middleware::RequestId;
use crate::shutdown::Lifecycle;
use crate::tenants::messages::{CallError, LONGEST_TOOL_NAME};
use crate::tenants::runtime::TenantRuntime;
use crate::upstream::ProgressSink;

/// Tools per `tools/list` page; a longer list is paged with an opaque cursor.
pub const PAGE_SIZE: usize = 100;

/// One session's (or one session-less request's) server. Built by rmcp's factory.
pub struct TenantMcp {
    runtime: TenantRuntime,
    lifecycle: Arc<Lifecycle>,
    /// Parent of the session's notification forwarder, and the end of every
    /// `subscriptions/listen` stream: cancelled when MCP sessions close.
    sessions: CancellationToken,
    /// The session's notification forwarder; dropped (and stopped) with this handler at
    /// the session's end. `None` until `initialize`: session-less requests get none.
    forwarder: Mutex<Option<Forwarder>>,
    settings: CallSettings,
}

/// How this process serves every MCP tool call (from its configuration).
#[derive(Clone, Copy, Debug)]
pub struct CallSettings {
    /// `AUDIT_ARGUMENTS`: whether tool arguments go into the audit event.
    pub audit_arguments: bool,
    /// `REQUEST_TIMEOUT_MS`: a call dropped past it was cut off by the timeout (audited so).
    pub request_timeout: Duration,
}

impl TenantMcp {
    pub fn new(
        runtime: TenantRuntime,
        lifecycle: Arc<Lifecycle>,
        sessions: CancellationToken,
        settings: CallSettings,
    ) -> Self {
        Self {
            runtime,
            lifecycle,
            sessions,
            forwarder: Mutex::new(None),
            settings,
        }
    }
}

/// The gate's [`AuthContext`] for this request. Absent only if the gate was bypassed.
fn tenant_of(context: &RequestContext<RoleServer>) -> Result<&AuthContext, ErrorData> {
    context
        .extensions
        .get::<http::request::Parts>()
        .and_then(|parts| parts.extensions.get::<AuthContext>())
        .ok_or_else(no_tenant)
}

fn request_id_of(context: &RequestContext<RoleServer>) -> Option<&RequestId> {
    context
        .extensions
        .get::<http::request::Parts>()
        .and_then(|parts| parts.extensions.get::<RequestId>())
}

/// The caller of a request rmcp serves: a session-less one is answered as JSON once done,
/// so the timeout layer may cut it off; rmcp answers one in a session (as the gate tells
/// them apart) with an event stream whose headers go out at once.
fn caller_of(context: &RequestContext<RoleServer>) -> Caller<'_> {
    let parts = context.extensions.get::<http::request::Parts>();
    let in_session = parts.is_some_and(|parts| {
        parts.headers.contains_key("mcp-session-id")
            && super::fast_path::version_has_sessions(&parts.headers)
    });
    Caller {
        request_id: request_id_of(context),
        cut_off_by_timeout: !in_session,
    }
}

/// Who asked for a call, as its audit event needs it.
pub struct Caller<'a> {
    pub request_id: Option<&'a RequestId>,
    /// Whether the timeout layer cuts the request off at `REQUEST_TIMEOUT_MS`: a call
    /// dropped past it was cut off, and is audited as a timeout.
    pub cut_off_by_timeout: bool,
}

impl Caller<'_> {
    /// When the timeout layer cuts the request off, if it does.
    fn cut_off_at(&self, settings: CallSettings) -> Option<Instant> {
        let started = self.request_id.map_or_else(Instant::now, |id| id.started);
        self.cut_off_by_timeout
            .then(|| started + settings.request_timeout)
    }
}

impl ServerHandler for TenantMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new(
            "switchboard",
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions("The tools of this tenant's upstream MCP server, through switchboard.")
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        let tenant_id = tenant_of(&context)?.tenant_id.clone();
        context.peer.set_peer_info(request.clone());
        let result = self.negotiate_initialize(&request)?;
        let forwarder = notify::spawn_forwarder(
            &self.lifecycle,
            &self.runtime,
            tenant_id,
            context.peer.clone(),
            &self.sessions,
        );
        if let Ok(mut slot) = self.forwarder.lock() {
            *slot = Some(forwarder);
        }
        Ok(result)
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let ctx = tenant_of(&context)?;
        let caller = caller_of(&context);
        // Audited once, as REST's `listTools` is: with its outcome, or, when the request
        // ends first (the request timeout, which rmcp passes on to a session-less request,
        // or its client), as cut off (`PendingCall`).
        let pending = PendingCall::new(
            self.runtime.clone(),
            &ctx.tenant_id,
            "tools.list",
            caller.request_id.map(|id| id.id.clone()),
            caller.cut_off_at(self.settings),
        );
        let listing = self.runtime.list_tools(&ctx.tenant, false);
        let Some(list) = run_relaying(listing, None, &context.ct).await else {
            // Recorded as cut off as it goes; the answer reaches nobody.
            drop(pending);
            return Err(call_error(CallError::Upstream("cancelled".into())));
        };
        let cursor = request.and_then(|r| r.cursor);
        let answer = list
            .as_ref()
            .map(|list| page(&list.tools, cursor.as_deref()));
        // A cursor this server never handed out is the client's mistake, refused.
        let outcome = match &answer {
            Ok(Err(_)) => "refused",
            _ => audit::call_outcome(list.as_ref().map(|_| false)),
        };
        let response_bytes = match &answer {
            Ok(Ok(result)) => audit::json_len(result),
            _ => None,
        };
        pending.write(outcome, response_bytes);
        match answer {
            Ok(result) => result,
            Err(err) => Err(call_error(err.clone())),
        }
    }

    /// Session-less (2026-07-28) clients hear of list changes on `subscriptions/listen`;
    /// tool-list changes are the only ones a tenant's upstream passes through the gateway.
    fn accepted_subscription_filter(
        &self,
        _requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        Some(SubscriptionFilter::builder().tools_list_changed().build())
    }

    async fn listen(&self, subscription: SubscriptionContext) -> Result<(), ErrorData> {
        let tenant = tenant_of(subscription.request_context())?.tenant.clone();
        notify::listen(&self.runtime, &tenant, &subscription, &self.sessions).await;
        Ok(())
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let ctx = tenant_of(&context)?;
        let caller = caller_of(&context);
        let progress = ProgressRelay::for_request(&context);
        // In flight for the drain until it ends: in a session, rmcp runs a call on when
        // its client's connection breaks (for the client to resume), past the POST's own
        // count, which ends with the connection.
        let _in_flight = self.lifecycle.begin_request();
        serve_call(
            &self.runtime,
            ctx,
            caller,
            request,
            self.settings,
            progress,
            &context.ct,
        )
        .await
        .map(CallToolResponse::from)
    }
}

/// One `tools/call` of the tenant in `ctx`, through the tenant runtime, with its audit
/// event; for rmcp's handler and the gate's fast path ([`super::fast_path`]) alike.
/// `progress` relays the upstream's progress (from [`ProgressRelay::for_request`]);
/// `cancelled` is the client's `notifications/cancelled`.
pub async fn serve_call(
    runtime: &TenantRuntime,
    ctx: &AuthContext,
    caller: Caller<'_>,
    request: CallToolRequestParams,
    settings: CallSettings,
    (sink, relay): (Option<ProgressSink>, Option<ProgressRelay>),
    cancelled: &CancellationToken,
) -> Result<CallToolResult, ErrorData> {
    if request.name.len() > LONGEST_TOOL_NAME {
        return Err(ErrorData::invalid_params(
            format!("the tool name is longer than {LONGEST_TOOL_NAME} bytes"),
            None,
        ));
    }
    let cut_off_at = caller.cut_off_at(settings);
    let mut pending = PendingCall::new(
        runtime.clone(),
        &ctx.tenant_id,
        "tool.call",
        caller.request_id.map(|id| id.id.clone()),
        cut_off_at,
    );
    pending.tool = Some(request.name.to_string());
    pending.request_bytes = request.arguments.as_ref().and_then(audit::json_len);
    pending.arguments = settings
        .audit_arguments
        .then(|| request.arguments.clone())
        .flatten();
    let call = runtime.call_tool(&ctx.tenant, &request.name, request.arguments, sink);
    // A client's `notifications/cancelled` cancels `cancelled`; dropping the call cancels
    // it upstream too (the upstream client's drop guard).
    let result = run_relaying(call, relay, cancelled)
        .await
        .unwrap_or_else(|| {
            // Dropped before the runtime could count it: by the request timeout (rmcp
            // cancels a session-less call with its request, as `PendingCall` tells by the
            // time), or by the client.
            let error = if cut_off_at.is_some_and(|at| Instant::now() >= at) {
                CallError::Timeout
            } else {
                CallError::Upstream("cancelled by the client".into())
            };
            let outcome = audit::call_outcome(Err(&error));
            audit::pending::abandoned_call_counted("tool.call", &ctx.tenant_id, outcome);
            Err(error)
        });
    let result = result.map(|mut r| {
        r.is_error.get_or_insert(false);
        r
    });
    pending.write(
        audit::call_outcome(result.as_ref().map(|r| r.is_error.unwrap_or(false))),
        result.as_ref().ok().and_then(audit::json_len),
    );
    result.map_err(call_error)
}

/// One page of `tools`, starting at `cursor` (an offset this server handed out).
pub fn page(
    tools: &[rmcp::model::Tool],
    cursor: Option<&str>,
) -> Result<ListToolsResult, ErrorData> {
    let start = match cursor {
        None => 0,
        Some(c) => c
            .parse::<usize>()
            .ok()
            .filter(|s| *s <= tools.len())
            .ok_or_else(|| ErrorData::invalid_params("invalid cursor", None))?,
    };
    let end = (start + PAGE_SIZE).min(tools.len());
    let mut result = ListToolsResult::with_all_items(tools[start..end].to_vec());
    if end < tools.len() {
        result.next_cursor = Some(end.to_string());
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(n: usize) -> Vec<rmcp::model::Tool> {
        (0..n)
            .map(|i| rmcp::model::Tool::new(format!("t{i}"), "d", Arc::new(serde_json::Map::new())))
            .collect()
    }

    #[test]
    fn long_lists_are_paged_and_bad_cursors_refused() {
        let all = tools(250);
        let first = page(&all, None).expect("first page");
        assert_eq!(first.tools.len(), 100);
        assert_eq!(first.next_cursor.as_deref(), Some("100"));
        let last = page(&all, Some("200")).expect("last page");
        assert_eq!(last.tools.len(), 50);
        assert!(last.next_cursor.is_none());
        assert!(page(&all, Some("999")).is_err());
        assert!(page(&all, Some("x")).is_err());
        assert!(page(&tools(3), None).expect("short").next_cursor.is_none());
    }
}
