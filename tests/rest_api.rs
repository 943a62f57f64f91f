//! The REST contract of API.md, end to end against the real service on port 0: every
//! endpoint's success, and each error row that applies, with the contract's error body.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::gateway::TestGateway;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use switchboard::config::Config;

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn tenant_body() -> Value {
    json!({"name": "Acme", "integrationKey": "hubspot", "integrationAppToken": "ia-token-acme"})
}

/// Asserts the contract's error body and the `x-request-id` header that matches it.
fn assert_error(
    got: &(StatusCode, reqwest::header::HeaderMap, Value),
    status: StatusCode,
    code: &str,
) {
    let (s, headers, body) = got;
    assert_eq!(*s, status, "body: {body}");
    assert_eq!(body["error"]["code"], code, "body: {body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    let rid = headers["x-request-id"].to_str().unwrap();
    assert_eq!(body["error"]["requestId"], rid);
}

/// Asserts `Cache-Control: no-store`, which every `/api/*` answer carries.
fn assert_no_store(headers: &reqwest::header::HeaderMap) {
    assert_eq!(
        headers.get("cache-control").map(|v| v.as_bytes()),
        Some(&b"no-store"[..]),
        "{headers:?}"
    );
}

/// Asserts that an answer carrying a secret (a key, a token) is marked for no cache to keep,
/// HTTP/1.0 caches included.
fn assert_not_stored(headers: &reqwest::header::HeaderMap) {
    assert_no_store(headers);
    assert_eq!(
        headers.get("pragma").map(|v| v.as_bytes()),
        Some(&b"no-cache"[..]),
        "{headers:?}"
    );
}

async fn curl_flow(gw: &TestGateway) -> anyhow::Result<common::gateway::CreatedTenant> {
    let (status, headers, token) = gw.admin_token_answer().await?;
    assert_eq!(status, StatusCode::OK, "{token}");
    assert_not_stored(&headers);
    let admin_jwt = token["token"].as_str().unwrap().to_owned();
    let (status, headers, created) = gw
        .send(
            Method::POST,
            "/api/tenants",
            &[("authorization", &bearer(&admin_jwt))],
            Some(tenant_body()),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_not_stored(&headers);
    let id = created["tenantId"].as_str().unwrap().to_owned();
    assert!(id.starts_with("tenant-"));
    assert_eq!(created["name"], "Acme");
    assert_eq!(created["integrationKey"], "hubspot");
    assert!(created["createdAt"].is_string());
    assert!(created.get("integrationAppToken").is_none());
    let api_key = created["apiKey"].as_str().unwrap().to_owned();
    let (status, headers, token) = gw
        .send(
            Method::POST,
            "/api/auth/tenant-token",
            &[("x-api-key", &api_key)],
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_not_stored(&headers);
    assert_eq!(token["tenantId"], id.as_str());
    assert_eq!(token["expiresIn"], 3600);
    Ok(common::gateway::CreatedTenant {
        id,
        api_key,
        token: token["token"].as_str().unwrap().to_owned(),
    })
}

/// The seed's flow, then a restart on the same store: the tenant and its key survive.
async fn flow_survives_restart(first: TestGateway) -> anyhow::Result<()> {
    let tenant = curl_flow(&first).await?;
    let second = first.restart().await?;
    let (status, _, body) = second
        .send_as_admin(Method::GET, &format!("/api/tenants/{}", tenant.id), None)
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tenantId"], tenant.id.as_str());
    second.tenant_token(&tenant.api_key).await?;
    // The JWT issued before the restart is still good (same secret, same key).
    let (status, _, _) = second
        .send(
            Method::GET,
            &format!("/api/tenant/{}/audit", tenant.id),
            &[("authorization", &bearer(&tenant.token))],
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    second.stop().await
}

#[tokio::test]
async fn curl_flow_and_restart_on_the_embedded_store() -> anyhow::Result<()> {
    flow_survives_restart(TestGateway::start().await?).await
}

#[tokio::test]
async fn curl_flow_and_restart_on_postgres() -> anyhow::Result<()> {
    let gw = TestGateway::start_postgres(Config::for_tests()).await?;
    flow_survives_restart(gw).await
}

#[tokio::test]
async fn admin_key_and_admin_jwt_both_work_and_others_do_not() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let key = bearer(gw.config.admin_api_key.expose());
    let jwt = bearer(&gw.admin_token().await?);
    for auth in [&key, &jwt] {
        let (status, _, _) = gw
            .send(
                Method::GET,
                "/api/tenants",
                &[("authorization", auth)],
                None,
            )
            .await?;
        assert_eq!(status, StatusCode::OK);
    }
    let none = gw.send(Method::GET, "/api/tenants", &[], None).await?;
    assert_error(&none, StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(none.1["www-authenticate"], "Bearer");
    let wrong = gw
        .send(
            Method::GET,
            "/api/tenants",
            &[("authorization", "Bearer not-the-key")],
            None,
        )
        .await?;
    assert_error(&wrong, StatusCode::UNAUTHORIZED, "unauthorized");
    let bad_key = gw
        .send(
            Method::POST,
            "/api/auth/token",
            &[],
            Some(json!({"key": "nope"})),
        )
        .await?;
    assert_error(&bad_key, StatusCode::UNAUTHORIZED, "unauthorized");
    // A tenant JWT is not an admin credential.
    let tenant = gw.create_tenant(tenant_body()).await?;
    let as_tenant = gw
        .send(
            Method::GET,
            "/api/tenants",
            &[("authorization", &bearer(&tenant.token))],
            None,
        )
        .await?;
    assert_error(&as_tenant, StatusCode::UNAUTHORIZED, "unauthorized");
    gw.stop().await
}

fn sign(claims: Value, secret: &str, alg: jsonwebtoken::Algorithm) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn now() -> u64 {
    switchboard::auth::jwt::now_secs()
}

#[tokio::test]
async fn bad_tenant_jwts_are_401() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let tenant = gw.create_tenant(tenant_body()).await?;
    let secret = gw.config.jwt_secret.expose().to_owned();
    let path = format!("/api/tenant/{}/audit", tenant.id);
    let kid = switchboard::auth::keys::key_generation(&switchboard::auth::keys::hash_api_key(
        &tenant.api_key,
    ));
    let claims = |exp: u64, aud: &str, role: &str| {
        json!({"sub": tenant.id, "tid": tenant.id, "role": role, "kid": kid, "iat": now() - 10,
               "exp": exp, "iss": "switchboard", "aud": aud, "jti": "t"})
    };
    let good = sign(
        claims(now() + 600, "switchboard", "tenant"),
        &secret,
        jsonwebtoken::Algorithm::HS256,
    );
    let ok = gw
        .send(
            Method::GET,
            &path,
            &[("authorization", &bearer(&good))],
            None,
        )
        .await?;
    assert_eq!(ok.0, StatusCode::OK, "a well-formed token passes: {}", ok.2);
    let header = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let alg_none = format!(
        "{}.{}.",
        header(json!({"alg": "none", "typ": "JWT"})),
        header(claims(now() + 600, "switchboard", "tenant"))
    );
    let cases = [
        (
            "expired",
            sign(
                claims(now() - 3600, "switchboard", "tenant"),
                &secret,
                jsonwebtoken::Algorithm::HS256,
            ),
        ),
        (
            "other secret",
            sign(
                claims(now() + 600, "switchboard", "tenant"),
                "another-secret-another-secret-xx",
                jsonwebtoken::Algorithm::HS256,
            ),
        ),
        ("alg none", alg_none),
        (
            "wrong aud",
            sign(
                claims(now() + 600, "elsewhere", "tenant"),
                &secret,
                jsonwebtoken::Algorithm::HS256,
            ),
        ),
        (
            "HS512",
            sign(
                claims(now() + 600, "switchboard", "tenant"),
                &secret,
                jsonwebtoken::Algorithm::HS512,
            ),
        ),
        ("admin role", gw.admin_token().await?),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (name, token) in cases {
        let got = gw
            .send(
                Method::GET,
                &path,
                &[("authorization", &bearer(&token))],
                None,
            )
            .await?;
        assert_eq!(got.0, StatusCode::UNAUTHORIZED, "{name}");
        assert_error(&got, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    gw.stop().await
}

#[tokio::test]
async fn a_tenants_credentials_do_not_open_another_tenant() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let a = gw.create_tenant(tenant_body()).await?;
    let b = gw.create_tenant(tenant_body()).await?;
    let b_path = format!("/api/tenant/{}/audit", b.id);
    let by_key = gw
        .send(Method::GET, &b_path, &[("x-api-key", &a.api_key)], None)
        .await?;
    assert_error(&by_key, StatusCode::FORBIDDEN, "forbidden");
    let by_jwt = gw
        .send(
            Method::GET,
            &b_path,
            &[("authorization", &bearer(&a.token))],
            None,
        )
        .await?;
    assert_error(&by_jwt, StatusCode::FORBIDDEN, "forbidden");
    // Both credentials must agree when both are sent.
    let mixed = gw
        .send(
            Method::GET,
            &b_path,
            &[
                ("authorization", &bearer(&b.token)),
                ("x-api-key", &a.api_key),
            ],
            None,
        )
        .await?;
    assert_error(&mixed, StatusCode::FORBIDDEN, "forbidden");
    let both = gw
        .send(
            Method::GET,
            &b_path,
            &[
                ("authorization", &bearer(&b.token)),
                ("x-api-key", &b.api_key),
            ],
            None,
        )
        .await?;
    assert_eq!(both.0, StatusCode::OK);
    let unknown_key = gw
        .send(
            Method::GET,
            &b_path,
            &[("x-api-key", "sbk_not-a-real-key")],
            None,
        )
        .await?;
    assert_error(&unknown_key, StatusCode::UNAUTHORIZED, "unauthorized");
    let none = gw.send(Method::GET, &b_path, &[], None).await?;
    assert_error(&none, StatusCode::UNAUTHORIZED, "unauthorized");
    // A JWT retired with its tenant's key is no valid credential of another tenant any
    // more, on B's path as on A's own: 401, as for A's rotated key.
    let (status, _, rotated) = gw
        .send_as_admin(
            Method::POST,
            &format!("/api/tenants/{}/api-key", a.id),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let as_a = |token: &str| {
        let authorization = bearer(token);
        let (gw, b_path) = (&gw, &b_path);
        async move {
            gw.send(
                Method::GET,
                b_path,
                &[("authorization", &authorization)],
                None,
            )
            .await
        }
    };
    assert_error(
        &as_a(&a.token).await?,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let new_token = gw
        .tenant_token(rotated["apiKey"].as_str().expect("apiKey"))
        .await?;
    assert_error(&as_a(&new_token).await?, StatusCode::FORBIDDEN, "forbidden");
    gw.stop().await
}

#[tokio::test]
async fn tenant_auth_both_requires_both_credentials() -> anyhow::Result<()> {
    let mut config = Config::for_tests();
    config.tenant_auth = switchboard::config::TenantAuthMode::Both;
    let gw = TestGateway::start_with(config).await?;
    let t = gw.create_tenant(tenant_body()).await?;
    let path = format!("/api/tenant/{}/audit", t.id);
    let key_only = gw
        .send(Method::GET, &path, &[("x-api-key", &t.api_key)], None)
        .await?;
    assert_error(&key_only, StatusCode::UNAUTHORIZED, "unauthorized");
    let jwt_only = gw
        .send(
            Method::GET,
            &path,
            &[("authorization", &bearer(&t.token))],
            None,
        )
        .await?;
    assert_error(&jwt_only, StatusCode::UNAUTHORIZED, "unauthorized");
    let both = gw
        .send(
            Method::GET,
            &path,
            &[
                ("authorization", &bearer(&t.token)),
                ("x-api-key", &t.api_key),
            ],
            None,
        )
        .await?;
    assert_eq!(both.0, StatusCode::OK);
    gw.stop().await
}

#[tokio::test]
async fn a_credential_header_sent_twice_is_refused() -> anyhow::Result<()> {
    // Which of two lines a proxy in between would pass on, or check, is not the gateway's
    // to guess: a credential sent twice is a wrong one, even with a good one first.
    let gw = TestGateway::start().await?;
    let t = gw.create_tenant(tenant_body()).await?;
    let path = format!("/api/tenant/{}/audit", t.id);
    let once = gw
        .send(Method::GET, &path, &[("x-api-key", &t.api_key)], None)
        .await?;
    assert_eq!(once.0, StatusCode::OK, "{}", once.2);
    let token = bearer(&t.token);
    let admin = bearer(gw.config.admin_api_key.expose());
    for twice in [
        [
            ("x-api-key", t.api_key.as_str()),
            ("x-api-key", "sbk_not-a-real-key"),
        ],
        [
            ("x-api-key", t.api_key.as_str()),
            ("x-api-key", t.api_key.as_str()),
        ],
        [
            ("authorization", token.as_str()),
            ("authorization", "Bearer not-a-jwt"),
        ],
    ] {
        let refused = gw.send(Method::GET, &path, &twice, None).await?;
        assert_error(&refused, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let twice = [
        ("authorization", admin.as_str()),
        ("authorization", "Bearer nope"),
    ];
    let refused = gw.send(Method::GET, "/api/tenants", &twice, None).await?;
    assert_error(&refused, StatusCode::UNAUTHORIZED, "unauthorized");
    gw.stop().await
}

#[tokio::test]
async fn rotation_deletion_and_disabling_take_effect_at_once() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let admin = bearer(gw.config.admin_api_key.expose());
    let t = gw.create_tenant(tenant_body()).await?;
    let path = format!("/api/tenant/{}/audit", t.id);
    let (status, headers, rotated) = gw
        .send(
            Method::POST,
            &format!("/api/tenants/{}/api-key", t.id),
            &[("authorization", &admin)],
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_not_stored(&headers);
    let new_key = rotated["apiKey"].as_str().unwrap().to_owned();
    assert_ne!(new_key, t.api_key);
    let old = gw
        .send(Method::GET, &path, &[("x-api-key", &t.api_key)], None)
        .await?;
    assert_error(&old, StatusCode::UNAUTHORIZED, "unauthorized");
    let old_jwt = gw
        .send(
            Method::GET,
            &path,
            &[("authorization", &bearer(&t.token))],
            None,
        )
        .await?;
    assert_error(&old_jwt, StatusCode::UNAUTHORIZED, "unauthorized");
    let new = gw
        .send(Method::GET, &path, &[("x-api-key", &new_key)], None)
        .await?;
    assert_eq!(new.0, StatusCode::OK);
    let new_jwt = gw.tenant_token(&new_key).await?;

    let (status, _, _) = gw
        .send(
            Method::PATCH,
            &format!("/api/tenants/{}", t.id),
            &[("authorization", &admin)],
            Some(json!({"enabled": false})),
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    let disabled = gw
        .send(Method::GET, &path, &[("x-api-key", &new_key)], None)
        .await?;
    assert_error(&disabled, StatusCode::FORBIDDEN, "tenant_disabled");
    let token_refused = gw
        .send(
            Method::POST,
            "/api/auth/tenant-token",
            &[("x-api-key", &new_key)],
            None,
        )
        .await?;
    assert_error(&token_refused, StatusCode::FORBIDDEN, "tenant_disabled");

    let (status, _, _) = gw
        .send(
            Method::DELETE,
            &format!("/api/tenants/{}", t.id),
            &[("authorization", &admin)],
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Refused under an id that never was a tenant (checked below), queued for the audit
    // writer before the two refusals this test waits for.
    let refused = gw
        .send(
            Method::GET,
            "/api/tenant/tenant-never-was/audit",
            &[("x-api-key", "sbk_guessed")],
            None,
        )
        .await?;
    assert_error(&refused, StatusCode::UNAUTHORIZED, "unauthorized");
    let gone_key = gw
        .send(
            Method::GET,
            &path,
            &[("x-api-key", &new_key), ("x-request-id", "gone-key")],
            None,
        )
        .await?;
    assert_error(&gone_key, StatusCode::UNAUTHORIZED, "unauthorized");
    let gone_jwt = gw
        .send(
            Method::GET,
            &path,
            &[
                ("authorization", &bearer(&new_jwt)),
                ("x-request-id", "gone-jwt"),
            ],
            None,
        )
        .await?;
    assert_error(&gone_jwt, StatusCode::UNAUTHORIZED, "unauthorized");
    let again = gw
        .send(
            Method::DELETE,
            &format!("/api/tenants/{}", t.id),
            &[("authorization", &admin)],
            None,
        )
        .await?;
    assert_error(&again, StatusCode::NOT_FOUND, "not_found");
    // The audit trail outlives the tenant. (The refusals above are written after their
    // answers.)
    let after_delete = ["gone-key", "gone-jwt"];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let refused = gw.audit_items(&t.id, Some("auth.refused")).await?;
        let ids: Vec<&str> = refused
            .iter()
            .filter_map(|item| item["requestId"].as_str())
            .collect();
        if after_delete.iter().all(|id| ids.contains(id)) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "refusals after the delete not audited: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _, audit) = gw
        .send(
            Method::GET,
            &format!("/api/tenants/{}/audit", t.id),
            &[("authorization", &admin)],
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["action"].as_str())
        .collect();
    for action in [
        "tenant.create",
        "tenant.key_rotate",
        "tenant.update",
        "tenant.delete",
        "token.issue",
    ] {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }
    // Credentials refused after the delete are audited too (auth.refused), so they come
    // first, newest first.
    let newest: Vec<(&str, &str)> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let said = |field: &str| i[field].as_str().unwrap_or_default();
            (said("action"), said("requestId"))
        })
        .take_while(|(action, _)| *action != "tenant.delete")
        .collect();
    for id in after_delete {
        assert!(
            newest.contains(&("auth.refused", id)),
            "{id} before the delete: {actions:?}"
        );
    }
    let newest_admin_action = actions.iter().find(|a| **a != "auth.refused");
    assert_eq!(newest_admin_action, Some(&"tenant.delete"), "newest first");
    // A deleted tenant's trail filtered to an action it never had: an empty page. An id
    // that never was a tenant: 404, also once an anonymous caller had a credential refused
    // under it (that refusal, above, is audited under the id its path named, and written by
    // now: the writer keeps its queue's order).
    let path = format!("/api/tenants/{}/audit?action=tool.call", t.id);
    let (status, _, none) = gw
        .send(Method::GET, &path, &[("authorization", &admin)], None)
        .await?;
    assert_eq!(status, StatusCode::OK, "{none}");
    assert_eq!(none["items"], json!([]));
    let never = gw
        .send(
            Method::GET,
            "/api/tenants/tenant-never-was/audit",
            &[("authorization", &admin)],
            None,
        )
        .await?;
    assert_error(&never, StatusCode::NOT_FOUND, "not_found");
    gw.stop().await
}

#[tokio::test]
async fn body_errors_follow_the_contract() -> anyhow::Result<()> {
    let mut config = Config::for_tests();
    config.max_body_bytes = 4096;
    let gw = TestGateway::start_with(config).await?;
    let admin = bearer(gw.config.admin_api_key.expose());
    let post = |body: &'static str, ctype: &'static str| {
        gw.http
            .post(gw.url("/api/tenants"))
            .header("authorization", admin.clone())
            .header("content-type", ctype)
            .body(body)
            .send()
    };
    let read = |resp: reqwest::Response| async move {
        let status = resp.status();
        let headers = resp.headers().clone();
        let body: Value = resp.json().await.unwrap();
        (status, headers, body)
    };
    let bad_json = read(post("{\"name\":", "application/json").await?).await;
    assert_error(&bad_json, StatusCode::BAD_REQUEST, "invalid_json");
    let missing = read(post(r#"{"integrationAppToken":"x"}"#, "application/json").await?).await;
    assert_error(&missing, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(missing.2["error"]["message"]
        .as_str()
        .unwrap()
        .contains("integrationKey"));
    let wrong_type = read(
        post(
            r#"{"integrationKey":5,"integrationAppToken":"x"}"#,
            "application/json",
        )
        .await?,
    )
    .await;
    assert_error(&wrong_type, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(wrong_type.2["error"]["message"]
        .as_str()
        .unwrap()
        .contains("integrationKey"));
    let bad_transport = read(post(r#"{"integrationKey":"k","integrationAppToken":"x","upstreamTransport":"carrier-pigeon"}"#, "application/json").await?).await;
    assert_error(&bad_transport, StatusCode::BAD_REQUEST, "invalid_request");
    let message = bad_transport.2["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("upstreamTransport") && !message.contains("carrier-pigeon"),
        "names the field, never echoes the value: {message}"
    );
    let bad_url = read(
        post(
            r#"{"integrationKey":"k","integrationAppToken":"x","upstreamUrl":"ftp://x"}"#,
            "application/json",
        )
        .await?,
    )
    .await;
    assert_error(&bad_url, StatusCode::BAD_REQUEST, "invalid_request");
    let form = read(post("name=x", "application/x-www-form-urlencoded").await?).await;
    assert_error(
        &form,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    let big = "x".repeat(8192);
    let resp = gw
        .http
        .post(gw.url("/api/tenants"))
        .header("authorization", admin.clone())
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"integrationKey":"k","integrationAppToken":"{big}"}}"#
        ))
        .send()
        .await?;
    let too_big = read(resp).await;
    assert_error(&too_big, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    let no_route = gw.send(Method::GET, "/api/nothing-here", &[], None).await?;
    assert_error(&no_route, StatusCode::NOT_FOUND, "not_found");
    let wrong_method = gw.send(Method::PUT, "/api/tenants", &[], None).await?;
    assert_eq!(wrong_method.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong_method.2["error"]["code"], "method_not_allowed");
    gw.stop().await
}

#[tokio::test]
async fn control_characters_in_names_and_urls_are_400_on_postgres() -> anyhow::Result<()> {
    // PostgreSQL cannot store a NUL in text: unchecked, it was a 500 there (and a 201 on
    // the embedded store). A line break in a name would forge log lines.
    let gw = TestGateway::start_postgres(Config::for_tests()).await?;
    let admin = bearer(gw.config.admin_api_key.expose());
    let auth = [("authorization", admin.as_str())];
    let tenant = gw
        .create_tenant(json!({"integrationKey": "ctl", "integrationAppToken": "t"}))
        .await?;
    let bodies = [
        json!({"name": "a\u{0}b", "integrationKey": "k", "integrationAppToken": "t"}),
        json!({"name": "a\nb", "integrationKey": "k", "integrationAppToken": "t"}),
        json!({"integrationKey": "k", "integrationAppToken": "t", "upstreamUrl": "http://a.example/x\u{0}"}),
        json!({"integrationKey": "k", "integrationAppToken": "t", "upstreamUrl": "http://a.example/ x"}),
    ];
    for body in bodies {
        let created = gw
            .send(Method::POST, "/api/tenants", &auth, Some(body.clone()))
            .await?;
        assert_error(&created, StatusCode::BAD_REQUEST, "invalid_request");
        let mut change = body;
        if let Some(map) = change.as_object_mut() {
            map.remove("integrationKey");
            map.remove("integrationAppToken");
        }
        let path = format!("/api/tenants/{}", tenant.id);
        let patched = gw.send(Method::PATCH, &path, &auth, Some(change)).await?;
        assert_error(&patched, StatusCode::BAD_REQUEST, "invalid_request");
    }
    gw.stop().await
}

#[tokio::test]
async fn request_ids_are_taken_from_the_request_or_made() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (_, headers, body) = gw
        .send(
            Method::GET,
            "/api/tenants",
            &[("x-request-id", "trace-abc-123")],
            None,
        )
        .await?;
    assert_eq!(headers["x-request-id"], "trace-abc-123");
    assert_eq!(body["error"]["requestId"], "trace-abc-123");
    let (_, headers, _) = gw
        .send(
            Method::GET,
            "/health",
            &[("x-request-id", "bad id\twith tabs")],
            None,
        )
        .await?;
    assert_ne!(headers["x-request-id"], "bad id\twith tabs");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    // Trace ids of load balancers and tracing systems, as they come.
    for id in [
        "Root=1-5f84c7a1-0123456789abcdef;Parent=53995c3f42cd8ad8;Sampled=1",
        "YWJj+/dA==",
        "req/42",
    ] {
        let (_, headers, body) = gw
            .send(Method::GET, "/api/tenants", &[("x-request-id", id)], None)
            .await?;
        assert_eq!(headers["x-request-id"], id);
        assert_eq!(body["error"]["requestId"], id);
    }
    let long = "a".repeat(201);
    let (_, headers, _) = gw
        .send(Method::GET, "/health", &[("x-request-id", &long)], None)
        .await?;
    assert_ne!(headers["x-request-id"], long.as_str());
    gw.stop().await
}

#[tokio::test]
async fn tenants_list_paginates_newest_first() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let admin = bearer(gw.config.admin_api_key.expose());
    let mut created = Vec::new();
    for i in 0..7 {
        let t = gw
            .create_tenant(json!({"name": format!("t{i}"), "integrationKey": "k", "integrationAppToken": "secret-ia"}))
            .await?;
        created.push(t.id);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/tenants?limit=3&cursor={c}"),
            None => "/api/tenants?limit=3".to_owned(),
        };
        let (status, _, page) = gw
            .send(Method::GET, &path, &[("authorization", &admin)], None)
            .await?;
        assert_eq!(status, StatusCode::OK);
        for item in page["items"].as_array().unwrap() {
            assert!(item.get("apiKey").is_none() && item.get("integrationAppToken").is_none());
            seen.push(item["tenantId"].as_str().unwrap().to_owned());
        }
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    created.reverse();
    assert_eq!(seen, created, "every tenant once, newest first");
    for bad in [
        "/api/tenants?limit=0",
        "/api/tenants?limit=501",
        "/api/tenants?cursor=%%%",
        // Of the wrong type: still the JSON error, naming the parameter.
        "/api/tenants?limit=abc",
        "/api/tenants?limit=-1",
        "/api/tenants?limit=",
        "/api/tenants/tenant-x/audit?limit=many",
        // A path parameter that is not UTF-8 once decoded.
        "/api/tenants/%FF",
        "/api/tenants/%FF/audit",
    ] {
        let got = gw
            .send(Method::GET, bad, &[("authorization", &admin)], None)
            .await?;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
    }
    gw.stop().await
}

#[tokio::test]
async fn get_and_patch_show_state_and_detect_races() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let admin = bearer(gw.config.admin_api_key.expose());
    let t = gw.create_tenant(tenant_body()).await?;
    let path = format!("/api/tenants/{}", t.id);
    let (status, _, view) = gw
        .send(Method::GET, &path, &[("authorization", &admin)], None)
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(view["enabled"], true);
    assert_eq!(view["status"]["state"], "stopped");
    assert_eq!(view["upstreamTransport"], "streamable-http");
    let version = view["version"].as_i64().unwrap();
    let (status, _, changed) = gw
        .send(
            Method::PATCH,
            &path,
            &[("authorization", &admin)],
            Some(json!({"name": null, "integrationKey": "salesforce", "upstreamUrl": "http://127.0.0.1:9/mcp",
                        "upstreamTransport": "auto", "rateLimit": {"requestsPerSecond": 5, "burst": 10},
                        "integrationAppToken": "rotated-ia-token"})),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(changed["name"], Value::Null);
    assert_eq!(changed["integrationKey"], "salesforce");
    assert_eq!(changed["rateLimit"]["requestsPerSecond"], 5);
    assert!(changed["version"].as_i64().unwrap() > version);
    let stale = gw
        .send(
            Method::PATCH,
            &path,
            &[
                ("authorization", &admin),
                ("if-match", &version.to_string()),
            ],
            Some(json!({"enabled": false})),
        )
        .await?;
    assert_error(&stale, StatusCode::CONFLICT, "conflict");
    let (status, _, reset) = gw
        .send(
            Method::PATCH,
            &path,
            &[("authorization", &admin)],
            Some(json!({"rateLimit": null})),
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reset["rateLimit"], Value::Null);
    let unknown = gw
        .send(
            Method::PATCH,
            &path,
            &[("authorization", &admin)],
            Some(json!({"enabeld": true})),
        )
        .await?;
    assert_error(&unknown, StatusCode::BAD_REQUEST, "invalid_request");
    // Only `name`, `upstreamUrl` and `rateLimit` have a `null`; for the others it is a
    // wrong-typed field, not a change that does nothing.
    for field in [
        "integrationKey",
        "integrationAppToken",
        "upstreamTransport",
        "enabled",
    ] {
        let got = gw
            .send(
                Method::PATCH,
                &path,
                &[("authorization", &admin)],
                Some(json!({ field: null })),
            )
            .await?;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
        let message = got.2["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{field}: {message}");
    }
    // Out of the range the store keeps: the caller's mistake, not a server error.
    for limit in [
        json!({"requestsPerSecond": 3_000_000_000u64, "burst": 1}),
        json!({"requestsPerSecond": 1, "burst": 0}),
    ] {
        let body = Some(json!({ "rateLimit": limit }));
        let got = gw
            .send(Method::PATCH, &path, &[("authorization", &admin)], body)
            .await?;
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
        let message = got.2["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("rateLimit"), "{message}");
    }
    let huge = r#"{"integrationKey":"k","integrationAppToken":"x","rateLimit":{"requestsPerSecond":1,"burst":4000000000}}"#;
    let created = gw
        .http
        .post(gw.url("/api/tenants"))
        .header("authorization", admin.clone())
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await?;
    assert_eq!(created.status(), StatusCode::BAD_REQUEST);
    let missing = gw
        .send(
            Method::GET,
            "/api/tenants/tenant-nope",
            &[("authorization", &admin)],
            None,
        )
        .await?;
    assert_error(&missing, StatusCode::NOT_FOUND, "not_found");
    let missing_patch = gw
        .send(
            Method::PATCH,
            "/api/tenants/tenant-nope",
            &[("authorization", &admin)],
            Some(json!({"enabled": true})),
        )
        .await?;
    assert_error(&missing_patch, StatusCode::NOT_FOUND, "not_found");
    gw.stop().await
}

#[tokio::test]
async fn health_and_ready_answer() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (status, _, health) = gw.send(Method::GET, "/health", &[], None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["database"]["status"], "up");
    assert!(health["memory"]["rssBytes"].as_u64().unwrap() > 0);
    assert!(health["uptimeSeconds"].is_u64());
    assert!(health["activeTenants"].is_u64());
    let (status, _, _) = gw.send(Method::GET, "/ready", &[], None).await?;
    assert_eq!(status, StatusCode::OK);
    let (status, _, live) = gw.send(Method::GET, "/live", &[], None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(live["live"], true);
    gw.stop().await
}

#[tokio::test]
async fn openapi_describes_every_served_route() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (status, _, spec) = gw.send(Method::GET, "/openapi.json", &[], None).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = spec["paths"].as_object().unwrap();
    let expected = [
        ("/health", "get"),
        ("/ready", "get"),
        ("/api/auth/token", "post"),
        ("/api/auth/tenant-token", "post"),
        ("/api/tenants", "post"),
        ("/api/tenants", "get"),
        ("/api/tenants/{tenantId}", "get"),
        ("/api/tenants/{tenantId}", "patch"),
        ("/api/tenants/{tenantId}", "delete"),
        ("/api/tenants/{tenantId}/api-key", "post"),
        ("/api/tenants/{tenantId}/audit", "get"),
        ("/api/tenant/{tenantId}/audit", "get"),
    ];
    for (path, method) in expected {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} documented"
        );
    }
    // Every documented operation is served: none answers "no such route" or 405.
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path.replace("{tenantId}", "tenant-00000000000000000000");
            let m = Method::from_bytes(method.to_uppercase().as_bytes())?;
            // Raw: not every operation answers JSON (`/metrics` is Prometheus text).
            let resp = gw.http.request(m, gw.url(&concrete)).send().await?;
            assert_ne!(
                resp.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            let body = resp.text().await?;
            assert!(!body.contains("no such route"), "{method} {path}");
        }
    }
    let create = &spec["components"]["schemas"]["CreateTenantRequest"];
    let required: Vec<&str> = create["required"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(required.contains(&"integrationKey") && required.contains(&"integrationAppToken"));
    gw.stop().await
}

/// A tool name past `LONGEST_TOOL_NAME` (512 bytes) is the caller's mistake: 400, and no
/// audit row of its size. At the bound, a name is looked up as any other.
#[tokio::test]
async fn a_tool_name_past_its_bound_is_400_and_not_audited() -> anyhow::Result<()> {
    let upstream = common::upstream::TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let t = gw
        .create_tenant(
            json!({"integrationKey": "k", "integrationAppToken": "x", "upstreamUrl": upstream.url}),
        )
        .await?;
    let too_long = gw.tool(&t, json!({"method": "x".repeat(513)})).await?;
    assert_error(&too_long, StatusCode::BAD_REQUEST, "invalid_request");
    let message = too_long.2["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("method"), "{message}");
    let at_bound = gw.tool(&t, json!({"method": "x".repeat(512)})).await?;
    assert_error(&at_bound, StatusCode::NOT_FOUND, "unknown_tool");
    let path = format!("/api/tenant/{}/audit?action=tool.call", t.id);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let items = loop {
        let (status, _, page) = gw
            .send(Method::GET, &path, &[("x-api-key", &t.api_key)], None)
            .await?;
        assert_eq!(status, StatusCode::OK, "{page}");
        let items = page["items"].as_array().cloned().unwrap_or_default();
        if !items.is_empty() {
            break items;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "no audit row");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let tools: Vec<usize> = items
        .iter()
        .map(|item| item["tool"].as_str().map_or(0, str::len))
        .collect();
    assert_eq!(tools, [512], "only the call at the bound is audited");
    gw.stop().await
}

/// What an `/api/*` route answers is a tenant's or the operator's: no shared cache may keep
/// it, also when only `x-api-key` authenticated it (a cache that tells callers apart by
/// `Authorization` alone would hand it to the next one), nor an error.
#[tokio::test]
async fn every_api_answer_is_marked_no_store() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let t = gw.create_tenant(tenant_body()).await?;
    let audit = format!("/api/tenant/{}/audit", t.id);
    let answers = [
        gw.send(Method::GET, &audit, &[("x-api-key", &t.api_key)], None)
            .await?,
        gw.send(
            Method::GET,
            &audit,
            &[("authorization", &bearer(&t.token))],
            None,
        )
        .await?,
        gw.send_as_admin(Method::GET, "/api/tenants", None).await?,
        gw.send_as_admin(Method::GET, &format!("/api/tenants/{}", t.id), None)
            .await?,
        gw.send(Method::GET, &audit, &[], None).await?,
        gw.send(Method::GET, "/api/nothing-here", &[], None).await?,
    ];
    for (n, (status, headers, body)) in answers.iter().enumerate() {
        assert!(
            [
                StatusCode::OK,
                StatusCode::UNAUTHORIZED,
                StatusCode::NOT_FOUND
            ]
            .contains(status),
            "{n}: {status} {body}"
        );
        assert_no_store(headers);
    }
    gw.stop().await
}

/// serde_json reads a non-string where an enum belongs as malformed JSON; the body is well
/// formed, and the caller's mistake is the field's type: API.md's `invalid_request`, naming it.
#[tokio::test]
async fn a_wrong_typed_upstream_transport_is_an_invalid_request_naming_it() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let t = gw.create_tenant(tenant_body()).await?;
    let path = format!("/api/tenants/{}", t.id);
    for wrong in [json!(5), json!(true), json!([]), json!({}), json!(["sse"])] {
        let mut create = tenant_body();
        create["upstreamTransport"] = wrong.clone();
        let created = gw
            .send_as_admin(Method::POST, "/api/tenants", Some(create))
            .await?;
        let change = json!({ "upstreamTransport": wrong });
        let patched = gw.send_as_admin(Method::PATCH, &path, Some(change)).await?;
        for got in [created, patched] {
            assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
            let message = got.2["error"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("upstreamTransport"), "{wrong}: {message}");
        }
    }
    // Malformed JSON is still that, also around the field.
    let auth = bearer(gw.config.admin_api_key.expose());
    let cut = r#"{"integrationKey":"k","integrationAppToken":"x","upstreamTransport":5"#;
    let got = gw
        .send_raw(
            Method::POST,
            "/api/tenants",
            &[("authorization", &auth)],
            cut,
        )
        .await?;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_json");
    gw.stop().await
}

/// A key sent twice is the caller's mistake, named as a missing one is (the value of neither
/// is echoed: here it is the admin key, or a guess at it).
#[tokio::test]
async fn a_field_sent_twice_is_named() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let body = r#"{"key":"first-sekrit","key":"second-sekrit"}"#;
    let got = gw
        .send_raw(Method::POST, "/api/auth/token", &[], body)
        .await?;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
    let message = got.2["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("duplicate field `key`") && !message.contains("sekrit"),
        "{message}"
    );
    let auth = bearer(gw.config.admin_api_key.expose());
    let twice = r#"{"integrationKey":"k","integrationAppToken":"x","integrationKey":"j"}"#;
    let got = gw
        .send_raw(
            Method::POST,
            "/api/tenants",
            &[("authorization", &auth)],
            twice,
        )
        .await?;
    assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
    let message = got.2["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("integrationKey"), "{message}");
    gw.stop().await
}

/// `upstreamUrl` is bounded as the other text fields are (2048 bytes, what browsers and
/// most servers take): past it, 400 naming the field, on create and on update alike.
#[tokio::test]
async fn an_upstream_url_past_2048_bytes_is_an_invalid_request() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let t = gw.create_tenant(tenant_body()).await?;
    let path = format!("/api/tenants/{}", t.id);
    let url_of = |len: usize| {
        let base = "http://127.0.0.1:9/";
        format!("{base}{}", "x".repeat(len - base.len()))
    };
    let mut create = tenant_body();
    create["upstreamUrl"] = json!(url_of(2049));
    let created = gw
        .send_as_admin(Method::POST, "/api/tenants", Some(create.clone()))
        .await?;
    let change = json!({ "upstreamUrl": url_of(2049) });
    let patched = gw.send_as_admin(Method::PATCH, &path, Some(change)).await?;
    for got in [created, patched] {
        assert_error(&got, StatusCode::BAD_REQUEST, "invalid_request");
        let message = got.2["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("upstreamUrl"), "{message}");
    }
    create["upstreamUrl"] = json!(url_of(2048));
    let (status, _, body) = gw
        .send_as_admin(Method::POST, "/api/tenants", Some(create))
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let change = json!({ "upstreamUrl": url_of(2048) });
    let (status, _, body) = gw.send_as_admin(Method::PATCH, &path, Some(change)).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["upstreamUrl"].as_str().map(str::len), Some(2048));
    gw.stop().await
}
