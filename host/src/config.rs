//! The TOML configuration: its schema, loading and validation.
//!
//! Every error names the file, the key path and what is expected, because the
//! person reading it has the file open and nothing else.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::device::DeviceKey;
use crate::layers::{Layers, Origin, Origins};
use crate::topic::{self, TopicFilter};

/// A problem with the configuration, tied to one key of one layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file or the environment variable that set the key.
    pub origin: Origin,
    /// Dotted key path, for example `pipelines.telemetry.stages`.
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: key `{}`: {}; {}",
            self.origin, self.key, self.problem, self.fix
        )
    }
}

/// Every problem found in the configuration layers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.0.len();
        write!(
            f,
            "invalid configuration ({count} problem{}):",
            if count == 1 { "" } else { "s" }
        )?;
        for error in &self.0 {
            write!(f, "\n  {error}")?;
        }
        Ok(())
    }
}

/// The configuration file as written, before paths are resolved.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    mqtt: MqttConfig,
    #[serde(default)]
    embedded_broker: EmbeddedBrokerConfig,
    #[serde(default)]
    runtime: RawRuntimeConfig,
    dead_letters: RawDeadLetterConfig,
    #[serde(default)]
    plugins: BTreeMap<String, RawPluginConfig>,
    pipelines: BTreeMap<String, RawPipelineConfig>,
    #[serde(default)]
    sinks: BTreeMap<String, RawSinkConfig>,
    #[serde(default)]
    log: LogConfig,
    /// Absent: no admin server. An HTTP port is something an operator opens
    /// on purpose, so it is never on by default.
    admin: Option<RawAdminConfig>,
    #[serde(default)]
    devices: RawDevicesConfig,
}

/// The log settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
}

/// The log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event, for a terminal.
    #[default]
    Text,
    /// One JSON object per line, for a log collector.
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdminConfig {
    #[serde(default = "default_admin_listen")]
    listen: String,
    #[serde(default = "default_admin_token_env")]
    token_env: String,
}

fn default_admin_listen() -> String {
    "127.0.0.1:9464".to_owned()
}

fn default_admin_token_env() -> String {
    "ELIOT_ADMIN_TOKEN".to_owned()
}

/// The admin HTTP server: health, metrics and the JSON API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address to listen on; port 0 picks a free port, which is logged.
    pub listen: std::net::SocketAddr,
    /// Environment variable that contains the bearer token of the mutating
    /// endpoints. The token itself never appears in the config or the log.
    pub token_env: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevicesConfig {
    status_topic: Option<String>,
    max_tracked: Option<usize>,
}

/// Device settings: the status subscription, which reports whether a
/// device is online, and the size of the device registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicesConfig {
    /// Filter of the topics on which devices publish `online` and `offline`
    /// (typically retained, with `offline` as their MQTT will). `None`: no
    /// status subscription, and a device's online state stays unknown.
    pub status_topic: Option<TopicFilter>,
    /// Devices the registry keeps at most; past it, the least recently
    /// seen tenth is forgotten.
    pub max_tracked: usize,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        Self {
            status_topic: None,
            max_tracked: crate::fleet::DEFAULT_MAX_DEVICES,
        }
    }
}

/// The broker connection.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `"embedded"`, or `host:port` of an external broker.
    pub broker: String,
    pub client_id: String,
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    /// Largest packet the client accepts or sends, in bytes.
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// MQTT version spoken to the broker.
    #[serde(default)]
    pub protocol: Protocol,
    /// MQTT 5 only: how long the broker keeps the session (subscriptions
    /// and unacknowledged messages) after the host disconnects, in seconds.
    /// `None` sends the maximum, which MQTT 5 defines as "never expires"
    /// and is what a 3.1.1 persistent session does.
    pub session_expiry_secs: Option<u32>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// TLS to the broker; absent means plain TCP.
    pub tls: Option<TlsConfig>,
}

/// The MQTT protocol version of the broker connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

/// Port of MQTT over TLS when `mqtt.broker` names none (IANA's
/// "secure-mqtt").
pub const TLS_PORT: u16 = 8883;

impl MqttConfig {
    /// Returns host and port of an external broker, with [`TLS_PORT`] when TLS is
    /// on and `broker` has no port. `None` for `"embedded"` and for an
    /// address without a port on plain TCP, which validation rejects.
    pub fn address(&self) -> Option<(String, u16)> {
        if self.broker == "embedded" {
            return None;
        }
        crate::broker::parse_address(&self.broker).or_else(|| {
            let host = self.broker.trim_start_matches('[').trim_end_matches(']');
            let bare = !host.is_empty() && (!host.contains(':') || self.broker.starts_with('['));
            (self.tls.is_some() && bare).then(|| (host.to_owned(), TLS_PORT))
        })
    }
}

/// A secret from the configuration. Its `Debug` and `Display` print `***`,
/// so that it can appear in no log line and no error text by accident.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Returns the secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// `[mqtt.tls]`: the broker's CA and, for mutual TLS, the client's
/// certificate and key, all PEM files. Relative paths are resolved against
/// the folder of the configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificates that may sign the broker's certificate; absent means
    /// the operating system's trusted roots.
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// Name checked against the broker's certificate instead of the host of
    /// `mqtt.broker`, for a broker reached by an address its certificate
    /// does not name.
    pub server_name: Option<String>,
}

/// Smallest `mqtt.max_packet_bytes` accepted: below it not even a CONNECT
/// with a long client id fits.
const MIN_PACKET_BYTES: usize = 1024;
/// Largest payload MQTT can carry.
pub const MQTT_MAX_PAYLOAD: usize = 268_435_455;

/// Largest MQTT string in bytes (client id, topic, topic filter): its
/// length is a two-byte prefix.
pub const MQTT_MAX_STRING_BYTES: usize = 65_535;
/// Maximum workers per pipeline. Far more workers than cores only costs
/// memory.
const MAX_WORKERS: usize = 1024;

fn default_keep_alive_secs() -> u64 {
    30
}

fn default_max_packet_bytes() -> usize {
    1024 * 1024
}

/// The broker that Eliot can run inside its own process.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedBrokerConfig {
    /// Loopback address to listen on; port 0 picks a free port.
    #[serde(default = "default_embedded_listen")]
    pub listen: String,
}

impl Default for EmbeddedBrokerConfig {
    fn default() -> Self {
        Self {
            listen: default_embedded_listen(),
        }
    }
}

fn default_embedded_listen() -> String {
    "127.0.0.1:0".to_owned()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntimeConfig {
    plugin_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    watch: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeadLetterConfig {
    path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPluginConfig {
    file: PathBuf,
    #[serde(default)]
    config: toml::Table,
    #[serde(default)]
    limits: PluginLimits,
    #[serde(default)]
    breaker: StageBreakerConfig,
    #[serde(default)]
    grants: Grants,
    #[serde(default = "default_max_retries")]
    max_retries: usize,
}

fn default_max_retries() -> usize {
    3
}

/// When a stage's circuit breaker opens and what happens to messages then.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageBreakerConfig {
    /// Consecutive failed calls (traps, timeouts, transient errors after
    /// their retries) that open the breaker. `invalid` errors do not count:
    /// they are the message's fault, not the plugin's.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// How long the breaker stays open before one trial call, in ms.
    #[serde(default = "default_cool_down_ms")]
    pub cool_down_ms: u64,
    #[serde(default)]
    pub on_open: OpenPolicy,
}

impl Default for StageBreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: default_failure_threshold(),
            cool_down_ms: default_cool_down_ms(),
            on_open: OpenPolicy::default(),
        }
    }
}

/// What a pipeline does with a message while a stage's breaker is open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpenPolicy {
    /// Store the message as a dead letter without calling the stage.
    #[default]
    DeadLetter,
    /// Pass the message on unchanged, as if the stage were not there.
    Skip,
    /// Hold the message (and so the worker and, through backpressure, the
    /// source) until the cool-down ends, then try again.
    Pause,
}

/// A sink's circuit breaker. While it is open the sink is not called, the
/// pipeline holds its messages, and nothing is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkBreakerConfig {
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    #[serde(default = "default_cool_down_ms")]
    pub cool_down_ms: u64,
}

impl Default for SinkBreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: default_failure_threshold(),
            cool_down_ms: default_cool_down_ms(),
        }
    }
}

fn default_failure_threshold() -> u32 {
    5
}

fn default_cool_down_ms() -> u64 {
    5000
}

/// Capabilities a plugin gets beyond the default of none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Names of host environment variables the plugin may read.
    #[serde(default)]
    pub env: Vec<String>,
    /// Host folders the plugin may read, mounted read-only.
    #[serde(default)]
    pub read_dirs: Vec<DirGrant>,
    /// Outgoing TCP and UDP sockets and name lookups.
    #[serde(default)]
    pub network: bool,
}

/// One host folder visible to a plugin under `guest`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirGrant {
    pub host: PathBuf,
    pub guest: String,
}

/// Sandbox limits of one plugin instance.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    /// Maximum linear memory of one instance, in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Time one call may take before it is interrupted, in milliseconds.
    #[serde(default = "default_call_budget_ms")]
    pub call_budget_ms: u64,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory_mib: default_memory_mib(),
            call_budget_ms: default_call_budget_ms(),
        }
    }
}

fn default_memory_mib() -> u64 {
    64
}

/// The budget is wall-clock time, so it also runs while the worker thread
/// waits for a core. One second is far beyond a normal call (microseconds)
/// even on a starved machine, yet stops an endless loop quickly.
fn default_call_budget_ms() -> u64 {
    1000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipelineConfig {
    topics: Vec<String>,
    #[serde(default = "default_qos")]
    qos: u8,
    #[serde(default = "default_workers")]
    workers: usize,
    stages: Vec<String>,
    sinks: Vec<String>,
    device_key: Option<RawDeviceKey>,
    share_group: Option<String>,
}

/// `device_key = { topic = "devices/{device_id}/telemetry" }` or
/// `device_key = { payload = "device_id" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeviceKey {
    topic: Option<String>,
    payload: Option<String>,
}

fn default_qos() -> u8 {
    1
}

fn default_workers() -> usize {
    2
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum RawSinkConfig {
    File {
        path: PathBuf,
        #[serde(default)]
        breaker: SinkBreakerConfig,
    },
    Mqtt {
        topic: String,
        #[serde(default = "default_qos")]
        qos: u8,
        #[serde(default)]
        retain: bool,
        #[serde(default)]
        breaker: SinkBreakerConfig,
    },
}

/// A validated configuration with every path resolved against the folder of
/// the file it came from.
#[derive(Debug, Clone)]
pub struct Config {
    /// The base file, absolute.
    pub file: PathBuf,
    /// The overlay applied over the base file, absolute.
    pub overlay: Option<PathBuf>,
    /// The layers applied, kept so that a reload applies the same ones.
    pub layers: Layers,
    pub mqtt: MqttConfig,
    pub embedded_broker: EmbeddedBrokerConfig,
    pub plugin_dir: PathBuf,
    /// Folder of wasmtime's compiled-component cache.
    pub cache_dir: PathBuf,
    /// Whether `run` reloads changed plugin files and this file.
    pub watch: bool,
    pub dead_letter_path: PathBuf,
    pub plugins: BTreeMap<String, PluginConfig>,
    pub pipelines: BTreeMap<String, PipelineConfig>,
    pub sinks: BTreeMap<String, SinkConfig>,
    pub log: LogConfig,
    pub admin: Option<AdminConfig>,
    pub devices: DevicesConfig,
}

/// One plugin: its component file and the config table it is given.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    pub name: String,
    pub path: PathBuf,
    /// The plugin's own table, passed to its `init` as a JSON object.
    pub config: serde_json::Value,
    pub limits: PluginLimits,
    pub breaker: StageBreakerConfig,
    pub grants: Grants,
    /// Retries of a transient error before the message is dead-lettered.
    pub max_retries: usize,
}

/// One pipeline: what it subscribes to, its stages in order and its sinks.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub name: String,
    pub topics: Vec<TopicFilter>,
    pub qos: rumqttc::QoS,
    pub workers: usize,
    pub stages: Vec<String>,
    pub sinks: Vec<String>,
    /// The source of a message's device id. Messages of one device stay in
    /// order on one worker.
    pub device_key: DeviceKey,
    /// Shared-subscription group: the pipeline subscribes to
    /// `$share/GROUP/FILTER`, so that the broker splits the messages among
    /// every client in the group.
    pub share_group: Option<String>,
}

impl PipelineConfig {
    /// Returns the filters as subscribed: `$share/GROUP/FILTER` in a share
    /// group, the plain filter otherwise. Incoming topics are matched against the
    /// plain filters in [`PipelineConfig::topics`].
    pub fn subscriptions(&self) -> impl Iterator<Item = String> + '_ {
        self.topics.iter().map(|filter| match &self.share_group {
            Some(group) => format!("$share/{group}/{}", filter.as_str()),
            None => filter.as_str().to_owned(),
        })
    }
}

/// Where a pipeline's results go, and the sink's breaker.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    pub kind: SinkKind,
    pub breaker: SinkBreakerConfig,
}

/// The kinds of sink.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    /// Append one JSON object per line to a file.
    File { path: PathBuf },
    /// Publish to the broker on a topic built from a template.
    Mqtt {
        topic: crate::sink::TopicTemplate,
        qos: rumqttc::QoS,
        retain: bool,
    },
}

/// The result of validating every layer: the configuration when there is
/// no problem, and every problem found otherwise.
#[derive(Debug)]
pub struct Checked {
    pub config: Option<Config>,
    /// The plugin entries that validated, even when other keys did not, so
    /// that `eliot check` can try to load them.
    pub plugins: BTreeMap<String, PluginConfig>,
    pub errors: Vec<ConfigError>,
    /// The overlay file applied, if any.
    pub overlay: Option<PathBuf>,
    /// `runtime.cache_dir` resolved, when the schema check passed, even if
    /// other keys have problems.
    pub cache_dir: Option<PathBuf>,
}

/// Most schema problems reported at once. Each one costs a new pass over
/// the table, and past this many the rest of the file is likely as wrong.
const MAX_SCHEMA_ERRORS: usize = 50;

impl Config {
    /// Reads and validates the configuration file at `path` alone, without
    /// an overlay or environment variables.
    ///
    /// # Errors
    ///
    /// Returns every problem found: unreadable file, TOML syntax, unknown or
    /// missing keys, bad values, references to undefined plugins or sinks,
    /// plugin files that do not exist.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        Self::load_layered(path, &Layers::default())
    }

    /// Reads the base file at `path`, applies `layers` over it and validates
    /// the result.
    ///
    /// # Errors
    ///
    /// See [`Config::load`]; besides, an unknown `ELIOT_ENV` value, a missing
    /// overlay file and bad override variables.
    pub fn load_layered(path: &Path, layers: &Layers) -> Result<Self, ConfigErrors> {
        let checked = Self::check_layered(path, layers);
        checked.config.ok_or(ConfigErrors(checked.errors))
    }

    /// Validates configuration `text` as if it were read from `path`.
    ///
    /// # Errors
    ///
    /// See [`Config::load`].
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigErrors> {
        let checked = Self::check_text(path, text, &Layers::default());
        checked.config.ok_or(ConfigErrors(checked.errors))
    }

    /// Reads the base file at `path`, applies `layers` and validates the
    /// result, collecting every problem instead of stopping at the first.
    pub fn check_layered(path: &Path, layers: &Layers) -> Checked {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::check_text(path, &text, layers),
            Err(e) => Checked {
                config: None,
                plugins: BTreeMap::new(),
                errors: vec![ConfigError {
                    origin: Origin::File(path.to_owned()),
                    key: "(file)".to_owned(),
                    problem: format!("cannot read the file: {e}"),
                    fix: "check the path given with --config".to_owned(),
                }],
                overlay: None,
                cache_dir: None,
            },
        }
    }

    /// Validates `text` as the base file at `path`, with `layers` over it.
    pub fn check_text(path: &Path, text: &str, layers: &Layers) -> Checked {
        // Absolute paths keep log lines unambiguous, let the watcher find
        // the file from any folder, and are what wasmtime's cache requires.
        let file = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        check_layers(&file, text, layers)
    }

    /// Describes the layers this configuration was read from, with variable
    /// names and never their values, for the start-up log.
    pub fn describe_layers(&self) -> String {
        let mut text = self.file.display().to_string();
        if let Some(overlay) = &self.overlay {
            text.push_str(&format!(", then {}", overlay.display()));
        }
        let names = self.layers.variable_names();
        if !names.is_empty() {
            text.push_str(&format!(
                ", then the environment variables {}",
                names.join(", ")
            ));
        }
        text
    }
}

fn check_layers(file: &Path, text: &str, layers: &Layers) -> Checked {
    let layered = match crate::layers::apply(file, text, layers) {
        Ok(layered) => layered,
        Err(errors) => {
            return Checked {
                config: None,
                plugins: BTreeMap::new(),
                errors,
                overlay: None,
                cache_dir: None,
            }
        }
    };
    let mut errors = layered.errors;
    let origins = layered.origins;
    let mut removed = Vec::new();
    let raw = deserialize_all(layered.table.clone(), &origins, &mut errors, &mut removed);
    redact(&mut errors, layers, &layered.table);
    let Some(raw) = raw else {
        return Checked {
            config: None,
            plugins: BTreeMap::new(),
            errors,
            overlay: layered.overlay,
            cache_dir: None,
        };
    };

    let base = match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let (config, more) = Validator {
        origins: &origins,
        base: &base,
        errors: Vec::new(),
        removed: &removed,
    }
    .validate(raw, file, layers, layered.overlay.clone());
    // A key removed for a schema problem leaves its table looking empty or
    // incomplete, so a validator error about that table repeats the same
    // problem.
    errors.extend(more.into_iter().filter(|error| {
        !removed
            .iter()
            .any(|key: &String| key.starts_with(&format!("{}.", error.key)) || *key == error.key)
    }));
    redact(&mut errors, layers, &layered.table);
    let plugins = config.plugins.clone();
    let cache_dir = (!config.cache_dir.as_os_str().is_empty()).then(|| config.cache_dir.clone());
    Checked {
        config: errors.is_empty().then_some(config),
        plugins,
        errors,
        overlay: layered.overlay,
        cache_dir,
    }
}

/// Deserializes `table`, and on a problem removes the key at fault and
/// tries again, so that one run reports every unknown key and bad value.
/// Returns what deserializes once the faulty keys, listed in `removed`,
/// are gone; the caller treats it as invalid when `errors` is not empty.
fn deserialize_all(
    mut table: toml::Table,
    origins: &Origins,
    errors: &mut Vec<ConfigError>,
    removed: &mut Vec<String>,
) -> Option<RawConfig> {
    for _ in 0..MAX_SCHEMA_ERRORS {
        let e = match serde_path_to_error::deserialize::<_, RawConfig>(table.clone()) {
            // With keys removed the configuration is not valid, but the
            // rest of it is still checked for `eliot check`.
            Ok(raw) => return Some(raw),
            Err(e) => e,
        };
        let key = match e.path().to_string() {
            // serde_path_to_error names the top level ".".
            path if path == "." => String::new(),
            path => path,
        };
        let message = e.into_inner().message().to_owned();

        // A required key removed on an earlier pass is now missing: that
        // is the same problem again.
        if let Some(field) = missing_field(&message) {
            let full = if key.is_empty() {
                field.to_owned()
            } else {
                format!("{key}.{field}")
            };
            if removed.contains(&full) {
                return None;
            }
        }

        let location = origins
            .line_of(&key)
            .map(|line| format!(" (line {line})"))
            .unwrap_or_default();
        // serde quotes the value it could not take, and a password of the
        // wrong type is still a password.
        let message = if SECRET_KEYS.contains(&key.as_str()) {
            "the value is not a string (not shown, because it is a secret)".to_owned()
        } else {
            message
        };
        let fix = if message.starts_with("unknown field") {
            "remove the key or correct its spelling"
        } else if message.starts_with("missing field") {
            "add the key"
        } else {
            "correct the value"
        };
        errors.push(ConfigError {
            origin: origins.of(&key),
            key: if key.is_empty() {
                "(top level)".to_owned()
            } else {
                key.clone()
            },
            problem: format!("{message}{location}"),
            fix: fix.to_owned(),
        });

        // A missing key cannot be removed, and nothing past it is found.
        if key.is_empty()
            || message.starts_with("missing field")
            || !crate::layers::remove_key(&mut table, &key)
        {
            return None;
        }
        removed.push(key);
    }
    None
}

/// Returns `X` of serde's "missing field `X`".
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// Keys whose values are secrets, as dotted paths.
const SECRET_KEYS: &[&str] = &["mqtt.password"];

/// Replaces every secret value in the error texts, in case a check ever
/// quotes one: the secret variables, and `mqtt.password` when a file sets
/// it, whatever its type.
fn redact(errors: &mut [ConfigError], layers: &Layers, table: &toml::Table) {
    let from_files =
        table
            .get("mqtt")
            .and_then(|mqtt| mqtt.get("password"))
            .map(|value| match value {
                toml::Value::String(text) => text.clone(),
                other => other.to_string(),
            });
    let secrets = layers
        .secrets()
        .into_iter()
        .map(str::to_owned)
        .chain(from_files);
    for secret in secrets.filter(|secret| !secret.is_empty()) {
        let secret = secret.as_str();
        for error in errors.iter_mut() {
            error.problem = error.problem.replace(secret, "<redacted>");
            error.fix = error.fix.replace(secret, "<redacted>");
        }
    }
}

/// `path` without `.` and with each `..` applied to the level before it,
/// so that two spellings of one file compare equal. Symbolic links are not
/// followed: the file may not exist yet.
fn normalize(path: &Path) -> PathBuf {
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                if !normal.pop() {
                    normal.push(component);
                }
            }
            other => normal.push(other),
        }
    }
    normal
}

/// Returns the compiled-component cache for an unset `runtime.cache_dir`:
/// the user's cache folder as the XDG base directory specification defines
/// it, so that a configuration copied anywhere (say /etc/eliot) does not
/// write next to itself.
fn default_cache_dir() -> Option<PathBuf> {
    let absolute = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|path| path.is_absolute())
    };
    absolute("XDG_CACHE_HOME")
        .or_else(|| absolute("HOME").map(|home| home.join(".cache")))
        .map(|cache| cache.join("eliot"))
}

/// Collects every problem of the merged layers instead of stopping at the
/// first.
struct Validator<'a> {
    origins: &'a Origins,
    base: &'a Path,
    errors: Vec<ConfigError>,
    /// Keys taken out for a schema problem. A sink table with a bad key
    /// goes as a whole (its `type` tag hides the key's path from serde), and
    /// a reference to it is not a second problem.
    removed: &'a [String],
}

impl Validator<'_> {
    fn error(
        &mut self,
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) {
        let key = key.into();
        self.errors.push(ConfigError {
            origin: self.origins.of(&key),
            key,
            problem: problem.into(),
            fix: fix.into(),
        });
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base.join(path)
        }
    }

    fn qos(&mut self, key: String, value: u8) -> rumqttc::QoS {
        match value {
            0 => rumqttc::QoS::AtMostOnce,
            1 => rumqttc::QoS::AtLeastOnce,
            2 => rumqttc::QoS::ExactlyOnce,
            other => {
                self.error(key, format!("QoS {other} does not exist"), "use 0, 1 or 2");
                rumqttc::QoS::AtMostOnce
            }
        }
    }

    fn device_key(&mut self, pipeline: &str, raw: Option<RawDeviceKey>) -> DeviceKey {
        let key = format!("pipelines.{pipeline}.device_key");
        let both = "write device_key = { topic = \"devices/{device_id}/telemetry\" } or device_key = { payload = \"device_id\" }";
        match raw {
            None => DeviceKey::Topic,
            Some(RawDeviceKey {
                topic: Some(pattern),
                payload: None,
            }) => match crate::device::TopicPattern::parse(&pattern) {
                Ok(pattern) => DeviceKey::TopicPattern(pattern),
                Err(problem) => {
                    self.error(
                        format!("{key}.topic"),
                        format!("invalid device key pattern: {problem}"),
                        "write the topic with {device_id} as the device's level, for example \"devices/{device_id}/telemetry\"",
                    );
                    DeviceKey::Topic
                }
            },
            Some(RawDeviceKey {
                topic: None,
                payload: Some(field),
            }) => {
                if field.is_empty() {
                    self.error(
                        format!("{key}.payload"),
                        "the field name is empty",
                        "name a top-level field of the JSON payload, for example \"device_id\"",
                    );
                }
                DeviceKey::PayloadField(field)
            }
            Some(RawDeviceKey {
                topic: Some(_),
                payload: Some(_),
            }) => {
                self.error(
                    key,
                    "both topic and payload are set",
                    format!("keep one: {both}"),
                );
                DeviceKey::Topic
            }
            Some(RawDeviceKey {
                topic: None,
                payload: None,
            }) => {
                self.error(key, "neither topic nor payload is set", both);
                DeviceKey::Topic
            }
        }
    }

    /// Checks the protocol, credentials and TLS keys of `[mqtt]`, and
    /// resolves the TLS file paths.
    fn validate_mqtt(&mut self, mqtt: &mut MqttConfig) {
        if mqtt.protocol == Protocol::V311 && mqtt.session_expiry_secs.is_some() {
            self.error(
                "mqtt.session_expiry_secs",
                "session expiry exists only in MQTT 5, but mqtt.protocol is \"3.1.1\"",
                "set protocol = \"5\", or remove the key: a 3.1.1 session is kept until the client returns",
            );
        }
        if mqtt.password.is_some() && mqtt.username.is_none() {
            self.error(
                "mqtt.password",
                "a password is set without a username",
                "set mqtt.username too, or remove the password",
            );
        }
        if mqtt.username.as_deref() == Some("") {
            self.error(
                "mqtt.username",
                "the username is empty",
                "set the user name the broker knows, or remove the key",
            );
        }
        let wants_mqtt5 = mqtt.protocol == Protocol::V5;
        if mqtt.broker == "embedded"
            && (mqtt.tls.is_some() || mqtt.username.is_some() || wants_mqtt5)
        {
            self.error(
                "mqtt.broker",
                "the embedded broker speaks plain MQTT 3.1.1 without credentials",
                "remove [mqtt.tls], mqtt.username, mqtt.password and protocol = \"5\", or point mqtt.broker at an external broker",
            );
        }
        let Some(tls) = &mut mqtt.tls else {
            return;
        };
        for (key, path) in [
            ("ca_file", &mut tls.ca_file),
            ("client_cert_file", &mut tls.client_cert_file),
            ("client_key_file", &mut tls.client_key_file),
        ] {
            if let Some(path) = path {
                *path = self.resolve(path);
                if !path.is_file() {
                    let key = format!("mqtt.tls.{key}");
                    // A variable's path was made absolute against the
                    // current folder, a file's against the file's folder.
                    let fix = match self.origins.of(&key) {
                        Origin::Variables(names) => format!(
                            "name an existing PEM file in {}; a relative path starts at the current folder",
                            names.join(" and ")
                        ),
                        Origin::File(_) => "name an existing PEM file; a relative path starts at the folder of the file that sets it".to_owned(),
                    };
                    self.error(key, format!("file {} not found", path.display()), fix);
                }
            }
        }
        if tls.client_cert_file.is_some() != tls.client_key_file.is_some() {
            let (set, missing) = if tls.client_cert_file.is_some() {
                ("client_cert_file", "client_key_file")
            } else {
                ("client_key_file", "client_cert_file")
            };
            self.error(
                format!("mqtt.tls.{missing}"),
                format!("mqtt.tls.{set} is set, but mqtt.tls.{missing} is not"),
                "set both the client certificate and its private key for mutual TLS, or neither",
            );
        }
        if let Some(name) = &tls.server_name {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                self.error(
                    "mqtt.tls.server_name",
                    format!("\"{name}\" is neither a DNS name nor an IP address"),
                    "write the name the broker's certificate holds, for example \"broker.example.com\"",
                );
            }
        }
        // Only once every file exists: the PEM contents, so that a bad file
        // fails here, and in `eliot check`, not at the first connect.
        if self.errors.iter().all(|e| !e.key.starts_with("mqtt.tls")) {
            if let Err(e) = crate::tls::client_config(tls) {
                self.error(format!("mqtt.tls.{}", e.key()), e.to_string(), e.fix());
            }
        }
    }

    /// Validates `raw` and returns the configuration with every problem
    /// found. The configuration is complete but only valid when there is no
    /// problem.
    fn validate(
        mut self,
        raw: RawConfig,
        file: &Path,
        layers: &Layers,
        overlay: Option<PathBuf>,
    ) -> (Config, Vec<ConfigError>) {
        // First pass: values that stand alone.
        if raw.mqtt.broker != "embedded" && raw.mqtt.address().is_none() {
            self.error(
                "mqtt.broker",
                format!("\"{}\" is neither \"embedded\" nor a host:port address", raw.mqtt.broker),
                "write broker = \"embedded\" or broker = \"HOST:PORT\", for example \"127.0.0.1:1883\"",
            );
        }
        let mut raw = raw;
        self.validate_mqtt(&mut raw.mqtt);
        if raw.mqtt.client_id.is_empty() {
            self.error(
                "mqtt.client_id",
                "the client id is empty",
                "set a client id unique on the broker",
            );
        } else if raw.mqtt.client_id.len() > MQTT_MAX_STRING_BYTES {
            self.error(
                "mqtt.client_id",
                format!(
                    "the client id is {} bytes, more than MQTT's limit of {MQTT_MAX_STRING_BYTES}",
                    raw.mqtt.client_id.len()
                ),
                "use a short id, unique on the broker; MQTT 3.1.1 brokers need only accept 23 characters",
            );
        }
        if raw.mqtt.keep_alive_secs > u64::from(u16::MAX) {
            self.error(
                "mqtt.keep_alive_secs",
                format!(
                    "{} is above MQTT's maximum of 65535 seconds",
                    raw.mqtt.keep_alive_secs
                ),
                "use a value from 5 to 65535",
            );
        }
        if !(MIN_PACKET_BYTES..=MQTT_MAX_PAYLOAD).contains(&raw.mqtt.max_packet_bytes) {
            self.error(
                "mqtt.max_packet_bytes",
                format!(
                    "{} is outside {MIN_PACKET_BYTES}..={MQTT_MAX_PAYLOAD}",
                    raw.mqtt.max_packet_bytes
                ),
                "use a limit of at least 1 KiB and at most MQTT's 256 MiB",
            );
        }
        if raw.mqtt.keep_alive_secs < 5 {
            self.error(
                "mqtt.keep_alive_secs",
                format!(
                    "{} is below rumqttc's minimum of 5 seconds",
                    raw.mqtt.keep_alive_secs
                ),
                "use a value of 5 or more",
            );
        }
        if raw
            .embedded_broker
            .listen
            .parse::<std::net::SocketAddr>()
            .is_err()
        {
            self.error(
                "embedded_broker.listen",
                format!(
                    "\"{}\" is not an IP:port address",
                    raw.embedded_broker.listen
                ),
                "write it as \"127.0.0.1:1883\", or port 0 for a free port",
            );
        }

        let plugin_dir = self.resolve(
            raw.runtime
                .plugin_dir
                .as_deref()
                .unwrap_or(Path::new("plugins")),
        );
        let cache_dir = match raw.runtime.cache_dir.as_deref() {
            Some(dir) => self.resolve(dir),
            None => default_cache_dir().unwrap_or_else(|| {
                self.error(
                    "runtime.cache_dir",
                    "the key is not set, and neither XDG_CACHE_HOME nor HOME names a folder for the default",
                    "set runtime.cache_dir to a writable folder, for example \"/var/cache/eliot\"",
                );
                PathBuf::new()
            }),
        };
        let dead_letter_path = normalize(&self.resolve(&raw.dead_letters.path));
        self.output_file(
            "dead_letters.path",
            &raw.dead_letters.path,
            &dead_letter_path,
        );

        let mut plugins = BTreeMap::new();
        for (name, plugin) in raw.plugins {
            let path = if plugin.file.is_absolute() {
                plugin.file.clone()
            } else {
                plugin_dir.join(&plugin.file)
            };
            if path.is_dir() {
                self.error(
                    format!("plugins.{name}.file"),
                    format!("{} is a folder, not a component file", path.display()),
                    "name the .wasm file inside it",
                );
            } else if !path.is_file() {
                // The folder may come from another layer than the file
                // name (prod.toml sets /var/lib/eliot/plugins), so the
                // message names where it was set.
                let fix = if plugin.file.is_absolute() {
                    "build the plugin (eliot plugin build) or correct the file name".to_owned()
                } else {
                    format!(
                        "build the plugin (eliot plugin build) or correct the file name; relative names are \
                         looked up in runtime.plugin_dir, {}, which {} sets",
                        plugin_dir.display(),
                        self.origins.of("runtime.plugin_dir")
                    )
                };
                self.error(
                    format!("plugins.{name}.file"),
                    format!("plugin file {} not found", path.display()),
                    fix,
                );
            }
            if plugin.limits.memory_mib == 0 || plugin.limits.call_budget_ms == 0 {
                self.error(
                    format!("plugins.{name}.limits"),
                    "memory_mib and call_budget_ms must be greater than 0",
                    "raise the limit or remove it to take the default",
                );
            }
            let config =
                serde_json::to_value(&plugin.config).unwrap_or_else(|_| serde_json::json!({}));
            let mut grants = plugin.grants;
            for dir in &mut grants.read_dirs {
                dir.host = self.resolve(&dir.host);
                if !dir.host.is_dir() {
                    self.error(
                        format!("plugins.{name}.grants.read_dirs"),
                        format!("folder {} not found", dir.host.display()),
                        "grant an existing folder or remove the entry",
                    );
                }
                // The guest path is the folder's path inside the sandbox. It
                // must be absolute, without `.` or `..`, and not the root,
                // because a mount at / would hide every other grant.
                let guest = Path::new(&dir.guest);
                let plain = guest.is_absolute()
                    && guest.components().skip(1).count() > 0
                    && guest.components().all(|c| {
                        matches!(
                            c,
                            std::path::Component::RootDir | std::path::Component::Normal(_)
                        )
                    });
                if !plain {
                    self.error(
                        format!("plugins.{name}.grants.read_dirs"),
                        format!(
                            "guest path \"{}\" is not an absolute path below /",
                            dir.guest
                        ),
                        "write where the plugin sees the folder, for example guest = \"/data\"",
                    );
                }
            }
            for variable in &grants.env {
                if variable.is_empty() || variable.contains(['=', '\0']) {
                    self.error(
                        format!("plugins.{name}.grants.env"),
                        format!("{variable:?} is not an environment variable name"),
                        "name a variable without '=' or NUL, for example \"SENSOR_REGION\"",
                    );
                }
            }
            plugins.insert(
                name.clone(),
                PluginConfig {
                    name,
                    path,
                    config,
                    limits: plugin.limits,
                    breaker: plugin.breaker,
                    grants,
                    max_retries: plugin.max_retries,
                },
            );
        }

        // Names are collected first so that a sink with a bad value is not
        // also reported as undefined by every pipeline that uses it.
        let sink_names: std::collections::BTreeSet<String> = raw.sinks.keys().cloned().collect();
        let mut sinks = BTreeMap::new();
        // Two writers of one file would interleave their lines.
        let mut files: BTreeMap<PathBuf, String> =
            BTreeMap::from([(dead_letter_path.clone(), "dead_letters.path".to_owned())]);
        for (name, sink) in raw.sinks {
            let sink = match sink {
                RawSinkConfig::File {
                    path: raw_path,
                    breaker,
                } => {
                    let key = format!("sinks.{name}.path");
                    let path = normalize(&self.resolve(&raw_path));
                    self.output_file(&key, &raw_path, &path);
                    if let Some(other) = files.get(&path) {
                        self.error(
                            key.clone(),
                            format!("{} is already the file of {other}", path.display()),
                            "give every file sink a file of its own",
                        );
                    }
                    files.insert(path.clone(), key);
                    SinkConfig {
                        kind: SinkKind::File { path },
                        breaker,
                    }
                }
                RawSinkConfig::Mqtt {
                    topic,
                    qos,
                    retain,
                    breaker,
                } => {
                    let qos = self.qos(format!("sinks.{name}.qos"), qos);
                    match crate::sink::TopicTemplate::parse(&topic) {
                        Ok(topic) => SinkConfig {
                            kind: SinkKind::Mqtt { topic, qos, retain },
                            breaker,
                        },
                        Err(problem) => {
                            self.error(
                                format!("sinks.{name}.topic"),
                                problem,
                                "use the placeholders {pipeline}, {topic}, {payload.FIELD} or {header.NAME}",
                            );
                            continue;
                        }
                    }
                }
            };
            sinks.insert(name, sink);
        }

        // Second pass: references between sections.
        if raw.pipelines.is_empty() {
            self.error(
                "pipelines",
                "no pipeline is defined",
                "add a [pipelines.NAME] table",
            );
        }
        let mut pipelines = BTreeMap::new();
        for (name, pipeline) in raw.pipelines {
            let mut topics = Vec::new();
            if pipeline.topics.is_empty() {
                self.error(
                    format!("pipelines.{name}.topics"),
                    "the list is empty",
                    "add at least one topic filter",
                );
            }
            for filter in &pipeline.topics {
                // The router matches topics against the filter as written,
                // and no topic matches "$share/...": every message would be
                // acknowledged and dropped as unrouted.
                if let Some(rest) = filter.strip_prefix("$share/") {
                    let (group, plain) = rest.split_once('/').unwrap_or((rest, ""));
                    self.error(
                        format!("pipelines.{name}.topics"),
                        format!("\"{filter}\" is a shared subscription, which the host builds itself"),
                        format!("write the plain filter \"{plain}\" in topics and set share_group = \"{group}\""),
                    );
                    continue;
                }
                match topic::TopicFilter::parse(filter) {
                    Ok(parsed) => topics.push(parsed),
                    Err(problem) => self.error(
                        format!("pipelines.{name}.topics"),
                        format!("invalid topic filter \"{filter}\": {problem}"),
                        "use + for one whole level and # only as the last level, for example \"devices/+/telemetry\" or \"devices/#\"",
                    ),
                }
            }
            if let Some(group) = &pipeline.share_group {
                if group.is_empty() || group.contains(['/', '+', '#']) {
                    self.error(
                        format!("pipelines.{name}.share_group"),
                        format!("share group \"{group}\" is empty or contains '/', '+' or '#'"),
                        "use a plain name such as \"eliot\"; every host with the same name shares the messages",
                    );
                }
            }
            let qos = self.qos(format!("pipelines.{name}.qos"), pipeline.qos);
            if pipeline.workers == 0 || pipeline.workers > MAX_WORKERS {
                self.error(
                    format!("pipelines.{name}.workers"),
                    format!("{} workers is outside 1..={MAX_WORKERS}", pipeline.workers),
                    "use about one worker per core; each worker holds an instance of every stage",
                );
            }
            for stage in &pipeline.stages {
                if !plugins.contains_key(stage) {
                    self.error(
                        format!("pipelines.{name}.stages"),
                        format!("stage \"{stage}\" names no plugin"),
                        format!("define [plugins.{stage}] or remove it from the list"),
                    );
                }
            }
            if pipeline.sinks.is_empty() {
                self.error(
                    format!("pipelines.{name}.sinks"),
                    "the list is empty",
                    "add at least one sink",
                );
            }
            let removed_sinks: Vec<&str> = self
                .removed
                .iter()
                .filter_map(|key| key.strip_prefix("sinks."))
                .collect();
            for (index, sink) in pipeline.sinks.iter().enumerate() {
                if pipeline.sinks[..index].contains(sink) {
                    self.error(
                        format!("pipelines.{name}.sinks"),
                        format!("sink \"{sink}\" is listed twice, so every record would be written twice"),
                        "list each sink once",
                    );
                }
                if !sink_names.contains(sink) && !removed_sinks.contains(&sink.as_str()) {
                    self.error(
                        format!("pipelines.{name}.sinks"),
                        format!("sink \"{sink}\" is not defined"),
                        format!("define [sinks.{sink}] or remove it from the list"),
                    );
                }
            }
            let device_key = self.device_key(&name, pipeline.device_key);
            pipelines.insert(
                name.clone(),
                PipelineConfig {
                    name,
                    topics,
                    qos,
                    workers: pipeline.workers,
                    stages: pipeline.stages,
                    sinks: pipeline.sinks,
                    device_key,
                    share_group: pipeline.share_group,
                },
            );
        }

        let admin = raw.admin.and_then(|admin| self.admin(admin));
        let devices = self.devices(raw.devices);
        let config = Config {
            file: file.to_owned(),
            overlay,
            layers: layers.clone(),
            mqtt: raw.mqtt,
            embedded_broker: raw.embedded_broker,
            plugin_dir,
            cache_dir,
            watch: raw.runtime.watch.unwrap_or(true),
            dead_letter_path,
            plugins,
            pipelines,
            sinks,
            log: raw.log,
            admin,
            devices,
        };
        (config, self.errors)
    }

    /// Checks that the host can create or append to the file at `path`
    /// (`raw` as written, for the message): not empty, not a folder, and
    /// below a folder, existing or not yet created. Writability is left to
    /// the start, which names the key too.
    fn output_file(&mut self, key: &str, raw: &Path, path: &Path) {
        if raw.as_os_str().is_empty() {
            self.error(
                key,
                "the path is empty",
                "name a file, for example \"out/processed.jsonl\"",
            );
            return;
        }
        if path.is_dir() {
            self.error(
                key,
                format!("{} is a folder", path.display()),
                "name a file inside it, for example \"out/processed.jsonl\"",
            );
            return;
        }
        let existing = path.ancestors().skip(1).find(|folder| folder.exists());
        if let Some(blocker) = existing.filter(|folder| !folder.is_dir()) {
            self.error(
                key,
                format!(
                    "{} cannot be created: {} is not a folder",
                    path.display(),
                    blocker.display()
                ),
                "name a file below a folder the host may create or write",
            );
        }
    }

    fn admin(&mut self, raw: RawAdminConfig) -> Option<AdminConfig> {
        let listen = raw.listen.parse::<std::net::SocketAddr>();
        if listen.is_err() {
            self.error(
                "admin.listen",
                format!("\"{}\" is not an IP:port address", raw.listen),
                "write it as \"127.0.0.1:9464\", or port 0 for a free port",
            );
        }
        let valid_name = !raw.token_env.is_empty()
            && raw
                .token_env
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            self.error(
                "admin.token_env",
                format!(
                    "\"{}\" is not an environment variable name",
                    raw.token_env
                ),
                "name the variable that holds the token, for example \"ELIOT_ADMIN_TOKEN\"; never write the token itself here",
            );
        }
        Some(AdminConfig {
            listen: listen.ok()?,
            token_env: raw.token_env,
        })
    }

    fn devices(&mut self, raw: RawDevicesConfig) -> DevicesConfig {
        let status_topic = raw
            .status_topic
            .and_then(|filter| match TopicFilter::parse(&filter) {
                Ok(parsed) => Some(parsed),
                Err(problem) => {
                    self.error(
                        "devices.status_topic",
                        format!("invalid topic filter \"{filter}\": {problem}"),
                        "use a filter such as \"devices/+/status\"",
                    );
                    None
                }
            });
        let max_tracked = raw.max_tracked.unwrap_or(crate::fleet::DEFAULT_MAX_DEVICES);
        if max_tracked == 0 {
            self.error(
                "devices.max_tracked",
                "0 devices leaves the registry nothing to keep",
                format!(
                    "use at least 1; the default is {}",
                    crate::fleet::DEFAULT_MAX_DEVICES
                ),
            );
        }
        DevicesConfig {
            status_topic,
            max_tracked: max_tracked.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
[mqtt]
broker = "127.0.0.1:1883"
client_id = "eliot-test"

[runtime]
plugin_dir = "plugins"

[dead_letters]
path = "out/dead.jsonl"

[plugins.enrich]
file = "enrich.wasm"

[pipelines.telemetry]
topics = ["devices/+/telemetry"]
stages = ["enrich"]
sinks = ["file"]

[sinks.file]
type = "file"
path = "out/processed.jsonl"
"#;

    /// A folder with `eliot.toml` and an (empty) plugin file, which is all
    /// validation looks at.
    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
        std::fs::write(dir.path().join("plugins/enrich.wasm"), b"").unwrap();
        let file = dir.path().join("eliot.toml");
        (dir, file)
    }

    fn errors(text: &str) -> (PathBuf, Vec<String>) {
        let (_dir, file) = setup();
        let errors = Config::parse(&file, text).unwrap_err();
        (
            file.clone(),
            errors.0.iter().map(ToString::to_string).collect(),
        )
    }

    #[test]
    fn valid_config_resolves_paths() {
        let (dir, file) = setup();
        let config = Config::parse(&file, VALID).unwrap();
        let base = std::path::absolute(dir.path()).unwrap();
        assert_eq!(
            config.plugins["enrich"].path,
            base.join("plugins/enrich.wasm")
        );
        assert_eq!(config.dead_letter_path, base.join("out/dead.jsonl"));
        assert_eq!(config.plugins["enrich"].config, serde_json::json!({}));
        assert_eq!(config.pipelines["telemetry"].stages, vec!["enrich"]);
        assert_eq!(config.pipelines["telemetry"].workers, 2);
    }

    #[test]
    fn plugin_table_becomes_json() {
        let (_dir, file) = setup();
        let text = VALID.replace(
            "file = \"enrich.wasm\"",
            "file = \"enrich.wasm\"\nconfig = { pattern = \"a/{device_id}\", limit = 3, ratio = 0.5 }",
        );
        let config = Config::parse(&file, &text).unwrap();
        assert_eq!(
            config.plugins["enrich"].config,
            serde_json::json!({"pattern": "a/{device_id}", "limit": 3, "ratio": 0.5})
        );
    }

    #[test]
    fn operations_tables_default_off() {
        let (_dir, file) = setup();
        let config = Config::parse(&file, VALID).unwrap();
        assert_eq!(config.admin, None, "no admin server without [admin]");
        assert_eq!(config.log.format, LogFormat::Text);
        assert!(config.devices.status_topic.is_none());
    }

    #[test]
    fn operations_tables_parse() {
        let (_dir, file) = setup();
        let text = format!(
            "{VALID}\n[admin]\n\n[log]\nformat = \"json\"\n\n[devices]\nstatus_topic = \"devices/+/status\"\n"
        );
        let config = Config::parse(&file, &text).unwrap();
        let admin = config.admin.unwrap();
        assert_eq!(admin.listen, "127.0.0.1:9464".parse().unwrap());
        assert_eq!(admin.token_env, "ELIOT_ADMIN_TOKEN");
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(
            config.devices.status_topic.unwrap().as_str(),
            "devices/+/status"
        );
    }

    #[test]
    fn bad_operations_values_name_key_and_fix() {
        let text = format!(
            "{VALID}\n[admin]\nlisten = \"localhost\"\ntoken_env = \"s3cr3t token\"\n\n[devices]\nstatus_topic = \"devices/#/status\"\n"
        );
        let (file, errors) = errors(&text);
        let file = file.display();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert_eq!(
            errors[0],
            format!("{file}: key `admin.listen`: \"localhost\" is not an IP:port address; write it as \"127.0.0.1:9464\", or port 0 for a free port")
        );
        assert_eq!(
            errors[1],
            format!("{file}: key `admin.token_env`: \"s3cr3t token\" is not an environment variable name; name the variable that holds the token, for example \"ELIOT_ADMIN_TOKEN\"; never write the token itself here")
        );
        assert!(
            errors[2].starts_with(&format!(
                "{file}: key `devices.status_topic`: invalid topic filter \"devices/#/status\""
            )),
            "{}",
            errors[2]
        );
    }

    #[test]
    fn unknown_log_format_is_rejected() {
        let text = format!("{VALID}\n[log]\nformat = \"xml\"\n");
        let (_file, errors) = errors(&text);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .contains("key `log.format`: unknown variant `xml`, expected `text` or `json`"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn unknown_key_in_a_sink_is_one_problem() {
        let text = VALID.replace(
            "type = \"file\"\npath = \"out/processed.jsonl\"",
            "type = \"file\"\nbogus = 1\npath = \"out/processed.jsonl\"",
        );
        let (_file, errors) = errors(&text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].contains("key `sinks.file`: unknown field `bogus`"),
            "{errors:#?}"
        );
    }

    #[test]
    fn unknown_key_names_file_key_and_fix() {
        let text = VALID.replace(
            "stages = [\"enrich\"]",
            "stages = [\"enrich\"]\nstagez = []",
        );
        let (file, errors) = errors(&text);
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0],
            format!(
                "{}: key `pipelines.telemetry.stagez`: unknown field `stagez`, expected one of \
                 `topics`, `qos`, `workers`, `stages`, `sinks`, `device_key`, `share_group` (line 18); remove the key or correct its spelling",
                file.display()
            )
        );
    }

    #[test]
    fn missing_plugin_file_names_key_and_fix() {
        let text = VALID.replace("file = \"enrich.wasm\"", "file = \"enrichh.wasm\"");
        let (file, errors) = errors(&text);
        let base = std::path::absolute(file.parent().unwrap()).unwrap();
        assert_eq!(
            errors,
            vec![format!(
                "{}: key `plugins.enrich.file`: plugin file {} not found; build the plugin (eliot plugin build) \
                 or correct the file name; relative names are looked up in runtime.plugin_dir, {}, which {} sets",
                file.display(),
                base.join("plugins/enrichh.wasm").display(),
                base.join("plugins").display(),
                file.display()
            )]
        );
    }

    #[test]
    fn bad_topic_filter_names_key_and_fix() {
        let text = VALID.replace("devices/+/telemetry", "a/#/b");
        let (file, errors) = errors(&text);
        assert_eq!(
            errors,
            vec![format!(
                "{}: key `pipelines.telemetry.topics`: invalid topic filter \"a/#/b\": \"#\" must be a whole \
                 level and the last one, but level 2 is \"#\"; use + for one whole level and # only as the last \
                 level, for example \"devices/+/telemetry\" or \"devices/#\"",
                file.display()
            )]
        );
    }

    #[test]
    fn share_filter_in_topics_rejected() {
        let text = VALID.replace("devices/+/telemetry", "$share/grp/devices/+/telemetry");
        let (file, errors) = errors(&text);
        assert_eq!(
            errors,
            vec![format!(
                "{}: key `pipelines.telemetry.topics`: \"$share/grp/devices/+/telemetry\" is a shared \
                 subscription, which the host builds itself; write the plain filter \"devices/+/telemetry\" \
                 in topics and set share_group = \"grp\"",
                file.display()
            )]
        );
    }

    #[test]
    fn overlong_client_id_and_filter_rejected() {
        let long = "x".repeat(MQTT_MAX_STRING_BYTES + 1);
        let text = VALID
            .replace(
                "client_id = \"eliot-test\"",
                &format!("client_id = \"{long}\""),
            )
            .replace("devices/+/telemetry", &long);
        let (_file, errors) = errors(&text);
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors[0].contains(
            "key `mqtt.client_id`: the client id is 65536 bytes, more than MQTT's limit of 65535"
        ));
        assert!(errors[1].contains("a topic filter is at most 65535 bytes, this one is 65536"));
    }

    #[test]
    fn unusable_output_files_rejected() {
        let text = VALID
            .replace("path = \"out/dead.jsonl\"", "path = \"\"")
            .replace("sinks = [\"file\"]", "sinks = [\"file\", \"file\", \"again\", \"folder\", \"below-a-file\"]")
            + "\n[sinks.again]\ntype = \"file\"\npath = \"out/../out/processed.jsonl\"\n\n[sinks.folder]\ntype = \"file\"\npath = \"plugins\"\n\n[sinks.below-a-file]\ntype = \"file\"\npath = \"plugins/enrich.wasm/x.jsonl\"\n";
        let (file, errors) = errors(&text);
        let base = file.parent().unwrap();
        let expected = [
            "key `dead_letters.path`: the path is empty".to_owned(),
            format!(
                "key `sinks.below-a-file.path`: {} cannot be created: {} is not a folder",
                base.join("plugins/enrich.wasm/x.jsonl").display(),
                base.join("plugins/enrich.wasm").display()
            ),
            format!(
                "key `sinks.folder.path`: {} is a folder",
                base.join("plugins").display()
            ),
            format!(
                "key `sinks.file.path`: {} is already the file of sinks.again.path",
                base.join("out/processed.jsonl").display()
            ),
            "key `pipelines.telemetry.sinks`: sink \"file\" is listed twice".to_owned(),
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for part in expected {
            assert!(
                errors.iter().any(|e| e.contains(&part)),
                "{part} in {errors:#?}"
            );
        }
    }

    #[test]
    fn device_registry_limit_is_read_and_checked() {
        let (_dir, file) = setup();
        let config =
            Config::parse(&file, &format!("{VALID}\n[devices]\nmax_tracked = 500\n")).unwrap();
        assert_eq!(config.devices.max_tracked, 500);
        assert_eq!(
            Config::parse(&file, VALID).unwrap().devices.max_tracked,
            crate::fleet::DEFAULT_MAX_DEVICES
        );
        let (_file, errors) = errors(&format!("{VALID}\n[devices]\nmax_tracked = 0\n"));
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains(
                "key `devices.max_tracked`: 0 devices leaves the registry nothing to keep"
            ),
            "{errors:#?}"
        );
    }

    #[test]
    fn meaningless_grants_are_rejected() {
        let text = VALID.replace(
            "file = \"enrich.wasm\"",
            "file = \"enrich.wasm\"\ngrants = { env = [\"\", \"A=B\", \"OK\"], read_dirs = [{ host = \"plugins\", guest = \"\" }, { host = \"plugins\", guest = \"/\" }, { host = \"plugins\", guest = \"/../etc\" }, { host = \"plugins\", guest = \"data\" }, { host = \"plugins\", guest = \"/data\" }] }",
        );
        let (_file, errors) = errors(&text);
        let guests: Vec<&String> = errors
            .iter()
            .filter(|e| e.contains("is not an absolute path below /"))
            .collect();
        assert_eq!(guests.len(), 4, "{errors:#?}");
        let names: Vec<&String> = errors
            .iter()
            .filter(|e| e.contains("is not an environment variable name"))
            .collect();
        assert_eq!(names.len(), 2, "{errors:#?}");
        assert_eq!(errors.len(), 6, "{errors:#?}");
    }

    #[test]
    fn undefined_references_are_all_reported() {
        let text = VALID
            .replace("stages = [\"enrich\"]", "stages = [\"enrich\", \"nope\"]")
            .replace("sinks = [\"file\"]", "sinks = [\"file\", \"missing\"]");
        let (file, errors) = errors(&text);
        assert_eq!(
            errors,
            vec![
                format!(
                    "{}: key `pipelines.telemetry.stages`: stage \"nope\" names no plugin; \
                     define [plugins.nope] or remove it from the list",
                    file.display()
                ),
                format!(
                    "{}: key `pipelines.telemetry.sinks`: sink \"missing\" is not defined; \
                     define [sinks.missing] or remove it from the list",
                    file.display()
                ),
            ]
        );
    }

    #[test]
    fn bad_values_are_reported() {
        let text = VALID
            .replace("broker = \"127.0.0.1:1883\"", "broker = \"localhost\"")
            .replace(
                "stages = [\"enrich\"]",
                "stages = [\"enrich\"]\nqos = 3\nworkers = 0",
            );
        let (_file, errors) = errors(&text);
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors[0].contains(
            "key `mqtt.broker`: \"localhost\" is neither \"embedded\" nor a host:port address"
        ));
        assert!(errors[1]
            .contains("key `pipelines.telemetry.qos`: QoS 3 does not exist; use 0, 1 or 2"));
        assert!(
            errors[2].contains("key `pipelines.telemetry.workers`: 0 workers is outside 1..=1024")
        );
    }

    #[test]
    fn out_of_range_limits_are_reported() {
        let text = VALID
            .replace(
                "client_id = \"eliot-test\"",
                "client_id = \"eliot-test\"\nkeep_alive_secs = 70000\nmax_packet_bytes = 0",
            )
            .replace(
                "stages = [\"enrich\"]",
                "stages = [\"enrich\"]\nworkers = 100000",
            );
        let (_file, errors) = errors(&text);
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors[0].contains(
            "key `mqtt.keep_alive_secs`: 70000 is above MQTT's maximum of 65535 seconds"
        ));
        assert!(errors[1].contains("key `mqtt.max_packet_bytes`: 0 is outside 1024..=268435455"));
        assert!(errors[2]
            .contains("key `pipelines.telemetry.workers`: 100000 workers is outside 1..=1024"));
    }

    #[test]
    fn bare_file_name_resolves_against_current_folder() {
        let (dir, _file) = setup();
        let previous = std::env::current_dir().unwrap();
        std::env::set_current_dir(dir.path()).unwrap();
        let config = Config::parse(Path::new("eliot.toml"), VALID);
        std::env::set_current_dir(previous).unwrap();
        let config = config.unwrap();
        assert!(
            config.cache_dir.is_absolute(),
            "{}",
            config.cache_dir.display()
        );
        assert!(config.plugins["enrich"].path.is_absolute());
    }

    #[test]
    fn syntax_error_names_line() {
        let (_file, errors) = errors("[mqtt\nbroker = 1");
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains("key `(syntax)`: invalid TOML at line 1, column 6: "),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn missing_section_is_named() {
        let text = VALID.replace("[dead_letters]\npath = \"out/dead.jsonl\"\n", "");
        let (_file, errors) = errors(&text);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains("missing field `dead_letters`"),
            "{}",
            errors[0]
        );
        assert!(errors[0].ends_with("; add the key"), "{}", errors[0]);
    }

    #[test]
    fn bad_sink_template_is_reported() {
        let text = VALID.replace(
            "type = \"file\"\npath = \"out/processed.jsonl\"",
            "type = \"mqtt\"\ntopic = \"out/{payload.device_id}/{nope}\"",
        );
        let (_file, errors) = errors(&text);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains("key `sinks.file.topic`: unknown placeholder \"{nope}\" in \"out/{payload.device_id}/{nope}\""),
            "{}",
            errors[0]
        );
    }

    fn layers(profile: Option<&str>, variables: &[(&str, &str)]) -> Layers {
        Layers {
            profile: profile.map(str::to_owned),
            variables: variables
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
        }
    }

    /// Writes VALID as the base file and `overlay` as `dev.toml` beside it,
    /// and checks them with `layers`.
    fn check_with(overlay: &str, layers: &Layers) -> (tempfile::TempDir, Checked) {
        let (dir, file) = setup();
        std::fs::write(&file, VALID).unwrap();
        std::fs::write(dir.path().join("dev.toml"), overlay).unwrap();
        let checked = Config::check_layered(&file, layers);
        (dir, checked)
    }

    fn error_texts(checked: &Checked) -> Vec<String> {
        checked.errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn missing_plugin_names_folder_layer() {
        let (dir, checked) = check_with(
            "[runtime]\nplugin_dir = \"/nonexistent/plugins\"\n",
            &layers(Some("dev"), &[]),
        );
        let errors = error_texts(&checked);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        let overlay = std::path::absolute(dir.path().join("dev.toml")).unwrap();
        assert!(
            errors[0].contains(&format!(
                "plugin file /nonexistent/plugins/enrich.wasm not found; build the plugin (eliot plugin build) or \
                 correct the file name; relative names are looked up in runtime.plugin_dir, /nonexistent/plugins, \
                 which {} sets",
                overlay.display()
            )),
            "{errors:#?}"
        );
    }

    #[test]
    fn missing_tls_file_fix_follows_its_layer() {
        let (_dir, checked) = check_with(
            "",
            &layers(None, &[("MQTT_CA_FILE", "/nonexistent/ca.pem")]),
        );
        let errors = error_texts(&checked);
        assert_eq!(
            errors,
            vec!["environment variable MQTT_CA_FILE: key `mqtt.tls.ca_file`: file /nonexistent/ca.pem not found; \
                  name an existing PEM file in MQTT_CA_FILE; a relative path starts at the current folder"]
        );
        let (_dir, checked) = check_with(
            "[mqtt.tls]\nca_file = \"missing.pem\"\n",
            &layers(Some("dev"), &[]),
        );
        let errors = error_texts(&checked);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].ends_with("a relative path starts at the folder of the file that sets it"),
            "{errors:#?}"
        );
    }

    #[test]
    fn overlay_merges_tables_key_by_key() {
        let overlay = "[mqtt]\nclient_id = \"eliot-dev\"\n\n[pipelines.telemetry]\nworkers = 4\ntopics = [\"dev/#\"]\n";
        let (dir, checked) = check_with(overlay, &layers(Some("dev"), &[]));
        let config = checked
            .config
            .unwrap_or_else(|| panic!("{:#?}", checked.errors));
        assert_eq!(config.mqtt.client_id, "eliot-dev");
        assert_eq!(
            config.mqtt.broker, "127.0.0.1:1883",
            "kept from the base file"
        );
        let pipeline = &config.pipelines["telemetry"];
        assert_eq!(pipeline.workers, 4);
        assert_eq!(pipeline.stages, vec!["enrich"], "kept from the base file");
        let topics: Vec<&str> = pipeline.topics.iter().map(TopicFilter::as_str).collect();
        assert_eq!(
            topics,
            vec!["dev/#"],
            "an array replaces, it does not append"
        );
        let overlay_path = std::path::absolute(dir.path().join("dev.toml")).unwrap();
        assert_eq!(config.overlay.as_deref(), Some(overlay_path.as_path()));
        assert!(config
            .describe_layers()
            .ends_with(&format!(", then {}", overlay_path.display())));
    }

    #[test]
    fn overlay_unknown_key_names_overlay_file_and_line() {
        let overlay = "# dev settings\n[pipelines.telemetry]\nworkerz = 4\n";
        let (dir, checked) = check_with(overlay, &layers(Some("dev"), &[]));
        let overlay_path = std::path::absolute(dir.path().join("dev.toml")).unwrap();
        let errors = error_texts(&checked);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with(&format!(
                "{}: key `pipelines.telemetry.workerz`: unknown field `workerz`",
                overlay_path.display()
            )),
            "{}",
            errors[0]
        );
        assert!(
            errors[0].ends_with("(line 3); remove the key or correct its spelling"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn mqtt_defaults_are_plain_311() {
        let (_dir, file) = setup();
        let config = Config::parse(&file, VALID).unwrap();
        assert_eq!(config.mqtt.protocol, Protocol::V311);
        assert_eq!(config.mqtt.tls, None);
        assert_eq!(config.mqtt.address(), Some(("127.0.0.1".to_owned(), 1883)));
        assert_eq!(config.pipelines["telemetry"].share_group, None);
        assert_eq!(
            config.pipelines["telemetry"]
                .subscriptions()
                .collect::<Vec<_>>(),
            vec!["devices/+/telemetry"]
        );
    }

    #[test]
    fn overlay_bad_value_names_overlay_file() {
        let (dir, checked) = check_with(
            "[pipelines.telemetry]\nworkers = 0\n",
            &layers(Some("dev"), &[]),
        );
        let overlay_path = std::path::absolute(dir.path().join("dev.toml")).unwrap();
        assert_eq!(
            error_texts(&checked),
            vec![format!(
                "{}: key `pipelines.telemetry.workers`: 0 workers is outside 1..=1024; \
                 use about one worker per core; each worker holds an instance of every stage",
                overlay_path.display()
            )]
        );
    }

    #[test]
    fn unknown_profile_lists_overlays() {
        let (dir, checked) = check_with("", &layers(Some("staging"), &[]));
        let folder = std::path::absolute(dir.path()).unwrap();
        assert_eq!(
            error_texts(&checked),
            vec![format!(
                "environment variable ELIOT_ENV: key `(overlay)`: \"staging\" is not a known environment; \
                 files in {}: dev.toml; set ELIOT_ENV to dev or prod or unset it",
                folder.display()
            )]
        );
    }

    #[test]
    fn missing_overlay_names_value_and_files() {
        let (dir, checked) = check_with("", &layers(Some("prod"), &[]));
        let folder = std::path::absolute(dir.path()).unwrap();
        assert_eq!(
            error_texts(&checked),
            vec![format!(
                "environment variable ELIOT_ENV: key `(overlay)`: ELIOT_ENV=prod selects {}, which does not exist; \
                 files in {}: dev.toml; create prod.toml next to the base file, or unset ELIOT_ENV",
                folder.join("prod.toml").display(),
                folder.display()
            )]
        );
    }

    #[test]
    fn every_unknown_key_is_reported() {
        let text = VALID
            .replace(
                "client_id = \"eliot-test\"",
                "client_id = \"eliot-test\"\nbrokr = \"x\"",
            )
            .replace(
                "stages = [\"enrich\"]",
                "stages = [\"enrich\"]\nstagez = []\nworkers = \"two\"",
            );
        let (_file, errors) = errors(&text);
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(
            errors[0].contains("key `mqtt.brokr`: unknown field `brokr`"),
            "{}",
            errors[0]
        );
        assert!(errors[0].contains("(line 5)"), "{}", errors[0]);
        assert!(
            errors[1].contains("key `pipelines.telemetry.stagez`: unknown field `stagez`"),
            "{}",
            errors[1]
        );
        assert!(
            errors[2].contains("key `pipelines.telemetry.workers`: invalid type: string \"two\""),
            "{}",
            errors[2]
        );
    }

    #[test]
    fn mqtt5_credentials_and_share_group_parse() {
        let (_dir, file) = setup();
        let text = VALID
            .replace(
                "client_id = \"eliot-test\"",
                "client_id = \"eliot-test\"\nprotocol = \"5\"\nsession_expiry_secs = 600\nusername = \"eliot\"\npassword = \"s3cret\"",
            )
            .replace(
                "sinks = [\"file\"]",
                "sinks = [\"file\"]\nshare_group = \"ingest\"",
            );
        let config = Config::parse(&file, &text).unwrap();
        assert_eq!(config.mqtt.protocol, Protocol::V5);
        assert_eq!(config.mqtt.session_expiry_secs, Some(600));
        assert_eq!(config.mqtt.password.as_ref().unwrap().expose(), "s3cret");
        assert_eq!(
            config.pipelines["telemetry"]
                .subscriptions()
                .collect::<Vec<_>>(),
            vec!["$share/ingest/devices/+/telemetry"]
        );
    }

    #[test]
    fn password_never_printed() {
        let secret = Secret::new("s3cret");
        assert_eq!(format!("{secret}"), "***");
        assert_eq!(format!("{secret:?}"), "***");
        let (_dir, file) = setup();
        let text = VALID.replace(
            "client_id = \"eliot-test\"",
            "client_id = \"eliot-test\"\nusername = \"eliot\"\npassword = \"s3cret\"",
        );
        let config = Config::parse(&file, &text).unwrap();
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn bad_mqtt_settings_are_reported() {
        let text = VALID
            .replace(
                "client_id = \"eliot-test\"",
                "client_id = \"eliot-test\"\nsession_expiry_secs = 60\npassword = \"s3cret\"",
            )
            .replace(
                "sinks = [\"file\"]",
                "sinks = [\"file\"]\nshare_group = \"a/b\"",
            );
        let (_file, errors) = errors(&text);
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors[0].contains(
            "key `mqtt.session_expiry_secs`: session expiry exists only in MQTT 5, but mqtt.protocol is \"3.1.1\"; set protocol = \"5\""
        ));
        assert!(errors[1].contains(
            "key `mqtt.password`: a password is set without a username; set mqtt.username too"
        ));
        assert!(errors[2].contains("key `pipelines.telemetry.share_group`: share group \"a/b\" is empty or contains '/', '+' or '#'"));
        assert!(errors.iter().all(|e| !e.contains("s3cret")));
    }

    #[test]
    fn tls_files_are_checked() {
        let (dir, file) = setup();
        std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
        std::fs::write(dir.path().join("client.pem"), "").unwrap();
        let text = VALID
            .replace("broker = \"127.0.0.1:1883\"", "broker = \"broker.example\"")
            .replace(
                "[runtime]",
                "[mqtt.tls]\nca_file = \"ca.pem\"\nclient_cert_file = \"client.pem\"\n\n[runtime]",
            );
        let errors = Config::parse(&file, &text).unwrap_err();
        let errors: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].contains(
            "key `mqtt.tls.client_key_file`: mqtt.tls.client_cert_file is set, but mqtt.tls.client_key_file is not"
        ), "{}", errors[0]);

        // Without the client certificate, the CA file itself is read.
        let text = text.replace("client_cert_file = \"client.pem\"\n", "");
        let errors = Config::parse(&file, &text).unwrap_err();
        let base = std::path::absolute(dir.path()).unwrap();
        assert_eq!(errors.0.len(), 1, "{errors}");
        assert_eq!(errors.0[0].key, "mqtt.tls.ca_file");
        assert_eq!(
            errors.0[0].problem,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                base.join("ca.pem").display()
            )
        );
    }

    #[test]
    fn bad_required_value_is_reported_once() {
        let text = VALID.replace("stages = [\"enrich\"]", "stages = \"enrich\"");
        let (_file, errors) = errors(&text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].contains("key `pipelines.telemetry.stages`: invalid type"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn broker_variables_replace_host_and_port() {
        let (_dir, checked) = check_with(
            "",
            &layers(None, &[("MQTT_BROKER_HOST", "mqtt.example.net")]),
        );
        assert_eq!(checked.config.unwrap().mqtt.broker, "mqtt.example.net:1883");

        let (_dir, checked) = check_with("", &layers(None, &[("MQTT_BROKER_PORT", "8883")]));
        assert_eq!(checked.config.unwrap().mqtt.broker, "127.0.0.1:8883");

        let both = [("MQTT_BROKER_HOST", "::1"), ("MQTT_BROKER_PORT", "1884")];
        let (_dir, checked) = check_with("", &layers(None, &both));
        let config = checked.config.unwrap();
        assert_eq!(config.mqtt.broker, "[::1]:1884");
        assert!(config
            .describe_layers()
            .ends_with(", then the environment variables MQTT_BROKER_HOST, MQTT_BROKER_PORT"));
    }

    #[test]
    fn broker_host_replaces_embedded() {
        let (dir, file) = setup();
        let text = VALID.replace("broker = \"127.0.0.1:1883\"", "broker = \"embedded\"");
        std::fs::write(&file, text).unwrap();
        let checked =
            Config::check_layered(&file, &layers(None, &[("MQTT_BROKER_HOST", "10.0.0.5")]));
        assert_eq!(checked.config.unwrap().mqtt.broker, "10.0.0.5:1883");

        let checked = Config::check_layered(&file, &layers(None, &[("MQTT_BROKER_PORT", "1883")]));
        let errors = error_texts(&checked);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with("environment variable MQTT_BROKER_PORT: key `mqtt.broker`: mqtt.broker is not a host:port address"),
            "{}",
            errors[0]
        );
        drop(dir);
    }

    #[test]
    fn bad_broker_port_names_variable() {
        for value in ["0", "65536", "http", "-1"] {
            let (_dir, checked) = check_with("", &layers(None, &[("MQTT_BROKER_PORT", value)]));
            assert_eq!(
                error_texts(&checked),
                vec![format!(
                    "environment variable MQTT_BROKER_PORT: key `mqtt.broker`: \"{value}\" is not a port number \
                     from 1 to 65535; set MQTT_BROKER_PORT to the broker's port, for example 1883 or 8883"
                )]
            );
        }
    }

    #[test]
    fn variable_value_error_names_variable() {
        // A key the variable sets is reported as the variable's, not the
        // base file's.
        for value in ["bad host", "mqtt.example.net:1883", "a/b"] {
            let (_dir, checked) = check_with("", &layers(None, &[("MQTT_BROKER_HOST", value)]));
            let errors = error_texts(&checked);
            assert_eq!(errors.len(), 1, "{errors:#?}");
            assert!(
                errors[0].starts_with(&format!(
                    "environment variable MQTT_BROKER_HOST: key `mqtt.broker`: \"{value}\" is not a host name"
                )),
                "{}",
                errors[0]
            );
        }
        let (_dir, checked) = check_with("", &layers(None, &[("MQTT_BROKER_HOST", "[fe80::1]")]));
        assert_eq!(checked.config.unwrap().mqtt.broker, "[fe80::1]:1883");
    }

    #[test]
    fn file_password_never_in_errors() {
        for (line, secret) in [
            ("password = 98765432123", "98765432123"),
            ("password = \"S3cr3tPw!xyz", "S3cr3tPw"),
            ("password = S3cr3tPw", "S3cr3tPw"),
            ("password = [\"S3cr3tPw\"]", "S3cr3tPw"),
        ] {
            let text = VALID.replace(
                "client_id = \"eliot-test\"",
                &format!("client_id = \"eliot-test\"\nusername = \"eliot\"\n{line}"),
            );
            let (_file, errors) = errors(&text);
            let text = errors.join("\n");
            assert!(!errors.is_empty(), "{line}");
            assert!(!text.contains(secret), "{line}: {text}");
            assert!(
                text.contains("line 6"),
                "{line}: the position is still named: {text}"
            );
        }
    }

    #[test]
    fn secret_never_appears_in_errors() {
        let secret = "pa55-w0rd-secret";
        let long_secret = "x".repeat(70_000);
        for password in [secret, long_secret.as_str()] {
            let (_dir, checked) = check_with(
                "[pipelines.telemetry]\nworkers = 0\n",
                &layers(
                    Some("dev"),
                    &[("MQTT_PASSWORD", password), ("MQTT_BROKER_PORT", "99999")],
                ),
            );
            let text = ConfigErrors(checked.errors.clone()).to_string();
            assert!(!checked.errors.is_empty());
            assert!(!text.contains(password), "{text}");
        }
        let debug = format!("{:?}", layers(None, &[("MQTT_PASSWORD", secret)]));
        assert!(!debug.contains(secret), "{debug}");
        assert!(debug.contains("MQTT_PASSWORD"), "{debug}");
    }

    #[test]
    fn long_password_is_named_not_shown() {
        let long_secret = "y".repeat(70_000);
        let (_dir, checked) = check_with("", &layers(None, &[("MQTT_PASSWORD", &long_secret)]));
        let errors = error_texts(&checked);
        assert_eq!(
            errors[0],
            "environment variable MQTT_PASSWORD: key `mqtt.password`: the value is 70000 bytes long, \
             above MQTT's limit of 65535; use a shorter value"
        );
    }

    #[test]
    fn device_key_forms_are_validated() {
        let with_key = |key: &str| {
            VALID.replace(
                "sinks = [\"file\"]",
                &format!("sinks = [\"file\"]\ndevice_key = {key}"),
            )
        };
        let (_dir, file) = setup();
        let config = Config::parse(&file, &with_key("{ payload = \"id\" }")).unwrap();
        assert_eq!(
            config.pipelines["telemetry"].device_key,
            DeviceKey::PayloadField("id".to_owned())
        );
        let config = Config::parse(
            &file,
            &with_key("{ topic = \"devices/{device_id}/telemetry\" }"),
        )
        .unwrap();
        assert!(matches!(
            config.pipelines["telemetry"].device_key,
            DeviceKey::TopicPattern(_)
        ));
        let config = Config::parse(&file, VALID).unwrap();
        assert_eq!(config.pipelines["telemetry"].device_key, DeviceKey::Topic);

        for (key, expected) in [
            ("{ topic = \"a/b\", payload = \"id\" }", "key `pipelines.telemetry.device_key`: both topic and payload are set"),
            ("{}", "key `pipelines.telemetry.device_key`: neither topic nor payload is set"),
            ("{ payload = \"\" }", "key `pipelines.telemetry.device_key.payload`: the field name is empty"),
            (
                "{ topic = \"devices/+/telemetry\" }",
                "key `pipelines.telemetry.device_key.topic`: invalid device key pattern: \"devices/+/telemetry\" must contain {device_id} exactly once",
            ),
            ("{ header = \"id\" }", "key `pipelines.telemetry.device_key.header`: unknown field `header`"),
        ] {
            let (_file, errors) = errors(&with_key(key));
            assert_eq!(errors.len(), 1, "{key}: {errors:#?}");
            assert!(errors[0].contains(expected), "{key}: {}", errors[0]);
        }
    }

    #[test]
    fn shipped_overlays_are_valid() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/eliot.toml");
        for profile in [None, Some("dev"), Some("prod")] {
            let checked = Config::check_layered(&base, &layers(profile, &[]));
            // The plugin files are built separately, and production's
            // folders exist only where it is deployed.
            let others: Vec<String> = checked
                .errors
                .iter()
                .filter(|e| !(e.key.ends_with(".file") && e.problem.contains("not found")))
                .map(ToString::to_string)
                .collect();
            assert!(others.is_empty(), "{profile:?}: {others:#?}");
        }
    }

    #[test]
    fn redact_removes_file_and_variable_secrets() {
        let table: toml::Table = "[mqtt]\npassword = \"file-5ecret\"\n".parse().unwrap();
        let mut errors = vec![ConfigError {
            origin: Origin::File(PathBuf::from("eliot.toml")),
            key: "mqtt.password".to_owned(),
            problem: "\"file-5ecret\" and \"env-5ecret\" are quoted".to_owned(),
            fix: "not env-5ecret".to_owned(),
        }];
        redact(
            &mut errors,
            &layers(None, &[("MQTT_PASSWORD", "env-5ecret")]),
            &table,
        );
        assert_eq!(
            errors[0].problem,
            "\"<redacted>\" and \"<redacted>\" are quoted"
        );
        assert_eq!(errors[0].fix, "not <redacted>");
    }

    #[test]
    fn tls_broker_without_port_uses_8883() {
        let mqtt = MqttConfig {
            broker: "broker.example".to_owned(),
            client_id: "eliot".to_owned(),
            keep_alive_secs: 30,
            max_packet_bytes: 1024,
            protocol: Protocol::V311,
            session_expiry_secs: None,
            username: None,
            password: None,
            tls: None,
        };
        assert_eq!(mqtt.address(), None);
        let tls = MqttConfig {
            tls: Some(TlsConfig {
                ca_file: None,
                client_cert_file: None,
                client_key_file: None,
                server_name: None,
            }),
            ..mqtt
        };
        assert_eq!(tls.address(), Some(("broker.example".to_owned(), 8883)));
        let ipv6 = MqttConfig {
            broker: "[::1]".to_owned(),
            ..tls.clone()
        };
        assert_eq!(ipv6.address(), Some(("::1".to_owned(), 8883)));
        let with_port = MqttConfig {
            broker: "broker.example:9883".to_owned(),
            ..tls
        };
        assert_eq!(
            with_port.address(),
            Some(("broker.example".to_owned(), 9883))
        );
    }

    #[test]
    fn embedded_broker_rejects_mqtt5() {
        let text = VALID.replace(
            "broker = \"127.0.0.1:1883\"",
            "broker = \"embedded\"\nprotocol = \"5\"",
        );
        let (_file, errors) = errors(&text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].contains(
            "key `mqtt.broker`: the embedded broker speaks plain MQTT 3.1.1 without credentials"
        ));
    }
}
