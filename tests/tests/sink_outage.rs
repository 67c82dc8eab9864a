//! A sink that fails for longer than the MQTT keepalive and then recovers:
//! the host holds the messages, keeps its broker connection alive, opens the
//! sink's breaker, and delivers everything once the sink is back.

use std::time::Duration;

use eliot::config::Config;
use eliot::host::Host;
use eliot_tests::config::write_example_config;
use eliot_tests::data::expected_messages;
use eliot_tests::plugins::build_examples;
use eliot_tests::wait::{read_complete_lines, wait_until};
use eliot_tests::{publish_all, Mosquitto, QoS};

const CLIENT_ID: &str = "eliot-sink-outage";

fn pings(broker: &Mosquitto) -> usize {
    broker.log().matches(&format!("Received PINGREQ from {CLIENT_ID}")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_outage_longer_than_keepalive_loses_nothing() {
    let broker = Mosquitto::builder().max_queued_messages(0).verbose_log(true).start();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // keep_alive_secs = 5 in the example config.
    let config_path = write_example_config(dir.path(), &broker.address(), &plugins, CLIENT_ID);
    let config = Config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
    let mut host = Host::start(config).await.unwrap();
    assert!(host.wait_connected(Duration::from_secs(10)).await);

    let all = expected_messages();
    let (first, second) = all.split_at(1_000);
    let second = &second[..2_000];
    let port = broker.port();
    let to_send: Vec<(String, Vec<u8>)> = first.iter().map(|m| (m.topic.clone(), m.payload_bytes())).collect();
    tokio::task::spawn_blocking(move || publish_all(port, &to_send, QoS::AtLeastOnce)).await.unwrap();
    let out = dir.path().join("out");
    let output = out.join("processed.jsonl");
    let moved = dir.path().join("out-moved");
    {
        let output = output.clone();
        tokio::task::spawn_blocking(move || {
            wait_until("the first 1,000 records are written", Duration::from_secs(60), || {
                read_complete_lines(&output).len() == 1_000
            })
        })
        .await
        .unwrap();
    }

    // The sink fails from here: its folder is gone, so the file cannot be
    // opened again, and it does not come back by itself.
    std::fs::rename(&out, &moved).unwrap();
    let pings_before = pings(&broker);
    let to_send: Vec<(String, Vec<u8>)> = second.iter().map(|m| (m.topic.clone(), m.payload_bytes())).collect();
    tokio::task::spawn_blocking(move || publish_all(port, &to_send, QoS::AtLeastOnce)).await.unwrap();

    // Outlast the keepalive: two more pings are at least 1.5 keepalive
    // periods, after which the broker would have dropped a silent client.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(pings(&broker) >= pings_before + 2 && host.breaker_states()["sink:file"] == eliot::breaker::BreakerState::Open) {
        assert!(std::time::Instant::now() < deadline, "no two pings with an open sink breaker; log:\n{}", broker.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = host.snapshot()["telemetry"];
    assert_eq!(stats.delivered, 1_000, "nothing counts as delivered while the sink fails");
    assert!(
        !broker.log().contains(&format!("Client {CLIENT_ID} closed its connection"))
            && !broker.log().contains(&format!("Client {CLIENT_ID} has exceeded timeout")),
        "the host stayed connected; log:\n{}",
        broker.log()
    );

    // The sink recovers.
    std::fs::create_dir(&out).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while host.snapshot()["telemetry"].delivered < 3_000 {
        assert!(std::time::Instant::now() < deadline, "stats {:?}", host.snapshot());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let final_stats = host.snapshot()["telemetry"];
    host.shutdown(Duration::from_secs(10)).await;

    let before = read_complete_lines(moved.join("processed.jsonl"));
    let after = read_complete_lines(&output);
    assert_eq!(before.len(), 1_000);
    assert_eq!(after.len(), 2_000, "0 lost, no duplicates");
    let topics_and_stamps = |lines: &[String]| -> Vec<(String, String)> {
        lines
            .iter()
            .map(|line| {
                let record: serde_json::Value = serde_json::from_str(line).unwrap();
                (record["topic"].as_str().unwrap().to_owned(), record["payload"]["timestamp"].as_str().unwrap().to_owned())
            })
            .collect()
    };
    let mut delivered = topics_and_stamps(&before);
    delivered.extend(topics_and_stamps(&after));
    delivered.sort();
    delivered.dedup();
    assert_eq!(delivered.len(), 3_000, "every message exactly once");
    assert_eq!(final_stats.dead_lettered, 0);
    assert_eq!(final_stats.received, 3_000);
}
