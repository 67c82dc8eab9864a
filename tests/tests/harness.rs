//! Self-tests of the integration-test harness: the broker, the MQTT
//! clients, the bundled data, the waits and the plugin build.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use eliot_tests::data;
use eliot_tests::mqtt::{publish_all, QoS, ReceivedMessage, Subscriber};
use eliot_tests::plugins;
use eliot_tests::wait::{read_complete_lines, wait_for_json_lines, wait_for_lines, wait_until};
use eliot_tests::Mosquitto;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(30);

fn numbered_messages(topic: &str, count: usize) -> Vec<(String, Vec<u8>)> {
    (0..count)
        .map(|index| {
            (
                topic.to_owned(),
                json!({ "index": index }).to_string().into_bytes(),
            )
        })
        .collect()
}

fn indexes(messages: &[ReceivedMessage]) -> Vec<u64> {
    messages
        .iter()
        .map(|message| message.json()["index"].as_u64().expect("index is a number"))
        .collect()
}

fn is_marker(message: &ReceivedMessage) -> bool {
    message.payload == b"marker"
}

// Broker

#[test]
fn broker_accepts_connections() {
    let mut broker = Mosquitto::start();

    assert_ne!(broker.port(), 0);
    assert_ne!(
        broker.port(),
        1883,
        "the system broker's port is never used"
    );
    assert!(broker.is_running());
    assert!(broker.pid().is_some());
    assert!(TcpStream::connect(broker.address()).is_ok());
    assert!(broker.log().contains("running"), "log:\n{}", broker.log());
}

#[test]
fn brokers_get_separate_ports() {
    let first = Mosquitto::start();
    let second = Mosquitto::start();

    assert_ne!(first.port(), second.port());
    assert_ne!(first.dir(), second.dir());
}

#[test]
fn builder_options_reach_config() {
    let broker = Mosquitto::builder()
        .persistence(true)
        .max_inflight_messages(7)
        .max_queued_messages(11)
        .config_line("max_keepalive 120")
        .start();
    let config = fs::read_to_string(broker.config_path()).unwrap();

    assert!(
        config.contains(&format!("listener {} 127.0.0.1\n", broker.port())),
        "{config}"
    );
    assert!(config.contains("allow_anonymous true\n"), "{config}");
    assert!(config.contains("persistence true\n"), "{config}");
    assert!(config.contains("persistence_location "), "{config}");
    assert!(config.contains("max_inflight_messages 7\n"), "{config}");
    assert!(config.contains("max_queued_messages 11\n"), "{config}");
    assert!(config.contains("max_keepalive 120\n"), "{config}");
    assert!(
        config.contains(&format!("log_dest file {}", broker.log_path().display())),
        "{config}"
    );
}

#[test]
fn kill_closes_port_and_restart_reopens() {
    let mut broker = Mosquitto::start();
    let port = broker.port();

    broker.kill();
    assert!(!broker.is_running());
    assert!(TcpStream::connect(broker.address()).is_err());

    broker.restart();
    assert_eq!(broker.port(), port);
    assert!(broker.is_running());
    assert!(TcpStream::connect(broker.address()).is_ok());
}

#[test]
#[should_panic(expected = "is in use by another process")]
fn restart_on_taken_port_fails() {
    let mut broker = Mosquitto::start();
    broker.kill();
    let _holder = std::net::TcpListener::bind(broker.address()).unwrap();

    broker.restart();
}

#[test]
fn stop_twice_is_harmless() {
    let mut broker = Mosquitto::start();

    broker.stop();
    broker.stop();
    assert!(!broker.is_running());
    assert!(
        broker.log().contains("terminating"),
        "log:\n{}",
        broker.log()
    );
}

#[test]
fn verbose_log_records_packets() {
    let broker = Mosquitto::builder().verbose_log(true).start();

    publish_all(broker.port(), &[("verbose/test", b"x")], QoS::AtLeastOnce);

    wait_until("the broker logged the PUBLISH", TIMEOUT, || {
        broker.log().contains("Received PUBLISH")
    });
}

#[test]
#[should_panic(expected = "apt-get install -y mosquitto")]
fn missing_binary_names_install_command() {
    Mosquitto::builder()
        .binary("/nonexistent/mosquitto")
        .start();
}

// MQTT clients

#[test]
fn round_trip_of_all_sensor_data() {
    // No queue limit, so that a subscriber that falls behind loses nothing.
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let subscriber = Subscriber::connect(broker.port(), "devices/+/telemetry", QoS::AtLeastOnce);
    let sent = data::expected_messages();

    publish_all(broker.port(), &data::to_publishes(&sent), QoS::AtLeastOnce);
    let received = subscriber.collect(sent.len(), TIMEOUT);

    for (sent, received) in sent.iter().zip(&received) {
        assert_eq!(received.topic, sent.topic);
        assert_eq!(received.json(), sent.payload);
        assert_eq!(received.qos, QoS::AtLeastOnce);
    }
    assert!(subscriber.drain().is_empty());
}

#[test]
fn round_trip_at_each_qos() {
    // Mosquitto 2.0.11 (Debian 12) stops forwarding messages that arrived
    // with QoS 2 once a subscriber has max_inflight_messages (default 20) in
    // flight, even after the subscriber acknowledges them. No maximum avoids
    // that stall.
    let broker = Mosquitto::builder().max_inflight_messages(0).start();

    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let topic = format!("qos/{}", qos as u8);
        let subscriber = Subscriber::connect(broker.port(), &topic, qos);

        publish_all(broker.port(), &numbered_messages(&topic, 50), qos);
        let received = subscriber.collect(50, TIMEOUT);

        assert_eq!(indexes(&received), (0..50).collect::<Vec<_>>(), "{qos:?}");
        assert!(received.iter().all(|message| message.qos == qos), "{qos:?}");
    }
}

#[test]
fn publish_of_nothing_returns() {
    let broker = Mosquitto::start();
    let nothing: [(&str, &[u8]); 0] = [];

    publish_all(broker.port(), &nothing, QoS::AtLeastOnce);
}

#[test]
#[should_panic(expected = "failed to publish 1 messages")]
fn publish_to_closed_port_fails() {
    let mut broker = Mosquitto::start();
    broker.kill();

    publish_all(broker.port(), &[("a", b"b")], QoS::AtLeastOnce);
}

#[test]
#[should_panic(expected = "lost its connection")]
fn subscriber_reports_lost_connection() {
    let mut broker = Mosquitto::start();
    let subscriber = Subscriber::connect(broker.port(), "#", QoS::AtLeastOnce);

    broker.kill();
    subscriber.collect(1, TIMEOUT);
}

#[test]
#[should_panic(expected = "received 2")]
fn subscriber_timeout_names_count() {
    let broker = Mosquitto::start();
    let subscriber = Subscriber::connect(broker.port(), "count", QoS::AtLeastOnce);

    publish_all(
        broker.port(),
        &numbered_messages("count", 2),
        QoS::AtLeastOnce,
    );
    subscriber.collect(3, Duration::from_millis(300));
}

#[test]
fn collect_until_stops_at_marker() {
    let broker = Mosquitto::start();
    let subscriber = Subscriber::connect(broker.port(), "marker/#", QoS::AtLeastOnce);
    let mut messages = numbered_messages("marker/data", 3);
    messages.push(("marker/end".to_owned(), b"marker".to_vec()));

    publish_all(broker.port(), &messages, QoS::AtLeastOnce);
    let received = subscriber.collect_until(TIMEOUT, is_marker);

    assert_eq!(received.len(), 4);
    assert_eq!(received[3].topic, "marker/end");
}

#[test]
fn restart_keeps_persistent_session() {
    let mut broker = Mosquitto::builder().persistence(true).start();
    let offline = Subscriber::builder(broker.port(), "persist/#")
        .client_id("persistent-subscriber")
        .clean_session(false)
        .connect();
    offline.disconnect();

    publish_all(
        broker.port(),
        &numbered_messages("persist/a", 40),
        QoS::AtLeastOnce,
    );
    broker.restart();
    assert!(broker
        .dir()
        .join("persistence")
        .join("mosquitto.db")
        .is_file());

    let resumed = Subscriber::builder(broker.port(), "persist/#")
        .client_id("persistent-subscriber")
        .clean_session(false)
        .connect();
    let received = resumed.collect(40, TIMEOUT);
    assert_eq!(indexes(&received), (0..40).collect::<Vec<_>>());
}

#[test]
fn restart_without_persistence_loses_session() {
    let mut broker = Mosquitto::start();
    let offline = Subscriber::builder(broker.port(), "volatile/#")
        .client_id("volatile-subscriber")
        .clean_session(false)
        .connect();
    offline.disconnect();

    publish_all(
        broker.port(),
        &numbered_messages("volatile/a", 10),
        QoS::AtLeastOnce,
    );
    broker.restart();

    let resumed = Subscriber::builder(broker.port(), "volatile/#")
        .client_id("volatile-subscriber")
        .clean_session(false)
        .connect();
    publish_all(
        broker.port(),
        &[("volatile/end", b"marker")],
        QoS::AtLeastOnce,
    );
    let received = resumed.collect_until(TIMEOUT, is_marker);
    assert_eq!(
        received.len(),
        1,
        "queued messages survived a restart without persistence"
    );
}

#[test]
fn max_queued_messages_drops_excess() {
    let broker = Mosquitto::builder().max_queued_messages(5).start();
    let offline = Subscriber::builder(broker.port(), "queue/#")
        .client_id("queue-subscriber")
        .clean_session(false)
        .connect();
    offline.disconnect();

    publish_all(
        broker.port(),
        &numbered_messages("queue/a", 20),
        QoS::AtLeastOnce,
    );
    let resumed = Subscriber::builder(broker.port(), "queue/#")
        .client_id("queue-subscriber")
        .clean_session(false)
        .connect();
    publish_all(broker.port(), &[("queue/end", b"marker")], QoS::AtLeastOnce);
    let received = resumed.collect_until(TIMEOUT, is_marker);

    let queued = &received[..received.len() - 1];
    assert_eq!(indexes(queued), (0..5).collect::<Vec<_>>());
}

#[test]
fn subscriber_reconnects_after_restart() {
    let mut broker = Mosquitto::builder().persistence(true).start();
    let subscriber = Subscriber::builder(broker.port(), "reconnect/#")
        .client_id("reconnecting-subscriber")
        .clean_session(false)
        .reconnect(true)
        .connect();

    broker.restart();
    // The persistent session queues these until the subscriber is back.
    publish_all(
        broker.port(),
        &numbered_messages("reconnect/a", 10),
        QoS::AtLeastOnce,
    );
    let received = subscriber.collect(10, TIMEOUT);

    assert_eq!(indexes(&received), (0..10).collect::<Vec<_>>());
}

// Bundled data

#[test]
fn data_row_counts() {
    assert_eq!(data::buoy_messages().len(), 19226);
    assert_eq!(data::gps_messages().len(), 978);
    assert_eq!(data::office_messages().len(), 509);
    assert_eq!(data::water_flow_messages().len(), 1268);
    assert_eq!(data::expected_messages().len(), 19226 + 978 + 509 + 1268);
}

#[test]
fn buoy_first_and_last_messages() {
    let messages = data::buoy_messages();

    assert_eq!(messages[0].topic, "devices/buoy_b01/telemetry");
    assert_eq!(messages[0].device_id, "buoy_b01");
    assert_eq!(
        messages[0].payload,
        json!({
            "device_id": "buoy_b01",
            "timestamp": "2016-02-15T00:00:00Z",
            "sensor_type": "temperature",
            "data": { "temperature_c": 4.929 }
        })
    );
    assert_eq!(
        messages.last().unwrap().payload["timestamp"],
        "2017-03-22T00:00:00Z"
    );
    assert_eq!(
        messages.last().unwrap().payload["data"]["temperature_c"],
        4.316
    );
}

#[test]
fn gps_messages_count_seconds() {
    let messages = data::gps_messages();

    assert_eq!(
        messages[0].payload,
        json!({
            "device_id": "bike_001",
            "timestamp": "2025-06-05T14:30:00Z",
            "sensor_type": "gps",
            "data": { "latitude": 51.5782653, "longitude": 16.116775, "altitude_m": 118.0 }
        })
    );
    assert_eq!(messages[1].payload["timestamp"], "2025-06-05T14:30:01Z");
    assert_eq!(messages[977].payload["timestamp"], "2025-06-05T14:46:17Z");
    assert_eq!(messages[977].topic, "devices/bike_001/telemetry");
}

#[test]
fn office_messages_omit_device_id() {
    let messages = data::office_messages();

    assert_eq!(
        messages[0].payload,
        json!({
            "timestamp": "2015-02-04T17:51:00+01:00",
            "sensor_type": "environment",
            "data": {
                "temperature_c": 23.18,
                "humidity_pct": 27.272,
                "light_lux": 426.0,
                "co2_ppm": 721.25
            }
        })
    );
    assert_eq!(messages[0].topic, "devices/office_room_1/telemetry");
    assert_eq!(messages[0].device_id, "office_room_1");
    for message in &messages {
        assert!(
            message.payload.get("device_id").is_none(),
            "{:?}",
            message.payload
        );
        let timestamp = message.payload["timestamp"].as_str().unwrap();
        assert!(timestamp.ends_with("+01:00"), "{timestamp}");
    }
    assert_eq!(
        messages[508].payload["timestamp"],
        "2015-02-10T09:19:00+01:00"
    );
}

#[test]
fn water_flow_keeps_offsets() {
    let messages = data::water_flow_messages();

    assert_eq!(
        messages[0].payload,
        json!({
            "device_id": "pipe_001",
            "timestamp": "2022-03-20T11:00:00+01:00",
            "sensor_type": "flow",
            "data": { "flow_lps": 100.59 }
        })
    );
    assert_eq!(
        messages[1267].payload["timestamp"],
        "2022-05-16T22:00:00+02:00"
    );
    assert_eq!(messages[1267].data()["flow_lps"], 104.1);
}

#[test]
fn payload_bytes_parse_back() {
    for message in data::expected_messages().iter().step_by(997) {
        let parsed: serde_json::Value = serde_json::from_slice(&message.payload_bytes()).unwrap();
        assert_eq!(parsed, message.payload);
        assert_eq!(
            message.topic,
            format!("devices/{}/telemetry", message.device_id)
        );
    }
}

// Waits

#[test]
fn wait_for_lines_sees_appended_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    let writer_path = path.clone();

    let writer = std::thread::spawn(move || {
        for index in 0..5 {
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&writer_path)
                .unwrap();
            writeln!(file, "{}", json!({ "index": index })).unwrap();
        }
    });
    let values = wait_for_json_lines(&path, 5, TIMEOUT);
    writer.join().unwrap();

    assert_eq!(values.len(), 5);
    assert_eq!(values[4], json!({ "index": 4 }));
}

#[test]
fn partial_last_line_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");

    assert!(read_complete_lines(&path).is_empty());
    fs::write(&path, "first\nsecond").unwrap();
    assert_eq!(read_complete_lines(&path), ["first"]);
}

#[test]
#[should_panic(expected = "found 1 complete lines")]
fn wait_for_lines_timeout_names_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.jsonl");
    fs::write(&path, "only\n").unwrap();

    wait_for_lines(&path, 2, Duration::from_millis(50));
}

#[test]
#[should_panic(expected = "waiting until the flag is set")]
fn wait_until_timeout_names_condition() {
    wait_until("the flag is set", Duration::from_millis(50), || false);
}

// Plugins

#[test]
fn example_plugins_build_as_components() {
    let dir = plugins::build_examples();

    for file in ["validate_format.wasm", "enrich.wasm", "sanity_filter.wasm"] {
        let bytes = fs::read(dir.join(file)).unwrap_or_else(|err| panic!("{file}: {err}"));
        assert_eq!(&bytes[..4], b"\0asm", "{file} is not WebAssembly");
        // Version 0x0d and layer 1 mark a component, not a core module.
        assert_eq!(
            &bytes[4..8],
            [0x0d, 0x00, 0x01, 0x00],
            "{file} is not a component"
        );
    }
    assert_eq!(plugins::build_examples(), dir);
    assert_eq!(plugins::build_plugin("enrich"), dir.join("enrich.wasm"));
}
