//! Dead letters: every message that a stage rejected or failed on, with the
//! stage and the reason, kept in an embedded SQLite database until someone
//! replays or purges it.
//!
//! - [`store`]: the SQLite store the host appends to and the CLI reads.
//! - [`cli`]: `eliot dead-letters list|show|replay|purge`.
//! - [`replay`]: sends stored dead letters through their pipeline again.

pub mod cli;
mod publish;
pub mod replay;
pub mod store;

pub use store::{
    Claimed, DeadLetterError, DeadLetterStore, ListFilter, ReplayClaim, ReplayFailure,
    StoredDeadLetter,
};

use crate::wasm::Message;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The plugin returned an `invalid` error.
    Invalid,
    /// The plugin returned `transient` errors until retries ran out.
    Transient,
    /// The call exceeded the plugin's time budget.
    Timeout,
    /// The plugin trapped (panic, out-of-bounds access, memory denied).
    Trap,
    /// A sink could not take the message, for example a topic template
    /// without a value.
    Sink,
    /// The stage's circuit breaker was open and its policy is dead-letter.
    CircuitOpen,
    /// A message the client could not decode, for example a topic that is
    /// not valid UTF-8.
    Undecodable,
    /// A payload over `mqtt.max_packet_bytes`, stored without calling a
    /// stage.
    TooLarge,
    /// The host's own code panicked while handling the message; the worker
    /// was restarted.
    HostPanic,
}

impl FailureKind {
    /// Every kind, in declaration order. Keep it in step with the enum: the
    /// store and the CLI parse kinds through it.
    pub const ALL: [FailureKind; 9] = [
        Self::Invalid,
        Self::Transient,
        Self::Timeout,
        Self::Trap,
        Self::Sink,
        Self::CircuitOpen,
        Self::Undecodable,
        Self::TooLarge,
        Self::HostPanic,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Transient => "transient",
            Self::Timeout => "timeout",
            Self::Trap => "trap",
            Self::Sink => "sink",
            Self::CircuitOpen => "circuit-open",
            Self::Undecodable => "undecodable",
            Self::TooLarge => "too-large",
            Self::HostPanic => "host-panic",
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for FailureKind {
    type Err = String;

    /// Parses the name that [`FailureKind::as_str`] returns.
    fn from_str(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|kind| kind.as_str()).collect();
                format!(
                    "unknown failure kind \"{text}\"; use one of {}",
                    names.join(", ")
                )
            })
    }
}

/// One dead letter: the original message and where and why it failed.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub pipeline: String,
    /// Stage (or `sink:NAME`) that failed.
    pub stage: String,
    pub kind: FailureKind,
    pub reason: String,
    pub message: Message,
    /// The topic exactly as received, when it differs from `message.topic`
    /// because it is not valid UTF-8 (then `message.topic` is a lossy
    /// rendering). `None` when `message.topic` is the exact topic.
    pub topic_bytes: Option<Vec<u8>>,
}

impl DeadLetter {
    /// Creates a dead letter for `message`, whose topic is exact.
    pub fn new(
        pipeline: String,
        stage: String,
        kind: FailureKind,
        reason: String,
        message: Message,
    ) -> Self {
        Self {
            pipeline,
            stage,
            kind,
            reason,
            message,
            topic_bytes: None,
        }
    }

    /// Returns the topic's bytes as received.
    pub fn topic_bytes(&self) -> &[u8] {
        self.topic_bytes
            .as_deref()
            .unwrap_or(self.message.topic.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for kind in FailureKind::ALL {
            // An exhaustive match: a new variant fails to compile here until
            // it is added to ALL as well.
            match kind {
                FailureKind::Invalid
                | FailureKind::Transient
                | FailureKind::Timeout
                | FailureKind::Trap
                | FailureKind::Sink
                | FailureKind::CircuitOpen
                | FailureKind::Undecodable
                | FailureKind::TooLarge
                | FailureKind::HostPanic => {}
            }
            assert_eq!(kind.as_str().parse::<FailureKind>(), Ok(kind));
        }
    }

    #[test]
    fn unknown_kind_lists_names() {
        assert_eq!(
            "bogus".parse::<FailureKind>(),
            Err("unknown failure kind \"bogus\"; use one of invalid, transient, timeout, trap, sink, \
                 circuit-open, undecodable, too-large, host-panic"
                .to_owned())
        );
    }
}
