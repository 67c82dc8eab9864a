//! The main job end to end: real sensor data published to a real Mosquitto
//! (and to the embedded broker), through the three example plugins running
//! in wasmtime, into the file, republish and dead-letter sinks.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use eliot::config::Config;
use eliot::host::Host;
use eliot_tests::config::example_config;
use eliot_tests::data::{expected_messages, DeviceMessage};
use eliot_tests::plugins::build_examples;
use eliot_tests::wait::read_complete_lines;
use eliot_tests::{dead_letters, publish_all, Mosquitto, QoS, Subscriber};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

const PROCESSED_BY: [&str; 3] = ["enrich@0.1.0", "validate-format@0.1.0", "sanity-filter@0.1.0"];

/// Writes a configuration like the shipped one into `dir`, with the given
/// broker line and a republish sink beside the file sink, and loads it.
fn write_config(dir: &Path, broker: &str, plugin_dir: &Path) -> Config {
    let republish = r#"
[sinks.republish]
type = "mqtt"
topic = "processed/{payload.sensor_type}/{payload.device_id}"
"#;
    let text = example_config(broker, plugin_dir, "eliot-test", r#""file", "republish""#, republish);
    let path = dir.join("eliot.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until the pipeline has finished `expected` messages, and fails
/// with the counts when it does not within `timeout`.
async fn wait_finished(host: &Host, expected: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = host.snapshot()["telemetry"];
        let finished = stats.delivered + stats.dropped + stats.dead_lettered;
        if finished >= expected {
            return;
        }
        assert!(Instant::now() < deadline, "only {finished} of {expected} messages finished: {stats:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_json_lines(path: &Path) -> Vec<Value> {
    read_complete_lines(path).iter().map(|line| serde_json::from_str(line).unwrap()).collect()
}

/// What the example chain makes of one device message: the device id from
/// the topic where the payload lacks it, the timestamp in UTC, and flow in
/// cubic metres per hour (rounded to 6 decimals, as sanity-filter does).
/// The receive time is checked separately.
fn expected_payload(message: &DeviceMessage) -> Value {
    let mut payload = message.payload.clone();
    payload["device_id"] = json!(message.device_id);
    let stamp = payload["timestamp"].as_str().unwrap();
    let utc = OffsetDateTime::parse(stamp, &Rfc3339).unwrap().to_offset(UtcOffset::UTC);
    payload["timestamp"] = json!(utc.format(&Rfc3339).unwrap());
    if let Some(flow) = payload["data"].get("flow_lps").and_then(Value::as_f64) {
        let data = payload["data"].as_object_mut().unwrap();
        data.remove("flow_lps");
        data.insert("flow_m3h".to_owned(), json!((flow * 3.6 * 1e6).round() / 1e6));
    }
    payload
}

/// Removes `received_at` from a record's payload after checking that it is
/// an RFC 3339 UTC time with milliseconds.
fn take_received_at(payload: &mut Value) {
    let received = payload.as_object_mut().unwrap().remove("received_at").expect("received_at is set");
    let received = received.as_str().unwrap();
    assert!(received.ends_with('Z'), "received_at {received} is in UTC");
    assert_eq!(received.len(), 24, "received_at {received} has milliseconds");
    OffsetDateTime::parse(received, &Rfc3339).unwrap();
}

/// Checks every record of the file sink against the published device
/// messages: same count, per-device order, exact values.
fn check_records(records: &[Value], published: &[DeviceMessage]) {
    assert_eq!(records.len(), published.len(), "one record per valid input row");

    let mut by_topic: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for record in records {
        by_topic.entry(record["topic"].as_str().unwrap()).or_default().push(record);
    }
    let mut expected_by_topic: BTreeMap<&str, Vec<&DeviceMessage>> = BTreeMap::new();
    for message in published {
        expected_by_topic.entry(message.topic.as_str()).or_default().push(message);
    }
    assert_eq!(
        by_topic.keys().collect::<Vec<_>>(),
        expected_by_topic.keys().collect::<Vec<_>>(),
        "records cover exactly the published devices"
    );

    for (topic, expected) in &expected_by_topic {
        let actual = &by_topic[topic];
        assert_eq!(actual.len(), expected.len(), "record count of {topic}");
        for (index, (record, message)) in actual.iter().zip(expected).enumerate() {
            let mut payload = record["payload"].clone();
            take_received_at(&mut payload);
            assert_eq!(payload, expected_payload(message), "{topic} record {index} (per-device order)");
            assert_eq!(record["pipeline"], "telemetry");
            assert_eq!(record["processed_by"], json!(PROCESSED_BY));
            assert_eq!(record["headers"], json!([["device_id", message.device_id]]));
        }
    }
}

/// Malformed messages and the dead-letter reason each must produce; `None`
/// marks the one that sanity-filter drops instead.
fn malformed() -> Vec<(&'static str, Vec<u8>, Option<&'static str>)> {
    vec![
        ("devices/bad_001/telemetry", b"not json".to_vec(), Some("payload is not valid JSON: expected ident at line 1 column 2")),
        (
            "devices/bad_002/telemetry",
            br#"{"device_id":"bad_002","sensor_type":"gps","data":{}}"#.to_vec(),
            Some(r#"missing field "timestamp""#),
        ),
        (
            "devices/bad_003/telemetry",
            br#"{"device_id":"bad_003","timestamp":"yesterday","sensor_type":"gps","data":{}}"#.to_vec(),
            Some(r#"field "timestamp" is not an RFC 3339 date-time: "yesterday""#),
        ),
        (
            "devices/bad_004/telemetry",
            br#"{"device_id":"bad_004","timestamp":"2025-06-05T14:30:00Z","sensor_type":"gps","data":42}"#.to_vec(),
            Some(r#"field "data" must be a JSON object, got a number: 42"#),
        ),
        ("devices/bad_005/telemetry", b"[1,2]".to_vec(), Some("payload must be a JSON object, got an array: [1,2]")),
        ("devices/bad_006/telemetry", vec![0xff, 0xfe, 0x00], Some("payload is not valid UTF-8")),
        (
            "devices/bad_007/telemetry",
            br#"{"device_id":"bad_007","timestamp":"2025-06-05T14:30:00Z","sensor_type":"environment","data":{"humidity_pct":150}}"#
                .to_vec(),
            None,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_data_through_mosquitto() {
    // An unlimited queue: Mosquitto's default of 1,000 queued messages per
    // client would drop messages while the host works through the replay.
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let port = broker.port();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &format!("127.0.0.1:{port}"), &plugins);

    let mut host = Host::start(config).await.unwrap();
    assert!(host.wait_connected(Duration::from_secs(10)).await, "host connected to Mosquitto");
    let republished = tokio::task::spawn_blocking(move || Subscriber::connect(port, "processed/flow/#", QoS::AtLeastOnce))
        .await
        .unwrap();

    // Publish the real data with the malformed messages spread through it.
    let valid = expected_messages();
    let bad = malformed();
    let mut publishes: Vec<(String, Vec<u8>)> = Vec::new();
    for (index, message) in valid.iter().enumerate() {
        if index % 3000 == 0 && index / 3000 < bad.len() {
            let (topic, payload, _) = &bad[index / 3000];
            publishes.push(((*topic).to_owned(), payload.clone()));
        }
        publishes.push((message.topic.clone(), message.payload_bytes()));
    }
    assert_eq!(publishes.len(), valid.len() + bad.len());
    let total = publishes.len() as u64;
    tokio::task::spawn_blocking(move || publish_all(port, &publishes, QoS::AtLeastOnce)).await.unwrap();

    wait_finished(&host, total, Duration::from_secs(180)).await;
    let stats = host.snapshot()["telemetry"];
    host.shutdown(Duration::from_secs(10)).await;

    // Exact counts: published = delivered + dropped + dead-lettered.
    assert_eq!(stats.received, total);
    assert_eq!(stats.delivered, valid.len() as u64);
    assert_eq!(stats.records_out, valid.len() as u64);
    assert_eq!(stats.dropped, 1);
    assert_eq!(stats.dead_lettered, bad.len() as u64 - 1);

    let records = read_json_lines(&dir.path().join("out/processed.jsonl"));
    check_records(&records, &valid);

    let letters = dead_letters::read_all(dir.path().join("out/dead-letters.sqlite"));
    assert_eq!(letters.len(), bad.len() - 1);
    for (topic, payload, reason) in &bad {
        let Some(reason) = reason else {
            assert!(letters.iter().all(|l| l["topic"] != *topic), "the dropped reading is no dead letter");
            continue;
        };
        let letter = letters.iter().find(|l| l["topic"] == *topic).unwrap_or_else(|| panic!("no dead letter for {topic}"));
        assert_eq!(letter["pipeline"], "telemetry", "{topic}");
        assert_eq!(letter["stage"], "validate-format", "{topic}");
        assert_eq!(letter["kind"], "invalid", "{topic}");
        assert_eq!(letter["qos"], 1, "{topic}");
        let text = letter["reason"].as_str().unwrap();
        assert!(text.starts_with(reason), "{topic}: reason {text:?} should start with {reason:?}");
        let original = base64_decode(letter["payload_base64"].as_str().unwrap());
        assert_eq!(&original, payload, "{topic}: dead letter keeps the original bytes");
    }

    // The republish sink sent every flow record, in order, on its topic.
    let flow: Vec<&DeviceMessage> = valid.iter().filter(|m| m.device_id == "pipe_001").collect();
    let received = tokio::task::spawn_blocking(move || republished.collect(1268, Duration::from_secs(60))).await.unwrap();
    assert_eq!(received.len(), flow.len());
    for (message, expected) in received.iter().zip(&flow) {
        assert_eq!(message.topic, "processed/flow/pipe_001");
        let mut payload = message.json();
        take_received_at(&mut payload);
        assert_eq!(payload, expected_payload(expected));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_through_embedded_broker() {
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "embedded", &plugins);

    let mut host = Host::start(config).await.unwrap();
    assert!(host.wait_connected(Duration::from_secs(10)).await, "host connected to the embedded broker");
    assert!(host.broker.ip().is_loopback());

    let options = eliot::simulate::SimulateOptions {
        host: host.broker.ip().to_string(),
        port: host.broker.port(),
        rate: 0,
        limit: Some(50),
        qos: rumqttc::QoS::AtLeastOnce,
        client_id: "simulator-test".to_owned(),
    };
    let sent = eliot::simulate::replay(&options).await.unwrap();
    assert_eq!(sent, 200, "50 rows from each of the 4 devices");

    wait_finished(&host, sent, Duration::from_secs(60)).await;
    let stats = host.snapshot()["telemetry"];
    host.shutdown(Duration::from_secs(10)).await;
    assert_eq!((stats.delivered, stats.dropped, stats.dead_lettered), (200, 0, 0));

    let mut first_rows = Vec::new();
    for device in ["buoy_b01", "bike_001", "office_room_1", "pipe_001"] {
        first_rows.extend(expected_messages().into_iter().filter(|m| m.device_id == device).take(50));
    }
    let records = read_json_lines(&dir.path().join("out/processed.jsonl"));
    check_records(&records, &first_rows);
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).expect("payload_base64 is base64")
}
