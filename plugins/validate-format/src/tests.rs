use eliot_sdk::testing::{forwarded, json_message, message};
use eliot_sdk::{ErrorKind, Processor};
use serde_json::{json, Value};

use crate::ValidateFormat;

const TOPIC: &str = "devices/buoy_b01/telemetry";

fn validator_with(config: Value) -> ValidateFormat {
    ValidateFormat::new(config).expect("config should be accepted")
}

fn config_error(config: Value) -> String {
    ValidateFormat::new(config).expect_err("config should be rejected")
}

fn telemetry() -> Value {
    json!({
        "device_id": "buoy_b01",
        "timestamp": "2016-02-15T00:00:00Z",
        "sensor_type": "temperature",
        "data": {"temperature_c": 4.929}
    })
}

fn with_field(field: &str, value: Value) -> Value {
    let mut payload = telemetry();
    payload[field] = value;
    payload
}

fn without_field(field: &str) -> Value {
    let mut payload = telemetry();
    payload.as_object_mut().unwrap().remove(field);
    payload
}

/// Asserts that the default validator forwards `payload` unchanged.
fn assert_valid(payload: &Value) {
    let msg = json_message(TOPIC, payload);
    let out = validator_with(json!({}))
        .process(msg.clone())
        .expect("payload should be valid");
    assert_eq!(forwarded(out), msg, "payload {payload}");
}

/// Runs `payload` through a validator with `config` and returns the reason
/// of the invalid-message error.
fn rejection_with(config: Value, payload: &[u8]) -> String {
    let error = validator_with(config)
        .process(message(TOPIC, payload))
        .expect_err("payload should be rejected");
    assert_eq!(error.kind, ErrorKind::Invalid);
    error.message
}

fn rejection(payload: &Value) -> String {
    rejection_with(json!({}), payload.to_string().as_bytes())
}

// Configuration

#[test]
fn describe_reports_name_and_version() {
    assert_eq!(ValidateFormat::NAME, "validate-format");
    assert_eq!(ValidateFormat::VERSION, "0.1.0");
}

#[test]
fn config_empty_uses_defaults() {
    let validator = validator_with(json!({}));
    assert_eq!(validator.config.max_payload_bytes, 65_536);
    assert_eq!(validator.config.allowed_sensor_types, None);
}

#[test]
fn config_unknown_key_rejected() {
    assert_eq!(
        config_error(json!({"max_bytes": 10})),
        "invalid config: unknown field `max_bytes`, expected `allowed_sensor_types` or `max_payload_bytes`"
    );
}

#[test]
fn config_wrong_types_rejected() {
    assert_eq!(
        config_error(json!({"max_payload_bytes": -1})),
        "invalid config: invalid value: integer `-1`, expected u64"
    );
    assert_eq!(
        config_error(json!({"allowed_sensor_types": "gps"})),
        "invalid config: invalid type: string \"gps\", expected a sequence"
    );
}

#[test]
fn config_zero_max_payload_bytes_rejected() {
    assert_eq!(
        config_error(json!({"max_payload_bytes": 0})),
        "invalid config: max_payload_bytes must be at least 1, got 0"
    );
}

#[test]
fn config_empty_allowed_sensor_types_rejected() {
    assert_eq!(
        config_error(json!({"allowed_sensor_types": []})),
        "invalid config: allowed_sensor_types is empty, so every message would be rejected; \
         list at least one type, or remove the key to accept any type"
    );
}

#[test]
fn config_empty_sensor_type_name_rejected() {
    assert_eq!(
        config_error(json!({"allowed_sensor_types": ["gps", ""]})),
        "invalid config: allowed_sensor_types contains an empty string: [\"gps\", \"\"]; \
         sensor_type is never empty, so remove it"
    );
}

// Valid payloads

#[test]
fn every_simulator_sensor_type_valid() {
    let payloads = [
        json!({"device_id": "gps_g01", "timestamp": "2016-02-15T00:00:00Z", "sensor_type": "gps",
               "data": {"latitude": 51.5, "longitude": -0.12, "altitude_m": 35.0}}),
        telemetry(),
        json!({"device_id": "env_e04", "timestamp": "2022-03-20T11:00:00+01:00", "sensor_type": "environment",
               "data": {"temperature_c": 21.5, "humidity_pct": 40, "light_lux": 300, "co2_ppm": 415}}),
        json!({"device_id": "flow_f02", "timestamp": "2022-03-20T10:00:00.25Z", "sensor_type": "flow",
               "data": {"flow_lps": 12.5}}),
    ];
    for payload in &payloads {
        assert_valid(payload);
    }
}

#[test]
fn extra_fields_and_empty_data_valid() {
    let mut payload = with_field("data", json!({}));
    payload["received_at"] = json!("2025-06-05T14:30:00.000Z");
    payload["firmware"] = json!({"version": "1.2.3"});
    assert_valid(&payload);
}

#[test]
fn valid_message_forwarded_unchanged() {
    let mut msg = message(
        TOPIC,
        br#"{ "device_id":"d", "timestamp":"2016-02-15T00:00:00Z", "sensor_type":"gps", "data":{} }"#,
    );
    msg.headers.push(("device_id".to_owned(), "d".to_owned()));
    msg.retain = true;
    let out = validator_with(json!({})).process(msg.clone()).unwrap();
    assert_eq!(forwarded(out), msg);
}

// Payload

#[test]
fn payload_over_max_size_invalid() {
    let payload = telemetry().to_string();
    let limit = payload.len() - 1;
    assert_eq!(
        rejection_with(json!({"max_payload_bytes": limit}), payload.as_bytes()),
        format!(
            "payload is {} bytes, more than max_payload_bytes ({limit})",
            payload.len()
        )
    );
}

#[test]
fn payload_at_max_size_valid() {
    let msg = json_message(TOPIC, &telemetry());
    let mut validator = validator_with(json!({"max_payload_bytes": msg.payload.len()}));
    assert!(validator.process(msg).is_ok());
}

#[test]
fn payload_over_default_size_invalid() {
    let mut payload = telemetry();
    payload["padding"] = json!("x".repeat(65_536));
    let payload = payload.to_string();
    assert_eq!(
        rejection_with(json!({}), payload.as_bytes()),
        format!(
            "payload is {} bytes, more than max_payload_bytes (65536)",
            payload.len()
        )
    );
}

#[test]
fn payload_not_utf8_invalid() {
    assert_eq!(
        rejection_with(json!({}), b"{\"device_id\": \"b\xff01\"}"),
        "payload is not valid UTF-8: invalid utf-8 sequence of 1 bytes from index 16"
    );
}

#[test]
fn payload_not_json_invalid() {
    let cases: [(&[u8], &str); 5] = [
        (
            b"hello",
            "payload is not valid JSON: expected value at line 1 column 1",
        ),
        (
            b"nothing",
            "payload is not valid JSON: expected ident at line 1 column 2",
        ),
        (
            b"",
            "payload is not valid JSON: EOF while parsing a value at line 1 column 0",
        ),
        (
            b"{\"device_id\": ",
            "payload is not valid JSON: EOF while parsing a value at line 1 column 14",
        ),
        (
            b"{} {}",
            "payload is not valid JSON: trailing characters at line 1 column 4",
        ),
    ];
    for (payload, expected) in cases {
        assert_eq!(rejection_with(json!({}), payload), expected);
    }
}

#[test]
fn payload_not_object_invalid() {
    let cases = [
        (
            json!([1, 2]),
            "payload must be a JSON object, got an array: [1,2]",
        ),
        (
            json!("buoy"),
            "payload must be a JSON object, got a string: \"buoy\"",
        ),
        (
            json!(4.929),
            "payload must be a JSON object, got a number: 4.929",
        ),
        (
            json!(true),
            "payload must be a JSON object, got a boolean: true",
        ),
        (json!(null), "payload must be a JSON object, got null"),
    ];
    for (payload, expected) in cases {
        assert_eq!(rejection(&payload), expected);
    }
}

// Fields

#[test]
fn device_id_missing_invalid() {
    assert_eq!(
        rejection(&without_field("device_id")),
        "missing field \"device_id\""
    );
}

#[test]
fn device_id_wrong_type_invalid() {
    let cases = [
        (
            json!(42),
            "field \"device_id\" must be a string, got a number: 42",
        ),
        (
            json!(null),
            "field \"device_id\" must be a string, got null",
        ),
        (
            json!({"id": "b01"}),
            "field \"device_id\" must be a string, got an object: {\"id\":\"b01\"}",
        ),
    ];
    for (value, expected) in cases {
        assert_eq!(rejection(&with_field("device_id", value)), expected);
    }
}

#[test]
fn device_id_empty_invalid() {
    assert_eq!(
        rejection(&with_field("device_id", json!(""))),
        "field \"device_id\" must not be empty"
    );
}

#[test]
fn timestamp_missing_invalid() {
    assert_eq!(
        rejection(&without_field("timestamp")),
        "missing field \"timestamp\""
    );
}

#[test]
fn timestamp_not_string_invalid() {
    assert_eq!(
        rejection(&with_field("timestamp", json!(1_455_494_400))),
        "field \"timestamp\" must be a string, got a number: 1455494400"
    );
}

#[test]
fn timestamp_not_rfc3339_invalid() {
    let cases = [
        "yesterday",
        "",
        "2016-02-15",
        "2016-02-15T00:00:00",
        "2016-02-15_00:00:00Z",
        "2016-02-15X00:00:00Z",
        "2016-02-30T00:00:00Z",
        "2016-02-15T24:00:00Z",
        "15/02/2016 00:00",
    ];
    for timestamp in cases {
        assert_eq!(
            rejection(&with_field("timestamp", json!(timestamp))),
            format!("field \"timestamp\" is not an RFC 3339 date-time: {timestamp:?}")
        );
    }
}

#[test]
fn timestamp_rfc3339_variants_valid() {
    for timestamp in [
        "2016-02-15T00:00:00Z",
        "2016-02-15t00:00:00z",
        "2016-02-15 00:00:00Z",
        "2016-12-31T23:59:60Z",
        "2022-03-20T11:00:00+01:00",
        "2022-03-20T11:00:00-05:30",
        "2022-03-20T11:00:00.123456789Z",
    ] {
        assert_valid(&with_field("timestamp", json!(timestamp)));
    }
}

#[test]
fn sensor_type_missing_invalid() {
    assert_eq!(
        rejection(&without_field("sensor_type")),
        "missing field \"sensor_type\""
    );
}

#[test]
fn sensor_type_wrong_type_or_empty_invalid() {
    assert_eq!(
        rejection(&with_field("sensor_type", json!(["gps"]))),
        "field \"sensor_type\" must be a string, got an array: [\"gps\"]"
    );
    assert_eq!(
        rejection(&with_field("sensor_type", json!(""))),
        "field \"sensor_type\" must not be empty"
    );
}

#[test]
fn sensor_type_not_allowed_invalid() {
    let config = json!({"allowed_sensor_types": ["gps", "temperature"]});
    let payload = with_field("sensor_type", json!("sonar"));
    assert_eq!(
        rejection_with(config, payload.to_string().as_bytes()),
        "field \"sensor_type\" must be one of \"gps\", \"temperature\" (allowed_sensor_types), got \"sonar\""
    );
}

#[test]
fn sensor_type_allowed_valid() {
    let mut validator = validator_with(json!({"allowed_sensor_types": ["gps", "temperature"]}));
    assert!(validator.process(json_message(TOPIC, &telemetry())).is_ok());
}

#[test]
fn sensor_type_allowed_match_is_exact() {
    let config = json!({"allowed_sensor_types": ["temperature"]});
    let payload = with_field("sensor_type", json!("Temperature"));
    assert_eq!(
        rejection_with(config, payload.to_string().as_bytes()),
        "field \"sensor_type\" must be one of \"temperature\" (allowed_sensor_types), got \"Temperature\""
    );
}

#[test]
fn data_missing_invalid() {
    assert_eq!(rejection(&without_field("data")), "missing field \"data\"");
}

#[test]
fn data_not_object_invalid() {
    let cases = [
        (
            json!(42),
            "field \"data\" must be a JSON object, got a number: 42",
        ),
        (
            json!(null),
            "field \"data\" must be a JSON object, got null",
        ),
        (
            json!("4.929"),
            "field \"data\" must be a JSON object, got a string: \"4.929\"",
        ),
        (
            json!([4.929]),
            "field \"data\" must be a JSON object, got an array: [4.929]",
        ),
    ];
    for (value, expected) in cases {
        assert_eq!(rejection(&with_field("data", value)), expected);
    }
}

// Reasons

#[test]
fn first_problem_in_fixed_order_reported() {
    let payload = json!({"timestamp": "yesterday", "sensor_type": "", "data": 1});
    assert_eq!(rejection(&payload), "missing field \"device_id\"");

    let payload = json!({"device_id": "d", "timestamp": "yesterday", "sensor_type": "", "data": 1});
    assert_eq!(
        rejection(&payload),
        "field \"timestamp\" is not an RFC 3339 date-time: \"yesterday\""
    );

    let payload = json!({"device_id": "d", "timestamp": "2016-02-15T00:00:00Z", "sensor_type": "", "data": 1});
    assert_eq!(
        rejection(&payload),
        "field \"sensor_type\" must not be empty"
    );
}

#[test]
fn long_value_truncated_to_64_chars() {
    let long = "a".repeat(100);
    let expected_quote = format!("\"{}...", "a".repeat(63));
    assert_eq!(
        rejection(&with_field("timestamp", json!(long))),
        format!("field \"timestamp\" is not an RFC 3339 date-time: {expected_quote}")
    );
}

#[test]
fn value_of_64_chars_not_truncated() {
    let value = "b".repeat(62);
    assert_eq!(
        rejection(&with_field("timestamp", json!(value))),
        format!("field \"timestamp\" is not an RFC 3339 date-time: \"{value}\"")
    );
}

#[test]
fn truncation_respects_char_boundaries() {
    let long = "é".repeat(100);
    let expected_quote = format!("\"{}...", "é".repeat(63));
    assert_eq!(
        rejection(&with_field("timestamp", json!(long))),
        format!("field \"timestamp\" is not an RFC 3339 date-time: {expected_quote}")
    );
}

/// The quick check accepts only what the full check accepts, on the
/// payloads where the two could part: shapes serde reads differently from
/// a JSON tree, escapes, repeated keys and bytes outside the fields read.
#[test]
fn quick_check_agrees_with_full_check() {
    let validator = validator_with(json!({"allowed_sensor_types": ["gps", "temperature"]}));
    let payloads: Vec<Vec<u8>> = vec![
        serde_json::to_vec(&telemetry()).unwrap(),
        br#"["buoy_b01", "2016-02-15T00:00:00Z", "temperature", {}]"#.to_vec(),
        br#" {"device_id": "b\u0031", "timestamp": "2016-02-15T00:00:00Z", "sensor_type": "gps", "data": {}}"#.to_vec(),
        br#"{"device_id": "", "timestamp": "2016-02-15T00:00:00Z", "sensor_type": "gps", "data": {}}"#.to_vec(),
        br#"{"device_id": "a", "device_id": "", "timestamp": "2016-02-15T00:00:00Z", "sensor_type": "gps", "data": {}}"#.to_vec(),
        br#"{"device_id": "", "device_id": "a", "timestamp": "2016-02-15T00:00:00Z", "sensor_type": "gps", "data": {}}"#.to_vec(),
        br#"{"device_id": "a", "timestamp": "2016-02-15x00:00:00Z", "sensor_type": "gps", "data": {}}"#.to_vec(),
        br#"{"device_id": "a", "timestamp": "2016-02-15T00:00:00Z", "sensor_type": "sonar", "data": {}}"#.to_vec(),
        br#"{"device_id": "a", "timestamp": "2016-02-15T00:00:00Z", "sensor_type": "gps", "data": []}"#.to_vec(),
        br#"{"device_id": "a", "timestamp": "2016-02-15T00:00:00Z", "sensor_type": "gps", "data": {}} x"#.to_vec(),
        br#"{"device_id": "a", "timestamp": "2016-02-15T00:00:00Z", "sensor_type": "gps", "data": {"x": [1, {"y": null}]}, "extra": "\ud83d\ude00"}"#.to_vec(),
        b"{\"device_id\": \"a\", \"timestamp\": \"2016-02-15T00:00:00Z\", \"sensor_type\": \"gps\", \"data\": {}, \"note\": \"\xff\"}".to_vec(),
        br#"{"device_id": 7, "timestamp": "2016-02-15T00:00:00Z", "sensor_type": "gps", "data": {}}"#.to_vec(),
        br#"{"timestamp": "2016-02-15T00:00:00Z", "sensor_type": "gps", "data": {}}"#.to_vec(),
        b"".to_vec(),
    ];
    // The quick way never takes what the full check refuses; what it
    // leaves (repeated keys, an array at the top) goes to the full check.
    for payload in &payloads {
        let text = String::from_utf8_lossy(payload);
        assert!(
            !validator.accepts(payload) || validator.check(payload).is_ok(),
            "{text}"
        );
    }
    let taken: Vec<usize> = (0..payloads.len())
        .filter(|&i| validator.accepts(&payloads[i]))
        .collect();
    assert_eq!(
        taken,
        vec![0, 2, 10],
        "ordinary readings, escapes included, take the quick way"
    );
}
