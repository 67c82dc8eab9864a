//! Helpers for unit-testing a [`Processor`](crate::Processor) natively.

use crate::{Message, Outcome, Qos};

/// Builds a QoS 1 message on `topic` with `payload`, received at a fixed
/// time (2025-06-05T14:30:00Z) so that tests are repeatable.
pub fn message(topic: &str, payload: &[u8]) -> Message {
    Message {
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        qos: Qos::AtLeastOnce,
        retain: false,
        received_at_ms: 1_749_133_800_000,
        headers: Vec::new(),
    }
}

/// Builds a message whose payload is `value` serialized as JSON.
pub fn json_message(topic: &str, value: &serde_json::Value) -> Message {
    message(topic, value.to_string().as_bytes())
}

/// Returns the forwarded message.
///
/// # Panics
///
/// Panics with the outcome when it is not [`Outcome::Forward`].
pub fn forwarded(outcome: Outcome) -> Message {
    match outcome {
        Outcome::Forward(msg) => msg,
        other => panic!("expected a forwarded message, got {other:?}"),
    }
}

/// Returns the reason of a dropped message.
///
/// # Panics
///
/// Panics with the outcome when it is not [`Outcome::Drop`].
pub fn dropped(outcome: Outcome) -> String {
    match outcome {
        Outcome::Drop(reason) => reason,
        other => panic!("expected a dropped message, got {other:?}"),
    }
}

/// Parses the payload of `msg` as JSON.
///
/// # Panics
///
/// Panics when the payload is not valid JSON.
pub fn payload_json(msg: &Message) -> serde_json::Value {
    serde_json::from_slice(&msg.payload).expect("payload is not valid JSON")
}
