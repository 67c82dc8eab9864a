//! Test plugin that forwards every message unchanged and reports the
//! version it was built with, so that the hot-reload tests can build several
//! distinct versions of one plugin and see in each output record which one
//! processed it.
//!
//! Build-time variables:
//! - `ELIOT_TEST_PLUGIN_VERSION`: the version `describe` reports (default
//!   `1.0.0`).
//! - `ELIOT_TEST_PLUGIN_REJECT`: when set, `init` rejects every config, as a
//!   release with a stricter config schema would.

use eliot_sdk::{Message, Outcome, PluginError, Processor};

/// The versioned processor.
pub struct Versioned;

const VERSION: &str = match option_env!("ELIOT_TEST_PLUGIN_VERSION") {
    Some(version) => version,
    None => "1.0.0",
};

const REJECT: bool = option_env!("ELIOT_TEST_PLUGIN_REJECT").is_some();

impl Processor for Versioned {
    const NAME: &'static str = "versioned";
    const VERSION: &'static str = VERSION;

    fn new(_config: serde_json::Value) -> Result<Self, String> {
        if REJECT {
            return Err(format!("version {VERSION} of this test plugin rejects every config"));
        }
        Ok(Versioned)
    }

    fn process(&mut self, msg: Message) -> Result<Outcome, PluginError> {
        Ok(Outcome::Forward(msg))
    }
}

eliot_sdk::export_processor!(Versioned);

#[cfg(test)]
mod tests {
    use super::*;
    use eliot_sdk::testing::{forwarded, message};
    use serde_json::json;

    #[test]
    fn forwards_unchanged() {
        let input = message("devices/a/telemetry", b"{\"a\": 1}");
        let mut plugin = Versioned::new(json!({})).unwrap();

        let output = forwarded(plugin.process(input.clone()).unwrap());

        assert_eq!(output, input);
    }
}
