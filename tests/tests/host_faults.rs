//! Faults of the host process and of the broker, each against a real
//! Mosquitto the test starts, stops and restarts, with the `eliot` binary as
//! a child process. Every test proves exact counts: each published message
//! is in the file sink at least once, and duplicates are counted and
//! reported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use eliot_tests::config::write_example_config;
use eliot_tests::data::{interleaved_messages as messages, DeviceMessage};
use eliot_tests::plugins::build_examples;
use eliot_tests::process::HostProcess;
use eliot_tests::wait::{read_complete_lines, wait_until};
use eliot_tests::{dead_letters, publish_all, Mosquitto, QoS};

const ELIOT: &str = env!("CARGO_BIN_EXE_eliot-under-test");

fn publishes(messages: &[DeviceMessage]) -> Vec<(String, Vec<u8>)> {
    messages
        .iter()
        .map(|m| (m.topic.clone(), m.payload_bytes()))
        .collect()
}

/// Identity of one record: the device and its reading's source timestamp
/// (unique per device in the bundled data), before normalisation.
fn key_of_message(message: &DeviceMessage) -> (String, String) {
    (
        message.device_id.clone(),
        normalise(message.payload["timestamp"].as_str().unwrap()),
    )
}

fn normalise(stamp: &str) -> String {
    use time::format_description::well_known::Rfc3339;
    let parsed = time::OffsetDateTime::parse(stamp, &Rfc3339).unwrap();
    parsed
        .to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap()
}

/// Counts of the file sink against what was published.
#[derive(Debug, Default)]
struct Tally {
    /// Published messages found at least once.
    present: usize,
    /// Extra copies of messages found more than once.
    duplicates: usize,
    /// Lines that are not JSON: a write torn by SIGKILL.
    torn: usize,
    /// Records of messages that were never published.
    unknown: usize,
}

fn tally(output: &Path, published: &[DeviceMessage]) -> Tally {
    let mut seen: BTreeMap<(String, String), usize> =
        published.iter().map(|m| (key_of_message(m), 0)).collect();
    let mut tally = Tally::default();
    for line in read_complete_lines(output) {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&line) else {
            tally.torn += 1;
            continue;
        };
        let payload = &record["payload"];
        let key = (
            payload["device_id"].as_str().unwrap_or_default().to_owned(),
            payload["timestamp"].as_str().unwrap_or_default().to_owned(),
        );
        match seen.get_mut(&key) {
            Some(count) => *count += 1,
            None => tally.unknown += 1,
        }
    }
    tally.present = seen.values().filter(|c| **c > 0).count();
    tally.duplicates = seen.values().map(|c| c.saturating_sub(1)).sum();
    tally
}

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    fn new(broker: &Mosquitto) -> Self {
        let plugins = build_examples();
        let dir = tempfile::tempdir().unwrap();
        let config =
            write_example_config(dir.path(), &broker.address(), &plugins, "eliot-fault-test");
        Self { dir, config }
    }

    fn output(&self) -> PathBuf {
        self.dir.path().join("out/processed.jsonl")
    }

    fn start_host(&self, log_name: &str) -> HostProcess {
        HostProcess::start(
            Path::new(ELIOT),
            &self.config,
            &self.dir.path().join(log_name),
        )
    }
}

#[test]
fn sigkill_mid_stream_loses_nothing() {
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let setup = Setup::new(&broker);
    let published = messages(20_000);
    let mut host = setup.start_host("host-1.log");

    let port = broker.port();
    let to_send = publishes(&published);
    let publisher = std::thread::spawn(move || publish_all(port, &to_send, QoS::AtLeastOnce));

    let output = setup.output();
    wait_until(
        "the host wrote 3,000 records",
        Duration::from_secs(120),
        || read_complete_lines(&output).len() >= 3_000,
    );
    host.kill_9();
    let before_restart = tally(&output, &published);
    assert!(
        before_restart.present < published.len(),
        "the kill came before the end of the stream"
    );

    // The persistent session kept what the dead host had not acknowledged,
    // and the broker queued the rest.
    let mut host = setup.start_host("host-2.log");
    publisher.join().expect("publisher thread");
    wait_until(
        "every published message is in the file sink",
        Duration::from_secs(180),
        || tally(&output, &published).present == published.len(),
    );
    let status = host.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "host exited with {status}:\n{}",
        host.log()
    );

    let tally = tally(&output, &published);
    println!("SIGKILL mid-stream: {tally:?}");
    assert_eq!(tally.present, 20_000, "0 lost");
    assert_eq!(tally.unknown, 0);
    assert!(
        tally.torn <= 1,
        "at most the one line being written when the host died is torn: {tally:?}"
    );
}

#[test]
fn sigterm_keeps_session_and_delivers_what_arrived_meanwhile() {
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let setup = Setup::new(&broker);
    let published = messages(6_000);
    let (first, second) = published.split_at(3_000);
    let output = setup.output();

    let mut host = setup.start_host("host-1.log");
    publish_all(broker.port(), &publishes(first), QoS::AtLeastOnce);
    wait_until(
        "the host wrote 1,000 records",
        Duration::from_secs(60),
        || read_complete_lines(&output).len() >= 1_000,
    );
    let status = host.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "graceful shutdown exits 0, got {status}:\n{}",
        host.log()
    );

    // Published while no host runs: the broker queues them for the session.
    publish_all(broker.port(), &publishes(second), QoS::AtLeastOnce);

    let mut host = setup.start_host("host-2.log");
    wait_until(
        "all 6,000 messages are in the file sink",
        Duration::from_secs(120),
        || tally(&output, &published).present == published.len(),
    );
    let status = host.terminate(Duration::from_secs(30));
    assert!(status.success(), "host exited with {status}");

    let tally = tally(&output, &published);
    println!("SIGTERM and restart: {tally:?}");
    assert_eq!(tally.present, 6_000, "0 lost");
    assert_eq!(tally.torn, 0, "a graceful shutdown tears no line");
    assert_eq!(tally.unknown, 0);
    // A graceful shutdown acknowledges everything it stored, so nothing
    // comes back twice.
    assert_eq!(tally.duplicates, 0, "duplicates after a graceful shutdown");
}

/// Restarts Mosquitto between two halves of a stream, and checks that the
/// host resumes: with persistence every message arrives; without it the
/// session is gone, and the host must subscribe again by itself.
fn broker_restart(persistence: bool) {
    let mut broker = Mosquitto::builder()
        .max_queued_messages(0)
        .persistence(persistence)
        .start();
    let setup = Setup::new(&broker);
    let published = messages(4_000);
    let (first, second) = published.split_at(2_000);
    let output = setup.output();
    let mut host = setup.start_host("host.log");

    publish_all(broker.port(), &publishes(first), QoS::AtLeastOnce);
    wait_until(
        "the host wrote 500 records",
        Duration::from_secs(60),
        || read_complete_lines(&output).len() >= 500,
    );
    // SIGTERM: Mosquitto writes its persistence file on the way out.
    broker.stop();
    broker.restart();
    if persistence {
        host.wait_for_log("session_present=true", Duration::from_secs(60));
    } else {
        // Without a session the host subscribes again; publishing before
        // the broker confirmed that would lose messages to no subscriber.
        host.wait_for_log_count("subscribed", 2, Duration::from_secs(60));
    }

    publish_all(broker.port(), &publishes(second), QoS::AtLeastOnce);
    let expected: Vec<DeviceMessage> = if persistence {
        published.clone()
    } else {
        second.to_vec()
    };
    wait_until(
        "the expected messages are in the file sink",
        Duration::from_secs(120),
        || tally(&output, &expected).present == expected.len(),
    );
    let status = host.terminate(Duration::from_secs(30));
    assert!(status.success(), "host exited with {status}");

    let all = tally(&output, &published);
    println!("broker restart, persistence {persistence}: {all:?}");
    assert_eq!(
        tally(&output, &expected).present,
        expected.len(),
        "0 lost of what the broker kept"
    );
    assert_eq!(all.unknown, 0);
    if persistence {
        assert_eq!(all.present, 4_000);
    } else {
        // Subscriptions restored: the second half arrived after the broker
        // forgot the session.
        assert_eq!(tally(&output, second).present, 2_000);
    }
}

#[test]
fn broker_restart_with_persistence_loses_nothing() {
    broker_restart(true);
}

#[test]
fn broker_restart_without_persistence_resubscribes() {
    broker_restart(false);
}

/// Restarts Mosquitto while the host republishes every result, and checks
/// that every result reaches a subscriber of the republished topics. The
/// republish connection keeps no session, so whatever the broker had not
/// acknowledged when it stopped must be sent again by the host; the input
/// is acknowledged only once the broker confirmed its output.
#[test]
fn republish_sink_loses_nothing_over_a_broker_restart() {
    use eliot_tests::config::example_config;
    use eliot_tests::Subscriber;

    let mut broker = Mosquitto::builder()
        .max_queued_messages(0)
        .persistence(true)
        .start();
    let plugins = build_examples();
    let dir = tempfile::tempdir().unwrap();
    let republish = r#"
[sinks.republish]
type = "mqtt"
topic = "processed/{payload.sensor_type}/{payload.device_id}"
qos = 1
"#;
    let config = dir.path().join("eliot.toml");
    let text = example_config(
        &broker.address(),
        &plugins,
        "eliot-republish-restart",
        r#""file", "republish""#,
        republish,
    );
    std::fs::write(&config, text).unwrap();
    // A persistent session, so that the broker keeps what arrives for the
    // subscriber while it reconnects.
    let subscriber = Subscriber::builder(broker.port(), "processed/#")
        .client_id("republish-restart-subscriber")
        .clean_session(false)
        .reconnect(true)
        .connect();
    let mut host = HostProcess::start(Path::new(ELIOT), &config, &dir.path().join("host.log"));

    let published = messages(4_000);
    let (first, second) = published.split_at(2_000);
    let mut received: Vec<serde_json::Value> = Vec::new();
    let count_received = |received: &mut Vec<serde_json::Value>| {
        received.extend(subscriber.drain().iter().map(|m| m.json()));
        let mut seen: BTreeMap<(String, String), usize> =
            published.iter().map(|m| (key_of_message(m), 0)).collect();
        let mut unknown = 0;
        for payload in received.iter() {
            let key = (
                payload["device_id"].as_str().unwrap_or_default().to_owned(),
                payload["timestamp"].as_str().unwrap_or_default().to_owned(),
            );
            match seen.get_mut(&key) {
                Some(count) => *count += 1,
                None => unknown += 1,
            }
        }
        let present = seen.values().filter(|c| **c > 0).count();
        let duplicates: usize = seen.values().map(|c| c.saturating_sub(1)).sum();
        (present, duplicates, unknown)
    };

    publish_all(broker.port(), &publishes(first), QoS::AtLeastOnce);
    wait_until(
        "the subscriber received 500 republished results",
        Duration::from_secs(60),
        || count_received(&mut received).0 >= 500,
    );
    // SIGTERM while results are still being republished: Mosquitto keeps
    // the sessions, and drops whatever it had not acknowledged yet.
    broker.stop();
    broker.restart();
    host.wait_for_log("session_present=true", Duration::from_secs(60));
    publish_all(broker.port(), &publishes(second), QoS::AtLeastOnce);

    wait_until(
        "every result was republished",
        Duration::from_secs(120),
        || count_received(&mut received).0 == published.len(),
    );
    let status = host.terminate(Duration::from_secs(30));
    assert!(status.success(), "host exited with {status}");
    let (present, duplicates, unknown) = count_received(&mut received);
    let resent = host
        .log()
        .matches("republish connection up; sending the unconfirmed publishes")
        .count();
    println!(
        "republish over a broker restart: {present} of {} present, {duplicates} duplicates, {unknown} unknown; \
         unconfirmed publishes sent again on {resent} reconnects",
        published.len()
    );
    assert_eq!(present, 4_000, "0 lost");
    assert_eq!(unknown, 0);
    assert_eq!(received.len(), present + duplicates);
    assert!(dead_letters::read_all(dir.path().join("out/dead-letters.sqlite")).is_empty());
}

#[test]
fn filter_added_to_config_applies_with_kept_session() {
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let setup = Setup::new(&broker);
    let mut host = setup.start_host("host-1.log");
    let status = host.terminate(Duration::from_secs(30));
    assert!(status.success());

    // Same client id, so the broker keeps the session; one more filter.
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let text = text.replace(
        r#"topics = ["devices/+/telemetry"]"#,
        r#"topics = ["devices/+/telemetry", "site/+/telemetry"]"#,
    );
    std::fs::write(&setup.config, text).unwrap();
    let mut host = setup.start_host("host-2.log");
    host.wait_for_log("session_present=true", Duration::from_secs(10));
    host.wait_for_log("subscribed", Duration::from_secs(10));

    let message = &messages(1)[0];
    let topic = message.topic.replace("devices/", "site/");
    publish_all(
        broker.port(),
        &[(topic.clone(), message.payload_bytes())],
        QoS::AtLeastOnce,
    );
    let output = setup.output();
    wait_until(
        "the message on the new filter is in the file sink",
        Duration::from_secs(30),
        || {
            read_complete_lines(&output)
                .iter()
                .any(|line| line.contains(&format!("\"topic\":\"{topic}\"")))
        },
    );
    let status = host.terminate(Duration::from_secs(30));
    assert!(status.success());
}
