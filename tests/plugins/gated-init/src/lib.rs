//! Test plugin whose `init` does not return until a file exists, so that a
//! test can hold the load of a plugin open for exactly as long as it needs,
//! without timing. It forwards every message unchanged.
//!
//! Config: `gate`, the path of the file inside a folder the plugin's
//! `grants.read_dirs` mounts. The wait is bounded by the plugin's call
//! budget, like any call.

use eliot_sdk::{Message, Outcome, PluginError, Processor};

/// The gated-init processor.
pub struct GatedInit;

impl Processor for GatedInit {
    const NAME: &'static str = "gated-init";
    const VERSION: &'static str = "0.1.0";

    fn new(config: serde_json::Value) -> Result<Self, String> {
        let gate = config
            .get("gate")
            .and_then(serde_json::Value::as_str)
            .ok_or("`gate` must be the path of a file in a granted folder")?;
        while std::fs::metadata(gate).is_err() {
            std::hint::spin_loop();
        }
        Ok(GatedInit)
    }

    fn process(&mut self, msg: Message) -> Result<Outcome, PluginError> {
        Ok(Outcome::Forward(msg))
    }
}

eliot_sdk::export_processor!(GatedInit);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn missing_gate_is_rejected() {
        assert!(GatedInit::new(json!({})).is_err());
    }

    #[test]
    fn open_gate_returns() {
        let dir = std::env::temp_dir();
        let gate = dir.to_str().unwrap();
        assert!(GatedInit::new(json!({ "gate": gate })).is_ok());
    }
}
