//! Supervision of the host's workers: a panic in the host's own code
//! restarts the worker and dead-letters the message; too many restarts in
//! the window stop the host with a non-zero exit code. The panics come from
//! the `fault-injection` feature, which this test crate turns on.

use std::path::Path;
use std::time::Duration;

use eliot::pipeline::FAULT_INJECTION_TOPIC_LEVEL;
use eliot_tests::config::write_example_config;
use eliot_tests::data::expected_messages;
use eliot_tests::plugins::build_examples;
use eliot_tests::process::HostProcess;
use eliot_tests::wait::{read_complete_lines, wait_until};
use eliot_tests::{dead_letters, publish_all, Mosquitto, QoS};

const ELIOT: &str = env!("CARGO_BIN_EXE_eliot-under-test");

fn panic_message(n: usize) -> (String, Vec<u8>) {
    (
        format!("devices/{FAULT_INJECTION_TOPIC_LEVEL}/telemetry"),
        format!("{{\"n\": {n}}}").into_bytes(),
    )
}

fn host_panics(store: &Path) -> usize {
    dead_letters::read_all(store)
        .iter()
        .filter(|l| l["kind"] == "host-panic")
        .count()
}

#[test]
fn worker_panic_restarts_and_dead_letters() {
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let plugins = build_examples();
    let dir = tempfile::tempdir().unwrap();
    let config = write_example_config(
        dir.path(),
        &broker.address(),
        &plugins,
        "eliot-supervision-restart",
    );
    let mut host = HostProcess::start(Path::new(ELIOT), &config, &dir.path().join("host.log"));

    // Three panics spread through 300 real readings.
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    for (index, message) in expected_messages().into_iter().take(300).enumerate() {
        if index % 100 == 50 {
            messages.push(panic_message(index));
        }
        messages.push((message.topic.clone(), message.payload_bytes()));
    }
    publish_all(broker.port(), &messages, QoS::AtLeastOnce);

    let output = dir.path().join("out/processed.jsonl");
    let store = dir.path().join("out/dead-letters.sqlite");
    wait_until(
        "300 records and 3 host-panic dead letters",
        Duration::from_secs(60),
        || read_complete_lines(&output).len() == 300 && host_panics(&store) == 3,
    );
    let log = host.log();
    assert_eq!(
        log.matches("task failed; restarting it").count(),
        3,
        "log:\n{log}"
    );
    let status = host.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "the host kept running after 3 restarts and stops cleanly: {status}"
    );
    let letters = dead_letters::read_all(&store);
    assert_eq!(letters.len(), 3);
    for letter in &letters {
        assert_eq!(letter["stage"], "worker");
        let reason = letter["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("the host panicked while processing the message: fault injected"),
            "{reason}"
        );
    }
}

#[test]
fn restart_intensity_exceeded_stops_host() {
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let plugins = build_examples();
    let dir = tempfile::tempdir().unwrap();
    let config = write_example_config(
        dir.path(),
        &broker.address(),
        &plugins,
        "eliot-supervision-escalate",
    );
    let mut host = HostProcess::start(Path::new(ELIOT), &config, &dir.path().join("host.log"));

    // The limit is 10 restarts within 60 s; the eleventh panic escalates.
    let messages: Vec<(String, Vec<u8>)> = (0..11).map(panic_message).collect();
    publish_all(broker.port(), &messages, QoS::AtLeastOnce);

    let status = host.wait_exit(Duration::from_secs(60));
    let log = host.log();
    assert_eq!(status.code(), Some(1), "a non-zero exit code; log:\n{log}");
    assert!(
        log.contains("restart intensity exceeded; shutting the host down"),
        "log:\n{log}"
    );
    assert!(log.contains("stopped by the supervisor"), "log:\n{log}");
    // Every panicked message was stored before the host stopped.
    assert_eq!(host_panics(&dir.path().join("out/dead-letters.sqlite")), 11);
}

#[test]
fn sink_task_panic_restarts_and_loses_nothing() {
    use eliot::pipeline::FAULT_INJECTION_SINK_TOPIC_LEVEL;

    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let plugins = build_examples();
    let dir = tempfile::tempdir().unwrap();
    let config = write_example_config(
        dir.path(),
        &broker.address(),
        &plugins,
        "eliot-supervision-sink",
    );
    let mut host = HostProcess::start(Path::new(ELIOT), &config, &dir.path().join("host.log"));

    let valid: Vec<_> = expected_messages().into_iter().take(200).collect();
    let injected = (
        format!("devices/{FAULT_INJECTION_SINK_TOPIC_LEVEL}/telemetry"),
        br#"{"device_id": "x", "timestamp": "2025-06-05T14:30:00Z", "sensor_type": "gps", "data": {}}"#.to_vec(),
    );
    let mut messages: Vec<(String, Vec<u8>)> = valid
        .iter()
        .map(|m| (m.topic.clone(), m.payload_bytes()))
        .collect();
    messages.insert(100, injected.clone());
    publish_all(broker.port(), &messages, QoS::AtLeastOnce);

    // Every message ends in the file sink or, for the batch that was being
    // written when the panic hit, in the dead letters.
    let output = dir.path().join("out/processed.jsonl");
    let store = dir.path().join("out/dead-letters.sqlite");
    let covered = || {
        let written: Vec<serde_json::Value> = read_complete_lines(&output)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let letters = dead_letters::read_all(&store);
        let stored_topics_and_payloads: Vec<(String, String)> = letters
            .iter()
            .map(|l| {
                (
                    l["topic"].as_str().unwrap().to_owned(),
                    l["payload_text"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let all_valid = valid.iter().all(|m| {
            let in_file = written
                .iter()
                .any(|r| r["topic"] == m.topic.as_str() && same_reading(r, m));
            in_file
                || stored_topics_and_payloads.contains(&(
                    m.topic.clone(),
                    String::from_utf8(m.payload_bytes()).unwrap(),
                ))
        });
        let injected_stored = letters
            .iter()
            .any(|l| l["topic"] == injected.0.as_str() && l["kind"] == "host-panic");
        all_valid && injected_stored
    };
    wait_until(
        "every message is in the file sink or the dead letters",
        Duration::from_secs(60),
        covered,
    );

    let log = host.log();
    assert!(log.contains("task failed; restarting it"), "log:\n{log}");
    assert!(log.contains("sink task telemetry"), "log:\n{log}");
    let status = host.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "the host kept running after the restart: {status}"
    );
    for letter in dead_letters::read_all(&store) {
        assert_eq!(letter["kind"], "host-panic", "{letter}");
        assert_eq!(letter["stage"], "sink", "{letter}");
    }
}

/// Tells whether a file-sink record is the processed form of `message`: the
/// same device and the same instant.
fn same_reading(record: &serde_json::Value, message: &eliot_tests::DeviceMessage) -> bool {
    use time::format_description::well_known::Rfc3339;
    let instant = |text: &str| time::OffsetDateTime::parse(text, &Rfc3339).ok();
    instant(record["payload"]["timestamp"].as_str().unwrap_or_default())
        == instant(message.payload["timestamp"].as_str().unwrap_or_default())
}

/// Publishes 300 real readings with one message on `fault_level` in the
/// middle, carrying the payload of a 301st reading, and returns the host's
/// directory, the host and the broker once all 301 are in the file sink.
struct OneShotFault {
    broker: Mosquitto,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    host: HostProcess,
    injected_topic: String,
}

impl OneShotFault {
    fn run(fault_level: &str, client_id: &str) -> Self {
        let broker = Mosquitto::builder().max_queued_messages(0).start();
        let plugins = build_examples();
        let dir = tempfile::tempdir().unwrap();
        let config = write_example_config(dir.path(), &broker.address(), &plugins, client_id);
        let host = HostProcess::start(Path::new(ELIOT), &config, &dir.path().join("host.log"));

        let readings: Vec<_> = expected_messages().into_iter().take(301).collect();
        let injected_topic = format!("devices/{fault_level}/telemetry");
        let mut messages: Vec<(String, Vec<u8>)> = readings[..300]
            .iter()
            .map(|m| (m.topic.clone(), m.payload_bytes()))
            .collect();
        messages.insert(150, (injected_topic.clone(), readings[300].payload_bytes()));
        publish_all(broker.port(), &messages, QoS::AtLeastOnce);

        let fault = Self {
            broker,
            dir,
            config,
            host,
            injected_topic,
        };
        wait_until(
            "all 301 messages are in the file sink",
            Duration::from_secs(60),
            || {
                let tally = fault.tally();
                tally.injected >= 1 && tally.unique == 300
            },
        );
        fault
    }

    fn output(&self) -> std::path::PathBuf {
        self.dir.path().join("out/processed.jsonl")
    }

    /// Counts the records of the injected message and of the real readings.
    fn tally(&self) -> Tally {
        let mut tally = Tally::default();
        let mut seen = std::collections::BTreeSet::new();
        for line in read_complete_lines(self.output()) {
            let record: serde_json::Value = serde_json::from_str(&line).unwrap();
            tally.lines += 1;
            if record["topic"] == self.injected_topic.as_str() {
                tally.injected += 1;
            } else {
                let key = (
                    record["topic"].to_string(),
                    record["payload"]["timestamp"].to_string(),
                );
                if !seen.insert(key) {
                    tally.duplicates += 1;
                }
            }
        }
        tally.unique = seen.len();
        tally
    }
}

#[derive(Debug, Default)]
struct Tally {
    lines: usize,
    unique: usize,
    duplicates: usize,
    injected: usize,
}

#[test]
fn source_panic_reconnects_losing_nothing() {
    use eliot::source::FAULT_INJECTION_SOURCE_TOPIC_LEVEL;

    let mut fault = OneShotFault::run(
        FAULT_INJECTION_SOURCE_TOPIC_LEVEL,
        "eliot-supervision-source",
    );
    // The task may fail after the records were written, so wait for the line.
    fault
        .host
        .wait_for_log("task failed; restarting it", Duration::from_secs(60));
    let log = fault.host.log();
    assert_eq!(
        log.matches("task failed; restarting it").count(),
        1,
        "log:\n{log}"
    );
    assert!(
        log.contains("task=\"source\"") || log.contains("task=source"),
        "log:\n{log}"
    );
    assert!(
        log.contains("source restarting with a new connection"),
        "log:\n{log}"
    );
    let status = fault.host.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "the host kept running after the restart: {status}"
    );

    // Messages that were inside a pipeline when the source failed come back
    // from the broker and may be written twice; every one is there.
    let tally = fault.tally();
    println!("source restart: {tally:?}");
    assert_eq!(tally.unique, 300);
    assert!(tally.injected >= 1);
    assert_eq!(
        tally.lines,
        tally.unique + tally.duplicates + tally.injected
    );
    assert!(dead_letters::read_all(fault.dir.path().join("out/dead-letters.sqlite")).is_empty());
    drop(fault.broker);
}

#[test]
fn acker_panic_causes_one_redelivery() {
    use eliot::source::FAULT_INJECTION_ACKER_TOPIC_LEVEL;

    let mut fault = OneShotFault::run(FAULT_INJECTION_ACKER_TOPIC_LEVEL, "eliot-supervision-acker");
    // The task may fail after the records were written, so wait for the line.
    fault
        .host
        .wait_for_log("task failed; restarting it", Duration::from_secs(60));
    let log = fault.host.log();
    assert_eq!(
        log.matches("task failed; restarting it").count(),
        1,
        "log:\n{log}"
    );
    assert!(
        log.contains("task=\"acker\"") || log.contains("task=acker"),
        "log:\n{log}"
    );
    let status = fault.host.terminate(Duration::from_secs(30));
    assert!(
        status.success(),
        "the host kept running after the restart: {status}"
    );
    let first = fault.tally();
    assert_eq!(
        (first.unique, first.duplicates, first.injected),
        (300, 0, 1),
        "{first:?}"
    );

    // The ack of the injected message was lost with the panic, and every
    // other ack went out: the kept session keeps exactly that one message,
    // which the broker delivers to the next run.
    let mut host = HostProcess::start(
        Path::new(ELIOT),
        &fault.config,
        &fault.dir.path().join("host-2.log"),
    );
    wait_until(
        "the injected message is delivered again",
        Duration::from_secs(60),
        || fault.tally().injected == 2,
    );
    let status = host.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}");
    let second = fault.tally();
    println!("acker restart: {first:?} then {second:?}");
    assert_eq!(
        (
            second.lines,
            second.unique,
            second.duplicates,
            second.injected
        ),
        (302, 300, 0, 2)
    );
    drop(fault.broker);
}
