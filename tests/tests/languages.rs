//! Plugins in four languages in one chain: the Rust enrich plugin, then the
//! Python, JavaScript and C example plugins, each built from source by the
//! test setup with the code behind `eliot plugin build --lang`. The whole
//! bundled data set goes through a real Mosquitto, and each plugin's effect
//! on every record is checked against the same rule computed here.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::time::Duration;

use eliot_tests::data::{expected_messages, to_publishes, DeviceMessage};
use eliot_tests::plugins::{build_examples, build_language_examples};
use eliot_tests::process::HostProcess;
use eliot_tests::wait::{read_complete_lines, wait_until};
use eliot_tests::{publish_all, Mosquitto, QoS};
use serde_json::Value;

const ELIOT: &str = env!("CARGO_BIN_EXE_eliot-under-test");

/// Settings of the chain, as the config below sets them.
const WINDOW: usize = 24;
const THRESHOLD: f64 = 3.0;
const MIN_SAMPLES: usize = 8;
const RADIUS_M: f64 = 500.0;
const CO2_RANGE: (f64, f64) = (250.0, 1000.0);

fn config(broker: &str, plugin_dir: &Path, cache_dir: &Path, centre: (f64, f64)) -> String {
    format!(
        r#"
[mqtt]
broker = "{broker}"
client_id = "eliot-languages"

[runtime]
plugin_dir = "{plugins}"
cache_dir = "{cache}"

[dead_letters]
path = "out/dead-letters.sqlite"

[plugins.enrich]
file = "enrich.wasm"

[plugins.rolling-anomaly]
file = "rolling_anomaly.wasm"
config = {{ window = {WINDOW}, threshold = {THRESHOLD:.1}, min_samples = {MIN_SAMPLES}, fields = ["flow_lps"] }}

[plugins.geofence]
file = "geofence.wasm"
config = {{ latitude = {lat}, longitude = {lon}, radius_m = {RADIUS_M:.1} }}

[plugins.range-filter]
file = "range_filter.wasm"
config = {{ ranges = {{ co2_ppm = [{min:.1}, {max:.1}] }} }}

[pipelines.telemetry]
topics = ["devices/+/telemetry"]
stages = ["enrich", "rolling-anomaly", "geofence", "range-filter"]
sinks = ["file"]

[sinks.file]
type = "file"
path = "out/processed.jsonl"
"#,
        plugins = plugin_dir.display(),
        cache = cache_dir.display(),
        lat = centre.0,
        lon = centre.1,
        min = CO2_RANGE.0,
        max = CO2_RANGE.1,
    )
}

fn instant(value: &Value) -> time::OffsetDateTime {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::parse(value.as_str().unwrap(), &Rfc3339).unwrap()
}

/// Applies the rolling z-score rule of the Python plugin: for each flow reading,
/// the z-score against the readings before it in the window, once there
/// are enough of them. Returns the z-score of each flagged reading.
fn expected_anomalies(messages: &[&DeviceMessage]) -> BTreeMap<time::OffsetDateTime, f64> {
    let mut past: VecDeque<f64> = VecDeque::new();
    let mut flagged = BTreeMap::new();
    for message in messages {
        let value = message.payload["data"]["flow_lps"].as_f64().unwrap();
        if past.len() >= MIN_SAMPLES {
            let mean = past.iter().sum::<f64>() / past.len() as f64;
            let spread = (past.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / past.len() as f64).sqrt();
            if spread > 0.0 {
                let z = (value - mean) / spread;
                if z.abs() > THRESHOLD {
                    flagged.insert(instant(&message.payload["timestamp"]), z);
                }
            }
        }
        if past.len() == WINDOW {
            past.pop_front();
        }
        past.push_back(value);
    }
    flagged
}

/// Great-circle distance in metres, with the JavaScript plugin's formula.
fn distance_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    let rad = std::f64::consts::PI / 180.0;
    let d_lat = (b.0 - a.0) * rad;
    let d_lon = (b.1 - a.1) * rad;
    let h = (d_lat / 2.0).sin().powi(2) + (a.0 * rad).cos() * (b.0 * rad).cos() * (d_lon / 2.0).sin().powi(2);
    2.0 * 6_371_008.8 * h.sqrt().min(1.0).asin()
}

fn position(message: &DeviceMessage) -> (f64, f64) {
    let data = &message.payload["data"];
    (data["latitude"].as_f64().unwrap(), data["longitude"].as_f64().unwrap())
}

#[test]
fn rust_python_js_and_c_in_one_chain() {
    let plugin_dir = build_language_examples();
    assert_eq!(plugin_dir, build_examples());
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let dir = tempfile::tempdir().unwrap();
    // One compile cache for every run of this test: the Python and
    // JavaScript components take seconds to compile.
    let cache_dir = plugin_dir.parent().unwrap().join("cache");
    let all = expected_messages();
    let by_device = |device: &str| all.iter().filter(|m| m.device_id == device).collect::<Vec<_>>();
    let track = by_device("bike_001");
    // The fence is centred on the start of the ride, so that the route
    // leaves it and comes back.
    let centre = position(track[0]);
    let config_path = dir.path().join("eliot.toml");
    std::fs::write(&config_path, config(&broker.address(), &plugin_dir, &cache_dir, centre)).unwrap();
    let mut host = HostProcess::start(Path::new(ELIOT), &config_path, &dir.path().join("host.log"));
    host.wait_for_log("subscribed", Duration::from_secs(120));

    publish_all(broker.port(), &to_publishes(&all), QoS::AtLeastOnce);

    let office = by_device("office_room_1");
    let out_of_range = office
        .iter()
        .filter(|m| {
            let co2 = m.payload["data"]["co2_ppm"].as_f64().unwrap();
            co2 < CO2_RANGE.0 || co2 > CO2_RANGE.1
        })
        .count();
    let expected_records = all.len() - out_of_range;
    let output = dir.path().join("out/processed.jsonl");
    wait_until(&format!("{expected_records} records"), Duration::from_secs(300), || {
        read_complete_lines(&output).len() >= expected_records
    });
    let status = host.terminate(Duration::from_secs(30));
    assert!(status.success(), "host exited with {status}");
    let log = host.log();

    let records: Vec<Value> = read_complete_lines(&output).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), expected_records, "every message but the out-of-range ones, once");
    println!(
        "{} published, {} written, {out_of_range} dropped by the C range filter",
        all.len(),
        records.len()
    );
    for record in &records {
        let stages: Vec<&str> = record["processed_by"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
        assert_eq!(
            stages,
            ["enrich@0.1.0", "rolling-anomaly@0.1.0", "geofence@0.1.0", "range-filter@0.1.0"]
        );
    }
    let of_device = |device: &str| -> Vec<&Value> {
        records.iter().filter(|r| r["payload"]["device_id"] == device).collect()
    };

    // Python: exactly the flow readings the rule flags, with their z-score.
    let anomalies = expected_anomalies(&by_device("pipe_001"));
    assert!(!anomalies.is_empty(), "the water-flow data has known anomalies");
    let flow = of_device("pipe_001");
    assert_eq!(flow.len(), 1268);
    let mut found = 0;
    for record in &flow {
        let at = instant(&record["payload"]["timestamp"]);
        match anomalies.get(&at) {
            Some(z) => {
                let reported = &record["payload"]["anomalies"][0];
                assert_eq!(reported["field"], "flow_lps", "{record}");
                assert!((reported["z"].as_f64().unwrap() - z).abs() < 0.001, "z {z} against {record}");
                assert!(record["headers"].as_array().unwrap().contains(&serde_json::json!(["anomaly", "flow_lps"])));
                found += 1;
            }
            None => assert!(record["payload"].get("anomalies").is_none(), "not an anomaly: {record}"),
        }
    }
    assert_eq!(found, anomalies.len());
    println!("rolling-anomaly flagged {found} of {} flow readings", flow.len());

    // JavaScript: each position's distance to the centre, and a header on
    // every crossing of the fence.
    let ride = of_device("bike_001");
    assert_eq!(ride.len(), track.len());
    let mut inside_before: Option<bool> = None;
    let mut crossings = 0;
    for (record, message) in ride.iter().zip(&track) {
        assert_eq!(instant(&record["payload"]["timestamp"]), instant(&message.payload["timestamp"]), "in order");
        let distance = distance_m(centre, position(message));
        let data = &record["payload"]["data"];
        assert!((data["distance_m"].as_f64().unwrap() - distance).abs() <= 0.1, "{distance} against {record}");
        let inside = distance <= RADIUS_M;
        assert_eq!(data["inside"], inside, "{record}");
        let crossing = record["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == "geofence")
            .map(|h| h[1].as_str().unwrap().to_owned());
        let expected = match inside_before {
            Some(before) if before != inside => Some(if inside { "entered" } else { "left" }.to_owned()),
            _ => None,
        };
        assert_eq!(crossing, expected, "{record}");
        crossings += usize::from(expected.is_some());
        inside_before = Some(inside);
    }
    assert!(crossings >= 2, "the ride leaves the fence and comes back: {crossings} crossings");
    println!("geofence: {crossings} crossings over {} positions", ride.len());

    // C: only office readings inside the CO2 range were kept, and the drops
    // were counted, not dead-lettered.
    let kept = of_device("office_room_1");
    assert_eq!(kept.len(), office.len() - out_of_range);
    assert!(out_of_range > 0, "the office data leaves the range");
    for record in &kept {
        let co2 = record["payload"]["data"]["co2_ppm"].as_f64().unwrap();
        assert!((CO2_RANGE.0..=CO2_RANGE.1).contains(&co2), "{record}");
    }
    assert!(!log.contains("message dead-lettered"), "log:\n{log}");
    assert!(!dir.path().join("out/dead-letters.sqlite").exists() || eliot_tests::dead_letters::read_all(dir.path().join("out/dead-letters.sqlite")).is_empty());
}

/// Runs `eliot check` on `config` and returns its exit success and output.
fn check(config: &Path) -> (bool, String) {
    let output = std::process::Command::new(ELIOT).arg("check").arg("--config").arg(config).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[test]
fn new_plugin_skeletons_build_and_load() {
    use eliot::plugin_build::{build_lang, toolchain_dir, Lang};

    let workspace = eliot_tests::workspace_root();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let tools = toolchain_dir(Some(&workspace));
    let wit = workspace.join("wit");
    for (name, lang) in [("new-python", Lang::Python), ("new-js", Lang::Js), ("new-c", Lang::C)] {
        let folder = eliot::plugin_new::create(name, lang, dir.path(), Some(&workspace)).unwrap();
        build_lang(lang, &tools, &wit, &folder, &out).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    }
    // A Rust skeleton outside the workspace is a crate of its own that
    // depends on the SDK by path.
    let folder = eliot::plugin_new::create("new-rust", Lang::Rust, dir.path(), Some(&workspace)).unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let build = std::process::Command::new(cargo)
        .current_dir(&folder)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .env("CARGO_TARGET_DIR", dir.path().join("target"))
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", String::from_utf8_lossy(&build.stderr));
    std::fs::copy(dir.path().join("target/wasm32-wasip2/release/new_rust.wasm"), out.join("new_rust.wasm")).unwrap();

    // The C skeleton once more, against the contract with another version.
    let other_wit = dir.path().join("wit-0.2.0");
    std::fs::create_dir(&other_wit).unwrap();
    let text = std::fs::read_to_string(wit.join("world.wit")).unwrap().replace("@0.1.0", "@0.2.0");
    std::fs::write(other_wit.join("world.wit"), text).unwrap();
    let other = dir.path().join("other");
    build_lang(Lang::C, &tools, &other_wit, &dir.path().join("new-c"), &other).unwrap();
    std::fs::copy(other.join("new_c.wasm"), out.join("wrong_version.wasm")).unwrap();

    let stages = ["new-python", "new-js", "new-c", "new-rust"];
    let mut config = format!(
        "[mqtt]\nbroker = \"embedded\"\nclient_id = \"skeletons\"\n[runtime]\nplugin_dir = \"out\"\ncache_dir = \"{}\"\n[dead_letters]\npath = \"dead.sqlite\"\n",
        build_examples().parent().unwrap().join("cache").display()
    );
    for name in stages {
        config.push_str(&format!("[plugins.{name}]\nfile = \"{}.wasm\"\n", name.replace('-', "_")));
    }
    config.push_str("[pipelines.p]\ntopics = [\"a/#\"]\nstages = [\"new-python\", \"new-js\", \"new-c\", \"new-rust\"]\nsinks = [\"f\"]\n[sinks.f]\ntype = \"file\"\npath = \"o.jsonl\"\n");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, &config).unwrap();
    let (ok, text) = check(&good);
    assert!(ok, "{text}");
    for name in stages {
        assert!(text.contains(&format!("ok: plugin \"{name}\" {name} 0.1.0")), "{text}");
    }

    config.push_str("[plugins.wrong-version]\nfile = \"wrong_version.wasm\"\n");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, &config).unwrap();
    let (ok, text) = check(&bad);
    assert!(!ok, "{text}");
    assert!(text.contains("no exported instance named `eliot:plugin/processor@0.1.0`"), "{text}");
    assert!(text.contains("the component exports [eliot:plugin/processor@0.2.0]"), "{text}");
}

/// Arguments that cannot work are refused before a build that takes
/// minutes, with the argument and the fix named.
#[test]
fn plugin_build_rejects_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        let output = std::process::Command::new(ELIOT).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (code, stderr) = run(&["plugin".as_ref(), "build".as_ref(), "--out".as_ref(), file.as_os_str()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("--out {} is a file; name the folder the components go into", file.display())), "{stderr}");
    let (code, stderr) = run(&["plugin".as_ref(), "build".as_ref(), "--wit".as_ref(), dir.path().as_os_str()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--wit applies to --lang python, js and c"), "{stderr}");
    assert_eq!(std::fs::read(&file).unwrap(), b"", "the file is left alone");
}
