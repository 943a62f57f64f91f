//! Probes: `/live` (the process serves HTTP; for a liveness probe: it never asks the
//! database, so an outage does not get every replica restarted), `/health` (a summary, 503
//! while the database is down) and `/ready` (for load balancers: the database answers and
//! the process is not draining).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

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
/// The ping runs in a task of its own, so that one whose probers all gave up (a load
/// balancer's probe timing out) still ends, within the store's ping timeout, and is not
/// left half done for the next prober to finish with an answer from long ago.
#[derive(Default)]
pub struct DatabaseProbe {
    in_flight: Mutex<Option<Ping>>,
}

/// A ping's answer, shared by its probers, and whether its task has ended.
struct Ping {
    answer: Shared<BoxFuture<'static, bool>>,
    ended: Arc<AtomicBool>,
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
            // A ping that ended with nobody left to take it off is not joined: it is old.
            match slot
                .as_ref()
                .filter(|ping| !ping.ended.load(Ordering::Acquire))
            {
                Some(ping) => ping.answer.clone(),
                None => {
                    let ended = Arc::new(AtomicBool::new(false));
                    let ping = start();
                    let task = tokio::spawn({
                        let ended = ended.clone();
                        async move {
                            let up = ping.await;
                            ended.store(true, Ordering::Release);
                            up
                        }
                    });
                    let answer = task.map(|up| up.unwrap_or(false)).boxed().shared();
                    *slot = Some(Ping {
                        answer: answer.clone(),
                        ended,
                    });
                    answer
                }
            }
        };
        let answered = ping.clone().await;
        let mut slot = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot
            .as_ref()
            .is_some_and(|current| current.answer.ptr_eq(&ping))
        {
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
        use std::sync::atomic::AtomicUsize;
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
            gate.notify_one();
        };
        let (answers, ()) = tokio::join!(together, release);
        assert!(answers.into_iter().all(|up| up));
        assert_eq!(pings.load(Ordering::SeqCst), 1, "one ping for fifty probes");
        // Nothing is cached: the next probe pings again.
        let again = probe.join(ping());
        let release = async {
            tokio::task::yield_now().await;
            gate.notify_one();
        };
        let (up, ()) = tokio::join!(again, release);
        assert!(up);
        assert_eq!(pings.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_ping_every_prober_gave_up_on_ends_and_the_next_prober_pings_again() {
        use std::sync::atomic::AtomicUsize;
        let probe = DatabaseProbe::default();
        let pings = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        // The first ping waits for the gate and says the database is down; later ones
        // say it is up.
        let ping = || {
            let (pings, gate) = (pings.clone(), gate.clone());
            move || {
                async move {
                    if pings.fetch_add(1, Ordering::SeqCst) == 0 {
                        gate.notified().await;
                        return false;
                    }
                    true
                }
                .boxed()
            }
        };
        let wait = std::time::Duration::from_millis(20);
        let gave_up = tokio::time::timeout(wait, probe.join(ping())).await;
        assert!(gave_up.is_err(), "the first ping was held");
        gate.notify_one();
        // The abandoned ping ends in its own task, with no prober.
        tokio::time::sleep(wait).await;
        assert!(
            probe.join(ping()).await,
            "an answer from the abandoned ping"
        );
        assert_eq!(pings.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn resident_memory_is_read_in_bytes() {
        let rss = resident_memory_bytes();
        // A test binary holds more than a megabyte and less than its machine's memory.
        assert!(rss > 1 << 20, "{rss}");
    }
}
