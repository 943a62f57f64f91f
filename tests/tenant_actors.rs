//! Issue 4's acceptance: each tenant's calls go through its own supervised actor to its own
//! upstream connection, against real MCP servers on loopback.

mod common;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use common::database::{locking, wait_for_lock_waiter};
use common::gateway::{CreatedTenant, TestGateway};
use common::peers::{EverythingMode, EverythingServer};
use common::upstream::TestUpstream;
use reqwest::StatusCode;
use serde_json::{json, Value};
use switchboard::config::Config;
use switchboard::tenants::messages::CallError;

fn tenant_on(upstream: &str, token: &str) -> Value {
    json!({"name": "t", "integrationKey": "hubspot", "integrationAppToken": token, "upstreamUrl": upstream})
}

fn tool_names(body: &Value) -> Vec<String> {
    body["tools"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn the_seed_flow_lists_and_calls_tools_unchanged() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let t = gw
        .create_tenant(tenant_on(&upstream.url, "ia-token-seed"))
        .await?;
    assert_eq!(
        upstream.initializes(),
        0,
        "no connection before the first call"
    );

    let (status, _, list) = gw.tool(&t, json!({"method": "listTools"})).await?;
    assert_eq!(status, StatusCode::OK, "{list}");
    let names = tool_names(&list);
    for expected in ["echo", "sleep", "fail", "whoami", "add"] {
        assert!(
            names.contains(&expected.to_owned()),
            "{expected} in {names:?}"
        );
    }
    assert!(list["tools"][0]["inputSchema"].is_object());

    let (status, _, echoed) = gw
        .tool(&t, json!({"method": "echo", "params": {"text": "hello"}}))
        .await?;
    assert_eq!(status, StatusCode::OK, "{echoed}");
    assert_eq!(echoed["content"][0]["text"], "hello");
    assert_eq!(echoed["structuredContent"]["echo"], "hello");
    assert_eq!(echoed["isError"], false);

    let (status, _, failed) = gw.tool(&t, json!({"method": "fail", "params": {}})).await?;
    assert_eq!(status, StatusCode::OK, "a tool error is still 200");
    assert_eq!(failed["isError"], true);

    let (status, _, unknown) = gw.tool(&t, json!({"method": "no_such_tool"})).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(unknown["error"]["code"], "unknown_tool");

    let (status, _, who) = gw.tool(&t, json!({"method": "whoami"})).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(who.to_string().contains("ia-token-seed"), "{who}");
    assert_eq!(
        upstream.initializes(),
        1,
        "one connection serves every call"
    );

    // After the drain (the actor flushes its audit buffer) every tool call is on record,
    // as read by a gateway started again on the same store.
    let gw = gw.restart().await?;
    let audit = tool_call_audit(&gw, &t).await?;
    let calls: Vec<(&str, &str)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| Some((i["tool"].as_str()?, i["outcome"].as_str()?)))
        .collect();
    assert_eq!(
        calls,
        [
            ("whoami", "ok"),
            ("no_such_tool", "refused"),
            ("fail", "tool_error"),
            ("echo", "ok"),
        ],
        "newest first: {audit}"
    );
    gw.stop().await
}

#[tokio::test]
async fn fifty_tenants_each_reach_upstream_with_their_own_token() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let mut tenants = Vec::new();
    for i in 0..50 {
        let token = format!("ia-token-tenant-{i:02}");
        tenants.push((
            gw.create_tenant(tenant_on(&upstream.url, &token)).await?,
            token,
        ));
    }
    let (gw_ref, all) = (&gw, &tenants);
    let calls = tenants.iter().map(|(t, token)| {
        let (gw, tenants) = (gw_ref, all);
        async move {
            let (status, _, body) = gw.tool(t, json!({"method": "whoami"})).await?;
            anyhow::ensure!(status == StatusCode::OK, "{body}");
            anyhow::ensure!(
                body.to_string().contains(token.as_str()),
                "{} got {body}",
                t.id
            );
            for (_, other) in tenants.iter().filter(|(o, _)| o.id != t.id) {
                anyhow::ensure!(
                    !body.to_string().contains(&format!("{other}\"")),
                    "leak into {}",
                    t.id
                );
            }
            anyhow::Ok(())
        }
    });
    for result in futures::future::join_all(calls).await {
        result?;
    }
    let seen = upstream.seen_tokens();
    for (_, token) in &tenants {
        assert!(seen.contains(token), "{token} reached the upstream");
    }
    assert_eq!(gw.tenants.active_count(), 50);
    gw.stop().await
}

/// Waits until no tenant actor runs (idled out, or stopped by a change); fails with `what`
/// after `within`.
async fn wait_for_no_actors(gw: &TestGateway, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while gw.tenants.active_count() > 0 {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /api/tenant/{id}/tool` with `body` in a task of its own (for a request that
/// waits while the test acts): its status and JSON body.
fn spawn_tool(gw: &TestGateway, t: &CreatedTenant, body: Value) -> ToolAnswer {
    let (http, key) = (gw.http.clone(), t.api_key.clone());
    let url = gw.url(&format!("/api/tenant/{}/tool", t.id));
    tokio::spawn(async move {
        let resp = http
            .post(url)
            .header("x-api-key", key)
            .json(&body)
            .send()
            .await?;
        let status = resp.status();
        anyhow::Ok((status, resp.json::<Value>().await?))
    })
}

/// The tenant's `tool.call` audit trail, newest first, as the tenant reads it.
async fn tool_call_audit(gw: &TestGateway, t: &CreatedTenant) -> anyhow::Result<Value> {
    let (status, _, audit) = gw
        .send(
            reqwest::Method::GET,
            &format!("/api/tenant/{}/audit?action=tool.call", t.id),
            &[("x-api-key", &t.api_key)],
            None,
        )
        .await?;
    anyhow::ensure!(status == StatusCode::OK, "audit: {status} {audit}");
    Ok(audit)
}

/// A tenant whose upstream connection is up (one `echo` served): its upstream, the gateway,
/// the tenant and the `echo` call.
async fn connected_tenant() -> anyhow::Result<(TestUpstream, TestGateway, CreatedTenant, Value)> {
    connected_tenant_with(Config::for_tests()).await
}

/// [`connected_tenant`] on a gateway with `config`.
async fn connected_tenant_with(
    config: Config,
) -> anyhow::Result<(TestUpstream, TestGateway, CreatedTenant, Value)> {
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start_with(config).await?;
    let t = gw.create_tenant(tenant_on(&upstream.url, "tok")).await?;
    let echo = json!({"method": "echo", "params": {"text": "x"}});
    assert_eq!(gw.tool(&t, echo.clone()).await?.0, StatusCode::OK);
    Ok((upstream, gw, t, echo))
}

#[tokio::test]
async fn upstream_down_fails_fast_and_recovers_without_a_restart() -> anyhow::Result<()> {
    let (upstream, gw, t, echo) = connected_tenant().await?;
    upstream.stop().await;
    for _ in 0..3 {
        let started = Instant::now();
        let (status, _, body) = gw.tool(&t, echo.clone()).await?;
        assert!(
            status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE,
            "{status} {body}"
        );
        assert!(started.elapsed() < Duration::from_secs(3), "fails fast");
    }
    upstream.restart().await?;
    let (status, _, body) = gw.tool(&t, echo).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    gw.stop().await
}

#[tokio::test]
async fn a_hanging_upstream_gives_504_at_the_timeout() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.upstream_timeout = Duration::from_millis(400);
    let gw = TestGateway::start_with(config).await?;
    let t = gw.create_tenant(tenant_on(&upstream.url, "tok")).await?;
    gw.tool(&t, json!({"method": "listTools"})).await?;
    upstream.set_hang(true);
    let started = Instant::now();
    let (status, _, body) = gw
        .tool(&t, json!({"method": "echo", "params": {"text": "x"}}))
        .await?;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"]["code"], "upstream_timeout");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "{took:?}"
    );
    upstream.wait_for_cancellations(1).await?;
    gw.stop().await
}

/// An upstream frozen with its connection open answers nothing, not even the ping that a
/// timed-out call leads to: that connection is dropped, and once the upstream answers
/// again the next call opens a new session instead of timing out on the old one for ever.
#[tokio::test]
async fn an_upstream_gone_silent_is_reconnected_after_a_timeout() -> anyhow::Result<()> {
    let (upstream, gw, t, echo) = connected_tenant_with(timing_out()).await?;
    let sessions = upstream.initializes();
    upstream.set_silent(true);
    assert_times_out(&gw, &t, &echo).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.tenants.status(&t.id).await.last_error.is_none() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the connection was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    upstream.set_silent(false);
    let (status, _, body) = gw.tool(&t, echo).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(upstream.initializes(), sessions + 1, "a new session");
    gw.stop().await
}

/// An upstream that opens sessions and then answers nothing on them: each round a call
/// times out, its ping gets no answer and the connection is dropped, and the next call
/// opens a new one. The timeouts must not reset the count of failures in a row, or such a
/// tenant would reconnect for ever, a full timeout per call, and never back off.
#[tokio::test]
async fn an_upstream_that_answers_only_handshakes_ends_up_failing() -> anyhow::Result<()> {
    let (upstream, gw, t, echo) = connected_tenant_with(timing_out()).await?;
    upstream.set_stalling(&["tools/call", "ping"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "never failing");
        let (status, headers, body) = gw.tool(&t, echo.clone()).await?;
        if status == StatusCode::BAD_GATEWAY && headers.contains_key("retry-after") {
            break;
        }
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
        // This round's ping fails and drops the connection before the next round.
        let dropped = Instant::now() + Duration::from_secs(5);
        while gw.tenants.status(&t.id).await.state
            == switchboard::tenants::status::ConnectionState::Ready
        {
            anyhow::ensure!(Instant::now() < dropped, "the connection was never dropped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(upstream.initializes() >= 10, "{}", upstream.initializes());
    gw.stop().await
}

/// A busy upstream whose ping waits behind its work, but which answers other calls
/// meanwhile, is there: its connection stays.
#[tokio::test]
async fn an_upstream_that_answers_calls_but_not_the_ping_keeps_its_connection() -> anyhow::Result<()>
{
    let (upstream, gw, t, echo) = connected_tenant_with(timing_out()).await?;
    let sessions = upstream.initializes();
    upstream.set_stalling(&["ping"]);
    upstream.set_hang(true);
    assert_times_out(&gw, &t, &echo).await?;
    upstream.set_hang(false);
    // Calls answered all through the ping's window, and past it.
    let answering = Instant::now() + Duration::from_millis(800);
    while Instant::now() < answering {
        let (status, _, body) = gw.tool(&t, echo.clone()).await?;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(gw.tenants.status(&t.id).await.last_error, None);
    assert_eq!(upstream.initializes(), sessions, "the same session");
    gw.stop().await
}

/// The gateway is an MCP server too: a tenant whose upstream is another tenant's `/mcp`
/// endpoint is served through it. That endpoint answers a session's quick call with JSON,
/// not with an event stream as rmcp's server does, and the upstream side reads both.
#[tokio::test]
async fn a_tenant_whose_upstream_is_another_tenants_mcp_endpoint() -> anyhow::Result<()> {
    let (upstream, gw, a, echo) = connected_tenant().await?;
    let chained = format!("{}/mcp/{}", gw.base, a.id);
    let b = gw.create_tenant(tenant_on(&chained, &a.api_key)).await?;
    let calls = upstream.calls();
    for _ in 0..3 {
        let (status, _, body) = gw.tool(&b, echo.clone()).await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["content"][0]["text"], "x", "{body}");
    }
    assert_eq!(upstream.calls(), calls + 3);
    gw.stop().await
}

/// The ping after a timeout may take as long as a call may, not just a connect: an
/// upstream slow to answer it (busier than a connect allows for) keeps its connection.
#[tokio::test]
async fn a_ping_may_take_as_long_as_a_call() -> anyhow::Result<()> {
    let mut config = Config::for_tests();
    config.upstream_timeout = Duration::from_secs(2);
    config.upstream_connect_timeout = Duration::from_millis(100);
    let (upstream, gw, t, echo) = connected_tenant_with(config).await?;
    let sessions = upstream.initializes();
    upstream.set_slow_ping(Duration::from_millis(300));
    upstream.set_hang(true);
    assert_times_out(&gw, &t, &echo).await?;
    upstream.set_hang(false);
    // Past the window a connect's timeout would have given it (100 ms), and past the
    // ping's answer (300 ms), well within a call's (2 s).
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(gw.tenants.status(&t.id).await.last_error, None);
    let (status, _, body) = gw.tool(&t, echo).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(upstream.initializes(), sessions, "the same session");
    gw.stop().await
}

/// Calls `echo` for `t`, which must time out (504).
async fn assert_times_out(gw: &TestGateway, t: &CreatedTenant, echo: &Value) -> anyhow::Result<()> {
    let (status, _, body) = gw.tool(t, echo.clone()).await?;
    anyhow::ensure!(status == StatusCode::GATEWAY_TIMEOUT, "{status} {body}");
    Ok(())
}

/// Calls and pings time out in 300 ms.
fn timing_out() -> Config {
    let mut config = Config::for_tests();
    config.upstream_timeout = Duration::from_millis(300);
    config.upstream_connect_timeout = Duration::from_millis(300);
    config
}

/// A slow tool times out too, but its upstream answers the ping: the connection stays.
#[tokio::test]
async fn a_slow_tool_keeps_its_connection() -> anyhow::Result<()> {
    let (upstream, gw, t, echo) = connected_tenant_with(timing_out()).await?;
    let sessions = upstream.initializes();
    upstream.set_hang(true);
    assert_times_out(&gw, &t, &echo).await?;
    // Past the ping's own timeout: a ping that failed has dropped the connection by now.
    tokio::time::sleep(Duration::from_millis(800)).await;
    upstream.set_hang(false);
    let (status, _, body) = gw.tool(&t, echo).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(upstream.initializes(), sessions, "the same session");
    assert_eq!(gw.tenants.status(&t.id).await.last_error, None);
    gw.stop().await
}

#[tokio::test]
async fn a_request_cut_off_by_its_timeout_is_audited_as_a_timeout() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.request_timeout = Duration::from_millis(400);
    config.upstream_timeout = Duration::from_secs(10);
    let gw = TestGateway::start_with(config).await?;
    let t = gw.create_tenant(tenant_on(&upstream.url, "tok")).await?;
    gw.tool(&t, json!({"method": "listTools"})).await?;
    upstream.set_hang(true);
    let (status, _, body) = gw
        .tool(&t, json!({"method": "echo", "params": {"text": "x"}}))
        .await?;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"]["code"], "upstream_timeout");
    upstream.wait_for_cancellations(1).await?;
    upstream.set_hang(false);
    // The client was told it timed out: the audit trail says the same.
    let gw = gw.restart().await?;
    let audit = tool_call_audit(&gw, &t).await?;
    assert_eq!(audit["items"][0]["tool"], "echo", "{audit}");
    assert_eq!(audit["items"][0]["outcome"], "timeout", "{audit}");
    gw.stop().await
}

#[tokio::test]
async fn a_panicking_actor_restarts_and_no_other_tenant_notices() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.tenant_idle = Duration::from_millis(600);
    let gw = TestGateway::start_with(config).await?;
    let a = gw.create_tenant(tenant_on(&upstream.url, "tok-a")).await?;
    let b = gw.create_tenant(tenant_on(&upstream.url, "tok-b")).await?;
    let echo = json!({"method": "echo", "params": {"text": "x"}});
    assert_eq!(gw.tool(&a, echo.clone()).await?.0, StatusCode::OK);
    assert_eq!(gw.tool(&b, echo.clone()).await?.0, StatusCode::OK);
    let b_calls = async {
        for _ in 0..20 {
            let (status, _, body) = gw.tool(&b, echo.clone()).await?;
            anyhow::ensure!(status == StatusCode::OK, "tenant b saw {status} {body}");
        }
        anyhow::Ok(())
    };
    assert!(gw.tenants.inject_panic(&a.id));
    b_calls.await?;
    // Tenant a is restarted by the registry and serves again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, headers, _) = gw.tool(&a, echo.clone()).await?;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(headers.contains_key("retry-after"));
        assert!(Instant::now() < deadline, "tenant a did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = gw.tenants.status(&a.id).await;
    assert_eq!(status.restarts, 1);
    assert_eq!(gw.tenants.status(&b.id).await.restarts, 0);
    // Once it idles out, a recovered tenant shows as stopped, not as its old crash.
    wait_for_no_actors(&gw, Duration::from_secs(10), "the actors did not idle out").await;
    let status = gw.tenants.status(&a.id).await;
    assert_eq!(
        status.state,
        switchboard::tenants::status::ConnectionState::Stopped,
        "{:?}",
        status.last_error
    );
    assert_eq!(status.last_error, None);
    assert_eq!(status.restarts, 1, "the count of restarts stays");
    gw.stop().await
}

#[tokio::test]
async fn tool_call_events_recorded_as_the_actor_crashes_are_all_written() -> anyhow::Result<()> {
    // Events recorded right behind the panic used to wait in the actor's mailbox, which
    // ractor drops with the crashed actor. They go to the tenant's audit buffer now,
    // which the crashed actor hands to the audit writer whole.
    let (_upstream, gw, t, _) = connected_tenant().await?;
    assert!(gw.tenants.inject_panic(&t.id));
    let ids: Vec<String> = (0..5).map(|n| format!("crash-{n}")).collect();
    for id in &ids {
        let mut event =
            switchboard::audit::event(Some(&t.id), "tool.call", &t.id, "success", Some(id));
        event.tool = Some("echo".into());
        gw.tenants.audit(&t.id, event);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let audit = tool_call_audit(&gw, &t).await?;
        let written: Vec<&str> = audit["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| item["requestId"].as_str())
            .collect();
        if ids.iter().all(|id| written.contains(&id.as_str())) {
            break;
        }
        assert!(Instant::now() < deadline, "written: {written:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await
}

#[tokio::test]
async fn a_full_reload_forgets_a_crashed_tenants_back_off() -> anyhow::Result<()> {
    // With no restart allowed, one crash puts the tenant in a 30 s back-off, from the
    // record it had. "Anything may have changed" (the fleet listener reconnected, maybe
    // after missing a fix of the tenant) ends that: the next call starts it afresh.
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.tenant_max_restarts = 0;
    let gw = TestGateway::start_with(config).await?;
    let t = gw.create_tenant(tenant_on(&upstream.url, "tok")).await?;
    let echo = json!({"method": "echo", "params": {"text": "x"}});
    assert_eq!(gw.tool(&t, echo.clone()).await?.0, StatusCode::OK);
    assert!(gw.tenants.inject_panic(&t.id));
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.tenants.status(&t.id).await.restarts == 0 {
        assert!(Instant::now() < deadline, "the crash was not recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _, body) = gw.tool(&t, echo.clone()).await?;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "in back-off: {body}"
    );
    gw.tenants.announce_all_changed();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, body) = gw.tool(&t, echo.clone()).await?;
        if status == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still in back-off: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await
}

#[tokio::test]
async fn a_panicking_actor_leaves_no_audit_event_unwritten() -> anyhow::Result<()> {
    // A panic skips the actor's stop, which writes its audit buffer: the calls just made
    // (buffered until the next tick, a second away) must be written all the same.
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let t = gw.create_tenant(tenant_on(&upstream.url, "tok")).await?;
    for n in 0..3 {
        let echo = json!({"method": "echo", "params": {"text": format!("call {n}")}});
        assert_eq!(gw.tool(&t, echo).await?.0, StatusCode::OK);
    }
    assert!(gw.tenants.inject_panic(&t.id));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let audit = tool_call_audit(&gw, &t).await?;
        let written = audit["items"].as_array().map_or(0, Vec::len);
        if written == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{written} of 3 calls audited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await
}

#[tokio::test]
async fn ten_failures_in_a_row_mark_the_tenant_failing() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    // Nothing listens on this port: every connect is refused at once.
    let url = format!("http://{}/mcp", switchboard::config::refusing_loopback());
    let t = gw.create_tenant(tenant_on(&url, "tok")).await?;
    let echo = json!({"method": "echo", "params": {"text": "x"}});
    for i in 0..10 {
        let (status, headers, body) = gw.tool(&t, echo.clone()).await?;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "call {i}: {body}");
        // Not failing yet: the upstream was tried, and no retry time is given.
        assert!(
            !headers.contains_key("retry-after"),
            "call {i}: {headers:?}"
        );
    }
    // Failing: API.md's 502 (the upstream could not be reached), without trying it again,
    // and with the time the next attempt is allowed.
    let (status, headers, body) = gw.tool(&t, echo).await?;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"]["code"], "upstream_error");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    let admin = format!("Bearer {}", gw.config.admin_api_key.expose());
    let (_, _, view) = gw
        .send(
            reqwest::Method::GET,
            &format!("/api/tenants/{}", t.id),
            &[("authorization", &admin)],
            None,
        )
        .await?;
    assert_eq!(view["status"]["state"], "failing", "{view}");
    assert!(view["status"]["lastError"].is_string());
    gw.stop().await
}

/// Calls `body` until the answer is the failing tenant's: 502 `upstream_error` with
/// `Retry-After`. Returns the statuses before it; fails past `limit` calls.
async fn call_until_failing(
    gw: &TestGateway,
    t: &CreatedTenant,
    body: Value,
    limit: usize,
) -> anyhow::Result<Vec<StatusCode>> {
    let mut before = Vec::new();
    for _ in 0..limit {
        let (status, headers, answer) = gw.tool(t, body.clone()).await?;
        if headers.contains_key("retry-after") {
            anyhow::ensure!(status == StatusCode::BAD_GATEWAY, "{status} {answer}");
            anyhow::ensure!(answer["error"]["code"] == "upstream_error", "{answer}");
            return Ok(before);
        }
        before.push(status);
        // The actor hears of a failure by a message sent as the answer goes out: a call on
        // its heels could still find the connection it is about to close.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("not marked failing after {limit} calls: {before:?}")
}

#[tokio::test]
async fn an_upstream_that_takes_sessions_but_fails_calls_ends_up_failing() -> anyhow::Result<()> {
    // Each call is refused with an HTTP 502 on a session that stays open: the refusals must
    // add up to failing, or a tenant would call an upstream that is down behind its proxy
    // for ever.
    let (upstream, gw, t, echo) = connected_tenant().await?;
    upstream.set_failing(Some("tools/call"));
    let before = call_until_failing(&gw, &t, echo, 30).await?;
    assert!(
        before.iter().all(|s| *s == StatusCode::BAD_GATEWAY),
        "{before:?}"
    );
    assert_eq!(before.len(), 10, "the threshold: {before:?}");
    assert_eq!(
        upstream.initializes(),
        1,
        "a refused call keeps its session"
    );
    gw.stop().await
}

#[tokio::test]
async fn an_upstream_error_answer_fails_only_its_own_call() -> anyhow::Result<()> {
    // rmcp fails only the request an upstream answers with a 5xx or a 429 and keeps the
    // session; the gateway used to drop the session for it, and with it every other call
    // in flight on it.
    let (upstream, gw, t, echo) = connected_tenant().await?;
    let slow = gw.tool(&t, json!({"method": "sleep", "params": {"ms": 800}}));
    let refused = async {
        upstream.wait_for_calls(2).await?;
        upstream.set_failing_with(Some("tools/call"), 500);
        let refused = gw.tool(&t, echo.clone()).await?;
        upstream.set_failing_with(Some("tools/call"), 429);
        let throttled = gw.tool(&t, echo.clone()).await?;
        upstream.set_failing(None);
        anyhow::Ok((refused, throttled))
    };
    let (slow, refused) = tokio::join!(slow, refused);
    let ((status, refused_headers, body), (throttled, headers, throttled_body)) = refused?;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"]["code"], "upstream_error", "{body}");
    // The upstream's limit on the tenant's credential is the tenant's: 429, with its wait.
    assert_eq!(throttled, StatusCode::TOO_MANY_REQUESTS, "{throttled_body}");
    assert_eq!(throttled_body["error"]["code"], "rate_limited");
    assert_eq!(headers["retry-after"], "7");
    let (status, slow_headers, body) = slow?;
    assert_eq!(status, StatusCode::OK, "the call in flight goes on: {body}");
    let (status, after_headers, _) = gw.tool(&t, echo).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(upstream.initializes(), 1, "one session throughout");
    // The audit trail says what each caller was told (read after the drain's flush).
    let gw = gw.restart().await?;
    let audit = tool_call_audit(&gw, &t).await?;
    let outcome_of = |headers: &reqwest::header::HeaderMap| {
        let id = headers["x-request-id"].to_str().unwrap_or_default();
        audit["items"]
            .as_array()
            .and_then(|items| items.iter().find(|item| item["requestId"] == id))
            .map(|item| item["outcome"].clone())
    };
    assert_eq!(outcome_of(&slow_headers), Some(json!("ok")), "{audit}");
    assert_eq!(
        outcome_of(&refused_headers),
        Some(json!("upstream_error")),
        "{audit}"
    );
    assert_eq!(outcome_of(&headers), Some(json!("rate_limited")), "{audit}");
    assert_eq!(outcome_of(&after_headers), Some(json!("ok")), "{audit}");
    gw.stop().await
}

#[tokio::test]
async fn an_upstream_429_to_initialize_is_the_tenants_limit_not_a_failure() -> anyhow::Result<()> {
    // The upstream's limit on the tenant's credential, met as a new connection opens (first
    // use, or after idling out): 429 with the upstream's wait, as on a call, and never a
    // failure towards marking the tenant failing, however many in a row. Nor is the
    // upstream asked again before its wait is over.
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let t = gw.create_tenant(tenant_on(&upstream.url, "tok")).await?;
    upstream.set_throttling("initialize", 2);
    let echo = json!({"method": "echo", "params": {"text": "x"}});
    let mut asked = 0;
    for n in 0..12 {
        let (status, headers, body) = gw.tool(&t, echo.clone()).await?;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "call {n}: {body}");
        assert_eq!(body["error"]["code"], "rate_limited", "call {n}: {body}");
        assert_eq!(headers["retry-after"], "2", "call {n}");
        if n == 0 {
            asked = upstream.seen_tokens().len();
        }
    }
    assert_eq!(
        upstream.seen_tokens().len(),
        asked,
        "the upstream was asked again within its wait"
    );
    // Not connecting, nor failing: its last attempt ended, and counted as no failure.
    let view = serde_json::to_value(gw.tenants.status(&t.id).await)?;
    assert_eq!(view["state"], "stopped", "{view}");
    assert!(view["lastError"].is_null(), "{view}");
    upstream.set_failing(None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _, body) = gw.tool(&t, echo).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    gw.stop().await
}

#[tokio::test]
async fn an_actor_is_not_idle_while_callers_wait_on_it() -> anyhow::Result<()> {
    // Callers waiting for a connection or a tool list hold no in-flight permit: an actor
    // idle by its clock must not stop under them (they would be refused as restarting,
    // and so would their retry on the next actor, which stops the same way). Here the
    // list never comes: the caller is told so at the upstream timeout.
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.tenant_idle = Duration::from_millis(300);
    config.upstream_timeout = Duration::from_secs(2);
    config.request_timeout = Duration::from_secs(10);
    let gw = TestGateway::start_with(config).await?;
    let t = gw.create_tenant(tenant_on(&upstream.url, "tok")).await?;
    upstream.set_stalling(&["tools/list"]);
    let (status, _, body) = gw.tool(&t, json!({"method": "listTools"})).await?;
    upstream.set_stalling(&[]);
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"]["code"], "upstream_timeout", "{body}");
    gw.stop().await
}

#[tokio::test]
async fn an_answer_stream_cut_off_or_an_unmatched_error_fails_only_its_own_call(
) -> anyhow::Result<()> {
    // One call's event stream ends before its answer, with no event id to resume from (a
    // socket reset, a proxy's idle timeout); or its answer is an error for no request, as
    // the TypeScript SDK's example server answers a tool that threw (500, -32603, `"id":
    // null`): that call fails (502), while the session and the call in flight beside it go
    // on.
    let (upstream, gw, t, echo) = connected_tenant().await?;
    for failing in [200, 503] {
        let served = upstream.calls();
        let slow = gw.tool(&t, json!({"method": "sleep", "params": {"ms": 800}}));
        let cut = async {
            upstream.wait_for_calls(served + 1).await?;
            upstream.set_failing_with(Some("tools/call"), failing);
            let cut = gw.tool(&t, echo.clone()).await?;
            upstream.set_failing(None);
            anyhow::Ok(cut)
        };
        let (slow, cut) = tokio::join!(slow, cut);
        let (status, _, body) = cut?;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{failing}: {body}");
        assert_eq!(body["error"]["code"], "upstream_error", "{failing}: {body}");
        let (status, _, body) = slow?;
        assert_eq!(
            status,
            StatusCode::OK,
            "{failing}: the call beside it goes on: {body}"
        );
    }
    let (status, _, body) = gw.tool(&t, echo).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(upstream.initializes(), 1, "one session throughout");
    gw.stop().await
}

#[tokio::test]
async fn an_upstream_error_answer_to_no_request_fails_the_call_at_once() -> anyhow::Result<()> {
    // An upstream on the TypeScript SDK answers a session it does not know (it restarted
    // and forgot it) with 400 and a JSON-RPC error whose id is null. The call fails at once
    // (502), not after the upstream timeout (5 s here), and so does the next; once the
    // upstream serves again, a new session does.
    let (upstream, gw, t, echo) = connected_tenant().await?;
    upstream.set_failing_with(Some("tools/call"), 400);
    for n in 0..2 {
        let started = Instant::now();
        let (status, _, body) = gw.tool(&t, echo.clone()).await?;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "call {n}: {body}");
        assert_eq!(body["error"]["code"], "upstream_error", "call {n}: {body}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "call {n} waited {:?}",
            started.elapsed()
        );
    }
    upstream.set_failing(None);
    let (status, _, body) = gw.tool(&t, echo).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(upstream.initializes() >= 2, "the session was kept");
    gw.stop().await
}

#[tokio::test]
async fn a_legacy_sse_upstreams_429_passes_on_its_wait() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let sse = upstream
        .sse_url
        .clone()
        .context("the test upstream serves SSE")?;
    let mut body = tenant_on(&sse, "tok");
    body["upstreamTransport"] = json!("sse");
    let t = gw.create_tenant(body).await?;
    let echo = json!({"method": "echo", "params": {"text": "x"}});
    // To its handshake, then to a call on the session.
    for method in ["initialize", "tools/call"] {
        upstream.set_throttling(method, 1);
        let (status, headers, body) = gw.tool(&t, echo.clone()).await?;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{method}: {body}");
        assert_eq!(headers["retry-after"], "1", "{method}");
        upstream.set_failing(None);
        if method == "initialize" {
            // Not asked again within the wait it gave, though it would serve now.
            let asked = upstream.requests();
            let (status, _, body) = gw.tool(&t, echo.clone()).await?;
            assert_eq!(
                status,
                StatusCode::TOO_MANY_REQUESTS,
                "within the wait: {body}"
            );
            assert_eq!(upstream.requests(), asked, "asked within the wait");
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (status, _, body) = gw.tool(&t, echo.clone()).await?;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    }
    gw.stop().await
}

#[tokio::test]
async fn failing_to_list_tools_counts_towards_failing() -> anyhow::Result<()> {
    // An upstream gone for longer than the tool list's lifetime: discovering the list again
    // fails, and that must mark the tenant failing as failed calls do.
    let (upstream, gw, t, _) = connected_tenant().await?;
    upstream.set_failing(Some("tools/list"));
    let refresh = json!({"method": "refreshTools"});
    let before = call_until_failing(&gw, &t, refresh, 30).await?;
    assert!(
        before.iter().all(|s| *s == StatusCode::BAD_GATEWAY),
        "{before:?}"
    );
    assert_eq!(before.len(), 10, "the threshold: {before:?}");
    upstream.set_failing(None);
    gw.stop().await
}

#[tokio::test]
async fn list_requests_after_a_failed_load_spend_the_rate_limit() -> anyhow::Result<()> {
    // A cached list costs the upstream nothing, and its requests spend nothing. A load that
    // failed leaves nothing cached: each `listTools` after it asks the upstream for the
    // whole list again, and must be held to the tenant's limit as a call is.
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let mut body = tenant_on(&upstream.url, "tok");
    body["rateLimit"] = json!({"requestsPerSecond": 1, "burst": 3});
    let t = gw.create_tenant(body).await?;
    let echo = json!({"method": "echo", "params": {"text": "x"}});
    assert_eq!(gw.tool(&t, echo).await?.0, StatusCode::OK);
    upstream.set_failing(Some("tools/list"));
    let (status, _, body) = gw.tool(&t, json!({"method": "refreshTools"})).await?;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    // The burst whole again.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(gw.tool(&t, json!({"method": "listTools"})).await?.0);
    }
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS)
            && statuses
                .iter()
                .all(|s| [StatusCode::TOO_MANY_REQUESTS, StatusCode::BAD_GATEWAY].contains(s)),
        "{statuses:?}"
    );
    upstream.set_failing(None);
    gw.stop().await
}

#[tokio::test]
async fn a_call_after_a_failed_load_spends_the_rate_limit_once() -> anyhow::Result<()> {
    // With no list cached, a call's lease (which spends) comes without one, and the call
    // then asks for the list: that load is the call's own, and spends nothing more.
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let mut body = tenant_on(&upstream.url, "tok");
    body["rateLimit"] = json!({"requestsPerSecond": 1, "burst": 2});
    let t = gw.create_tenant(body).await?;
    let echo = json!({"method": "echo", "params": {"text": "x"}});
    assert_eq!(gw.tool(&t, echo.clone()).await?.0, StatusCode::OK);
    upstream.set_failing(Some("tools/list"));
    let (status, _, body) = gw.tool(&t, json!({"method": "refreshTools"})).await?;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    // The burst whole again: two calls, each one request of it.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    for n in 0..2 {
        let (status, _, body) = gw.tool(&t, echo.clone()).await?;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "call {n}: {body}");
    }
    let mut after = Vec::new();
    for _ in 0..3 {
        after.push(gw.tool(&t, echo.clone()).await?.0);
    }
    assert!(after.contains(&StatusCode::TOO_MANY_REQUESTS), "{after:?}");
    upstream.set_failing(None);
    gw.stop().await
}

#[tokio::test]
async fn list_requests_in_a_failing_back_off_spend_nothing() -> anyhow::Result<()> {
    // A failing tenant's upstream is not asked during its back-off: a list request then is
    // refused at once, as a call is, and must leave the tenant's limit as it was.
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let mut body = tenant_on(&upstream.url, "tok");
    body["rateLimit"] = json!({"requestsPerSecond": 1, "burst": 12});
    let t = gw.create_tenant(body).await?;
    upstream.set_failing(Some("tools/list"));
    // Ten failed loads (ten requests of the burst) mark it failing.
    call_until_failing(&gw, &t, json!({"method": "refreshTools"}), 11).await?;
    let lists = (0..8).map(|_| gw.tool(&t, json!({"method": "listTools"})));
    let statuses: Vec<StatusCode> = futures::future::try_join_all(lists)
        .await?
        .into_iter()
        .map(|(status, _, _)| status)
        .collect();
    assert!(
        statuses.iter().all(|s| *s == StatusCode::BAD_GATEWAY),
        "{statuses:?}"
    );
    upstream.set_failing(None);
    gw.stop().await
}

#[tokio::test]
async fn calls_failing_together_on_one_connection_are_one_failure() -> anyhow::Result<()> {
    let (upstream, gw, t, echo) = connected_tenant().await?;
    // The upstream goes away under a ready connection; more calls than the failing
    // threshold (10) are sent on that connection at once, and all fail.
    upstream.stop().await;
    let answers = futures::future::join_all((0..30).map(|_| gw.tool(&t, echo.clone()))).await;
    for answer in answers {
        let (status, _, body) = answer?;
        assert!(
            status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE,
            "{status} {body}"
        );
    }
    let view = gw.tenants.status(&t.id).await;
    assert_ne!(
        serde_json::to_value(&view)?["state"],
        "failing",
        "one connection lost is not ten failures in a row: {view:?}"
    );
    // Back up: the next call reconnects instead of finding the tenant failing.
    upstream.restart().await?;
    let (status, _, body) = gw.tool(&t, echo).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    gw.stop().await
}

/// With its connection lost but its tool list still fresh, the actor (the lane is withdrawn)
/// refuses a tool not in that list before it spends the rate limit or connects again.
#[tokio::test]
async fn the_actor_refuses_an_unknown_tool_from_its_fresh_list_without_connecting(
) -> anyhow::Result<()> {
    let (upstream, gw, t, echo) = connected_tenant().await?;
    upstream.stop().await;
    let (status, _, body) = gw.tool(&t, echo).await?;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    // The failure reaches the actor as a message: wait until it has dropped the connection.
    let deadline = Instant::now() + Duration::from_secs(5);
    while serde_json::to_value(gw.tenants.status(&t.id).await)?["state"] != "stopped" {
        anyhow::ensure!(Instant::now() < deadline, "the failure was not recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Were the name not checked first, the call would try to connect, and fail (502).
    let (status, _, body) = gw.tool(&t, json!({"method": "no_such_tool"})).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "unknown_tool");
    gw.stop().await
}

#[tokio::test]
async fn a_thousand_tenants_cost_nothing_until_called_and_idle_ones_stop() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.tenant_idle = Duration::from_millis(300);
    let gw = TestGateway::start_with(config).await?;
    let admin = format!("Bearer {}", gw.config.admin_api_key.expose());
    let mut first: Option<CreatedTenant> = None;
    let headers = [("authorization", admin.as_str())];
    for chunk in 0..50 {
        let creates = (0..20).map(|_| {
            gw.send(
                reqwest::Method::POST,
                "/api/tenants",
                &headers,
                Some(tenant_on(&upstream.url, "tok")),
            )
        });
        for created in futures::future::join_all(creates).await {
            let (status, _, body) = created?;
            assert_eq!(status, StatusCode::CREATED);
            if chunk == 0 && first.is_none() {
                first = Some(CreatedTenant {
                    id: body["tenantId"].as_str().unwrap().to_owned(),
                    api_key: body["apiKey"].as_str().unwrap().to_owned(),
                    token: String::new(),
                });
            }
        }
    }
    assert_eq!(gw.tenants.active_count(), 0, "no actor before a call");
    assert_eq!(
        upstream.initializes(),
        0,
        "no upstream connection before a call"
    );
    let t = first.unwrap();
    assert_eq!(
        gw.tool(&t, json!({"method": "listTools"})).await?.0,
        StatusCode::OK
    );
    assert_eq!(gw.tenants.active_count(), 1);
    assert_eq!(upstream.initializes(), 1);
    wait_for_no_actors(&gw, Duration::from_secs(5), "the idle actor did not stop").await;
    assert_eq!(
        gw.tenants.status(&t.id).await.state,
        switchboard::tenants::status::ConnectionState::Stopped
    );
    gw.stop().await
}

#[tokio::test]
async fn a_call_as_the_tenant_idles_out_gets_a_new_actor_not_a_503() -> anyhow::Result<()> {
    // The idle actor drains and closes its upstream session before it leaves; with an
    // upstream slow to end sessions that takes a while, and a call meanwhile must be served.
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.tenant_idle = Duration::from_millis(300);
    let gw = TestGateway::start_with(config).await?;
    let t = gw.create_tenant(tenant_on(&upstream.url, "tok")).await?;
    let echo = json!({"method": "echo", "params": {"text": "x"}});
    assert_eq!(gw.tool(&t, echo.clone()).await?.0, StatusCode::OK);
    upstream.set_slow_close(Duration::from_secs(3));
    // Idle after 300 ms, checked every 75 ms: then it closes its session, which the
    // upstream holds up (a fixed wait here came too early on a busy machine).
    upstream.wait_for_deletes(1).await?;
    let initializes = upstream.initializes();
    let started = Instant::now();
    let (status, _, body) = gw.tool(&t, echo).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        upstream.initializes(),
        initializes + 1,
        "a new actor, a new session"
    );
    upstream.set_slow_close(Duration::ZERO);
    gw.stop().await
}

#[tokio::test]
async fn tools_list_changed_shows_in_the_next_list() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let t = gw.create_tenant(tenant_on(&upstream.url, "tok")).await?;
    let (_, _, before) = gw.tool(&t, json!({"method": "listTools"})).await?;
    upstream.set_tools_changed().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, _, after) = gw.tool(&t, json!({"method": "listTools"})).await?;
        if tool_names(&after) != tool_names(&before) {
            break;
        }
        assert!(Instant::now() < deadline, "the list never changed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.stop().await
}

#[tokio::test]
async fn a_list_that_went_stale_while_loading_is_not_the_one_kept() -> anyhow::Result<()> {
    // A refresh starts a load; the upstream computes its list, then changes its tools and
    // says so before that list arrives. The list on its way is stale: it must not answer
    // the refresh, nor be cached for TOOL_CACHE_TTL.
    let (upstream, gw, t, _) = connected_tenant().await?;
    // An MCP session of the tenant, which hears a change once the actor has handled it;
    // opened first, so that it listens well before the change.
    let mcp = gw.url(&format!("/mcp/{}", t.id));
    let (_session, heard) = common::mcp_client::connect(&mcp, &t.api_key).await?;
    let (_, _, before) = gw.tool(&t, json!({"method": "listTools"})).await?;
    assert!(!tool_names(&before).contains(&"extra".to_owned()));
    upstream.hold_next_list();
    let refresh = spawn_tool(&gw, &t, json!({"method": "refreshTools"}));
    upstream.wait_for_held_lists(1).await?;
    upstream.set_tools_changed().await;
    // The change notice must reach the tenant's actor before the stale list does.
    tokio::time::timeout(Duration::from_secs(10), heard.notified())
        .await
        .context("the change notice did not reach the tenant")?;
    upstream.release_list();
    let (status, refreshed) = refresh.await??;
    assert_eq!(status, StatusCode::OK, "{refreshed}");
    assert!(
        tool_names(&refreshed).contains(&"extra".to_owned()),
        "the refresh answered a stale list: {refreshed}"
    );
    let (_, _, listed) = gw.tool(&t, json!({"method": "listTools"})).await?;
    assert!(
        tool_names(&listed).contains(&"extra".to_owned()),
        "a stale list was cached: {listed}"
    );
    gw.stop().await
}

/// A tenant (`TENANT_MAX_IN_FLIGHT` 2) whose refresh's tool list the upstream holds, with
/// both places waiting for the list taken: the refresh's and one list request's; a second
/// list request was turned away.
struct ListWaitersAtTheCap {
    upstream: TestUpstream,
    gw: TestGateway,
    t: CreatedTenant,
    refresh: ToolAnswer,
    waiting: ToolAnswer,
    /// The answer of the list request turned away.
    refused: (StatusCode, Value),
}

type ToolAnswer = tokio::task::JoinHandle<anyhow::Result<(StatusCode, Value)>>;

async fn list_waiters_at_the_cap() -> anyhow::Result<ListWaitersAtTheCap> {
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.tenant_max_in_flight = 2;
    let gw = TestGateway::start_with(config).await?;
    let t = gw.create_tenant(tenant_on(&upstream.url, "tok")).await?;
    assert_eq!(
        gw.tool(&t, json!({"method": "listTools"})).await?.0,
        StatusCode::OK
    );
    upstream.hold_next_list();
    let refresh = spawn_tool(&gw, &t, json!({"method": "refreshTools"}));
    upstream.wait_for_held_lists(1).await?;
    let mut lists: Vec<_> = (0..2)
        .map(|_| spawn_tool(&gw, &t, json!({"method": "listTools"})))
        .collect();
    // One of the two finds both places taken: answered before the list is let go.
    let (first, done, rest) = tokio::time::timeout(
        Duration::from_secs(10),
        futures::future::select_all(lists.iter_mut()),
    )
    .await
    .context("no caller was turned away while the list was held")?;
    let refused = first??;
    drop(rest);
    lists.remove(done);
    let waiting = lists.pop().context("the other list request")?;
    Ok(ListWaitersAtTheCap {
        upstream,
        gw,
        t,
        refresh,
        waiting,
        refused,
    })
}

#[tokio::test]
async fn callers_waiting_for_a_tool_list_are_bounded() -> anyhow::Result<()> {
    // While a list loads, as many callers may wait for it as calls may be in flight; the
    // next one is told the tenant is busy at once instead of queueing without bound.
    let held = list_waiters_at_the_cap().await?;
    let (status, body) = held.refused;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    held.upstream.release_list();
    assert_eq!(held.refresh.await??.0, StatusCode::OK);
    let (status, body) = held.waiting.await??;
    assert_eq!(status, StatusCode::OK, "{body}");
    held.gw.stop().await
}

#[tokio::test]
async fn a_call_waiting_for_the_tool_list_is_not_turned_away_by_list_requests() -> anyhow::Result<()>
{
    // The cap on callers waiting for a list is for list requests, which hold no place in
    // flight. A tool call that waits for the list after its lease holds one already: list
    // requests that fill the cap must not make it a 429 with one call in flight.
    let held = list_waiters_at_the_cap().await?;
    assert_eq!(held.refused.0, StatusCode::TOO_MANY_REQUESTS);
    let echo = json!({"method": "echo", "params": {"text": "x"}});
    let call = spawn_tool(&held.gw, &held.t, echo);
    // The call waits for the list rather than being answered now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if call.is_finished() {
        anyhow::bail!("answered while the list was held: {:?}", call.await?);
    }
    held.upstream.release_list();
    let (status, body) = call.await??;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(held.refresh.await??.0, StatusCode::OK);
    assert_eq!(held.waiting.await??.0, StatusCode::OK);
    held.gw.stop().await
}

#[tokio::test]
async fn calls_given_up_while_connecting_leave_their_place() -> anyhow::Result<()> {
    // An upstream that never answers `initialize`: calls wait for the connection, and
    // those whose requests time out (the gateway drops them) must not keep their places
    // in flight, or the tenant would refuse every call as busy with none in flight.
    let upstream = TestUpstream::start().await?;
    upstream.set_stalling(&["initialize"]);
    let mut config = Config::for_tests();
    config.tenant_max_in_flight = 2;
    config.upstream_connect_timeout = Duration::from_secs(8);
    config.request_timeout = Duration::from_millis(500);
    let gw = TestGateway::start_with(config).await?;
    let t = gw.create_tenant(tenant_on(&upstream.url, "tok")).await?;
    let echo = json!({"method": "echo", "params": {"text": "x"}});
    for _ in 0..3 {
        let (status, _, body) = gw.tool(&t, echo.clone()).await?;
        assert_ne!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert_ne!(status, StatusCode::OK, "{body}");
    }
    upstream.set_stalling(&[]);
    gw.stop().await
}

#[tokio::test]
async fn a_list_asked_while_the_tools_keep_changing_is_answered() -> anyhow::Result<()> {
    // Every list the upstream sends is stale by the time it arrives (its tools changed
    // meanwhile). Waiting for a list that is not stale would wait for ever: the caller
    // gets a list after a couple of tries, and the gateway has one load in flight at a time.
    let (upstream, gw, t, _) = connected_tenant().await?;
    upstream.set_tools_changed().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    upstream.hold_next_list();
    let mut list = spawn_tool(&gw, &t, json!({"method": "listTools"}));
    // Each list the gateway asks for is held until the tools changed again.
    let mut answered = None;
    for held in 1..=10 {
        tokio::select! {
            waited = upstream.wait_for_held_lists(held) => waited?,
            done = &mut list => {
                answered = Some(done);
                break;
            }
        }
        upstream.hold_next_list();
        upstream.set_tools_changed().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        upstream.release_list();
    }
    let (status, body) = answered.context("no list after ten changes")???;
    assert_eq!(status, StatusCode::OK, "{body}");
    gw.stop().await
}

#[tokio::test]
async fn changing_a_tenant_rebuilds_its_connection() -> anyhow::Result<()> {
    let first = TestUpstream::start().await?;
    let second = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let t = gw.create_tenant(tenant_on(&first.url, "tok-1")).await?;
    assert_eq!(
        gw.tool(&t, json!({"method": "whoami"})).await?.0,
        StatusCode::OK
    );
    let admin = format!("Bearer {}", gw.config.admin_api_key.expose());
    let (status, _, _) = gw
        .send(
            reqwest::Method::PATCH,
            &format!("/api/tenants/{}", t.id),
            &[("authorization", &admin)],
            Some(json!({"upstreamUrl": second.url, "integrationAppToken": "tok-2"})),
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    let (status, _, who) = gw.tool(&t, json!({"method": "whoami"})).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(who.to_string().contains("tok-2"), "{who}");
    assert_eq!(second.initializes(), 1);
    gw.stop().await
}

#[tokio::test]
async fn a_record_read_before_a_change_starts_no_stale_actor() -> anyhow::Result<()> {
    // A request authenticates (reading the tenant) just before an admin changes or deletes
    // the tenant, and asks for the actor just after. The actor it starts must be the
    // tenant's as it is now, and a deleted tenant's upstream must not be reached again.
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let kept = gw
        .create_tenant(tenant_on(&upstream.url, "tok-old"))
        .await?;
    let deleted = gw
        .create_tenant(tenant_on(&upstream.url, "tok-gone"))
        .await?;
    for t in [&kept, &deleted] {
        let (status, _, body) = gw.tool(t, json!({"method": "whoami"})).await?;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let store = switchboard::store::open(gw.config.database_url.as_deref(), 1).await?;
    let kept_before = store.get_tenant(&kept.id).await?.expect("kept tenant");
    let deleted_before = store
        .get_tenant(&deleted.id)
        .await?
        .expect("deleted tenant");

    let admin = format!("Bearer {}", gw.config.admin_api_key.expose());
    let headers = [("authorization", admin.as_str())];
    let patch = Some(json!({"integrationAppToken": "tok-new"}));
    let path = format!("/api/tenants/{}", kept.id);
    let (status, _, _) = gw
        .send(reqwest::Method::PATCH, &path, &headers, patch)
        .await?;
    assert_eq!(status, StatusCode::OK);
    let path = format!("/api/tenants/{}", deleted.id);
    let (status, _, _) = gw
        .send(reqwest::Method::DELETE, &path, &headers, None)
        .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Both actors stopped: the registry has heard of both changes.
    wait_for_no_actors(
        &gw,
        Duration::from_secs(5),
        "the changed actors did not stop",
    )
    .await;
    let connections = upstream.initializes();

    let refused = gw
        .tenants
        .call_tool(&deleted_before, "whoami", None, None)
        .await;
    assert!(
        matches!(refused, Err(CallError::Unavailable { .. })),
        "{refused:?}"
    );
    assert_eq!(
        gw.tenants.active_count(),
        0,
        "no actor for a deleted tenant"
    );
    assert_eq!(upstream.initializes(), connections);

    let who = gw
        .tenants
        .call_tool(&kept_before, "whoami", None, None)
        .await?;
    let who = serde_json::to_string(&who)?;
    assert!(
        who.contains("tok-new"),
        "the replaced token was used: {who}"
    );
    gw.stop().await
}

#[tokio::test]
async fn a_slow_read_of_a_changed_tenant_holds_up_no_other_tenants_start() -> anyhow::Result<()> {
    // After a change the registry reads the tenant again before it starts its actor; with
    // the store slow (here: its tenants table locked), another tenant's start goes on.
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.tenant_idle = Duration::from_millis(300);
    let gw = TestGateway::start_postgres(config).await?;
    let changed = gw.create_tenant(tenant_on(&upstream.url, "tok-a")).await?;
    let other = gw.create_tenant(tenant_on(&upstream.url, "tok-b")).await?;
    let url = gw
        .config
        .database_url
        .clone()
        .context("a PostgreSQL gateway")?;
    let store = switchboard::store::open(Some(&url), 1).await?;
    let changed_before = store.get_tenant(&changed.id).await?.context("changed")?;
    let other_record = store.get_tenant(&other.id).await?.context("other")?;
    // Each read again once since its creation (a change too); the other one's actor then
    // idles out, the changed one's stops for its change.
    for t in [&other, &changed] {
        let (status, _, body) = gw.tool(t, json!({"method": "whoami"})).await?;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let admin = format!("Bearer {}", gw.config.admin_api_key.expose());
    let path = format!("/api/tenants/{}", changed.id);
    let rename = Some(json!({"name": "renamed"}));
    let (status, _, _) = gw
        .send(
            reqwest::Method::PATCH,
            &path,
            &[("authorization", &admin)],
            rename,
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.tenants.active_count() > 0 {
        anyhow::ensure!(Instant::now() < deadline, "the tenants' actors ran on");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let locker = locking(&url, "tenants").await?;
    // Three calls of the changed tenant wait for one read of it, from about now.
    let started = Instant::now();
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let (tenants, record) = (gw.tenants.clone(), changed_before.clone());
            tokio::spawn(async move { tenants.call_tool(&record, "whoami", None, None).await })
        })
        .collect();
    wait_for_lock_waiter(&locker, "tenants").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reads: i64 = locker
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
             WHERE c.relname = 'tenants' AND NOT l.granted",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(reads, 1, "one read of the tenant for all its waiting calls");
    // Well within the read's 2 s bound from when it began, which the registry's mailbox
    // used to wait out (for each of the three calls' reads in turn).
    let bound = Duration::from_millis(1_500);
    let who = tokio::time::timeout_at(
        (started + bound).into(),
        gw.tenants.call_tool(&other_record, "whoami", None, None),
    )
    .await
    .context("the other tenant's start waited for the changed one's read")??;
    assert!(serde_json::to_string(&who)?.contains("tok-b"));
    let other_took = started.elapsed();
    locker.batch_execute("ROLLBACK").await?;
    // The changed tenant's own call: started from the read, or told to retry if the read
    // ran out of time.
    for call in slow {
        match call.await? {
            Ok(who) => assert!(serde_json::to_string(&who)?.contains("tok-a")),
            Err(err) => assert!(matches!(err, CallError::Unavailable { .. }), "{err:?}"),
        }
    }
    assert!(other_took < bound, "{other_took:?}");
    gw.stop().await
}

#[tokio::test]
async fn reference_server_everything_through_the_gateway() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    for (mode, path, transport) in [
        (EverythingMode::StreamableHttp, "/mcp", "streamable-http"),
        (EverythingMode::Sse, "/sse", "sse"),
    ] {
        let server = EverythingServer::start(mode).await?;
        let mut body = tenant_on(&server.url(path), "tok");
        body["upstreamTransport"] = json!(transport);
        let t = gw.create_tenant(body).await?;
        let (status, _, list) = gw.tool(&t, json!({"method": "listTools"})).await?;
        assert_eq!(status, StatusCode::OK, "{transport}: {list}");
        assert!(
            tool_names(&list).contains(&"echo".to_owned()),
            "{transport}: {list}"
        );
        let (status, _, echoed) = gw
            .tool(&t, json!({"method": "echo", "params": {"message": "hi"}}))
            .await?;
        assert_eq!(status, StatusCode::OK, "{transport}: {echoed}");
        assert!(
            echoed["content"][0]["text"]
                .as_str()
                .unwrap_or("")
                .contains("hi"),
            "{echoed}"
        );
    }
    gw.stop().await
}

/// Calls on a ready tenant take their lease without messaging its actor; they must still
/// keep its in-flight limit and its idle clock (and the rate limit: tests/ops.rs).
#[tokio::test]
async fn calls_on_a_ready_tenant_keep_its_in_flight_limit_and_idle_clock() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.tenant_max_in_flight = 2;
    config.tenant_idle = Duration::from_millis(400);
    let gw = TestGateway::start_with(config).await?;
    let t = gw.create_tenant(tenant_on(&upstream.url, "tok")).await?;
    let warm = gw.tool(&t, json!({"method": "echo", "params": {"text": "w"}}));
    assert_eq!(
        warm.await?.0,
        StatusCode::OK,
        "warm: connected, tools cached"
    );

    // Long enough that the third call surely comes while both are in flight, and longer
    // than the idle time: calls in flight keep the actor too.
    let slow = || gw.tool(&t, json!({"method": "sleep", "params": {"ms": 1000}}));
    let (a, b) = (slow(), slow());
    let third = async {
        upstream.wait_for_calls(3).await?; // the warm call and the two slow ones
        gw.tool(&t, json!({"method": "echo", "params": {"text": "x"}}))
            .await
    };
    let (a, b, third) = tokio::join!(a, b, third);
    assert_eq!(a?.0, StatusCode::OK);
    assert_eq!(b?.0, StatusCode::OK);
    let (status, headers, body) = third?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert!(headers.contains_key("retry-after"));

    // Calls through the lane keep the actor from going idle: twice the idle time of calls.
    let busy_until = Instant::now() + Duration::from_millis(800);
    while Instant::now() < busy_until {
        let echo = gw.tool(&t, json!({"method": "echo", "params": {"text": "y"}}));
        assert_eq!(echo.await?.0, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An actor stopped in between would have connected again for the next call.
    assert_eq!(upstream.initializes(), 1, "the actor stopped while in use");
    wait_for_no_actors(&gw, Duration::from_secs(5), "the idle actor did not stop").await;
    // The actor flushed its audit buffer as it stopped. The gateway refused the third call
    // itself; the upstream never saw it.
    let refused_id = headers["x-request-id"].to_str()?;
    let audit = tool_call_audit(&gw, &t).await?;
    let refused = audit["items"]
        .as_array()
        .and_then(|items| items.iter().find(|row| row["requestId"] == refused_id))
        .ok_or_else(|| anyhow::anyhow!("the refused call is not audited: {audit}"))?;
    assert_eq!(refused["outcome"], "rate_limited", "{refused}");
    gw.stop().await
}

#[tokio::test]
async fn calls_refused_as_busy_spend_none_of_the_tenants_rate_limit() -> anyhow::Result<()> {
    // One call in flight at most, a burst of three and one more a second. With a slow call
    // in flight, two more are refused as busy: they never reach the upstream, so the two
    // calls after the slow one are still within the burst. The limit gives a request back
    // every second; an attempt that took longer than that proves nothing and is made again.
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.tenant_max_in_flight = 1;
    let gw = TestGateway::start_with(config).await?;
    let mut body = tenant_on(&upstream.url, "tok");
    body["rateLimit"] = json!({"requestsPerSecond": 1, "burst": 3});
    let t = gw.create_tenant(body).await?;
    let echo = json!({"method": "echo", "params": {"text": "x"}});
    assert_eq!(gw.tool(&t, echo.clone()).await?.0, StatusCode::OK);
    for attempt in 1..=3 {
        // The burst whole again.
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        let calls_before = upstream.calls();
        let started = Instant::now();
        let slow = spawn_tool(&gw, &t, json!({"method": "sleep", "params": {"ms": 300}}));
        upstream.wait_for_calls(calls_before + 1).await?;
        let mut refused = Vec::new();
        for _ in 0..2 {
            refused.push(gw.tool(&t, echo.clone()).await?.0);
        }
        let (status, body) = slow.await??;
        assert_eq!(status, StatusCode::OK, "{body}");
        let mut after = Vec::new();
        for _ in 0..2 {
            after.push(gw.tool(&t, echo.clone()).await?.0);
        }
        if started.elapsed() >= Duration::from_millis(900) {
            eprintln!("attempt {attempt} took {:?}; again", started.elapsed());
            continue;
        }
        assert_eq!(refused, [StatusCode::TOO_MANY_REQUESTS; 2], "busy");
        assert_eq!(after, [StatusCode::OK; 2], "the busy calls spent the limit");
        return gw.stop().await;
    }
    anyhow::bail!("three attempts each took longer than the limit's second")
}

#[tokio::test]
async fn a_call_waiting_for_the_tool_list_as_its_tenant_changes_is_served_at_once(
) -> anyhow::Result<()> {
    // The first call of a tenant takes a lease (an in-flight permit) and then waits for the
    // tool list, which the upstream holds. The admin moves the tenant to another upstream
    // meanwhile: its actor stops, and a stopping actor no longer hears its own load finish.
    // The call must go to the new actor at once, not wait for the stop (which waits for the
    // call's permit) to run out of time and then get 503; and it must run on the new
    // actor's connection, with the new token, not on the old one, which is closing.
    let first = TestUpstream::start().await?;
    let second = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let t = gw.create_tenant(tenant_on(&first.url, "tok-1")).await?;
    first.hold_next_list();
    let call = spawn_tool(&gw, &t, json!({"method": "whoami"}));
    first.wait_for_held_lists(1).await?;
    let admin = format!("Bearer {}", gw.config.admin_api_key.expose());
    let started = Instant::now();
    let (status, _, _) = gw
        .send(
            reqwest::Method::PATCH,
            &format!("/api/tenants/{}", t.id),
            &[("authorization", &admin)],
            Some(json!({"upstreamUrl": second.url, "integrationAppToken": "tok-2"})),
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .context("the call never ended")???;
    let took = started.elapsed();
    first.release_list();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        took < gw.config.drain_timeout / 2,
        "the call waited {took:?} for the old actor's stop"
    );
    assert!(body.to_string().contains("tok-2"), "{body}");
    assert_eq!(first.calls(), 0, "the call ran on the old connection");
    gw.stop().await
}

/// The upstream comes back (stopped first, if it is not yet) with a `redeployed` tool and
/// no session left to be told of it: a change of its tools that nobody announces.
async fn redeploy_unannounced(upstream: &TestUpstream) -> anyhow::Result<()> {
    upstream.stop().await;
    upstream.set_tools(&["redeployed"]).await;
    upstream.restart().await
}

/// Lists the tenant's tools until the list has the redeployed upstream's tool (see
/// [`redeploy_unannounced`]); fails at `deadline`.
async fn lists_redeployed_by(
    gw: &TestGateway,
    t: &CreatedTenant,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        let (_, _, listed) = gw.tool(t, json!({"method": "listTools"})).await?;
        if tool_names(&listed).contains(&"redeployed".to_owned()) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the old session's list still serves: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_new_upstream_session_checks_the_cached_tool_list_again() -> anyhow::Result<()> {
    // The upstream goes away (a call fails on it, and the tenant drops the connection),
    // and comes back with other tools, with no session left to be told. The tenant
    // connects again on its next call: the list cached from the old session must not
    // serve for the rest of its TTL (5 minutes).
    let (upstream, gw, t, echo) = connected_tenant().await?;
    let (_, _, before) = gw.tool(&t, json!({"method": "listTools"})).await?;
    assert!(!tool_names(&before).contains(&"redeployed".to_owned()));
    upstream.stop().await;
    let (status, _, body) = gw.tool(&t, echo.clone()).await?;
    assert!(status.is_server_error(), "{status} {body}");
    redeploy_unannounced(&upstream).await?;
    // Calls until one reconnects (the first may still find the old session's end).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _) = gw.tool(&t, echo.clone()).await?;
        if status == StatusCode::OK {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no call served after the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lists_redeployed_by(&gw, &t, deadline).await?;
    gw.stop().await
}

/// A connected tenant whose tool list is cached and one of whose MCP sessions is open,
/// after its upstream was redeployed unannounced; what wakes on that session's
/// `list_changed`.
async fn redeployed_under_a_session() -> anyhow::Result<(
    TestUpstream,
    TestGateway,
    CreatedTenant,
    Value,
    common::mcp_client::McpClient,
    std::sync::Arc<tokio::sync::Notify>,
)> {
    let (upstream, gw, t, echo) = connected_tenant().await?;
    let (_, _, before) = gw.tool(&t, json!({"method": "listTools"})).await?;
    assert!(!tool_names(&before).contains(&"redeployed".to_owned()));
    let mcp = gw.url(&format!("/mcp/{}", t.id));
    let (session, heard) = common::mcp_client::connect(&mcp, &t.api_key).await?;
    redeploy_unannounced(&upstream).await?;
    Ok((upstream, gw, t, echo, session, heard))
}

#[tokio::test]
async fn a_refresh_that_finds_another_list_tells_the_tenants_mcp_sessions() -> anyhow::Result<()> {
    // The upstream's tools change and nobody is told (it restarted with no sessions). A
    // refresh finds the new list: the tenant's MCP sessions must hear of it, as they do of
    // a change the upstream announces.
    let (_upstream, gw, t, _, _session, heard) = redeployed_under_a_session().await?;
    let (status, _, refreshed) = gw.tool(&t, json!({"method": "refreshTools"})).await?;
    assert_eq!(status, StatusCode::OK, "{refreshed}");
    assert!(tool_names(&refreshed).contains(&"redeployed".to_owned()));
    tokio::time::timeout(Duration::from_secs(5), heard.notified())
        .await
        .context("the MCP session was not told of the new list")?;
    gw.stop().await
}

#[tokio::test]
async fn a_session_the_upstream_renewed_by_itself_checks_the_tool_list_again() -> anyhow::Result<()>
{
    // The upstream restarts between two calls, with other tools: it no longer knows the
    // tenant's session, and rmcp opens a new one inside the same connection when the next
    // call meets the 404. The list cached from the old session must not serve for the rest
    // of its TTL, and the tenant's MCP sessions hear of the change.
    let (_upstream, gw, t, echo, _session, heard) = redeployed_under_a_session().await?;
    let (status, _, body) = gw.tool(&t, echo).await?;
    assert_eq!(
        status,
        StatusCode::OK,
        "the call is served on a new session: {body}"
    );
    lists_redeployed_by(&gw, &t, Instant::now() + Duration::from_secs(10)).await?;
    tokio::time::timeout(Duration::from_secs(5), heard.notified())
        .await
        .context("the MCP session was not told of the new list")?;
    gw.stop().await
}
