//! Eliot plugin that rejects telemetry payloads that do not have the expected
//! format.
//!
//! A valid payload is a UTF-8 JSON object with a non-empty string
//! `device_id`, an RFC 3339 `timestamp`, a non-empty string `sensor_type` and
//! an object `data`. Valid messages pass unchanged. Any other message fails
//! with an invalid-message error, so the host stores it as a dead letter with
//! the reason.

mod config;

#[cfg(test)]
mod tests;

use std::borrow::Cow;

use eliot_sdk::{Message, Outcome, PluginError, Processor};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::Config;

/// Maximum number of characters of an offending value quoted in a reason.
const MAX_QUOTED_CHARS: usize = 64;

/// The validate-format processor.
#[derive(Debug)]
pub struct ValidateFormat {
    config: Config,
}

impl Processor for ValidateFormat {
    const NAME: &'static str = "validate-format";
    const VERSION: &'static str = "0.1.0";

    fn new(config: Value) -> Result<Self, String> {
        Ok(Self {
            config: Config::from_json(config)?,
        })
    }

    fn process(&mut self, msg: Message) -> Result<Outcome, PluginError> {
        if !self.accepts(&msg.payload) {
            self.check(&msg.payload).map_err(PluginError::invalid)?;
        }
        Ok(Outcome::Forward(msg))
    }
}

/// The fields a valid payload must have, borrowed from it where no escape
/// forces a copy. Deserializing into this skips the other fields without
/// building a tree of the payload, which is most of the work for a valid
/// reading.
#[derive(Deserialize)]
struct Reading<'a> {
    #[serde(borrow)]
    device_id: Cow<'a, str>,
    #[serde(borrow)]
    timestamp: Cow<'a, str>,
    #[serde(borrow)]
    sensor_type: Cow<'a, str>,
    #[allow(
        dead_code,
        reason = "deserializing it is the check that `data` is an object"
    )]
    data: AnObject,
}

/// A JSON object, its contents skipped.
struct AnObject;

impl<'de> Deserialize<'de> for AnObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Skip;
        impl<'de> serde::de::Visitor<'de> for Skip {
            type Value = AnObject;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<AnObject, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(AnObject)
            }
        }
        deserializer.deserialize_map(Skip)
    }
}

impl ValidateFormat {
    /// Checks `payload` the quick way: `true` only for a payload that
    /// [`Self::check`] accepts too. On `false` the caller runs `check`,
    /// which words the reason. Two cases return `false`, because serde reads
    /// them differently from a JSON tree. One is a top level not written as
    /// an object, which serde takes as a sequence too. The other is a field
    /// given twice, which serde rejects and `check` takes the last of.
    fn accepts(&self, payload: &[u8]) -> bool {
        if payload.len() as u64 > self.config.max_payload_bytes {
            return false;
        }
        // serde_json skips the strings of ignored fields without checking
        // their UTF-8, which `check` requires of the whole payload.
        let Ok(text) = std::str::from_utf8(payload) else {
            return false;
        };
        if !text.trim_start().starts_with('{') {
            return false;
        }
        let Ok(reading) = serde_json::from_str::<Reading<'_>>(text) else {
            return false;
        };
        !reading.device_id.is_empty()
            && parse_rfc3339(&reading.timestamp).is_some()
            && !reading.sensor_type.is_empty()
            && self
                .config
                .allowed_sensor_types
                .as_ref()
                .is_none_or(|allowed| allowed.iter().any(|t| *t == reading.sensor_type))
    }

    /// Checks `payload` and returns the first problem found. The checks run
    /// in a fixed order (size, JSON, `device_id`, `timestamp`, `sensor_type`,
    /// `data`), so one payload always gets the same reason.
    fn check(&self, payload: &[u8]) -> Result<(), String> {
        let max = self.config.max_payload_bytes;
        if payload.len() as u64 > max {
            return Err(format!(
                "payload is {} bytes, more than max_payload_bytes ({max})",
                payload.len()
            ));
        }

        let text =
            std::str::from_utf8(payload).map_err(|e| format!("payload is not valid UTF-8: {e}"))?;
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("payload is not valid JSON: {e}"))?;
        let Value::Object(fields) = value else {
            return Err(format!(
                "payload must be a JSON object, got {}",
                describe(&value)
            ));
        };

        non_empty_string(&fields, "device_id")?;

        let timestamp = string(&fields, "timestamp")?;
        if parse_rfc3339(timestamp).is_none() {
            return Err(format!(
                "field \"timestamp\" is not an RFC 3339 date-time: {}",
                quote(&Value::from(timestamp))
            ));
        }

        let sensor_type = non_empty_string(&fields, "sensor_type")?;
        if let Some(allowed) = &self.config.allowed_sensor_types {
            if !allowed.iter().any(|t| t == sensor_type) {
                let allowed: Vec<String> = allowed.iter().map(|t| format!("{t:?}")).collect();
                return Err(format!(
                    "field \"sensor_type\" must be one of {} (allowed_sensor_types), got {}",
                    allowed.join(", "),
                    quote(&Value::from(sensor_type))
                ));
            }
        }

        match required(&fields, "data")? {
            Value::Object(_) => Ok(()),
            other => Err(format!(
                "field \"data\" must be a JSON object, got {}",
                describe(other)
            )),
        }
    }
}

/// Parses an RFC 3339 date-time. The separator between date and time must be
/// `T`, `t` or a space (RFC 3339 section 5.6 allows the last), because time
/// 0.3 accepts any byte there.
fn parse_rfc3339(text: &str) -> Option<OffsetDateTime> {
    if !matches!(text.as_bytes().get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

fn required<'a>(fields: &'a Map<String, Value>, name: &str) -> Result<&'a Value, String> {
    fields
        .get(name)
        .ok_or_else(|| format!("missing field {name:?}"))
}

fn string<'a>(fields: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    match required(fields, name)? {
        Value::String(s) => Ok(s),
        other => Err(format!(
            "field {name:?} must be a string, got {}",
            describe(other)
        )),
    }
}

fn non_empty_string<'a>(fields: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    let value = string(fields, name)?;
    if value.is_empty() {
        return Err(format!("field {name:?} must not be empty"));
    }
    Ok(value)
}

/// Describes a JSON value by its type and, unless it is null, its text, for
/// example `a number: 42` or `an array: [1,2]`.
fn describe(value: &Value) -> String {
    let kind = match value {
        Value::Null => return "null".to_owned(),
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    format!("{kind}: {}", quote(value))
}

/// Returns `value` as compact JSON, cut to [`MAX_QUOTED_CHARS`] characters
/// with `...` appended when longer, so that a huge value cannot flood the
/// dead-letter store.
fn quote(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

eliot_sdk::export_processor!(ValidateFormat);
