//! The host against a production-like broker. The cases are TLS with a
//! private CA, mutual TLS, certificates that must be rejected (wrong CA,
//! expired, wrong name), username and password with an ACL, MQTT 5 user
//! properties and session expiry, and shared subscriptions across two host
//! processes. Each test starts a Mosquitto configured for its case and makes
//! its certificates with rcgen in a temporary folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use eliot::config::Config;
use eliot::host::Host;
use eliot_tests::process::HostProcess;
use eliot_tests::wait::{read_complete_lines, wait_until};
use eliot_tests::{publish_all, Mosquitto, QoS, TlsListener};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

const ELIOT: &str = env!("CARGO_BIN_EXE_eliot-under-test");

/// How long a test waits for the host to give up on a broker that rejects
/// it: 5 attempts with backoff take a few seconds, far less than this.
const REJECTION_TIMEOUT: Duration = Duration::from_secs(60);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// A private CA and the certificates it signs, as PEM files in `dir`.
struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        let certificate = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), certificate.pem()).unwrap();
        Self { dir: dir.to_owned(), issuer: Issuer::new(params, key) }
    }

    fn ca_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-ca.pem"))
    }

    /// Signs a certificate for `names` (DNS names, or IP addresses), valid
    /// from `not_before` to `not_after`, and writes `FILE.pem` and
    /// `FILE.key`.
    fn sign(&self, file: &str, names: &[&str], validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, file);
        for name in names {
            params.subject_alt_names.push(match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().unwrap()),
            });
        }
        if let Some((not_before, not_after)) = validity {
            params.not_before = not_before;
            params.not_after = not_after;
        }
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        let cert_file = self.dir.join(format!("{file}.pem"));
        let key_file = self.dir.join(format!("{file}.key"));
        std::fs::write(&cert_file, certificate.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }
}

/// A broker whose main listener speaks TLS with a certificate for `names`.
fn tls_broker(pki: &Pki, names: &[&str], validity: Option<(time::OffsetDateTime, time::OffsetDateTime)>, require_certificate: bool) -> Mosquitto {
    let (cert_file, key_file) = pki.sign("broker", names, validity);
    Mosquitto::builder()
        .max_queued_messages(0)
        .tls(TlsListener { ca_file: pki.ca_file("main"), cert_file, key_file, require_certificate })
        .start()
}

/// Writes a host configuration to `dir/eliot.toml`: one pipeline without
/// stages on `devices/+/telemetry` into `out/processed.jsonl`. `mqtt` is
/// added to the `[mqtt]` table (tables such as `[mqtt.tls]` last), and
/// `tail` at the end, for pipeline keys and more sinks.
fn write_config(dir: &Path, broker: &str, client_id: &str, mqtt: &str, sinks: &str, tail: &str) -> PathBuf {
    let text = format!(
        r#"
[mqtt]
broker = "{broker}"
client_id = "{client_id}"
keep_alive_secs = 5
{mqtt}

[runtime]
cache_dir = "cache"
watch = false

[dead_letters]
path = "out/dead-letters.sqlite"

[sinks.file]
type = "file"
path = "out/processed.jsonl"

[pipelines.telemetry]
topics = ["devices/+/telemetry"]
stages = []
sinks = [{sinks}]
{tail}
"#
    );
    let path = dir.join("eliot.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn load(path: &Path) -> Config {
    Config::load(path).unwrap_or_else(|e| panic!("{e}"))
}

/// `count` telemetry messages numbered from `first`, on 20 devices.
fn telemetry(first: usize, count: usize) -> Vec<(String, Vec<u8>)> {
    (first..first + count)
        .map(|n| (format!("devices/d{}/telemetry", n % 20), format!("{{\"n\":{n}}}").into_bytes()))
        .collect()
}

async fn publish(port: u16, messages: Vec<(String, Vec<u8>)>) {
    tokio::task::spawn_blocking(move || publish_all(port, &messages, QoS::AtLeastOnce)).await.unwrap();
}

/// Waits until the file sink has `count` lines.
async fn wait_for_records(output: &Path, count: usize) -> Vec<serde_json::Value> {
    let output = output.to_owned();
    tokio::task::spawn_blocking(move || {
        wait_until(&format!("{count} records in {}", output.display()), DELIVERY_TIMEOUT, || read_complete_lines(&output).len() >= count);
        read_complete_lines(&output).iter().map(|line| serde_json::from_str(line).unwrap()).collect()
    })
    .await
    .unwrap()
}

/// Counts how often each message number occurs in `records`.
fn numbers(records: &[serde_json::Value]) -> BTreeMap<u64, usize> {
    let mut seen = BTreeMap::new();
    for record in records {
        *seen.entry(record["payload"]["n"].as_u64().unwrap()).or_insert(0) += 1;
    }
    seen
}

/// Starts a host and waits until it is connected and subscribed.
async fn start_connected(config: Config) -> Host {
    let mut host = Host::start(config).await.unwrap();
    assert!(host.wait_connected(Duration::from_secs(30)).await, "the host did not connect");
    host
}

/// Starts a host that the broker must reject, and returns the reason the
/// host gave up with.
async fn rejection(config: Config) -> String {
    let host = Host::start(config).await.unwrap();
    let mut escalation = host.supervisor.escalation();
    let reason = tokio::time::timeout(REJECTION_TIMEOUT, escalation.wait_for(Option::is_some))
        .await
        .expect("the host gave up within the timeout")
        .unwrap()
        .clone()
        .unwrap();
    host.shutdown(Duration::from_secs(10)).await;
    reason
}

/// Publishes 100 messages and checks that each arrives exactly once.
async fn assert_delivers(broker: &Mosquitto, output: &Path) {
    publish(broker.plain_port(), telemetry(0, 100)).await;
    let records = wait_for_records(output, 100).await;
    let seen = numbers(&records);
    assert_eq!(records.len(), 100, "no duplicates");
    assert_eq!(seen.len(), 100, "every message once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_private_ca_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "main");
    let broker = tls_broker(&pki, &["127.0.0.1"], None, false);
    let mqtt = format!("[mqtt.tls]\nca_file = \"{}\"", pki.ca_file("main").display());
    let config = load(&write_config(dir.path(), &broker.address(), "eliot-tls", &mqtt, "\"file\"", ""));

    let host = start_connected(config).await;
    assert_delivers(&broker, &dir.path().join("out/processed.jsonl")).await;
    host.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_delivers_and_requires_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "main");
    let broker = tls_broker(&pki, &["127.0.0.1"], None, true);
    let (cert, key) = pki.sign("client", &["eliot-client"], None);

    // Without a client certificate, the broker ends the handshake.
    let mqtt = format!("[mqtt.tls]\nca_file = \"{}\"", pki.ca_file("main").display());
    let config = load(&write_config(dir.path(), &broker.address(), "eliot-mtls", &mqtt, "\"file\"", ""));
    let reason = rejection(config).await;
    assert!(reason.contains(&format!("broker 127.0.0.1:{} ended the TLS handshake with the alert", broker.port())), "{reason}");
    assert!(reason.contains("it may require a client certificate"), "{reason}");

    // Relative paths start at the folder of the configuration file.
    let mqtt = format!("[mqtt.tls]\nca_file = \"main-ca.pem\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"", cert.file_name().unwrap().to_str().unwrap(), key.display());
    let config = load(&write_config(dir.path(), &broker.address(), "eliot-mtls", &mqtt, "\"file\"", ""));
    let host = start_connected(config).await;
    assert_delivers(&broker, &dir.path().join("out/processed.jsonl")).await;
    host.shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "main");
    let _other = Pki::new(dir.path(), "other");
    let broker = tls_broker(&pki, &["127.0.0.1"], None, false);
    let other_ca = dir.path().join("other-ca.pem");
    let mqtt = format!("[mqtt.tls]\nca_file = \"{}\"", other_ca.display());
    let config = load(&write_config(dir.path(), &broker.address(), "eliot-wrong-ca", &mqtt, "\"file\"", ""));

    let reason = rejection(config).await;
    let ca = std::path::absolute(&other_ca).unwrap();
    assert!(
        reason.contains(&format!("the certificate of broker 127.0.0.1:{} is not signed by a CA in mqtt.tls.ca_file ({})", broker.port(), ca.display())),
        "{reason}"
    );
    assert!(reason.contains("set mqtt.tls.ca_file to the CA that signed the broker's certificate"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "main");
    let validity = (rcgen::date_time_ymd(2020, 1, 1), rcgen::date_time_ymd(2021, 1, 1));
    let broker = tls_broker(&pki, &["127.0.0.1"], Some(validity), false);
    let mqtt = format!("[mqtt.tls]\nca_file = \"{}\"", pki.ca_file("main").display());
    let config = load(&write_config(dir.path(), &broker.address(), "eliot-expired", &mqtt, "\"file\"", ""));

    let reason = rejection(config).await;
    assert!(reason.contains(&format!("the certificate of broker 127.0.0.1:{} has expired", broker.port())), "{reason}");
    assert!(reason.contains("renew the broker's certificate"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_name_mismatch_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "main");
    let broker = tls_broker(&pki, &["broker.test"], None, false);
    let ca = pki.ca_file("main");
    let mqtt = format!("[mqtt.tls]\nca_file = \"{}\"", ca.display());
    let config = load(&write_config(dir.path(), &broker.address(), "eliot-mismatch", &mqtt, "\"file\"", ""));

    let reason = rejection(config).await;
    assert!(
        reason.contains(&format!("the certificate of broker 127.0.0.1:{} is not valid for the name \"127.0.0.1\"", broker.port())),
        "{reason}"
    );
    assert!(reason.contains("set mqtt.tls.server_name to it"), "{reason}");

    // The name the certificate holds, set as server_name, is accepted.
    let mqtt = format!("[mqtt.tls]\nca_file = \"{}\"\nserver_name = \"broker.test\"", ca.display());
    let config = load(&write_config(dir.path(), &broker.address(), "eliot-mismatch", &mqtt, "\"file\"", ""));
    let host = start_connected(config).await;
    assert_delivers(&broker, &dir.path().join("out/processed.jsonl")).await;
    host.shutdown(Duration::from_secs(10)).await;
}

/// Starts a broker that takes user `eliot` with password `right-password`, which
/// may read `devices/#` and write `allowed/#`, and user `device` (password
/// `device`), which may write `devices/#` and read `allowed/#`.
fn auth_broker(dir: &Path) -> Mosquitto {
    let passwords = dir.join("passwords");
    for (user, password, create) in [("eliot", "right-password", true), ("device", "device", false)] {
        let mut command = std::process::Command::new("mosquitto_passwd");
        if create {
            command.arg("-c");
        }
        let status = command.arg("-b").arg(&passwords).args([user, password]).status().expect("run mosquitto_passwd");
        assert!(status.success());
    }
    let acl = dir.join("acl");
    let rules = "user eliot\ntopic read devices/#\ntopic write allowed/#\n\nuser device\ntopic write devices/#\ntopic read allowed/#\n";
    std::fs::write(&acl, rules).unwrap();
    Mosquitto::builder()
        .allow_anonymous(false)
        .config_line(format!("password_file {}", passwords.display()))
        .config_line(format!("acl_file {}", acl.display()))
        .start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_stop_host_after_retries() {
    let dir = tempfile::tempdir().unwrap();
    let broker = auth_broker(dir.path());
    let mqtt = "username = \"eliot\"\npassword = \"wrong-password\"";
    let config = write_config(dir.path(), &broker.address(), "eliot-bad-password", mqtt, "\"file\"", "");

    // The binary, for the exit status and the log an operator reads.
    let log = dir.path().join("eliot.log");
    let mut child = std::process::Command::new(ELIOT)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until("the host exits", REJECTION_TIMEOUT, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let status = status.unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "the host exits non-zero; log:\n{log}");
    let refused = format!("broker 127.0.0.1:{} refused the connection (", broker.port());
    assert!(log.contains(&refused), "log:\n{log}");
    assert!(log.contains("check mqtt.username and mqtt.password against the broker's password file") || log.contains("not authorised"), "log:\n{log}");
    // Four retries, then the fifth rejection stops the host.
    assert_eq!(log.matches("broker rejected the connection").count(), 4, "log:\n{log}");
    assert_eq!(log.matches("the broker rejected every attempt; giving up").count(), 1, "log:\n{log}");
    assert!(log.contains("stopped by the supervisor"), "log:\n{log}");
    assert!(!log.contains("wrong-password"), "the password never appears in the log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_client_is_not_authorised() {
    let dir = tempfile::tempdir().unwrap();
    let broker = auth_broker(dir.path());
    let config = load(&write_config(dir.path(), &broker.address(), "eliot-anonymous", "", "\"file\"", ""));

    let reason = rejection(config).await;
    assert!(reason.contains(&format!("broker 127.0.0.1:{} refused the connection (not authorised)", broker.port())), "{reason}");
    assert!(reason.contains("set mqtt.username and mqtt.password if it requires them"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_limits_reads_and_republishes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = auth_broker(dir.path());
    // MQTT 5, so that the broker reports a refused publish in its PUBACK;
    // on 3.1.1 Mosquitto acknowledges it and drops it silently.
    let mqtt = "protocol = \"5\"\nusername = \"eliot\"\npassword = \"right-password\"";
    let sinks = "\"file\", \"republish\"";
    let tail = "\n[sinks.republish]\ntype = \"mqtt\"\ntopic = \"forbidden/{pipeline}\"\n";
    let config = load(&write_config(dir.path(), &broker.address(), "eliot-acl", mqtt, sinks, tail));
    let host = start_connected(config).await;

    publish_v5(broker.port(), Some(("device", "device")), telemetry(0, 10), Vec::new()).await;
    let dead_letters_path = dir.path().join("out/dead-letters.sqlite");
    let path = dead_letters_path.clone();
    let letters = tokio::task::spawn_blocking(move || {
        wait_until("10 dead letters", DELIVERY_TIMEOUT, || eliot_tests::dead_letters::read_all(&path).len() >= 10);
        eliot_tests::dead_letters::read_all(&path)
    })
    .await
    .unwrap();
    let stats = host.snapshot()["telemetry"];
    host.shutdown(Duration::from_secs(10)).await;

    assert_eq!(letters.len(), 10);
    assert_eq!(stats.received, 10);
    assert_eq!(stats.dead_lettered, 10);
    assert_eq!(stats.delivered, 0);
    for letter in &letters {
        assert_eq!(letter["stage"], "sink:republish", "{letter}");
        let reason = letter["reason"].as_str().unwrap();
        assert!(
            reason.contains("the broker refused the republish to \"forbidden/telemetry\" with reason NotAuthorized; allow this client to publish there in the broker's ACL"),
            "{reason}"
        );
    }
    // The user may read devices/#, so every message came in; the file sink
    // wrote them before the republish failed, which at-least-once allows.
    assert_eq!(numbers(&read_complete_lines(dir.path().join("out/processed.jsonl")).iter().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<_>>()).len(), 10);

    // With a topic the ACL allows, replay delivers them over the same
    // credentials and MQTT 5, user properties included.
    let path = dir.path().join("eliot.toml");
    let text = std::fs::read_to_string(&path).unwrap().replace("forbidden/{pipeline}", "allowed/{pipeline}");
    std::fs::write(&path, text).unwrap();
    let (subscriber, received) = subscribe_v5(broker.port(), Some(("device", "device")), "allowed/#").await;
    let output = std::process::Command::new(ELIOT).args(["dead-letters", "replay", "--all", "--config"]).arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("replay finished: 10 delivered, 0 dropped, 0 failed again"), "{stdout}");
    let replayed = received_within(&received, 10).await;
    subscriber.abort();
    assert_eq!(replayed.len(), 10);
    for (topic, _user_properties, content_type) in &replayed {
        assert_eq!(topic, "allowed/telemetry");
        assert_eq!(content_type.as_deref(), Some("application/json"));
    }
    assert_eq!(eliot_tests::dead_letters::read_all(&dead_letters_path).len(), 0);
}

/// A republish topic with a character that brokers refuse (Mosquitto
/// closes the connection) is dead-lettered before any sink writes the
/// message: the file sink holds only what was delivered, and the republish
/// connection is not closed by the broker over and over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_character_topic_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let tail = "\n[sinks.republish]\ntype = \"mqtt\"\ntopic = \"processed/{payload.device}\"\n";
    let config = load(&write_config(dir.path(), &broker.address(), "eliot-refused", "", "\"file\", \"republish\"", tail));
    let host = start_connected(config).await;
    let messages: Vec<(String, Vec<u8>)> = [r#"{"n":0,"device":"ok"}"#, r#"{"n":1,"device":"bad\nline"}"#, r#"{"n":2,"device":"bell\u0007"}"#, r#"{"n":3,"device":"ok"}"#]
        .iter()
        .map(|payload| ("devices/d1/telemetry".to_owned(), payload.as_bytes().to_vec()))
        .collect();
    publish(broker.port(), messages).await;

    let deadline = std::time::Instant::now() + DELIVERY_TIMEOUT;
    let stats = loop {
        let stats = host.snapshot()["telemetry"];
        if stats.delivered + stats.dead_lettered == 4 {
            break stats;
        }
        assert!(std::time::Instant::now() < deadline, "{stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    host.shutdown(Duration::from_secs(10)).await;
    assert_eq!((stats.received, stats.delivered, stats.dead_lettered), (4, 2, 2));
    let letters = eliot_tests::dead_letters::read_all(dir.path().join("out/dead-letters.sqlite"));
    assert_eq!(letters.len(), 2);
    for (letter, refused) in letters.iter().zip(["'\\n'", "'\\u{7}'"]) {
        assert_eq!(letter["stage"], "sink:republish", "{letter}");
        assert_eq!(letter["kind"], "sink", "{letter}");
        let reason = letter["reason"].as_str().unwrap();
        assert!(reason.contains(&format!("contains the character {refused}, which MQTT brokers refuse")), "{reason}");
    }
    let records: Vec<serde_json::Value> =
        read_complete_lines(dir.path().join("out/processed.jsonl")).iter().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(numbers(&records).into_keys().collect::<Vec<_>>(), vec![0, 3], "only the delivered messages are in the file");
}

/// Publishes one retained QoS 1 message and waits for its PUBACK.
async fn publish_retained(port: u16, topic: &str, payload: &[u8]) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet};

    let (client, mut eventloop) = AsyncClient::new(MqttOptions::new(format!("retainer-{}", std::process::id()), "127.0.0.1", port), 10);
    client.publish(topic, QoS::AtLeastOnce, true, payload.to_vec()).await.unwrap();
    tokio::time::timeout(DELIVERY_TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("the retained publish failed: {e}"),
            }
        }
    })
    .await
    .expect("the retained publish acknowledged in time");
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
}

/// A retained message is processed once on MQTT 5, not again after each
/// reconnect. The host subscribes with Retain Handling 1, so the broker
/// sends retained messages only for a new subscription, and the kept
/// session's one is not new. MQTT 3.1.1 has no such option, so there the
/// broker sends it again with the renewed subscription, and it is
/// processed twice (at least once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_once_on_mqtt5() {
    for (protocol, expected) in [("5", 2), ("3.1.1", 3)] {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Mosquitto::builder().persistence(true).verbose_log(true).start();
        let client_id = format!("eliot-retained-{}", protocol.replace('.', ""));
        let mqtt = format!("protocol = \"{protocol}\"");
        let config = load(&write_config(dir.path(), &broker.address(), &client_id, &mqtt, "\"file\"", ""));
        let host = start_connected(config).await;
        let output = dir.path().join("out/processed.jsonl");
        let topic = "devices/d0/telemetry";
        publish_retained(broker.port(), topic, br#"{"n":0}"#).await;
        wait_for_records(&output, 1).await;

        // The restarted broker has the host's session; the host connects
        // again and renews its subscription.
        broker.restart();
        let suback = format!("Sending SUBACK to {client_id}");
        let deadline = std::time::Instant::now() + DELIVERY_TIMEOUT;
        while broker.log().matches(&suback).count() < 2 {
            assert!(std::time::Instant::now() < deadline, "the host did not subscribe again:\n{}", broker.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // After the SUBACK, on the same topic, so the same worker: a
        // retained copy sent with the subscription comes before it.
        publish(broker.port(), vec![(topic.to_owned(), br#"{"n":1}"#.to_vec())]).await;
        let output_path = output.clone();
        let records = tokio::task::spawn_blocking(move || {
            wait_until("the message after the reconnect", DELIVERY_TIMEOUT, || {
                read_complete_lines(&output_path).iter().any(|line| line.contains(r#""n":1"#))
            });
            read_complete_lines(&output_path)
        })
        .await
        .unwrap();
        host.shutdown(Duration::from_secs(10)).await;
        assert_eq!(records.len(), expected, "MQTT {protocol}: {records:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_user_properties_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    // One republish at QoS 1 (confirmed by PUBACK) and one at QoS 2
    // (confirmed by PUBCOMP).
    let sinks = "\"file\", \"republish\", \"republish-qos2\"";
    let tail = "\n[sinks.republish]\ntype = \"mqtt\"\ntopic = \"processed/{header.site}\"\n\n[sinks.republish-qos2]\ntype = \"mqtt\"\ntopic = \"processed/{header.site}/qos2\"\nqos = 2\n";
    let config = load(&write_config(dir.path(), &broker.address(), "eliot-v5", "protocol = \"5\"", sinks, tail));
    let host = start_connected(config).await;
    let (subscriber, received) = subscribe_v5(broker.port(), None, "processed/#").await;

    let properties = vec![
        ("site".to_owned(), "north".to_owned()),
        ("trace".to_owned(), "a1".to_owned()),
        // Names may repeat in MQTT 5, and the order is kept.
        ("trace".to_owned(), "b2".to_owned()),
    ];
    publish_v5(broker.port(), None, telemetry(0, 20), properties.clone()).await;
    let records = wait_for_records(&dir.path().join("out/processed.jsonl"), 20).await;
    let republished = received_within(&received, 40).await;
    host.shutdown(Duration::from_secs(10)).await;
    subscriber.abort();

    let mut headers: Vec<serde_json::Value> = properties.iter().map(|(k, v)| serde_json::json!([k, v])).collect();
    headers.push(serde_json::json!(["mqtt-content-type", "application/json"]));
    assert_eq!(records.len(), 20);
    for record in &records {
        assert_eq!(record["headers"], serde_json::Value::Array(headers.clone()), "{record}");
    }
    assert_eq!(republished.len(), 40);
    assert_eq!(republished.iter().filter(|(topic, _, _)| topic == "processed/north").count(), 20);
    assert_eq!(republished.iter().filter(|(topic, _, _)| topic == "processed/north/qos2").count(), 20);
    for (_topic, user_properties, content_type) in &republished {
        assert_eq!(user_properties, &properties);
        assert_eq!(content_type.as_deref(), Some("application/json"));
    }
}

type Republished = (String, Vec<(String, String)>, Option<String>);

/// Subscribes over MQTT 5 and collects topic, user properties and content
/// type of every message, until the returned task is aborted.
async fn subscribe_v5(port: u16, credentials: Option<(&str, &str)>, filter: &str) -> (tokio::task::JoinHandle<()>, std::sync::Arc<std::sync::Mutex<Vec<Republished>>>) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let mut options = MqttOptions::new("v5-subscriber", "127.0.0.1", port);
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    client.subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce).await.unwrap();
    loop {
        match tokio::time::timeout(DELIVERY_TIMEOUT, eventloop.poll()).await.expect("SUBACK in time") {
            Ok(Event::Incoming(Packet::SubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("subscriber connection failed: {e}"),
        }
    }
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = received.clone();
    let task = tokio::spawn(async move {
        let _client = client;
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(publish)) = event {
                let properties = publish.properties.unwrap_or_default();
                sink.lock().unwrap().push((String::from_utf8(publish.topic.to_vec()).unwrap(), properties.user_properties, properties.content_type));
            }
        }
    });
    (task, received)
}

async fn received_within(received: &std::sync::Mutex<Vec<Republished>>, count: usize) -> Vec<Republished> {
    let deadline = tokio::time::Instant::now() + DELIVERY_TIMEOUT;
    while received.lock().unwrap().len() < count {
        assert!(tokio::time::Instant::now() < deadline, "{} of {count} republished messages arrived", received.lock().unwrap().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    received.lock().unwrap().clone()
}

/// Publishes `messages` over MQTT 5 at QoS 1, each with `properties` as
/// user properties and a JSON content type, and waits for every PUBACK.
async fn publish_v5(port: u16, credentials: Option<(&str, &str)>, messages: Vec<(String, Vec<u8>)>, properties: Vec<(String, String)>) {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};

    let mut options = MqttOptions::new(format!("publisher-{}", std::process::id()), "127.0.0.1", port);
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let total = messages.len();
    let send = async {
        for (topic, payload) in messages {
            let properties = PublishProperties {
                user_properties: properties.clone(),
                content_type: Some("application/json".to_owned()),
                ..Default::default()
            };
            client.publish_with_properties(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, payload, properties).await.unwrap();
        }
    };
    let acks = async {
        let mut acknowledged = 0;
        while acknowledged < total {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acknowledged += 1,
                Ok(_) => {}
                Err(e) => panic!("publisher connection failed after {acknowledged} of {total} acks: {e}"),
            }
        }
    };
    tokio::time::timeout(DELIVERY_TIMEOUT, async { tokio::join!(send, acks) }).await.expect("every publish acknowledged in time");
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_session_expiry_is_sent() {
    let root = tempfile::tempdir().unwrap();
    // $SYS topics once a second, for the count of expired sessions.
    let broker = Mosquitto::builder().max_queued_messages(0).config_line("sys_interval 1").start();

    // A long expiry keeps the session while the host is down: what was
    // published meanwhile arrives after the restart.
    let dir = root.path().join("long");
    std::fs::create_dir(&dir).unwrap();
    let path = write_config(&dir, &broker.address(), "eliot-expiry-long", "protocol = \"5\"\nsession_expiry_secs = 3600", "\"file\"", "");
    start_connected(load(&path)).await.shutdown(Duration::from_secs(10)).await;
    publish(broker.port(), telemetry(0, 50)).await;
    let host = start_connected(load(&path)).await;
    let records = wait_for_records(&dir.join("out/processed.jsonl"), 50).await;
    host.shutdown(Duration::from_secs(10)).await;
    assert_eq!(records.len(), 50);
    assert_eq!(numbers(&records).len(), 50);

    // A one-second expiry ends the session soon after the host left.
    let dir = root.path().join("short");
    std::fs::create_dir(&dir).unwrap();
    let path = write_config(&dir, &broker.address(), "eliot-expiry-short", "protocol = \"5\"\nsession_expiry_secs = 1", "\"file\"", "");
    start_connected(load(&path)).await.shutdown(Duration::from_secs(10)).await;
    let port = broker.port();
    tokio::task::spawn_blocking(move || {
        let expired = eliot_tests::Subscriber::connect(port, "$SYS/broker/clients/expired", QoS::AtMostOnce);
        expired.collect_until(DELIVERY_TIMEOUT, |m| m.payload_str().trim().parse::<u64>().unwrap_or(0) >= 1);
    })
    .await
    .unwrap();
    // Published with no session to queue them in, so they reach no one.
    publish(broker.port(), telemetry(100, 50)).await;
    let host = start_connected(load(&path)).await;
    publish(broker.port(), telemetry(200, 10)).await;
    let records = wait_for_records(&dir.join("out/processed.jsonl"), 10).await;
    host.shutdown(Duration::from_secs(10)).await;
    let seen = numbers(&records);
    assert_eq!(records.len(), 10, "only the messages published after the new session began");
    assert!(seen.keys().all(|n| (200..210).contains(n)), "{seen:?}");
}

/// Counts the records of one file sink: copies per message number, and
/// torn lines (a write cut by SIGKILL).
fn tally(path: &Path) -> (BTreeMap<u64, usize>, usize) {
    let mut seen = BTreeMap::new();
    let mut torn = 0;
    for line in read_complete_lines(path) {
        match serde_json::from_str::<serde_json::Value>(&line).ok().and_then(|r| r["payload"]["n"].as_u64()) {
            Some(n) => *seen.entry(n).or_insert(0) += 1,
            None => torn += 1,
        }
    }
    (seen, torn)
}

fn copies(seen: &BTreeMap<u64, usize>) -> usize {
    seen.values().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_splits_and_survives_kill() {
    let root = tempfile::tempdir().unwrap();
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let mut configs = Vec::new();
    for name in ["a", "b"] {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        configs.push(write_config(&dir, &broker.address(), &format!("eliot-shared-{name}"), "", "\"file\"", "share_group = \"eliot\""));
    }
    let outputs: Vec<PathBuf> = ["a", "b"].iter().map(|name| root.path().join(name).join("out/processed.jsonl")).collect();
    let start = |index: usize, run: &str| {
        let mut host = HostProcess::start(Path::new(ELIOT), &configs[index], &root.path().join(format!("host-{index}-{run}.log")));
        host.wait_for_log("subscribed", Duration::from_secs(60));
        host
    };
    let mut host_a = start(0, "first");
    let mut host_b = start(1, "first");

    // Split: 10,000 messages, each in exactly one of the two sinks.
    publish(broker.port(), telemetry(0, 10_000)).await;
    let (a, b) = (outputs[0].clone(), outputs[1].clone());
    tokio::task::spawn_blocking(move || {
        wait_until("10,000 records in the two sinks", Duration::from_secs(180), || read_complete_lines(&a).len() + read_complete_lines(&b).len() >= 10_000)
    })
    .await
    .unwrap();
    let (seen_a, torn_a) = tally(&outputs[0]);
    let (seen_b, torn_b) = tally(&outputs[1]);
    assert_eq!((torn_a, torn_b), (0, 0));
    assert!(copies(&seen_a) > 0, "host a took a share");
    assert!(copies(&seen_b) > 0, "host b took a share");
    assert_eq!(copies(&seen_a) + copies(&seen_b), 10_000, "no message doubled");
    let mut union = seen_a.clone();
    for (n, count) in &seen_b {
        *union.entry(*n).or_insert(0) += count;
    }
    assert_eq!(union.len(), 10_000, "no message lost");
    println!("split: host a {} messages, host b {}", copies(&seen_a), copies(&seen_b));

    // Kill host b in the middle of the next 10,000.
    let port = broker.port();
    let publisher = tokio::task::spawn_blocking(move || publish_all(port, &telemetry(10_000, 10_000), QoS::AtLeastOnce));
    let (a, b) = (outputs[0].clone(), outputs[1].clone());
    let b_before = copies(&seen_b);
    tokio::task::spawn_blocking(move || {
        wait_until("host b is mid-stream", Duration::from_secs(180), || {
            let b_now = read_complete_lines(&b).len();
            read_complete_lines(&a).len() + b_now >= 12_000 && b_now > b_before
        })
    })
    .await
    .unwrap();
    host_b.kill_9();
    let a_at_kill = read_complete_lines(&outputs[0]).len();
    publisher.await.unwrap();

    // Host a carries on alone.
    let a = outputs[0].clone();
    tokio::task::spawn_blocking(move || {
        wait_until("host a takes 1,000 more after the kill", Duration::from_secs(180), || read_complete_lines(&a).len() >= a_at_kill + 1_000)
    })
    .await
    .unwrap();

    // Mosquitto 2.0 keeps a killed member's persistent session in the
    // group: it keeps that member's unacknowledged messages, and goes on
    // assigning it a share of new ones, until the member returns (as
    // systemd or Kubernetes restart it). So host b comes back, and then
    // every message must be in a sink.
    let mut host_b = start(1, "second");
    let (a, b) = (outputs[0].clone(), outputs[1].clone());
    tokio::task::spawn_blocking(move || {
        wait_until("all 20,000 messages in the sinks", Duration::from_secs(180), || {
            let (seen_a, _) = tally(&a);
            let (seen_b, _) = tally(&b);
            seen_a.keys().chain(seen_b.keys()).collect::<std::collections::BTreeSet<_>>().len() >= 20_000
        })
    })
    .await
    .unwrap();
    assert!(host_a.terminate(Duration::from_secs(30)).success());
    assert!(host_b.terminate(Duration::from_secs(30)).success());

    let (seen_a, torn_a) = tally(&outputs[0]);
    let (seen_b, torn_b) = tally(&outputs[1]);
    let mut union = seen_a.clone();
    for (n, count) in &seen_b {
        *union.entry(*n).or_insert(0) += count;
    }
    let total = copies(&seen_a) + copies(&seen_b);
    assert_eq!(union.len(), 20_000, "0 lost");
    assert!(union.keys().all(|n| *n < 20_000));
    println!(
        "kill: host a {} records ({} after the kill), host b {}; {} duplicates (redelivered after SIGKILL), {} torn lines",
        copies(&seen_a),
        copies(&seen_a) - a_at_kill.min(copies(&seen_a)),
        copies(&seen_b),
        total - union.len(),
        torn_a + torn_b
    );
}
