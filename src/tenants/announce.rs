//! Announcing a tenant's tool-list changes to the other replicas without letting its
//! upstream decide how many database statements run: at most one announcement is in
//! flight per tenant, and every change heard meanwhile is folded into one more after it.
//! A late announcement still says what the ones folded into it would have said: "this
//! tenant's tool list changed; list it again".

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

const IDLE: u8 = 0;
const RUNNING: u8 = 1;
/// Running, and asked again since it started.
const RUNNING_AGAIN: u8 = 2;

/// Runs a job in the background, one run at a time; asks made during a run become one
/// more run after it.
#[derive(Clone, Default)]
pub struct Coalesced {
    state: Arc<AtomicU8>,
}

impl Coalesced {
    /// Asks for a run of `job`: starts one now when none is running, or else makes sure one
    /// more starts after the current one.
    pub fn ask<F, Fut>(&self, job: F)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let before = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some(if s == IDLE { RUNNING } else { RUNNING_AGAIN })
            })
            .unwrap_or(IDLE);
        if before != IDLE {
            return;
        }
        let state = self.state.clone();
        tokio::spawn(async move {
            loop {
                job().await;
                // Nobody asked during the run: done. Otherwise run once more for all of them.
                if state
                    .compare_exchange(RUNNING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    break;
                }
                state.store(RUNNING, Ordering::Release);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;
    use tokio::sync::Semaphore;

    #[tokio::test]
    async fn a_flood_of_asks_is_one_run_and_one_more() {
        let coalesced = Coalesced::default();
        let runs = Arc::new(AtomicUsize::new(0));
        // The first run waits until the test lets it finish.
        let gate = Arc::new(Semaphore::new(0));
        let job = {
            let (runs, gate) = (runs.clone(), gate.clone());
            move || {
                let (runs, gate) = (runs.clone(), gate.clone());
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    if let Ok(permit) = gate.acquire().await {
                        permit.forget();
                    }
                }
            }
        };
        for _ in 0..1000 {
            coalesced.ask(job.clone());
        }
        reaches(&runs, 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one run at a time");
        gate.add_permits(1);
        reaches(&runs, 2).await;
        gate.add_permits(1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "the asks became one more run"
        );
        // Idle again: the next ask runs at once.
        coalesced.ask(job);
        reaches(&runs, 3).await;
        gate.add_permits(1);
    }

    /// Waits (up to 5 s) until `runs` is `n`.
    async fn reaches(runs: &AtomicUsize, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::SeqCst) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} runs never started"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
