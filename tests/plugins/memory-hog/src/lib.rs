//! Test plugin that allocates memory without end when the payload contains
//! `grow`, so that tests can check that the host's memory limit stops it.
//! Every other message is forwarded unchanged.

use eliot_sdk::{Message, Outcome, PluginError, Processor};

/// Size of one allocation, in bytes.
const CHUNK_BYTES: usize = 1024 * 1024;

/// The memory-hog processor.
pub struct MemoryHog;

impl Processor for MemoryHog {
    const NAME: &'static str = "memory-hog";
    const VERSION: &'static str = "0.1.0";

    fn new(_config: serde_json::Value) -> Result<Self, String> {
        Ok(MemoryHog)
    }

    fn process(&mut self, msg: Message) -> Result<Outcome, PluginError> {
        if contains(&msg.payload, b"grow") {
            grow_until_allocation_fails();
        }
        Ok(Outcome::Forward(msg))
    }
}

/// Allocates 1 MiB chunks, writes every byte of each, and keeps them all.
/// When the allocator cannot get more memory, `vec!` calls
/// `handle_alloc_error`, which aborts, and in a component an abort is a trap.
fn grow_until_allocation_fails() -> ! {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        let fill = (chunks.len() % 255) as u8 + 1;
        let chunk = vec![fill; CHUNK_BYTES];
        chunks.push(std::hint::black_box(chunk));
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

eliot_sdk::export_processor!(MemoryHog);

#[cfg(test)]
mod tests {
    use super::*;
    use eliot_sdk::testing::{forwarded, message};

    // The growing path is not run natively: it would allocate host memory
    // until the test process dies.

    #[test]
    fn forwards_other_payloads_unchanged() {
        let mut plugin = MemoryHog::new(serde_json::json!({})).unwrap();
        let input = message("devices/a/telemetry", br#"{"seq":1}"#);

        let output = forwarded(plugin.process(input.clone()).unwrap());

        assert_eq!(output, input);
    }
}
