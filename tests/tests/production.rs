//! Production configuration end to end: layered configuration with an
//! overlay and broker variables, `eliot check`, topic matching of
//! `$`-topics and empty levels through Mosquitto, and the device key that
//! keeps each device's messages in order across workers.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use eliot::config::Config;
use eliot::host::Host;
use eliot_tests::config::example_config;
use eliot_tests::data::expected_messages;
use eliot_tests::plugins::build_examples;
use eliot_tests::process::HostProcess;
use eliot_tests::wait::{read_complete_lines, wait_for_json_lines};
use eliot_tests::{publish_all, Mosquitto, QoS};
use serde_json::{json, Value};

const ELIOT: &str = env!("CARGO_BIN_EXE_eliot-under-test");

/// Runs `eliot check --config config` with only the layer variables in
/// `env`, and returns whether it succeeded, its standard output and its
/// standard error.
fn run_check(config: &Path, env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = Command::new(ELIOT);
    for name in std::iter::once(eliot::layers::PROFILE_VARIABLE).chain(eliot::layers::variable_names()) {
        command.env_remove(name);
    }
    let output = command
        .args(["check", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run eliot check");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Returns the `device_id` header of a file-sink record, if any.
fn device_header(record: &Value) -> Option<&str> {
    record["headers"]
        .as_array()
        .expect("headers is an array")
        .iter()
        .find(|pair| pair[0] == "device_id")
        .and_then(|pair| pair[1].as_str())
}

#[test]
fn check_lists_every_problem() {
    let plugins = build_examples();
    let dir = tempfile::tempdir().unwrap();
    // A file that exists but is no component: only loading finds that.
    let broken = dir.path().join("broken.wasm");
    std::fs::write(&broken, b"not a component").unwrap();
    let extra = format!(
        "\n[plugins.broken]\nfile = \"{}\"\n\n[pipelines.other]\ntopics = [\"other/#\"]\nstages = [\"broken\"]\nsinks = [\"nowhere\"]\n",
        broken.display()
    );
    let base = dir.path().join("eliot.toml");
    std::fs::write(&base, example_config("127.0.0.1:1", &plugins, "eliot-check", "\"file\"", &extra)).unwrap();
    std::fs::write(dir.path().join("prod.toml"), "[pipelines.telemetry]\nworkerz = 4\n").unwrap();

    // The base file alone: the undefined sink and the broken plugin.
    let (ok, stdout, stderr) = run_check(&base, &[]);
    assert!(!ok, "check must fail; stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stderr.contains("2 problems found"), "{stderr}");
    assert!(stderr.contains("key `pipelines.other.sinks`: sink \"nowhere\" is not defined"), "{stderr}");
    assert!(stderr.contains("plugin \"broken\": "), "{stderr}");
    assert!(stdout.contains("ok: plugin \"enrich\" enrich 0.1.0"), "{stdout}");
    assert!(stdout.contains("ok: plugin \"validate-format\""), "{stdout}");

    // With the prod overlay its unknown key is listed too, under the
    // overlay's name, and the plugins are still loaded.
    let (ok, stdout, stderr) = run_check(&base, &[("ELIOT_ENV", "prod")]);
    assert!(!ok);
    assert!(stderr.contains("3 problems found"), "{stderr}");
    let overlay = std::path::absolute(dir.path().join("prod.toml")).unwrap();
    assert!(
        stderr.contains(&format!("{}: key `pipelines.telemetry.workerz`: unknown field `workerz`", overlay.display())),
        "{stderr}"
    );
    assert!(stdout.contains(&format!("overlay: {}", overlay.display())), "{stdout}");
    assert!(stdout.contains("ok: plugin \"sanity-filter\""), "{stdout}");

    // A bad port variable is named; the valid part passes once it is fixed.
    let valid = example_config("127.0.0.1:1", &plugins, "eliot-check", "\"file\"", "");
    std::fs::write(&base, valid).unwrap();
    let (ok, _stdout, stderr) = run_check(&base, &[("MQTT_BROKER_PORT", "70000")]);
    assert!(!ok);
    assert!(stderr.contains("1 problem found"), "{stderr}");
    assert!(stderr.contains("environment variable MQTT_BROKER_PORT: key `mqtt.broker`: \"70000\" is not a port"), "{stderr}");

    let (ok, stdout, stderr) = run_check(&base, &[("MQTT_BROKER_PORT", "1883")]);
    assert!(ok, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("environment variables: MQTT_BROKER_PORT"), "{stdout}");
    assert!(stdout.ends_with("configuration is valid\n"), "{stdout}");

    // A password is never printed, whether the schema takes it or not.
    let secret = "never-printed-5ecret";
    let (_ok, stdout, stderr) = run_check(&base, &[("MQTT_PASSWORD", secret), ("MQTT_BROKER_PORT", "0")]);
    assert!(stderr.contains("MQTT_BROKER_PORT"), "{stderr}");
    assert!(!stdout.contains(secret), "stdout:\n{stdout}");
    assert!(!stderr.contains(secret), "stderr:\n{stderr}");
}

#[test]
fn overlay_and_broker_variables_run_the_host() {
    let broker = Mosquitto::start();
    let plugins = build_examples();
    let dir = tempfile::tempdir().unwrap();
    // The base file points at a port nothing listens on. The variables
    // point the host at the test's broker, and the overlay changes the
    // client id and the file sink's path.
    let base = dir.path().join("eliot.toml");
    std::fs::write(&base, example_config("127.0.0.1:1", &plugins, "eliot-base", "\"file\"", "")).unwrap();
    std::fs::write(
        dir.path().join("prod.toml"),
        "[mqtt]\nclient_id = \"eliot-prod\"\n\n[sinks.file]\npath = \"out/prod.jsonl\"\n",
    )
    .unwrap();
    let port = broker.port().to_string();
    let env = [
        ("ELIOT_ENV", "prod"),
        ("MQTT_BROKER_HOST", "127.0.0.1"),
        ("MQTT_BROKER_PORT", port.as_str()),
        // Empty counts as unset, as a unit file that lists every variable
        // needs.
        ("MQTT_CA_FILE", ""),
    ];
    let log = dir.path().join("eliot.log");
    let mut host = HostProcess::start_with_env(Path::new(ELIOT), &base, &log, &env);

    let messages: Vec<(String, Vec<u8>)> =
        expected_messages().into_iter().take(50).map(|m| (m.topic.clone(), m.payload_bytes())).collect();
    publish_all(broker.port(), &messages, QoS::AtLeastOnce);
    let records = wait_for_json_lines(dir.path().join("out/prod.jsonl"), 50, Duration::from_secs(60));
    assert_eq!(records.len(), 50);
    assert!(!dir.path().join("out/processed.jsonl").exists(), "the overlay moved the sink");
    host.terminate(Duration::from_secs(30));

    let text = std::fs::read_to_string(&log).unwrap();
    let overlay = std::path::absolute(dir.path().join("prod.toml")).unwrap();
    assert!(
        text.contains(&format!(
            "then {}, then the environment variables MQTT_BROKER_HOST, MQTT_BROKER_PORT",
            overlay.display()
        )),
        "{text}"
    );
    assert!(broker.log().contains("as eliot-prod"), "the overlay's client id connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_and_empty_level_topics_route_correctly() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r##"
[mqtt]
broker = "{broker}"
client_id = "eliot-topics"
keep_alive_secs = 5

[runtime]
cache_dir = "cache"

[dead_letters]
path = "out/dead-letters.sqlite"

[pipelines.everything]
topics = ["#"]
stages = []
sinks = ["everything"]

[pipelines.dollar]
topics = ["$fleet/+/status"]
stages = []
sinks = ["dollar"]

[pipelines.sport]
topics = ["sport//tennis/player1/#"]
stages = []
sinks = ["sport"]

[sinks.everything]
type = "file"
path = "out/everything.jsonl"

[sinks.dollar]
type = "file"
path = "out/dollar.jsonl"

[sinks.sport]
type = "file"
path = "out/sport.jsonl"
"##,
        broker = broker.address()
    );
    let path = dir.path().join("eliot.toml");
    std::fs::write(&path, text).unwrap();
    let mut host = Host::start(Config::load(&path).unwrap_or_else(|e| panic!("{e}"))).await.unwrap();
    assert!(host.wait_connected(Duration::from_secs(10)).await);

    let messages = [
        ("$fleet/m1/status", "1"),
        ("sport//tennis/player1//wimbledon", "2"),
        ("sport/tennis/player1/wimbledon", "3"),
        ("/leading", "4"),
    ];
    let port = broker.port();
    tokio::task::spawn_blocking(move || publish_all(port, &messages, QoS::AtLeastOnce)).await.unwrap();

    // Every pipeline finishes what it got: 3 for `#` (all but the
    // `$`-topic), 1 each for the others.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let expected = [("dollar", 1), ("everything", 3), ("sport", 1)];
    loop {
        let snapshot = host.snapshot();
        let finished: Vec<(&str, u64)> =
            expected.iter().map(|(name, _)| (*name, snapshot[*name].delivered)).collect();
        if finished == expected {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "delivered {finished:?}, expected {expected:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snapshot = host.snapshot();
    host.shutdown(Duration::from_secs(10)).await;

    // Sorted, because messages on different topics may take different
    // workers.
    let topics = |file: &str| -> Vec<String> {
        let mut topics: Vec<String> = read_complete_lines(dir.path().join("out").join(file))
            .iter()
            .map(|line| serde_json::from_str::<Value>(line).unwrap()["topic"].as_str().unwrap().to_owned())
            .collect();
        topics.sort();
        topics
    };
    assert_eq!(topics("dollar.jsonl"), vec!["$fleet/m1/status"]);
    assert_eq!(topics("sport.jsonl"), vec!["sport//tennis/player1//wimbledon"]);
    assert_eq!(
        topics("everything.jsonl"),
        vec!["/leading", "sport//tennis/player1//wimbledon", "sport/tennis/player1/wimbledon"],
        "# matches empty levels and a leading slash, but no $-topic"
    );
    for name in ["dollar", "everything", "sport"] {
        let stats = snapshot[name];
        assert_eq!(stats.received, stats.delivered, "{name}: {stats:?}");
        assert_eq!(stats.dead_lettered, 0, "{name}");
    }
}

/// Writes and loads a configuration with one pipeline of no stages, four
/// workers and `device_key`, writing to `out/keyed.jsonl`.
fn keyed_config(dir: &Path, broker: &str, device_key: &str) -> Config {
    let text = format!(
        r#"
[mqtt]
broker = "{broker}"
client_id = "eliot-keyed"
keep_alive_secs = 5

[runtime]
cache_dir = "cache"

[dead_letters]
path = "out/dead-letters.sqlite"

[pipelines.keyed]
topics = ["gateways/+/data"]
workers = 4
stages = []
sinks = ["file"]
device_key = {device_key}

[sinks.file]
type = "file"
path = "out/keyed.jsonl"
"#
    );
    let path = dir.join("eliot.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_device_key_keeps_order_per_device() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let config = keyed_config(dir.path(), &broker.address(), r#"{ payload = "device_id" }"#);
    let mut host = Host::start(config).await.unwrap();
    assert!(host.wait_connected(Duration::from_secs(10)).await);

    // 12 devices report through 5 gateways in turn, so one device's
    // messages arrive on several topics: a topic key would spread them
    // over the workers.
    const DEVICES: usize = 12;
    const PER_DEVICE: usize = 100;
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    for seq in 0..PER_DEVICE {
        for device in 0..DEVICES {
            let topic = format!("gateways/gw{}/data", (seq + device) % 5);
            let payload = json!({"device_id": format!("meter-{device:02}"), "seq": seq});
            messages.push((topic, serde_json::to_vec(&payload).unwrap()));
        }
    }
    // Keyed by the topic: not JSON, and JSON without the field.
    messages.push(("gateways/gw0/data".to_owned(), b"not json".to_vec()));
    messages.push(("gateways/gw1/data".to_owned(), br#"{"seq": 0}"#.to_vec()));
    let total = messages.len();
    let port = broker.port();
    tokio::task::spawn_blocking(move || publish_all(port, &messages, QoS::AtLeastOnce)).await.unwrap();

    let records = wait_for_json_lines(dir.path().join("out/keyed.jsonl"), total, Duration::from_secs(60));
    let stats = host.snapshot()["keyed"];
    host.shutdown(Duration::from_secs(10)).await;

    // Exact counts: every message delivered once, two without a key.
    assert_eq!(records.len(), total);
    assert_eq!((stats.received, stats.delivered, stats.dead_lettered), (total as u64, total as u64, 0));
    assert_eq!(stats.device_key_missing, 2);

    // Per device: every sequence number once, in order, with the header.
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut without_key = Vec::new();
    for record in &records {
        let Some(device) = record["payload"].get("device_id").and_then(Value::as_str) else {
            assert_eq!(device_header(record), None, "no device id, no header: {record}");
            without_key.push(record["topic"].as_str().unwrap().to_owned());
            continue;
        };
        assert_eq!(device_header(record), Some(device), "{record}");
        seen.entry(device.to_owned()).or_default().push(record["payload"]["seq"].as_u64().unwrap());
    }
    without_key.sort();
    assert_eq!(without_key, vec!["gateways/gw0/data", "gateways/gw1/data"]);
    assert_eq!(seen.len(), DEVICES);
    let in_order: Vec<u64> = (0..PER_DEVICE as u64).collect();
    for (device, seqs) in &seen {
        assert_eq!(seqs, &in_order, "{device} out of order or incomplete");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_device_key_sets_header_or_falls_back() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let config = keyed_config(dir.path(), &broker.address(), r#"{ topic = "gateways/{device_id}/data" }"#);
    let mut host = Host::start(config).await.unwrap();
    assert!(host.wait_connected(Duration::from_secs(10)).await);

    // The empty level does not name a device, so that message falls back.
    let messages = [("gateways/gw7/data", "{}"), ("gateways//data", "{}"), ("gateways/gw8/data", "{}")];
    let port = broker.port();
    tokio::task::spawn_blocking(move || publish_all(port, &messages, QoS::AtLeastOnce)).await.unwrap();
    let records = wait_for_json_lines(dir.path().join("out/keyed.jsonl"), 3, Duration::from_secs(30));
    let stats = host.snapshot()["keyed"];
    host.shutdown(Duration::from_secs(10)).await;

    assert_eq!((stats.received, stats.delivered, stats.device_key_missing), (3, 3, 1));
    let mut headers: Vec<(String, Option<String>)> = records
        .iter()
        .map(|r| (r["topic"].as_str().unwrap().to_owned(), device_header(r).map(str::to_owned)))
        .collect();
    headers.sort();
    assert_eq!(
        headers,
        vec![
            ("gateways//data".to_owned(), None),
            ("gateways/gw7/data".to_owned(), Some("gw7".to_owned())),
            ("gateways/gw8/data".to_owned(), Some("gw8".to_owned())),
        ]
    );
}

/// A persistent session keeps a subscription that the configuration no
/// longer has. The broker goes on delivering its messages, which no
/// pipeline matches: the host counts each and acknowledges it, so that the
/// broker does not hold them for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_subscription_counted_unrouted() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let config = |filter: &str| {
        let text = format!(
            r##"
[mqtt]
broker = "{broker}"
client_id = "eliot-unrouted"
keep_alive_secs = 5

[runtime]
cache_dir = "cache"

[dead_letters]
path = "out/dead-letters.sqlite"

[pipelines.current]
topics = ["{filter}"]
qos = 1
stages = []
sinks = ["current"]

[sinks.current]
type = "file"
path = "out/current.jsonl"
"##,
            broker = broker.address()
        );
        let path = dir.path().join("eliot.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
    };

    // The first configuration subscribes to old/#, in the kept session.
    let mut host = Host::start(config("old/#")).await.unwrap();
    assert!(host.wait_connected(Duration::from_secs(10)).await);
    host.shutdown(Duration::from_secs(10)).await;

    let mut host = Host::start(config("new/#")).await.unwrap();
    assert!(host.wait_connected(Duration::from_secs(10)).await);
    let messages = [("old/a", "1"), ("new/a", "2"), ("old/b", "3"), ("old/c", "4"), ("new/b", "5")];
    let port = broker.port();
    tokio::task::spawn_blocking(move || publish_all(port, &messages, QoS::AtLeastOnce)).await.unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let delivered = host.snapshot()["current"].delivered;
        let unrouted = host.events.unrouted.get();
        if (delivered, unrouted) == (2, 3) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "delivered {delivered}, unrouted {unrouted}; expected 2 and 3");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = host.snapshot()["current"];
    host.shutdown(Duration::from_secs(10)).await;
    assert_eq!((stats.received, stats.delivered, stats.dead_lettered), (2, 2, 0));
    assert_eq!(read_complete_lines(dir.path().join("out/current.jsonl")).len(), 2);
}
