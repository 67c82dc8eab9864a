//! The device key: which device a message comes from.
//!
//! A pipeline sends all messages of one device to the same worker, which
//! keeps them in order, and exposes the device id to plugins as the
//! `device_id` message header. [`device_id`] is the one place that takes the
//! id from a message, for the router and for anything else that needs it.

use std::borrow::Cow;
use std::fmt;

/// The message header that carries the extracted device id.
pub const DEVICE_ID_HEADER: &str = "device_id";

/// The placeholder that marks the device id's level in a topic pattern.
const PLACEHOLDER: &str = "{device_id}";

/// Where a pipeline finds the device id of a message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DeviceKey {
    /// The whole topic is the key: one device per topic. No `device_id`
    /// header is set, because a topic is not a device id.
    #[default]
    Topic,
    /// One level of the topic, as `devices/{device_id}/telemetry` marks it.
    TopicPattern(TopicPattern),
    /// A top-level field of a JSON object payload, a string or a number.
    PayloadField(String),
}

impl DeviceKey {
    /// Tells whether the key yields a device id to put in the header.
    pub fn names_device(&self) -> bool {
        !matches!(self, Self::Topic)
    }
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Topic => f.write_str("the topic"),
            Self::TopicPattern(pattern) => write!(f, "topic pattern \"{}\"", pattern.text),
            Self::PayloadField(field) => write!(f, "payload field \"{field}\""),
        }
    }
}

/// A topic pattern with one `{device_id}` level. Other levels match
/// literally, or any one level when they are `+`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    text: String,
    levels: Vec<String>,
    device_level: usize,
}

impl TopicPattern {
    /// Validates `pattern`.
    ///
    /// # Errors
    ///
    /// Returns what is wrong: no `{device_id}` level or more than one, a
    /// placeholder mixed into a level, a `#`, or a `+` mixed into a level.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let levels: Vec<String> = pattern.split('/').map(str::to_owned).collect();
        let placeholders = pattern.matches(PLACEHOLDER).count();
        let whole = levels.iter().filter(|level| *level == PLACEHOLDER).count();
        if placeholders != 1 || whole != 1 {
            return Err(format!(
                "\"{pattern}\" must contain {PLACEHOLDER} exactly once, as a whole level"
            ));
        }
        if pattern.contains('#') {
            return Err(format!(
                "\"{pattern}\" contains \"#\"; a device key pattern names every level, with + for any one level"
            ));
        }
        if let Some(level) = levels.iter().find(|l| l.contains('+') && *l != "+") {
            return Err(format!(
                "\"{pattern}\" mixes \"+\" into the level \"{level}\"; + must be a whole level"
            ));
        }
        let device_level = levels
            .iter()
            .position(|level| level == PLACEHOLDER)
            .expect("counted once above");
        Ok(Self {
            text: pattern.to_owned(),
            levels,
            device_level,
        })
    }

    /// Returns the device id in `topic`, when the topic matches the pattern
    /// and the id level is not empty.
    pub fn device_id<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let topic_levels: Vec<&str> = topic.split('/').collect();
        if topic_levels.len() != self.levels.len() {
            return None;
        }
        let matches = self.levels.iter().zip(&topic_levels).enumerate().all(
            |(index, (level, topic_level))| {
                index == self.device_level || level == "+" || level == topic_level
            },
        );
        let id = topic_levels[self.device_level];
        (matches && !id.is_empty()).then_some(id)
    }
}

/// Why a message has no device id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MissingKey {
    /// The topic does not match the pattern, or the id level is empty.
    TopicMismatch,
    /// The payload is not a JSON object.
    NotJsonObject,
    /// The field is absent, empty, or neither a string nor a number.
    NoField,
}

impl fmt::Display for MissingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TopicMismatch => "the topic does not match the pattern",
            Self::NotJsonObject => "the payload is not a JSON object",
            Self::NoField => "the field is missing, empty, or not a string or number",
        })
    }
}

/// Extracts the device id of a message with `topic` and `payload` as `key`
/// defines it. With [`DeviceKey::Topic`] the id is the whole topic.
///
/// # Errors
///
/// Returns why there is no id. The router then keys the message by its
/// topic and counts it; see the README's device key section.
pub fn device_id<'m>(
    key: &DeviceKey,
    topic: &'m str,
    payload: &[u8],
) -> Result<Cow<'m, str>, MissingKey> {
    match key {
        DeviceKey::Topic => Ok(Cow::Borrowed(topic)),
        DeviceKey::TopicPattern(pattern) => pattern
            .device_id(topic)
            .map(Cow::Borrowed)
            .ok_or(MissingKey::TopicMismatch),
        DeviceKey::PayloadField(field) => {
            let Ok(serde_json::Value::Object(object)) =
                serde_json::from_slice::<serde_json::Value>(payload)
            else {
                return Err(MissingKey::NotJsonObject);
            };
            match object.get(field) {
                Some(serde_json::Value::String(id)) if !id.is_empty() => Ok(Cow::Owned(id.clone())),
                Some(serde_json::Value::Number(id)) => Ok(Cow::Owned(id.to_string())),
                _ => Err(MissingKey::NoField),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> DeviceKey {
        DeviceKey::TopicPattern(TopicPattern::parse(text).unwrap())
    }

    #[test]
    fn whole_topic_is_default_key() {
        assert_eq!(device_id(&DeviceKey::default(), "a/b", b"").unwrap(), "a/b");
    }

    #[test]
    fn topic_pattern_takes_one_level() {
        let key = pattern("devices/{device_id}/telemetry");
        assert_eq!(
            device_id(&key, "devices/pump-7/telemetry", b"").unwrap(),
            "pump-7"
        );
        assert_eq!(
            device_id(&key, "devices/pump-7/status", b""),
            Err(MissingKey::TopicMismatch)
        );
        assert_eq!(
            device_id(&key, "devices//telemetry", b""),
            Err(MissingKey::TopicMismatch)
        );
        assert_eq!(
            device_id(&key, "devices/a/b/telemetry", b""),
            Err(MissingKey::TopicMismatch)
        );
    }

    #[test]
    fn topic_pattern_plus_matches_any_level() {
        let key = pattern("site/+/{device_id}");
        assert_eq!(device_id(&key, "site/north/m1", b"").unwrap(), "m1");
        assert_eq!(
            device_id(&key, "other/north/m1", b""),
            Err(MissingKey::TopicMismatch)
        );
    }

    #[test]
    fn topic_pattern_rejects_bad_patterns() {
        for (text, expected) in [
            (
                "devices/+/telemetry",
                "must contain {device_id} exactly once, as a whole level",
            ),
            (
                "{device_id}/{device_id}",
                "must contain {device_id} exactly once",
            ),
            ("dev-{device_id}/x", "must contain {device_id} exactly once"),
            ("{device_id}/#", "contains \"#\""),
            ("{device_id}/a+", "mixes \"+\" into the level \"a+\""),
        ] {
            let error = TopicPattern::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn payload_field_takes_string_or_number() {
        let key = DeviceKey::PayloadField("device_id".to_owned());
        assert_eq!(
            device_id(&key, "t", br#"{"device_id":"m1","v":1}"#).unwrap(),
            "m1"
        );
        assert_eq!(device_id(&key, "t", br#"{"device_id":42}"#).unwrap(), "42");
    }

    #[test]
    fn payload_field_missing_cases() {
        let key = DeviceKey::PayloadField("device_id".to_owned());
        assert_eq!(
            device_id(&key, "t", b"not json"),
            Err(MissingKey::NotJsonObject)
        );
        assert_eq!(
            device_id(&key, "t", b"[1,2]"),
            Err(MissingKey::NotJsonObject)
        );
        assert_eq!(
            device_id(&key, "t", br#"{"other":"m1"}"#),
            Err(MissingKey::NoField)
        );
        assert_eq!(
            device_id(&key, "t", br#"{"device_id":""}"#),
            Err(MissingKey::NoField)
        );
        assert_eq!(
            device_id(&key, "t", br#"{"device_id":null}"#),
            Err(MissingKey::NoField)
        );
        assert_eq!(
            device_id(&key, "t", br#"{"device_id":{"a":1}}"#),
            Err(MissingKey::NoField)
        );
    }
}
