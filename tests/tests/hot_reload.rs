//! Hot reload under load: plugin files replaced and the config edited while
//! a real Mosquitto carries a steady stream of the bundled readings to the
//! `eliot` binary. Every test proves exact counts: each published message
//! is in the file sink exactly once, each device's records keep their
//! order, and the plugin versions (or stage lists) in the records switch
//! once per successful reload and never back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use eliot_tests::config::EXAMPLE_PLUGIN_TABLES;
use eliot_tests::data::{interleaved_messages, to_publishes, DeviceMessage};
use eliot_tests::plugins::{build_examples, build_versioned};
use eliot_tests::process::HostProcess;
use eliot_tests::wait::{read_complete_lines, wait_until};
use eliot_tests::{publish_all, Mosquitto, QoS};
use serde_json::Value;

const ELIOT: &str = env!("CARGO_BIN_EXE_eliot-under-test");

/// Messages of one step: a bulk published while the file changes, and a
/// probe published after the host reported the outcome, which therefore
/// runs on whatever the reload left in place.
const BULK: usize = 1_950;
const PROBE: usize = 50;
const STEP: usize = BULK + PROBE;

const WAIT: Duration = Duration::from_secs(120);

/// A host with its own plugin folder and config file, which the test
/// changes while the host runs.
struct Setup {
    broker: Mosquitto,
    dir: tempfile::TempDir,
    plugin_dir: PathBuf,
    config: PathBuf,
    host: Option<HostProcess>,
    published: Vec<DeviceMessage>,
}

impl Setup {
    /// Copies the example plugins and `versioned` 1.0.0 into a new plugin
    /// folder, writes a config whose pipeline runs `stages`, and starts the
    /// host.
    fn start(client_id: &str, stages: &[&str]) -> Self {
        Self::start_with_overlay(client_id, stages, None)
    }

    /// Does the same as [`Setup::start`], and with `overlay` writes it to
    /// `dev.toml` beside the config and starts the host with
    /// `ELIOT_ENV=dev`.
    fn start_with_overlay(client_id: &str, stages: &[&str], overlay: Option<&str>) -> Self {
        let broker = Mosquitto::builder().max_queued_messages(0).start();
        let examples = build_examples();
        let dir = tempfile::tempdir().unwrap();
        let plugin_dir = dir.path().join("plugins");
        std::fs::create_dir(&plugin_dir).unwrap();
        for file in ["enrich.wasm", "validate_format.wasm", "sanity_filter.wasm"] {
            std::fs::copy(examples.join(file), plugin_dir.join(file)).unwrap();
        }
        std::fs::copy(build_versioned("1.0.0", false), plugin_dir.join("versioned.wasm")).unwrap();
        let config = dir.path().join("eliot.toml");
        let mut setup = Self {
            broker,
            dir,
            plugin_dir,
            config,
            host: None,
            published: Vec::new(),
        };
        std::fs::write(&setup.config, setup.config_text(client_id, stages, "")).unwrap();
        let log = setup.dir.path().join("host.log");
        let mut host = match overlay {
            None => HostProcess::start(Path::new(ELIOT), &setup.config, &log),
            Some(text) => {
                std::fs::write(setup.dir.path().join("dev.toml"), text).unwrap();
                HostProcess::start_with_env(Path::new(ELIOT), &setup.config, &log, &[("ELIOT_ENV", "dev")])
            }
        };
        host.wait_for_log("subscribed", WAIT);
        host.wait_for_log("watching for plugin and config changes", WAIT);
        setup.host = Some(host);
        setup
    }

    /// Returns the config: the example plugins and `versioned`, and one
    /// pipeline with two workers that runs `stages` into the file sink.
    /// `extra` goes into the pipeline's table.
    fn config_text(&self, client_id: &str, stages: &[&str], extra: &str) -> String {
        let stages = stages.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
        format!(
            r#"
[mqtt]
broker = "{broker}"
client_id = "{client_id}"
keep_alive_secs = 5

[runtime]
plugin_dir = "plugins"
cache_dir = "cache"

[dead_letters]
path = "out/dead-letters.sqlite"
{EXAMPLE_PLUGIN_TABLES}
[plugins.versioned]
file = "versioned.wasm"

[pipelines.telemetry]
topics = ["devices/+/telemetry"]
workers = 2
stages = [{stages}]
sinks = ["file"]
{extra}
[sinks.file]
type = "file"
path = "out/processed.jsonl"
"#,
            broker = self.broker.address(),
        )
    }

    fn host(&mut self) -> &mut HostProcess {
        self.host.as_mut().expect("the host runs")
    }

    fn output(&self) -> PathBuf {
        self.dir.path().join("out/processed.jsonl")
    }

    fn records(&self) -> Vec<Value> {
        read_complete_lines(self.output()).iter().map(|line| serde_json::from_str(line).unwrap()).collect()
    }

    /// Publishes the next `n` readings and returns them.
    fn next_messages(&mut self, n: usize) -> Vec<DeviceMessage> {
        let all = interleaved_messages(self.published.len() + n);
        let next = all[self.published.len()..].to_vec();
        self.published.extend(next.iter().cloned());
        next
    }

    /// Runs one step: publishes a bulk of readings from another thread while
    /// `change` replaces a file and waits for the host's outcome, then
    /// publishes a probe and waits until every message so far is written.
    fn step(&mut self, change: impl FnOnce(&mut Self)) {
        let bulk = to_publishes(&self.next_messages(BULK));
        let port = self.broker.port();
        let publisher = std::thread::spawn(move || publish_all(port, &bulk, QoS::AtLeastOnce));
        change(self);
        publisher.join().expect("the publisher thread panicked");
        let probe = to_publishes(&self.next_messages(PROBE));
        publish_all(self.broker.port(), &probe, QoS::AtLeastOnce);
        self.wait_written();
    }

    fn wait_written(&self) {
        let expected = self.published.len();
        wait_until(&format!("{expected} records in the file sink"), WAIT, || {
            read_complete_lines(self.output()).len() >= expected
        });
    }

    /// Stops the host and checks that every published message is in the
    /// file sink exactly once and in order per device. Returns each device's
    /// records in file order.
    fn finish(mut self) -> BTreeMap<String, Vec<Value>> {
        let status = self.host().terminate(Duration::from_secs(30));
        assert!(status.success(), "host exited with {status}");
        let records = self.records();
        assert_eq!(records.len(), self.published.len(), "one record per published message");

        let mut by_device: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for record in records {
            let device = record["payload"]["device_id"].as_str().unwrap().to_owned();
            by_device.entry(device).or_default().push(record);
        }
        let unique: BTreeSet<(String, time::OffsetDateTime)> = self
            .published
            .iter()
            .map(|m| (m.device_id.clone(), instant(&m.payload["timestamp"])))
            .collect();
        assert_eq!(unique.len(), self.published.len(), "the published readings are distinct");
        let mut written = BTreeSet::new();
        for (device, records) in &by_device {
            let stamps: Vec<_> = records.iter().map(|r| instant(&r["payload"]["timestamp"])).collect();
            let published: Vec<_> = self
                .published
                .iter()
                .filter(|m| &m.device_id == device)
                .map(|m| instant(&m.payload["timestamp"]))
                .collect();
            assert_eq!(stamps, published, "device {device}: every reading once, in publish order");
            written.extend(stamps.into_iter().map(|s| (device.clone(), s)));
        }
        assert_eq!(written, unique, "no loss and no duplicate");
        by_device
    }
}

fn instant(stamp: &Value) -> time::OffsetDateTime {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::parse(stamp.as_str().unwrap(), &Rfc3339).unwrap()
}

/// Returns the stage entry of `stage` in a record's `processed_by`.
fn processed_by(record: &Value, stage: &str) -> Option<String> {
    record["processed_by"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find(|entry| entry.starts_with(&format!("{stage}@")))
        .map(str::to_owned)
}

/// Checks that in each device's records the value of `key` only moves
/// forward through `order`, so that it switched at most once per change
/// and never back, and that every value in `order` was seen.
fn assert_switches_forward(by_device: &BTreeMap<String, Vec<Value>>, order: &[String], key: impl Fn(&Value) -> String) {
    let mut seen = BTreeSet::new();
    for (device, records) in by_device {
        let ranks: Vec<usize> = records
            .iter()
            .map(|record| {
                let value = key(record);
                seen.insert(value.clone());
                order.iter().position(|o| *o == value).unwrap_or_else(|| panic!("unexpected {value}"))
            })
            .collect();
        assert!(ranks.windows(2).all(|w| w[0] <= w[1]), "device {device} switched back: {ranks:?}");
    }
    let expected: BTreeSet<String> = order.iter().cloned().collect();
    assert_eq!(seen, expected, "every version served some records");
}

/// Writes `bytes` to a temporary file beside `path` and renames it into
/// place, as a deployment tool does.
fn replace_atomically(path: &Path, bytes: &[u8]) {
    let temporary = path.with_extension("part");
    std::fs::write(&temporary, bytes).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

#[test]
fn plugin_swapped_five_times() {
    let mut setup = Setup::start("eliot-reload-plugin", &["enrich", "validate-format", "versioned"]);
    let target = setup.plugin_dir.join("versioned.wasm");

    // Version 1.0.0 serves the first step alone.
    let first = to_publishes(&setup.next_messages(STEP));
    publish_all(setup.broker.port(), &first, QoS::AtLeastOnce);
    setup.wait_written();

    // 1: version 2.0.0, renamed into place.
    let v2 = std::fs::read(build_versioned("2.0.0", false)).unwrap();
    setup.step(|s| {
        replace_atomically(&target, &v2);
        s.host().wait_for_log_count("reload applied", 1, WAIT);
    });

    // 2: a file that is not Wasm, written in place.
    setup.step(|s| {
        std::fs::write(&target, b"this is not a WebAssembly component").unwrap();
        s.host().wait_for_log_count("reload rolled back", 1, WAIT);
    });
    let log = setup.host().log();
    assert!(log.contains(&target.display().to_string()), "the log names the file:\n{log}");
    assert!(log.contains("is not a valid Wasm component"), "the log names the reason:\n{log}");
    assert!(log.contains("bad magic number; build it for wasm32-wasip2"), "the reason is whole, without a byte dump:\n{log}");

    // 3: a build whose init rejects the config it is given.
    let rejects = std::fs::read(build_versioned("2.5.0", true)).unwrap();
    setup.step(|s| {
        replace_atomically(&target, &rejects);
        s.host().wait_for_log("init rejected its config", WAIT);
    });
    let log = setup.host().log();
    assert!(log.contains("version 2.5.0 of this test plugin rejects every config"), "log:\n{log}");

    // 4: version 3.0.0, copied in two chunks with a pause between them.
    let v3 = std::fs::read(build_versioned("3.0.0", false)).unwrap();
    setup.step(|s| {
        use std::io::Write as _;
        let mut file = std::fs::File::create(&target).unwrap();
        file.write_all(&v3[..v3.len() / 2]).unwrap();
        file.sync_all().unwrap();
        // The host finds a half-written file and waits for the rest; the
        // first such line came from the file that was not Wasm.
        s.host().wait_for_log_count("does not load yet and was just written", 2, WAIT);
        file.write_all(&v3[v3.len() / 2..]).unwrap();
        file.sync_all().unwrap();
        drop(file);
        s.host().wait_for_log_count("reload applied", 2, WAIT);
    });

    // 5: version 4.0.0, copied over the running file.
    let v4 = build_versioned("4.0.0", false);
    setup.step(|s| {
        std::fs::copy(&v4, &target).unwrap();
        s.host().wait_for_log_count("reload applied", 3, WAIT);
    });

    let log = setup.host().log();
    for line in log.lines().filter(|l| l.contains("reload") || l.contains("does not load yet")) {
        println!("{line}");
    }
    assert_eq!(log.matches("reload applied").count(), 3, "three successful swaps:\n{log}");
    assert!(log.matches("reload rolled back").count() >= 2, "two failed reloads at least:\n{log}");
    for version in ["2.0.0", "3.0.0", "4.0.0"] {
        assert!(log.contains(&format!("is now version {version}")), "log:\n{log}");
    }
    assert_eq!(setup.published.len(), 6 * STEP);
    let by_device = setup.finish();
    let order: Vec<String> = ["1.0.0", "2.0.0", "3.0.0", "4.0.0"].iter().map(|v| format!("versioned@{v}")).collect();
    assert_switches_forward(&by_device, &order, |record| processed_by(record, "versioned").unwrap());
}

#[test]
fn stages_reordered_and_removed() {
    let client_id = "eliot-reload-config";
    let mut setup = Setup::start(client_id, &["enrich", "validate-format", "versioned"]);

    let first = to_publishes(&setup.next_messages(STEP));
    publish_all(setup.broker.port(), &first, QoS::AtLeastOnce);
    setup.wait_written();

    // Reorder two stages, the new file renamed into place.
    let reordered = setup.config_text(client_id, &["enrich", "versioned", "validate-format"], "");
    let config = setup.config.clone();
    setup.step(|s| {
        replace_atomically(&config, reordered.as_bytes());
        s.host().wait_for_log_count("reload applied", 1, WAIT);
    });

    // A key that does not exist: rolled back, the reordered chain serves on.
    let broken = setup.config_text(client_id, &["enrich", "validate-format"], "stagez = []");
    setup.step(|s| {
        std::fs::write(&config, broken.as_bytes()).unwrap();
        s.host().wait_for_log_count("reload rolled back", 1, WAIT);
    });
    let log = setup.host().log();
    assert!(log.contains(&config.display().to_string()), "the log names the file:\n{log}");
    assert!(log.contains("pipelines.telemetry.stagez"), "the log names the key:\n{log}");

    // Remove a stage, the file written in place.
    let removed = setup.config_text(client_id, &["enrich", "validate-format"], "");
    setup.step(|s| {
        std::fs::write(&config, removed.as_bytes()).unwrap();
        s.host().wait_for_log_count("reload applied", 2, WAIT);
    });

    for line in setup.host().log().lines().filter(|l| l.contains("reload")) {
        println!("{line}");
    }
    let by_device = setup.finish();
    let chain = |record: &Value| {
        record["processed_by"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| entry.as_str().unwrap().split('@').next().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(",")
    };
    let order: Vec<String> =
        ["enrich,validate-format,versioned", "enrich,versioned,validate-format", "enrich,validate-format"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
    assert_switches_forward(&by_device, &order, chain);
}

#[test]
fn overlay_edit_applied_or_rolled_back() {
    let client_id = "eliot-reload-overlay";
    let overlay = |stages: &str, extra: &str| format!("[pipelines.telemetry]\nstages = [{stages}]\n{extra}");
    let mut setup =
        Setup::start_with_overlay(client_id, &["enrich"], Some(&overlay(r#""enrich", "validate-format""#, "")));
    let dev = setup.dir.path().join("dev.toml");

    let first = to_publishes(&setup.next_messages(STEP));
    publish_all(setup.broker.port(), &first, QoS::AtLeastOnce);
    setup.wait_written();

    // The overlay, not the base file, adds a stage: the reload re-reads
    // both layers.
    let added = overlay(r#""enrich", "validate-format", "versioned""#, "");
    setup.step(|s| {
        replace_atomically(&dev, added.as_bytes());
        s.host().wait_for_log_count("reload applied", 1, WAIT);
    });

    // An unknown key in the overlay: rolled back, named by the overlay's
    // file, and the chain it replaced serves on.
    let broken = overlay(r#""enrich""#, "stagez = []");
    setup.step(|s| {
        std::fs::write(&dev, broken.as_bytes()).unwrap();
        s.host().wait_for_log_count("reload rolled back", 1, WAIT);
    });
    let log = setup.host().log();
    let dev_path = std::path::absolute(&dev).unwrap();
    assert!(log.contains(&format!("file={}", dev_path.display())), "the log names the overlay:\n{log}");
    assert!(log.contains("pipelines.telemetry.stagez"), "the log names the key:\n{log}");

    let by_device = setup.finish();
    let chain = |record: &Value| {
        record["processed_by"]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| entry.as_str().unwrap().split('@').next().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(",")
    };
    let order: Vec<String> =
        ["enrich,validate-format", "enrich,validate-format,versioned"].iter().map(|s| (*s).to_owned()).collect();
    assert_switches_forward(&by_device, &order, chain);
}

#[test]
fn pipeline_added_and_removed() {
    let client_id = "eliot-reload-pipelines";
    let mut setup = Setup::start(client_id, &["enrich", "validate-format"]);
    let config = setup.config.clone();
    let second = r#"
[pipelines.second]
topics = ["second/+/telemetry"]
stages = ["enrich", "versioned"]
sinks = ["file"]
"#;
    // The readings the second pipeline gets, on its own topics.
    let side: Vec<(String, Vec<u8>)> = interleaved_messages(300)
        .iter()
        .map(|m| (m.topic.replacen("devices/", "second/", 1), m.payload_bytes()))
        .collect();

    let first = to_publishes(&setup.next_messages(STEP));
    publish_all(setup.broker.port(), &first, QoS::AtLeastOnce);
    setup.wait_written();

    // Add a pipeline while the first one carries a stream.
    let added = format!("{}{second}", setup.config_text(client_id, &["enrich", "validate-format"], ""));
    setup.step(|s| {
        std::fs::write(&config, added.as_bytes()).unwrap();
        s.host().wait_for_log_count("reload applied", 1, WAIT);
        // Subscribed once at the start and once for the new filter.
        s.host().wait_for_log_count("subscribed", 2, WAIT);
    });
    publish_all(setup.broker.port(), &side[..200], QoS::AtLeastOnce);
    let second_records = |setup: &Setup| setup.records().iter().filter(|r| r["pipeline"] == "second").count();
    wait_until("200 records of the second pipeline", WAIT, || second_records(&setup) == 200);

    // Remove it again while the first one carries a stream.
    let removed = setup.config_text(client_id, &["enrich", "validate-format"], "");
    setup.step(|s| {
        replace_atomically(&config, removed.as_bytes());
        s.host().wait_for_log_count("reload applied", 2, WAIT);
        s.host().wait_for_log("unsubscribed: no pipeline reads this filter any more", WAIT);
        s.host().wait_for_log("pipeline finished every message it held", WAIT);
    });
    let log = setup.host().log();
    // The removed pipeline's last counts are logged, since the periodic
    // counts line only reads running pipelines.
    let last_counts = log.lines().find(|line| line.contains("pipeline finished every message it held")).unwrap();
    assert!(
        last_counts.contains("pipeline=second received=200 delivered=200 records_out=200 dropped=0 dead_lettered=0"),
        "{last_counts}"
    );
    // The summary is quoted in the log, so its quotes are escaped.
    assert!(log.contains(r#"pipeline \"second\" added"#), "log:\n{log}");
    assert!(log.contains(r#"pipeline \"second\" removed"#), "log:\n{log}");

    // Nothing reads these any more; a last step of the first pipeline
    // published after them shows they were not processed.
    publish_all(setup.broker.port(), &side[200..], QoS::AtLeastOnce);
    setup.step(|_| {});
    assert_eq!(second_records(&setup), 200, "the removed pipeline processed nothing more");

    // The second pipeline's records: each reading once, by the versioned
    // stage it ran.
    for record in setup.records().iter().filter(|r| r["pipeline"] == "second") {
        assert_eq!(processed_by(record, "versioned").as_deref(), Some("versioned@1.0.0"));
    }
    let status = setup.host().terminate(Duration::from_secs(30));
    assert!(status.success(), "host exited with {status}");
    let first_pipeline: Vec<Value> = setup.records().into_iter().filter(|r| r["pipeline"] == "telemetry").collect();
    assert_eq!(first_pipeline.len(), setup.published.len(), "the first pipeline lost or doubled nothing");
    let distinct: BTreeSet<(String, time::OffsetDateTime)> = first_pipeline
        .iter()
        .map(|r| (r["payload"]["device_id"].as_str().unwrap().to_owned(), instant(&r["payload"]["timestamp"])))
        .collect();
    assert_eq!(distinct.len(), setup.published.len());
}

/// Publishes `n` more readings, waits until they are written, and returns
/// the version of `versioned` that processed the last one.
fn probe_version(setup: &mut Setup, n: usize) -> String {
    let probe = to_publishes(&setup.next_messages(n));
    publish_all(setup.broker.port(), &probe, QoS::AtLeastOnce);
    setup.wait_written();
    processed_by(setup.records().last().unwrap(), "versioned").unwrap()
}

#[test]
fn odd_plugin_files_keep_the_old_version() {
    let mut setup = Setup::start("eliot-reload-odd", &["enrich", "versioned"]);
    let target = setup.plugin_dir.join("versioned.wasm");
    assert_eq!(probe_version(&mut setup, 100), "versioned@1.0.0");

    // A FIFO in place of the component: reading it would block the host.
    std::fs::remove_file(&target).unwrap();
    let fifo = std::ffi::CString::new(target.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0, "mkfifo failed");
    setup.host().wait_for_log_count("reload rolled back", 1, WAIT);
    assert_eq!(probe_version(&mut setup, 100), "versioned@1.0.0");

    // A symlink to a device that never ends.
    std::fs::remove_file(&target).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &target).unwrap();
    setup.host().wait_for_log_count("reload rolled back", 2, WAIT);
    assert_eq!(probe_version(&mut setup, 100), "versioned@1.0.0");
    let log = setup.host().log();
    assert_eq!(log.matches("not a regular file; put a Wasm component there").count(), 2, "log:\n{log}");

    // Another plugin under this plugin's file name.
    std::fs::remove_file(&target).unwrap();
    std::fs::copy(build_examples().join("validate_format.wasm"), &target).unwrap();
    setup.host().wait_for_log_count("reload rolled back", 3, WAIT);
    assert_eq!(probe_version(&mut setup, 100), "versioned@1.0.0");
    let log = setup.host().log();
    assert!(log.contains(r#"the new file is plugin \"validate-format\", not \"versioned\""#), "log:\n{log}");

    // The whole plugin folder replaced by a copy: the old watch reports nothing
    // of the new folder, so the host must watch it again.
    let moved = setup.dir.path().join("plugins.old");
    std::fs::rename(&setup.plugin_dir, &moved).unwrap();
    std::fs::create_dir(&setup.plugin_dir).unwrap();
    for file in ["enrich.wasm", "validate_format.wasm", "sanity_filter.wasm"] {
        std::fs::copy(moved.join(file), setup.plugin_dir.join(file)).unwrap();
    }
    std::fs::copy(build_versioned("1.0.0", false), &target).unwrap();
    setup.host().wait_for_log("a watched folder changed", WAIT);
    std::fs::copy(build_versioned("2.0.0", false), &target).unwrap();
    setup.host().wait_for_log_count("reload applied", 1, WAIT);
    assert_eq!(probe_version(&mut setup, 100), "versioned@2.0.0");

    let status = setup.host().terminate(Duration::from_secs(30));
    assert!(status.success(), "host exited with {status}");
    assert_eq!(setup.records().len(), setup.published.len(), "every probe once");
}

#[test]
fn slow_plugin_load_blocks_no_pipeline() {
    let client_id = "eliot-reload-slow-load";
    let mut setup = Setup::start(client_id, &["enrich", "validate-format"]);
    std::fs::copy(eliot_tests::plugins::build_plugin("gated-init"), setup.plugin_dir.join("gated_init.wasm")).unwrap();
    let gate = setup.dir.path().join("gate");
    std::fs::create_dir(&gate).unwrap();

    // A new pipeline whose plugin's init waits until the test opens the
    // gate: its load stays in progress for as long as the test needs.
    let added = format!(
        r#"{}
[plugins.gated-init]
file = "gated_init.wasm"
config = {{ gate = "/gate/open" }}
limits = {{ call_budget_ms = 120000 }}
grants = {{ read_dirs = [{{ host = "{}", guest = "/gate" }}] }}

[pipelines.second]
topics = ["second/+/telemetry"]
stages = ["gated-init"]
sinks = ["file"]
"#,
        setup.config_text(client_id, &["enrich", "validate-format"], ""),
        gate.display()
    );
    std::fs::write(&setup.config, added.as_bytes()).unwrap();
    setup.host().wait_for_log("reload is loading a plugin", WAIT);

    // The running pipeline carries a whole step while the load waits.
    setup.step(|_| {});
    let log = setup.host().log();
    assert!(!log.contains("reload applied"), "the gate is still closed:\n{log}");

    std::fs::write(gate.join("open"), b"").unwrap();
    setup.host().wait_for_log("reload applied", WAIT);
    setup.host().wait_for_log_count("subscribed", 2, WAIT);
    let side: Vec<(String, Vec<u8>)> = interleaved_messages(100)
        .iter()
        .map(|m| (m.topic.replacen("devices/", "second/", 1), m.payload_bytes()))
        .collect();
    publish_all(setup.broker.port(), &side, QoS::AtLeastOnce);
    wait_until("100 records of the second pipeline", WAIT, || {
        setup.records().iter().filter(|r| r["pipeline"] == "second").count() == 100
    });
    let status = setup.host().terminate(Duration::from_secs(30));
    assert!(status.success(), "host exited with {status}");
    let first = setup.records().iter().filter(|r| r["pipeline"] == "telemetry").count();
    assert_eq!(first, setup.published.len(), "the first pipeline lost or doubled nothing");
}
