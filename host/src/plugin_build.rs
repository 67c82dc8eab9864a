//! `eliot plugin build`: builds Rust plugin crates of this workspace into
//! components and copies them into the plugin folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

/// The example plugins of this repository, by cargo package name.
pub const EXAMPLE_PLUGINS: &[&str] = &["enrich", "validate-format", "sanity-filter"];

const TARGET: &str = "wasm32-wasip2";

/// Finds the workspace root: the nearest folder upwards from `start` whose
/// Cargo.toml has a `[workspace]` table.
pub fn workspace_root(start: &Path) -> Option<PathBuf> {
    start.ancestors().find_map(|dir| {
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).ok()?;
        manifest.contains("[workspace]").then(|| dir.to_owned())
    })
}

/// Adds the wasm32-wasip2 target with rustup when it is missing; rustup here
/// does not install targets on demand.
pub fn ensure_target() -> anyhow::Result<()> {
    let output = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup; install Rust with rustup (https://rustup.rs)")?;
    if String::from_utf8_lossy(&output.stdout)
        .lines()
        .any(|line| line.trim() == TARGET)
    {
        return Ok(());
    }
    tracing::info!(target = TARGET, "adding the Rust target");
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status()
        .context("rustup target add")?;
    if !status.success() {
        bail!("`rustup target add {TARGET}` failed with {status}");
    }
    Ok(())
}

/// Builds `packages` in release mode for wasm32-wasip2 and copies each
/// component into `plugin_dir` as `PACKAGE_NAME.wasm` (dashes become
/// underscores, as cargo names the artifact). Returns the copied paths.
///
/// # Errors
///
/// Fails when the target cannot be added, cargo fails, or a copy fails.
pub fn build(
    workspace: &Path,
    packages: &[String],
    plugin_dir: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    ensure_target()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace)
        .args(["build", "--release", "--target", TARGET]);
    for package in packages {
        command.args(["-p", package]);
    }
    let status = command.status().context("cannot run cargo")?;
    if !status.success() {
        bail!("building the plugins failed ({status}); cargo's output above names the error");
    }

    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), PathBuf::from);
    std::fs::create_dir_all(plugin_dir)
        .with_context(|| format!("cannot create {}", plugin_dir.display()))?;
    let mut copied = Vec::new();
    for package in packages {
        let file = format!("{}.wasm", package.replace('-', "_"));
        let built = target_dir.join(TARGET).join("release").join(&file);
        let destination = plugin_dir.join(&file);
        // Copy to a temporary name and rename, so that a host watching the
        // folder never sees a half-written component.
        let partial = plugin_dir.join(format!(".{file}.partial"));
        std::fs::copy(&built, &partial)
            .with_context(|| format!("cannot copy {} to {}", built.display(), partial.display()))?;
        std::fs::rename(&partial, &destination)
            .with_context(|| format!("cannot move {} into place", destination.display()))?;
        copied.push(destination);
    }
    Ok(copied)
}
