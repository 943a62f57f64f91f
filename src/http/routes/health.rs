//! Probes: `/live` (the process serves HTTP; for a liveness probe: it never asks the
//! database, so an outage does not get every replica restarted), `/health` (a summary, 503
//! while the database is down) and `/ready` (for load balancers: the database answers and
//! the process is not draining).

use std::sync::{Mutex, PoisonError};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use futures::future::{BoxFuture, FutureExt, Shared};
use serde::Serialize;

use crate::http::AppState;
use crate::store::SharedStore;

/// The database check of `/health` and `/ready`, which anyone may ask, as often as they
/// like: requests that come while a ping is in flight share it, so a flood of probes costs
/// one ping at a time (one pooled connection), not one per request. Nothing is cached
/// past the ping: every answer is about a ping that was still running when it was asked.
#[derive(Default)]
pub struct DatabaseProbe {
    in_flight: Mutex<Option<Shared<BoxFuture<'static, bool>>>>,
}

impl DatabaseProbe {
    /// Whether the database answers a ping (the one in flight, or a new one).
    pub async fn answers(&self, store: &SharedStore) -> bool {
        let store = store.clone();
        self.join(move || async move { store.ping().await.is_ok() }.boxed())
            .await
    }

    /// The result of the ping in flight, or of one `start`s now.
    async fn join(&self, start: impl FnOnce() -> BoxFuture<'static, bool>) -> bool {
        let ping = {
            let mut slot = self
                .in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match slot.as_ref() {
                Some(ping) => ping.clone(),
                None => {
                    let ping = start().shared();
                    *slot = Some(ping.clone());
                    ping
                }
            }
        };
        let answered = ping.clone().await;
        let mut slot = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_some_and(|current| current.ptr_eq(&ping)) {
            *slot = None;
        }
        answered
    }
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// `ok`, or `degraded` when the database does not answer.
    status: &'static str,
    uptime_seconds: u64,
    active_tenants: u64,
    database: DatabaseHealth,
    memory: MemoryHealth,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DatabaseHealth {
    /// `up` or `down`.
    status: &'static str,
    backend: &'static str,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemoryHealth {
    rss_bytes: u64,
}

/// A summary of the process; 503 while the database does not answer.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, body = Health), (status = 503, description = "database down", body = Health)))]
pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let db_up = state.probe.answers(&state.store).await;
    let body = Health {
        status: if db_up { "ok" } else { "degraded" },
        uptime_seconds: state.lifecycle.uptime_secs(),
        active_tenants: state.tenants.active_count() as u64,
        database: DatabaseHealth {
            status: if db_up { "up" } else { "down" },
            backend: state.store.backend(),
        },
        memory: MemoryHealth {
            rss_bytes: resident_memory_bytes(),
        },
    };
    let status = if db_up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Live {
    live: bool,
}

/// Liveness: 200 while the process serves HTTP, draining or not, database or not. Tool calls
/// keep being served through a database outage (credentials from the cache), so a restart
/// would only make it worse.
#[utoipa::path(get, path = "/live", tag = "operations", responses((status = 200, body = Live)))]
pub async fn live() -> Json<Live> {
    Json(Live { live: true })
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Ready {
    ready: bool,
}

/// Readiness: 200 when the database answers and the process is not draining.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses((status = 200, body = Ready), (status = 503, body = Ready)))]
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let ready = !state.lifecycle.is_draining() && state.probe.answers(&state.store).await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Ready { ready }))
}

/// This process's resident set size (0 where there is no procfs).
pub fn resident_memory_bytes() -> u64 {
    resident_memory_bytes_of("self").unwrap_or(0)
}

/// The resident set size of process `pid` (or `self`), from `VmRSS` in its
/// `/proc/<pid>/status`: in bytes whatever the kernel's page size (`statm` counts pages).
pub fn resident_memory_bytes_of(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probes_asked_together_share_one_ping_and_later_ones_ping_again() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let probe = DatabaseProbe::default();
        let pings = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let ping = || {
            let (pings, gate) = (pings.clone(), gate.clone());
            move || {
                async move {
                    pings.fetch_add(1, Ordering::SeqCst);
                    gate.notified().await;
                    true
                }
                .boxed()
            }
        };
        let together = futures::future::join_all((0..50).map(|_| probe.join(ping())));
        let release = async {
            // Every prober has joined by the time the first ping is let go.
            tokio::task::yield_now().await;
            gate.notify_waiters();
        };
        let (answers, ()) = tokio::join!(together, release);
        assert!(answers.into_iter().all(|up| up));
        assert_eq!(pings.load(Ordering::SeqCst), 1, "one ping for fifty probes");
        // Nothing is cached: the next probe pings again.
        let again = probe.join(ping());
        let release = async {
            tokio::task::yield_now().await;
            gate.notify_waiters();
        };
        let (up, ()) = tokio::join!(again, release);
        assert!(up);
        assert_eq!(pings.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn resident_memory_is_read_in_bytes() {
        let rss = resident_memory_bytes();
        // A test binary holds more than a megabyte and less than its machine's memory.
        assert!(rss > 1 << 20, "{rss}");
    }
}
