//! Benchmarks of the `eliot` binary against a Mosquitto it starts on
//! loopback. Timings live here, never in the tests.
//!
//! `eliot-bench reload --eliot PATH` measures the publish-to-sink latency
//! of a steady stream, first with nothing changing and then while the last
//! stage's plugin is swapped several times, and prints both as a Markdown
//! table. The sink is an MQTT republish sink, so a latency is the time from
//! the publish to the arrival of the result at a subscriber of the
//! republished topic, two broker hops included.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use eliot_tests::plugins::{build_examples, build_versioned};
use eliot_tests::process::HostProcess;
use eliot_tests::Mosquitto;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[derive(Parser)]
#[command(about = "Benchmarks of the eliot binary against a local Mosquitto")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Latency of a steady stream, without and during plugin swaps.
    Reload {
        /// The eliot command line to measure; `cargo test --release --workspace --no-run` builds it.
        #[arg(long, default_value = "target/release/eliot-under-test")]
        eliot: PathBuf,
        /// Messages per second.
        #[arg(long, default_value_t = 2_000)]
        rate: u32,
        /// Length of each phase, in seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Plugin swaps during the second phase.
        #[arg(long, default_value_t = 5)]
        swaps: u32,
    },
    /// Receive rate of a bare rumqttc subscriber against Eliot's end-to-end
    /// rate through the three example Rust stages into the file sink, at
    /// QoS 0 and QoS 1.
    Throughput {
        /// The eliot command line to measure; `cargo test --release --workspace --no-run` builds it.
        #[arg(long, default_value = "target/release/eliot-under-test")]
        eliot: PathBuf,
        /// Messages per measurement.
        #[arg(long, default_value_t = 100_000)]
        messages: usize,
        /// The Node-RED launcher to compare with; `tests/bench/run.sh`
        /// installs it. Skipped when the file does not exist.
        #[arg(long, default_value = "target/bench/node-red/node_modules/.bin/node-red")]
        node_red: PathBuf,
    },
    /// Publish-to-file latency through the three example Rust stages at
    /// QoS 1, at half the rate Eliot sustains, beside a bare subscriber's
    /// latency at the same rate.
    Latency {
        /// The eliot command line to measure; `cargo test --release --workspace --no-run` builds it.
        #[arg(long, default_value = "target/release/eliot-under-test")]
        eliot: PathBuf,
        /// Messages of the burst that finds the sustained rate.
        #[arg(long, default_value_t = 50_000)]
        burst: usize,
        /// Length of the measured stream, in seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Measure at this many messages per second instead of half the
        /// sustained rate.
        #[arg(long)]
        rate: Option<u32>,
        /// Mosquitto's `max_inflight_messages`: how many QoS 1 messages it
        /// sends a client before the client acknowledges them. 20 is
        /// Mosquitto's default.
        #[arg(long, default_value_t = 20)]
        max_inflight: u32,
    },
    /// Resident memory with five plugins and two workers per pipeline, when
    /// ready and after a stream of readings, and the time to ready with a
    /// warm compile cache.
    Memory {
        /// The eliot command line to measure; `cargo test --release --workspace --no-run` builds it.
        #[arg(long, default_value = "target/release/eliot-under-test")]
        eliot: PathBuf,
        /// Readings sent through the chain before the second reading.
        #[arg(long, default_value_t = 50_000)]
        messages: usize,
    },
    /// Time from start to ready with a chain of Rust, Python, JavaScript and
    /// C plugins, with an empty and with a warm compiled-component cache.
    Startup {
        /// The eliot command line to measure; `cargo test --release --workspace --no-run` builds it.
        #[arg(long, default_value = "target/release/eliot-under-test")]
        eliot: PathBuf,
        /// Warm starts to measure after the cold one.
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
}

/// Set when a QoS 1 measurement through Eliot lost a message, which the
/// guarantees forbid; `main` then exits non-zero after printing the results.
static LOST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records a loss when fewer than `expected` of a QoS 1 measurement arrived.
fn check_delivery(what: &str, qos: QoS, arrived: usize, expected: usize) {
    if qos != QoS::AtMostOnce && arrived < expected {
        eprintln!("LOST: {what}: {arrived} of {expected} messages arrived at QoS {}", qos as u8);
        LOST.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn main() {
    run(Cli::parse().command);
    if LOST.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!("eliot-bench: a QoS 1 measurement lost messages (see LOST above)");
        std::process::exit(1);
    }
}

fn run(command: Command) {
    match command {
        Command::Reload {
            eliot,
            rate,
            seconds,
            swaps,
        } => reload(&eliot, rate, Duration::from_secs(seconds), swaps),
        Command::Startup { eliot, runs } => startup(&eliot, runs),
        Command::Latency {
            eliot,
            burst,
            seconds,
            rate,
            max_inflight,
        } => latency(&eliot, burst, Duration::from_secs(seconds), rate, max_inflight),
        Command::Memory { eliot, messages } => memory(&eliot, messages),
        Command::Throughput { eliot, messages, node_red } => throughput(&eliot, messages, &node_red),
    }
}

fn startup(eliot: &Path, runs: u32) {
    assert!(eliot.exists(), "{} not found; build it with `cargo test --release --workspace --no-run`", eliot.display());
    let broker = bench_broker(20);
    let plugin_dir = eliot_tests::plugins::build_language_examples();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let config = dir.path().join("eliot.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[mqtt]
broker = "{broker}"
client_id = "eliot-bench-startup"

[runtime]
plugin_dir = "{plugins}"
cache_dir = "cache"
watch = false

[dead_letters]
path = "out/dead-letters.sqlite"

[plugins.enrich]
file = "enrich.wasm"

[plugins.rolling-anomaly]
file = "rolling_anomaly.wasm"

[plugins.geofence]
file = "geofence.wasm"
config = {{ latitude = 51.5782653, longitude = 16.116775, radius_m = 500.0 }}

[plugins.range-filter]
file = "range_filter.wasm"
config = {{ ranges = {{ co2_ppm = [250, 1000] }} }}

[pipelines.telemetry]
topics = ["devices/+/telemetry"]
stages = ["enrich", "rolling-anomaly", "geofence", "range-filter"]
sinks = ["file"]

[sinks.file]
type = "file"
path = "out/processed.jsonl"
"#,
            broker = broker.address(),
            plugins = plugin_dir.display()
        ),
    )
    .unwrap();

    println!("| start | compiled-component cache | start to subscribed |");
    println!("|---|---|---|");
    for run in 0..=runs {
        let started = Instant::now();
        let mut host = HostProcess::start(eliot, &config, &dir.path().join(format!("host-{run}.log")));
        host.wait_for_log("subscribed", Duration::from_secs(300));
        let ready = started.elapsed();
        let status = host.terminate(Duration::from_secs(30));
        assert!(status.success(), "eliot exited with {status}");
        let cache = if run == 0 { "empty" } else { "warm" };
        println!("| {} | {cache} | {:.2} s |", run + 1, ready.as_secs_f64());
    }
}

/// First moment of the readings' timestamps; reading `n` is stamped `n` ms
/// later, which makes each reading's timestamp its sequence number.
const BASE_MS: i64 = 1_749_133_800_000; // 2025-06-05T14:30:00Z

fn reload(eliot: &Path, rate: u32, phase: Duration, swaps: u32) {
    assert!(eliot.exists(), "{} not found; build it with `cargo test --release --workspace --no-run`", eliot.display());
    let broker = bench_broker(20);
    let examples = build_examples();
    let versions = [build_versioned("1.0.0", false), build_versioned("2.0.0", false)];
    let dir = tempfile::tempdir().expect("a temporary folder");
    let plugin_dir = dir.path().join("plugins");
    std::fs::create_dir(&plugin_dir).unwrap();
    for file in ["enrich.wasm", "validate_format.wasm"] {
        std::fs::copy(examples.join(file), plugin_dir.join(file)).unwrap();
    }
    let target = plugin_dir.join("versioned.wasm");
    std::fs::copy(&versions[0], &target).unwrap();
    let config = dir.path().join("eliot.toml");
    std::fs::write(&config, bench_config(&broker.address())).unwrap();

    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let latencies: Arc<Mutex<Vec<(u64, Duration)>>> = Arc::default();
    runtime.spawn(receive(broker.port(), "bench/out/#", QoS::AtMostOnce, sent.clone(), latencies.clone()));
    std::thread::sleep(Duration::from_millis(500));

    let mut host = HostProcess::start(eliot, &config, &dir.path().join("host.log"));
    host.wait_for_log("subscribed", Duration::from_secs(60));
    host.wait_for_log("watching for plugin and config changes", Duration::from_secs(60));

    // Warm-up, then the two phases back to back.
    let total = (u64::from(rate) * (1 + 2 * phase.as_secs())) as usize;
    let publisher = runtime.spawn(publish(broker.port(), "eliot-bench-publisher", rate, total, sent.clone()));
    let warm_up = Duration::from_secs(1);
    let steady_from = u64::from(rate) * warm_up.as_secs();
    let swap_from = steady_from + u64::from(rate) * phase.as_secs();
    std::thread::sleep(warm_up + phase);
    let interval = phase / (swaps + 1);
    for swap in 0..swaps {
        std::thread::sleep(interval);
        let next = &versions[((swap + 1) % 2) as usize];
        let temporary = target.with_extension("part");
        std::fs::copy(next, &temporary).unwrap();
        std::fs::rename(&temporary, &target).unwrap();
        host.wait_for_log_count("reload applied", swap as usize + 1, Duration::from_secs(60));
    }
    runtime.block_on(publisher).expect("the publisher task");
    let deadline = Instant::now() + Duration::from_secs(30);
    while latencies.lock().unwrap().len() < total && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = host.terminate(Duration::from_secs(30));
    assert!(status.success(), "eliot exited with {status}");

    let latencies = latencies.lock().unwrap().clone();
    let steady: Vec<Duration> = latencies
        .iter()
        .filter(|(seq, _)| (steady_from..swap_from).contains(seq))
        .map(|(_, latency)| *latency)
        .collect();
    let swapping: Vec<Duration> = latencies
        .iter()
        .filter(|(seq, _)| *seq >= swap_from)
        .map(|(_, latency)| *latency)
        .collect();
    println!("| phase | messages received | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    for (name, mut values) in [("steady state", steady), (&*format!("{swaps} swaps"), swapping)] {
        values.sort();
        println!(
            "| {name} | {} | {} | {} | {} |",
            values.len(),
            millis(percentile(&values, 0.50)),
            millis(percentile(&values, 0.99)),
            millis(values.last().copied().unwrap_or_default())
        );
    }
    println!(
        "\n{} of {total} messages arrived; {rate} messages/s, {} s per phase, one phase of {swaps} plugin swaps.",
        latencies.len(),
        phase.as_secs()
    );
}

/// Starts the Mosquitto of one benchmark: no limit on queued messages, at
/// most `max_inflight` unacknowledged QoS 1 messages per client (20 is
/// Mosquitto's default), and Nagle's algorithm off. With Mosquitto's default
/// (`set_tcp_nodelay false`) a message written while an earlier segment
/// waits for the peer's delayed ACK is held back up to 40 ms, which put the
/// plugin-swap benchmark's median at 63 ms instead of 0.4 ms.
fn bench_broker(max_inflight: u32) -> Mosquitto {
    Mosquitto::builder()
        .max_queued_messages(0)
        .max_inflight_messages(max_inflight)
        .config_line("set_tcp_nodelay true")
        .start()
}

fn bench_config(broker: &str) -> String {
    format!(
        r#"
[mqtt]
broker = "{broker}"
client_id = "eliot-bench"

[runtime]
plugin_dir = "plugins"
cache_dir = "cache"

[dead_letters]
path = "out/dead-letters.sqlite"

[plugins.enrich]
file = "enrich.wasm"

[plugins.validate-format]
file = "validate_format.wasm"

[plugins.versioned]
file = "versioned.wasm"

[pipelines.telemetry]
topics = ["devices/+/telemetry"]
stages = ["enrich", "validate-format", "versioned"]
sinks = ["republish"]

[sinks.republish]
type = "mqtt"
topic = "bench/out/{{payload.device_id}}"
qos = 1
"#
    )
}

/// Publishes `total` readings at `rate` per second, at QoS 1, recording
/// when each was sent.
async fn publish(port: u16, client_id: &str, rate: u32, total: usize, sent: Arc<Mutex<HashMap<u64, Instant>>>) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 10_000);
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    // A tick every millisecond, each sending its share of the rate.
    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    let started = Instant::now();
    let mut seq = 0u64;
    while (seq as usize) < total {
        ticks.tick().await;
        let due = (started.elapsed().as_secs_f64() * f64::from(rate)) as u64;
        while seq < due.min(total as u64) {
            let device = format!("bench-{:03}", seq % 100);
            let payload = reading(&device, seq);
            sent.lock().unwrap().insert(seq, Instant::now());
            client
                .publish(format!("devices/{device}/telemetry"), QoS::AtLeastOnce, false, payload)
                .await
                .expect("the publisher's event loop runs");
            seq += 1;
        }
    }
}

/// Returns a GPS reading of about 200 bytes whose timestamp encodes `seq`.
fn reading(device: &str, seq: u64) -> Vec<u8> {
    let stamp = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(BASE_MS + seq as i64) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let latitude = 37.7749 + (seq % 1000) as f64 * 1e-5;
    format!(
        r#"{{"device_id": "{device}", "timestamp": "{stamp}", "sensor_type": "gps", "data": {{"latitude": {latitude:.6}, "longitude": -122.4194, "accuracy": 3.2}}}}"#
    )
    .into_bytes()
}

/// Receives the republished results and records each one's latency.
async fn receive(
    port: u16,
    filter: &'static str,
    qos: QoS,
    sent: Arc<Mutex<HashMap<u64, Instant>>>,
    latencies: Arc<Mutex<Vec<(u64, Duration)>>>,
) {
    let mut options = MqttOptions::new(format!("eliot-bench-subscriber-{}", qos as u8), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client.subscribe(filter, qos).await.expect("subscribe request");
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let arrived = Instant::now();
                let Some(seq) = sequence_of(&publish.payload) else { continue };
                if let Some(at) = sent.lock().unwrap().remove(&seq) {
                    latencies.lock().unwrap().push((seq, arrived - at));
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Reads the sequence number back from a result's timestamp.
fn sequence_of(payload: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let stamp = time::OffsetDateTime::parse(value["timestamp"].as_str()?, &time::format_description::well_known::Rfc3339).ok()?;
    let ms = (stamp.unix_timestamp_nanos() / 1_000_000) as i64 - BASE_MS;
    u64::try_from(ms).ok()
}

fn percentile(sorted: &[Duration], quantile: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * quantile).round() as usize;
    sorted[index]
}

fn millis(value: Duration) -> String {
    format!("{:.2} ms", value.as_secs_f64() * 1e3)
}

/// Publishes `total` readings as fast as the client takes them, at `qos`.
async fn publish_burst(port: u16, total: usize, qos: QoS, client_id: &str) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(options, 10_000);
    let driver = tokio::spawn(async move {
        let mut acked = 0usize;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) if qos == QoS::AtMostOnce => acked += 1,
                Ok(_) => {}
                Err(e) => panic!("publisher connection failed: {e}"),
            }
            if acked == total {
                return;
            }
        }
    });
    for seq in 0..total as u64 {
        let device = format!("bench-{:03}", seq % 100);
        client
            .publish(format!("devices/{device}/telemetry"), qos, false, reading(&device, seq))
            .await
            .expect("the publisher's event loop runs");
    }
    driver.await.expect("the publisher's event loop");
}

/// Rate at which a bare subscriber receives `total` messages at `qos`.
fn bare_rate(runtime: &tokio::runtime::Runtime, port: u16, total: usize, qos: QoS) -> (usize, f64) {
    runtime.block_on(async {
        let mut options = MqttOptions::new(format!("eliot-bench-bare-{qos:?}"), "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        client.subscribe("devices/+/telemetry", qos).await.expect("subscribe request");
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = eventloop.poll().await {
                break;
            }
        }
        let publisher = tokio::spawn(publish_burst(port, total, qos, "eliot-bench-bare-publisher"));
        let mut received = 0usize;
        let mut first = None;
        let mut last = Instant::now();
        while received < total {
            match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                    first.get_or_insert_with(Instant::now);
                    received += 1;
                    last = Instant::now();
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("subscriber connection failed: {e}"),
                // Messages the broker dropped never come.
                Err(_) => break,
            }
        }
        publisher.await.expect("the publisher task");
        let _ = client.disconnect().await;
        let seconds = first.map_or(f64::NAN, |f| (last - f).as_secs_f64());
        (received, received as f64 / seconds)
    })
}

/// Counts the lines of `path` written so far.
fn count_lines(path: &Path) -> usize {
    std::fs::read(path).map_or(0, |bytes| bytes.iter().filter(|b| **b == b'\n').count())
}

/// A configuration running `stages` (plugin tables in `tables`, files in
/// `plugin_dir`) at `qos` with `workers` workers into the file sink
/// `out/processed.jsonl`, without watching for changes.
fn chain_config(broker: &Mosquitto, plugin_dir: &Path, client_id: &str, qos: QoS, workers: usize, tables: &str, stages: &[&str]) -> String {
    format!(
        r#"
[mqtt]
broker = "{broker}"
client_id = "{client_id}"

[runtime]
plugin_dir = "{plugins}"
cache_dir = "cache"
watch = false

[dead_letters]
path = "out/dead-letters.sqlite"
{tables}
[pipelines.telemetry]
topics = ["devices/+/telemetry"]
qos = {qos}
workers = {workers}
stages = {stages:?}
sinks = ["file"]

[sinks.file]
type = "file"
path = "out/processed.jsonl"
"#,
        broker = broker.address(),
        plugins = plugin_dir.display(),
        qos = qos as u8,
    )
}

/// The three example Rust stages, as in the shipped configuration.
const EXAMPLE_STAGES: [&str; 3] = ["enrich", "validate-format", "sanity-filter"];

/// Starts Eliot in a new folder with the example chain at `qos`, and waits
/// until it subscribed.
fn start_example_chain(eliot: &Path, broker: &Mosquitto, qos: QoS) -> (tempfile::TempDir, HostProcess) {
    let plugin_dir = build_examples();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let config = dir.path().join("eliot.toml");
    let client_id = format!("eliot-bench-chain-{}", qos as u8);
    let tables = eliot_tests::config::EXAMPLE_PLUGIN_TABLES;
    std::fs::write(&config, chain_config(broker, &plugin_dir, &client_id, qos, 2, tables, &EXAMPLE_STAGES)).unwrap();
    let mut host = HostProcess::start(eliot, &config, &dir.path().join("host.log"));
    host.wait_for_log("subscribed", Duration::from_secs(60));
    (dir, host)
}

/// Rate at which Eliot writes `total` messages at `qos` through the example
/// chain into its file sink.
fn eliot_rate(eliot: &Path, runtime: &tokio::runtime::Runtime, broker: &Mosquitto, total: usize, qos: QoS) -> (usize, f64) {
    let (dir, mut host) = start_example_chain(eliot, broker, qos);
    let result = rate_into_file(runtime, broker.port(), total, qos, &dir.path().join("out/processed.jsonl"));
    let status = host.terminate(Duration::from_secs(30));
    assert!(status.success(), "eliot exited with {status}");
    result
}

/// Publishes `total` readings at `qos` and returns how many lines arrived
/// in `output` and at what rate, counted from the first publish to the last
/// line written. Lines of readiness probes do not count.
fn rate_into_file(runtime: &tokio::runtime::Runtime, port: u16, total: usize, qos: QoS, output: &Path) -> (usize, f64) {
    let before = count_lines(output);
    let started = Instant::now();
    let publisher = runtime.spawn(publish_burst(port, total, qos, "eliot-bench-file-publisher"));
    let mut written = 0;
    let mut last_change = Instant::now();
    let mut done_at = started;
    while written < total && last_change.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
        let now = count_lines(output) - before;
        if now != written {
            written = now;
            last_change = Instant::now();
            done_at = last_change;
        }
    }
    runtime.block_on(publisher).expect("the publisher task");
    (written, written as f64 / (done_at - started).as_secs_f64())
}

/// Rate at which Node-RED writes `total` messages at `qos` through three
/// function nodes doing the example plugins' work (tests/bench/node-red)
/// into a file node.
fn node_red_rate(node_red: &Path, runtime: &tokio::runtime::Runtime, port: u16, total: usize, qos: QoS) -> (usize, f64) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let output = dir.path().join("processed.jsonl");
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/node-red");
    // Node-RED takes any string property equal to a node id for a reference
    // to that node, so ids and names differ.
    let function = |name: &str, next: &str| {
        let file = format!("{name}.js");
        let code = std::fs::read_to_string(sources.join(&file)).unwrap_or_else(|e| panic!("cannot read {file}: {e}"));
        serde_json::json!({
            "id": format!("node-{name}"), "type": "function", "z": "flow", "name": name, "func": code,
            "outputs": 1, "wires": [[next]]
        })
    };
    let flow = serde_json::json!([
        {"id": "flow", "type": "tab", "label": "eliot-bench"},
        {"id": "node-broker", "type": "mqtt-broker", "broker": "127.0.0.1", "port": port.to_string(),
         "clientid": format!("eliot-bench-node-red-{}", qos as u8), "autoConnect": true, "usetls": false,
         "protocolVersion": "4", "keepalive": "30", "cleansession": true},
        {"id": "node-in", "type": "mqtt in", "z": "flow", "topic": "devices/+/telemetry", "qos": (qos as u8).to_string(),
         "datatype": "utf8", "broker": "node-broker", "nl": false, "rap": true, "rh": 0, "inputs": 0,
         "wires": [["node-enrich"]]},
        function("enrich", "node-validate-format"),
        function("validate-format", "node-sanity-filter"),
        function("sanity-filter", "node-out"),
        {"id": "node-out", "type": "file", "z": "flow", "filename": output.to_str().unwrap(), "filenameType": "str",
         "appendNewline": true, "createDir": true, "overwriteFile": "false", "encoding": "none", "wires": []}
    ]);
    std::fs::write(dir.path().join("flows.json"), flow.to_string()).unwrap();
    // No editor and no HTTP nodes: only the flow runs.
    std::fs::write(
        dir.path().join("settings.js"),
        "module.exports = { uiPort: 0, uiHost: '127.0.0.1', httpAdminRoot: false, httpNodeRoot: false, \
         flowFile: 'flows.json', credentialSecret: false, logging: { console: { level: 'info' } } };\n",
    )
    .unwrap();
    let log = dir.path().join("node-red.log");
    let mut child = std::process::Command::new(node_red)
        .arg("--userDir")
        .arg(dir.path())
        .arg("--settings")
        .arg(dir.path().join("settings.js"))
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", node_red.display()));
    // Ready once a probe went through the whole flow; probes keep coming
    // until one did, and a second's pause lets any late one land before the
    // count starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    runtime.block_on(async {
        let options = MqttOptions::new("eliot-bench-node-red-probe", "127.0.0.1", port);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        while count_lines(&output) == 0 {
            assert!(
                Instant::now() < deadline,
                "Node-RED did not pass a probe within 60 s; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            client
                .publish("devices/probe/telemetry", QoS::AtMostOnce, false, reading("probe", 0))
                .await
                .expect("the probe's event loop runs");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        driver.abort();
    });
    let result = rate_into_file(runtime, port, total, qos, &output);
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn throughput(eliot: &Path, total: usize, node_red: &Path) {
    assert!(eliot.exists(), "{} not found; build it with `cargo test --release --workspace --no-run`", eliot.display());
    let broker = bench_broker(20);
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    println!("| measurement | QoS | messages arrived | messages/s |");
    println!("|---|---|---|---|");
    let mut rates = BTreeMap::new();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let (received, rate) = bare_rate(&runtime, broker.port(), total, qos);
        println!("| bare rumqttc subscriber | {} | {received} of {total} | {rate:.0} |", qos as u8);
        let (written, eliot_rate) = eliot_rate(eliot, &runtime, &broker, total, qos);
        println!("| eliot, 3 Rust stages, file sink | {} | {written} of {total} | {eliot_rate:.0} |", qos as u8);
        check_delivery("eliot throughput", qos, written, total);
        let red_rate = if node_red.exists() {
            let (written, red_rate) = node_red_rate(node_red, &runtime, broker.port(), total, qos);
            println!("| node-red, 3 function nodes, file node | {} | {written} of {total} | {red_rate:.0} |", qos as u8);
            red_rate
        } else {
            f64::NAN
        };
        rates.insert(qos as u8, (rate, eliot_rate, red_rate));
    }
    let (bare0, eliot0, red0) = rates[&0];
    let (_, eliot1, red1) = rates[&1];
    println!(
        "\nEliot at QoS 0: {:.0} % of the bare subscriber (target 80 %). Eliot at QoS 1: {:.0} % of Eliot at QoS 0 (target 60 %).",
        100.0 * eliot0 / bare0,
        100.0 * eliot1 / eliot0
    );
    if node_red.exists() {
        println!(
            "Eliot against Node-RED: {:.1}x at QoS 0, {:.1}x at QoS 1 (target 5x).",
            eliot0 / red0,
            eliot1 / red1
        );
    } else {
        println!("Node-RED was not measured: {} does not exist (tests/bench/run.sh installs it).", node_red.display());
    }
}

/// Follows `path` from its current end and records, for every line written
/// to it, the time since its reading was published, until `stop` is set.
/// It checks for new lines every 250 us, which bounds how late it sees one.
fn tail_latencies(
    path: PathBuf,
    sent: Arc<Mutex<HashMap<u64, Instant>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<Duration>> {
    use std::io::{Read, Seek, SeekFrom};
    std::thread::spawn(move || {
        let mut file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        file.seek(SeekFrom::End(0)).unwrap();
        let mut pending = Vec::new();
        let mut latencies = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let read = file.read(&mut chunk).unwrap();
            if read == 0 {
                std::thread::sleep(Duration::from_micros(250));
                continue;
            }
            let arrived = Instant::now();
            pending.extend_from_slice(&chunk[..read]);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let Ok(record) = serde_json::from_slice::<serde_json::Value>(&line) else { continue };
                let Some(seq) = sequence_of(record["payload"].to_string().as_bytes()) else { continue };
                if let Some(at) = sent.lock().unwrap().remove(&seq) {
                    latencies.push(arrived - at);
                }
            }
        }
        latencies
    })
}

/// Publishes at `rate` for `seconds` and returns how many readings that was.
fn paced_run(runtime: &tokio::runtime::Runtime, port: u16, client_id: &str, rate: u32, seconds: Duration, sent: &Arc<Mutex<HashMap<u64, Instant>>>) -> usize {
    let total = (f64::from(rate) * seconds.as_secs_f64()) as usize;
    runtime.block_on(publish(port, client_id, rate, total, sent.clone()));
    total
}

/// Waits until every sent reading was seen (`sent` is empty) or none was
/// for 10 s.
fn wait_until_seen(sent: &Arc<Mutex<HashMap<u64, Instant>>>) {
    let mut left = sent.lock().unwrap().len();
    let mut last_change = Instant::now();
    while left > 0 && last_change.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
        let now = sent.lock().unwrap().len();
        if now != left {
            left = now;
            last_change = Instant::now();
        }
    }
}

fn latency_row(name: &str, total: usize, mut values: Vec<Duration>) {
    values.sort();
    println!(
        "| {name} | {} of {total} | {} | {} | {} |",
        values.len(),
        millis(percentile(&values, 0.50)),
        millis(percentile(&values, 0.99)),
        millis(values.last().copied().unwrap_or_default())
    );
}

/// Sequence numbers of readiness probes start here, far above any
/// measured reading's.
const PROBE_SEQ: u64 = 1_000_000_000;

fn latency(eliot: &Path, burst: usize, seconds: Duration, fixed_rate: Option<u32>, max_inflight: u32) {
    assert!(eliot.exists(), "{} not found; build it with `cargo test --release --workspace --no-run`", eliot.display());
    let broker = bench_broker(max_inflight);
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");

    let (dir, mut host) = start_example_chain(eliot, &broker, QoS::AtLeastOnce);
    let output = dir.path().join("out/processed.jsonl");
    let (written, max_rate) = rate_into_file(&runtime, broker.port(), burst, QoS::AtLeastOnce, &output);
    check_delivery("eliot latency burst", QoS::AtLeastOnce, written, burst);
    let rate = fixed_rate.unwrap_or((max_rate / 2.0).max(1.0) as u32);
    println!("Sustained rate: {max_rate:.0} messages/s ({written} of {burst}); measuring at {rate} messages/s for {} s.\n", seconds.as_secs());

    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tail = tail_latencies(output, sent.clone(), stop.clone());
    let total = paced_run(&runtime, broker.port(), "eliot-bench-paced-eliot", rate, seconds, &sent);
    wait_until_seen(&sent);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let eliot_latencies = tail.join().expect("the tail thread");
    let status = host.terminate(Duration::from_secs(30));
    assert!(status.success(), "eliot exited with {status}");

    // The same stream to a bare subscriber: the broker hop alone.
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let bare: Arc<Mutex<Vec<(u64, Duration)>>> = Arc::default();
    let subscriber = runtime.spawn(receive(broker.port(), "devices/+/telemetry", QoS::AtLeastOnce, sent.clone(), bare.clone()));
    // The subscription is in place once a probe comes back.
    runtime.block_on(async {
        let (client, mut eventloop) = AsyncClient::new(MqttOptions::new("eliot-bench-probe", "127.0.0.1", broker.port()), 10);
        let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        let mut seq = PROBE_SEQ;
        loop {
            seq += 1;
            sent.lock().unwrap().insert(seq, Instant::now());
            client
                .publish("devices/probe/telemetry", QoS::AtMostOnce, false, reading("probe", seq))
                .await
                .expect("the probe's event loop runs");
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !bare.lock().unwrap().is_empty() {
                break;
            }
        }
        driver.abort();
    });
    sent.lock().unwrap().retain(|seq, _| *seq < PROBE_SEQ);
    bare.lock().unwrap().clear();
    let bare_total = paced_run(&runtime, broker.port(), "eliot-bench-paced-bare", rate, seconds, &sent);
    wait_until_seen(&sent);
    subscriber.abort();
    let bare: Vec<Duration> = bare.lock().unwrap().iter().filter(|(seq, _)| *seq < PROBE_SEQ).map(|(_, d)| *d).collect();

    println!("| path at {rate} messages/s, QoS 1 | messages measured | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    check_delivery("eliot latency stream", QoS::AtLeastOnce, eliot_latencies.len(), total);
    latency_row("eliot: publish to line in the file sink", total, eliot_latencies);
    latency_row("bare rumqttc subscriber: publish to receive", bare_total, bare);
}

/// Resident and peak resident memory of `pid`, in MiB, from /proc.
fn memory_of(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the host's /proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn memory(eliot: &Path, messages: usize) {
    assert!(eliot.exists(), "{} not found; build it with `cargo test --release --workspace --no-run`", eliot.display());
    let broker = bench_broker(20);
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    // Five plugins: the three examples and two test plugins that forward
    // every reading unchanged (flaky-panic panics only on a `seq` field or
    // the word "fail", which the readings do not have).
    let plugin_dir = build_examples();
    let dir = tempfile::tempdir().expect("a temporary folder");
    std::fs::copy(build_versioned("1.0.0", false), dir.path().join("versioned.wasm")).unwrap();
    std::fs::copy(eliot_tests::plugins::build_plugin("flaky-panic"), dir.path().join("flaky_panic.wasm")).unwrap();
    let tables = format!(
        "{}\n[plugins.versioned]\nfile = \"{}\"\n\n[plugins.flaky-panic]\nfile = \"{}\"\n",
        eliot_tests::config::EXAMPLE_PLUGIN_TABLES,
        dir.path().join("versioned.wasm").display(),
        dir.path().join("flaky_panic.wasm").display()
    );
    let stages = ["enrich", "validate-format", "sanity-filter", "versioned", "flaky-panic"];
    let config = dir.path().join("eliot.toml");
    std::fs::write(&config, chain_config(&broker, &plugin_dir, "eliot-bench-memory", QoS::AtLeastOnce, 2, &tables, &stages)).unwrap();

    println!("| moment | resident | peak resident |");
    println!("|---|---|---|");
    let mut ready_times = Vec::new();
    for run in 0..2 {
        let started = Instant::now();
        let mut host = HostProcess::start(eliot, &config, &dir.path().join(format!("host-{run}.log")));
        host.wait_for_log("subscribed", Duration::from_secs(120));
        ready_times.push(started.elapsed());
        if run == 0 {
            // The first start fills the compile cache; the second is the
            // one measured.
            let status = host.terminate(Duration::from_secs(30));
            assert!(status.success(), "eliot exited with {status}");
            continue;
        }
        let (rss, _) = memory_of(host.pid());
        println!("| ready, warm compile cache | {rss:.1} MiB | |");
        let (written, rate) = rate_into_file(&runtime, broker.port(), messages, QoS::AtLeastOnce, &dir.path().join("out/processed.jsonl"));
        check_delivery("eliot memory run", QoS::AtLeastOnce, written, messages);
        let (rss, peak) = memory_of(host.pid());
        println!("| after {written} of {messages} readings at {rate:.0}/s | {rss:.1} MiB | {peak:.1} MiB |");
        let status = host.terminate(Duration::from_secs(30));
        assert!(status.success(), "eliot exited with {status}");
    }
    println!(
        "\nFive plugins x 2 workers. Start to subscribed: {:.2} s with an empty compile cache, {:.2} s with a warm one.",
        ready_times[0].as_secs_f64(),
        ready_times[1].as_secs_f64()
    );
}
