//! Test plugin that panics on some messages, so that tests can check that a
//! panic dead-letters only that message and the host replaces the instance.
//!
//! It panics when the payload is a JSON object whose integer field `seq` is
//! a multiple of 10 (one message in ten for consecutive numbers), and on any
//! payload that contains `fail` (for sustained failures). Every other
//! message is forwarded unchanged.

use eliot_sdk::{Message, Outcome, PluginError, Processor};

/// The flaky-panic processor.
pub struct FlakyPanic;

impl Processor for FlakyPanic {
    const NAME: &'static str = "flaky-panic";
    const VERSION: &'static str = "0.1.0";

    fn new(_config: serde_json::Value) -> Result<Self, String> {
        Ok(FlakyPanic)
    }

    fn process(&mut self, msg: Message) -> Result<Outcome, PluginError> {
        if contains(&msg.payload, b"fail") {
            panic!("flaky-panic: the payload contains \"fail\"");
        }
        if let Some(seq) = sequence_number(&msg.payload) {
            if seq % 10 == 0 {
                panic!("flaky-panic: seq {seq} is a multiple of 10");
            }
        }
        Ok(Outcome::Forward(msg))
    }
}

/// Returns the `seq` field of a JSON object payload, when it is an unsigned
/// integer.
fn sequence_number(payload: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    value.get("seq")?.as_u64()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

eliot_sdk::export_processor!(FlakyPanic);

#[cfg(test)]
mod tests {
    use super::*;
    use eliot_sdk::testing::{forwarded, json_message, message};
    use serde_json::json;

    fn plugin() -> FlakyPanic {
        FlakyPanic::new(json!({})).unwrap()
    }

    #[test]
    fn forwards_other_sequence_numbers() {
        for seq in [1, 9, 11, 99] {
            let input = json_message("devices/a/telemetry", &json!({ "seq": seq }));

            let output = forwarded(plugin().process(input.clone()).unwrap());

            assert_eq!(output, input, "seq {seq}");
        }
    }

    #[test]
    fn forwards_payload_without_seq() {
        let input = message("devices/a/telemetry", b"not json");

        let output = forwarded(plugin().process(input.clone()).unwrap());

        assert_eq!(output, input);
    }

    #[test]
    #[should_panic(expected = "seq 0 is a multiple of 10")]
    fn panics_on_seq_zero() {
        let _ = plugin().process(json_message("devices/a/telemetry", &json!({ "seq": 0 })));
    }

    #[test]
    #[should_panic(expected = "seq 90 is a multiple of 10")]
    fn panics_on_seq_ninety() {
        let _ = plugin().process(json_message("devices/a/telemetry", &json!({ "seq": 90 })));
    }

    #[test]
    #[should_panic(expected = "contains \"fail\"")]
    fn panics_on_fail_payload() {
        let _ = plugin().process(message("devices/a/telemetry", b"please fail"));
    }
}
