//! Supervision of the host's tasks: restart intensity shared by every task,
//! and escalation to a host shutdown with a non-zero exit code.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::restart::{RestartDecision, RestartPolicy};

/// Shared by every supervised task of one host.
pub struct Supervisor {
    policy: Mutex<RestartPolicy>,
    restarts: std::sync::atomic::AtomicU64,
    /// Set to the reason once the restart intensity was exceeded; the host
    /// then shuts down and exits with a non-zero code.
    escalated: watch::Sender<Option<String>>,
}

impl Supervisor {
    /// At most `max_restarts` restarts within `window` over all tasks.
    pub fn new(max_restarts: usize, window: Duration) -> Self {
        Self {
            policy: Mutex::new(RestartPolicy::new(max_restarts, window)),
            restarts: std::sync::atomic::AtomicU64::new(0),
            escalated: watch::channel(None).0,
        }
    }

    /// Records that task `name` failed with `reason`. Returns `true` when
    /// the task should restart, `false` when the failure escalated.
    pub fn restarted(&self, name: &str, reason: &str) -> bool {
        let decision = self
            .policy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .on_failure(Instant::now());
        match decision {
            RestartDecision::Restart { restarts } => {
                self.restarts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    task = name,
                    reason,
                    restarts_in_window = restarts,
                    "task failed; restarting it"
                );
                true
            }
            RestartDecision::Escalate { restarts } => {
                let text = format!(
                    "task \"{name}\" failed ({reason}); {restarts} restarts within the restart window exceed the limit"
                );
                tracing::error!(
                    task = name,
                    reason,
                    restarts_in_window = restarts,
                    "restart intensity exceeded; shutting the host down"
                );
                self.escalated.send_replace(Some(text));
                false
            }
        }
    }

    /// Stops the host at once because task `name` failed in a way it cannot
    /// be restarted from.
    pub fn escalate(&self, name: &str, reason: &str) {
        tracing::error!(
            task = name,
            reason,
            "task failed and cannot be restarted; shutting the host down"
        );
        self.escalated
            .send_replace(Some(format!("task \"{name}\" failed ({reason})")));
    }

    /// Restarts so far.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Resolves with the reason once a failure escalated.
    pub fn escalation(&self) -> watch::Receiver<Option<String>> {
        self.escalated.subscribe()
    }
}

/// Returns the text of a caught panic.
pub fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "panic with a non-text payload".to_owned()
    }
}
