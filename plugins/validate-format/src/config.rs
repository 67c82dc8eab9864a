//! The validate-format plugin's configuration.

use serde::Deserialize;

/// Default for `max_payload_bytes`: 64 KiB, far above a simulator reading
/// (a few hundred bytes) but small enough to stop a runaway payload early.
const DEFAULT_MAX_PAYLOAD_BYTES: u64 = 65_536;

/// The plugin's TOML table, as the host passes it to `init`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    allowed_sensor_types: Option<Vec<String>>,
    #[serde(default = "default_max_payload_bytes")]
    max_payload_bytes: u64,
}

fn default_max_payload_bytes() -> u64 {
    DEFAULT_MAX_PAYLOAD_BYTES
}

/// Validated configuration.
#[derive(Debug)]
pub struct Config {
    /// Sensor types to accept, in configuration order. `None` accepts any type.
    pub allowed_sensor_types: Option<Vec<String>>,
    pub max_payload_bytes: u64,
}

impl Config {
    /// Parses and checks the plugin's configuration table.
    ///
    /// # Errors
    ///
    /// Returns a text naming the bad key, its value and the fix.
    pub fn from_json(config: serde_json::Value) -> Result<Self, String> {
        let raw: RawConfig = eliot_sdk::parse_config(config)?;

        if raw.max_payload_bytes == 0 {
            return Err("invalid config: max_payload_bytes must be at least 1, got 0".to_owned());
        }

        if let Some(types) = &raw.allowed_sensor_types {
            if types.is_empty() {
                return Err(
                    "invalid config: allowed_sensor_types is empty, so every message would be \
                            rejected; list at least one type, or remove the key to accept any type"
                        .to_owned(),
                );
            }
            if types.iter().any(String::is_empty) {
                return Err(format!(
                    "invalid config: allowed_sensor_types contains an empty string: {types:?}; \
                     sensor_type is never empty, so remove it"
                ));
            }
        }

        Ok(Self {
            allowed_sensor_types: raw.allowed_sensor_types,
            max_payload_bytes: raw.max_payload_bytes,
        })
    }
}
