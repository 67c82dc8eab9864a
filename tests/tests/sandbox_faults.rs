//! Sandbox fault tests: misbehaving plugins from `tests/plugins/` run in an
//! in-process host that reads from a real Mosquitto. Each test checks the
//! exact counts (published = delivered + dropped + dead-lettered), the dead
//! letters' kinds and reasons, and the order of what reached the file sink.

// Each test holds a guard of `PROCESS_MEMORY` (below) from start to end,
// across its awaits, on purpose. The lock orders whole tests, which run on
// separate threads with their own runtimes, so no task of the same runtime
// waits for it.
#![allow(clippy::await_holding_lock)]

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use eliot::config::Config;
use eliot::breaker::BreakerState;
use eliot::host::Host;
use eliot::stats::StatsSnapshot;
use eliot_tests::config::EXAMPLE_PLUGIN_TABLES;
use eliot_tests::data::{expected_messages, DeviceMessage};
use eliot_tests::plugins::{build_examples, build_plugins, TEST_PLUGIN_PACKAGES};
use eliot_tests::wait::read_complete_lines;
use eliot_tests::{dead_letters, publish_all, Mosquitto, QoS};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Name of the pipeline in every test configuration.
const PIPELINE: &str = "faults";

/// Time limit for the host to finish every published message. The largest
/// test sends 2,000 messages, which the host finishes in a few seconds.
const FINISH_TIMEOUT: Duration = Duration::from_secs(120);

/// Client id of the host's subscribing connection.
const CLIENT_ID: &str = "eliot-sandbox-faults";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// The memory test takes this lock for writing and every other test for
/// reading, so that no other test allocates in this process while the
/// memory test measures the resident set size, which is process-wide.
static PROCESS_MEMORY: RwLock<()> = RwLock::new(());

fn shared_process_memory() -> RwLockReadGuard<'static, ()> {
    PROCESS_MEMORY.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn exclusive_process_memory() -> RwLockWriteGuard<'static, ()> {
    PROCESS_MEMORY.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Builds the four test plugins with one cargo call (once per process) and
/// returns the folder that contains their components.
fn test_plugin_dir() -> PathBuf {
    let paths = build_plugins(&TEST_PLUGIN_PACKAGES);
    paths[0].parent().expect("a component path has a parent folder").to_path_buf()
}

/// A host with one pipeline, `faults`, on `devices/+/telemetry`, that
/// writes to the file sink `out/processed.jsonl` and the dead letters to
/// `out/dead-letters.jsonl` in its own temporary folder.
struct Setup {
    broker: Mosquitto,
    host: Host,
    dir: tempfile::TempDir,
}

impl Setup {
    /// Starts Mosquitto and a host whose pipeline runs `stages`.
    /// `plugin_tables` contains the `[plugins.NAME]` tables of the stages.
    async fn start(plugin_dir: &Path, plugin_tables: &str, stages: &[&str]) -> Setup {
        // No queue limit: Mosquitto's default of 1,000 queued messages per
        // client would drop messages while the host works through a burst.
        let broker = Mosquitto::builder().max_queued_messages(0).start();
        let dir = tempfile::tempdir().expect("a temporary folder");
        let config = write_config(dir.path(), broker.port(), plugin_dir, plugin_tables, stages);
        let mut host = Host::start(config).await.unwrap_or_else(|e| panic!("host failed to start: {e:#}"));
        assert!(host.wait_connected(CONNECT_TIMEOUT).await, "host connected to Mosquitto");

        Setup { broker, host, dir }
    }

    /// Publishes `(topic, payload)` pairs in order at QoS 1 and returns once
    /// Mosquitto has acknowledged them all.
    async fn publish(&self, messages: Vec<(String, Vec<u8>)>) {
        let port = self.broker.port();
        tokio::task::spawn_blocking(move || publish_all(port, &messages, QoS::AtLeastOnce))
            .await
            .expect("the publisher does not panic");
    }

    /// Waits until the pipeline has finished `expected` messages, and
    /// returns the counters then.
    async fn wait_finished(&self, expected: u64) -> StatsSnapshot {
        let deadline = Instant::now() + FINISH_TIMEOUT;
        loop {
            let stats = self.stats();
            let finished = stats.delivered + stats.dropped + stats.dead_lettered;
            if finished >= expected {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "only {finished} of {expected} messages finished within {FINISH_TIMEOUT:?}: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stats(&self) -> StatsSnapshot {
        self.host.snapshot()[PIPELINE]
    }

    /// Returns the file sink's records, oldest first.
    fn records(&self) -> Vec<Value> {
        read_complete_lines(self.dir.path().join("out/processed.jsonl"))
            .iter()
            .map(|line| serde_json::from_str(line).expect("a file sink record is JSON"))
            .collect()
    }

    fn dead_letters(&self) -> Vec<Value> {
        dead_letters::read_all(self.dir.path().join("out/dead-letters.jsonl"))
    }

    /// Stops the host, then the broker, and removes the folder.
    async fn shutdown(self) {
        self.host.shutdown(SHUTDOWN_DEADLINE).await;
    }
}

fn write_config(dir: &Path, port: u16, plugin_dir: &Path, plugin_tables: &str, stages: &[&str]) -> Config {
    let stages = stages.iter().map(|stage| format!("\"{stage}\"")).collect::<Vec<_>>().join(", ");
    let text = format!(
        r#"
[mqtt]
broker = "127.0.0.1:{port}"
client_id = "{CLIENT_ID}"

[runtime]
plugin_dir = "{plugins}"
cache_dir = "cache"

[dead_letters]
path = "out/dead-letters.jsonl"

{plugin_tables}

[pipelines.{PIPELINE}]
topics = ["devices/+/telemetry"]
stages = [{stages}]
sinks = ["file"]

[sinks.file]
type = "file"
path = "out/processed.jsonl"
"#,
        plugins = plugin_dir.display()
    );
    let path = dir.join("eliot.toml");
    std::fs::write(&path, text).expect("writing the test configuration");
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn topic(device: &str) -> String {
    format!("devices/{device}/telemetry")
}

fn seq_message(device: &str, seq: u64) -> (String, Vec<u8>) {
    (topic(device), json!({ "seq": seq }).to_string().into_bytes())
}

/// Returns the `seq` fields of the records of `topic`, in file order.
fn record_seqs(records: &[Value], topic: &str) -> Vec<u64> {
    records
        .iter()
        .filter(|record| record["topic"] == topic)
        .map(|record| record["payload"]["seq"].as_u64().expect("the record payload has a seq"))
        .collect()
}

/// Returns the parsed original payload of a dead letter.
fn letter_payload(letter: &Value) -> Value {
    let text = letter["payload_text"].as_str().expect("the dead letter has a UTF-8 payload");
    serde_json::from_str(text).expect("the dead letter's payload is JSON")
}

/// Reads this process's resident set size from /proc/self/status, in KiB.
fn resident_set_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("/proc/self/status has a VmRSS line");
    line.trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("invalid VmRSS line {line:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_loop_times_out() {
    let _memory = shared_process_memory();
    let plugins = tokio::task::spawn_blocking(test_plugin_dir).await.unwrap();
    let tables = r#"
[plugins.loop-forever]
file = "loop_forever.wasm"
limits = { call_budget_ms = 250 }
"#;
    let setup = Setup::start(&plugins, tables, &["loop-forever"]).await;

    // Device a sends 30 normal messages with the loop message after the
    // 15th; device b sends 30 normal messages interleaved with them.
    let mut messages = Vec::new();
    for seq in 0..30 {
        if seq == 15 {
            messages.push((topic("a"), json!({ "command": "loop" }).to_string().into_bytes()));
        }
        messages.push(seq_message("a", seq));
        messages.push(seq_message("b", seq));
    }
    assert_eq!(messages.len(), 61);
    setup.publish(messages).await;

    let stats = setup.wait_finished(61).await;
    let records = setup.records();
    let letters = setup.dead_letters();
    setup.shutdown().await;

    assert_eq!(stats.received, 61);
    assert_eq!(stats.delivered, 60);
    assert_eq!(stats.records_out, 60);
    assert_eq!(stats.dropped, 0);
    assert_eq!(stats.dead_lettered, 1);

    assert_eq!(letters.len(), 1, "dead letters: {letters:?}");
    let letter = &letters[0];
    assert_eq!(letter["kind"], "timeout", "{letter}");
    assert_eq!(letter["stage"], "loop-forever", "{letter}");
    assert_eq!(letter["topic"], topic("a"), "{letter}");
    assert_eq!(letter_payload(letter), json!({ "command": "loop" }));
    let reason = letter["reason"].as_str().unwrap();
    // The budget is wall-clock time, so it is far above what a normal call
    // takes (microseconds) even on a loaded 2-core machine.
    assert!(reason.contains("250 ms"), "the reason names the budget: {reason:?}");

    // The instance that looped was replaced: device a's later messages and
    // device b's all arrived, each device in order.
    let expected: Vec<u64> = (0..30).collect();
    assert_eq!(record_seqs(&records, &topic("a")), expected, "device a");
    assert_eq!(record_seqs(&records, &topic("b")), expected, "device b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hog_traps_at_limit() {
    let _memory = exclusive_process_memory();
    let plugins = tokio::task::spawn_blocking(test_plugin_dir).await.unwrap();
    let tables = r#"
[plugins.memory-hog]
file = "memory_hog.wasm"
limits = { memory_mib = 16 }
"#;
    let setup = Setup::start(&plugins, tables, &["memory-hog"]).await;

    // Warm up first, so that the instances, the compiled code and the
    // connections are in the baseline.
    setup.publish((0..10).map(|seq| seq_message("hog", seq)).collect()).await;
    setup.wait_finished(10).await;
    let rss_before_kib = resident_set_kib();

    // Each grow message is followed by a normal one, so the stage never
    // fails twice in a row and every grow message reaches the plugin.
    let mut messages = Vec::new();
    for index in 0..20 {
        messages.push((topic("hog"), json!({ "command": "grow", "index": index }).to_string().into_bytes()));
        messages.push(seq_message("hog", 10 + index));
    }
    setup.publish(messages).await;
    let stats = setup.wait_finished(50).await;
    let rss_after_kib = resident_set_kib();
    let records = setup.records();
    let letters = setup.dead_letters();
    setup.shutdown().await;

    assert_eq!(stats.received, 50);
    assert_eq!(stats.delivered, 30);
    assert_eq!(stats.dropped, 0);
    assert_eq!(stats.dead_lettered, 20);

    assert_eq!(letters.len(), 20);
    for (index, letter) in letters.iter().enumerate() {
        assert_eq!(letter["kind"], "trap", "{letter}");
        assert_eq!(letter["stage"], "memory-hog", "{letter}");
        assert_eq!(letter_payload(letter), json!({ "command": "grow", "index": index }), "dead letters in order");
        let reason = letter["reason"].as_str().unwrap();
        assert!(reason.contains("memory limit of 16 MiB"), "the reason names the memory limit: {reason:?}");
        assert!(
            reason.contains("memory_hog::grow_until_allocation_fails"),
            "the reason names the plugin function: {reason:?}"
        );
    }
    assert_eq!(record_seqs(&records, &topic("hog")), (0..30).collect::<Vec<u64>>());

    // Each grow message fills one instance's 16 MiB of linear memory before
    // it traps, and the host drops that instance. At most two instances
    // (one per worker) are alive at once, so the growth should stay under
    // about 32 MiB plus allocator slack. On a 2-core machine it was about
    // 1 MiB, and a host that kept the trapped instances grew by 282 MiB,
    // so 128 MiB separates the cases with a wide margin on each side.
    let growth_kib = rss_after_kib.saturating_sub(rss_before_kib);
    assert!(
        growth_kib < 128 * 1024,
        "resident set grew by {growth_kib} KiB (from {rss_before_kib} to {rss_after_kib} KiB)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_dead_letters_one_in_ten() {
    let _memory = shared_process_memory();
    let plugins = tokio::task::spawn_blocking(test_plugin_dir).await.unwrap();
    let tables = r#"
[plugins.flaky-panic]
file = "flaky_panic.wasm"
"#;
    let setup = Setup::start(&plugins, tables, &["flaky-panic"]).await;

    // Sequence numbers 0..99 spread over four devices in turn.
    let devices = ["p0", "p1", "p2", "p3"];
    let messages: Vec<(String, Vec<u8>)> = (0..100).map(|seq| seq_message(devices[seq as usize % 4], seq)).collect();
    setup.publish(messages).await;

    let stats = setup.wait_finished(100).await;
    let records = setup.records();
    let letters = setup.dead_letters();
    setup.shutdown().await;

    assert_eq!(stats.received, 100);
    assert_eq!(stats.delivered, 90);
    assert_eq!(stats.records_out, 90);
    assert_eq!(stats.dropped, 0);
    assert_eq!(stats.dead_lettered, 10);

    let mut letter_seqs: Vec<u64> = letters.iter().map(|letter| letter_payload(letter)["seq"].as_u64().unwrap()).collect();
    letter_seqs.sort_unstable();
    assert_eq!(letter_seqs, (0..100).step_by(10).collect::<Vec<u64>>());
    for letter in &letters {
        assert_eq!(letter["kind"], "trap", "{letter}");
        assert_eq!(letter["stage"], "flaky-panic", "{letter}");
        let reason = letter["reason"].as_str().unwrap();
        assert!(reason.contains("after a panic"), "the reason says the plugin panicked: {reason:?}");
        assert!(reason.contains("flaky_panic::FlakyPanic"), "the reason names the plugin function: {reason:?}");
    }

    for (index, device) in devices.iter().enumerate() {
        let expected: Vec<u64> = (0..100).filter(|seq| seq % 4 == index as u64 && seq % 10 != 0).collect();
        assert_eq!(record_seqs(&records, &topic(device)), expected, "device {device} in order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_denies_files_env_network() {
    let _memory = shared_process_memory();
    let plugins = tokio::task::spawn_blocking(test_plugin_dir).await.unwrap();
    let tables = r#"
[plugins.sandbox-probe]
file = "sandbox_probe.wasm"
"#;
    let setup = Setup::start(&plugins, tables, &["sandbox-probe"]).await;

    // Outside the sandbox each attempt succeeds, so a denial inside it
    // comes from the sandbox: the file exists, HOME is set, and the port is
    // the one this test's Mosquitto listens on.
    let port = setup.broker.port();
    assert!(std::fs::read_to_string("/etc/passwd").is_ok(), "/etc/passwd is readable by the test");
    assert!(std::env::var_os("HOME").is_some(), "HOME is set for the test");
    TcpStream::connect(setup.broker.address()).expect("Mosquitto accepts a connection from the test");

    setup.publish(vec![(topic("probe"), json!({ "port": port }).to_string().into_bytes())]).await;
    let stats = setup.wait_finished(1).await;
    let records = setup.records();
    setup.shutdown().await;

    assert_eq!((stats.received, stats.delivered, stats.dropped, stats.dead_lettered), (1, 1, 0, 0));
    assert_eq!(records.len(), 1);
    let report = &records[0]["payload"];
    for probe in ["passwd", "root_dir", "home", "connect"] {
        let result = report[probe].as_str().unwrap_or_else(|| panic!("report has no {probe}: {report}"));
        assert!(result.starts_with("denied: "), "{probe} was not denied: {report}");
    }
    // WASI's socket address check rejected the address; an unsupported
    // socket API would fail with another error.
    let connect = report["connect"].as_str().unwrap();
    assert!(connect.contains("Permission denied"), "connect was rejected by the sandbox: {connect:?}");
    assert_eq!(report["env_vars"], 0, "the plugin sees no environment variables: {report}");
}

/// Malformed payloads that validate-format rejects as invalid, each with
/// the start of its dead-letter reason.
fn malformed_payloads() -> Vec<(Vec<u8>, &'static str)> {
    vec![
        (b"not json".to_vec(), "payload is not valid JSON"),
        (br#"{"sensor_type":"gps","data":{}}"#.to_vec(), r#"missing field "timestamp""#),
        (
            br#"{"timestamp":"yesterday","sensor_type":"gps","data":{}}"#.to_vec(),
            r#"field "timestamp" is not an RFC 3339 date-time"#,
        ),
        (
            br#"{"timestamp":"2025-06-05T14:30:00Z","sensor_type":"gps","data":42}"#.to_vec(),
            r#"field "data" must be a JSON object"#,
        ),
        (b"[1,2]".to_vec(), "payload must be a JSON object, got an array"),
        (vec![0xff, 0xfe, 0x00], "payload is not valid UTF-8"),
    ]
}

/// Takes the first `per_device` messages of each of the four devices.
fn valid_sample(per_device: usize) -> Vec<DeviceMessage> {
    let mut count_per_device: BTreeMap<String, usize> = BTreeMap::new();
    expected_messages()
        .into_iter()
        .filter(|message| {
            let count = count_per_device.entry(message.device_id.clone()).or_default();
            *count += 1;
            *count <= per_device
        })
        .collect()
}

/// Checks that a file sink record is what the example chain makes of
/// `message`: same device, sensor type and instant (enrich rewrites the
/// timestamp in UTC), same readings (flow converted from litres per second
/// to cubic metres per hour).
fn check_record(record: &Value, message: &DeviceMessage) {
    let payload = &record["payload"];
    assert_eq!(payload["device_id"], message.device_id.as_str(), "{record}");
    assert_eq!(payload["sensor_type"], message.payload["sensor_type"], "{record}");
    assert_eq!(instant(&payload["timestamp"]), instant(&message.payload["timestamp"]), "{record}");
    match message.data().get("flow_lps").and_then(Value::as_f64) {
        Some(flow) => {
            let converted = payload["data"]["flow_m3h"].as_f64().expect("flow_m3h is a number");
            assert!((converted - flow * 3.6).abs() < 1e-6, "flow {flow} l/s became {converted} m3/h");
        }
        None => assert_eq!(payload["data"], message.payload["data"], "{record}"),
    }
}

fn instant(timestamp: &Value) -> OffsetDateTime {
    let text = timestamp.as_str().unwrap_or_else(|| panic!("timestamp {timestamp} is not a string"));
    OffsetDateTime::parse(text, &Rfc3339).unwrap_or_else(|e| panic!("timestamp {text:?} is not RFC 3339: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_flood_then_valid_data() {
    let _memory = shared_process_memory();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let setup = Setup::start(&plugins, EXAMPLE_PLUGIN_TABLES, &["enrich", "validate-format", "sanity-filter"]).await;

    // 1,500 malformed payloads from ten devices, then 500 valid readings:
    // the first 125 of each bundled device.
    let bad = malformed_payloads();
    let mut publishes: Vec<(String, Vec<u8>)> = (0..1500)
        .map(|index| (topic(&format!("bad_{:02}", index % 10)), bad[index % bad.len()].0.clone()))
        .collect();
    let valid = valid_sample(125);
    assert_eq!(valid.len(), 500);
    publishes.extend(valid.iter().map(|message| (message.topic.clone(), message.payload_bytes())));
    setup.publish(publishes).await;

    let stats = setup.wait_finished(2000).await;
    let records = setup.records();
    let letters = setup.dead_letters();
    setup.shutdown().await;

    assert_eq!(stats.received, 2000);
    assert_eq!(stats.delivered, 500);
    assert_eq!(stats.records_out, 500);
    assert_eq!(stats.dropped, 0);
    assert_eq!(stats.dead_lettered, 1500);

    assert_eq!(letters.len(), 1500);
    let mut reason_counts = vec![0; bad.len()];
    for letter in &letters {
        assert_eq!(letter["kind"], "invalid", "{letter}");
        assert_eq!(letter["stage"], "validate-format", "{letter}");
        let reason = letter["reason"].as_str().unwrap();
        let variant = bad
            .iter()
            .position(|(_, start)| reason.starts_with(start))
            .unwrap_or_else(|| panic!("unexpected reason {reason:?}"));
        reason_counts[variant] += 1;
    }
    assert_eq!(reason_counts, vec![250; bad.len()], "dead letters per malformed payload");

    // Every valid reading arrived, in order per device.
    assert_eq!(records.len(), 500);
    let mut expected_by_topic: BTreeMap<&str, Vec<&DeviceMessage>> = BTreeMap::new();
    for message in &valid {
        expected_by_topic.entry(message.topic.as_str()).or_default().push(message);
    }
    for (topic, expected) in &expected_by_topic {
        let actual: Vec<&Value> = records.iter().filter(|record| record["topic"] == *topic).collect();
        assert_eq!(actual.len(), expected.len(), "record count of {topic}");
        for (record, message) in actual.iter().zip(expected) {
            check_record(record, message);
        }
    }
}

/// Publishes one message and waits until the pipeline finished it, so that
/// each message sees the breaker state its predecessor left.
async fn publish_one(setup: &Setup, message: (String, Vec<u8>), finished_before: u64) -> StatsSnapshot {
    setup.publish(vec![message]).await;
    setup.wait_finished(finished_before + 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_panics_open_breaker_and_recovery_closes_it() {
    let _memory = shared_process_memory();
    let plugins = tokio::task::spawn_blocking(test_plugin_dir).await.unwrap();
    let tables = r#"
[plugins.flaky-panic]
file = "flaky_panic.wasm"
breaker = { failure_threshold = 3, cool_down_ms = 200 }
"#;
    let setup = Setup::start(&plugins, tables, &["flaky-panic"]).await;
    let breaker = || setup.host.breaker_states()[&format!("{PIPELINE}/flaky-panic")];
    let fail = |n: u64| (topic("b0"), format!(r#"{{"seq": {n}, "note": "fail"}}"#).into_bytes());

    // Three traps in a row open the breaker; the next failing messages are
    // dead-lettered without calling the plugin.
    let mut finished = 0;
    for n in 1..=5 {
        publish_one(&setup, fail(n), finished).await;
        finished += 1;
    }
    assert_eq!(breaker(), BreakerState::Open);
    let letters = setup.dead_letters();
    let kinds: Vec<&str> = letters.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["trap", "trap", "trap", "circuit-open", "circuit-open"]);
    assert_eq!(setup.stats().breaker_opened, 1);

    // Healthy messages: refused while open, then the trial after the
    // cool-down succeeds and closes the breaker.
    // Sequence numbers 1, 11, 21, ...: flaky-panic traps on multiples of
    // 10, which would fail the trial.
    let mut seq = 1;
    let mut refused = 0;
    loop {
        let stats = publish_one(&setup, seq_message("b0", seq), finished).await;
        finished += 1;
        seq += 10;
        if stats.delivered == 1 {
            break;
        }
        refused += 1;
        assert!(refused < 10_000, "the breaker never let a trial through");
    }
    assert_eq!(breaker(), BreakerState::Closed);

    // Closed again: healthy messages flow, 1 in 10 still traps without
    // reopening it.
    let messages: Vec<(String, Vec<u8>)> = (101..=120).map(|n| seq_message("b0", n)).collect();
    setup.publish(messages).await;
    let stats = setup.wait_finished(finished + 20).await;
    let letters = setup.dead_letters();
    setup.shutdown().await;

    assert_eq!(breaker_kinds(&letters, "circuit-open"), 2 + refused);
    assert_eq!(breaker_kinds(&letters, "trap"), 3 + 2, "seq 110 and 120 trap");
    assert_eq!(stats.delivered, 1 + 18);
    assert_eq!(stats.received, stats.delivered + stats.dead_lettered);
    assert_eq!(stats.breaker_opened, 1, "isolated traps do not reopen it");
}

fn breaker_kinds(letters: &[Value], kind: &str) -> u64 {
    letters.iter().filter(|l| l["kind"] == kind).count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_breaker_with_skip_policy_passes_messages_on() {
    let _memory = shared_process_memory();
    let plugins = tokio::task::spawn_blocking(test_plugin_dir).await.unwrap();
    // A cool-down far longer than the test, so the breaker stays open.
    let tables = r#"
[plugins.flaky-panic]
file = "flaky_panic.wasm"
breaker = { failure_threshold = 1, cool_down_ms = 600000, on_open = "skip" }
"#;
    let setup = Setup::start(&plugins, tables, &["flaky-panic"]).await;
    publish_one(&setup, (topic("s0"), br#"{"seq": 1, "note": "fail"}"#.to_vec()), 0).await;
    assert_eq!(setup.host.breaker_states()[&format!("{PIPELINE}/flaky-panic")], BreakerState::Open);

    // Even a message the plugin would trap on passes unchanged now.
    let messages = vec![seq_message("s0", 2), (topic("s0"), br#"{"seq": 3, "note": "fail"}"#.to_vec())];
    setup.publish(messages).await;
    let stats = setup.wait_finished(3).await;
    let records = setup.records();
    setup.shutdown().await;

    assert_eq!((stats.delivered, stats.dead_lettered), (2, 1));
    assert_eq!(record_seqs(&records, &topic("s0")), vec![2, 3]);
    for record in &records {
        assert_eq!(record["processed_by"], json!(["flaky-panic@skipped"]), "{record}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_open_exactly_what_they_name() {
    let _memory = shared_process_memory();
    let plugins = tokio::task::spawn_blocking(test_plugin_dir).await.unwrap();
    // /etc is granted read-only as /etc, HOME is passed on, the network is
    // open; the root folder stays hidden, because only /etc is mounted.
    let tables = r#"
[plugins.sandbox-probe]
file = "sandbox_probe.wasm"
grants = { env = ["HOME"], read_dirs = [{ host = "/etc", guest = "/etc" }], network = true }
"#;
    let setup = Setup::start(&plugins, tables, &["sandbox-probe"]).await;
    let port = setup.broker.port();
    setup.publish(vec![(topic("probe"), json!({ "port": port }).to_string().into_bytes())]).await;
    setup.wait_finished(1).await;
    let records = setup.records();
    setup.shutdown().await;

    let report = &records[0]["payload"];
    assert!(report["passwd"].as_str().unwrap().starts_with("read "), "{report}");
    assert!(report["home"].as_str().unwrap().starts_with("set, "), "{report}");
    assert_eq!(report["env_vars"], 1, "only the granted variable: {report}");
    assert!(report["connect"].as_str().unwrap().starts_with("connected"), "{report}");
    assert!(report["root_dir"].as_str().unwrap().starts_with("denied: "), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_breaker_with_pause_policy_holds_messages() {
    let _memory = shared_process_memory();
    let plugins = tokio::task::spawn_blocking(test_plugin_dir).await.unwrap();
    let tables = r#"
[plugins.flaky-panic]
file = "flaky_panic.wasm"
breaker = { failure_threshold = 1, cool_down_ms = 300, on_open = "pause" }
"#;
    let setup = Setup::start(&plugins, tables, &["flaky-panic"]).await;
    publish_one(&setup, (topic("w0"), br#"{"seq": 1, "note": "fail"}"#.to_vec()), 0).await;
    assert_eq!(setup.host.breaker_states()[&format!("{PIPELINE}/flaky-panic")], BreakerState::Open);

    // Held until the cool-down ends, then the trial call delivers it: no
    // message is dead-lettered or skipped while the breaker is open.
    let stats = publish_one(&setup, seq_message("w0", 2), 1).await;
    let records = setup.records();
    setup.shutdown().await;
    assert_eq!((stats.delivered, stats.dead_lettered), (1, 1));
    assert_eq!(records[0]["processed_by"], json!(["flaky-panic@0.1.0"]));
}
