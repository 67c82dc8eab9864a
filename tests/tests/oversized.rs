//! A payload over `mqtt.max_packet_bytes` is dead-lettered with its bytes,
//! the connection stays up, and the messages after it arrive.

use std::time::Duration;

use eliot::config::Config;
use eliot::host::Host;
use eliot_tests::config::example_config;
use eliot_tests::data::expected_messages;
use eliot_tests::plugins::build_examples;
use eliot_tests::wait::read_complete_lines;
use eliot_tests::{dead_letters, publish_all, Mosquitto, QoS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payload_is_dead_lettered() {
    let broker = Mosquitto::builder().max_queued_messages(0).verbose_log(true).start();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = example_config(&broker.address(), &plugins, "eliot-oversized", "\"file\"", "")
        .replace("keep_alive_secs = 5", "keep_alive_secs = 5\nmax_packet_bytes = 2048");
    let path = dir.path().join("eliot.toml");
    std::fs::write(&path, text).unwrap();
    let mut host = Host::start(Config::load(&path).unwrap_or_else(|e| panic!("{e}"))).await.unwrap();
    assert!(host.wait_connected(Duration::from_secs(10)).await);

    let big = vec![b'x'; 10_000];
    let mut messages: Vec<(String, Vec<u8>)> = vec![("devices/big_001/telemetry".to_owned(), big.clone())];
    messages.extend(expected_messages().into_iter().take(100).map(|m| (m.topic.clone(), m.payload_bytes())));
    let port = broker.port();
    tokio::task::spawn_blocking(move || publish_all(port, &messages, QoS::AtLeastOnce)).await.unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stats = host.snapshot()["telemetry"];
        if stats.delivered + stats.dead_lettered == 101 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = host.snapshot()["telemetry"];
    host.shutdown(Duration::from_secs(10)).await;

    assert_eq!((stats.received, stats.delivered, stats.dead_lettered), (101, 100, 1));
    assert_eq!(read_complete_lines(dir.path().join("out/processed.jsonl")).len(), 100);
    let letters = dead_letters::read_all(dir.path().join("out/dead-letters.sqlite"));
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["kind"], "too-large");
    assert_eq!(letters[0]["stage"], "source");
    assert_eq!(
        letters[0]["reason"],
        "payload of 10000 bytes exceeds mqtt.max_packet_bytes (2048 bytes); raise the limit or fix the device"
    );
    assert_eq!(letters[0]["payload_text"].as_str().unwrap().len(), 10_000, "the bytes are kept");
    let connects = broker.log().matches("New client connected").count();
    assert!(!broker.log().contains("eliot-oversized closed its connection"), "no reconnect loop");
    assert!(connects <= 3, "one connection for the host and one per publisher: {connects}");
}
