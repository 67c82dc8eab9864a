//! The enrich plugin's configuration and the topic pattern it contains.

use serde::Deserialize;

/// Placeholder that marks the topic level holding the device id.
pub const PLACEHOLDER: &str = "{device_id}";

/// Payload fields of the telemetry format. `received_at_field` must not name
/// one of them, because enrich would overwrite it.
const TELEMETRY_FIELDS: [&str; 4] = ["device_id", "timestamp", "sensor_type", "data"];

/// The plugin's TOML table, as the host passes it to `init`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    device_id_topic_pattern: String,
    received_at_field: String,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            device_id_topic_pattern: "devices/{device_id}/telemetry".to_owned(),
            received_at_field: "received_at".to_owned(),
        }
    }
}

/// Validated configuration.
#[derive(Debug)]
pub struct Config {
    pub topic_pattern: TopicPattern,
    /// Payload field that receives the host's receive time.
    pub received_at_field: String,
}

impl Config {
    /// Parses and checks the plugin's configuration table.
    ///
    /// # Errors
    ///
    /// Returns a text naming the bad key, its value and the expected form.
    pub fn from_json(config: serde_json::Value) -> Result<Self, String> {
        let raw: RawConfig = eliot_sdk::parse_config(config)?;
        let topic_pattern = TopicPattern::parse(&raw.device_id_topic_pattern)?;

        let field = raw.received_at_field;
        if field.is_empty() {
            return Err(
                "invalid config: received_at_field must not be empty; remove the key to use \"received_at\""
                    .to_owned(),
            );
        }
        if TELEMETRY_FIELDS.contains(&field.as_str()) {
            return Err(format!(
                "invalid config: received_at_field {field:?} would overwrite a field of the telemetry \
                 format ({}); choose another name, such as \"received_at\"",
                TELEMETRY_FIELDS.join(", ")
            ));
        }

        Ok(Self { topic_pattern, received_at_field: field })
    }
}

/// An MQTT topic pattern with one level that captures the device id, such as
/// `devices/{device_id}/telemetry`. The other levels match literally.
#[derive(Debug)]
pub struct TopicPattern {
    levels: Vec<String>,
    device_id_level: usize,
}

impl TopicPattern {
    /// Parses `pattern`, which must contain [`PLACEHOLDER`] exactly once, as a
    /// whole level, and no MQTT wildcards.
    ///
    /// # Errors
    ///
    /// Returns a text that names `device_id_topic_pattern`, the value and the
    /// expected form.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let levels: Vec<String> = pattern.split('/').map(str::to_owned).collect();

        let whole_level_count = levels.iter().filter(|level| *level == PLACEHOLDER).count();
        let device_id_level = levels.iter().position(|level| level == PLACEHOLDER);
        let (Some(device_id_level), 1, 1) =
            (device_id_level, whole_level_count, pattern.matches(PLACEHOLDER).count())
        else {
            return Err(format!(
                "invalid config: device_id_topic_pattern {pattern:?} must contain exactly one \
                 {PLACEHOLDER} placeholder as a whole topic level, for example \
                 \"devices/{PLACEHOLDER}/telemetry\""
            ));
        };

        // A topic name never contains wildcards, so a pattern level with one
        // could never match. Say so now instead of silently matching nothing.
        if let Some(wildcard) = ['+', '#'].into_iter().find(|w| pattern.contains(*w)) {
            return Err(format!(
                "invalid config: device_id_topic_pattern {pattern:?} contains the MQTT wildcard \
                 '{wildcard}', but levels other than {PLACEHOLDER} match literally; replace the \
                 wildcard with the literal level"
            ));
        }

        Ok(Self { levels, device_id_level })
    }

    /// Returns the device id in `topic`, or `None` when the topic does not
    /// match the pattern or its device id level is empty.
    pub fn device_id<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let topic_levels: Vec<&str> = topic.split('/').collect();
        if topic_levels.len() != self.levels.len() {
            return None;
        }

        let literals_match = topic_levels
            .iter()
            .zip(&self.levels)
            .enumerate()
            .all(|(index, (topic_level, level))| index == self.device_id_level || topic_level == level);
        let device_id = topic_levels[self.device_id_level];
        (literals_match && !device_id.is_empty()).then_some(device_id)
    }
}
