//! Eliot plugin that completes telemetry payloads before validation.
//!
//! For a JSON object payload it fills in a missing `device_id` from the
//! host's `device_id` header (set when the pipeline has a `device_key`) or
//! else from the topic, rewrites an RFC 3339 `timestamp` in UTC, adds the host's receive
//! time and sets a `device_id` message header. It rejects nothing: any other
//! payload passes unchanged, and the validator after it decides.

mod config;

#[cfg(test)]
mod tests;

use eliot_sdk::{Message, Outcome, PluginError, Processor};
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

use crate::config::{Config, TopicPattern};

/// The enrich processor.
#[derive(Debug)]
pub struct Enrich {
    topic_pattern: TopicPattern,
    received_at_field: String,
}

impl Processor for Enrich {
    const NAME: &'static str = "enrich";
    const VERSION: &'static str = "0.1.0";

    fn new(config: Value) -> Result<Self, String> {
        let Config { topic_pattern, received_at_field } = Config::from_json(config)?;
        Ok(Self { topic_pattern, received_at_field })
    }

    fn process(&mut self, mut msg: Message) -> Result<Outcome, PluginError> {
        let Ok(Value::Object(mut payload)) = serde_json::from_slice::<Value>(&msg.payload) else {
            return Ok(Outcome::Forward(msg));
        };

        let from_host = msg.header("device_id").map(str::to_owned);
        if let Some(device_id) = self.fill_device_id(&mut payload, from_host, &msg.topic) {
            msg.set_header("device_id", device_id);
        }

        let received_at = format_received_at(msg.received_at_ms)?;
        payload.insert(self.received_at_field.clone(), Value::String(received_at));

        if let Some(Value::String(timestamp)) = payload.get_mut("timestamp") {
            if let Some(utc) = timestamp_in_utc(timestamp) {
                *timestamp = utc;
            }
        }

        msg.payload = serde_json::to_vec(&payload).expect("a JSON map with string keys always serializes");
        Ok(Outcome::Forward(msg))
    }
}

impl Enrich {
    /// Returns the payload's device id. When `device_id` is missing, empty or
    /// not a string, first copies an id into the payload: the host's
    /// `from_host` if given, or else the id in `topic` if the topic matches
    /// the pattern.
    fn fill_device_id(
        &self,
        payload: &mut Map<String, Value>,
        from_host: Option<String>,
        topic: &str,
    ) -> Option<String> {
        if let Some(Value::String(device_id)) = payload.get("device_id") {
            if !device_id.is_empty() {
                return Some(device_id.clone());
            }
        }

        let device_id = match from_host.filter(|id| !id.is_empty()) {
            Some(id) => id,
            None => self.topic_pattern.device_id(topic)?.to_owned(),
        };
        payload.insert("device_id".to_owned(), Value::String(device_id.clone()));
        Some(device_id)
    }
}

/// Formats the host's receive time as RFC 3339 in UTC with milliseconds,
/// such as `2025-06-05T14:30:00.000Z`.
///
/// # Errors
///
/// Returns an invalid-message error when the time is after the year 9999,
/// which RFC 3339 cannot express.
fn format_received_at(received_at_ms: u64) -> Result<String, PluginError> {
    let out_of_range = || {
        PluginError::invalid(format!(
            "received_at_ms {received_at_ms} is after the year 9999 and cannot be written as an \
             RFC 3339 date-time"
        ))
    };

    let nanos = i128::from(received_at_ms) * 1_000_000;
    let received_at = OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| out_of_range())?;
    received_at
        .format(format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"))
        .map_err(|_| out_of_range())
}

/// Returns `timestamp` rewritten in UTC, such as `2022-03-20T10:00:00Z`, with
/// fractional seconds only when they are nonzero.
///
/// Returns `None`, so the caller keeps the text as written, when it is not
/// RFC 3339, when the UTC instant falls outside the years 0000–9999, or for
/// a leap second (second 60), which time would shift to 59.999999999.
fn timestamp_in_utc(timestamp: &str) -> Option<String> {
    // time 0.3 accepts any byte between date and time. RFC 3339 allows `T`,
    // `t` and, by the note in its section 5.6, a space.
    if !matches!(timestamp.as_bytes().get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    if timestamp.get(17..19) == Some("60") {
        return None;
    }

    let parsed = OffsetDateTime::parse(timestamp, &Rfc3339).ok()?;
    parsed.checked_to_offset(UtcOffset::UTC)?.format(&Rfc3339).ok()
}

eliot_sdk::export_processor!(Enrich);
