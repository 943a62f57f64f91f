//! The MCP endpoint `/mcp/{tenantId}` end to end: rmcp's own client and raw JSON-RPC over
//! HTTP against the real gateway on port 0, each tenant on its own upstream MCP server on
//! loopback (tests/common/upstream).

mod common;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use common::gateway::{CreatedTenant, TestGateway};
use common::mcp_client::{connect, first_event_ids, initialize_request, raw, Raw, RawMcp};
use common::upstream::TestUpstream;
use reqwest::{Method, StatusCode};
use rmcp::model::CallToolRequestParams;
use serde_json::{json, Value};
use switchboard::config::Config;

async fn tenant_on(gw: &TestGateway, upstream_url: &str) -> anyhow::Result<CreatedTenant> {
    gw.create_tenant(
        json!({"integrationKey": "k", "integrationAppToken": "upstream-secret",
                            "upstreamUrl": upstream_url}),
    )
    .await
}

/// A gateway with one tenant on a fresh [`TestUpstream`], and an rmcp client session of
/// that tenant, with what wakes on its `list_changed`.
async fn session_on_a_new_tenant() -> anyhow::Result<(
    TestUpstream,
    TestGateway,
    CreatedTenant,
    common::mcp_client::McpClient,
    std::sync::Arc<tokio::sync::Notify>,
)> {
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let tenant = tenant_on(&gw, &upstream.url).await?;
    let (client, changed) = connect(&mcp_url(&gw, &tenant.id), &tenant.api_key).await?;
    Ok((upstream, gw, tenant, client, changed))
}

fn mcp_url(gw: &TestGateway, tenant: &str) -> String {
    gw.url(&format!("/mcp/{tenant}"))
}

/// A raw POST of `body` to `tenant`'s MCP endpoint with exactly `headers`.
async fn post_mcp(
    gw: &TestGateway,
    tenant: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> anyhow::Result<Raw> {
    raw(
        &gw.http,
        Method::POST,
        &mcp_url(gw, tenant),
        headers,
        Some(body),
    )
    .await
}

fn echo(text: &str) -> CallToolRequestParams {
    let args = json!({ "text": text });
    CallToolRequestParams::new("echo").with_arguments(args.as_object().cloned().unwrap_or_default())
}

async fn tool_names(client: &common::mcp_client::McpClient) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = client
        .peer()
        .list_all_tools()
        .await?
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    names.sort();
    Ok(names)
}

#[tokio::test]
async fn rmcp_client_lists_and_calls_tools_through_the_gateway() -> anyhow::Result<()> {
    let upstream = TestUpstream::with_tools(&["extra"]).await?;
    let gw = TestGateway::start().await?;
    let tenant = tenant_on(&gw, &upstream.url).await?;
    for credential in [&tenant.api_key, &tenant.token] {
        let (client, _) = connect(&mcp_url(&gw, &tenant.id), credential).await?;
        let info = client.peer_info().expect("server info");
        assert_eq!(
            info.server_info.as_ref().map(|s| s.name.as_str()),
            Some("switchboard")
        );
        assert!(info
            .capabilities
            .tools
            .as_ref()
            .is_some_and(|t| t.list_changed == Some(true)));
        assert_eq!(
            tool_names(&client).await?,
            ["add", "echo", "extra", "fail", "progress", "sleep", "whoami"]
        );
        let result = client.peer().call_tool(echo("hi there")).await?;
        assert_eq!(result.is_error, Some(false));
        assert_eq!(result.structured_content, Some(json!({"echo": "hi there"})));
        let text = serde_json::to_value(&result.content)?;
        assert_eq!(text[0]["text"], "hi there");
        let failed = client
            .peer()
            .call_tool(CallToolRequestParams::new("fail"))
            .await?;
        assert_eq!(failed.is_error, Some(true), "a tool error stays a result");
        let unknown = client
            .peer()
            .call_tool(CallToolRequestParams::new("nope"))
            .await;
        let err = format!(
            "{:?}",
            unknown.expect_err("unknown tool is a JSON-RPC error")
        );
        assert!(
            err.contains("Unknown tool") && err.contains("-32602"),
            "{err}"
        );
        client.cancel().await?;
    }
    // A cursor the gateway never handed out: refused, and audited so.
    let mcp = RawMcp::new(&gw.http, &mcp_url(&gw, &tenant.id), &tenant.api_key);
    let got = mcp
        .session_less(9, "tools/list", json!({"cursor": "999"}))
        .await?;
    assert_eq!(got.answer()["error"]["code"], -32602, "{}", got.text);
    // Both kinds of request are in the tenant's audit trail, as REST ones are, read by a
    // gateway started again on the same store (the drain flushed the actor's buffer).
    let gw = gw.restart().await?;
    let (status, _, audit) = gw
        .send_as_admin(
            Method::GET,
            &format!("/api/tenants/{}/audit", tenant.id),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{audit}");
    let items = audit["items"].as_array().cloned().unwrap_or_default();
    let of = |action: &str| {
        items
            .iter()
            .filter(|i| i["action"] == action)
            .map(|i| {
                (
                    i["tool"].as_str().unwrap_or("").to_owned(),
                    i["outcome"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect::<Vec<_>>()
    };
    let lists = of("tools.list");
    let listed = |outcome: &str| lists.iter().filter(|(_, o)| o == outcome).count();
    assert_eq!(listed("ok"), 2, "a tools/list per session: {audit}");
    assert_eq!(listed("refused"), 1, "the bad cursor: {audit}");
    assert_eq!(listed("ok") + 1, lists.len(), "{audit}");
    assert!(
        items
            .iter()
            .filter(|i| i["action"] == "tools.list" && i["outcome"] == "ok")
            .all(|i| i["responseBytes"].as_i64().is_some_and(|n| n > 0)),
        "a list's size is on record: {audit}"
    );
    let mut calls = of("tool.call");
    calls.sort();
    let call = |tool: &str, outcome: &str| (tool.to_owned(), outcome.to_owned());
    assert_eq!(
        calls,
        [
            call("echo", "ok"),
            call("echo", "ok"),
            call("fail", "tool_error"),
            call("fail", "tool_error"),
            call("nope", "refused"),
            call("nope", "refused"),
        ],
        "{audit}"
    );
    gw.stop().await
}

/// A case of a refused credential: name, headers, status, error code.
type Refusal<'a> = (&'a str, Vec<(&'a str, &'a str)>, StatusCode, &'a str);

#[tokio::test]
async fn a_drain_lets_the_calls_of_open_sessions_answer() -> anyhow::Result<()> {
    // In a session the answer to a call streams after rmcp's handler returns: the drain
    // must wait for it to be sent, not only for the call, before it ends the sessions.
    let (upstream, gw, _, client, _) = session_on_a_new_tenant().await?;
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let peer = client.peer().clone();
            let args = json!({"ms": 300});
            let params = CallToolRequestParams::new("sleep")
                .with_arguments(args.as_object().cloned().unwrap_or_default());
            tokio::spawn(async move { peer.call_tool(params).await })
        })
        .collect();
    upstream.wait_for_calls(5).await?;
    gw.stop().await?;
    for call in calls {
        let answered = tokio::time::timeout(Duration::from_secs(10), call).await;
        let result = answered
            .context("a call in flight was never answered")??
            .context("a call in flight lost its answer")?;
        assert_eq!(result.is_error, Some(false), "{result:?}");
    }
    Ok(())
}

#[tokio::test]
async fn the_drain_waits_for_a_streamed_call_whose_client_connection_broke() -> anyhow::Result<()> {
    // The call runs on for its client to resume: it is in flight for the drain until it
    // ends, not only until its answer's connection goes.
    let call = tool_call(2, json!({"name": "sleep", "arguments": {"ms": 1_500}}));
    stop_after_the_stream_breaks(call).await
}

#[tokio::test]
async fn the_drain_waits_for_a_call_rmcp_serves_whose_client_connection_broke() -> anyhow::Result<()>
{
    // A call the gateway leaves to rmcp (here: `_meta` beyond a progress token), whose
    // client's connection breaks after its stream began: rmcp runs it on, and the drain
    // waits for it as for the gateway's own.
    let mut call = tool_call(2, json!({"name": "sleep", "arguments": {"ms": 1_500}}));
    call["params"]["_meta"] = json!({"progressToken": "p2", "note": "rmcp's"});
    stop_after_the_stream_breaks(call).await
}

/// Sends `call` (a 1.5 s sleep) in a session, breaks its answer's stream after its first
/// event, and stops the gateway: the drain must wait for the call, not cut it.
async fn stop_after_the_stream_breaks(call: Value) -> anyhow::Result<()> {
    let (upstream, gw, _t, mcp, id) = raw_session_on(Config::for_tests()).await?;
    let sent = Instant::now();
    let mut streaming = mcp.in_session_unread(&id, &call).await?;
    assert!(
        streaming
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream")),
        "{:?}",
        streaming.headers()
    );
    first_event_ids(&mut streaming, 1).await?;
    upstream.wait_for_calls(1).await?;
    drop(streaming);
    gw.stop().await?;
    // Not cut at the start of the drain: it waited for the call.
    assert!(
        sent.elapsed() >= Duration::from_millis(1_400),
        "the drain did not wait: {:?}",
        sent.elapsed()
    );
    assert_eq!(upstream.calls(), 1);
    assert_eq!(upstream.cancellations(), 0, "the drain cut the call");
    Ok(())
}

#[tokio::test]
async fn a_call_whose_client_goes_away_before_its_answer_runs_to_its_end() -> anyhow::Result<()> {
    // Within its first second a call is answered in its request (JSON, or an event stream
    // later): the request goes with the connection, the call does not (MCP: a
    // disconnection is not a cancel). It is audited with its own outcome, and the drain
    // waits for it.
    let (upstream, gw, t, mcp, id) = raw_session_on(Config::for_tests()).await?;
    let call = tool_call(2, json!({"name": "sleep", "arguments": {"ms": 600}}));
    let calling = tokio::spawn(async move { mcp.in_session(&id, &call).await });
    upstream.wait_for_calls(1).await?;
    calling.abort();
    let _ = calling.await;
    let gw = gw.restart().await?;
    assert_eq!(
        upstream.cancellations(),
        0,
        "the call was cancelled upstream"
    );
    let items = gw.audit_items(&t.id, Some("tool.call")).await?;
    let outcomes: Vec<_> = items
        .iter()
        .map(|item| (item["tool"].clone(), item["outcome"].clone()))
        .collect();
    assert_eq!(outcomes, [(json!("sleep"), json!("ok"))], "{items:?}");
    gw.stop().await
}

#[tokio::test]
async fn a_session_less_call_cut_off_by_the_drain_is_told_draining() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.drain_timeout = Duration::from_millis(300);
    let gw = TestGateway::start_with(config).await?;
    let tenant = tenant_on(&gw, &upstream.url).await?;
    let mcp = RawMcp::new(&gw.http, &mcp_url(&gw, &tenant.id), &tenant.api_key);
    let params = json!({"name": "sleep", "arguments": {"ms": 5000}});
    let call = tokio::spawn(async move { mcp.session_less(1, "tools/call", params).await });
    upstream.wait_for_calls(1).await?;
    gw.stop().await?;
    let got = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .context("the call was never answered")???;
    // Not a 500 internal_error: the service is going away, and says so (API.md's 503).
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{}", got.text);
    let body: Value = serde_json::from_str(&got.text)?;
    assert_eq!(body["error"]["code"], "draining", "{body}");
    Ok(())
}

#[tokio::test]
async fn requests_rmcp_refuses_get_the_contract_error_form() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let t = tenant_on(&gw, &upstream.url).await?;
    let (url, key) = (mcp_url(&gw, &t.id), format!("Bearer {}", t.api_key));
    let both = "application/json, text/event-stream";
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let cases = [
        (
            "application/json",
            both,
            "{not json",
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "text/plain",
            both,
            ping,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "application/json",
            "text/html",
            ping,
            StatusCode::NOT_ACCEPTABLE,
            "not_acceptable",
        ),
    ];
    for (content_type, accept, body, status, code) in cases {
        let resp = gw
            .http
            .post(&url)
            .header("authorization", &key)
            .header("content-type", content_type)
            .header("accept", accept)
            .header("x-request-id", "mcp-refused-1")
            .body(body)
            .send()
            .await?;
        assert_eq!(resp.status(), status, "{content_type}, {accept}, {body}");
        let got: Value = resp.json().await.context("a JSON error body")?;
        assert_eq!(got["error"]["code"], code, "{got}");
        assert_eq!(got["error"]["requestId"], "mcp-refused-1", "{got}");
        assert!(
            !got.to_string().contains("not json"),
            "no echo of the body: {got}"
        );
    }
    gw.stop().await
}

/// A gateway with two tenants on one fresh [`TestUpstream`].
async fn two_tenants() -> anyhow::Result<(TestUpstream, TestGateway, CreatedTenant, CreatedTenant)>
{
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let a = tenant_on(&gw, &upstream.url).await?;
    let b = tenant_on(&gw, &upstream.url).await?;
    Ok((upstream, gw, a, b))
}

#[tokio::test]
async fn bad_and_foreign_credentials_are_refused_before_any_session() -> anyhow::Result<()> {
    let (_upstream, gw, a, b) = two_tenants().await?;
    let init = initialize_request("raw");
    let wrong = format!("Bearer {}x", a.api_key);
    let a_key = format!("Bearer {}", a.api_key);
    let a_jwt = format!("Bearer {}", a.token);
    let cases: [Refusal; 5] = [
        ("none", vec![], StatusCode::UNAUTHORIZED, "unauthorized"),
        (
            "wrong key",
            vec![("authorization", &wrong)],
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "garbage",
            vec![("authorization", "Bearer not-a-token")],
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            "A's key on B",
            vec![("authorization", &a_key)],
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            "A's JWT on B",
            vec![("authorization", &a_jwt)],
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
    ];
    let request_ids: Vec<String> = (0..cases.len()).map(|n| format!("refused-{n}")).collect();
    for ((name, headers, status, code), request_id) in cases.into_iter().zip(&request_ids) {
        let mut headers = headers;
        headers.push(("content-type", "application/json"));
        headers.push(("x-request-id", request_id));
        let got = post_mcp(&gw, &b.id, &headers, &init).await?;
        assert_eq!(got.status, status, "{name}: {}", got.text);
        assert!(
            got.headers.get("mcp-session-id").is_none(),
            "{name}: no session"
        );
        let body: Value = serde_json::from_str(&got.text)?;
        assert_eq!(body["error"]["code"], code, "{name}");
        assert!(
            !got.text.contains(&a.api_key),
            "{name}: no secret in the body"
        );
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(got.headers["www-authenticate"], "Bearer", "{name}");
        }
    }
    // rmcp's client is refused too, and never gets a session.
    let refused = connect(&mcp_url(&gw, &b.id), &a.api_key).await;
    assert!(refused.is_err(), "A's key cannot open a session on B");
    // Every refusal is in B's audit trail, where B can see the attempts on it.
    gw.wait_for_audit(&b.id, "auth.refused", 5).await?;
    let (_, _, audit) = gw
        .send(
            Method::GET,
            &format!("/api/tenant/{}/audit?action=auth.refused", b.id),
            &[("x-api-key", &b.api_key)],
            None,
        )
        .await?;
    let refusals = audit["items"].as_array().map(Vec::len).unwrap_or(0);
    assert!(refusals >= 5, "refusals audited: {audit}");
    // Each of the five, by its request id (rmcp's client's are on top).
    for request_id in &request_ids {
        assert!(
            audit["items"]
                .as_array()
                .is_some_and(|items| items.iter().any(|i| i["requestId"] == *request_id)),
            "{request_id} not audited: {audit}"
        );
    }
    gw.stop().await
}

#[tokio::test]
async fn an_api_key_in_both_headers_works_and_two_keys_must_name_the_tenant() -> anyhow::Result<()>
{
    // API.md: when both headers are sent, both must be valid and name the same tenant. A
    // client configured with its key as the bearer and as `x-api-key` is let in.
    let (_upstream, gw, a, b) = two_tenants().await?;
    let init = initialize_request("raw");
    let a_bearer = format!("Bearer {}", a.api_key);
    let b_bearer = format!("Bearer {}", b.api_key);
    let wrong_bearer = format!("Bearer {}x", a.api_key);
    let cases = [
        ("the same key twice", &a_bearer, StatusCode::OK),
        (
            "another tenant's key as the bearer",
            &b_bearer,
            StatusCode::FORBIDDEN,
        ),
        (
            "a wrong key as the bearer",
            &wrong_bearer,
            StatusCode::UNAUTHORIZED,
        ),
    ];
    for (name, bearer, status) in cases {
        let headers = [
            ("authorization", bearer.as_str()),
            ("x-api-key", a.api_key.as_str()),
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
        ];
        let got = post_mcp(&gw, &a.id, &headers, &init).await?;
        assert_eq!(got.status, status, "{name}: {}", got.text);
        assert_eq!(
            got.headers.get("mcp-session-id").is_some(),
            status == StatusCode::OK,
            "{name}: a session only when let in"
        );
    }
    gw.stop().await
}

#[tokio::test]
async fn tenants_never_see_each_others_tools() -> anyhow::Result<()> {
    let up_a = TestUpstream::with_tools(&["only_a"]).await?;
    let up_b = TestUpstream::with_tools(&["only_b"]).await?;
    let gw = TestGateway::start().await?;
    let a = tenant_on(&gw, &up_a.url).await?;
    let b = tenant_on(&gw, &up_b.url).await?;
    let (client_a, _) = connect(&mcp_url(&gw, &a.id), &a.api_key).await?;
    let (client_b, _) = connect(&mcp_url(&gw, &b.id), &b.token).await?;
    assert_eq!(
        tool_names(&client_a).await?,
        ["add", "echo", "fail", "only_a", "progress", "sleep", "whoami"]
    );
    assert_eq!(
        tool_names(&client_b).await?,
        ["add", "echo", "fail", "only_b", "progress", "sleep", "whoami"]
    );
    let own = client_a
        .peer()
        .call_tool(CallToolRequestParams::new("only_a"))
        .await?;
    assert_eq!(serde_json::to_value(&own.content)?[0]["text"], "only_a");
    let other = client_a
        .peer()
        .call_tool(CallToolRequestParams::new("only_b"))
        .await;
    let err = format!("{:?}", other.expect_err("B's tool is unknown to A"));
    assert!(err.contains("Unknown tool"), "{err}");
    client_a.cancel().await?;
    client_b.cancel().await?;
    gw.stop().await
}

/// A session's tenant actor stops while the session is quiet (the tenant idled out); a
/// REST call starts another, whose upstream then announces a change: the session hears it
/// without having sent anything since.
#[tokio::test]
async fn a_quiet_session_hears_list_changes_after_its_tenant_idled_out() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.tenant_idle = Duration::from_secs(1);
    let gw = TestGateway::start_with(config).await?;
    let tenant = tenant_on(&gw, &upstream.url).await?;
    let (client, changed) = connect(&mcp_url(&gw, &tenant.id), &tenant.api_key).await?;
    tool_names(&client).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.tenants.active_count() > 0 {
        anyhow::ensure!(Instant::now() < deadline, "the idle actor did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let echo = json!({"method": "echo", "params": {"text": "x"}});
    let (status, _, body) = gw.tool(&tenant, echo).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        upstream.change_tools_until_heard(&changed).await,
        "no notifications/tools/list_changed reached the session"
    );
    client.cancel().await?;
    gw.stop().await
}

/// An admin points the tenant at another upstream, with other tools: a session open on the
/// tenant hears of the new list once the gateway has loaded it (by the tenant's next actor,
/// not the one that loaded the list before).
#[tokio::test]
async fn a_session_hears_of_the_tools_of_its_tenants_new_upstream() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let other = TestUpstream::with_tools(&["extra"]).await?;
    let gw = TestGateway::start().await?;
    let tenant = tenant_on(&gw, &upstream.url).await?;
    let (client, changed) = connect(&mcp_url(&gw, &tenant.id), &tenant.api_key).await?;
    assert!(!tool_names(&client).await?.contains(&"extra".to_owned()));
    let (status, _, body) = gw
        .send_as_admin(
            Method::PATCH,
            &format!("/api/tenants/{}", tenant.id),
            Some(json!({"upstreamUrl": other.url})),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, listed) = gw.tool(&tenant, json!({"method": "listTools"})).await?;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert!(listed.to_string().contains("\"extra\""), "{listed}");
    tokio::time::timeout(Duration::from_secs(5), changed.notified())
        .await
        .context("the session was not told of the new upstream's tools")?;
    assert!(tool_names(&client).await?.contains(&"extra".to_owned()));
    client.cancel().await?;
    gw.stop().await
}

#[tokio::test]
async fn a_tool_name_past_its_bound_is_an_invalid_params_error() -> anyhow::Result<()> {
    let (upstream, gw, _, client, _) = session_on_a_new_tenant().await?;
    let refused = client
        .peer()
        .call_tool(CallToolRequestParams::new("x".repeat(513)))
        .await
        .expect_err("a 513-byte tool name");
    let said = format!("{refused:?}");
    assert!(said.contains("longer than 512 bytes"), "{said}");
    assert_eq!(upstream.calls(), 0);
    client.cancel().await?;
    gw.stop().await
}

#[tokio::test]
async fn upstream_list_changed_reaches_an_open_session() -> anyhow::Result<()> {
    let (upstream, gw, _, client, changed) = session_on_a_new_tenant().await?;
    assert_eq!(
        tool_names(&client).await?,
        ["add", "echo", "fail", "progress", "sleep", "whoami"]
    );
    assert!(
        upstream.change_tools_until_heard(&changed).await,
        "no notifications/tools/list_changed reached the session"
    );
    let names = tool_names(&client).await?;
    assert!(names.iter().any(|n| n.starts_with("new_")), "{names:?}");
    client.cancel().await?;
    gw.stop().await
}

/// A session-less call or tool list that `REQUEST_TIMEOUT_MS` cuts off is answered 504
/// `upstream_timeout`, and audited as a timeout, as a REST one is: not as an upstream
/// error, nor as served.
#[tokio::test]
async fn session_less_requests_cut_off_by_the_timeout_are_audited_as_timeouts() -> anyhow::Result<()>
{
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.request_timeout = Duration::from_millis(400);
    config.upstream_timeout = Duration::from_secs(10);
    let gw = TestGateway::start_with(config).await?;
    let t = tenant_on(&gw, &upstream.url).await?;
    upstream.set_hang(true);
    upstream.set_stalling(&["tools/list"]);
    let mcp = raw_mcp(&gw, &t);
    let echo = json!({"name": "echo", "arguments": {"text": "x"}});
    for (method, params) in [("tools/call", echo), ("tools/list", json!({}))] {
        let got = mcp.session_less(1, method, params).await?;
        assert_eq!(
            got.status,
            StatusCode::GATEWAY_TIMEOUT,
            "{method}: {}",
            got.text
        );
        assert!(
            got.text.contains("upstream_timeout"),
            "{method}: {}",
            got.text
        );
    }
    upstream.set_hang(false);
    upstream.set_stalling(&[]);
    // Read once the drain has flushed every event.
    let gw = gw.restart().await?;
    for action in ["tool.call", "tools.list"] {
        let path = format!("/api/tenants/{}/audit?action={action}", t.id);
        let (status, _, audit) = gw.send_as_admin(Method::GET, &path, None).await?;
        assert_eq!(status, StatusCode::OK, "{audit}");
        let outcomes: Vec<&Value> = audit["items"]
            .as_array()
            .map(|items| items.iter().map(|item| &item["outcome"]).collect())
            .unwrap_or_default();
        assert_eq!(outcomes, [&json!("timeout")], "{action}: {audit}");
    }
    gw.stop().await
}

/// A call in a session is not cut off by `REQUEST_TIMEOUT_MS` (its event stream's headers
/// go out at once): one its client cancels after that long is audited as cancelled
/// (`upstream_error`), not as a timeout.
#[tokio::test]
async fn a_session_call_cancelled_past_the_request_timeout_is_no_timeout() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.request_timeout = Duration::from_millis(400);
    config.upstream_timeout = Duration::from_secs(10);
    let gw = TestGateway::start_with(config).await?;
    let t = tenant_on(&gw, &upstream.url).await?;
    let mcp = raw_mcp(&gw, &t);
    let id = mcp.open_session().await?.expect("a session");
    // Served by the gate (a plain call), and by rmcp (`_meta` the gate leaves to it).
    let plain = json!({"name": "sleep", "arguments": {"ms": 20_000}});
    let for_rmcp = json!({"name": "sleep", "arguments": {"ms": 20_000}, "_meta": {"note": 1}});
    for (n, params) in [(1, plain), (2, for_rmcp)] {
        let slow = {
            let (mcp, id, call) = (raw_mcp(&gw, &t), id.clone(), tool_call(n, params));
            tokio::spawn(async move { mcp.in_session(&id, &call).await })
        };
        upstream.wait_for_calls(n as usize).await?;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                            "params": {"requestId": n}});
        let got = mcp.in_session(&id, &cancel).await?;
        assert_eq!(got.status, StatusCode::ACCEPTED, "{}", got.text);
        upstream.wait_for_cancellations(n as usize).await?;
        let got = tokio::time::timeout(Duration::from_secs(5), slow).await???;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    }
    let gw = gw.restart().await?;
    let path = format!("/api/tenants/{}/audit?action=tool.call", t.id);
    let (status, _, audit) = gw.send_as_admin(Method::GET, &path, None).await?;
    assert_eq!(status, StatusCode::OK, "{audit}");
    let outcomes: Vec<&Value> = audit["items"]
        .as_array()
        .map(|items| items.iter().map(|item| &item["outcome"]).collect())
        .unwrap_or_default();
    let cancelled = json!("upstream_error");
    assert_eq!(outcomes, [&cancelled, &cancelled], "{audit}");
    gw.stop().await
}

/// A tenant on `upstream_url` whose rate limit is 1 request a second after a burst of
/// `burst`.
async fn tenant_with_burst(
    gw: &TestGateway,
    upstream_url: &str,
    burst: u32,
) -> anyhow::Result<CreatedTenant> {
    gw.create_tenant(
        json!({"integrationKey": "k", "integrationAppToken": "upstream-secret",
        "upstreamUrl": upstream_url, "rateLimit": {"requestsPerSecond": 1, "burst": burst}}),
    )
    .await
}

/// `n` REST calls of tenant `t`'s `echo`, each of which must be served.
async fn calls_all_served(gw: &TestGateway, t: &CreatedTenant, n: usize) -> anyhow::Result<()> {
    let echo = json!({"method": "echo", "params": {"text": "x"}});
    for n in 0..n {
        let (status, _, body) = gw.tool(t, echo.clone()).await?;
        anyhow::ensure!(status == StatusCode::OK, "call {n}: {status} {body}");
    }
    Ok(())
}

/// An upstream, and a gateway whose tenants may each have `cap` MCP sessions open.
async fn gateway_with_session_cap(cap: usize) -> anyhow::Result<(TestUpstream, TestGateway)> {
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.mcp_max_sessions_per_tenant = cap;
    Ok((upstream, TestGateway::start_with(config).await?))
}

/// Raw JSON-RPC to tenant `t`'s endpoint with its API key.
fn raw_mcp(gw: &TestGateway, t: &CreatedTenant) -> RawMcp {
    RawMcp::new(&gw.http, &mcp_url(gw, &t.id), &t.api_key)
}

/// A gateway with one tenant on a fresh [`TestUpstream`], and a raw MCP client of it.
async fn raw_tenant() -> anyhow::Result<(TestUpstream, TestGateway, RawMcp)> {
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let t = tenant_on(&gw, &upstream.url).await?;
    let mcp = raw_mcp(&gw, &t);
    Ok((upstream, gw, mcp))
}

#[tokio::test]
async fn raw_http_2025_11_25_sessions_and_2026_07_28_session_less() -> anyhow::Result<()> {
    let upstream = TestUpstream::with_tools(&["extra"]).await?;
    let gw = TestGateway::start().await?;
    let t = tenant_on(&gw, &upstream.url).await?;
    let other = tenant_on(&gw, &upstream.url).await?;
    let mcp = raw_mcp(&gw, &t);
    let id = mcp.open_session().await?.expect("session opens");
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let got = mcp.in_session(&id, &list).await?;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    assert_eq!(
        got.answer()["result"]["tools"].as_array().map(Vec::len),
        Some(7),
        "{}",
        got.text
    );
    let unknown = json!({"jsonrpc": "2.0", "id": 3, "method": "no/such/method"});
    let got = mcp.in_session(&id, &unknown).await?;
    assert_eq!(got.answer()["error"]["code"], -32601, "{}", got.text);
    let ping = json!({"jsonrpc": "2.0", "id": 4, "method": "ping"});
    let got = mcp.in_session(&id, &ping).await?;
    assert_eq!(got.answer()["result"], json!({}), "{}", got.text);
    // Another tenant, with its own valid key, cannot use this session.
    let got = raw_mcp(&gw, &other).in_session(&id, &list).await?;
    assert_eq!(got.status, StatusCode::NOT_FOUND, "{}", got.text);
    assert!(mcp.close_session(&id).await?.is_success());
    let got = mcp.in_session(&id, &list).await?;
    assert_eq!(
        got.status,
        StatusCode::NOT_FOUND,
        "a deleted session is gone"
    );

    // 2026-07-28: no initialize, no session; every request carries its own metadata.
    let got = mcp.session_less(1, "server/discover", json!({})).await?;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    assert!(got.headers.get("mcp-session-id").is_none());
    let versions = got.answer()["result"]["supportedVersions"].clone();
    assert!(
        versions
            .as_array()
            .is_some_and(|v| v.contains(&json!("2026-07-28")) && v.contains(&json!("2024-11-05"))),
        "{}",
        got.text
    );
    let got = mcp.session_less(2, "tools/list", json!({})).await?;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    assert_eq!(
        got.answer()["result"]["tools"].as_array().map(Vec::len),
        Some(7),
        "{}",
        got.text
    );
    let got = mcp.session_less(3, "no/such/method", json!({})).await?;
    assert_eq!(
        got.answer()["error"]["code"],
        -32601,
        "{} {}",
        got.status,
        got.text
    );
    gw.stop().await
}

#[tokio::test]
async fn session_caps_are_enforced_per_tenant_and_in_total() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.mcp_max_sessions = 3;
    config.mcp_max_sessions_per_tenant = 2;
    let gw = TestGateway::start_with(config).await?;
    let a = tenant_on(&gw, &upstream.url).await?;
    let b = tenant_on(&gw, &upstream.url).await?;
    let (mcp_a, mcp_b) = (raw_mcp(&gw, &a), raw_mcp(&gw, &b));
    let a1 = mcp_a.open_session().await?.expect("a1");
    let _a2 = mcp_a.open_session().await?.expect("a2");
    let refused = mcp_a
        .open_session()
        .await?
        .expect_err("a3 is over the tenant cap");
    assert_eq!(refused["error"]["code"], "rate_limited", "{refused}");
    assert!(refused["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("sessions")));
    let _b1 = mcp_b.open_session().await?.expect("b1");
    let refused = mcp_b
        .open_session()
        .await?
        .expect_err("b2 is over the total cap");
    assert_eq!(refused["error"]["code"], "unavailable", "{refused}");
    assert!(mcp_a.close_session(&a1).await?.is_success());
    mcp_b
        .open_session()
        .await?
        .expect("a closed session gives its slot back");
    gw.stop().await
}

/// A `subscriptions/listen` stream is as long-lived as a session: it takes a slot under
/// the same caps while open, and gives it back when the client leaves.
#[tokio::test]
async fn listen_streams_count_against_the_session_caps() -> anyhow::Result<()> {
    let (upstream, gw) = gateway_with_session_cap(2).await?;
    let t = tenant_on(&gw, &upstream.url).await?;
    let mcp = raw_mcp(&gw, &t);
    let filter = json!({"notifications": {"toolsListChanged": true}});
    let _session = mcp.open_session().await?.expect("a session within the cap");
    let mut listening = mcp
        .session_less_stream(1, "subscriptions/listen", filter.clone())
        .await?;
    assert_eq!(listening.status, StatusCode::OK);
    listening
        .next_message(Duration::from_secs(5))
        .await?
        .context("no acknowledgment")?;
    let refused = mcp
        .session_less_stream(2, "subscriptions/listen", filter.clone())
        .await?;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers.contains_key("retry-after"));
    let refused = mcp.open_session().await?.expect_err("over the tenant cap");
    assert_eq!(refused["error"]["code"], "rate_limited", "{refused}");
    // The client goes away: the stream's slot comes back.
    drop(listening);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if mcp.open_session().await?.is_ok() {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "a closed listen stream kept its slot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await
}

/// A listen stream that accepts nothing the gateway sends still ends when its tenant
/// changes (here its key is rotated): it must not hold a session slot for ever on a
/// credential that no longer works.
#[tokio::test]
async fn a_listen_stream_that_accepts_nothing_ends_when_its_tenant_changes() -> anyhow::Result<()> {
    let (upstream, gw) = gateway_with_session_cap(1).await?;
    let t = tenant_on(&gw, &upstream.url).await?;
    let mut listening = raw_mcp(&gw, &t)
        .session_less_stream(1, "subscriptions/listen", json!({"notifications": {}}))
        .await?;
    assert_eq!(listening.status, StatusCode::OK);
    listening
        .next_message(Duration::from_secs(5))
        .await?
        .context("no acknowledgment")?;
    let (status, _, rotated) = gw
        .send_as_admin(
            Method::POST,
            &format!("/api/tenants/{}/api-key", t.id),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_key = rotated["apiKey"].as_str().context("apiKey")?;
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while listening
            .next_message(Duration::from_secs(5))
            .await?
            .is_some()
        {}
        anyhow::Ok(())
    })
    .await;
    ended
        .context("the stream outlived its tenant's change")?
        .context("reading the stream")?;
    // Its slot is free for the tenant's own clients.
    RawMcp::new(&gw.http, &mcp_url(&gw, &t.id), new_key)
        .open_session()
        .await?
        .expect("a session once the stream ended");
    gw.stop().await
}

#[tokio::test]
async fn a_listen_stream_sent_with_a_session_id_still_counts_against_the_caps() -> anyhow::Result<()>
{
    // rmcp serves a 2026-07-28 listen whatever session id comes with it: with one, it must
    // not slip past the caps as if it were a request of that session.
    let (upstream, gw) = gateway_with_session_cap(2).await?;
    let t = tenant_on(&gw, &upstream.url).await?;
    let mcp = raw_mcp(&gw, &t);
    let filter = json!({"notifications": {"toolsListChanged": true}});
    let session = mcp.open_session().await?.expect("a session within the cap");
    let with_id = [("mcp-session-id", session.as_str())];
    let mut listening = mcp
        .session_less_stream_with(1, "subscriptions/listen", filter.clone(), &with_id)
        .await?;
    assert_eq!(listening.status, StatusCode::OK);
    listening
        .next_message(Duration::from_secs(5))
        .await?
        .context("no acknowledgment")?;
    let refused = mcp
        .session_less_stream_with(2, "subscriptions/listen", filter, &with_id)
        .await?;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    gw.stop().await
}

#[tokio::test]
async fn opening_a_session_spends_the_tenants_rate_limit_and_ending_one_does_not(
) -> anyhow::Result<()> {
    // An initialize does not reach the upstream, but it costs the gateway a session: a
    // tenant churning sessions is held to its rate, as its calls are. Its DELETE, which
    // clients send once, is never refused for it. The limit gives a request back every
    // second; an attempt that took longer than that proves nothing and is made again with
    // a fresh tenant.
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    for attempt in 1..=3 {
        let t = gw
            .create_tenant(
                json!({"integrationKey": "k", "integrationAppToken": "upstream-secret",
                "upstreamUrl": upstream.url, "rateLimit": {"requestsPerSecond": 1, "burst": 2}}),
            )
            .await?;
        let mcp = raw_mcp(&gw, &t);
        let started = Instant::now();
        let first = mcp.open_session().await?.expect("within the burst");
        let _second = mcp.open_session().await?.expect("within the burst");
        let refused = mcp.open_session().await?;
        let ended = mcp.close_session(&first).await?;
        if started.elapsed() >= Duration::from_millis(900) {
            eprintln!("attempt {attempt} took {:?}; again", started.elapsed());
            continue;
        }
        let refused = refused.expect_err("past the burst");
        assert_eq!(refused["error"]["code"], "rate_limited", "{refused}");
        assert!(ended.is_success(), "a DELETE past the limit: {ended}");
        return gw.stop().await;
    }
    anyhow::bail!("three attempts each took longer than the limit's second")
}

#[tokio::test]
async fn an_initialize_refused_at_the_session_cap_spends_none_of_the_rate_limit(
) -> anyhow::Result<()> {
    // A client retrying `initialize` at its tenant's session cap opens nothing: those
    // refusals must not use up the rate limit that the tenant's calls need.
    let (upstream, gw) = gateway_with_session_cap(1).await?;
    let t = tenant_with_burst(&gw, &upstream.url, 3).await?;
    let mcp = raw_mcp(&gw, &t);
    let _open = mcp
        .open_session()
        .await?
        .expect("within the cap and the burst");
    for _ in 0..3 {
        let refused = mcp.open_session().await?.expect_err("past the cap");
        assert_eq!(refused["error"]["code"], "rate_limited", "{refused}");
    }
    // The two requests of the burst the session left.
    calls_all_served(&gw, &t, 2).await?;
    gw.stop().await
}

#[tokio::test]
async fn an_initialize_refused_for_its_headers_spends_none_of_the_rate_limit() -> anyhow::Result<()>
{
    // rmcp refuses an `initialize` whose client does not take event streams (406) or does
    // not send JSON (415): it opens nothing, and must not use up the tenant's calls' limit.
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let t = tenant_with_burst(&gw, &upstream.url, 3).await?;
    let initialize = serde_json::to_vec(&initialize_request("misconfigured"))?;
    for (accept, content_type, refused) in [
        (
            "application/json",
            "application/json",
            StatusCode::NOT_ACCEPTABLE,
        ),
        (
            "application/json",
            "application/json",
            StatusCode::NOT_ACCEPTABLE,
        ),
        (
            "application/json, text/event-stream",
            "text/plain",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            "application/json, text/event-stream",
            "text/plain",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
    ] {
        let got = gw
            .http
            .post(mcp_url(&gw, &t.id))
            .header("authorization", format!("Bearer {}", t.api_key))
            .header("accept", accept)
            .header("content-type", content_type)
            .body(initialize.clone())
            .send()
            .await?;
        assert_eq!(got.status(), refused, "{accept} / {content_type}");
    }
    // An `Accept` the gate does not read itself is rmcp's to judge: this one opens.
    let got = gw
        .http
        .post(mcp_url(&gw, &t.id))
        .header("authorization", format!("Bearer {}", t.api_key))
        .header(
            "accept",
            "application/json, text/event-stream; charset=\"utf-8\"",
        )
        .header("content-type", "application/json")
        .body(initialize.clone())
        .send()
        .await?;
    assert_eq!(got.status(), StatusCode::OK);
    assert!(got.headers().contains_key("mcp-session-id"));
    // The rest of the burst is left for the tenant's calls.
    calls_all_served(&gw, &t, 2).await?;
    gw.stop().await
}

#[tokio::test]
async fn sessions_end_when_their_credentials_stop_working() -> anyhow::Result<()> {
    // A rotated key or a disabled tenant stops working at once: the sessions opened under
    // it end (their streams too) and give their slots back, rather than hold them until
    // their idle timeout. A change that leaves the credential as it was (a rename) ends
    // none.
    let (upstream, gw) = gateway_with_session_cap(1).await?;
    let t = gw
        .create_tenant(
            json!({"integrationKey": "k", "integrationAppToken": "upstream-secret",
            "upstreamUrl": upstream.url}),
        )
        .await?;
    let path = format!("/api/tenants/{}", t.id);
    let mcp = raw_mcp(&gw, &t);
    let session = mcp.open_session().await?.expect("a session");
    let stream = session_closing(&mcp, &session).await?;
    let renamed = gw
        .send_as_admin(Method::PATCH, &path, Some(json!({"name": "renamed"})))
        .await?;
    assert_eq!(renamed.0, StatusCode::OK, "{}", renamed.2);
    // Heard by then: a session the rename ended would have its stream closed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!stream.is_finished(), "a rename ended the session");
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let got = mcp.in_session(&session, &list).await?;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);

    let (status, _, rotated) = gw
        .send_as_admin(Method::POST, &format!("{path}/api-key"), None)
        .await?;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    tokio::time::timeout(Duration::from_secs(5), stream)
        .await
        .context("the session under the rotated key did not end")??;
    let t = CreatedTenant {
        api_key: rotated["apiKey"].as_str().context("a new key")?.to_owned(),
        ..t
    };
    // Its slot is back: a session under the new key opens at once.
    let mcp = raw_mcp(&gw, &t);
    let session = mcp.open_session().await?.expect("the slot given back");
    let stream = session_closing(&mcp, &session).await?;
    let disabled = gw
        .send_as_admin(Method::PATCH, &path, Some(json!({"enabled": false})))
        .await?;
    assert_eq!(disabled.0, StatusCode::OK, "{}", disabled.2);
    tokio::time::timeout(Duration::from_secs(5), stream)
        .await
        .context("the disabled tenant's session did not end")??;
    let enabled = gw
        .send_as_admin(Method::PATCH, &path, Some(json!({"enabled": true})))
        .await?;
    assert_eq!(enabled.0, StatusCode::OK, "{}", enabled.2);
    mcp.open_session().await?.expect("the slot given back");
    gw.stop().await
}

/// A session whose `initialize` passed the gate's credential check just before its
/// tenant's key was rotated ends with the key all the same, though the rotation's check of
/// the tenant's sessions ran before the session was bound. Here the client holds back the
/// `initialize` body (the gate reads it after the credentials) until the rotation has been
/// told. With one session allowed, a session left open shows as the slot the new key
/// cannot have.
#[tokio::test]
async fn a_session_opened_across_a_key_rotation_ends_with_the_key() -> anyhow::Result<()> {
    let (upstream, gw) = gateway_with_session_cap(1).await?;
    let t = tenant_on(&gw, &upstream.url).await?;
    let (send_body, body) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let body =
        futures::stream::once(
            async move { body.await.map_err(|_| std::io::Error::other("no body")) },
        );
    let opening = gw
        .http
        .post(mcp_url(&gw, &t.id))
        .header("authorization", format!("Bearer {}", t.api_key))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(reqwest::Body::wrap_stream(body))
        .send();
    let opening = tokio::spawn(opening);
    // The headers are through the gate by then.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _, rotated) = gw
        .send_as_admin(
            Method::POST,
            &format!("/api/tenants/{}/api-key", t.id),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    // And the rotation heard, the tenant's sessions (none yet) checked.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let initialize = serde_json::to_vec(&initialize_request("held back"))?;
    send_body
        .send(initialize)
        .map_err(|_| anyhow::anyhow!("the request went"))?;
    let opened = opening.await??;
    assert_eq!(
        opened.status(),
        StatusCode::OK,
        "opened under the key it was sent with"
    );
    assert!(opened.headers().contains_key("mcp-session-id"));
    let t = CreatedTenant {
        api_key: rotated["apiKey"].as_str().context("a new key")?.to_owned(),
        ..t
    };
    let mcp = raw_mcp(&gw, &t);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match mcp.open_session().await? {
            Ok(_) => break,
            Err(refused) if Instant::now() < deadline => {
                assert_eq!(refused["error"]["code"], "rate_limited", "{refused}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(refused) => panic!(
                "the session opened under the rotated key outlived it, in the only slot: {refused}"
            ),
        }
    }
    gw.stop().await
}

/// Reads the `GET` stream of `session` to its end, in a task that ends with it.
async fn session_closing(
    mcp: &RawMcp,
    session: &str,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let stream = mcp.session_stream(session).await?;
    anyhow::ensure!(stream.status() == StatusCode::OK, "{}", stream.status());
    let mut body = stream.bytes_stream();
    Ok(tokio::spawn(async move {
        while let Some(Ok(_)) = futures::StreamExt::next(&mut body).await {}
    }))
}

#[tokio::test]
async fn a_listen_with_another_tenants_session_id_finds_no_session() -> anyhow::Result<()> {
    // Without 2026-07-28 `_meta`, rmcp takes a listen into the session its id names.
    let (_upstream, gw, a, b) = two_tenants().await?;
    let a_session = raw_mcp(&gw, &a).open_session().await?.expect("A's session");
    let b_key = format!("Bearer {}", b.api_key);
    let headers = [
        ("authorization", b_key.as_str()),
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("mcp-session-id", a_session.as_str()),
        ("mcp-protocol-version", "2025-11-25"),
    ];
    let listen = json!({"jsonrpc": "2.0", "id": 7, "method": "subscriptions/listen",
                        "params": {"notifications": {"toolsListChanged": true}}});
    let got = post_mcp(&gw, &b.id, &headers, &listen).await?;
    assert_eq!(got.status, StatusCode::NOT_FOUND, "{}", got.text);
    gw.stop().await
}

#[tokio::test]
async fn a_delete_the_mcp_server_refuses_leaves_the_session_open() -> anyhow::Result<()> {
    let (_upstream, gw, mcp) = raw_tenant().await?;
    let id = mcp.open_session().await?.expect("session opens");
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    for (version, status) in [
        ("1999-01-01", StatusCode::BAD_REQUEST),
        ("2026-07-28", StatusCode::METHOD_NOT_ALLOWED),
    ] {
        let got = mcp.delete_with_version(&id, version).await?;
        assert_eq!(got.status, status, "{version}: {}", got.text);
        let got = mcp.in_session(&id, &list).await?;
        assert_eq!(got.status, StatusCode::OK, "{version}: {}", got.text);
    }
    assert!(mcp.close_session(&id).await?.is_success());
    gw.stop().await
}

/// `tools/call` params for the upstream's `progress` tool (three steps, progress 1, 2, 3 of
/// 3), asking for progress with `token` when there is one.
fn progress_params(token: Option<Value>) -> Value {
    let mut params = json!({"name": "progress", "arguments": {"steps": 3}});
    if let Some(token) = token {
        params["_meta"] = json!({ "progressToken": token });
    }
    params
}

/// `got` relayed the upstream's three progress notifications, with the client's `token`
/// and the upstream's progress, total and message, before the tool's result.
fn assert_relayed(got: &Raw, token: &Value) {
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    assert!(
        is_event_stream(got),
        "progress needs a stream: {:?}",
        got.headers
    );
    let progress = got.progress();
    let values: Vec<Option<f64>> = progress.iter().map(|p| p["progress"].as_f64()).collect();
    assert_eq!(values, [Some(1.0), Some(2.0), Some(3.0)], "{}", got.text);
    for p in &progress {
        assert_eq!(&p["progressToken"], token, "{}", got.text);
        assert_eq!(p["total"].as_f64(), Some(3.0), "{}", got.text);
    }
    assert_eq!(progress[2]["message"], "step 3 of 3", "{}", got.text);
    let last_progress = got
        .messages
        .iter()
        .rposition(|m| m["method"] == "notifications/progress");
    assert!(
        last_progress < got.answer_position(),
        "progress after the result: {}",
        got.text
    );
    let answer = got.answer();
    assert_eq!(
        answer["result"]["content"][0]["text"], "done after 3 steps",
        "{}",
        got.text
    );
}

fn tool_call(id: u64, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params})
}

#[tokio::test]
async fn progress_reaches_a_2025_11_25_session_caller_before_the_result() -> anyhow::Result<()> {
    let (_upstream, gw, mcp) = raw_tenant().await?;
    let id = mcp.open_session().await?.expect("session opens");
    let call = tool_call(2, progress_params(Some(json!("p-1"))));
    let got = mcp.in_session(&id, &call).await?;
    assert_relayed(&got, &json!("p-1"));
    // A number is a progress token too, and comes back as one.
    let call = tool_call(3, progress_params(Some(json!(7))));
    assert_relayed(&mcp.in_session(&id, &call).await?, &json!(7));
    gw.stop().await
}

#[tokio::test]
async fn progress_reaches_a_2026_07_28_session_less_caller_before_the_result() -> anyhow::Result<()>
{
    let (_upstream, gw, mcp) = raw_tenant().await?;
    // The gateway answers session-less calls with JSON; a notification before the result
    // turns the answer into a stream.
    let got = mcp
        .session_less(1, "tools/call", progress_params(Some(json!("p-1"))))
        .await?;
    assert!(got.headers.get("mcp-session-id").is_none());
    assert_relayed(&got, &json!("p-1"));
    gw.stop().await
}

#[tokio::test]
async fn a_call_without_a_progress_token_hears_no_progress() -> anyhow::Result<()> {
    let (_upstream, gw, mcp) = raw_tenant().await?;
    // The upstream reports progress all the same (the gateway's own request asks for it).
    let id = mcp.open_session().await?.expect("session opens");
    let got = mcp
        .in_session(&id, &tool_call(2, progress_params(None)))
        .await?;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    assert!(got.progress().is_empty(), "{}", got.text);
    assert_eq!(
        got.answer()["result"]["content"][0]["text"],
        "done after 3 steps"
    );
    let got = mcp
        .session_less(3, "tools/call", progress_params(None))
        .await?;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    assert_eq!(
        got.headers["content-type"], "application/json",
        "nothing came before the result: {}",
        got.text
    );
    assert!(got.progress().is_empty(), "{}", got.text);
    assert_eq!(
        got.answer()["result"]["content"][0]["text"],
        "done after 3 steps"
    );
    gw.stop().await
}

#[tokio::test]
async fn a_flood_of_upstream_list_changes_reaches_listeners_a_few_times_not_each_time(
) -> anyhow::Result<()> {
    // Every tenant's changes share one feed that wakes every open session: an upstream
    // sending change after change is told to them at most every 100 ms, the last change
    // included. The flood lasts a few of those 100 ms, so that a last change folded away
    // would leave the last notification inside it.
    let (upstream, gw, mcp) = raw_tenant().await?;
    let got = mcp.session_less(1, "tools/list", json!({})).await?;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    let filter = json!({"notifications": {"toolsListChanged": true}});
    let mut stream = mcp
        .session_less_stream(2, "subscriptions/listen", filter)
        .await?;
    stream
        .next_message(Duration::from_secs(5))
        .await?
        .context("no acknowledgment")?;
    // Read as they come, while the flood goes on.
    let flood = Instant::now();
    let flooding = async {
        for _ in 0..200 {
            upstream.set_tools_changed().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        flood.elapsed()
    };
    let hearing = async {
        let mut heard_at = Vec::new();
        while let Ok(Some(message)) = stream.next_message(Duration::from_millis(1500)).await {
            assert_eq!(
                message["method"], "notifications/tools/list_changed",
                "{message}"
            );
            heard_at.push(flood.elapsed());
        }
        heard_at
    };
    let (flooded_for, heard_at) = tokio::join!(flooding, hearing);
    let (heard, last_heard) = (heard_at.len(), heard_at.last().copied());
    // One at once, then at most one per 100 ms of the flood, and one more after it.
    let most = 2 + flooded_for.as_millis() / 100;
    assert!(
        heard >= 1 && heard <= most as usize,
        "{heard} notifications for 200 changes in {flooded_for:?}"
    );
    // The upstream had sent its last change when the flood ended: only a notification
    // told after it can be that change's.
    assert!(
        last_heard.is_some_and(|at| at > flooded_for),
        "the last change was not told: the last of {heard} notifications came at {last_heard:?}, the flood ended at {flooded_for:?}"
    );
    gw.stop().await
}

#[tokio::test]
async fn a_session_less_listener_hears_tool_list_changes_and_ends_with_the_drain(
) -> anyhow::Result<()> {
    const WAIT: Duration = Duration::from_secs(5);
    let (upstream, gw, mcp) = raw_tenant().await?;
    let drain_timeout = gw.config.drain_timeout;
    // The tenant's upstream connection opens with its first use.
    let got = mcp.session_less(1, "tools/list", json!({})).await?;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    let filter = json!({"notifications": {"toolsListChanged": true}});
    let mut stream = mcp
        .session_less_stream(2, "subscriptions/listen", filter)
        .await?;
    assert_eq!(stream.status, StatusCode::OK);
    let ack = stream
        .next_message(WAIT)
        .await?
        .context("no acknowledgment")?;
    assert_eq!(
        ack["method"], "notifications/subscriptions/acknowledged",
        "{ack}"
    );
    assert_eq!(
        ack["params"]["notifications"],
        json!({"toolsListChanged": true}),
        "{ack}"
    );
    // The listener subscribes to the tenant after the acknowledgment is out; a change
    // before that lands is not a bug, so each round changes the list again.
    let mut heard = None;
    for _ in 0..5 {
        upstream.set_tools_changed().await;
        match stream.next_message(Duration::from_secs(3)).await {
            Ok(Some(message)) => {
                heard = Some(message);
                break;
            }
            Ok(None) => anyhow::bail!("the listen stream ended"),
            Err(_) => continue,
        }
    }
    let heard = heard.context("no notifications/tools/list_changed on the listen stream")?;
    assert_eq!(
        heard["method"], "notifications/tools/list_changed",
        "{heard}"
    );
    assert_eq!(
        heard["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], 2,
        "it names the listen request: {heard}"
    );
    // An open listen stream is not a request in flight: the drain does not wait for it.
    let started = Instant::now();
    gw.stop().await?;
    assert!(
        started.elapsed() < drain_timeout / 2,
        "stop took {:?}",
        started.elapsed()
    );
    // ...and it ends the stream (perhaps after the listen request's final result).
    while stream.next_message(WAIT).await?.is_some() {}
    Ok(())
}

fn is_json(got: &Raw) -> bool {
    got.headers
        .get("content-type")
        .is_some_and(|t| t == "application/json")
}

fn is_event_stream(got: &Raw) -> bool {
    got.headers
        .get("content-type")
        .and_then(|t| t.to_str().ok())
        .is_some_and(|t| t.starts_with("text/event-stream"))
}

/// `got` answers request `id` with a tool result whose first content is `text`.
fn assert_answers(got: &Raw, id: u64, text: &str) {
    assert_eq!(got.answer()["id"], id, "{}", got.text);
    let answered = &got.answer()["result"]["content"][0]["text"];
    assert_eq!(answered, text, "{}", got.text);
}

/// A gateway on `config` with one tenant on a fresh upstream, a raw MCP client of it, and
/// the id of the session that client opened.
async fn raw_session_on(
    config: Config,
) -> anyhow::Result<(TestUpstream, TestGateway, CreatedTenant, RawMcp, String)> {
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start_with(config).await?;
    let t = tenant_on(&gw, &upstream.url).await?;
    let mcp = raw_mcp(&gw, &t);
    let id = mcp.open_session().await?.expect("session opens");
    Ok((upstream, gw, t, mcp, id))
}

#[tokio::test]
async fn a_plain_call_in_a_session_is_answered_as_json_and_a_cancel_reaches_it(
) -> anyhow::Result<()> {
    let (upstream, gw, t, mcp, id) = raw_session_on(Config::for_tests()).await?;
    let got = mcp
        .in_session(
            &id,
            &tool_call(2, json!({"name": "echo", "arguments": {"text": "hi"}})),
        )
        .await?;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    assert!(
        is_json(&got),
        "served without an event stream: {:?}",
        got.headers
    );
    assert_answers(&got, 2, "hi");
    assert_eq!(got.answer()["result"]["isError"], false, "{}", got.text);
    // Sent whole, with its length (not in chunks): the drain's hold on it keeps its size.
    let length = got.headers.get("content-length").map(|v| v.as_bytes());
    assert_eq!(
        length,
        Some(got.text.len().to_string().as_bytes()),
        "{:?}",
        got.headers
    );
    assert!(
        !got.headers.contains_key("transfer-encoding"),
        "{:?}",
        got.headers
    );
    // Errors are rmcp's handler's: an unknown tool is invalid params, by the same id.
    let got = mcp
        .in_session(&id, &tool_call(3, json!({"name": "no-such-tool"})))
        .await?;
    assert!(is_json(&got), "{:?}", got.headers);
    assert_eq!(got.answer()["id"], 3, "{}", got.text);
    assert_eq!(got.answer()["error"]["code"], -32602, "{}", got.text);
    // Another tenant cannot call in this session.
    let other = tenant_on(&gw, &upstream.url).await?;
    let echo_call = tool_call(4, json!({"name": "echo", "arguments": {"text": "x"}}));
    let got = raw_mcp(&gw, &other).in_session(&id, &echo_call).await?;
    assert_eq!(got.status, StatusCode::NOT_FOUND, "{}", got.text);

    // A call the client cancels is cancelled upstream, and not answered (MCP: the receiver
    // of `notifications/cancelled` does not answer the request; rmcp's server drops such an
    // answer too): its stream ends with no result.
    let slow = {
        let mcp = raw_mcp(&gw, &t);
        let (id, call) = (
            id.clone(),
            tool_call(5, json!({"name": "sleep", "arguments": {"ms": 20_000}})),
        );
        tokio::spawn(async move { mcp.in_session(&id, &call).await })
    };
    // The echo, then the sleep (the unknown tool and the other tenant's call reach no one).
    upstream.wait_for_calls(2).await?;
    let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                        "params": {"requestId": 5, "reason": "changed my mind"}});
    let got = mcp.in_session(&id, &cancel).await?;
    assert_eq!(got.status, StatusCode::ACCEPTED, "{}", got.text);
    upstream.wait_for_cancellations(1).await?;
    let got = tokio::time::timeout(Duration::from_secs(5), slow).await???;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    assert!(is_event_stream(&got), "{:?}", got.headers);
    assert!(
        got.answer().is_null(),
        "a cancelled call answered: {}",
        got.text
    );

    // A call that runs past a second is answered as an event stream (its headers go out,
    // so the request timeout cannot cut it), its result last.
    let sleep = |id: u64, ms: u64| tool_call(id, json!({"name": "sleep", "arguments": {"ms": ms}}));
    let got = mcp.in_session(&id, &sleep(6, 1_500)).await?;
    assert!(is_event_stream(&got), "{:?}", got.headers);
    // Its priming event tells the client how long to wait before it resumes, as rmcp's do.
    let priming = got.text.split("\n\n").next().unwrap_or_default();
    assert!(priming.contains("\nretry: 3000"), "{}", got.text);
    assert_answers(&got, 6, "slept 1500 ms");
    // Its client's connection breaking does not cancel it (MCP: a disconnection is not a
    // cancel). The stream's first event, before any message, gives the client an id to
    // resume from; the rest of the stream comes to a GET with it as `Last-Event-ID`.
    let mut streaming = mcp.in_session_unread(&id, &sleep(7, 1_500)).await?;
    assert_eq!(streaming.status(), StatusCode::OK);
    let priming = first_event_ids(&mut streaming, 1).await?.remove(0);
    drop(streaming);
    let resumed = mcp.resume(&id, &priming).await?;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.text);
    assert!(is_event_stream(&resumed), "{:?}", resumed.headers);
    assert_answers(&resumed, 7, "slept 1500 ms");
    assert_eq!(
        upstream.cancellations(),
        1,
        "only the call its client cancelled"
    );
    // Once more from the result's own id: nothing is left after it. From another session
    // of the tenant, or another tenant, the id names nothing: rmcp answers that with an
    // empty stream.
    let result_id = event_ids(&resumed.text).pop().expect("the result's id");
    let after = mcp.resume(&id, &result_id).await?;
    assert!(after.answer().is_null(), "{}", after.text);
    assert!(after.text.is_empty(), "{}", after.text);
    let again = mcp.resume(&id, &priming).await?;
    assert_answers(&again, 7, "slept 1500 ms");
    let other_session = mcp.open_session().await?.expect("session opens");
    let elsewhere = mcp.resume(&other_session, &priming).await?;
    assert!(elsewhere.answer().is_null(), "{}", elsewhere.text);

    // With progress: a resume from the first update goes on with the second.
    let mut call = tool_call(
        8,
        json!({"name": "progress", "arguments": {"steps": 3, "ms": 300}}),
    );
    call["params"]["_meta"] = json!({ "progressToken": "p8" });
    let mut streaming = mcp.in_session_unread(&id, &call).await?;
    let first_update = first_event_ids(&mut streaming, 2).await?.remove(1);
    drop(streaming);
    let resumed = mcp.resume(&id, &first_update).await?;
    let progress: Vec<f64> = resumed
        .progress()
        .iter()
        .filter_map(|p| p["progress"].as_f64())
        .collect();
    assert_eq!(progress, [2.0, 3.0], "{}", resumed.text);
    assert_eq!(resumed.answer_position(), Some(2), "{}", resumed.text);
    assert_answers(&resumed, 8, "done after 3 steps");
    gw.stop().await
}

/// The event ids of an event stream's text, in order.
fn event_ids(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("id:"))
        .map(|id| id.trim().to_owned())
        .collect()
}

#[tokio::test]
async fn calls_served_without_rmcp_still_keep_their_session_alive() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let mut config = Config::for_tests();
    config.mcp_session_idle = Duration::from_secs(2);
    // The session's timer allows for a call of up to the request timeout besides.
    config.upstream_timeout = Duration::from_millis(500);
    config.request_timeout = Duration::from_secs(1);
    let (_upstream, gw, _t, mcp, id) = raw_session_on(config).await?;
    // The session's own stream ends when its session closes (rmcp closes an idle one; a
    // later request would rebuild it from its id, and the client would not notice).
    let stream = mcp.session_stream(&id).await?;
    assert_eq!(stream.status(), StatusCode::OK);
    let mut body = stream.bytes_stream();
    let closed = tokio::spawn(async move { while let Some(Ok(_)) = body.next().await {} });
    // Calls for twice the idle timeout: rmcp's idle timer restarts only on the requests it
    // sees, so some of these must reach it.
    let until = Instant::now() + Duration::from_secs(4);
    let mut n = 1;
    while Instant::now() < until {
        n += 1;
        let call = tool_call(
            n,
            json!({"name": "echo", "arguments": {"text": "still here"}}),
        );
        let got = mcp.in_session(&id, &call).await?;
        assert_eq!(got.status, StatusCode::OK, "call {n}: {}", got.text);
        assert_answers(&got, n, "still here");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(!closed.is_finished(), "the session idled out while in use");
    // Quiet for longer than the timeout (2 s, a tenth and the request timeout), it closes.
    tokio::time::timeout(Duration::from_secs(6), closed).await??;
    gw.stop().await
}

#[tokio::test]
async fn an_abandoned_session_idles_out_while_its_tools_keep_changing() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    // rmcp's idle timer restarts on what the server sends too: each tool-list change told
    // to the session kept one its client had left open for ever.
    let mut config = Config::for_tests();
    config.mcp_session_idle = Duration::from_secs(2);
    config.upstream_timeout = Duration::from_millis(500);
    config.request_timeout = Duration::from_secs(1);
    let (upstream, gw, _t, mcp, id) = raw_session_on(config).await?;
    // The tenant's upstream session is open, so that its changes are heard.
    let listed = mcp
        .in_session(
            &id,
            &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        )
        .await?;
    assert_eq!(listed.status, StatusCode::OK, "{}", listed.text);
    let stream = mcp.session_stream(&id).await?;
    assert_eq!(stream.status(), StatusCode::OK);
    let mut body = stream.bytes_stream();
    let closed = tokio::spawn(async move { while let Some(Ok(_)) = body.next().await {} });
    let changing = async {
        loop {
            upstream.set_tools_changed().await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    // Quiet for the idle timeout and the request timeout (3 s), it closes within a tenth
    // more; the changes go on all the while.
    tokio::select! {
        ended = tokio::time::timeout(Duration::from_secs(8), closed) => {
            ended.context("the session stayed open while its tools kept changing")??;
        }
        () = changing => {}
    }
    gw.stop().await
}

#[tokio::test]
async fn a_resume_rmcp_answers_without_its_session_does_not_keep_the_session_alive(
) -> anyhow::Result<()> {
    // The gate serves a session's calls only within a tenth of the idle timeout (here 1 s)
    // of a request that restarted rmcp's idle timer.
    let mut config = Config::for_tests();
    config.mcp_session_idle = Duration::from_secs(10);
    let (_upstream, gw, _t, mcp, id) = raw_session_on(config).await?;
    let echo = |n: u64| tool_call(n, json!({"name": "echo", "arguments": {"text": "x"}}));
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // An event id of the gateway's own form that names no stream kept here (expired, or
    // another process's): rmcp answers it with an empty stream, without its session.
    let got = mcp.resume(&id, "000000000000-1-0").await?;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    assert!(got.text.is_empty(), "{}", got.text);
    // So the next call goes through rmcp (an event stream), which restarts the timer...
    let got = mcp.in_session(&id, &echo(2)).await?;
    assert!(is_event_stream(&got), "{:?}", got.headers);
    assert_answers(&got, 2, "x");
    // ...and the one after it is the gate's again (JSON).
    let got = mcp.in_session(&id, &echo(3)).await?;
    assert!(is_json(&got), "{:?}", got.headers);
    gw.stop().await
}

#[tokio::test]
async fn ending_a_session_cancels_the_calls_the_gateway_serves_in_it() -> anyhow::Result<()> {
    let (upstream, gw, t, mcp, id) = raw_session_on(Config::for_tests()).await?;
    let slow = {
        let (mcp, id) = (raw_mcp(&gw, &t), id.clone());
        let call = tool_call(2, json!({"name": "sleep", "arguments": {"ms": 20_000}}));
        tokio::spawn(async move { mcp.in_session(&id, &call).await })
    };
    upstream.wait_for_calls(1).await?;
    assert!(mcp.close_session(&id).await?.is_success());
    // At once, not at the tests' 5 s upstream timeout.
    tokio::time::timeout(Duration::from_secs(2), upstream.wait_for_cancellations(1))
        .await
        .context("the call outlived its session")??;
    // Its stream ends, with no answer: the session it was asked in is gone, as a session
    // rmcp serves closes its streams as it ends.
    let got = tokio::time::timeout(Duration::from_secs(5), slow).await???;
    assert!(got.answer().is_null(), "{}", got.text);
    gw.stop().await
}
