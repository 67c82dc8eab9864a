use eliot_sdk::testing::{dropped, forwarded, json_message, message, payload_json};
use eliot_sdk::{ErrorKind, Processor};
use serde_json::{json, Value};

use crate::config::Range;
use crate::{round_to_micro, SanityFilter};

const TOPIC: &str = "devices/env_e04/telemetry";

fn filter_with(config: Value) -> SanityFilter {
    SanityFilter::new(config).expect("config should be accepted")
}

fn config_error(config: Value) -> String {
    SanityFilter::new(config).expect_err("config should be rejected")
}

fn reading(sensor_type: &str, data: Value) -> Value {
    json!({
        "device_id": "env_e04",
        "timestamp": "2022-03-20T10:00:00Z",
        "sensor_type": sensor_type,
        "data": data
    })
}

/// Runs `data` through a filter with `config` and returns the outcome.
fn filter_data(config: Value, data: Value) -> eliot_sdk::Outcome {
    filter_with(config)
        .process(json_message(TOPIC, &reading("environment", data)))
        .expect("sanity-filter should not fail")
}

/// Runs `data` through a filter with `config` and returns the forwarded
/// `data` object.
fn forwarded_data(config: Value, data: Value) -> Value {
    payload_json(&forwarded(filter_data(config, data)))["data"].clone()
}

fn drop_reason(config: Value, data: Value) -> String {
    dropped(filter_data(config, data))
}

fn rejection(payload: &[u8]) -> String {
    let error = filter_with(json!({}))
        .process(message(TOPIC, payload))
        .expect_err("message should be invalid");
    assert_eq!(error.kind, ErrorKind::Invalid);
    error.message
}

// Configuration

#[test]
fn describe_reports_name_and_version() {
    assert_eq!(SanityFilter::NAME, "sanity-filter");
    assert_eq!(SanityFilter::VERSION, "0.1.0");
}

#[test]
fn config_empty_uses_default_ranges() {
    let filter = filter_with(json!({}));
    let expected = [
        ("altitude_m", -500.0, 10_000.0),
        ("co2_ppm", 0.0, 100_000.0),
        ("flow_lps", 0.0, 100_000.0),
        ("humidity_pct", 0.0, 100.0),
        ("latitude", -90.0, 90.0),
        ("light_lux", 0.0, 200_000.0),
        ("longitude", -180.0, 180.0),
        ("temperature_c", -90.0, 70.0),
    ];
    let actual: Vec<(&str, f64, f64)> = filter
        .ranges
        .iter()
        .map(|(field, range)| (field.as_str(), range.min, range.max))
        .collect();
    assert_eq!(actual, expected);
    assert!(filter.conversions.is_empty());
}

#[test]
fn config_ranges_override_and_extend_defaults() {
    let filter =
        filter_with(json!({"ranges": {"temperature_c": [-40, 85], "pressure_hpa": [300.5, 1100]}}));
    assert_eq!(
        filter.ranges["temperature_c"],
        Range {
            min: -40.0,
            max: 85.0
        }
    );
    assert_eq!(
        filter.ranges["pressure_hpa"],
        Range {
            min: 300.5,
            max: 1100.0
        }
    );
    assert_eq!(
        filter.ranges["humidity_pct"],
        Range {
            min: 0.0,
            max: 100.0
        }
    );
}

#[test]
fn config_unknown_key_rejected() {
    assert_eq!(
        config_error(json!({"range": {}})),
        "invalid config: unknown field `range`, expected `ranges` or `convert`"
    );
}

#[test]
fn config_range_min_above_max_rejected() {
    assert_eq!(
        config_error(json!({"ranges": {"humidity_pct": [100, 0]}})),
        "invalid config: ranges.humidity_pct has min 100 greater than max 0; write it as [min, max]"
    );
}

#[test]
fn config_range_equal_bounds_accepted() {
    let filter = filter_with(json!({"ranges": {"flow_lps": [0, 0]}}));
    assert_eq!(filter.ranges["flow_lps"], Range { min: 0.0, max: 0.0 });
}

#[test]
fn config_range_malformed_rejected() {
    let cases = [
        (json!([1, 2, 3]), "[1,2,3]"),
        (json!([1]), "[1]"),
        (json!([]), "[]"),
        (json!(["0", 100]), "[\"0\",100]"),
        (json!([0, null]), "[0,null]"),
        (json!(100), "100"),
        (json!({"min": 0, "max": 100}), "{\"max\":100,\"min\":0}"),
    ];
    for (value, shown) in cases {
        assert_eq!(
            config_error(json!({"ranges": {"humidity_pct": value}})),
            format!("invalid config: ranges.humidity_pct must be [min, max] with two numbers, got {shown}")
        );
    }
}

#[test]
fn config_ranges_not_table_rejected() {
    assert_eq!(
        config_error(json!({"ranges": [0, 100]})),
        "invalid config: invalid type: sequence, expected a map"
    );
}

#[test]
fn config_supported_conversions_accepted() {
    let filter = filter_with(json!({"convert": {
        "temperature_c": "temperature_k",
        "flow_lps": "flow_m3h",
        "altitude_m": "altitude_ft"
    }}));
    let pairs: Vec<(&str, &str)> = filter
        .conversions
        .iter()
        .map(|c| (c.source, c.target))
        .collect();
    assert_eq!(
        pairs,
        [
            ("altitude_m", "altitude_ft"),
            ("flow_lps", "flow_m3h"),
            ("temperature_c", "temperature_k")
        ]
    );
}

#[test]
fn config_unsupported_conversion_rejected() {
    let supported = "supported: altitude_m = \"altitude_ft\", flow_lps = \"flow_m3h\", \
                     temperature_c = \"temperature_f\", temperature_c = \"temperature_k\"";
    assert_eq!(
        config_error(json!({"convert": {"temperature_c": "temperature_r"}})),
        format!(
            "invalid config: convert.temperature_c = \"temperature_r\" is not a supported \
             conversion; {supported}"
        )
    );
    assert_eq!(
        config_error(json!({"convert": {"flow_m3h": "flow_lps"}})),
        format!("invalid config: convert.flow_m3h = \"flow_lps\" is not a supported conversion; {supported}")
    );
}

#[test]
fn config_convert_target_not_string_rejected() {
    assert_eq!(
        config_error(json!({"convert": {"flow_lps": 3.6}})),
        "invalid config: invalid type: floating point `3.6`, expected a string"
    );
}

// Ranges

#[test]
fn simulator_readings_in_range_forwarded_unchanged() {
    let readings = [
        reading(
            "gps",
            json!({"latitude": 51.5, "longitude": -0.12, "altitude_m": 35.0}),
        ),
        reading("temperature", json!({"temperature_c": 4.929})),
        reading(
            "environment",
            json!({"temperature_c": 21.5, "humidity_pct": 40, "light_lux": 300, "co2_ppm": 415}),
        ),
        reading("flow", json!({"flow_lps": 12.5})),
    ];
    for payload in readings {
        let mut msg = json_message(TOPIC, &payload);
        msg.headers
            .push(("device_id".to_owned(), "env_e04".to_owned()));
        let out = filter_with(json!({})).process(msg.clone()).unwrap();
        assert_eq!(forwarded(out), msg, "payload {payload}");
    }
}

#[test]
fn bounds_are_inclusive() {
    for data in [
        json!({"latitude": -90, "longitude": 180}),
        json!({"humidity_pct": 0.0, "temperature_c": 70}),
        json!({"altitude_m": -500, "light_lux": 200000}),
    ] {
        forwarded_data(json!({}), data);
    }
}

#[test]
fn every_default_range_drops_outside_values() {
    let cases = [
        (json!({"latitude": 90.5}), "latitude 90.5 outside [-90, 90]"),
        (
            json!({"longitude": -180.01}),
            "longitude -180.01 outside [-180, 180]",
        ),
        (
            json!({"altitude_m": 10001}),
            "altitude_m 10001 outside [-500, 10000]",
        ),
        (
            json!({"temperature_c": -273.15}),
            "temperature_c -273.15 outside [-90, 70]",
        ),
        (
            json!({"humidity_pct": 150}),
            "humidity_pct 150 outside [0, 100]",
        ),
        (json!({"light_lux": -1}), "light_lux -1 outside [0, 200000]"),
        (
            json!({"co2_ppm": 100000.5}),
            "co2_ppm 100000.5 outside [0, 100000]",
        ),
        (
            json!({"flow_lps": -0.001}),
            "flow_lps -0.001 outside [0, 100000]",
        ),
    ];
    for (data, expected) in cases {
        assert_eq!(drop_reason(json!({}), data), expected);
    }
}

#[test]
fn configured_range_applies() {
    let config = json!({"ranges": {"temperature_c": [-40, 85], "pressure_hpa": [300, 1100]}});
    assert_eq!(
        drop_reason(config.clone(), json!({"temperature_c": 86})),
        "temperature_c 86 outside [-40, 85]"
    );
    assert_eq!(
        drop_reason(config.clone(), json!({"pressure_hpa": 12.5})),
        "pressure_hpa 12.5 outside [300, 1100]"
    );
    assert_eq!(
        forwarded_data(config, json!({"temperature_c": 80})),
        json!({"temperature_c": 80})
    );
}

#[test]
fn first_out_of_range_field_by_name_reported() {
    let data = json!({"temperature_c": 99, "humidity_pct": 150, "co2_ppm": -5});
    assert_eq!(
        drop_reason(json!({}), data),
        "co2_ppm -5 outside [0, 100000]"
    );
}

#[test]
fn unranged_fields_ignored() {
    let data = json!({"battery_v": -3, "status": "ok", "nested": {"humidity_pct": 500}});
    assert_eq!(forwarded_data(json!({}), data.clone()), data);
}

#[test]
fn top_level_fields_outside_data_ignored() {
    let mut payload = reading("temperature", json!({"temperature_c": 4.9}));
    payload["humidity_pct"] = json!(500);
    let msg = json_message(TOPIC, &payload);
    assert_eq!(
        forwarded(filter_with(json!({})).process(msg.clone()).unwrap()),
        msg
    );
}

#[test]
fn ranged_field_not_number_invalid() {
    let cases = [
        (
            json!({"humidity_pct": "high"}),
            "field \"data.humidity_pct\" must be a number, got a string: \"high\"",
        ),
        (
            json!({"temperature_c": null}),
            "field \"data.temperature_c\" must be a number, got null",
        ),
        (
            json!({"latitude": [51.5]}),
            "field \"data.latitude\" must be a number, got an array: [51.5]",
        ),
        (
            json!({"co2_ppm": true}),
            "field \"data.co2_ppm\" must be a number, got a boolean: true",
        ),
    ];
    for (data, expected) in cases {
        let payload = reading("environment", data);
        assert_eq!(rejection(payload.to_string().as_bytes()), expected);
    }
}

#[test]
fn type_error_wins_over_range_drop() {
    let payload = reading(
        "environment",
        json!({"co2_ppm": -5, "temperature_c": "warm"}),
    );
    assert_eq!(
        rejection(payload.to_string().as_bytes()),
        "field \"data.temperature_c\" must be a number, got a string: \"warm\""
    );
}

#[test]
fn long_value_truncated_in_reason() {
    let payload = reading("environment", json!({"humidity_pct": "x".repeat(100)}));
    assert_eq!(
        rejection(payload.to_string().as_bytes()),
        format!(
            "field \"data.humidity_pct\" must be a number, got a string: \"{}...",
            "x".repeat(63)
        )
    );
}

// Payload shape

#[test]
fn payload_not_json_invalid() {
    assert_eq!(
        rejection(b"hello"),
        "payload is not valid JSON: expected value at line 1 column 1"
    );
    assert_eq!(
        rejection(b""),
        "payload is not valid JSON: EOF while parsing a value at line 1 column 0"
    );
}

#[test]
fn payload_not_object_invalid() {
    assert_eq!(
        rejection(b"[1,2]"),
        "payload must be a JSON object, got an array: [1,2]"
    );
    assert_eq!(
        rejection(b"null"),
        "payload must be a JSON object, got null"
    );
    assert_eq!(
        rejection(b"4.929"),
        "payload must be a JSON object, got a number: 4.929"
    );
}

#[test]
fn data_missing_or_not_object_invalid() {
    assert_eq!(
        rejection(br#"{"device_id": "d"}"#),
        "missing field \"data\""
    );
    assert_eq!(
        rejection(br#"{"data": [4.9]}"#),
        "field \"data\" must be a JSON object, got an array: [4.9]"
    );
    assert_eq!(
        rejection(br#"{"data": null}"#),
        "field \"data\" must be a JSON object, got null"
    );
}

// Conversion

#[test]
fn temperature_converted_to_fahrenheit() {
    let config = json!({"convert": {"temperature_c": "temperature_f"}});
    assert_eq!(
        forwarded_data(config.clone(), json!({"temperature_c": 4.929})),
        json!({"temperature_f": 40.8722})
    );
    assert_eq!(
        forwarded_data(config.clone(), json!({"temperature_c": -40})),
        json!({"temperature_f": -40.0})
    );
    assert_eq!(
        forwarded_data(config.clone(), json!({"temperature_c": 36.6})),
        json!({"temperature_f": 97.88})
    );
    assert_eq!(
        forwarded_data(config, json!({"temperature_c": 0})),
        json!({"temperature_f": 32.0})
    );
}

#[test]
fn temperature_converted_to_kelvin() {
    let config = json!({"convert": {"temperature_c": "temperature_k"}});
    assert_eq!(
        forwarded_data(config.clone(), json!({"temperature_c": 21.5})),
        json!({"temperature_k": 294.65})
    );
    assert_eq!(
        forwarded_data(config.clone(), json!({"temperature_c": 4.929})),
        json!({"temperature_k": 278.079})
    );
    assert_eq!(
        forwarded_data(config, json!({"temperature_c": -90})),
        json!({"temperature_k": 183.15})
    );
}

#[test]
fn flow_converted_to_cubic_metres_per_hour() {
    let config = json!({"convert": {"flow_lps": "flow_m3h"}});
    assert_eq!(
        forwarded_data(config.clone(), json!({"flow_lps": 12.5})),
        json!({"flow_m3h": 45.0})
    );
    assert_eq!(
        forwarded_data(config, json!({"flow_lps": 0.1})),
        json!({"flow_m3h": 0.36})
    );
}

#[test]
fn altitude_converted_to_feet() {
    let config = json!({"convert": {"altitude_m": "altitude_ft"}});
    assert_eq!(
        forwarded_data(config.clone(), json!({"altitude_m": 0.3048})),
        json!({"altitude_ft": 1.0})
    );
    assert_eq!(
        forwarded_data(config, json!({"altitude_m": 35})),
        json!({"altitude_ft": 114.829396})
    );
}

#[test]
fn conversion_keeps_other_fields() {
    let config = json!({"convert": {"temperature_c": "temperature_f"}});
    let data = json!({"temperature_c": 20, "humidity_pct": 40, "light_lux": 300, "co2_ppm": 415});
    assert_eq!(
        forwarded_data(config, data),
        json!({"temperature_f": 68.0, "humidity_pct": 40, "light_lux": 300, "co2_ppm": 415})
    );
}

#[test]
fn conversion_overwrites_existing_target() {
    let config = json!({"convert": {"flow_lps": "flow_m3h"}});
    assert_eq!(
        forwarded_data(config, json!({"flow_lps": 1, "flow_m3h": 999})),
        json!({"flow_m3h": 3.6})
    );
}

#[test]
fn conversion_source_absent_forwards_unchanged() {
    let config = json!({"convert": {"flow_lps": "flow_m3h"}});
    let msg = json_message(
        TOPIC,
        &reading("gps", json!({"latitude": 1, "longitude": 2})),
    );
    assert_eq!(
        forwarded(filter_with(config).process(msg.clone()).unwrap()),
        msg
    );
}

#[test]
fn conversion_applies_after_range_check() {
    let config = json!({"convert": {"temperature_c": "temperature_f"}});
    assert_eq!(
        drop_reason(config, json!({"temperature_c": 80})),
        "temperature_c 80 outside [-90, 70]"
    );
}

#[test]
fn conversion_keeps_message_metadata() {
    let config = json!({"convert": {"flow_lps": "flow_m3h"}});
    let mut msg = json_message(TOPIC, &reading("flow", json!({"flow_lps": 2})));
    msg.headers
        .push(("device_id".to_owned(), "env_e04".to_owned()));
    msg.retain = true;

    let out = forwarded(filter_with(config).process(msg.clone()).unwrap());
    assert_eq!(out.topic, msg.topic);
    assert_eq!(out.headers, msg.headers);
    assert_eq!(out.retain, msg.retain);
    assert_eq!(payload_json(&out)["device_id"], "env_e04");
    assert_eq!(payload_json(&out)["data"], json!({"flow_m3h": 7.2}));
}

#[test]
fn conversion_too_large_for_json_invalid() {
    let config =
        json!({"ranges": {"altitude_m": [0, 1e308]}, "convert": {"altitude_m": "altitude_ft"}});
    let error = filter_with(config)
        .process(json_message(
            TOPIC,
            &reading("gps", json!({"altitude_m": 1e308})),
        ))
        .unwrap_err();
    assert_eq!(error.kind, ErrorKind::Invalid);
    assert_eq!(
        error.message,
        "converting data.altitude_m 1e+308 to altitude_ft gives a number too large for JSON"
    );
}

#[test]
fn rounding_keeps_six_decimals() {
    let noisy = 0.1 * 3.6;
    assert_ne!(noisy, 0.36);
    assert_eq!(round_to_micro(noisy), 0.36);
    assert_eq!(round_to_micro(1.000_000_4), 1.0);
    assert_eq!(round_to_micro(1.000_000_5), 1.000_001);
    assert_eq!(round_to_micro(-2.123_456_789), -2.123_457);
    assert_eq!(round_to_micro(1e300), 1e300);
    assert_eq!(round_to_micro(-1e300), -1e300);
}

/// The quick path passes a payload unchanged only where the full path
/// would forward it unchanged too, on the payloads where the two could
/// part: shapes serde reads differently from a JSON tree, repeated keys,
/// bytes outside the fields read, non-numbers, values at the range edges
/// and fields that a conversion replaces.
#[test]
fn quick_path_agrees_with_full_path() {
    let filter = filter_with(json!({"convert": {"flow_lps": "flow_m3h"}}));
    let payloads: Vec<Vec<u8>> = vec![
        serde_json::to_vec(&reading(
            "gps",
            json!({"latitude": 37.7749, "longitude": -122.4194, "accuracy": 3.2}),
        ))
        .unwrap(),
        serde_json::to_vec(&reading(
            "environment",
            json!({"humidity_pct": 100, "light_lux": 0}),
        ))
        .unwrap(),
        serde_json::to_vec(&reading("environment", json!({"humidity_pct": 100.5}))).unwrap(),
        serde_json::to_vec(&reading("environment", json!({"humidity_pct": "high"}))).unwrap(),
        serde_json::to_vec(&reading("flow", json!({"flow_lps": 1.5}))).unwrap(),
        br#"[{"data": {}}]"#.to_vec(),
        br#"{"data": {"latitude": 1}, "data": {"latitude": 100}}"#.to_vec(),
        br#"{"data": {"latitude": 100, "latitude": 1}}"#.to_vec(),
        br#"{"data": {"latitude": 1, "latitude": 100}}"#.to_vec(),
        br#"{"data": [], "x": 1}"#.to_vec(),
        br#"{"x": 1}"#.to_vec(),
        b"{\"data\": {}, \"note\": \"\xff\"}".to_vec(),
        br#"{"data": {"latitude": 1e400}}"#.to_vec(),
        br#"{"data": {"temperature_c": -90}, "nested": {"a": [1, 2, {"b": null}]}}"#.to_vec(),
    ];
    let mut quick = Vec::new();
    for (index, payload) in payloads.iter().enumerate() {
        let text = String::from_utf8_lossy(payload);
        if filter.passes_unchanged(payload) {
            quick.push(index);
            let full = filter.full(message(TOPIC, payload));
            assert!(
                matches!(&full, Ok(eliot_sdk::Outcome::Forward(m)) if m.payload == *payload),
                "{text}: {full:?}"
            );
        }
    }
    assert_eq!(
        quick,
        vec![0, 1, 7, 13],
        "ordinary readings take the quick path"
    );
}
