//! Operations: rate limits (per tenant, per client address on the auth endpoints),
//! `/metrics`, security headers and the audit trail's optional fields.

mod common;

use std::time::{Duration, Instant};

use common::gateway::{CreatedTenant, TestGateway};
use common::mcp_client::RawMcp;
use common::upstream::TestUpstream;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use switchboard::config::{Config, Secret};

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn tenant_body(upstream: &TestUpstream, rate_limit: Option<(u32, u32)>) -> Value {
    let mut body = json!({
        "integrationKey": "ops",
        "integrationAppToken": "upstream-token-ops",
        "upstreamUrl": upstream.url,
    });
    if let Some((rps, burst)) = rate_limit {
        body["rateLimit"] = json!({ "requestsPerSecond": rps, "burst": burst });
    }
    body
}

async fn echo(
    gw: &TestGateway,
    tenant: &CreatedTenant,
) -> anyhow::Result<(StatusCode, reqwest::header::HeaderMap)> {
    let path = format!("/api/tenant/{}/tool", tenant.id);
    let auth = bearer(&tenant.token);
    let (status, headers, _) = gw
        .send(
            Method::POST,
            &path,
            &[("authorization", &auth)],
            Some(json!({"method": "echo", "params": {"text": "x"}})),
        )
        .await?;
    Ok((status, headers))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_over_its_limit_gets_429_while_another_is_served() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let (rps, burst) = (20u32, 10u32);
    let limited = gw
        .create_tenant(tenant_body(&upstream, Some((rps, burst))))
        .await?;
    let other = gw.create_tenant(tenant_body(&upstream, None)).await?;
    // Connect both upstreams first, so the run measures the limiter, not connection set-up.
    assert_eq!(echo(&gw, &other).await?.0, StatusCode::OK);
    let started = Instant::now();
    let run = Duration::from_secs(5);
    let workers = (0..8).map(|_| {
        let (gw, limited) = (&gw, &limited);
        async move {
            let (mut ok, mut refused, mut retry_after_seen) = (0u32, 0u32, true);
            while started.elapsed() < run {
                let (status, headers) = echo(gw, limited).await?;
                match status {
                    StatusCode::OK => ok += 1,
                    StatusCode::TOO_MANY_REQUESTS => {
                        refused += 1;
                        retry_after_seen &= headers.get("retry-after").is_some();
                    }
                    other => anyhow::bail!("unexpected {other}"),
                }
            }
            anyhow::Ok((ok, refused, retry_after_seen))
        }
    });
    let probe = async {
        // While the limited tenant is refused, the other one is served.
        tokio::time::sleep(Duration::from_secs(2)).await;
        echo(&gw, &other).await
    };
    let (results, probe) = tokio::join!(futures::future::join_all(workers), probe);
    let elapsed = started.elapsed().as_secs_f64();
    let (mut ok, mut refused) = (0, 0);
    for result in results {
        let (o, r, retry_after) = result?;
        assert!(retry_after, "every 429 carries Retry-After");
        ok += o;
        refused += r;
    }
    assert_eq!(probe?.0, StatusCode::OK, "the other tenant is served");
    let allowed = f64::from(rps) * elapsed + f64::from(burst);
    println!(
        "limited tenant: {ok} served, {refused} refused in {elapsed:.2}s; allowed {allowed:.0}"
    );
    assert!(refused > 0);
    assert!(
        (f64::from(ok) - allowed).abs() <= allowed * 0.10,
        "{ok} served vs {allowed:.0} allowed"
    );
    gw.stop().await
}

#[tokio::test]
async fn refreshing_the_tool_list_counts_against_the_tenant_limit() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let tenant = gw
        .create_tenant(tenant_body(&upstream, Some((1, 2))))
        .await?;
    let path = format!("/api/tenant/{}/tool", tenant.id);
    let auth = bearer(&tenant.token);
    let mut refused = 0;
    // Each refresh asks the upstream again: a burst of two, then one a second.
    for _ in 0..5 {
        let (status, headers, body) = gw
            .send(
                Method::POST,
                &path,
                &[("authorization", &auth)],
                Some(json!({"method": "refreshTools"})),
            )
            .await?;
        match status {
            StatusCode::OK => assert!(body["tools"].is_array(), "{body}"),
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                assert!(headers.get("retry-after").is_some());
                refused += 1;
            }
            other => anyhow::bail!("unexpected {other}: {body}"),
        }
    }
    assert!(refused >= 2, "{refused} of 5 refreshes refused");
    gw.stop().await
}

#[tokio::test]
async fn a_call_of_an_unknown_tool_spends_none_of_the_tenant_limit() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let tenant = gw
        .create_tenant(tenant_body(&upstream, Some((1, 2))))
        .await?;
    let call = |body: Value| gw.tool(&tenant, body);
    // A first list connects the tenant and caches its tools; a cached list spends nothing.
    let (status, _, list) = call(json!({"method": "listTools"})).await?;
    assert_eq!(status, StatusCode::OK, "{list}");
    // More unknown names than the burst: each is 404, none reaches the upstream or spends.
    for _ in 0..5 {
        let (status, _, body) = call(json!({"method": "no_such_tool"})).await?;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["error"]["code"], "unknown_tool");
    }
    // The whole burst of two is still there for real calls.
    for _ in 0..2 {
        let (status, _, body) = call(json!({"method": "echo", "params": {"text": "x"}})).await?;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(
        upstream.calls(),
        2,
        "only the known tool reached the upstream"
    );
    gw.stop().await
}

#[tokio::test]
async fn auth_endpoints_are_limited_per_client_address() -> anyhow::Result<()> {
    let mut config = Config::for_tests();
    config.auth_rate_limit = 1;
    config.auth_rate_burst = 3;
    config.trust_proxy = true;
    let gw = TestGateway::start_with(config.clone()).await?;
    let guess = |ip: &'static str| {
        let gw = &gw;
        async move {
            gw.send(
                Method::POST,
                "/api/auth/token",
                &[("x-forwarded-for", ip)],
                Some(json!({"key": "a-wrong-guess-of-the-admin-key"})),
            )
            .await
        }
    };
    for _ in 0..3 {
        assert_eq!(guess("198.51.100.1").await?.0, StatusCode::UNAUTHORIZED);
    }
    let (status, headers, body) = guess("198.51.100.1").await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(headers.get("retry-after").is_some());
    // What the client writes left of the proxy's entry does not make it someone else.
    assert_eq!(
        guess("203.0.113.77, 198.51.100.1").await?.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Behind a trusted proxy the address it forwarded is the key: another client is not
    // refused, whatever it claims before that.
    assert_eq!(guess("198.51.100.2").await?.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        guess("198.51.100.1, 198.51.100.3").await?.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, _, _) = gw
        .send(
            Method::POST,
            "/api/auth/tenant-token",
            &[("x-forwarded-for", "198.51.100.1")],
            None,
        )
        .await?;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "both endpoints share the limit"
    );
    gw.stop().await?;

    // Without TRUST_PROXY the header is ignored: the socket address is the key.
    config.trust_proxy = false;
    let gw = TestGateway::start_with(config).await?;
    for ip in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        let (status, _, _) = gw
            .send(
                Method::POST,
                "/api/auth/token",
                &[("x-forwarded-for", ip)],
                Some(json!({"key": "wrong-guess-0123456789"})),
            )
            .await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, _, _) = gw
        .send(
            Method::POST,
            "/api/auth/token",
            &[("x-forwarded-for", "198.51.100.9")],
            Some(json!({"key": "wrong-guess-0123456789"})),
        )
        .await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    gw.stop().await
}

#[tokio::test]
async fn admin_key_guesses_on_admin_routes_are_limited_per_client_address() -> anyhow::Result<()> {
    let mut config = Config::for_tests();
    config.auth_rate_limit = 1;
    config.auth_rate_burst = 3;
    config.trust_proxy = true;
    let gw = TestGateway::start_with(config).await?;
    let admin_key = gw.config.admin_api_key.expose().to_owned();
    let list = |ip: &'static str, key: String| {
        let gw = &gw;
        async move {
            let bearer = format!("Bearer {key}");
            let headers = [("x-forwarded-for", ip), ("authorization", bearer.as_str())];
            gw.send(Method::GET, "/api/tenants", &headers, None).await
        }
    };
    let guess = || "a-wrong-guess-of-the-admin-key".to_owned();
    // Right keys spend nothing.
    for _ in 0..5 {
        assert_eq!(
            list("198.51.100.1", admin_key.clone()).await?.0,
            StatusCode::OK
        );
    }
    for _ in 0..3 {
        assert_eq!(
            list("198.51.100.1", guess()).await?.0,
            StatusCode::UNAUTHORIZED
        );
    }
    let (status, headers, body) = list("198.51.100.1", guess()).await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(headers.get("retry-after").is_some());
    // Out of budget, a right guess is refused too: it would tell the guesser it was right.
    assert_eq!(
        list("198.51.100.1", admin_key.clone()).await?.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another address is not.
    assert_eq!(
        list("198.51.100.2", admin_key.clone()).await?.0,
        StatusCode::OK
    );
    // The budget refills at AUTH_RATE_LIMIT per second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(list("198.51.100.1", admin_key).await?.0, StatusCode::OK);
    gw.stop().await
}

#[tokio::test]
async fn refused_tenant_credentials_spend_the_callers_auth_budget() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.auth_rate_limit = 1;
    config.auth_rate_burst = 4;
    let gw = TestGateway::start_with(config).await?;
    // A tenant whose key nobody has used yet, so the credential cache does not hold it
    // (created before the address runs out of budget: an admin route refuses it then).
    let (unused_id, unused_api_key) = gw.register_tenant(tenant_body(&upstream, None)).await?;
    let unused_path = format!("/api/tenant/{unused_id}/tool");
    let unused_key = [("x-api-key", unused_api_key.as_str())];
    // Creating the tenant asks /api/auth/tenant-token once: three requests are left.
    let tenant = gw.create_tenant(tenant_body(&upstream, None)).await?;
    let path = format!("/api/tenant/{}/tool", tenant.id);
    let wrong = "sbk_not-the-key-of-this-tenant";
    let wrong_key = [("x-api-key", wrong)];
    let refused = || {
        gw.send(
            Method::POST,
            &path,
            &wrong_key,
            Some(json!({"method": "listTools"})),
        )
    };
    for _ in 0..3 {
        assert_eq!(refused().await?.0, StatusCode::UNAUTHORIZED);
    }
    // Past the budget: 429, and nothing more is written to the audit trail.
    let (status, headers, body) = refused().await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(headers.get("retry-after").is_some());
    // The MCP endpoint spends from the same budget.
    let (status, _, _) = gw
        .send(
            Method::POST,
            &format!("/mcp/{}", tenant.id),
            &[("authorization", &bearer(wrong))],
            Some(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})),
        )
        .await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // A valid credential spends nothing, and is served.
    assert_eq!(echo(&gw, &tenant).await?.0, StatusCode::OK);
    // Past the budget, a key is looked up in the credential cache only, not in the store,
    // so guessing cannot make the database work: one the cache lacks is refused...
    let list = json!({"method": "listTools"});
    let (status, _, body) = gw
        .send(Method::POST, &unused_path, &unused_key, Some(list.clone()))
        .await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    // ...until the budget refills (AUTH_RATE_LIMIT per second).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, body) = gw
        .send(Method::POST, &unused_path, &unused_key, Some(list))
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Read now the address is no longer blocked (an admin route refuses it while it is).
    assert_eq!(
        gw.wait_for_audit(&tenant.id, "auth.refused", 3)
            .await?
            .len(),
        3
    );
    gw.stop().await
}

async fn scrape(gw: &TestGateway, token: Option<&str>) -> anyhow::Result<(StatusCode, String)> {
    let mut req = gw.http.get(gw.url("/metrics"));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await?;
    Ok((resp.status(), resp.text().await?))
}

/// Every sample line is `name{labels} value`, and the parser reads the whole text.
fn parse_strict(text: &str) -> anyhow::Result<prometheus_parse::Scrape> {
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| anyhow::anyhow!("bad line {line}"))?;
        anyhow::ensure!(
            value.parse::<f64>().is_ok() || value == "+Inf",
            "bad value: {line}"
        );
        let name = series.split('{').next().unwrap_or("");
        anyhow::ensure!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "bad name: {line}"
        );
        anyhow::ensure!(
            series.contains('{') == series.ends_with('}'),
            "bad labels: {line}"
        );
    }
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
    // The parser skips lines it cannot read: it must have read every sample line.
    let lines = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    let read: usize = scrape
        .samples
        .iter()
        .map(|s| match &s.value {
            prometheus_parse::Value::Histogram(b) => b.len(),
            prometheus_parse::Value::Summary(q) => q.len(),
            _ => 1,
        })
        .sum();
    anyhow::ensure!(read == lines, "parser read {read} of {lines} sample lines");
    Ok(scrape)
}

fn counter(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test]
async fn metrics_parse_move_with_calls_and_need_the_token() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.metrics_token = Some(Secret::new("metrics-token-0123456789"));
    let gw = TestGateway::start_with(config).await?;
    assert_eq!(scrape(&gw, None).await?.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        scrape(&gw, Some("wrong")).await?.0,
        StatusCode::UNAUTHORIZED
    );
    let tenant = gw
        .create_tenant(tenant_body(&upstream, Some((1, 3))))
        .await?;
    let (status, before) = scrape(&gw, Some("metrics-token-0123456789")).await?;
    assert_eq!(status, StatusCode::OK);
    let before = parse_strict(&before)?;
    let ok = [
        ("tenant", tenant.id.as_str()),
        ("tool", "echo"),
        ("outcome", "ok"),
    ];
    assert_eq!(counter(&before, "switchboard_tool_calls_total", &ok), 0.0);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(echo(&gw, &tenant).await?.0);
    }
    let served = statuses.iter().filter(|s| **s == StatusCode::OK).count() as f64;
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count() as f64;
    assert!(served >= 3.0 && refused >= 1.0, "{statuses:?}");
    // Refused as unknown (checked against the cached list before the limit, which it
    // does not spend): the caller's text gets no series of its own.
    let made_up = json!({"method": "made-up-tool-7f3a", "params": {}});
    let (status, _, _) = gw.tool(&tenant, made_up).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, after) = scrape(&gw, Some("metrics-token-0123456789")).await?;
    assert!(
        !after.contains("made-up-tool-7f3a"),
        "a series for a made-up tool"
    );
    let after = parse_strict(&after)?;
    assert_eq!(counter(&after, "switchboard_tool_calls_total", &ok), served);
    // Refused for the limit by the ready tenant's lane, which checked the name first: the
    // tool's own label.
    let limited = [
        ("tenant", tenant.id.as_str()),
        ("tool", "echo"),
        ("outcome", "rate_limited"),
    ];
    assert_eq!(
        counter(&after, "switchboard_tool_calls_total", &limited),
        refused
    );
    let unknown = [
        ("tenant", tenant.id.as_str()),
        ("tool", "other"),
        ("outcome", "refused"),
    ];
    assert_eq!(
        counter(&after, "switchboard_tool_calls_total", &unknown),
        1.0
    );
    let route = [("route", "/api/tenant/:tenantId/tool"), ("status", "200")];
    let moved = counter(&after, "switchboard_http_requests_total", &route)
        - counter(&before, "switchboard_http_requests_total", &route);
    assert!(moved >= served, "http requests moved by {moved}");
    assert!(
        counter(
            &after,
            "switchboard_rate_limited_total",
            &[("scope", "tenant")]
        ) >= refused
    );
    for name in [
        "switchboard_http_request_duration_seconds",
        "switchboard_upstream_duration_seconds",
        "switchboard_active_tenants",
        "switchboard_actor_starts_total",
        "switchboard_audit_pending",
    ] {
        assert!(
            after.samples.iter().any(|s| s.metric.starts_with(name)),
            "{name} missing"
        );
    }
    assert!(
        after
            .samples
            .iter()
            .all(|s| !s.labels.values().any(|v| v.contains("/api/tenant/tenant-"))),
        "raw paths never become labels"
    );
    gw.stop().await
}

/// The MCP sessions gauge follows sessions opened and ended, and a tenant's 429 to an
/// `initialize` (its rate limit) counts among the rate-limited refusals as a tool call's
/// does. (Other tests in this process may refuse calls meanwhile, none opens a session.)
#[tokio::test]
async fn mcp_sessions_and_a_tenants_refused_initialize_are_in_the_metrics() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let tenant = gw
        .create_tenant(tenant_body(&upstream, Some((1, 2))))
        .await?;
    let mcp = RawMcp::new(
        &gw.http,
        &gw.url(&format!("/mcp/{}", tenant.id)),
        &tenant.api_key,
    );
    let metrics = || async { parse_strict(&scrape(&gw, None).await?.1) };
    let sessions =
        |scrape: &prometheus_parse::Scrape| counter(scrape, "switchboard_mcp_sessions", &[]);
    let limited = |scrape: &prometheus_parse::Scrape| {
        counter(
            scrape,
            "switchboard_rate_limited_total",
            &[("scope", "tenant")],
        )
    };
    let before = metrics().await?;
    // Past the burst of two, within the five tries, whatever refills meanwhile.
    let (mut opened, mut refused) = (Vec::new(), 0);
    for _ in 0..5 {
        match mcp.open_session().await? {
            Ok(id) => opened.push(id),
            Err(body) => {
                assert_eq!(body["error"]["code"], "rate_limited", "{body}");
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "no initialize was refused");
    let open = metrics().await?;
    assert_eq!(
        sessions(&open) - sessions(&before),
        opened.len() as f64,
        "sessions open"
    );
    assert!(limited(&open) - limited(&before) >= f64::from(refused));
    for id in &opened {
        assert!(mcp.close_session(id).await?.is_success());
    }
    let ended = metrics().await?;
    assert_eq!(sessions(&ended), sessions(&before), "sessions ended");
    gw.stop().await
}

/// A call its request's timeout cut off is counted in the tool-call metrics as it is in
/// the audit trail (`timeout`), under the tool label `other`: it never returned to the
/// tenant runtime, which counts the calls that do.
#[tokio::test]
async fn a_call_cut_off_by_the_request_timeout_is_counted() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.request_timeout = Duration::from_millis(500);
    let gw = TestGateway::start_with(config).await?;
    let tenant = gw.create_tenant(tenant_body(&upstream, None)).await?;
    assert_eq!(echo(&gw, &tenant).await?.0, StatusCode::OK);
    let cut_off = [
        ("tenant", tenant.id.as_str()),
        ("tool", "other"),
        ("outcome", "timeout"),
    ];
    let before = parse_strict(&scrape(&gw, None).await?.1)?;
    let (status, _, body) = gw
        .tool(&tenant, json!({"method": "sleep", "params": {"ms": 2_000}}))
        .await?;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    let after = parse_strict(&scrape(&gw, None).await?.1)?;
    assert_eq!(
        counter(&after, "switchboard_tool_calls_total", &cut_off)
            - counter(&before, "switchboard_tool_calls_total", &cut_off),
        1.0
    );
    gw.stop().await
}

/// Tenants by the state of their upstream connection: a failing one is there for an
/// alert to find, beside the ready ones. (The gauge is set at each scrape, by whichever
/// gateway of this process was scraped last: read until this one's numbers show.)
#[tokio::test]
async fn tenants_upstream_states_are_in_the_metrics() -> anyhow::Result<()> {
    use switchboard::tenants::status::ConnectionState;
    let (upstream, gone) = (TestUpstream::start().await?, TestUpstream::start().await?);
    let gw = TestGateway::start().await?;
    let ready = gw.create_tenant(tenant_body(&upstream, None)).await?;
    let failing = gw.create_tenant(tenant_body(&gone, None)).await?;
    assert_eq!(echo(&gw, &ready).await?.0, StatusCode::OK);
    assert_eq!(echo(&gw, &failing).await?.0, StatusCode::OK);
    gone.stop().await;
    for _ in 0..30 {
        if gw.tenants.status(&failing.id).await.state == ConnectionState::Failing {
            break;
        }
        echo(&gw, &failing).await?;
    }
    let state = |scrape: &prometheus_parse::Scrape, state: &str| {
        counter(scrape, "switchboard_tenant_upstreams", &[("state", state)])
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let scrape = parse_strict(&scrape(&gw, None).await?.1)?;
        if state(&scrape, "failing") == 1.0 && state(&scrape, "ready") == 1.0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "failing {}, ready {}",
            state(&scrape, "failing"),
            state(&scrape, "ready")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.stop().await
}

/// Guesses at `METRICS_TOKEN` spend from the caller's address budget as guesses at the admin
/// key do: past it, 429 with `Retry-After`, a right token included (it would tell the
/// guesser it was right), while another address scrapes on.
#[tokio::test]
async fn metrics_token_guesses_are_limited_per_client_address() -> anyhow::Result<()> {
    let mut config = Config::for_tests();
    config.auth_rate_limit = 1;
    config.auth_rate_burst = 3;
    config.trust_proxy = true;
    config.metrics_token = Some(Secret::new("metrics-token-0123456789"));
    let gw = TestGateway::start_with(config).await?;
    let scrape_from = |ip: &'static str, token: &'static str| {
        let gw = &gw;
        async move {
            let resp = gw
                .http
                .get(gw.url("/metrics"))
                .header("x-forwarded-for", ip)
                .bearer_auth(token)
                .send()
                .await?;
            let status = resp.status();
            let retry_after = resp.headers().get("retry-after").cloned();
            anyhow::Ok((status, retry_after, resp.text().await?))
        }
    };
    let right = "metrics-token-0123456789";
    // Right tokens spend nothing.
    for _ in 0..5 {
        assert_eq!(scrape_from("198.51.100.1", right).await?.0, StatusCode::OK);
    }
    for _ in 0..3 {
        let (status, _, _) = scrape_from("198.51.100.1", "a-wrong-guess").await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, retry_after, body) = scrape_from("198.51.100.1", "a-wrong-guess").await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(retry_after.is_some());
    let body: Value = serde_json::from_str(&body)?;
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(
        scrape_from("198.51.100.1", right).await?.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(scrape_from("198.51.100.2", right).await?.0, StatusCode::OK);
    gw.stop().await
}

#[tokio::test]
async fn hsts_only_behind_a_trusted_tls_proxy() -> anyhow::Result<()> {
    let mut config = Config::for_tests();
    let gw = TestGateway::start_with(config.clone()).await?;
    let headers = [("x-forwarded-proto", "https")];
    let (_, h, _) = gw.send(Method::GET, "/health", &headers, None).await?;
    assert!(
        h.get("strict-transport-security").is_none(),
        "untrusted header ignored"
    );
    assert_eq!(h["x-content-type-options"], "nosniff");
    gw.stop().await?;
    config.trust_proxy = true;
    let gw = TestGateway::start_with(config).await?;
    let (_, h, _) = gw.send(Method::GET, "/health", &headers, None).await?;
    assert!(h["strict-transport-security"]
        .to_str()?
        .starts_with("max-age="));
    let (_, h, _) = gw.send(Method::GET, "/health", &[], None).await?;
    assert!(
        h.get("strict-transport-security").is_none(),
        "plain HTTP gets none"
    );
    gw.stop().await
}

#[tokio::test]
async fn cors_lets_an_allowed_origin_send_and_read_the_contract_headers() -> anyhow::Result<()> {
    let mut config = Config::for_tests();
    config.cors_origins = vec!["http://app.test".to_owned()];
    let gw = TestGateway::start_with(config).await?;
    let list = |headers: &reqwest::header::HeaderMap, name: &str| -> String {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    // A PATCH that names the version it changes (If-Match) passes the preflight.
    let preflight = [
        ("origin", "http://app.test"),
        ("access-control-request-method", "PATCH"),
        (
            "access-control-request-headers",
            "authorization, content-type, if-match",
        ),
    ];
    let (status, h, _) = gw
        .send(Method::OPTIONS, "/api/tenants/tenant-x", &preflight, None)
        .await?;
    assert!(status.is_success(), "preflight: {status}");
    assert!(
        list(&h, "access-control-allow-headers").contains("if-match"),
        "{h:?}"
    );
    // A refusal's Retry-After and WWW-Authenticate are readable by the page.
    let (status, h, _) = gw
        .send(
            Method::GET,
            "/api/tenants",
            &[("origin", "http://app.test")],
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(list(&h, "access-control-allow-origin"), "http://app.test");
    let exposed = list(&h, "access-control-expose-headers");
    for name in ["x-request-id", "retry-after", "www-authenticate"] {
        assert!(exposed.contains(name), "{name} not exposed: {exposed}");
    }
    // Another origin is not let in.
    let (_, h, _) = gw
        .send(
            Method::GET,
            "/api/tenants",
            &[("origin", "http://other.test")],
            None,
        )
        .await?;
    assert!(h.get("access-control-allow-origin").is_none(), "{h:?}");
    gw.stop().await
}

#[tokio::test]
async fn audit_records_refusals_and_arguments_only_when_asked() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    for with_arguments in [false, true] {
        let mut config = Config::for_tests();
        config.audit_arguments = with_arguments;
        let gw = TestGateway::start_with(config).await?;
        let tenant = gw.create_tenant(tenant_body(&upstream, None)).await?;
        let other = gw.create_tenant(tenant_body(&upstream, None)).await?;
        // Another tenant's token on this tenant's route: refused, audited under this tenant.
        let path = format!("/api/tenant/{}/tool", tenant.id);
        let wrong = bearer(&other.token);
        let (status, _, _) = gw
            .send(
                Method::POST,
                &path,
                &[("authorization", &wrong)],
                Some(json!({"method": "listTools"})),
            )
            .await?;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let refused = gw.wait_for_audit(&tenant.id, "auth.refused", 1).await?;
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(echo(&gw, &tenant).await?.0, StatusCode::OK);
        let gw = gw.restart().await?;
        let calls = gw.audit_items(&tenant.id, Some("tool.call")).await?;
        assert_eq!(calls.len(), 1, "{calls:?}");
        let expected = if with_arguments {
            json!({"text": "x"})
        } else {
            Value::Null
        };
        assert_eq!(calls[0]["detail"]["arguments"], expected, "{calls:?}");
        gw.stop().await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_tool_calls_sizes_are_audited_also_for_a_chunked_body() -> anyhow::Result<()> {
    // A client that streams its body sends no Content-Length: the size is what was read.
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let tenant = gw.create_tenant(tenant_body(&upstream, None)).await?;
    let body = r#"{"method":"echo","params":{"text":"in two chunks"}}"#;
    let (first, second) = body.split_at(20);
    let chunks: Vec<Result<&'static str, std::io::Error>> = vec![Ok(first), Ok(second)];
    let resp = gw
        .http
        .post(gw.url(&format!("/api/tenant/{}/tool", tenant.id)))
        .header("x-api-key", &tenant.api_key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let answer = resp.bytes().await?;
    let gw = gw.restart().await?;
    let calls = gw.audit_items(&tenant.id, Some("tool.call")).await?;
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["requestBytes"], json!(body.len()), "{calls:?}");
    assert_eq!(calls[0]["responseBytes"], json!(answer.len()), "{calls:?}");
    gw.stop().await
}

#[tokio::test]
async fn a_rest_call_whose_caller_went_away_is_still_audited() -> anyhow::Result<()> {
    // The caller gives up while the tool runs: the upstream is told the call was cancelled,
    // and the call, which may have done its work there, is on the tenant's audit trail.
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let tenant = gw.create_tenant(tenant_body(&upstream, None)).await?;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()?;
    let gave_up = impatient
        .post(gw.url(&format!("/api/tenant/{}/tool", tenant.id)))
        .header("x-api-key", &tenant.api_key)
        .header("x-request-id", "gave-up-1")
        .json(&json!({"method": "sleep", "params": {"ms": 1500}}))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client was to time out first");
    upstream.wait_for_cancellations(1).await?;
    let path = format!("/api/tenant/{}/audit?action=tool.call", tenant.id);
    let headers = [("x-api-key", tenant.api_key.as_str())];
    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        let (status, _, audit) = gw.send(Method::GET, &path, &headers, None).await?;
        assert_eq!(status, StatusCode::OK, "{audit}");
        if let Some(row) = audit["items"].as_array().and_then(|items| items.first()) {
            break row.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the abandoned call was not audited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(row["requestId"], "gave-up-1", "{row}");
    assert_eq!(row["tool"], "sleep", "{row}");
    assert_eq!(row["outcome"], "upstream_error", "{row}");
    gw.stop().await
}

/// `switchboard healthcheck` (Docker's HEALTHCHECK) as a container runs it: 0 while the
/// gateway on its port is alive, 1 where nothing answers. It probes liveness, which never
/// asks the database.
#[tokio::test]
async fn the_healthcheck_command_probes_the_gateways_liveness() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let refusing = switchboard::config::refusing_loopback();
    // A proxy set for the upstreams' egress, which cannot reach the container's loopback.
    let proxy = format!("http://{refusing}");
    let check = move |port: u16, proxied: bool| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"));
        command
            .args([
                "--host",
                "0.0.0.0",
                "--port",
                &port.to_string(),
                "healthcheck",
            ])
            .env_clear();
        if proxied {
            for name in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
                command.env(name, &proxy);
            }
        }
        command.status()
    };
    let port = gw.addr.port();
    for proxied in [false, true] {
        let check = check.clone();
        let alive = tokio::task::spawn_blocking(move || check(port, proxied));
        assert_eq!(
            alive.await??.code(),
            Some(0),
            "a live gateway is healthy (proxy in the environment: {proxied})"
        );
    }
    let gone = tokio::task::spawn_blocking(move || check(refusing.port(), false)).await??;
    assert_eq!(gone.code(), Some(1), "nothing answering is unhealthy");
    gw.stop().await
}
