//! Operating the host through its admin server. The tests cover /metrics
//! against a run of the real sensor data, readiness across a broker
//! outage, the devices endpoint and a dead-letter replay through the API.
//! They also cover the bearer token of the mutating endpoints, JSON
//! errors, and the limits that keep slow or idle clients from starving
//! the MQTT side.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use eliot::config::Config;
use eliot::deadletter::{DeadLetter, DeadLetterStore, FailureKind};
use eliot::host::Host;
use eliot::wasm::{Message, Qos};
use eliot_tests::config::example_config;
use eliot_tests::data::expected_messages;
use eliot_tests::http::{self, metric_sum};
use eliot_tests::plugins::build_examples;
use eliot_tests::wait::read_complete_lines;
use eliot_tests::{publish_all, Mosquitto, QoS};
use serde_json::{json, Value};

/// Writes the example configuration with an admin server on a free port,
/// the bearer token in variable `token_env`, and device status on
/// `devices/+/status`.
fn write_config(dir: &Path, broker: &str, plugins: &Path, client_id: &str, token_env: &str) -> Config {
    write_config_with(dir, broker, plugins, client_id, token_env, r#""file""#, "")
}

/// Does the same as [`write_config`] with the pipeline's `sinks` list and
/// `tables` of TOML appended, for example more sinks.
fn write_config_with(dir: &Path, broker: &str, plugins: &Path, client_id: &str, token_env: &str, sinks: &str, tables: &str) -> Config {
    let extra = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
token_env = "{token_env}"

[devices]
status_topic = "devices/+/status"
{tables}
"#
    );
    let text = example_config(broker, plugins, client_id, sinks, &extra);
    let path = dir.join("eliot.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

async fn start_host(config: Config) -> (Host, SocketAddr) {
    let mut host = Host::start(config).await.unwrap();
    assert!(host.wait_connected(Duration::from_secs(10)).await, "host connected to Mosquitto");
    let admin = host.admin_address.expect("the config has an [admin] table");
    (host, admin)
}

/// Publishes from the test's async context; the publisher blocks until the
/// broker acknowledged every message.
fn publish_blocking(port: u16, messages: &[(&str, &str)]) {
    tokio::task::block_in_place(|| publish_all(port, messages, QoS::AtLeastOnce));
}

async fn scrape(admin: SocketAddr) -> String {
    let response = http::get(admin, "/metrics").await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(response.body.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    response.body
}

/// Reads one counter or gauge; 0 when no sample matches yet.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    metric_sum(text, name, labels).unwrap_or(0.0) as u64
}

/// Polls `/readyz` until its `ready` field equals `ready`, and returns the
/// body; fails with the last body after `timeout`.
async fn wait_ready(admin: SocketAddr, ready: bool, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let response = http::get(admin, "/readyz").await;
        let body = response.json();
        if body["ready"] == ready {
            assert_eq!(response.status, if ready { 200 } else { 503 }, "{body}");
            return body;
        }
        assert!(Instant::now() < deadline, "readyz did not turn {ready} within {timeout:?}: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stores a dead letter in the host's store under `dir`, as the host would
/// after its sink failed, and returns its id. The example pipeline
/// delivers it on replay, with one record.
fn store_letter(dir: &Path, device: &str) -> i64 {
    let store = DeadLetterStore::open_existing(&dir.join("out/dead-letters.sqlite")).unwrap();
    let message = Message {
        topic: format!("devices/{device}/telemetry"),
        payload: format!(r#"{{"device_id": "{device}", "timestamp": "2025-06-05T14:30:00Z", "sensor_type": "gps", "data": {{}}}}"#).into_bytes(),
        qos: Qos::AtLeastOnce,
        retain: false,
        received_at_ms: 1_749_133_800_000,
        headers: Vec::new(),
    };
    let letter = DeadLetter::new("telemetry".to_owned(), "sink".to_owned(), FailureKind::HostPanic, "stored by the test".to_owned(), message);
    store.append(&[&letter]).unwrap();
    store.last_id().unwrap().expect("the letter was stored")
}

/// Malformed messages from devices bad_001..bad_006, which validate-format
/// rejects, and one from bad_007 that sanity-filter drops.
fn malformed() -> Vec<(String, Vec<u8>)> {
    let mut messages: Vec<(String, Vec<u8>)> = (1..=6)
        .map(|n| (format!("devices/bad_00{n}/telemetry"), format!("not json {n}").into_bytes()))
        .collect();
    messages.push((
        "devices/bad_007/telemetry".to_owned(),
        br#"{"device_id":"bad_007","timestamp":"2025-06-05T14:30:00Z","sensor_type":"environment","data":{"humidity_pct":150}}"#
            .to_vec(),
    ));
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_devices_match_real_data() {
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let port = broker.port();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.address(), &plugins, "eliot-ops-metrics", "ELIOT_OPS_TEST_UNSET_TOKEN");
    let (host, admin) = start_host(config).await;

    let before = scrape(admin).await;
    assert_eq!(value(&before, "eliot_broker_connected", &[]), 1);
    assert_eq!(value(&before, "eliot_messages_received_total", &[("pipeline", "telemetry")]), 0);

    // One device announces itself before its data and leaves after it.
    publish_blocking(port, &[("devices/bike_001/status", "online")]);

    let valid = expected_messages();
    let bad = malformed();
    let mut publishes: Vec<(String, Vec<u8>)> = Vec::new();
    for (index, message) in valid.iter().enumerate() {
        if index % 3000 == 0 && index / 3000 < bad.len() {
            publishes.push(bad[index / 3000].clone());
        }
        publishes.push((message.topic.clone(), message.payload_bytes()));
    }
    assert_eq!(publishes.len(), valid.len() + bad.len());
    let total = publishes.len() as u64;
    let mut expected_devices: BTreeMap<String, u64> = BTreeMap::new();
    for (topic, _) in &publishes {
        *expected_devices.entry(topic.split('/').nth(1).unwrap().to_owned()).or_default() += 1;
    }

    // Halfway: the first half is published and finished, and the scrape
    // shows exactly that many.
    let second_half = publishes.split_off(publishes.len() / 2);
    let half = publishes.len() as u64;
    tokio::task::block_in_place(|| publish_all(port, &publishes, QoS::AtLeastOnce));
    let received = [("pipeline", "telemetry")];
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let text = scrape(admin).await;
        let finished = value(&text, "eliot_messages_delivered_total", &received)
            + value(&text, "eliot_messages_dropped_total", &received)
            + value(&text, "eliot_messages_dead_lettered_total", &received);
        if finished == half {
            assert_eq!(value(&text, "eliot_messages_received_total", &received), half);
            break;
        }
        assert!(finished < half, "finished {finished} > published {half}");
        assert!(Instant::now() < deadline, "only {finished} of {half} finished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // While the second half flows: every scrape is consistent and no
    // counter goes back.
    let publisher = tokio::task::spawn_blocking(move || publish_all(port, &second_half, QoS::AtLeastOnce));
    let mut last_finished = half;
    let mut last_received = half;
    loop {
        let text = scrape(admin).await;
        let now_received = value(&text, "eliot_messages_received_total", &received);
        let finished = value(&text, "eliot_messages_delivered_total", &received)
            + value(&text, "eliot_messages_dropped_total", &received)
            + value(&text, "eliot_messages_dead_lettered_total", &received);
        assert!(finished <= now_received, "finished {finished} > received {now_received}");
        assert!(now_received <= total, "received {now_received} > published {total}");
        assert!(now_received >= last_received, "received went back from {last_received} to {now_received}");
        assert!(finished >= last_finished, "finished went back from {last_finished} to {finished}");
        last_received = now_received;
        last_finished = finished;
        if finished == total {
            break;
        }
        assert!(Instant::now() < deadline, "only {finished} of {total} finished");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    publisher.await.unwrap();
    publish_blocking(port, &[("devices/bike_001/status", "offline")]);

    // After the run: exact counts, per pipeline and per stage.
    let text = scrape(admin).await;
    let stats = host.snapshot()["telemetry"];
    let delivered = valid.len() as u64;
    let pipeline = ("pipeline", "telemetry");
    assert_eq!(value(&text, "eliot_messages_received_total", &[pipeline]), total);
    assert_eq!(value(&text, "eliot_messages_delivered_total", &[pipeline]), delivered);
    assert_eq!(value(&text, "eliot_records_out_total", &[pipeline]), delivered);
    assert_eq!(value(&text, "eliot_messages_dropped_total", &[pipeline, ("stage", "sanity-filter")]), 1);
    assert_eq!(
        value(&text, "eliot_messages_dead_lettered_total", &[pipeline, ("stage", "validate-format"), ("kind", "invalid")]),
        6
    );
    assert_eq!(value(&text, "eliot_messages_dead_lettered_total", &[pipeline]), 6, "no other dead letters");
    assert_eq!(value(&text, "eliot_dead_letters_stored", &[]), 6);
    assert_eq!((stats.received, stats.delivered, stats.dropped, stats.dead_lettered), (total, delivered, 1, 6), "logs and metrics read the same counters");
    for (stage, inputs, outputs) in
        [("enrich", total, total), ("validate-format", total, total - 6), ("sanity-filter", total - 6, total - 7)]
    {
        let labels = [pipeline, ("stage", stage)];
        assert_eq!(value(&text, "eliot_stage_messages_in_total", &labels), inputs, "{stage} in");
        assert_eq!(value(&text, "eliot_stage_messages_out_total", &labels), outputs, "{stage} out");
        assert_eq!(value(&text, "eliot_stage_duration_seconds_count", &labels), inputs, "{stage} latency samples");
        assert_eq!(
            value(&text, "eliot_stage_duration_seconds_bucket", &[pipeline, ("stage", stage), ("le", "+Inf")]),
            inputs,
            "{stage} +Inf bucket"
        );
        assert_eq!(value(&text, "eliot_breaker_state", &[("kind", "stage"), ("name", stage), ("state", "closed")]), 1);
    }
    assert_eq!(value(&text, "eliot_breaker_state", &[("kind", "sink"), ("name", "file"), ("state", "closed")]), 1);
    assert_eq!(value(&text, "eliot_reloads_total", &[]), 0);
    assert_eq!(value(&text, "eliot_task_restarts_total", &[]), 0);

    // The devices endpoint lists exactly the devices that published, with
    // their message counts; the status messages are not counted.
    let deadline = Instant::now() + Duration::from_secs(30);
    let devices = loop {
        let body = http::get(admin, "/api/devices").await.json();
        let bike = body["devices"].as_array().unwrap().iter().find(|d| d["id"] == "bike_001").cloned().unwrap();
        if bike["online"] == false {
            break body;
        }
        assert!(Instant::now() < deadline, "bike_001 never went offline: {bike}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let listed: BTreeMap<String, u64> = devices["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["id"].as_str().unwrap().to_owned(), d["messages"].as_u64().unwrap()))
        .collect();
    assert_eq!(listed, expected_devices);
    for device in devices["devices"].as_array().unwrap() {
        assert!(device["first_seen"].as_str().unwrap() <= device["last_seen"].as_str().unwrap(), "{device}");
        if device["id"] != "bike_001" {
            assert_eq!(device["online"], Value::Null, "{device} never sent a status");
        }
    }
    let text = scrape(admin).await;
    assert_eq!(value(&text, "eliot_device_status_changes_total", &[("status", "online")]), 1);
    assert_eq!(value(&text, "eliot_device_status_changes_total", &[("status", "offline")]), 1);
    assert_eq!(value(&text, "eliot_devices", &[("status", "offline")]), 1);
    assert_eq!(value(&text, "eliot_devices", &[]), expected_devices.len() as u64);

    // The pipelines and plugins endpoints name what runs.
    let pipelines = http::get(admin, "/api/pipelines").await.json();
    let stages: Vec<(&str, &str)> = pipelines["pipelines"][0]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["version"].as_str().unwrap()))
        .collect();
    assert_eq!(stages, [("enrich", "0.1.0"), ("validate-format", "0.1.0"), ("sanity-filter", "0.1.0")]);
    assert_eq!(pipelines["pipelines"][0]["counts"]["delivered"], delivered);
    let plugins = http::get(admin, "/api/plugins").await.json();
    let names: Vec<&str> = plugins["plugins"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["enrich", "sanity-filter", "validate-format"]);
    let enrich = &plugins["plugins"][0];
    assert!(enrich["file"].as_str().unwrap().ends_with("enrich.wasm"), "{enrich}");
    assert_eq!(enrich["hash"].as_str().unwrap().len(), 16, "{enrich}");
    assert_eq!(enrich["limits"], json!({"memory_mib": 64, "call_budget_ms": 1000}));

    // The dead letters are listed with filters.
    let list = http::get(admin, "/api/dead-letters?stage=validate-format&limit=4").await.json();
    assert_eq!(list["dead_letters"].as_array().unwrap().len(), 4);
    let next = list["next_after_id"].as_i64().expect("a full page has a next id");
    let rest = http::get(admin, &format!("/api/dead-letters?stage=validate-format&after_id={next}")).await.json();
    assert_eq!(rest["dead_letters"].as_array().unwrap().len(), 2);
    assert_eq!(rest["next_after_id"], Value::Null);
    // A page that ends exactly at the last letter has no next page.
    let exact = http::get(admin, &format!("/api/dead-letters?stage=validate-format&after_id={next}&limit=2")).await.json();
    assert_eq!(exact["dead_letters"].as_array().unwrap().len(), 2);
    assert_eq!(exact["next_after_id"], Value::Null);
    let bad_kind = http::get(admin, "/api/dead-letters?kind=broken").await;
    assert_eq!(bad_kind.status, 400);
    assert!(bad_kind.json()["error"].as_str().unwrap().contains("kind \"broken\" is not a failure kind"), "{}", bad_kind.body);

    host.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_broker() {
    let mut broker = Mosquitto::start();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.address(), &plugins, "eliot-ops-ready", "ELIOT_OPS_TEST_UNSET_TOKEN");
    let (host, admin) = start_host(config).await;

    let health = http::get(admin, "/healthz").await;
    assert_eq!((health.status, health.json()), (200, json!({"status": "alive"})));
    let ready = wait_ready(admin, true, Duration::from_secs(10)).await;
    assert_eq!(ready["checks"]["broker"]["ok"], true);
    assert_eq!(ready["checks"]["plugins"]["stages"], 3);
    assert_eq!(ready["checks"]["sinks"]["ok"], true);

    tokio::task::block_in_place(|| broker.stop());
    let down = wait_ready(admin, false, Duration::from_secs(30)).await;
    assert_eq!(down["checks"]["broker"]["ok"], false, "{down}");
    assert_eq!(down["checks"]["sinks"]["ok"], true, "only the broker check fails: {down}");
    assert_eq!(value(&scrape(admin).await, "eliot_broker_connected", &[]), 0);
    let health = http::get(admin, "/healthz").await;
    assert_eq!(health.status, 200, "alive while the broker is down");

    tokio::task::block_in_place(|| broker.restart());
    // The reconnect backoff is at most 10 s.
    let up = wait_ready(admin, true, Duration::from_secs(40)).await;
    assert_eq!(up["checks"]["broker"]["ok"], true);
    assert_eq!(value(&scrape(admin).await, "eliot_broker_connected", &[]), 1);

    host.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_through_api_delivers() {
    use eliot::pipeline::FAULT_INJECTION_SINK_TOPIC_LEVEL;

    const TOKEN_ENV: &str = "ELIOT_OPS_TEST_REPLAY_TOKEN";
    const TOKEN: &str = "replay-secret-3f9a";
    std::env::set_var(TOKEN_ENV, TOKEN);
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.address(), &plugins, "eliot-ops-replay", TOKEN_ENV);
    let (host, admin) = start_host(config).await;

    // The sink task panics on this topic, so the message is stored as a
    // host-panic dead letter. A replay does not go through the sink task.
    let topic = format!("devices/{FAULT_INJECTION_SINK_TOPIC_LEVEL}/telemetry");
    let payload = r#"{"device_id": "x", "timestamp": "2025-06-05T14:30:00Z", "sensor_type": "gps", "data": {}}"#;
    publish_blocking(broker.port(), &[(topic.as_str(), payload)]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let letter = loop {
        let list = http::get(admin, "/api/dead-letters").await.json();
        if let Some(letter) = list["dead_letters"].as_array().unwrap().first() {
            break letter.clone();
        }
        assert!(Instant::now() < deadline, "no dead letter appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(letter["kind"], "host-panic");
    assert_eq!(letter["topic"], topic.as_str());
    let id = letter["id"].as_i64().unwrap();
    let shown = http::get(admin, &format!("/api/dead-letters/{id}")).await.json();
    assert_eq!(shown["payload_text"], payload);
    let text = scrape(admin).await;
    assert_eq!(value(&text, "eliot_task_restarts_total", &[]), 1);
    assert_eq!(value(&text, "eliot_messages_dead_lettered_total", &[("stage", "sink"), ("kind", "host-panic")]), 1);
    assert_eq!(value(&text, "eliot_dead_letters_stored", &[]), 1);

    let output = dir.path().join("out/processed.jsonl");
    assert!(read_complete_lines(&output).is_empty(), "nothing was written before the replay");
    let bearer = format!("Bearer {TOKEN}");
    let replayed = http::request(admin, "POST", &format!("/api/dead-letters/{id}/replay"), &[("Authorization", &bearer)], None).await;
    assert_eq!(replayed.status, 200, "{}", replayed.body);
    let summary = replayed.json();
    assert_eq!(summary["delivered"], 1, "{summary}");
    assert_eq!(summary["letters"], json!([{"id": id, "outcome": "delivered", "records": 1}]));

    // Delivered again: the record is in the file sink and the letter is gone.
    let records = read_complete_lines(&output);
    assert_eq!(records.len(), 1);
    let record: Value = serde_json::from_str(&records[0]).unwrap();
    assert_eq!(record["topic"], topic.as_str());
    assert_eq!(http::get(admin, &format!("/api/dead-letters/{id}")).await.status, 404);
    assert_eq!(value(&scrape(admin).await, "eliot_dead_letters_stored", &[]), 0);

    host.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_requests_need_token() {
    const TOKEN_ENV: &str = "ELIOT_OPS_TEST_AUTH_TOKEN";
    const TOKEN: &str = "auth-secret-81c2";
    std::env::set_var(TOKEN_ENV, TOKEN);
    let broker = Mosquitto::start();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.address(), &plugins, "eliot-ops-auth", TOKEN_ENV);
    let (host, admin) = start_host(config).await;

    // Store one dead letter so that a request that got through would change
    // something.
    publish_blocking(broker.port(), &[("devices/bad_001/telemetry", "not json")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while http::get(admin, "/api/dead-letters").await.json()["dead_letters"].as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no dead letter appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let purge_all = Some(r#"{"all": true}"#);
    let requests: [(&str, &str, Option<&str>); 4] = [
        ("POST", "/api/dead-letters/replay", purge_all),
        ("POST", "/api/dead-letters/1/replay", None),
        ("POST", "/api/dead-letters/purge", purge_all),
        ("DELETE", "/api/dead-letters/1", None),
    ];
    for (method, path, body) in requests {
        let missing = http::request(admin, method, path, &[], body).await;
        assert_eq!(missing.status, 401, "{method} {path} without a token: {}", missing.body);
        assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
        let wrong = http::request(admin, method, path, &[("Authorization", "Bearer not-the-token")], body).await;
        assert_eq!(wrong.status, 401, "{method} {path} with a wrong token: {}", wrong.body);
        let basic = http::request(admin, method, path, &[("Authorization", &format!("Basic {TOKEN}"))], body).await;
        assert_eq!(basic.status, 401, "{method} {path} with another scheme: {}", basic.body);
    }
    let list = http::get(admin, "/api/dead-letters").await.json();
    assert_eq!(list["dead_letters"].as_array().unwrap().len(), 1, "the refused requests changed nothing");

    // With the token the purge goes through.
    let bearer = format!("Bearer {TOKEN}");
    let purged = http::request(admin, "POST", "/api/dead-letters/purge", &[("Authorization", &bearer)], purge_all).await;
    assert_eq!((purged.status, purged.json()), (200, json!({"purged": 1})));
    host.shutdown(Duration::from_secs(10)).await;

    // A host without the token variable disables the mutating endpoints.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.address(), &plugins, "eliot-ops-no-token", "ELIOT_OPS_TEST_UNSET_TOKEN");
    let (host, admin) = start_host(config).await;
    let disabled = http::request(admin, "POST", "/api/dead-letters/purge", &[("Authorization", &bearer)], purge_all).await;
    assert_eq!(disabled.status, 403);
    assert!(disabled.json()["error"].as_str().unwrap().contains("ELIOT_OPS_TEST_UNSET_TOKEN is not set"), "{}", disabled.body);
    host.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_writes_json_log_lines() {
    use eliot_tests::process::HostProcess;

    const ELIOT: &str = env!("CARGO_BIN_EXE_eliot-under-test");
    const TOKEN_ENV: &str = "ELIOT_OPS_TEST_LOG_TOKEN";
    const TOKEN: &str = "log-secret-77d1";
    // The child process inherits the variable.
    std::env::set_var(TOKEN_ENV, TOKEN);
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let plugin = tokio::task::spawn_blocking(|| eliot_tests::plugins::build_plugin("flaky-panic")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A breaker that never opens in this test, so that every message
    // reaches the plugin and traps.
    let text = format!(
        r#"
[mqtt]
broker = "{broker}"
client_id = "eliot-ops-json"
keep_alive_secs = 5

[runtime]
cache_dir = "cache"
watch = false

[dead_letters]
path = "out/dead-letters.sqlite"

[plugins.flaky]
file = "{plugin}"
breaker = {{ failure_threshold = 1000 }}

[pipelines.telemetry]
topics = ["devices/+/telemetry"]
stages = ["flaky"]
sinks = ["file"]

[sinks.file]
type = "file"
path = "out/processed.jsonl"

[log]
format = "json"

[admin]
listen = "127.0.0.1:0"
token_env = "{TOKEN_ENV}"
"#,
        broker = broker.address(),
        plugin = plugin.display(),
    );
    let config = dir.path().join("eliot.toml");
    std::fs::write(&config, text).unwrap();
    let log_path = dir.path().join("host.log");
    // The per-message spans are at DEBUG.
    let mut host = tokio::task::block_in_place(|| {
        HostProcess::start_with_log_filter(Path::new(ELIOT), &config, &log_path, "info,eliot::pipeline=debug")
    });

    // The test reads the admin address from the log, as an operator would.
    let lines = || -> Vec<Value> {
        read_complete_lines(&log_path)
            .iter()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}")))
            .collect()
    };
    let listening = lines().into_iter().find(|l| l["fields"]["message"] == "admin server listening").expect("the admin address is logged");
    let admin: SocketAddr = listening["fields"]["address"].as_str().unwrap().parse().unwrap();

    let messages: Vec<(String, String)> =
        (0..20).map(|n| (format!("devices/sensor_{}/telemetry", n % 2), format!(r#"{{"n": {n}, "note": "fail"}}"#))).collect();
    tokio::task::block_in_place(|| publish_all(broker.port(), &messages, QoS::AtLeastOnce));
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = scrape(admin).await;
        if value(&text, "eliot_messages_dead_lettered_total", &[("kind", "trap")]) == 20 {
            break text;
        }
        assert!(Instant::now() < deadline, "20 traps were not dead-lettered:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::task::block_in_place(|| host.terminate(Duration::from_secs(30)));

    // A plugin failure is logged inside the message and stage spans, with
    // the ids of the message.
    let lines = lines();
    let failures: Vec<&Value> = lines.iter().filter(|l| l["fields"]["message"] == "plugin failed; its instance is replaced").collect();
    assert!(!failures.is_empty(), "no plugin failure was logged");
    for failure in &failures {
        assert_eq!(failure["level"], "WARN");
        assert_eq!(failure["span"]["name"], "stage", "{failure}");
        assert_eq!(failure["span"]["stage"], "flaky", "{failure}");
        assert_eq!(failure["span"]["plugin_version"], "0.1.0", "{failure}");
        let message = &failure["spans"][0];
        assert_eq!(message["name"], "message", "{failure}");
        assert_eq!(message["pipeline"], "telemetry", "{failure}");
        assert_eq!(message["messaging.system"], "mqtt", "{failure}");
        let device = message["device"].as_str().unwrap();
        assert_eq!(message["topic"], format!("devices/{device}/telemetry"), "{failure}");
        assert_eq!(failure["fields"]["device"], device, "{failure}");
        assert_eq!(failure["fields"]["pipeline"], "telemetry", "{failure}");
        assert_eq!(failure["fields"]["plugin"], "flaky", "{failure}");
        assert_eq!(failure["fields"]["plugin_version"], "0.1.0", "{failure}");
    }
    let letters: Vec<&Value> = lines.iter().filter(|l| l["fields"]["message"] == "message dead-lettered").collect();
    for letter in &letters {
        assert_eq!(letter["fields"]["kind"], "trap", "{letter}");
        assert_eq!(letter["fields"]["stage"], "flaky", "{letter}");
        assert_eq!(letter["fields"]["pipeline"], "telemetry", "{letter}");
    }

    // Rate limiting: every event was either logged or counted as
    // suppressed, 20 plugin failures and 20 dead letters.
    let suppressed = value(&text, "eliot_log_lines_suppressed_total", &[]);
    assert_eq!(failures.len() as u64 + letters.len() as u64 + suppressed, 40);
    assert!(failures.len() <= 20, "{} failure lines", failures.len());
    assert!(letters.len() <= 20, "{} dead-letter lines", letters.len());

    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains(TOKEN), "the admin token is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_in_use_fails_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let broker = Mosquitto::start();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = write_config(dir.path(), &broker.address(), &plugins, "eliot-ops-port", "ELIOT_OPS_TEST_UNSET_TOKEN");
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    config.admin.as_mut().unwrap().listen = listen;

    let error = match Host::start(config).await {
        Ok(_) => panic!("the host started although port {port} is in use"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.starts_with(&format!("admin.listen: cannot listen on {listen}: ")), "{error}");
    assert!(error.ends_with("choose a free port, or port 0 for any"), "{error}");
}

/// Maximum wait for the admin server to cut off a slow client: its header
/// and body timeouts are 5 seconds each, and the rest is room for a busy
/// machine.
const CUT_OFF_WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off() {
    const TOKEN_ENV: &str = "ELIOT_OPS_TEST_SLOW_TOKEN";
    const TOKEN: &str = "slow-secret-5be0";
    std::env::set_var(TOKEN_ENV, TOKEN);
    let broker = Mosquitto::start();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.address(), &plugins, "eliot-ops-slow", TOKEN_ENV);
    let (host, admin) = start_host(config).await;

    // A connection that never sends a request is closed by the server.
    let mut idle = tokio::net::TcpStream::connect(admin).await.unwrap();
    let answer = http::read_until_closed(&mut idle, CUT_OFF_WITHIN).await;
    assert!(!String::from_utf8_lossy(&answer).contains(" 200 "), "{answer:?}");

    // So is one whose headers never end.
    let answer = http::send_raw(admin, b"GET /healthz HTTP/1.1\r\nHost: eliot\r\n", CUT_OFF_WITHIN).await;
    assert!(!String::from_utf8_lossy(&answer).contains(" 200 "), "{answer:?}");

    // A body that stops short of its Content-Length gets 408.
    let slow_body = format!(
        "POST /api/dead-letters/purge HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\""
    );
    let answer = http::send_raw(admin, slow_body.as_bytes(), CUT_OFF_WITHIN).await;
    let response = http::parse_response(&answer).unwrap_or_else(|| panic!("no response to a slow body: {answer:?}"));
    assert_eq!(response.status, 408, "{}", response.body);
    assert!(response.json()["error"].as_str().unwrap().contains("body"), "{}", response.body);

    let health = http::get(admin, "/healthz").await;
    assert_eq!(health.status, 200, "the server still answers");
    host.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_spare_mqtt() {
    use eliot_tests::process::HostProcess;
    use tokio::net::TcpStream;

    const ELIOT: &str = env!("CARGO_BIN_EXE_eliot-under-test");
    const CAP: usize = eliot::admin::server::MAX_CONNECTIONS;
    // More idle connections than the host could hold without the cap (the
    // limit set below leaves room for CAP + 32), and at most the cap plus
    // the listen backlog (128 in mio 1.2), so that every connect completes.
    const IDLE: usize = CAP + 112;
    let mut broker = Mosquitto::start();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &broker.address(), &plugins, "eliot-ops-idle", "ELIOT_OPS_TEST_UNSET_TOKEN");
    let log = dir.path().join("host.log");
    let mut host = tokio::task::block_in_place(|| HostProcess::start(Path::new(ELIOT), &dir.path().join("eliot.toml"), &log));
    let listening = host.log().lines().find(|line| line.contains("admin server listening")).map(str::to_owned).expect("the admin address is logged");
    let admin: SocketAddr = listening.split("address=").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap().parse().unwrap();
    tokio::task::block_in_place(|| host.wait_for_log("watching for plugin and config changes", Duration::from_secs(30)));

    // The host may open the files and sockets it has now, the admin
    // connections up to the cap, and a few more, such as the files of a
    // reload or the socket of a reconnect.
    let baseline = host.open_files();
    host.limit_open_files((baseline + CAP + 32) as u64);

    let mut idle = Vec::with_capacity(IDLE);
    for n in 0..IDLE {
        idle.push(TcpStream::connect(admin).await.unwrap_or_else(|e| panic!("idle connection {n}: {e}")));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while host.open_files() < baseline + CAP {
        assert!(Instant::now() < deadline, "the host accepted only {} connections", host.open_files() - baseline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // While the connections are open, a config change is reloaded, which
    // opens the config file.
    let config = dir.path().join("eliot.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let stages = r#"stages = ["enrich", "validate-format", "sanity-filter"]"#;
    assert!(text.contains(stages), "{text}");
    let reordered = text.replace(stages, r#"stages = ["validate-format", "enrich", "sanity-filter"]"#);
    let temporary = dir.path().join("eliot.toml.new");
    std::fs::write(&temporary, reordered).unwrap();
    std::fs::rename(&temporary, &config).unwrap();
    tokio::task::block_in_place(|| host.wait_for_log("reload applied", Duration::from_secs(60)));

    // The broker restarts while the connections are open: reconnecting
    // needs a new socket.
    tokio::task::block_in_place(|| {
        broker.restart();
        host.wait_for_log_count("connected to the broker", 2, Duration::from_secs(60));
    });

    // The server responds again once the idle connections are gone.
    drop(idle);
    wait_ready(admin, true, Duration::from_secs(60)).await;
    tokio::task::block_in_place(|| host.terminate(Duration::from_secs(30)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_takes_each_id_once() {
    const TOKEN_ENV: &str = "ELIOT_OPS_TEST_ONCE_TOKEN";
    const TOKEN: &str = "once-secret-2a71";
    std::env::set_var(TOKEN_ENV, TOKEN);
    let broker = Mosquitto::start();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.address(), &plugins, "eliot-ops-once", TOKEN_ENV);
    let (host, admin) = start_host(config).await;
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let output = dir.path().join("out/processed.jsonl");
    let ids_body = |ids: &[i64]| json!({ "ids": ids }).to_string();

    // A repeated id is replayed once.
    let id = store_letter(dir.path(), "repeat");
    let replayed = http::request(admin, "POST", "/api/dead-letters/replay", &auth, Some(&ids_body(&[id, id, id]))).await;
    assert_eq!(replayed.status, 200, "{}", replayed.body);
    assert_eq!(replayed.json()["letters"], json!([{"id": id, "outcome": "delivered", "records": 1}]));
    assert_eq!(replayed.json()["delivered"], 1);
    assert_eq!(read_complete_lines(&output).len(), 1, "one record for one letter");

    // Once it is gone, replaying it again is 404.
    let again = http::request(admin, "POST", "/api/dead-letters/replay", &auth, Some(&ids_body(&[id]))).await;
    assert_eq!(again.status, 404, "{}", again.body);
    assert!(again.json()["error"].as_str().unwrap().contains(&id.to_string()), "{}", again.body);

    // Three replays of one letter at once: one delivers it, the others
    // find it gone.
    let id = store_letter(dir.path(), "race");
    let body = ids_body(&[id]);
    let replay = || http::request(admin, "POST", "/api/dead-letters/replay", &auth, Some(&body));
    let (first, second, third) = tokio::join!(replay(), replay(), replay());
    let mut statuses = [first.status, second.status, third.status];
    statuses.sort();
    assert_eq!(statuses, [200, 404, 404], "{}\n{}\n{}", first.body, second.body, third.body);
    for response in [&first, &second, &third] {
        assert!(response.json().is_object(), "{}", response.body);
    }
    assert_eq!(read_complete_lines(&output).len(), 2, "one record for the second letter");

    // A missing id is 404 for every request that names it.
    let missing_path = format!("/api/dead-letters/{id}");
    let missing_replay = format!("/api/dead-letters/{id}/replay");
    let requests: [(&str, &str, Option<&str>); 4] = [
        ("POST", &missing_replay, None),
        ("POST", "/api/dead-letters/replay", Some(&body)),
        ("POST", "/api/dead-letters/purge", Some(&body)),
        ("DELETE", &missing_path, None),
    ];
    for (method, path, body) in requests {
        let response = http::request(admin, method, path, &auth, body).await;
        assert_eq!(response.status, 404, "{method} {path}: {}", response.body);
        assert!(response.json()["error"].as_str().unwrap().contains(&id.to_string()), "{method} {path}: {}", response.body);
    }

    // A selection with one missing id changes nothing.
    let kept = store_letter(dir.path(), "kept");
    let body = ids_body(&[kept, kept + 1000]);
    for path in ["/api/dead-letters/replay", "/api/dead-letters/purge"] {
        let response = http::request(admin, "POST", path, &auth, Some(&body)).await;
        assert_eq!(response.status, 404, "{path}: {}", response.body);
        assert!(response.json()["error"].as_str().unwrap().contains(&(kept + 1000).to_string()), "{path}: {}", response.body);
        assert_eq!(http::get(admin, &format!("/api/dead-letters/{kept}")).await.status, 200, "{path} left {kept} alone");
    }
    assert_eq!(read_complete_lines(&output).len(), 2, "nothing more was delivered");
    host.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_replay_skips_letter_cli_replays() {
    use eliot::deadletter::cli::{execute_to, ConfigArg, DeadLetterCommand, FilterArgs};
    use eliot_tests::silent_broker::SilentBroker;

    const TOKEN_ENV: &str = "ELIOT_OPS_TEST_CLAIM_TOKEN";
    const TOKEN: &str = "claim-secret-6e03";
    std::env::set_var(TOKEN_ENV, TOKEN);
    let broker = Mosquitto::start();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let republish = r#"
[sinks.republish]
type = "mqtt"
topic = "processed/{payload.device_id}"
"#;
    let config = write_config_with(dir.path(), &broker.address(), &plugins, "eliot-ops-claim", TOKEN_ENV, r#""file", "republish""#, republish);
    let (host, admin) = start_host(config).await;
    let id = store_letter(dir.path(), "claimed");
    let output = dir.path().join("out/processed.jsonl");

    // `eliot dead-letters replay ID`, with its MQTT sink on a broker that
    // never confirms: it wrote the file sink and waits for the PUBACK,
    // in the middle of replaying the letter.
    let mut silent = SilentBroker::start().await;
    let command = DeadLetterCommand::Replay {
        config: ConfigArg { config: dir.path().join("eliot.toml") },
        ids: vec![id],
        filter: FilterArgs::default(),
        all: false,
        broker: Some(silent.address()),
        skip_mqtt_sinks: false,
    };
    // The CLI runs in this task, polled beside the steps that follow.
    let mut out = Vec::new();
    let mut cli = Box::pin(execute_to(command, &mut out));
    tokio::select! {
        result = &mut cli => panic!("the CLI replay ended before it published: {result:?}"),
        () = silent.wait_publishes(1, Duration::from_secs(60)) => {}
    }
    assert_eq!(read_complete_lines(&output).len(), 1, "the CLI wrote its record");

    // The API leaves the letter to the CLI.
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let path = format!("/api/dead-letters/{id}/replay");
    let api_replay = http::request(admin, "POST", &path, &auth, None);
    let replayed = tokio::select! {
        result = &mut cli => panic!("the CLI replay ended while the API replayed: {result:?}"),
        response = api_replay => response,
    };
    assert_eq!(replayed.status, 200, "{}", replayed.body);
    let summary = replayed.json();
    assert_eq!(summary["delivered"], 0, "{summary}");
    assert_eq!(summary["skipped"], 1, "{summary}");
    assert_eq!(summary["letters"][0]["outcome"], "skipped", "{summary}");
    assert!(summary["letters"][0]["reason"].as_str().unwrap().contains("another replay"), "{summary}");
    assert_eq!(read_complete_lines(&output).len(), 1, "the API wrote no second record");

    // The CLI stops as if it were killed, and the letter stays in the
    // store.
    drop(cli);
    assert_eq!(http::get(admin, &format!("/api/dead-letters/{id}")).await.status, 200);
    host.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_are_json() {
    const TOKEN_ENV: &str = "ELIOT_OPS_TEST_ERRORS_TOKEN";
    const TOKEN: &str = "errors-secret-9c14";
    std::env::set_var(TOKEN_ENV, TOKEN);
    let broker = Mosquitto::start();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.address(), &plugins, "eliot-ops-errors", TOKEN_ENV);
    let (host, admin) = start_host(config).await;
    let bearer = format!("Bearer {TOKEN}");

    let too_large = "99999999999999999999";
    // Method, path, whether the token is sent, expected status, and a text
    // the error must contain.
    let cases: [(&str, String, bool, u16, &str); 11] = [
        ("GET", "/api/dead-letters/abc".to_owned(), false, 400, "\"abc\""),
        ("GET", format!("/api/dead-letters/{too_large}"), false, 400, too_large),
        ("GET", "/api/dead-letters?limit=many".to_owned(), false, 400, "limit"),
        ("GET", "/api/dead-letters?colour=red".to_owned(), false, 400, "colour"),
        ("GET", "/api/nothing-here".to_owned(), false, 404, "/api/nothing-here"),
        ("PUT", "/api/dead-letters/1".to_owned(), true, 405, "PUT"),
        ("POST", "/api/dead-letters/abc/replay".to_owned(), true, 400, "\"abc\""),
        ("DELETE", format!("/api/dead-letters/{too_large}"), true, 400, too_large),
        // Without the token: 401 before the path is read.
        ("POST", "/api/dead-letters/abc/replay".to_owned(), false, 401, "bearer token"),
        ("DELETE", format!("/api/dead-letters/{too_large}"), false, 401, "bearer token"),
        ("POST", "/api/dead-letters/purge".to_owned(), false, 401, "bearer token"),
    ];
    for (method, path, with_token, status, text) in cases {
        let headers: &[(&str, &str)] = if with_token { &[("Authorization", &bearer)] } else { &[] };
        let response = http::request(admin, method, &path, headers, None).await;
        assert_eq!(response.status, status, "{method} {path}: {}", response.body);
        assert_eq!(response.header("content-type"), Some("application/json"), "{method} {path}: {}", response.body);
        let error = response.json()["error"].as_str().unwrap_or_else(|| panic!("{method} {path}: no error text: {}", response.body)).to_owned();
        assert!(error.contains(text), "{method} {path}: {error}");
        if status == 405 {
            assert!(response.header("allow").is_some_and(|allow| allow.contains("DELETE")), "{method} {path}: {:?}", response.headers);
        }
    }

    // A body over the limit is rejected from its Content-Length, and
    // without the token the request is rejected before the body.
    let large_head = |auth: &str| format!("POST /api/dead-letters/purge HTTP/1.0\r\n{auth}Content-Type: application/json\r\nContent-Length: 3000000\r\n\r\n");
    for (auth, status) in [(format!("Authorization: {bearer}\r\n"), 413), (String::new(), 401)] {
        let answer = http::send_raw(admin, large_head(&auth).as_bytes(), CUT_OFF_WITHIN).await;
        let response = http::parse_response(&answer).unwrap_or_else(|| panic!("no response: {answer:?}"));
        assert_eq!(response.status, status, "{}", response.body);
        assert!(response.json()["error"].is_string(), "{}", response.body);
    }
    host.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_ignores_whitespace_and_case() {
    const TOKEN_ENV: &str = "ELIOT_OPS_TEST_FILE_TOKEN";
    const TOKEN: &str = "file-secret-0d4e";
    // As read from a secret file that ends with a line break.
    std::env::set_var(TOKEN_ENV, format!("{TOKEN}\n"));
    let broker = Mosquitto::start();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.address(), &plugins, "eliot-ops-file-token", TOKEN_ENV);
    let (host, admin) = start_host(config).await;

    for scheme in ["Bearer", "bearer", "BEARER"] {
        let id = store_letter(dir.path(), "token");
        let header = format!("{scheme} {TOKEN}");
        let deleted = http::request(admin, "DELETE", &format!("/api/dead-letters/{id}"), &[("Authorization", &header)], None).await;
        assert_eq!((deleted.status, deleted.json()), (200, json!({"purged": 1})), "scheme {scheme}");
    }
    let wrong = http::request(admin, "DELETE", "/api/dead-letters/1", &[("Authorization", "bearer file-secret")], None).await;
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    host.shutdown(Duration::from_secs(10)).await;
}
