//! The sanity-filter plugin's configuration: allowed ranges and unit
//! conversions.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::Value;

/// Physically possible values for the simulator's `data` fields. Config
/// `ranges` overrides or extends these.
const DEFAULT_RANGES: [(&str, f64, f64); 8] = [
    ("latitude", -90.0, 90.0),
    ("longitude", -180.0, 180.0),
    // Below the Dead Sea shore (about -430 m), above Everest (8849 m).
    ("altitude_m", -500.0, 10_000.0),
    // Covers the lowest (-89.2 °C) and highest (56.7 °C) air temperatures
    // recorded on Earth.
    ("temperature_c", -90.0, 70.0),
    ("humidity_pct", 0.0, 100.0),
    // Direct sunlight is about 100 000 lux, so this allows twice that.
    ("light_lux", 0.0, 200_000.0),
    ("co2_ppm", 0.0, 100_000.0),
    ("flow_lps", 0.0, 100_000.0),
];

/// A unit conversion from one `data` field to another.
#[derive(Debug)]
pub struct Conversion {
    pub source: &'static str,
    pub target: &'static str,
    pub convert: fn(f64) -> f64,
}

/// The conversions `convert` may name, sorted by source and target.
const SUPPORTED_CONVERSIONS: [Conversion; 4] = [
    Conversion {
        source: "altitude_m",
        target: "altitude_ft",
        convert: |m| m / 0.3048,
    },
    Conversion {
        source: "flow_lps",
        target: "flow_m3h",
        convert: |lps| lps * 3.6,
    },
    Conversion {
        source: "temperature_c",
        target: "temperature_f",
        convert: |c| c * 9.0 / 5.0 + 32.0,
    },
    Conversion {
        source: "temperature_c",
        target: "temperature_k",
        convert: |c| c + 273.15,
    },
];

/// An inclusive range of allowed values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Range {
    pub min: f64,
    pub max: f64,
}

impl Range {
    pub fn contains(self, value: f64) -> bool {
        self.min <= value && value <= self.max
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}]", self.min, self.max)
    }
}

/// The plugin's TOML table, as the host passes it to `init`. Ranges stay
/// JSON values here so that a bad entry can be reported with its key, which
/// serde's own error would leave out.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    ranges: BTreeMap<String, Value>,
    convert: BTreeMap<String, String>,
}

/// Validated configuration.
#[derive(Debug)]
pub struct Config {
    /// Allowed range per `data` field: the defaults merged with `ranges`.
    pub ranges: BTreeMap<String, Range>,
    /// Conversions to apply, sorted by source field.
    pub conversions: Vec<&'static Conversion>,
}

impl Config {
    /// Parses and checks the plugin's configuration table.
    ///
    /// # Errors
    ///
    /// Returns a text naming the bad key, its value and the expected form.
    pub fn from_json(config: Value) -> Result<Self, String> {
        let raw: RawConfig = eliot_sdk::parse_config(config)?;

        let mut ranges: BTreeMap<String, Range> = DEFAULT_RANGES
            .iter()
            .map(|&(field, min, max)| (field.to_owned(), Range { min, max }))
            .collect();
        for (field, value) in &raw.ranges {
            ranges.insert(field.clone(), parse_range(field, value)?);
        }

        let conversions = raw
            .convert
            .iter()
            .map(|(source, target)| find_conversion(source, target))
            .collect::<Result<_, _>>()?;

        Ok(Self {
            ranges,
            conversions,
        })
    }
}

fn parse_range(field: &str, value: &Value) -> Result<Range, String> {
    let bounds = value
        .as_array()
        .map(|items| items.iter().map(Value::as_f64).collect::<Vec<_>>());
    let Some([Some(min), Some(max)]) = bounds.as_deref() else {
        return Err(format!(
            "invalid config: ranges.{field} must be [min, max] with two numbers, got {value}"
        ));
    };

    let range = Range {
        min: *min,
        max: *max,
    };
    if range.min > range.max {
        return Err(format!(
            "invalid config: ranges.{field} has min {} greater than max {}; write it as [min, max]",
            range.min, range.max
        ));
    }
    Ok(range)
}

fn find_conversion(source: &str, target: &str) -> Result<&'static Conversion, String> {
    SUPPORTED_CONVERSIONS
        .iter()
        .find(|c| c.source == source && c.target == target)
        .ok_or_else(|| {
            let supported: Vec<String> = SUPPORTED_CONVERSIONS
                .iter()
                .map(|c| format!("{} = {:?}", c.source, c.target))
                .collect();
            format!(
                "invalid config: convert.{source} = {target:?} is not a supported conversion; \
                 supported: {}",
                supported.join(", ")
            )
        })
}
