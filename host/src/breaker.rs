//! Circuit breakers for stages and sinks: plain state, no I/O and no clock
//! of their own, so every transition is unit-tested with explicit instants.

use std::time::{Duration, Instant};

/// State of a breaker, as logs and metrics report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; consecutive failures are counted.
    Closed,
    /// Calls are refused until the cool-down ends.
    Open,
    /// The cool-down ended; one trial call decides between closed and open.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

/// Whether a call may go through now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// The breaker is closed.
    Allowed,
    /// The breaker is half-open and this call is the trial.
    Trial,
    /// The breaker is open; it lets a trial through at `retry_at`.
    Refused { retry_at: Instant },
}

/// A state change, returned so that the caller can log and count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

/// Opens after `failure_threshold` consecutive failures, stays open for
/// `cool_down`, then lets one trial call through: success closes it, failure
/// opens it for another cool-down.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    failure_threshold: u32,
    cool_down: Duration,
    consecutive_failures: u32,
    state: BreakerState,
    opened_at: Option<Instant>,
}

impl CircuitBreaker {
    /// Creates a closed breaker. A threshold of 0 is treated as 1.
    pub fn new(failure_threshold: u32, cool_down: Duration) -> Self {
        Self {
            failure_threshold: failure_threshold.max(1),
            cool_down,
            consecutive_failures: 0,
            state: BreakerState::Closed,
            opened_at: None,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Asks whether a call may go through at `now`. An open breaker whose
    /// cool-down has ended turns half-open and grants the trial.
    pub fn permit(&mut self, now: Instant) -> (Permit, Option<Transition>) {
        match self.state {
            BreakerState::Closed => (Permit::Allowed, None),
            BreakerState::HalfOpen => (Permit::Trial, None),
            BreakerState::Open => {
                let retry_at = self.opened_at.map_or(now, |at| at + self.cool_down);
                if now >= retry_at {
                    (Permit::Trial, self.set(BreakerState::HalfOpen))
                } else {
                    (Permit::Refused { retry_at }, None)
                }
            }
        }
    }

    /// Records a successful call; a half-open breaker closes.
    pub fn record_success(&mut self) -> Option<Transition> {
        self.consecutive_failures = 0;
        self.opened_at = None;
        self.set(BreakerState::Closed)
    }

    /// Records a failed call at `now`; returns the transition to open when
    /// this failure reached the threshold or failed the trial.
    pub fn record_failure(&mut self, now: Instant) -> Option<Transition> {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let open = match self.state {
            BreakerState::Closed => self.consecutive_failures >= self.failure_threshold,
            BreakerState::HalfOpen => true,
            // A call that was let through before the breaker opened.
            BreakerState::Open => false,
        };
        if open {
            self.opened_at = Some(now);
            self.set(BreakerState::Open)
        } else {
            None
        }
    }

    fn set(&mut self, to: BreakerState) -> Option<Transition> {
        let from = std::mem::replace(&mut self.state, to);
        (from != to).then_some(Transition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOL_DOWN: Duration = Duration::from_secs(5);

    fn opened(from: BreakerState) -> Option<Transition> {
        Some(Transition {
            from,
            to: BreakerState::Open,
        })
    }

    #[test]
    fn opens_at_threshold_of_consecutive_failures() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(3, COOL_DOWN);
        assert_eq!(breaker.record_failure(start), None);
        assert_eq!(breaker.record_failure(start), None);
        assert_eq!(breaker.record_failure(start), opened(BreakerState::Closed));
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(
            breaker.permit(start),
            (
                Permit::Refused {
                    retry_at: start + COOL_DOWN
                },
                None
            )
        );
    }

    #[test]
    fn success_resets_the_count() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(3, COOL_DOWN);
        breaker.record_failure(start);
        breaker.record_failure(start);
        assert_eq!(breaker.record_success(), None);
        breaker.record_failure(start);
        breaker.record_failure(start);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.permit(start).0, Permit::Allowed);
    }

    #[test]
    fn cool_down_leads_to_one_trial() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(1, COOL_DOWN);
        breaker.record_failure(start);
        let just_before = start + COOL_DOWN - Duration::from_millis(1);
        assert!(matches!(
            breaker.permit(just_before).0,
            Permit::Refused { .. }
        ));
        let (permit, transition) = breaker.permit(start + COOL_DOWN);
        assert_eq!(permit, Permit::Trial);
        assert_eq!(
            transition,
            Some(Transition {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen
            })
        );
    }

    #[test]
    fn trial_success_closes() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(1, COOL_DOWN);
        breaker.record_failure(start);
        breaker.permit(start + COOL_DOWN);
        assert_eq!(
            breaker.record_success(),
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Closed
            })
        );
        assert_eq!(breaker.permit(start + COOL_DOWN).0, Permit::Allowed);
    }

    #[test]
    fn trial_failure_reopens_for_a_new_cool_down() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(3, COOL_DOWN);
        for _ in 0..3 {
            breaker.record_failure(start);
        }
        let trial_at = start + COOL_DOWN;
        breaker.permit(trial_at);
        assert_eq!(
            breaker.record_failure(trial_at),
            opened(BreakerState::HalfOpen)
        );
        assert_eq!(
            breaker.permit(trial_at + COOL_DOWN / 2).0,
            Permit::Refused {
                retry_at: trial_at + COOL_DOWN
            }
        );
    }

    #[test]
    fn zero_threshold_acts_as_one() {
        let mut breaker = CircuitBreaker::new(0, COOL_DOWN);
        assert_eq!(
            breaker.record_failure(Instant::now()),
            opened(BreakerState::Closed)
        );
    }
}
