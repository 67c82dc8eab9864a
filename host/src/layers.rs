//! Configuration layers: the base file, then the overlay that `ELIOT_ENV`
//! chooses, then environment variables, merged into one TOML table before
//! the schema is checked.
//!
//! The merge remembers where every key came from, so that an error names
//! the file or the variable that set the bad value, not only the base file.

use std::fmt;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use crate::config::ConfigError;

/// The variable that selects an overlay.
pub const PROFILE_VARIABLE: &str = "ELIOT_ENV";

/// The overlays `ELIOT_ENV` can select. Each is `NAME.toml` next to the base
/// file. A fixed list turns a typing error in a deployment into a start-up
/// error instead of a silent run on the base settings.
pub const PROFILES: [&str; 2] = ["dev", "prod"];

/// MQTT's limit on the length of a UTF-8 string field such as the user name
/// or the password, in bytes.
const MQTT_MAX_STRING_BYTES: usize = 65_535;

/// The configuration key an environment variable overrides.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// The host part of `mqtt.broker`.
    BrokerHost,
    /// The port part of `mqtt.broker`.
    BrokerPort,
    /// A string key. `secret` values never appear in errors or logs.
    Text {
        key: &'static [&'static str],
        secret: bool,
    },
    /// A file path key, made absolute against the current folder.
    File { key: &'static [&'static str] },
}

/// Every environment variable Eliot reads for its configuration, in the
/// order they are applied.
const VARIABLES: [(&str, Target); 7] = [
    ("MQTT_BROKER_HOST", Target::BrokerHost),
    ("MQTT_BROKER_PORT", Target::BrokerPort),
    (
        "MQTT_USERNAME",
        Target::Text {
            key: &["mqtt", "username"],
            secret: false,
        },
    ),
    (
        "MQTT_PASSWORD",
        Target::Text {
            key: &["mqtt", "password"],
            secret: true,
        },
    ),
    (
        "MQTT_CLIENT_CERT_FILE",
        Target::File {
            key: &["mqtt", "tls", "client_cert_file"],
        },
    ),
    (
        "MQTT_CLIENT_KEY_FILE",
        Target::File {
            key: &["mqtt", "tls", "client_key_file"],
        },
    ),
    (
        "MQTT_CA_FILE",
        Target::File {
            key: &["mqtt", "tls", "ca_file"],
        },
    ),
];

/// Returns the names of the environment variables that override
/// configuration keys.
pub fn variable_names() -> impl Iterator<Item = &'static str> {
    VARIABLES.iter().map(|(name, _)| *name)
}

/// The layers to apply over a base file: the selected overlay and the
/// override variables, captured once so that a reload applies the same ones.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Layers {
    /// The value of `ELIOT_ENV`, when set and not empty.
    pub profile: Option<String>,
    /// Override variables that are set and not empty, as (name, value).
    pub variables: Vec<(String, String)>,
}

impl Layers {
    /// Reads `ELIOT_ENV` and the override variables from the process
    /// environment. A variable set to the empty string counts as unset,
    /// because compose files and systemd units often list every variable
    /// and leave the unused ones empty.
    pub fn from_process() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the layers through `lookup`, which returns a variable's value.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let read = |name: &str| lookup(name).filter(|value| !value.is_empty());
        Self {
            profile: read(PROFILE_VARIABLE),
            variables: variable_names()
                .filter_map(|name| read(name).map(|value| (name.to_owned(), value)))
                .collect(),
        }
    }

    /// Names of the override variables that are set.
    pub fn variable_names(&self) -> Vec<&str> {
        self.variables
            .iter()
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// Values that must not appear in any error text or log line.
    pub fn secrets(&self) -> Vec<&str> {
        self.variables
            .iter()
            .filter(|(name, _)| {
                VARIABLES.iter().any(|(known, target)| {
                    known == name && matches!(target, Target::Text { secret: true, .. })
                })
            })
            .map(|(_, value)| value.as_str())
            .collect()
    }
}

/// Prints variable names only: the values may be secrets.
impl fmt::Debug for Layers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layers")
            .field("profile", &self.profile)
            .field("variables", &self.variable_names())
            .finish()
    }
}

/// The source of a configuration value: a file or environment variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    /// One or more environment variables, by name.
    Variables(Vec<&'static str>),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Variables(names) if names.len() == 1 => {
                write!(f, "environment variable {}", names[0])
            }
            Self::Variables(names) => write!(f, "environment variables {}", names.join(" and ")),
        }
    }
}

/// The origin of every key the layers over the base file set, and the text
/// of each file for line numbers.
#[derive(Debug, Clone)]
pub struct Origins {
    base: PathBuf,
    /// Key paths set by an overlay or a variable, in the order applied; a
    /// later entry for the same path wins.
    set: Vec<(Vec<String>, Origin)>,
    texts: Vec<(PathBuf, String)>,
}

impl Origins {
    /// Origins of a table read from the base file alone.
    pub fn base(path: &Path, text: &str) -> Self {
        Self {
            base: path.to_owned(),
            set: Vec::new(),
            texts: vec![(path.to_owned(), text.to_owned())],
        }
    }

    /// Returns the origin of the dotted key path `key` (array indices, as
    /// in `a.b[0]`, are ignored): the layer that set the longest prefix of
    /// it, or the base file.
    pub fn of(&self, key: &str) -> Origin {
        let segments = key_segments(key);
        self.set
            .iter()
            .rev()
            .filter(|(path, _)| segments.starts_with(path))
            .max_by_key(|(path, _)| path.len())
            .map_or_else(
                || Origin::File(self.base.clone()),
                |(_, origin)| origin.clone(),
            )
    }

    /// Returns the line of `key` in the file it came from, when it came
    /// from a file and the key is written there.
    pub fn line_of(&self, key: &str) -> Option<usize> {
        let Origin::File(path) = self.of(key) else {
            return None;
        };
        let (_, text) = self.texts.iter().find(|(file, _)| *file == path)?;
        line_of_key(text, &key_segments(key))
    }
}

/// Splits `a.b[0].c` into `["a", "b", "c"]`.
fn key_segments(key: &str) -> Vec<String> {
    key.split('.')
        .map(|segment| segment.split('[').next().unwrap_or_default().to_owned())
        .filter(|segment| !segment.is_empty())
        .collect()
}

/// Finds the line where the deepest written part of `segments` is.
fn line_of_key(text: &str, segments: &[String]) -> Option<usize> {
    let document = toml::de::DeTable::parse(text).ok()?;
    let mut table = document.get_ref();
    let mut offset = None;
    for segment in segments {
        let Some((key, value)) = table.iter().find(|(key, _)| key.get_ref() == segment) else {
            break;
        };
        offset = Some(key.span().start);
        match value.get_ref() {
            toml::de::DeValue::Table(inner) => table = inner,
            _ => break,
        }
    }
    offset.map(|offset| text[..offset.min(text.len())].matches('\n').count() + 1)
}

/// The merged table with the origin of its keys.
#[derive(Debug)]
pub struct Layered {
    pub table: Table,
    pub origins: Origins,
    /// The overlay file applied, if any.
    pub overlay: Option<PathBuf>,
    /// Problems with the override variables. The table is still usable, so
    /// that `eliot check` reports these and the schema's problems at once.
    pub errors: Vec<ConfigError>,
}

/// Applies `layers` over the base file `base_path` with content `base_text`.
///
/// # Errors
///
/// Returns the problems that leave no table to validate: TOML syntax in
/// either file, an unknown `ELIOT_ENV` value, or a missing overlay file.
pub fn apply(
    base_path: &Path,
    base_text: &str,
    layers: &Layers,
) -> Result<Layered, Vec<ConfigError>> {
    let mut table = parse_table(base_path, base_text).map_err(|e| vec![e])?;
    let mut origins = Origins::base(base_path, base_text);

    // The overlay, merged table by table.
    let overlay = match &layers.profile {
        None => None,
        Some(profile) => {
            let path = overlay_path(base_path, profile)?;
            let text = std::fs::read_to_string(&path).map_err(|e| {
                vec![ConfigError {
                    origin: Origin::File(path.clone()),
                    key: "(file)".to_owned(),
                    problem: format!(
                        "cannot read the overlay that {PROFILE_VARIABLE}={profile} selects: {e}"
                    ),
                    fix: "make the file readable by the user Eliot runs as".to_owned(),
                }]
            })?;
            let overlay = parse_table(&path, &text).map_err(|e| vec![e])?;
            let origin = Origin::File(path.clone());
            merge(
                &mut table,
                overlay,
                &mut Vec::new(),
                &mut origins.set,
                &origin,
            );
            origins.texts.push((path.clone(), text));
            Some(path)
        }
    };

    // The override variables, on the merged table.
    let mut errors = Vec::new();
    apply_broker(&mut table, layers, &mut origins, &mut errors);
    for (name, target) in VARIABLES {
        let Some(value) = lookup(layers, name) else {
            continue;
        };
        let (key, value) = match target {
            Target::BrokerHost | Target::BrokerPort => continue,
            Target::Text { key, secret } => {
                if value.len() > MQTT_MAX_STRING_BYTES {
                    // Only the length, never the value: it may be a secret.
                    let shown = if secret {
                        "the value".to_owned()
                    } else {
                        format!("\"{value}\"")
                    };
                    errors.push(variable_error(
                        name,
                        key,
                        format!("{shown} is {} bytes long, above MQTT's limit of {MQTT_MAX_STRING_BYTES}", value.len()),
                        "use a shorter value",
                    ));
                    continue;
                }
                (key, value.to_owned())
            }
            // The current folder, not the base file's folder: a path given
            // on the command line or in a unit file is read from where the
            // process starts, as every other tool does.
            Target::File { key } => {
                let path = Path::new(value);
                let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
                (key, path.display().to_string())
            }
        };
        match set_key(&mut table, key, Value::String(value)) {
            Ok(()) => origins
                .set
                .push((key.iter().map(|s| (*s).to_owned()).collect(), Origin::Variables(vec![name]))),
            Err(parent) => errors.push(variable_error(
                name,
                key,
                format!("`{parent}` in the configuration files is not a table, so {name} cannot set a key inside it"),
                format!("write `{parent}` as a table, or unset {name}"),
            )),
        }
    }

    Ok(Layered {
        table,
        origins,
        overlay,
        errors,
    })
}

fn lookup<'a>(layers: &'a Layers, name: &str) -> Option<&'a str> {
    layers
        .variables
        .iter()
        .find(|(known, _)| known == name)
        .map(|(_, value)| value.as_str())
}

fn variable_error(
    name: &'static str,
    key: &[&str],
    problem: String,
    fix: impl Into<String>,
) -> ConfigError {
    ConfigError {
        origin: Origin::Variables(vec![name]),
        key: key.join("."),
        problem,
        fix: fix.into(),
    }
}

/// Replaces the host or the port of `mqtt.broker` from `MQTT_BROKER_HOST`
/// and `MQTT_BROKER_PORT`.
///
/// When `mqtt.broker` is `"embedded"` (or not `host:port`), a host from the
/// environment points Eliot at that external broker, on the given port or
/// else MQTT's 1883. A port alone has no host to go with and is an error.
fn apply_broker(
    table: &mut Table,
    layers: &Layers,
    origins: &mut Origins,
    errors: &mut Vec<ConfigError>,
) {
    let host = lookup(layers, "MQTT_BROKER_HOST");
    let port_text = lookup(layers, "MQTT_BROKER_PORT");
    if host.is_none() && port_text.is_none() {
        return;
    }
    let key = ["mqtt", "broker"];

    let mut port = None;
    if let Some(text) = port_text {
        match text.trim().parse::<u16>() {
            Ok(value) if value != 0 => port = Some(value),
            _ => {
                errors.push(variable_error(
                    "MQTT_BROKER_PORT",
                    &key,
                    format!("\"{text}\" is not a port number from 1 to 65535"),
                    "set MQTT_BROKER_PORT to the broker's port, for example 1883 or 8883",
                ));
                return;
            }
        }
    }
    if let Some(text) = host {
        // A colon is allowed only inside an IPv6 address, so that a
        // "host:port" value is not taken for one.
        let bare = text.trim_start_matches('[').trim_end_matches(']');
        let bad_colon = text.contains(':') && bare.parse::<std::net::Ipv6Addr>().is_err();
        if bad_colon || text.chars().any(|c| c.is_whitespace() || c == '/') {
            errors.push(variable_error(
                "MQTT_BROKER_HOST",
                &key,
                format!("\"{text}\" is not a host name or IP address"),
                "set MQTT_BROKER_HOST to a name such as mqtt.example.net or an address such as 10.0.0.5, without a port",
            ));
            return;
        }
    }

    let current = table
        .get("mqtt")
        .and_then(|mqtt| mqtt.get("broker"))
        .and_then(Value::as_str)
        .and_then(crate::broker::parse_address);
    let names: Vec<&'static str> = [
        ("MQTT_BROKER_HOST", host.is_some()),
        ("MQTT_BROKER_PORT", port.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    let (host, port) = match (host, current, port) {
        (Some(host), Some((_, old_port)), port) => (host.to_owned(), port.unwrap_or(old_port)),
        (Some(host), None, port) => (host.to_owned(), port.unwrap_or(1883)),
        (None, Some((old_host, _)), Some(port)) => (old_host, port),
        (None, Some(_), None) => return,
        (None, None, _) => {
            errors.push(variable_error(
                "MQTT_BROKER_PORT",
                &key,
                "mqtt.broker is not a host:port address (it may be \"embedded\"), so the port has no host to go with"
                    .to_owned(),
                "set MQTT_BROKER_HOST as well, or write mqtt.broker as \"HOST:PORT\"",
            ));
            return;
        }
    };
    // An IPv6 address needs brackets to keep its colons apart from the port.
    let address = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    match set_key(table, &key, Value::String(address)) {
        Ok(()) => origins.set.push((
            key.iter().map(|s| (*s).to_owned()).collect(),
            Origin::Variables(names),
        )),
        Err(parent) => errors.push(variable_error(
            "MQTT_BROKER_HOST",
            &key,
            format!("`{parent}` in the configuration files is not a table"),
            "write [mqtt] as a table",
        )),
    }
}

/// Returns the overlay file for `profile`, next to the base file.
fn overlay_path(base_path: &Path, profile: &str) -> Result<PathBuf, Vec<ConfigError>> {
    let folder = base_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let found = toml_files(folder, base_path);
    let found_text = if found.is_empty() {
        format!("no other .toml file is in {}", folder.display())
    } else {
        format!("files in {}: {}", folder.display(), found.join(", "))
    };
    let error = |problem: String, fix: String| {
        vec![ConfigError {
            origin: Origin::Variables(vec![PROFILE_VARIABLE]),
            key: "(overlay)".to_owned(),
            problem,
            fix,
        }]
    };
    if !PROFILES.contains(&profile) {
        return Err(error(
            format!("\"{profile}\" is not a known environment; {found_text}"),
            format!(
                "set {PROFILE_VARIABLE} to {} or unset it",
                PROFILES.join(" or ")
            ),
        ));
    }
    let path = folder.join(format!("{profile}.toml"));
    if !path.is_file() {
        return Err(error(
            format!(
                "{PROFILE_VARIABLE}={profile} selects {}, which does not exist; {found_text}",
                path.display()
            ),
            format!("create {profile}.toml next to the base file, or unset {PROFILE_VARIABLE}"),
        ));
    }
    Ok(path)
}

/// Names of the `.toml` files in `folder` other than `base`, sorted.
fn toml_files(folder: &Path, base: &Path) -> Vec<String> {
    let base_name = base.file_name();
    let mut names: Vec<String> = std::fs::read_dir(folder)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "toml"))
        .filter(|entry| Some(entry.file_name().as_os_str()) != base_name)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn parse_table(path: &Path, text: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|e| {
        // Only the position and toml's own message: its `Display` quotes
        // the offending line, which may hold a password.
        let position = e
            .span()
            .map(|span| {
                let before = text.get(..span.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!(" at line {line}, column {column}")
            })
            .unwrap_or_default();
        ConfigError {
            origin: Origin::File(path.to_owned()),
            key: "(syntax)".to_owned(),
            problem: format!(
                "invalid TOML{position}: {}",
                e.message().split_whitespace().collect::<Vec<_>>().join(" ")
            ),
            fix: "correct the syntax at that position".to_owned(),
        }
    })
}

/// Merges `overlay` into `base`: a table merges key by key, any other value
/// (arrays included) replaces. Records the path of every replaced value.
fn merge(
    base: &mut Table,
    overlay: Table,
    path: &mut Vec<String>,
    set: &mut Vec<(Vec<String>, Origin)>,
    origin: &Origin,
) {
    for (key, value) in overlay {
        path.push(key.clone());
        match (base.get_mut(&key), value) {
            (Some(Value::Table(inner)), Value::Table(overlay_inner)) => {
                merge(inner, overlay_inner, path, set, origin);
            }
            (_, value) => {
                set.push((path.clone(), origin.clone()));
                base.insert(key, value);
            }
        }
        path.pop();
    }
}

/// Sets the key at `path`, creating missing tables on the way. Returns the
/// dotted path of a value on the way that is not a table.
fn set_key(table: &mut Table, path: &[&str], value: Value) -> Result<(), String> {
    let (last, parents) = path
        .split_last()
        .expect("a key path has at least one segment");
    let mut current = table;
    for (index, parent) in parents.iter().enumerate() {
        let entry = current
            .entry((*parent).to_owned())
            .or_insert_with(|| Value::Table(Table::new()));
        match entry {
            Value::Table(inner) => current = inner,
            _ => return Err(path[..=index].join(".")),
        }
    }
    current.insert((*last).to_owned(), value);
    Ok(())
}

/// One step of a key path: a table key or an array index.
enum Step {
    Key(String),
    Index(usize),
}

/// Removes the key at the dotted path `key` (with array indices as in
/// `a.b[0]`). Returns whether something was removed.
pub fn remove_key(table: &mut Table, key: &str) -> bool {
    let mut steps = Vec::new();
    for segment in key.split('.').filter(|s| !s.is_empty()) {
        let mut pieces = segment.split('[');
        let name = pieces.next().unwrap_or_default();
        if !name.is_empty() {
            steps.push(Step::Key(name.to_owned()));
        }
        for piece in pieces {
            match piece.trim_end_matches(']').parse() {
                Ok(index) => steps.push(Step::Index(index)),
                Err(_) => return false,
            }
        }
    }
    match steps.split_first() {
        Some((Step::Key(name), [])) => table.remove(name).is_some(),
        Some((Step::Key(name), rest)) => table
            .get_mut(name)
            .is_some_and(|inner| remove_in(inner, rest)),
        _ => false,
    }
}

fn remove_in(value: &mut Value, steps: &[Step]) -> bool {
    let Some((step, rest)) = steps.split_first() else {
        return false;
    };
    match (value, step) {
        (Value::Table(table), Step::Key(name)) if rest.is_empty() => table.remove(name).is_some(),
        (Value::Table(table), Step::Key(name)) => table
            .get_mut(name)
            .is_some_and(|inner| remove_in(inner, rest)),
        (Value::Array(array), Step::Index(index)) if *index < array.len() => {
            if rest.is_empty() {
                array.remove(*index);
                true
            } else {
                remove_in(&mut array[*index], rest)
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(variables: &[(&str, &str)]) -> Layers {
        Layers {
            profile: None,
            variables: variables
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
        }
    }

    const BASE: &str = "[mqtt]\nbroker = \"127.0.0.1:1883\"\nclient_id = \"a\"\n";

    fn get<'t>(table: &'t Table, path: &[&str]) -> Option<&'t Value> {
        let (first, rest) = path.split_first()?;
        rest.iter()
            .try_fold(table.get(*first)?, |value, key| value.get(*key))
    }

    #[test]
    fn credential_and_tls_variables_set_their_keys() {
        let layered = apply(
            Path::new("/etc/eliot/eliot.toml"),
            BASE,
            &layers(&[
                ("MQTT_USERNAME", "gateway-7"),
                ("MQTT_PASSWORD", "s3cret"),
                ("MQTT_CLIENT_CERT_FILE", "/run/secrets/client.pem"),
                ("MQTT_CLIENT_KEY_FILE", "/run/secrets/client.key"),
                ("MQTT_CA_FILE", "/run/secrets/ca.pem"),
            ]),
        )
        .unwrap();
        assert!(layered.errors.is_empty(), "{:#?}", layered.errors);
        let table = &layered.table;
        let text = |path: &[&str]| get(table, path).and_then(Value::as_str).map(str::to_owned);
        assert_eq!(text(&["mqtt", "username"]).as_deref(), Some("gateway-7"));
        assert_eq!(text(&["mqtt", "password"]).as_deref(), Some("s3cret"));
        assert_eq!(
            text(&["mqtt", "tls", "client_cert_file"]).as_deref(),
            Some("/run/secrets/client.pem")
        );
        assert_eq!(
            text(&["mqtt", "tls", "client_key_file"]).as_deref(),
            Some("/run/secrets/client.key")
        );
        assert_eq!(
            text(&["mqtt", "tls", "ca_file"]).as_deref(),
            Some("/run/secrets/ca.pem")
        );
        assert_eq!(
            text(&["mqtt", "client_id"]).as_deref(),
            Some("a"),
            "other keys stay"
        );

        assert_eq!(
            layered.origins.of("mqtt.tls.ca_file"),
            Origin::Variables(vec!["MQTT_CA_FILE"])
        );
        assert_eq!(
            layered.origins.of("mqtt.client_id"),
            Origin::File(PathBuf::from("/etc/eliot/eliot.toml"))
        );
    }

    #[test]
    fn relative_file_variable_resolves_against_current_folder() {
        let layered = apply(
            Path::new("/etc/eliot/eliot.toml"),
            BASE,
            &layers(&[("MQTT_CA_FILE", "certs/ca.pem")]),
        )
        .unwrap();
        let expected = std::env::current_dir().unwrap().join("certs/ca.pem");
        assert_eq!(
            get(&layered.table, &["mqtt", "tls", "ca_file"]).and_then(Value::as_str),
            Some(expected.to_str().unwrap())
        );
    }

    #[test]
    fn variables_merge_into_existing_tls_table() {
        let base =
            format!("{BASE}\n[mqtt.tls]\nca_file = \"ca.pem\"\nclient_cert_file = \"c.pem\"\n");
        let layered = apply(
            Path::new("/etc/eliot/eliot.toml"),
            &base,
            &layers(&[("MQTT_CA_FILE", "/x/ca.pem")]),
        )
        .unwrap();
        let tls = get(&layered.table, &["mqtt", "tls"]).unwrap();
        assert_eq!(
            tls.get("ca_file").and_then(Value::as_str),
            Some("/x/ca.pem")
        );
        assert_eq!(
            tls.get("client_cert_file").and_then(Value::as_str),
            Some("c.pem")
        );
    }

    #[test]
    fn variable_into_non_table_is_an_error() {
        let base = format!("{BASE}tls = \"yes\"\n");
        let layered = apply(
            Path::new("/etc/eliot/eliot.toml"),
            &base,
            &layers(&[("MQTT_CA_FILE", "/x/ca.pem")]),
        )
        .unwrap();
        let errors: Vec<String> = layered.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            vec!["environment variable MQTT_CA_FILE: key `mqtt.tls.ca_file`: `mqtt.tls` in the configuration \
                  files is not a table, so MQTT_CA_FILE cannot set a key inside it; write `mqtt.tls` as a table, \
                  or unset MQTT_CA_FILE"]
        );
    }

    #[test]
    fn merge_replaces_values_and_merges_tables() {
        let mut base: Table = "a = 1\n[t]\nx = 1\ny = [1, 2]\n[t.inner]\nk = 1\n"
            .parse()
            .unwrap();
        let overlay: Table = "[t]\ny = [3]\n[t.inner]\nj = 2\n".parse().unwrap();
        let mut set = Vec::new();
        merge(
            &mut base,
            overlay,
            &mut Vec::new(),
            &mut set,
            &Origin::File(PathBuf::from("o.toml")),
        );
        let expected: Table = "a = 1\n[t]\nx = 1\ny = [3]\n[t.inner]\nk = 1\nj = 2\n"
            .parse()
            .unwrap();
        assert_eq!(base, expected);
        let paths: Vec<String> = set.iter().map(|(path, _)| path.join(".")).collect();
        assert_eq!(paths, vec!["t.inner.j", "t.y"]);
    }

    #[test]
    fn remove_key_follows_tables_and_arrays() {
        let mut table: Table = "[a]\nb = [1, 2, 3]\nc = 1\n".parse().unwrap();
        assert!(remove_key(&mut table, "a.b[1]"));
        assert!(remove_key(&mut table, "a.c"));
        assert!(!remove_key(&mut table, "a.zz"));
        let expected: Table = "[a]\nb = [1, 3]\n".parse().unwrap();
        assert_eq!(table, expected);
    }

    #[test]
    fn empty_variable_counts_as_unset() {
        let environment = [
            ("ELIOT_ENV", ""),
            ("MQTT_USERNAME", ""),
            ("MQTT_BROKER_HOST", "h"),
            ("OTHER", "x"),
        ];
        let layers = Layers::from_lookup(|name| {
            environment
                .iter()
                .find(|(known, _)| *known == name)
                .map(|(_, value)| (*value).to_owned())
        });
        assert_eq!(layers.profile, None);
        assert_eq!(
            layers.variables,
            vec![("MQTT_BROKER_HOST".to_owned(), "h".to_owned())]
        );
    }
}
