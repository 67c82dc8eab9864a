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

/// Languages `eliot plugin build --lang` builds, besides the workspace's
/// Rust crates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
    C,
}

/// Version of componentize-py the Python build is tested with.
pub const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
/// Version of componentize-js the JavaScript build is tested with.
pub const COMPONENTIZE_JS: &str = "@bytecodealliance/componentize-js@0.23.0";

/// Returns the folder of the Python and JavaScript build tools: `ELIOT_TOOLCHAINS` when
/// set, else `target/toolchains` of the workspace, where `sdk/toolchains.sh`
/// installs them.
pub fn toolchain_dir(workspace: Option<&Path>) -> PathBuf {
    match (std::env::var_os("ELIOT_TOOLCHAINS"), workspace) {
        (Some(dir), _) => PathBuf::from(dir),
        (None, Some(root)) => root.join("target").join("toolchains"),
        (None, None) => PathBuf::from("target").join("toolchains"),
    }
}

/// Builds the plugin in `source` (a folder) written in `lang` into
/// `out/NAME.wasm`, where NAME is the folder's name with `-` as `_`, against
/// the WIT package in `wit`. Returns the component's path.
///
/// - Python: `source/app.py` defines `class Processor(exports.Processor)`;
///   componentize-py builds it.
/// - JavaScript: `source/*.js` (one file) exports `processor`;
///   componentize-js builds it, with its `http` and `fetch-event` features
///   off so that the component imports no `wasi:http`.
/// - C: `source/*.c` implement the functions of the generated `plugin.h`;
///   the bindings are generated here, clang builds a WASI core module and
///   the WASI preview 1 reactor adapter makes it a component.
///
/// # Errors
///
/// Fails when a build tool is missing (naming the install command), or the
/// build fails (with the tool's output).
pub fn build_lang(
    lang: Lang,
    tools: &Path,
    wit: &Path,
    source: &Path,
    out: &Path,
) -> anyhow::Result<PathBuf> {
    let name = source
        .canonicalize()
        .with_context(|| format!("plugin folder {} not found", source.display()))?
        .file_name()
        .context("the plugin folder has no name")?
        .to_string_lossy()
        .replace('-', "_");
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let destination = out.join(format!("{name}.wasm"));
    let partial = out.join(format!(".{name}.wasm.partial"));
    match lang {
        Lang::Rust => bail!("Rust plugins are cargo packages: run `eliot plugin build PACKAGE`"),
        Lang::Python => build_python(tools, wit, source, &partial)?,
        Lang::Js => build_js(tools, wit, source, &partial)?,
        Lang::C => build_c(wit, source, &partial)?,
    }
    // Renamed into place, so that a host watching the folder never loads a
    // half-written component.
    std::fs::rename(&partial, &destination)
        .with_context(|| format!("cannot move {} into place", destination.display()))?;
    Ok(destination)
}

fn run_tool(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn build_python(tools: &Path, wit: &Path, source: &Path, out: &Path) -> anyhow::Result<()> {
    if !source.join("app.py").is_file() {
        bail!(
            "{} has no app.py; a Python plugin defines its Processor class there",
            source.display()
        );
    }
    let installed = tools.join("python/bin/componentize-py");
    let tool = if installed.is_file() {
        installed
    } else if which("componentize-py").is_some() {
        PathBuf::from("componentize-py")
    } else {
        bail!(
            "componentize-py is not installed; run sdk/toolchains.sh, or `pip install {COMPONENTIZE_PY}`"
        );
    };
    run_tool(
        Command::new(tool)
            .arg("-d")
            .arg(wit)
            .args(["-w", "plugin", "componentize", "app", "-p"])
            .arg(source)
            .arg("-o")
            .arg(out),
        "componentize-py",
    )
}

/// The componentize-js call, run by node from the folder where the package
/// is installed so that its import resolves.
const JS_BUILD_SCRIPT: &str = r#"import { componentize } from '@bytecodealliance/componentize-js';
import { writeFile } from 'node:fs/promises';
const [sourcePath, witPath, out] = process.argv.slice(2);
const { component } = await componentize({
  sourcePath,
  witPath,
  worldName: 'plugin',
  disableFeatures: ['http', 'fetch-event'],
});
await writeFile(out, component);
"#;

fn build_js(tools: &Path, wit: &Path, source: &Path, out: &Path) -> anyhow::Result<()> {
    let scripts: Vec<PathBuf> = std::fs::read_dir(source)
        .with_context(|| format!("cannot read {}", source.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "js"))
        .collect();
    let [script] = scripts.as_slice() else {
        bail!(
            "{} has {} .js files; a JavaScript plugin is one module that exports `processor`",
            source.display(),
            scripts.len()
        );
    };
    let tools = tools.join("js");
    if !tools
        .join("node_modules/@bytecodealliance/componentize-js")
        .is_dir()
    {
        bail!(
            "componentize-js is not installed; run sdk/toolchains.sh, or `npm install --prefix {} {COMPONENTIZE_JS}`",
            tools.display()
        );
    }
    let runner = tools.join("eliot-build.mjs");
    std::fs::write(&runner, JS_BUILD_SCRIPT)
        .with_context(|| format!("cannot write {}", runner.display()))?;
    run_tool(
        Command::new("node")
            .arg(&runner)
            .arg(script.canonicalize()?)
            .arg(wit.canonicalize()?)
            .arg(std::path::absolute(out)?),
        "node with componentize-js",
    )
}

fn build_c(wit: &Path, source: &Path, out: &Path) -> anyhow::Result<()> {
    let sources: Vec<PathBuf> = std::fs::read_dir(source)
        .with_context(|| format!("cannot read {}", source.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "c"))
        .collect();
    if sources.is_empty() {
        bail!("{} has no .c files", source.display());
    }
    if which("clang").is_none() {
        bail!(
            "clang is not installed; run sdk/toolchains.sh, or `apt-get install -y clang lld wasi-libc libclang-rt-14-dev-wasm32`"
        );
    }

    // The generated bindings go to a build folder beside the output.
    let build = tempfile::tempdir().context("cannot create a build folder")?;
    let mut resolve = wit_bindgen_core::wit_parser::Resolve::default();
    let (package, _) = resolve
        .push_path(wit)
        .with_context(|| format!("cannot read the WIT package in {}", wit.display()))?;
    let world = resolve.select_world(&[package], Some("plugin"))?;
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default()
        .build()
        .generate(&mut resolve, world, &mut files)?;
    for (name, bytes) in files.iter() {
        std::fs::write(build.path().join(name), bytes)?;
    }

    // Debian's wasi-libc puts its headers and libraries under /usr; a
    // wasi-sdk sysroot is used when WASI_SYSROOT names one.
    let core = build.path().join("core.wasm");
    let mut clang = Command::new("clang");
    clang.args([
        "--target=wasm32-wasi",
        "-O2",
        "-mexec-model=reactor",
        "-Wall",
    ]);
    match std::env::var_os("WASI_SYSROOT") {
        Some(sysroot) => {
            clang.arg("--sysroot").arg(sysroot);
        }
        None => {
            clang.args(["--sysroot=/usr", "-isystem", "/usr/include/wasm32-wasi"]);
        }
    }
    clang
        .arg("-I")
        .arg(build.path())
        .args(&sources)
        .arg(build.path().join("plugin.c"))
        .arg(build.path().join("plugin_component_type.o"))
        .arg("-o")
        .arg(&core);
    run_tool(&mut clang, "clang")?;

    let module = std::fs::read(&core)?;
    let component = wit_component::ComponentEncoder::default()
        .module(&module)?
        .validate(true)
        .adapter(
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )?
        .encode()
        .context("cannot make a component of the C module")?;
    std::fs::write(out, component).with_context(|| format!("cannot write {}", out.display()))
}

/// Finds `program` on the PATH.
fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}
