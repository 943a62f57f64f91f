//! The process lifecycle: the root cancellation token, the tracker of every spawned task,
//! and the draining flag that `/ready` and the HTTP layer read. SIGTERM or Ctrl-C starts
//! the drain (see `app::run` for the order in which things stop).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct Lifecycle {
    started: Instant,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
    /// Cancelled when the process must stop; every background loop watches a child of it.
    pub token: CancellationToken,
    /// Every spawned background task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Ends every MCP session (and its streams); cancelled once requests in flight are done.
    pub sessions: CancellationToken,
}

impl Lifecycle {
    pub fn new(token: CancellationToken) -> Self {
        Self {
            started: Instant::now(),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            token,
            tasks: TaskTracker::new(),
            sessions: CancellationToken::new(),
        }
    }

    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// From now on `/ready` answers 503 and new work gets 503 `draining`.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

impl Lifecycle {
    /// Counts a request as in flight until the guard drops.
    pub fn begin_request(self: &std::sync::Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Waits until no request is in flight, or `limit` passes; true when idle.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.idle.notified();
            if self.in_flight() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.in_flight() == 0;
            }
        }
    }
}

/// A request in flight; see [`Lifecycle::begin_request`].
pub struct InFlight(std::sync::Arc<Lifecycle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
