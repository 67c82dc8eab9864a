use eliot_sdk::testing::{forwarded, json_message, message, payload_json};
use eliot_sdk::{ErrorKind, Message, Processor};
use serde_json::{json, Value};

use crate::Enrich;

const TOPIC: &str = "devices/buoy_b01/telemetry";

fn enrich_with(config: Value) -> Enrich {
    Enrich::new(config).expect("config should be accepted")
}

fn config_error(config: Value) -> String {
    Enrich::new(config).expect_err("config should be rejected")
}

fn process(plugin: &mut Enrich, msg: Message) -> Message {
    forwarded(plugin.process(msg).expect("enrich should not fail"))
}

fn enrich_payload(topic: &str, payload: Value) -> Message {
    process(&mut enrich_with(json!({})), json_message(topic, &payload))
}

fn telemetry() -> Value {
    json!({
        "device_id": "buoy_b01",
        "timestamp": "2016-02-15T00:00:00Z",
        "sensor_type": "temperature",
        "data": {"temperature_c": 4.929}
    })
}

fn without_device_id() -> Value {
    let mut payload = telemetry();
    payload.as_object_mut().unwrap().remove("device_id");
    payload
}

fn with_field(field: &str, value: Value) -> Value {
    let mut payload = telemetry();
    payload[field] = value;
    payload
}

// Configuration

#[test]
fn describe_reports_name_and_version() {
    assert_eq!(Enrich::NAME, "enrich");
    assert_eq!(Enrich::VERSION, "0.1.0");
}

#[test]
fn config_empty_uses_defaults() {
    let plugin = enrich_with(json!({}));
    assert_eq!(plugin.received_at_field, "received_at");
    assert_eq!(plugin.topic_pattern.device_id("devices/d1/telemetry"), Some("d1"));
}

#[test]
fn config_unknown_key_rejected() {
    assert_eq!(
        config_error(json!({"received_at": "x"})),
        "invalid config: unknown field `received_at`, \
         expected `device_id_topic_pattern` or `received_at_field`"
    );
}

#[test]
fn config_wrong_type_rejected() {
    assert_eq!(
        config_error(json!({"device_id_topic_pattern": 3})),
        "invalid config: invalid type: integer `3`, expected a string"
    );
}

#[test]
fn config_pattern_needs_one_whole_placeholder() {
    let cases = [
        "devices/telemetry",
        "devices/{device_id}/{device_id}",
        "devices/dev-{device_id}/telemetry",
        "devices/{device_id}/{device_id}x",
        "devices/{device_id",
        "",
    ];
    for pattern in cases {
        assert_eq!(
            config_error(json!({"device_id_topic_pattern": pattern})),
            format!(
                "invalid config: device_id_topic_pattern {pattern:?} must contain exactly one \
                 {{device_id}} placeholder as a whole topic level, for example \
                 \"devices/{{device_id}}/telemetry\""
            ),
            "pattern {pattern:?}"
        );
    }
}

#[test]
fn config_pattern_wildcards_rejected() {
    assert_eq!(
        config_error(json!({"device_id_topic_pattern": "site/+/{device_id}"})),
        "invalid config: device_id_topic_pattern \"site/+/{device_id}\" contains the MQTT wildcard '+', \
         but levels other than {device_id} match literally; replace the wildcard with the literal level"
    );
    assert_eq!(
        config_error(json!({"device_id_topic_pattern": "devices/{device_id}/#"})),
        "invalid config: device_id_topic_pattern \"devices/{device_id}/#\" contains the MQTT wildcard '#', \
         but levels other than {device_id} match literally; replace the wildcard with the literal level"
    );
}

#[test]
fn config_received_at_field_empty_rejected() {
    assert_eq!(
        config_error(json!({"received_at_field": ""})),
        "invalid config: received_at_field must not be empty; remove the key to use \"received_at\""
    );
}

#[test]
fn config_received_at_field_telemetry_name_rejected() {
    for field in ["device_id", "timestamp", "sensor_type", "data"] {
        assert_eq!(
            config_error(json!({"received_at_field": field})),
            format!(
                "invalid config: received_at_field {field:?} would overwrite a field of the telemetry \
                 format (device_id, timestamp, sensor_type, data); choose another name, \
                 such as \"received_at\""
            )
        );
    }
}

// Topic pattern

#[test]
fn pattern_matches_levels_literally() {
    let plugin = enrich_with(json!({"device_id_topic_pattern": "site/{device_id}/data/raw"}));
    let pattern = &plugin.topic_pattern;

    assert_eq!(pattern.device_id("site/p7/data/raw"), Some("p7"));
    assert_eq!(pattern.device_id("site/p7/data"), None);
    assert_eq!(pattern.device_id("site/p7/data/raw/extra"), None);
    assert_eq!(pattern.device_id("Site/p7/data/raw"), None);
    assert_eq!(pattern.device_id("site/p7/data/cooked"), None);
    assert_eq!(pattern.device_id("site//data/raw"), None);
    assert_eq!(pattern.device_id(""), None);
}

#[test]
fn pattern_placeholder_first_or_last_level() {
    let first = enrich_with(json!({"device_id_topic_pattern": "{device_id}/telemetry"}));
    assert_eq!(first.topic_pattern.device_id("pump_3/telemetry"), Some("pump_3"));

    let last = enrich_with(json!({"device_id_topic_pattern": "telemetry/{device_id}"}));
    assert_eq!(last.topic_pattern.device_id("telemetry/pump_3"), Some("pump_3"));
    assert_eq!(last.topic_pattern.device_id("telemetry/"), None);
}

// Device id

#[test]
fn device_id_missing_taken_from_topic() {
    let out = enrich_payload(TOPIC, without_device_id());
    assert_eq!(payload_json(&out)["device_id"], "buoy_b01");
    assert_eq!(out.header("device_id"), Some("buoy_b01"));
}

#[test]
fn device_id_not_string_replaced_from_topic() {
    for bad in [json!(42), json!(null), json!(""), json!({"id": "x"})] {
        let out = enrich_payload("devices/gps_7/telemetry", with_field("device_id", bad.clone()));
        assert_eq!(payload_json(&out)["device_id"], "gps_7", "device_id {bad}");
        assert_eq!(out.header("device_id"), Some("gps_7"), "device_id {bad}");
    }
}

#[test]
fn device_id_present_kept_over_topic() {
    let out = enrich_payload("devices/other/telemetry", telemetry());
    assert_eq!(payload_json(&out)["device_id"], "buoy_b01");
    assert_eq!(out.header("device_id"), Some("buoy_b01"));
}

#[test]
fn device_id_missing_taken_from_host_header() {
    let mut msg = json_message("gateways/gw1/data", &without_device_id());
    msg.set_header("device_id", "meter-7");
    let out = process(&mut enrich_with(json!({})), msg);
    assert_eq!(payload_json(&out)["device_id"], "meter-7");
    assert_eq!(out.header("device_id"), Some("meter-7"));
}

#[test]
fn device_id_host_header_preferred_over_topic() {
    let mut msg = json_message(TOPIC, &without_device_id());
    msg.set_header("device_id", "meter-7");
    let out = process(&mut enrich_with(json!({})), msg);
    assert_eq!(payload_json(&out)["device_id"], "meter-7");
}

#[test]
fn device_id_in_payload_kept_over_host_header() {
    let mut msg = json_message(TOPIC, &telemetry());
    msg.set_header("device_id", "meter-7");
    let out = process(&mut enrich_with(json!({})), msg);
    assert_eq!(payload_json(&out)["device_id"], "buoy_b01");
}

#[test]
fn device_id_topic_mismatch_left_missing() {
    let out = enrich_payload("sensors/buoy_b01/telemetry", without_device_id());
    assert_eq!(payload_json(&out).get("device_id"), None);
    assert_eq!(out.header("device_id"), None);
}

#[test]
fn device_id_not_string_and_mismatch_kept() {
    let out = enrich_payload("sensors/buoy_b01", with_field("device_id", json!(42)));
    assert_eq!(payload_json(&out)["device_id"], 42);
    assert_eq!(out.header("device_id"), None);
}

#[test]
fn device_id_header_replaces_existing() {
    let mut msg = json_message(TOPIC, &telemetry());
    msg.headers.push(("device_id".to_owned(), "stale".to_owned()));
    msg.headers.push(("trace".to_owned(), "abc".to_owned()));

    let out = process(&mut enrich_with(json!({})), msg);
    assert_eq!(
        out.headers,
        vec![("trace".to_owned(), "abc".to_owned()), ("device_id".to_owned(), "buoy_b01".to_owned())]
    );
}

// Receive time

#[test]
fn received_at_added_with_milliseconds() {
    let out = enrich_payload(TOPIC, telemetry());
    assert_eq!(payload_json(&out)["received_at"], "2025-06-05T14:30:00.000Z");

    let mut msg = json_message(TOPIC, &telemetry());
    msg.received_at_ms = 1_749_133_800_123;
    let out = process(&mut enrich_with(json!({})), msg);
    assert_eq!(payload_json(&out)["received_at"], "2025-06-05T14:30:00.123Z");
}

#[test]
fn received_at_epoch_zero() {
    let mut msg = json_message(TOPIC, &telemetry());
    msg.received_at_ms = 0;
    let out = process(&mut enrich_with(json!({})), msg);
    assert_eq!(payload_json(&out)["received_at"], "1970-01-01T00:00:00.000Z");
}

#[test]
fn received_at_custom_field() {
    let out = process(
        &mut enrich_with(json!({"received_at_field": "ingested_at"})),
        json_message(TOPIC, &telemetry()),
    );
    let payload = payload_json(&out);
    assert_eq!(payload["ingested_at"], "2025-06-05T14:30:00.000Z");
    assert_eq!(payload.get("received_at"), None);
}

#[test]
fn received_at_overwrites_existing_value() {
    let out = enrich_payload(TOPIC, with_field("received_at", json!("earlier")));
    assert_eq!(payload_json(&out)["received_at"], "2025-06-05T14:30:00.000Z");
}

#[test]
fn received_at_after_year_9999_invalid() {
    for received_at_ms in [253_402_300_800_000, u64::MAX] {
        let mut msg = json_message(TOPIC, &telemetry());
        msg.received_at_ms = received_at_ms;
        let error = enrich_with(json!({})).process(msg).unwrap_err();
        assert_eq!(error.kind, ErrorKind::Invalid);
        assert_eq!(
            error.message,
            format!(
                "received_at_ms {received_at_ms} is after the year 9999 and cannot be written as an \
                 RFC 3339 date-time"
            )
        );
    }
}

#[test]
fn received_at_last_millisecond_of_9999() {
    let mut msg = json_message(TOPIC, &telemetry());
    msg.received_at_ms = 253_402_300_799_999;
    let out = process(&mut enrich_with(json!({})), msg);
    assert_eq!(payload_json(&out)["received_at"], "9999-12-31T23:59:59.999Z");
}

// Timestamp

#[test]
fn timestamp_offset_converted_to_utc() {
    let cases = [
        ("2022-03-20T11:00:00+01:00", "2022-03-20T10:00:00Z"),
        ("2022-03-20T00:30:00+01:00", "2022-03-19T23:30:00Z"),
        ("2022-12-31T20:15:00-05:30", "2023-01-01T01:45:00Z"),
        ("2022-03-20T11:00:00.250+01:00", "2022-03-20T10:00:00.25Z"),
        ("2022-03-20T11:00:00.000+01:00", "2022-03-20T10:00:00Z"),
        ("2022-03-20T10:00:00-00:00", "2022-03-20T10:00:00Z"),
        ("2016-02-15T00:00:00Z", "2016-02-15T00:00:00Z"),
        ("2016-02-15T00:00:00.123456789Z", "2016-02-15T00:00:00.123456789Z"),
        ("2016-02-15t00:00:00z", "2016-02-15T00:00:00Z"),
        ("2016-02-15 01:00:00+01:00", "2016-02-15T00:00:00Z"),
    ];
    for (timestamp, expected) in cases {
        let out = enrich_payload(TOPIC, with_field("timestamp", json!(timestamp)));
        assert_eq!(payload_json(&out)["timestamp"], expected, "timestamp {timestamp}");
    }
}

#[test]
fn timestamp_unparseable_left_as_is() {
    let cases = [
        json!("yesterday"),
        json!("2016-02-15 00:00:00"),
        json!("2016-02-15T00:00:00"),
        json!("2016-02-30T00:00:00Z"),
        json!("2016-02-15X00:00:00Z"),
        json!("2016-02-15_00:00:00+01:00"),
        json!(""),
        json!(1_455_494_400),
        json!(null),
    ];
    for timestamp in cases {
        let out = enrich_payload(TOPIC, with_field("timestamp", timestamp.clone()));
        assert_eq!(payload_json(&out)["timestamp"], timestamp, "timestamp {timestamp}");
    }
}

#[test]
fn timestamp_leap_second_left_as_is() {
    for timestamp in ["2016-12-31T23:59:60Z", "2017-01-01T00:59:60+01:00"] {
        let out = enrich_payload(TOPIC, with_field("timestamp", json!(timestamp)));
        assert_eq!(payload_json(&out)["timestamp"], timestamp);
    }
}

#[test]
fn timestamp_utc_before_year_0000_kept() {
    let timestamp = "0000-01-01T00:30:00+01:00";
    let out = enrich_payload(TOPIC, with_field("timestamp", json!(timestamp)));
    assert_eq!(payload_json(&out)["timestamp"], timestamp);
}

#[test]
fn timestamp_missing_stays_missing() {
    let mut payload = telemetry();
    payload.as_object_mut().unwrap().remove("timestamp");
    let out = enrich_payload(TOPIC, payload);
    assert_eq!(payload_json(&out).get("timestamp"), None);
}

// Whole message

#[test]
fn telemetry_enriched_end_to_end() {
    let payload = json!({
        "timestamp": "2022-03-20T11:00:00+01:00",
        "sensor_type": "environment",
        "data": {"temperature_c": 21.5, "humidity_pct": 40, "light_lux": 300, "co2_ppm": 415},
        "firmware": "1.2.3"
    });
    let out = enrich_payload("devices/env_e04/telemetry", payload);
    assert_eq!(
        payload_json(&out),
        json!({
            "device_id": "env_e04",
            "timestamp": "2022-03-20T10:00:00Z",
            "sensor_type": "environment",
            "data": {"temperature_c": 21.5, "humidity_pct": 40, "light_lux": 300, "co2_ppm": 415},
            "firmware": "1.2.3",
            "received_at": "2025-06-05T14:30:00.000Z"
        })
    );
}

#[test]
fn message_metadata_preserved() {
    let mut msg = json_message(TOPIC, &telemetry());
    msg.retain = true;
    msg.qos = eliot_sdk::Qos::ExactlyOnce;
    let out = process(&mut enrich_with(json!({})), msg.clone());

    assert_eq!(out.topic, msg.topic);
    assert_eq!(out.qos, msg.qos);
    assert_eq!(out.retain, msg.retain);
    assert_eq!(out.received_at_ms, msg.received_at_ms);
}

#[test]
fn non_object_payload_forwarded_unchanged() {
    let payloads: [&[u8]; 7] =
        [b"[1, 2, 3]", b"\"buoy\"", b"4.929", b"null", b"{\"device_id\": ", b"\xff\xfe{}", b""];
    for payload in payloads {
        let msg = message(TOPIC, payload);
        let out = process(&mut enrich_with(json!({})), msg.clone());
        assert_eq!(out, msg, "payload {:?}", String::from_utf8_lossy(payload));
    }
}
