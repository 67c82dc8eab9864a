use clap::Parser;

use super::*;
use crate::deadletter::DeadLetter;
use crate::wasm::{Message, Qos};

#[derive(Parser)]
struct TestCli {
    #[command(subcommand)]
    command: DeadLetterCommand,
}

/// A folder with `eliot.toml`, which names `out/dead-letters.sqlite`, and
/// that store, filled with three dead letters stored at fixed times.
struct Setup {
    dir: tempfile::TempDir,
    store: DeadLetterStore,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("eliot.toml"),
            "[dead_letters]\npath = \"out/dead-letters.sqlite\"\n",
        )
        .unwrap();
        let store = DeadLetterStore::open(&dir.path().join("out/dead-letters.sqlite")).unwrap();
        Self { dir, store }
    }

    fn filled() -> Self {
        let setup = Self::new();
        let mut binary = letter(
            "telemetry",
            "validate-format",
            "devices/b/telemetry",
            &[0xff, 0xfe],
        );
        binary.reason =
            "payload is not valid UTF-8: invalid utf-8 sequence of 1 bytes from index 0".to_owned();
        binary.message.headers = vec![("device_id".to_owned(), "b".to_owned())];
        let mut sink = letter("alerts", "sink:republish", "alerts/a", b"{\"level\":3}");
        sink.kind = FailureKind::Sink;
        sink.reason = "topic template \"alerts/{payload.site}\": the payload has no field \"site\""
            .to_owned();
        setup
            .store
            .append(&[
                &letter(
                    "telemetry",
                    "validate-format",
                    "devices/a/telemetry",
                    b"not json",
                ),
                &binary,
                &sink,
            ])
            .unwrap();
        let raw = rusqlite::Connection::open(setup.store.path()).unwrap();
        raw.execute(
            "UPDATE dead_letters SET stored_at_ms = 1749133800123 + id",
            [],
        )
        .unwrap();
        setup
    }

    fn config(&self) -> String {
        self.dir.path().join("eliot.toml").display().to_string()
    }

    fn store_path(&self) -> String {
        self.store.path().display().to_string()
    }

    /// Parses `args` after `dead-letters`, adds `--config`, runs the
    /// command, and returns its output or its error text.
    fn run(&self, args: &[&str]) -> Result<String, String> {
        let config = self.config();
        let mut full = vec!["eliot"];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--config", &config]);
        run(&full)
    }
}

fn letter(pipeline: &str, stage: &str, topic: &str, payload: &[u8]) -> DeadLetter {
    let message = Message {
        topic: topic.to_owned(),
        payload: payload.to_vec(),
        qos: Qos::AtLeastOnce,
        retain: false,
        received_at_ms: 1_749_133_700_000,
        headers: Vec::new(),
    };
    let reason = "payload is not valid JSON: expected ident at line 1 column 2".to_owned();
    DeadLetter::new(
        pipeline.to_owned(),
        stage.to_owned(),
        FailureKind::Invalid,
        reason,
        message,
    )
}

fn run(args: &[&str]) -> Result<String, String> {
    let cli = TestCli::try_parse_from(args).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut out = Vec::new();
    runtime
        .block_on(execute_to(cli.command, &mut out))
        .map_err(|e| format!("{e:#}"))?;
    Ok(String::from_utf8(out).unwrap())
}

#[test]
fn list_prints_table() {
    let setup = Setup::filled();
    let output = setup.run(&["list"]).unwrap();
    assert_eq!(
        output,
        "\
ID  STORED                    PIPELINE   STAGE            KIND     TOPIC                REASON
1   2025-06-05T14:30:00.124Z  telemetry  validate-format  invalid  devices/a/telemetry  payload is not valid JSON: expected ident at line 1 column 2
2   2025-06-05T14:30:00.125Z  telemetry  validate-format  invalid  devices/b/telemetry  payload is not valid UTF-8: invalid utf-8 sequence of 1 byt…
3   2025-06-05T14:30:00.126Z  alerts     sink:republish   sink     alerts/a             topic template \"alerts/{payload.site}\": the payload has no …
3 dead letters
"
    );
}

#[test]
fn list_filters_and_pages() {
    let setup = Setup::filled();
    let output = setup
        .run(&["list", "--pipeline", "telemetry", "--limit", "1"])
        .unwrap();
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 3, "{output}");
    assert!(lines[1].starts_with("1 "), "{output}");
    assert_eq!(
        lines[2],
        "1 of 2 matching dead letters shown; for the next page pass --after-id 1"
    );

    let output = setup
        .run(&[
            "list",
            "--pipeline",
            "telemetry",
            "--limit",
            "1",
            "--after-id",
            "1",
        ])
        .unwrap();
    let lines: Vec<&str> = output.lines().collect();
    assert!(lines[1].starts_with("2 "), "{output}");
    assert_eq!(lines[2], "1 dead letter");

    let output = setup
        .run(&[
            "list",
            "--kind",
            "sink",
            "--stage",
            "sink:republish",
            "--topic-prefix",
            "alerts/",
        ])
        .unwrap();
    assert_eq!(output.lines().count(), 3, "{output}");
    assert!(output.lines().nth(1).unwrap().starts_with("3 "), "{output}");

    assert_eq!(
        setup.run(&["list", "--pipeline", "nope"]).unwrap(),
        "no dead letters match\n"
    );
}

#[test]
fn list_json_is_one_object_per_line() {
    let setup = Setup::filled();
    let output = setup.run(&["list", "--json", "--limit", "2"]).unwrap();
    let objects: Vec<serde_json::Value> = output
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objects.len(), 2);
    assert_eq!(objects[0]["id"], 1);
    assert_eq!(objects[0]["stored_at"], "2025-06-05T14:30:00.124Z");
    assert_eq!(objects[0]["payload_text"], "not json");
    assert_eq!(objects[1]["payload_base64"], "//4=");
    assert_eq!(
        objects[1]["headers"],
        serde_json::json!([["device_id", "b"]])
    );
}

#[test]
fn show_prints_every_field() {
    let setup = Setup::filled();
    assert_eq!(
        setup.run(&["show", "2"]).unwrap(),
        "\
id:            2
stored at:     2025-06-05T14:30:00.125Z
pipeline:      telemetry
stage:         validate-format
kind:          invalid
reason:        payload is not valid UTF-8: invalid utf-8 sequence of 1 bytes from index 0
topic:         devices/b/telemetry
qos:           1
retain:        false
received at:   2025-06-05T14:28:20Z
replay count:  0
last replayed: never
headers:
  device_id: b
payload (2 bytes, not valid UTF-8, base64):
//4=
"
    );
    let text = setup.run(&["show", "1"]).unwrap();
    assert!(text.contains("headers:       (none)\n"), "{text}");
    assert!(
        text.ends_with("payload (8 bytes, UTF-8 text):\nnot json\n"),
        "{text}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&setup.run(&["show", "3", "--json"]).unwrap()).unwrap();
    assert_eq!(json["kind"], "sink");
}

#[test]
fn show_indents_multiline_reason() {
    let setup = Setup::new();
    let mut multiline = letter("telemetry", "enrich", "devices/a/telemetry", b"{}");
    multiline.reason = "backend unavailable\nretry later".to_owned();
    setup.store.append(&[&multiline]).unwrap();
    let text = setup.run(&["show", "1"]).unwrap();
    assert!(
        text.contains("reason:        backend unavailable\n               retry later\ntopic:"),
        "{text}"
    );

    let table = setup.run(&["list"]).unwrap();
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .ends_with("  backend unavailable retry later"),
        "{table}"
    );
}

#[test]
fn show_missing_id_fails() {
    let setup = Setup::filled();
    assert_eq!(
        setup.run(&["show", "42"]),
        Err(format!(
            "dead letter 42 not found in {}",
            setup.store_path()
        ))
    );
}

#[test]
fn purge_needs_selection() {
    let setup = Setup::filled();
    assert_eq!(
        setup.run(&["purge"]),
        Err("purge needs a selection: give dead-letter ids, a filter (--pipeline, --stage, --kind, --topic-prefix) \
             or --all"
            .to_owned())
    );
    assert_eq!(
        setup.run(&["purge", "--all", "--pipeline", "alerts"]),
        Err("--all selects every dead letter; remove it, or remove the ids and filters".to_owned())
    );
    assert_eq!(
        setup.run(&["purge", "1", "--all"]),
        Err("--all selects every dead letter; remove it, or remove the ids and filters".to_owned())
    );
    assert_eq!(
        setup.run(&["purge", "1", "--kind", "invalid"]),
        Err("give either dead-letter ids or filters, not both".to_owned())
    );
    assert_eq!(
        setup.store.count(&ListFilter::default()).unwrap(),
        3,
        "nothing was purged"
    );
}

#[test]
fn purge_by_filter_ids_and_all() {
    let setup = Setup::filled();
    let store = setup.store_path();
    assert_eq!(
        setup.run(&["purge", "--pipeline", "alerts"]).unwrap(),
        format!("purged 1 dead letter from {store}\n")
    );
    assert_eq!(
        setup.run(&["purge", "1", "7"]),
        Err(format!(
            "dead letters not found in {store}: 7; nothing was purged"
        ))
    );
    assert_eq!(
        setup.run(&["purge", "1", "1"]).unwrap(),
        format!("purged 1 dead letter from {store}\n")
    );
    assert_eq!(
        setup.run(&["purge", "--kind", "trap"]).unwrap(),
        format!("purged 0 dead letters from {store}\n")
    );
    assert_eq!(
        setup.run(&["purge", "--all"]).unwrap(),
        format!("purged 1 dead letter from {store}\n")
    );
    assert_eq!(setup.store.count(&ListFilter::default()).unwrap(), 0);
}

#[test]
fn replay_needs_selection() {
    // The selection is checked before the config, which has no pipelines
    // here.
    let setup = Setup::filled();
    assert_eq!(
        setup.run(&["replay"]),
        Err("replay needs a selection: give dead-letter ids, a filter (--pipeline, --stage, --kind, --topic-prefix) \
             or --all"
            .to_owned())
    );
    assert_eq!(
        setup.run(&["replay", "--all", "--stage", "enrich"]),
        Err("--all selects every dead letter; remove it, or remove the ids and filters".to_owned())
    );
}

#[test]
fn bad_option_values_rejected() {
    let setup = Setup::filled();
    let error = setup.run(&["list", "--limit", "0"]).unwrap_err();
    assert!(
        error.contains("invalid value '0' for '--limit <LIMIT>': 0 is not in 1.."),
        "{error}"
    );

    let error = setup.run(&["list", "--kind", "bogus"]).unwrap_err();
    assert!(
        error.contains(
            "invalid value 'bogus' for '--kind <KIND>': unknown failure kind \"bogus\"; use one of invalid, \
             transient, timeout, trap, sink, circuit-open, undecodable, too-large, host-panic"
        ),
        "{error}"
    );

    let error = setup.run(&["purge", "--topic-prefix", ""]).unwrap_err();
    assert!(
        error.contains("invalid value '' for '--topic-prefix <TOPIC_PREFIX>': the value is empty"),
        "{error}"
    );
    assert_eq!(
        setup.store.count(&ListFilter::default()).unwrap(),
        3,
        "nothing was purged"
    );
}

#[test]
fn missing_store_is_explained() {
    let setup = Setup::new();
    std::fs::remove_file(setup.store.path()).unwrap();
    assert_eq!(
        setup.run(&["list"]),
        Err(format!(
            "no dead-letter store at {} (dead_letters.path in {}); the host creates it when it starts, so check the \
             path or pass --config",
            setup.store_path(),
            setup.config()
        ))
    );
}

#[test]
fn config_problems_are_explained() {
    let setup = Setup::new();
    let config = setup.config();
    std::fs::write(&config, "[mqtt]\nbroker = \"embedded\"\n").unwrap();
    assert_eq!(
        setup.run(&["list"]),
        Err(format!(
            "{config}: key `dead_letters.path` is missing or not a string; add it, for example [dead_letters] \
             path = \"dead-letters.sqlite\""
        ))
    );

    let missing = setup.dir.path().join("missing.toml").display().to_string();
    let error = run(&["eliot", "list", "--config", &missing]).unwrap_err();
    assert!(
        error.starts_with(&format!("cannot read {missing}; pass --config FILE: ")),
        "{error}"
    );
}
