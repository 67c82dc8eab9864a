//! `eliot plugin new`: writes a plugin skeleton that builds and forwards
//! every message unchanged, in Rust, Python, JavaScript or C.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::plugin_build::Lang;

/// Writes the skeleton of plugin `name` in `lang` to `parent/name` and
/// returns its folder. A Rust plugin inside `workspace` joins its members.
///
/// # Errors
///
/// Fails when the name is not a valid plugin name, the folder exists, or a
/// file cannot be written.
pub fn create(
    name: &str,
    lang: Lang,
    parent: &Path,
    workspace: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let valid = !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        bail!(
            "plugin name \"{name}\" is not valid; use lowercase letters, digits and dashes, starting with a letter"
        );
    }
    if lang == Lang::Rust && RUST_KEYWORDS.contains(&name) {
        bail!("plugin name \"{name}\" is a Rust keyword, which cargo rejects as a package name; choose another name");
    }
    let folder = parent.join(name);
    if folder.exists() {
        bail!(
            "{} exists already; choose another name or remove it",
            folder.display()
        );
    }
    let snake = name.replace('-', "_");
    let files: Vec<(PathBuf, String)> = match lang {
        Lang::Rust => {
            let in_workspace = workspace
                .filter(|root| std::path::absolute(&folder).is_ok_and(|f| f.starts_with(root)));
            // Two packages of one name break every cargo command in the
            // workspace, the host's build included.
            if let Some(root) = in_workspace {
                if let Some(path) = package_path(root, name) {
                    bail!(
                        "the workspace has a package named \"{name}\" already, in {}; choose another name",
                        path.display()
                    );
                }
            }
            let sdk = match in_workspace {
                Some(_) => "eliot-sdk.workspace = true".to_owned(),
                None => {
                    let root = workspace.context(
                        "a Rust plugin outside this repository needs the SDK's path; run this inside the repository",
                    )?;
                    format!(
                        "eliot-sdk = {{ path = \"{}\" }}",
                        root.join("sdk").display()
                    )
                }
            };
            let package = match in_workspace {
                Some(_) => "edition.workspace = true\nlicense.workspace = true\nrust-version.workspace = true\nversion.workspace = true".to_owned(),
                None => "edition = \"2021\"\nversion = \"0.1.0\"".to_owned(),
            };
            let serde = match in_workspace {
                Some(_) => "serde_json.workspace = true",
                None => "serde_json = \"1\"",
            };
            let mut files = vec![
                (
                    PathBuf::from("Cargo.toml"),
                    RUST_MANIFEST
                        .replace("{name}", name)
                        .replace("{package}", &package)
                        .replace("{sdk}", &sdk)
                        .replace("{serde}", serde),
                ),
                (
                    PathBuf::from("src/lib.rs"),
                    RUST_LIB
                        .replace("{name}", name)
                        .replace("{type}", &type_name(name)),
                ),
            ];
            if in_workspace.is_none() {
                // Its own workspace, so that cargo does not look for one above.
                files[0].1.push_str("\n[workspace]\n");
            }
            files
        }
        Lang::Python => vec![(PathBuf::from("app.py"), PYTHON_APP.replace("{name}", name))],
        Lang::Js => vec![(
            PathBuf::from(format!("{snake}.js")),
            JS_MODULE.replace("{name}", name),
        )],
        Lang::C => vec![(
            PathBuf::from(format!("{snake}.c")),
            C_SOURCE.replace("{name}", name),
        )],
    };
    for (path, text) in files {
        let path = folder.join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if lang == Lang::Rust {
        if let Some(root) = workspace {
            let absolute = std::path::absolute(&folder)?;
            if let Ok(relative) = absolute.strip_prefix(root) {
                add_member(root, &relative.to_string_lossy())?;
            }
        }
    }
    Ok(folder)
}

/// Adds `member` to the workspace's `members` and `default-members`, so
/// that `cargo test` runs its tests and `eliot plugin build` finds it.
fn add_member(root: &Path, member: &str) -> anyhow::Result<()> {
    let manifest = root.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    let mut out = String::with_capacity(text.len() + 64);
    let mut added = 0;
    for line in text.lines() {
        out.push_str(line);
        out.push('\n');
        let key = line.trim_start();
        if key.starts_with("members = [") || key.starts_with("default-members = [") {
            if key.ends_with('[') {
                out.push_str(&format!("    \"{member}\",\n"));
                added += 1;
            } else {
                bail!(
                    "cannot add \"{member}\" to {}: write its member lists one entry per line",
                    manifest.display()
                );
            }
        }
    }
    if added == 0 {
        bail!(
            "{} has no `members = [` list; add \"{member}\" to the workspace members",
            manifest.display()
        );
    }
    std::fs::write(&manifest, out).with_context(|| format!("cannot write {}", manifest.display()))
}

/// Words that cargo refuses as package names: Rust's strict and reserved
/// keywords that a plugin name's characters can spell.
const RUST_KEYWORDS: &[&str] = &[
    "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate",
    "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl",
    "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub", "ref",
    "return", "self", "static", "struct", "super", "trait", "true", "try", "type", "typeof",
    "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
];

/// Returns the folder of the workspace member at `root` whose package is
/// called `name`, if there is one.
fn package_path(root: &Path, name: &str) -> Option<PathBuf> {
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .ok()?
            .parse::<toml::Table>()
            .ok()
    };
    let workspace = read(&root.join("Cargo.toml"))?;
    let members = workspace
        .get("workspace")?
        .get("members")?
        .as_array()?
        .clone();
    members
        .iter()
        .filter_map(toml::Value::as_str)
        .map(|member| root.join(member))
        .find(|folder| {
            read(&folder.join("Cargo.toml"))
                .and_then(|manifest| {
                    manifest
                        .get("package")?
                        .get("name")?
                        .as_str()
                        .map(|n| n == name)
                })
                .unwrap_or(false)
        })
}

/// `my-plugin` becomes `MyPlugin`.
fn type_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

const RUST_MANIFEST: &str = r#"[package]
name = "{name}"
{package}
publish = false

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
{sdk}
{serde}
"#;

const RUST_LIB: &str = r#"//! The {name} Eliot plugin.

use eliot_sdk::{Message, Outcome, PluginError, Processor};

pub struct {type};

impl Processor for {type} {
    const NAME: &'static str = "{name}";
    const VERSION: &'static str = "0.1.0";

    fn new(config: serde_json::Value) -> Result<Self, String> {
        if !config.is_object() {
            return Err("the config is not a table".to_owned());
        }
        Ok({type})
    }

    fn process(&mut self, msg: Message) -> Result<Outcome, PluginError> {
        Ok(Outcome::Forward(msg))
    }
}

eliot_sdk::export_processor!({type});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_unchanged() {
        let input = eliot_sdk::testing::message("devices/a/telemetry", b"{}");
        let mut plugin = {type}::new(serde_json::json!({})).unwrap();

        let output = eliot_sdk::testing::forwarded(plugin.process(input.clone()).unwrap());

        assert_eq!(output, input);
    }
}
"#;

const PYTHON_APP: &str = r#""""The {name} Eliot plugin."""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import types


class Processor(exports.Processor):
    def describe(self):
        return types.PluginInfo(name="{name}", version="0.1.0")

    def init(self, config):
        if not isinstance(json.loads(config), dict):
            raise Err("the config is not a table")

    def process(self, msg):
        return types.Outcome_Forward(msg)
"#;

const JS_MODULE: &str = r#"// The {name} Eliot plugin.

export const processor = {
  describe() {
    return { name: '{name}', version: '0.1.0' };
  },

  init(config) {
    const parsed = JSON.parse(config);
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
      throw 'the config is not a table';
    }
  },

  process(msg) {
    return { tag: 'forward', val: msg };
  },
};
"#;

const C_SOURCE: &str = r#"// The {name} Eliot plugin. plugin.h is generated from the WIT by
// `eliot plugin build --lang c`.

#include "plugin.h"

void exports_eliot_plugin_processor_describe(exports_eliot_plugin_processor_plugin_info_t *ret) {
    plugin_string_dup(&ret->name, "{name}");
    plugin_string_dup(&ret->version, "0.1.0");
}

bool exports_eliot_plugin_processor_init(plugin_string_t *config, plugin_string_t *err) {
    bool table = config->len > 0 && config->ptr[0] == '{';
    plugin_string_free(config);
    if (!table) {
        plugin_string_dup(err, "the config is not a table");
    }
    return table;
}

bool exports_eliot_plugin_processor_process(
    exports_eliot_plugin_processor_message_t *msg,
    exports_eliot_plugin_processor_outcome_t *ret,
    exports_eliot_plugin_processor_error_t *err) {
    (void)err;
    // The message goes on as it came; the generated code frees its buffers
    // once the host has copied the result.
    ret->tag = ELIOT_PLUGIN_TYPES_OUTCOME_FORWARD;
    ret->val.forward = *msg;
    return true;
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_name_is_camel_case() {
        assert_eq!(type_name("my-plugin"), "MyPlugin");
        assert_eq!(type_name("x"), "X");
    }

    #[test]
    fn invalid_names_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["", "Upper", "1st", "has space", "a/b"] {
            let error = create(name, Lang::Python, dir.path(), None).unwrap_err();
            assert!(
                error.to_string().contains("is not valid"),
                "{name}: {error}"
            );
        }
    }

    #[test]
    fn keyword_and_taken_names_rejected() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["self", "type", "crate"] {
            let error = create(name, Lang::Rust, dir.path(), None).unwrap_err();
            assert!(
                error.to_string().contains("is a Rust keyword"),
                "{name}: {error}"
            );
        }
        // Other languages have no cargo package, so the name is free there.
        create("self", Lang::Python, dir.path(), None).unwrap();

        let root = std::path::absolute(dir.path()).unwrap();
        std::fs::write(
            root.join("Cargo.toml"),
            "[workspace]\nmembers = [\n    \"sdk\",\n]\n",
        )
        .unwrap();
        std::fs::create_dir(root.join("sdk")).unwrap();
        std::fs::write(
            root.join("sdk/Cargo.toml"),
            "[package]\nname = \"eliot-sdk\"\n",
        )
        .unwrap();
        std::fs::create_dir(root.join("plugins")).unwrap();
        let error =
            create("eliot-sdk", Lang::Rust, &root.join("plugins"), Some(&root)).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("has a package named \"eliot-sdk\" already"),
            "{error}"
        );
        assert!(
            !root.join("plugins/eliot-sdk").exists(),
            "nothing was written"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("Cargo.toml"))
                .unwrap()
                .matches("eliot-sdk")
                .count(),
            0
        );
    }

    #[test]
    fn existing_folder_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("taken")).unwrap();
        let error = create("taken", Lang::C, dir.path(), None).unwrap_err();
        assert!(error.to_string().contains("exists already"), "{error}");
    }

    #[test]
    fn member_joins_both_lists() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("Cargo.toml"),
            "[workspace]\nmembers = [\n    \"host\",\n]\ndefault-members = [\n    \"host\",\n]\n",
        )
        .unwrap();
        add_member(dir.path(), "plugins/new-one").unwrap();
        let text = std::fs::read_to_string(dir.path().join("Cargo.toml")).unwrap();
        assert_eq!(text.matches("\"plugins/new-one\"").count(), 2, "{text}");
    }
}
