//! Eliot plugin that drops physically impossible sensor readings and
//! converts units.
//!
//! Each number in the payload's `data` object whose field has a range must
//! lie within it, or the message is dropped with a reason such as
//! `humidity_pct 150 outside [0, 100]`. Ranges apply to the fields as
//! received, before conversion. A ranged field that is not a number makes the
//! message invalid. Messages that pass then get the configured conversions,
//! for example `flow_lps` replaced by `flow_m3h`.

mod config;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::BTreeMap;

use eliot_sdk::{Message, Outcome, PluginError, Processor};
use serde::Deserialize;
use serde_json::{Map, Number, Value};

use crate::config::{Config, Conversion, Range};

/// Maximum number of characters of an offending value quoted in a reason.
const MAX_QUOTED_CHARS: usize = 64;

/// The sanity-filter processor.
#[derive(Debug)]
pub struct SanityFilter {
    ranges: BTreeMap<String, Range>,
    conversions: Vec<&'static Conversion>,
}

impl Processor for SanityFilter {
    const NAME: &'static str = "sanity-filter";
    const VERSION: &'static str = "0.1.0";

    fn new(config: Value) -> Result<Self, String> {
        let Config {
            ranges,
            conversions,
        } = Config::from_json(config)?;
        Ok(Self {
            ranges,
            conversions,
        })
    }

    fn process(&mut self, msg: Message) -> Result<Outcome, PluginError> {
        if self.passes_unchanged(&msg.payload) {
            return Ok(Outcome::Forward(msg));
        }
        self.full(msg)
    }
}

impl SanityFilter {
    /// Checks, drops or converts `msg` on a tree of its whole payload.
    fn full(&self, mut msg: Message) -> Result<Outcome, PluginError> {
        let mut payload = parse_object(&msg.payload).map_err(PluginError::invalid)?;
        let data = match payload.get_mut("data") {
            Some(Value::Object(data)) => data,
            Some(other) => {
                let reason = format!(
                    "field \"data\" must be a JSON object, got {}",
                    describe(other)
                );
                return Err(PluginError::invalid(reason));
            }
            None => return Err(PluginError::invalid("missing field \"data\"")),
        };

        // Type errors come first, so a malformed message is dead-lettered
        // even when another of its fields is out of range.
        for field in self.ranges.keys() {
            if let Some(value) = data.get(field) {
                number(field, value)?;
            }
        }
        if let Some(reason) = self.out_of_range(data) {
            return Ok(Outcome::Drop(reason));
        }

        if convert_units(&self.conversions, data)? {
            msg.payload = serde_json::to_vec(&payload)
                .expect("a JSON map with string keys always serializes");
        }
        Ok(Outcome::Forward(msg))
    }
}

/// The part of a reading this plugin looks at: the fields of `data`, keys
/// borrowed from the payload, every other field skipped without building a
/// tree of it.
#[derive(Deserialize)]
struct Reading<'a> {
    #[serde(borrow)]
    data: BTreeMap<Cow<'a, str>, Value>,
}

impl SanityFilter {
    /// Checks whether `payload` passes as it is: an object whose `data` has
    /// every ranged field that is present as a number in its range, and no
    /// field that a conversion replaces. That is the common case, and it
    /// needs neither a tree of the whole payload nor writing it again. On
    /// `false` the caller takes the full path, which finds the reason or
    /// converts. The full path also judges what serde reads differently
    /// from a JSON tree: a top level not written as an object (serde takes
    /// a sequence too), and `data` given twice.
    fn passes_unchanged(&self, payload: &[u8]) -> bool {
        // serde_json skips the strings of ignored fields without checking
        // their UTF-8, which the full parse checks.
        let Ok(text) = std::str::from_utf8(payload) else {
            return false;
        };
        if !text.trim_start().starts_with('{') {
            return false;
        }
        let Ok(reading) = serde_json::from_str::<Reading<'_>>(text) else {
            return false;
        };
        let converts = self
            .conversions
            .iter()
            .any(|conversion| reading.data.contains_key(conversion.source));
        let in_range =
            self.ranges
                .iter()
                .all(|(field, range)| match reading.data.get(field.as_str()) {
                    None => true,
                    Some(Value::Number(value)) => value.as_f64().is_some_and(|v| range.contains(v)),
                    Some(_) => false,
                });
        !converts && in_range
    }

    /// Returns the drop reason for the first out-of-range field, in field
    /// name order.
    fn out_of_range(&self, data: &Map<String, Value>) -> Option<String> {
        self.ranges.iter().find_map(|(field, range)| {
            let Some(Value::Number(value)) = data.get(field) else {
                return None;
            };
            let in_range = value.as_f64().is_some_and(|v| range.contains(v));
            (!in_range).then(|| format!("{field} {value} outside {range}"))
        })
    }
}

/// Replaces each conversion's source field in `data` with its target field,
/// overwriting a target field that is already there. Returns whether any
/// field changed.
///
/// # Errors
///
/// Returns an invalid-message error when a source field is not a number or
/// the result is too large for a JSON number.
fn convert_units(
    conversions: &[&Conversion],
    data: &mut Map<String, Value>,
) -> Result<bool, PluginError> {
    let mut changed = false;
    for conversion in conversions {
        let Some(value) = data.get(conversion.source) else {
            continue;
        };

        let source = number(conversion.source, value)?;
        let converted =
            Number::from_f64(round_to_micro((conversion.convert)(source))).ok_or_else(|| {
                PluginError::invalid(format!(
                    "converting data.{} {value} to {} gives a number too large for JSON",
                    conversion.source, conversion.target
                ))
            })?;

        data.remove(conversion.source);
        data.insert(conversion.target.to_owned(), Value::Number(converted));
        changed = true;
    }
    Ok(changed)
}

/// Rounds to 6 decimal places, so that 0.1 l/s becomes 0.36 m³/h rather than
/// 0.36000000000000004. Values too large to have a sixth decimal in an
/// `f64` are returned unchanged.
fn round_to_micro(value: f64) -> f64 {
    const SCALE: f64 = 1e6;
    // Above 2^53 every f64 is an integer, so rounding the scaled value would
    // change nothing, and the scaled value could overflow to infinity.
    const MAX_EXACT: f64 = 9_007_199_254_740_992.0;

    let scaled = value * SCALE;
    if scaled.abs() < MAX_EXACT {
        scaled.round() / SCALE
    } else {
        value
    }
}

/// Returns `value` as an `f64`, or an invalid-message error naming
/// `data.FIELD`.
fn number(field: &str, value: &Value) -> Result<f64, PluginError> {
    value.as_f64().ok_or_else(|| {
        PluginError::invalid(format!(
            "field \"data.{field}\" must be a number, got {}",
            describe(value)
        ))
    })
}

fn parse_object(payload: &[u8]) -> Result<Map<String, Value>, String> {
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| format!("payload is not valid JSON: {e}"))?;
    match value {
        Value::Object(fields) => Ok(fields),
        other => Err(format!(
            "payload must be a JSON object, got {}",
            describe(&other)
        )),
    }
}

/// Describes a JSON value by its type and, unless it is null, its text, for
/// example `a string: "high"`.
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
/// with `...` appended when longer.
fn quote(value: &Value) -> String {
    let text = value.to_string();
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

eliot_sdk::export_processor!(SanityFilter);
