//! Criterion benches of the gateway's hot paths: the credential check (API key hash and
//! credential-cache hit, as most calls are; the same with no cache, a lookup in SQLite;
//! JWT verify), routing a call through the registry to a warm
//! tenant actor (`TenantRuntime::list_tools`, upstream on loopback), and audit batching
//! (`append_audit` of a batch on SQLite). Short measurement windows keep
//! `cargo test --all-targets` (which runs each once) fast.

#[path = "../src/bin/switchboard-load/upstream.rs"]
mod upstream;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use switchboard::app::App;
use switchboard::auth::jwt::Role;
use switchboard::auth::{Authenticator, TenantCredentials};
use switchboard::config::{Config, Secret};
use switchboard::store::{TenantRecord, UpstreamTransport};
use switchboard::tenants::admin::{Actor, NewTenant};
use switchboard::tenants::ChangeFeed;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

struct Fixture {
    app: App,
    tenant: TenantRecord,
    api_key: Secret,
    _upstream: upstream::EchoUpstream,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = upstream::EchoUpstream::start().await.expect("upstream");
    let mut config = Config::for_tests();
    config.database_url = Some(format!("sqlite://{}", dir.path().join("b.db").display()));
    config.tenant_rate_limit = 1_000_000;
    config.tenant_rate_burst = 1_000_000;
    let app = App::build(config, CancellationToken::new())
        .await
        .expect("app");
    let new = NewTenant {
        name: None,
        integration_key: "bench".into(),
        integration_app_token: Secret::new("bench-token"),
        upstream_url: Some(upstream.url.clone()),
        upstream_transport: UpstreamTransport::StreamableHttp,
        rate_limit: None,
    };
    let actor = Actor {
        name: "bench",
        request_id: None,
    };
    let (tenant, api_key) = app.state.admin.create(new, &actor).await.expect("tenant");
    Fixture {
        app,
        tenant,
        api_key,
        _upstream: upstream,
        _dir: dir,
    }
}

fn benches(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let fx = rt.block_on(fixture());
    let auth = fx.app.state.auth.clone();
    let creds = TenantCredentials {
        bearer: None,
        api_key: Some(fx.api_key.expose()),
        cached_only: false,
    };
    // Every call after the first finds the key in the credential cache (30 s by default).
    c.bench_function("auth/api_key_hash_cache_hit", |b| {
        b.to_async(&rt).iter(|| async {
            auth.tenant(&fx.tenant.id, creds, false)
                .await
                .expect("authorised")
        })
    });
    // With no cache every call reads the store: a cold key, or a cache that was cleared.
    let mut uncached_config = Config::for_tests();
    uncached_config.credential_cache_size = 0;
    let uncached = Authenticator::new(
        &uncached_config,
        fx.app.state.store.clone(),
        &ChangeFeed::new(16),
    );
    c.bench_function("auth/api_key_hash_and_sqlite_lookup", |b| {
        b.to_async(&rt).iter(|| async {
            uncached
                .tenant(&fx.tenant.id, creds, false)
                .await
                .expect("authorised")
        })
    });
    let kid = switchboard::auth::keys::key_generation(&fx.tenant.api_key_hash);
    let token = auth
        .jwt()
        .issue_tenant(&fx.tenant.id, kid)
        .expect("jwt")
        .token;
    c.bench_function("auth/jwt_verify", |b| {
        b.iter(|| auth.jwt().verify(&token, Role::Tenant).expect("valid"))
    });
    let tenants = fx.app.state.tenants.clone();
    rt.block_on(tenants.list_tools(&fx.tenant, false))
        .expect("warm");
    c.bench_function("route/list_tools_warm_tenant", |b| {
        b.to_async(&rt)
            .iter(|| async { tenants.list_tools(&fx.tenant, false).await.expect("tools") })
    });
    c.bench_function("route/call_echo_warm_tenant", |b| {
        b.to_async(&rt).iter(|| async {
            let args = serde_json::json!({"text": "hi"}).as_object().cloned();
            tenants
                .call_tool(&fx.tenant, "echo", args, None)
                .await
                .expect("call")
        })
    });
    let store = fx.app.state.store.clone();
    let batch: Vec<_> = (0..200).map(|_| audit_event(&fx.tenant.id)).collect();
    c.bench_function("audit/append_batch_of_200_sqlite", |b| {
        b.to_async(&rt).iter_batched(
            || {
                batch
                    .iter()
                    .map(|_| audit_event(&fx.tenant.id))
                    .collect::<Vec<_>>()
            },
            |events| {
                let store = store.clone();
                async move { store.append_audit(&events).await.expect("append") }
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

fn audit_event(tenant_id: &str) -> switchboard::store::AuditRecord {
    switchboard::audit::call_event(switchboard::audit::CallFacts {
        tenant_id,
        action: "tool.call",
        tool: Some("echo"),
        arguments: None,
        request_id: Some("bench"),
        outcome: "ok",
        started: Instant::now(),
        request_bytes: Some(40),
        response_bytes: Some(80),
    })
}

criterion_group! {
    name = hot_paths;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30);
    targets = benches
}
criterion_main!(hot_paths);
