//! Test plugin that never returns from `process` when the payload contains
//! `loop`, so that tests can check that the host enforces the call's time
//! budget. Every other message is forwarded unchanged.

use eliot_sdk::{Message, Outcome, PluginError, Processor};

/// The loop-forever processor.
pub struct LoopForever;

impl Processor for LoopForever {
    const NAME: &'static str = "loop-forever";
    const VERSION: &'static str = "0.1.0";

    fn new(_config: serde_json::Value) -> Result<Self, String> {
        Ok(LoopForever)
    }

    fn process(&mut self, msg: Message) -> Result<Outcome, PluginError> {
        if contains(&msg.payload, b"loop") {
            spin_forever();
        }
        Ok(Outcome::Forward(msg))
    }
}

/// Busy-loops without end. `black_box` keeps the optimizer from proving the
/// loop has no effect and removing it, and there is no call into the host,
/// so only the host's epoch interruption can stop it.
fn spin_forever() -> ! {
    let mut counter: u64 = 0;
    loop {
        counter = std::hint::black_box(counter.wrapping_add(1));
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

eliot_sdk::export_processor!(LoopForever);

#[cfg(test)]
mod tests {
    use super::*;
    use eliot_sdk::testing::{forwarded, message};

    #[test]
    fn forwards_other_payloads_unchanged() {
        let mut plugin = LoopForever::new(serde_json::json!({})).unwrap();
        let input = message("devices/a/telemetry", br#"{"seq":1}"#);

        let output = forwarded(plugin.process(input.clone()).unwrap());

        assert_eq!(output, input);
    }

    #[test]
    fn contains_finds_substring() {
        assert!(contains(b"please loop now", b"loop"));
        assert!(!contains(b"lo op", b"loop"));
        assert!(!contains(b"", b"loop"));
    }
}
