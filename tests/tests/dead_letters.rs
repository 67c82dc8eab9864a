//! The dead-letter store end to end. Malformed messages published to a real
//! Mosquitto land in SQLite with their stage, reason and exact bytes. After
//! a config change, `eliot dead-letters replay` delivers the ones that now
//! pass to the file and MQTT sinks and deletes them, and `purge` removes the
//! rest.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use eliot::config::Config;
use eliot::deadletter::cli::{execute_to, DeadLetterCommand};
use eliot::deadletter::{DeadLetter, DeadLetterStore, FailureKind, ListFilter, StoredDeadLetter};
use eliot::host::Host;
use eliot::wasm::{Message, Qos};
use eliot_tests::plugins::build_examples;
use eliot_tests::wait::read_complete_lines;
use eliot_tests::{publish_all, Mosquitto, QoS, Subscriber};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const STORE: &str = "out/dead-letters.sqlite";
const PROCESSED: &str = "out/processed.jsonl";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: DeadLetterCommand,
}

/// Runs `eliot dead-letters ARGS --config CONFIG` in this process and
/// returns its output, or its error text.
async fn cli(config: &Path, args: &[&str]) -> Result<String, String> {
    let config = config.display().to_string();
    let mut full = vec!["eliot"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--config", &config]);
    let command = Cli::try_parse_from(&full).map_err(|e| e.to_string())?.command;
    let mut out = Vec::new();
    execute_to(command, &mut out).await.map_err(|e| format!("{e:#}"))?;
    Ok(String::from_utf8(out).unwrap())
}

/// Writes `eliot.toml` into `dir`: the pipeline `telemetry` runs `stages`
/// into a file sink and an MQTT republish sink, and validate-format accepts
/// `allowed` sensor types.
fn write_config(dir: &Path, broker: &str, plugin_dir: &Path, stages: &str, allowed: &str) -> PathBuf {
    let text = format!(
        r#"
[mqtt]
broker = "{broker}"
client_id = "eliot-dead-letter-test"

[runtime]
plugin_dir = "{plugins}"
cache_dir = "cache"

[dead_letters]
path = "{STORE}"

[plugins.enrich]
file = "enrich.wasm"

[plugins.validate-format]
file = "validate_format.wasm"
config = {{ allowed_sensor_types = [{allowed}] }}

[pipelines.telemetry]
topics = ["devices/+/telemetry"]
stages = [{stages}]
sinks = ["file", "republish"]

[sinks.file]
type = "file"
path = "{PROCESSED}"

[sinks.republish]
type = "mqtt"
topic = "processed/{{payload.sensor_type}}/{{payload.device_id}}"
"#,
        plugins = plugin_dir.display()
    );
    let path = dir.join("eliot.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn load(path: &Path) -> Config {
    Config::load(path).unwrap_or_else(|e| panic!("{e}"))
}

/// Waits until the pipeline has finished `expected` messages.
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

fn all_letters(dir: &Path) -> Vec<StoredDeadLetter> {
    DeadLetterStore::open_existing(&dir.join(STORE)).unwrap().list(&ListFilter::default()).unwrap()
}

fn read_records(dir: &Path) -> Vec<Value> {
    read_complete_lines(dir.join(PROCESSED)).iter().map(|line| serde_json::from_str(line).unwrap()).collect()
}

fn sonar_payload(index: usize) -> Vec<u8> {
    json!({"timestamp": format!("2025-06-05T14:30:0{index}Z"), "sensor_type": "sonar", "data": {"depth_m": index}})
        .to_string()
        .into_bytes()
}

/// Milliseconds since the epoch of an RFC 3339 time.
fn unix_ms(value: &Value) -> u64 {
    let text = value.as_str().unwrap_or_else(|| panic!("{value} is not a string"));
    let time = OffsetDateTime::parse(text, &Rfc3339).unwrap_or_else(|e| panic!("{text}: {e}"));
    u64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap()
}

const SONAR_REASON: &str = r#"field "sensor_type" must be one of "gps" (allowed_sensor_types), got "sonar""#;
const JSON_REASON: &str = "payload is not valid JSON: expected ident at line 1 column 2";
const UTF8_REASON: &str = "payload is not valid UTF-8: invalid utf-8 sequence of 1 bytes from index 0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_replayed_and_purged() {
    let broker = Mosquitto::start();
    let port = broker.port();
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let address = format!("127.0.0.1:{port}");
    let stages = r#""enrich", "validate-format""#;
    let config = write_config(dir.path(), &address, &plugins, stages, r#""gps""#);

    // Two valid readings, three of a sensor type the validator does not
    // allow yet, and two that no configuration can fix.
    let gps = |second: u32| {
        json!({"device_id": "gps_1", "timestamp": format!("2025-06-05T14:30:0{second}Z"), "sensor_type": "gps",
               "data": {"latitude": 52.5}})
        .to_string()
        .into_bytes()
    };
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("devices/sonar_1/telemetry", sonar_payload(0), SONAR_REASON),
        ("devices/sonar_1/telemetry", sonar_payload(1), SONAR_REASON),
        ("devices/sonar_1/telemetry", sonar_payload(2), SONAR_REASON),
        ("devices/bad_1/telemetry", b"not json".to_vec(), JSON_REASON),
        ("devices/bad_2/telemetry", vec![0xff, 0xfe, 0x00], UTF8_REASON),
    ];
    let mut publishes = vec![("devices/gps_1/telemetry".to_owned(), gps(0))];
    publishes.extend(bad.iter().map(|(topic, payload, _)| ((*topic).to_owned(), payload.clone())));
    publishes.push(("devices/gps_1/telemetry".to_owned(), gps(1)));

    let mut host = Host::start(load(&config)).await.unwrap();
    assert!(host.wait_connected(Duration::from_secs(10)).await, "host connected to Mosquitto");
    let total = publishes.len() as u64;
    tokio::task::spawn_blocking(move || publish_all(port, &publishes, QoS::AtLeastOnce)).await.unwrap();
    wait_finished(&host, total, Duration::from_secs(60)).await;
    let stats = host.snapshot()["telemetry"];
    host.shutdown(Duration::from_secs(10)).await;
    assert_eq!((stats.delivered, stats.dropped, stats.dead_lettered), (2, 0, 5));

    // Every rejected message is in SQLite, with its stage, reason and bytes.
    let letters = all_letters(dir.path());
    assert_eq!(letters.len(), bad.len());
    for (topic, payload, reason) in &bad {
        let letter = letters
            .iter()
            .find(|l| l.topic.as_deref() == Some(*topic) && &l.payload == payload)
            .unwrap_or_else(|| panic!("no dead letter for {topic} {payload:?}"));
        assert_eq!(letter.pipeline, "telemetry", "{topic}");
        assert_eq!(letter.stage, "validate-format", "{topic}");
        assert_eq!(letter.kind, FailureKind::Invalid, "{topic}");
        assert_eq!(letter.reason, *reason, "{topic}");
        assert_eq!(letter.topic_bytes, topic.as_bytes(), "{topic}");
        assert_eq!(letter.qos, Qos::AtLeastOnce, "{topic}");
        assert!(!letter.retain, "{topic}");
        assert_eq!(letter.replay_count, 0, "{topic}");
    }
    let binary = letters.iter().find(|l| l.payload == [0xff, 0xfe, 0x00]).unwrap();

    // The CLI shows them.
    let table = cli(&config, &["list"]).await.unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 7, "header, 5 dead letters and the count:\n{table}");
    assert!(lines[0].starts_with("ID  STORED "), "{table}");
    assert_eq!(lines[6], "5 dead letters");
    let row: Vec<&str> = lines
        .iter()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells[0] == binary.id.to_string())
        .unwrap_or_else(|| panic!("no row for dead letter {}:\n{table}", binary.id));
    assert_eq!(row[2..6], ["telemetry", "validate-format", "invalid", "devices/bad_2/telemetry"], "{table}");
    assert_eq!(row[6..11].join(" "), "payload is not valid UTF-8:", "{table}");
    let sonar_only = cli(&config, &["list", "--topic-prefix", "devices/sonar_1/", "--json"]).await.unwrap();
    assert_eq!(sonar_only.lines().count(), 3, "{sonar_only}");
    let shown = cli(&config, &["show", &binary.id.to_string()]).await.unwrap();
    assert!(shown.ends_with("payload (3 bytes, not valid UTF-8, base64):\n//4A\n"), "{shown}");
    assert!(shown.contains(&format!("reason:        {UTF8_REASON}\n")), "{shown}");

    // Allow the sensor type and replay everything.
    write_config(dir.path(), &address, &plugins, stages, r#""gps", "sonar""#);
    let republished = tokio::task::spawn_blocking(move || Subscriber::connect(port, "processed/sonar/#", QoS::AtLeastOnce))
        .await
        .unwrap();
    let output = cli(&config, &["replay", "--all"]).await.unwrap();
    let store_path = std::path::absolute(dir.path()).unwrap().join(STORE);
    let mut expected = Vec::new();
    for letter in &letters {
        if letter.reason == SONAR_REASON {
            expected.push(format!("{}: delivered (1 record)", letter.id));
        } else {
            expected.push(format!(
                "{}: failed again at validate-format (invalid), replay count 1: {}",
                letter.id, letter.reason
            ));
        }
    }
    expected.push(format!(
        "replay finished: 3 delivered, 0 dropped, 2 failed again, 0 skipped; delivered and dropped dead letters \
         were deleted from {}",
        store_path.display()
    ));
    assert_eq!(output.lines().collect::<Vec<_>>(), expected);

    // The file sink has the two live records and the three replayed ones,
    // which keep their original receive time.
    let records = read_records(dir.path());
    assert_eq!(records.len(), 5);
    let replayed: Vec<&Value> = records.iter().filter(|r| r["topic"] == "devices/sonar_1/telemetry").collect();
    assert_eq!(replayed.len(), 3);
    let sonar_letters: Vec<&StoredDeadLetter> = letters.iter().filter(|l| l.reason == SONAR_REASON).collect();
    for (index, (record, letter)) in replayed.iter().zip(&sonar_letters).enumerate() {
        let mut payload = record["payload"].clone();
        let stamp = payload.as_object_mut().unwrap().remove("received_at").expect("enrich sets received_at");
        assert_eq!(unix_ms(&stamp), letter.received_at_ms, "record {index} keeps the original receive time");
        assert_eq!(unix_ms(&record["received_at"]), letter.received_at_ms, "record {index}");
        assert_eq!(
            payload,
            json!({"device_id": "sonar_1", "timestamp": format!("2025-06-05T14:30:0{index}Z"),
                   "sensor_type": "sonar", "data": {"depth_m": index}}),
            "replayed record {index}, in per-device order"
        );
        assert_eq!(record["processed_by"], json!(["enrich@0.1.0", "validate-format@0.1.0"]));
        assert_eq!(record["headers"], json!([["device_id", "sonar_1"]]));
    }

    // The republish sink sent them to the configured broker.
    let received = tokio::task::spawn_blocking(move || republished.collect(3, Duration::from_secs(30))).await.unwrap();
    for (index, message) in received.iter().enumerate() {
        assert_eq!(message.topic, "processed/sonar/sonar_1");
        assert_eq!(message.json()["data"]["depth_m"], index, "published in order");
    }

    // The two that cannot pass stay, with the new attempt recorded.
    let left = all_letters(dir.path());
    assert_eq!(left.len(), 2);
    for letter in &left {
        assert_eq!(letter.replay_count, 1, "{}", letter.id);
        assert!(letter.last_replayed_at_ms.is_some(), "{}", letter.id);
        assert_eq!(letter.stage, "validate-format");
    }
    // The two devices' messages go to different workers, so either can be
    // stored first.
    let mut reasons: Vec<&str> = left.iter().map(|l| l.reason.as_str()).collect();
    reasons.sort_unstable();
    assert_eq!(reasons, [JSON_REASON, UTF8_REASON]);

    let ids: Vec<String> = left.iter().map(|l| l.id.to_string()).collect();
    let output = cli(&config, &["replay", &ids[0], &ids[1]]).await.unwrap();
    assert!(output.contains("replay count 2"), "{output}");
    assert!(output.ends_with(&format!("0 delivered, 0 dropped, 2 failed again, 0 skipped; delivered and dropped dead letters were deleted from {}\n", store_path.display())), "{output}");
    assert_eq!(
        cli(&config, &["replay", "9999"]).await,
        Err(format!("dead letters not found in {}: 9999; nothing was replayed", store_path.display()))
    );

    // Purge needs a selection, then removes the rest.
    assert_eq!(
        cli(&config, &["purge"]).await,
        Err("purge needs a selection: give dead-letter ids, a filter (--pipeline, --stage, --kind, --topic-prefix) \
             or --all"
            .to_owned())
    );
    assert_eq!(
        cli(&config, &["purge", "--kind", "invalid", "--stage", "validate-format"]).await.unwrap(),
        format!("purged 2 dead letters from {}\n", store_path.display())
    );
    assert!(all_letters(dir.path()).is_empty());
    assert_eq!(cli(&config, &["list"]).await.unwrap(), "no dead letters match\n");
}

/// Builds a dead letter to store without a running host.
fn letter(pipeline: &str, topic: &str, payload: &[u8]) -> DeadLetter {
    let message = Message {
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        qos: Qos::AtLeastOnce,
        retain: false,
        received_at_ms: 1_749_133_800_000,
        headers: Vec::new(),
    };
    DeadLetter::new(pipeline.to_owned(), "validate-format".to_owned(), FailureKind::Invalid, "rejected".to_owned(), message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_into_chain_without_validator() {
    let plugins = tokio::task::spawn_blocking(build_examples).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "embedded", &plugins, r#""enrich""#, r#""gps""#);
    let store_path = std::path::absolute(dir.path()).unwrap().join(STORE);

    let store = DeadLetterStore::open(&store_path).unwrap();
    let mut undecodable = letter("telemetry", "devices/\u{fffd}/telemetry", b"{}");
    undecodable.kind = FailureKind::Undecodable;
    undecodable.topic_bytes = Some(b"devices/\xff/telemetry".to_vec());
    store
        .append(&[
            &letter("telemetry", "devices/a/telemetry", b"not json"),
            &letter("retired", "devices/b/telemetry", b"{}"),
            &undecodable,
        ])
        .unwrap();
    let ids: Vec<i64> = store.list(&ListFilter::default()).unwrap().iter().map(|l| l.id).collect();
    drop(store);

    // The embedded broker on port 0 has no address outside the running
    // host, so the MQTT sink needs --broker or --skip-mqtt-sinks.
    assert_eq!(
        cli(&config, &["replay", "--all"]).await,
        Err(format!(
            "the MQTT sink \"republish\" of pipeline \"telemetry\" needs a broker, but {} uses the embedded \
             broker on a free port (embedded_broker.listen = \"127.0.0.1:0\"), whose address only the running \
             host knows; pass --broker with the address the host logged as \"embedded broker listening\", or \
             --skip-mqtt-sinks to deliver to the other sinks only",
            config.display()
        ))
    );
    assert!(all_letters(dir.path()).iter().all(|l| l.replay_count == 0), "nothing was replayed");

    let output = cli(&config, &["replay", "--all", "--skip-mqtt-sinks"]).await.unwrap();
    assert_eq!(
        output.lines().collect::<Vec<_>>(),
        [
            format!("{}: delivered (1 record)", ids[0]),
            format!("{}: skipped: pipeline \"retired\" is not in {}", ids[1], config.display()),
            format!("{}: skipped: its topic is not valid UTF-8, so no plugin can receive it", ids[2]),
            format!(
                "replay finished: 1 delivered, 0 dropped, 0 failed again, 2 skipped; delivered and dropped dead \
                 letters were deleted from {}",
                store_path.display()
            ),
        ]
    );
    let records = read_records(dir.path());
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["topic"], "devices/a/telemetry");
    assert_eq!(records[0]["payload_base64"], "bm90IGpzb24=", "enrich passes a payload that is not JSON unchanged");
    assert_eq!(records[0]["processed_by"], json!(["enrich@0.1.0"]));

    let left = all_letters(dir.path());
    assert_eq!(left.iter().map(|l| l.id).collect::<Vec<_>>(), &ids[1..]);
    assert!(left.iter().all(|l| l.replay_count == 0), "skipped letters are unchanged");

    // --broker sends the MQTT sink's messages to the broker given.
    let broker = Mosquitto::start();
    let port = broker.port();
    let store = DeadLetterStore::open_existing(&store_path).unwrap();
    let payload = br#"{"device_id":"c","sensor_type":"gps","timestamp":"2025-06-05T14:30:00Z","data":{}}"#;
    store.append(&[&letter("telemetry", "devices/c/telemetry", payload)]).unwrap();
    let new_id = store.last_id().unwrap().unwrap();
    let subscriber =
        tokio::task::spawn_blocking(move || Subscriber::connect(port, "processed/#", QoS::AtLeastOnce)).await.unwrap();
    let address = format!("127.0.0.1:{port}");
    let id = new_id.to_string();
    let output = cli(&config, &["replay", &id, &id, "--broker", &address]).await.unwrap();
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 2, "a repeated id is replayed once:\n{output}");
    assert_eq!(lines[0], format!("{new_id}: delivered (1 record)"));
    assert!(lines[1].starts_with("replay finished: 1 delivered, 0 dropped, 0 failed again, 0 skipped;"), "{output}");
    let received = tokio::task::spawn_blocking(move || subscriber.collect(1, Duration::from_secs(30))).await.unwrap();
    assert_eq!(received[0].topic, "processed/gps/c");
    assert_eq!(store.get(new_id).unwrap(), None, "the delivered letter is deleted");

    assert_eq!(
        cli(&config, &["replay", "--all", "--broker", "nowhere"]).await,
        Err("--broker \"nowhere\" is not HOST:PORT, for example 127.0.0.1:1883".to_owned())
    );
}
