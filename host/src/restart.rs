//! Restart intensity for supervised tasks: a plain policy, unit-tested
//! with explicit instants.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What the supervisor does after a task failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Restart the task; `restarts` counts the restarts inside the window,
    /// this one included.
    Restart { restarts: usize },
    /// Too many restarts within the window: stop the host.
    Escalate { restarts: usize },
}

/// Allows at most `max_restarts` restarts within any `window`, like an
/// OTP supervisor's intensity and period. One policy is shared by all the
/// tasks of a host, so that failures spread over tasks still escalate.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    max_restarts: usize,
    window: Duration,
    recent: VecDeque<Instant>,
}

impl RestartPolicy {
    pub fn new(max_restarts: usize, window: Duration) -> Self {
        Self {
            max_restarts,
            window,
            recent: VecDeque::new(),
        }
    }

    /// Records a failure at `now` and decides.
    pub fn on_failure(&mut self, now: Instant) -> RestartDecision {
        while self
            .recent
            .front()
            .is_some_and(|at| now.duration_since(*at) >= self.window)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        let restarts = self.recent.len();
        if restarts > self.max_restarts {
            RestartDecision::Escalate { restarts }
        } else {
            RestartDecision::Restart { restarts }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_up_to_the_limit_then_escalates() {
        let start = Instant::now();
        let mut policy = RestartPolicy::new(3, Duration::from_secs(10));
        assert_eq!(
            policy.on_failure(start),
            RestartDecision::Restart { restarts: 1 }
        );
        assert_eq!(
            policy.on_failure(start),
            RestartDecision::Restart { restarts: 2 }
        );
        assert_eq!(
            policy.on_failure(start),
            RestartDecision::Restart { restarts: 3 }
        );
        assert_eq!(
            policy.on_failure(start),
            RestartDecision::Escalate { restarts: 4 }
        );
    }

    #[test]
    fn old_failures_leave_the_window() {
        let start = Instant::now();
        let mut policy = RestartPolicy::new(2, Duration::from_secs(10));
        policy.on_failure(start);
        policy.on_failure(start + Duration::from_secs(1));
        // The first failure is exactly one window old and no longer counts.
        assert_eq!(
            policy.on_failure(start + Duration::from_secs(10)),
            RestartDecision::Restart { restarts: 2 }
        );
        assert_eq!(
            policy.on_failure(start + Duration::from_secs(10)),
            RestartDecision::Escalate { restarts: 3 }
        );
    }

    #[test]
    fn zero_restarts_escalates_at_once() {
        let mut policy = RestartPolicy::new(0, Duration::from_secs(1));
        assert_eq!(
            policy.on_failure(Instant::now()),
            RestartDecision::Escalate { restarts: 1 }
        );
    }
}
