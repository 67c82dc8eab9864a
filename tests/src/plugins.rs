//! Builds plugin crates of the workspace into WebAssembly components for
//! `wasm32-wasip2` and copies them into one plugin folder for the host.
//!
//! Several test binaries may build at the same time. Cargo's lock on the
//! target folder serializes the builds, and each component is copied to a
//! temporary file and renamed into place, so a reader sees either the old or
//! the new file, never a partly written one.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use serde_json::Value;

/// Rust target of the plugin components.
pub const WASM_TARGET: &str = "wasm32-wasip2";

/// Cargo packages of the example plugins, in pipeline order.
pub const EXAMPLE_PACKAGES: [&str; 3] = ["validate-format", "enrich", "sanity-filter"];

/// Builds the three example plugins once per test process, in release mode,
/// and returns the plugin folder that contains `validate_format.wasm`,
/// `enrich.wasm` and `sanity_filter.wasm`.
///
/// # Panics
///
/// Panics with cargo's error output when the build fails.
pub fn build_examples() -> PathBuf {
    static EXAMPLES: OnceLock<PathBuf> = OnceLock::new();
    EXAMPLES
        .get_or_init(|| {
            let components = build_components(&EXAMPLE_PACKAGES);
            components[0]
                .parent()
                .expect("a component path has a parent folder")
                .to_path_buf()
        })
        .clone()
}

/// Cargo packages of the misbehaving test plugins in `tests/plugins/`.
pub const TEST_PLUGIN_PACKAGES: [&str; 4] =
    ["loop-forever", "memory-hog", "flaky-panic", "sandbox-probe"];

/// Builds one plugin package of the workspace, once per test process, and
/// returns the path of its component in the plugin folder of
/// [`build_examples`]. The file name is the library name with `.wasm`, for
/// example `validate_format.wasm` for the package `validate-format`.
///
/// # Panics
///
/// Panics with cargo's error output when the build fails.
pub fn build_plugin(package: &str) -> PathBuf {
    build_plugins(&[package]).remove(0)
}

/// Builds plugin packages of the workspace, each once per test process, and
/// returns the paths of their components in the order of `packages`, as
/// [`build_plugin`] does. The packages not built yet are built with one
/// cargo call, which is much faster than one call per package.
///
/// # Panics
///
/// Panics with cargo's error output when the build fails.
pub fn build_plugins(packages: &[&str]) -> Vec<PathBuf> {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    // Holding the lock during the build keeps two threads from building
    // the same package. Cargo would serialize them anyway.
    let mut built = built
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());

    let mut missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !built.contains_key(*package))
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if !missing.is_empty() {
        let paths = build_components(&missing);
        for (package, path) in missing.iter().zip(paths) {
            built.insert((*package).to_owned(), path);
        }
    }

    packages
        .iter()
        .map(|package| built[*package].clone())
        .collect()
}

/// Builds the `versioned` test plugin so that it reports `version`, and with
/// `rejects` so that its `init` rejects every config, and returns its
/// component, copied to `versioned-{version}.wasm` (or
/// `versioned-{version}-rejects.wasm`) in the plugin folder of
/// [`build_examples`]. Each variant is built once per test process.
///
/// # Panics
///
/// Panics with cargo's error output when the build fails.
pub fn build_versioned(version: &str, rejects: bool) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<(String, bool), PathBuf>>> = OnceLock::new();
    // One build at a time: every variant is built to the same artifact path
    // and copied away before the next build overwrites it.
    let mut built = BUILT
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(path) = built.get(&(version.to_owned(), rejects)) {
        return path.clone();
    }

    ensure_wasm_target();
    let mut variables = vec![("ELIOT_TEST_PLUGIN_VERSION", version)];
    if rejects {
        variables.push(("ELIOT_TEST_PLUGIN_REJECT", "1"));
    }
    let artifact = cargo_build_with(&["versioned"], &variables).remove(0);
    let plugin_dir = plugin_dir_for(&artifact);
    fs::create_dir_all(&plugin_dir)
        .unwrap_or_else(|err| panic!("failed to create {}: {err}", plugin_dir.display()));
    let suffix = if rejects { "-rejects" } else { "" };
    let destination = plugin_dir.join(format!("versioned-{version}{suffix}.wasm"));
    copy_atomically(&artifact, &destination)
        .unwrap_or_else(|err| panic!("failed to copy {}: {err}", artifact.display()));
    built.insert((version.to_owned(), rejects), destination.clone());
    destination
}

/// Plugin folders of the examples written in other languages than Rust.
pub const LANGUAGE_EXAMPLES: [(&str, eliot::plugin_build::Lang); 3] = [
    ("plugins/rolling-anomaly", eliot::plugin_build::Lang::Python),
    ("plugins/geofence", eliot::plugin_build::Lang::Js),
    ("plugins/range-filter", eliot::plugin_build::Lang::C),
];

/// Builds the Python, JavaScript and C example plugins from source once per
/// test process, with the same code as `eliot plugin build --lang`, into the
/// plugin folder of [`build_examples`]: `rolling_anomaly.wasm`,
/// `geofence.wasm` and `range_filter.wasm`.
///
/// # Panics
///
/// Panics when a build tool is missing, with the command that installs it,
/// or when a build fails, with the tool's output.
pub fn build_language_examples() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = build_examples();
            let workspace = crate::workspace_root();
            for (folder, lang) in LANGUAGE_EXAMPLES {
                let tools = eliot::plugin_build::toolchain_dir(Some(&workspace));
                eliot::plugin_build::build_lang(lang, &tools, &workspace.join("wit"), &workspace.join(folder), &out)
                    .unwrap_or_else(|e| panic!("building {folder} ({lang:?}) failed: {e:#}"));
            }
            out
        })
        .clone()
}

/// Builds `packages` with one cargo call and returns the paths of their
/// copied components, in the order of `packages`.
fn build_components(packages: &[&str]) -> Vec<PathBuf> {
    ensure_wasm_target();
    let artifacts = cargo_build(packages);

    let mut copies = Vec::with_capacity(packages.len());
    for (package, artifact) in packages.iter().zip(&artifacts) {
        let plugin_dir = plugin_dir_for(artifact);
        fs::create_dir_all(&plugin_dir)
            .unwrap_or_else(|err| panic!("failed to create {}: {err}", plugin_dir.display()));
        let file_name = artifact
            .file_name()
            .expect("a cargo artifact has a file name");
        let destination = plugin_dir.join(file_name);
        copy_atomically(artifact, &destination).unwrap_or_else(|err| {
            panic!(
                "failed to copy the component of {package} to {}: {err}",
                destination.display()
            )
        });
        copies.push(destination);
    }
    copies
}

/// Returns `<target dir>/eliot-tests/plugins` for an artifact in
/// `<target dir>/wasm32-wasip2/release/`.
fn plugin_dir_for(artifact: &Path) -> PathBuf {
    let target_dir = artifact
        .ancestors()
        .nth(3)
        .unwrap_or_else(|| panic!("unexpected cargo artifact path {}", artifact.display()));
    target_dir.join("eliot-tests").join("plugins")
}

fn copy_atomically(source: &Path, destination: &Path) -> std::io::Result<()> {
    let file_name = destination
        .file_name()
        .expect("the destination has a file name")
        .to_string_lossy();
    // Unique per process and call, so that concurrent copies never share a
    // temporary file.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let sequence = NEXT.fetch_add(1, Ordering::Relaxed);
    let temporary = destination.with_file_name(format!(
        ".{file_name}.{}-{sequence}.tmp",
        std::process::id()
    ));
    fs::copy(source, &temporary)?;
    fs::rename(&temporary, destination)
}

/// Runs cargo and returns the `.wasm` artifact of each package.
fn cargo_build(packages: &[&str]) -> Vec<PathBuf> {
    cargo_build_with(packages, &[])
}

/// Runs cargo with the environment `variables` set, and returns the `.wasm`
/// artifact of each package.
fn cargo_build_with(packages: &[&str], variables: &[(&str, &str)]) -> Vec<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command.envs(variables.iter().copied());
    command
        .current_dir(crate::workspace_root())
        .args(["build", "--release", "--target", WASM_TARGET])
        .arg("--message-format=json-render-diagnostics");
    for package in packages {
        command.args(["-p", package]);
    }

    let output = run(&mut command);
    if !output.status.success() {
        panic!(
            "`cargo build --release --target {WASM_TARGET} -p {}` failed with {}. If the target \
             is missing, run `rustup target add {WASM_TARGET}`. cargo's error output:\n{}",
            packages.join(" -p "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let stdout = String::from_utf8_lossy(&output.stdout);
    packages
        .iter()
        .map(|package| {
            find_wasm_artifact(&stdout, package).unwrap_or_else(|| {
                panic!(
                    "cargo built {package} but reported no .wasm file for it; is its crate-type \
                     `cdylib`? cargo's messages:\n{stdout}"
                )
            })
        })
        .collect()
}

/// Finds the `.wasm` file of a package's library in cargo's JSON messages.
fn find_wasm_artifact(messages: &str, package: &str) -> Option<PathBuf> {
    let library_name = package.replace('-', "_");
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == library_name.as_str())
        .flat_map(|message| {
            let filenames = message["filenames"].as_array().cloned().unwrap_or_default();
            filenames
                .into_iter()
                .filter_map(|name| name.as_str().map(PathBuf::from))
        })
        .find(|path| {
            path.extension()
                .is_some_and(|extension| extension == "wasm")
        })
}

/// Installs the `wasm32-wasip2` standard library with rustup when it is
/// missing. Without rustup, the cargo build reports a missing target itself.
fn ensure_wasm_target() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        // Test binaries running at the same time must not install the
        // target twice at once, so rustup runs under a machine-wide lock.
        let lock_path = std::env::temp_dir().join("eliot-tests-rustup.lock");
        let lock = File::create(&lock_path)
            .unwrap_or_else(|err| panic!("failed to create {}: {err}", lock_path.display()));
        lock.lock()
            .unwrap_or_else(|err| panic!("failed to lock {}: {err}", lock_path.display()));

        let mut list = Command::new("rustup");
        list.current_dir(crate::workspace_root())
            .args(["target", "list", "--installed"]);
        let installed = match list.output() {
            Ok(output) if output.status.success() => output.stdout,
            Ok(output) => panic!(
                "`rustup target list --installed` failed with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
            Err(err) => panic!("failed to run rustup: {err}"),
        };
        let installed = String::from_utf8_lossy(&installed);
        if installed.lines().any(|line| line.trim() == WASM_TARGET) {
            return;
        }

        let mut add = Command::new("rustup");
        add.current_dir(crate::workspace_root())
            .args(["target", "add", WASM_TARGET]);
        let output = run(&mut add);
        if !output.status.success() {
            panic!(
                "`rustup target add {WASM_TARGET}` failed with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        // The lock is released when `lock` is dropped here.
    });
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|err| panic!("failed to run {command:?}: {err}"))
}
