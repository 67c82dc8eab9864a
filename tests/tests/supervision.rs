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
    (format!("devices/{FAULT_INJECTION_TOPIC_LEVEL}/telemetry"), format!("{{\"n\": {n}}}").into_bytes())
}

fn host_panics(store: &Path) -> usize {
    dead_letters::read_all(store).iter().filter(|l| l["kind"] == "host-panic").count()
}

#[test]
fn worker_panic_restarts_and_dead_letters() {
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let plugins = build_examples();
    let dir = tempfile::tempdir().unwrap();
    let config = write_example_config(dir.path(), &broker.address(), &plugins, "eliot-supervision-restart");
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
    wait_until("300 records and 3 host-panic dead letters", Duration::from_secs(60), || {
        read_complete_lines(&output).len() == 300 && host_panics(&store) == 3
    });
    let log = host.log();
    assert_eq!(log.matches("task failed; restarting it").count(), 3, "log:\n{log}");
    let status = host.terminate(Duration::from_secs(30));
    assert!(status.success(), "the host kept running after 3 restarts and stops cleanly: {status}");
    let letters = dead_letters::read_all(&store);
    assert_eq!(letters.len(), 3);
    for letter in &letters {
        assert_eq!(letter["stage"], "worker");
        let reason = letter["reason"].as_str().unwrap();
        assert!(reason.starts_with("the host panicked while processing the message: fault injected"), "{reason}");
    }
}

#[test]
fn restart_intensity_exceeded_stops_host() {
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let plugins = build_examples();
    let dir = tempfile::tempdir().unwrap();
    let config = write_example_config(dir.path(), &broker.address(), &plugins, "eliot-supervision-escalate");
    let mut host = HostProcess::start(Path::new(ELIOT), &config, &dir.path().join("host.log"));

    // The limit is 10 restarts within 60 s; the eleventh panic escalates.
    let messages: Vec<(String, Vec<u8>)> = (0..11).map(panic_message).collect();
    publish_all(broker.port(), &messages, QoS::AtLeastOnce);

    let status = host.wait_exit(Duration::from_secs(60));
    let log = host.log();
    assert_eq!(status.code(), Some(1), "a non-zero exit code; log:\n{log}");
    assert!(log.contains("restart intensity exceeded; shutting the host down"), "log:\n{log}");
    assert!(log.contains("stopped by the supervisor"), "log:\n{log}");
    // Every panicked message was stored before the host stopped.
    assert_eq!(host_panics(&dir.path().join("out/dead-letters.sqlite")), 11);
}
