//! The `eliot` command line. `src/main.rs` only calls [`main`], so that the
//! test crate can build the same command as its own binary.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::config::{Config, SinkKind};
use crate::host::Host;
use crate::layers::Layers;
use crate::simulate::{self, SimulateOptions};

#[derive(Parser)]
#[command(
    name = "eliot",
    version,
    about = "IoT ingestion host: MQTT in, Wasm plugin chain, sinks out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the host until SIGINT or SIGTERM.
    Run {
        /// Configuration file.
        #[arg(long, short, default_value = "config/eliot.toml", env = "ELIOT_CONFIG")]
        config: PathBuf,
    },
    /// Quick start: build the example plugins, start the host with its
    /// embedded broker, replay the bundled sensor data, report and exit.
    Demo {
        #[arg(long, short, default_value = "config/eliot.toml", env = "ELIOT_CONFIG")]
        config: PathBuf,
        /// Messages per second the simulator sends; 0 for as fast as the
        /// broker acknowledges.
        #[arg(long, default_value_t = 5000)]
        rate: u32,
        /// Replay at most this many rows per device.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Replay the bundled sensor data to a broker as device telemetry.
    Simulate {
        /// Broker address, host:port.
        #[arg(long, default_value = "127.0.0.1:1883")]
        broker: String,
        /// Messages per second over all devices; 0 for as fast as the broker
        /// acknowledges.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Replay at most this many rows per device.
        #[arg(long)]
        limit: Option<usize>,
        /// QoS of the published messages: 0, 1 or 2.
        #[arg(long, default_value_t = 1)]
        qos: u8,
    },
    /// Validate the configuration and load every plugin, without connecting.
    Check {
        #[arg(long, short, default_value = "config/eliot.toml", env = "ELIOT_CONFIG")]
        config: PathBuf,
    },
    /// Plugin tooling.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// List, show, replay or purge the stored dead letters.
    DeadLetters {
        #[command(subcommand)]
        command: crate::deadletter::cli::DeadLetterCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Write a new plugin that builds and forwards every message unchanged.
    New {
        /// Plugin name: lowercase letters, digits and dashes.
        name: String,
        /// Language of the plugin.
        #[arg(long, value_enum, default_value = "rust")]
        lang: crate::plugin_build::Lang,
        /// Folder to create the plugin's folder in; `plugins` of the
        /// workspace when not given.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Build plugins into components in a plugin folder: Rust crates of
    /// this workspace, or with --lang a Python, JavaScript or C plugin folder.
    Build {
        /// Cargo packages to build (the example plugins when none is given);
        /// with --lang python, js or c, the plugin's folders.
        packages: Vec<String>,
        /// Language of the plugins.
        #[arg(long, value_enum, default_value = "rust")]
        lang: crate::plugin_build::Lang,
        /// Folder to copy the components into; `target/plugins` of the
        /// workspace when not given, where config/eliot.toml looks.
        #[arg(long)]
        out: Option<PathBuf>,
        /// WIT package to build against; the workspace's `wit` folder when
        /// not given.
        #[arg(long)]
        wit: Option<PathBuf>,
    },
}

/// Parses the arguments, runs the command and returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` reads its log format from the config, so it installs the
    // subscriber once the config is loaded.
    if !matches!(cli.command, Command::Run { .. }) {
        crate::init_logging();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Joins an error and its causes with ": ", leaving out a cause whose text
/// the message before it already contains (errors that print their source).
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

async fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => run(&config).await,
        Command::Demo {
            config,
            rate,
            limit,
        } => demo(&config, rate, limit).await,
        Command::Simulate {
            broker,
            rate,
            limit,
            qos,
        } => {
            let (host, port) = crate::broker::parse_address(&broker).with_context(|| {
                format!("--broker \"{broker}\" is not host:port, for example 127.0.0.1:1883")
            })?;
            let qos = rumqttc::qos(qos)
                .map_err(|_| anyhow::anyhow!("--qos {qos} does not exist; use 0, 1 or 2"))?;
            let options = SimulateOptions {
                host,
                port,
                rate,
                limit,
                qos,
                client_id: "eliot-simulator".to_owned(),
            };
            let sent = simulate::replay(&options).await?;
            tracing::info!(messages = sent, broker = %broker, "replay finished");
            Ok(())
        }
        Command::Check { config } => check(&config).await,
        Command::DeadLetters { command } => crate::deadletter::cli::execute(command).await,
        Command::Plugin {
            command: PluginCommand::New { name, lang, dir },
        } => {
            let cwd = std::env::current_dir()?;
            let workspace = crate::plugin_build::workspace_root(&cwd);
            let parent = match (dir, &workspace) {
                (Some(dir), _) => dir,
                (None, Some(root)) => root.join("plugins"),
                (None, None) => cwd,
            };
            let folder = crate::plugin_new::create(&name, lang, &parent, workspace.as_deref())?;
            println!("{}", folder.display());
            match lang {
                crate::plugin_build::Lang::Rust => {
                    println!("build it with: cargo run --release -p eliot -- plugin build {name}")
                }
                other => println!(
                    "build it with: cargo run --release -p eliot -- plugin build --lang {} {}",
                    format!("{other:?}").to_lowercase(),
                    folder.display()
                ),
            }
            Ok(())
        }
        Command::Plugin {
            command:
                PluginCommand::Build {
                    packages,
                    lang,
                    out,
                    wit,
                },
        } => {
            // Checked before a build that may take minutes.
            if let Some(out) = out.as_deref().filter(|out| out.exists() && !out.is_dir()) {
                anyhow::bail!(
                    "--out {} is a file; name the folder the components go into",
                    out.display()
                );
            }
            if lang == crate::plugin_build::Lang::Rust && wit.is_some() {
                anyhow::bail!(
                    "--wit applies to --lang python, js and c; a Rust plugin takes its WIT from the SDK it depends on"
                );
            }
            let cwd = std::env::current_dir()?;
            let found = crate::plugin_build::workspace_root(&cwd);
            if lang != crate::plugin_build::Lang::Rust {
                if packages.is_empty() {
                    anyhow::bail!("name the plugin folders to build, for example plugins/geofence");
                }
                let root = found.as_deref();
                let out = out
                    .or_else(|| root.map(|r| r.join("target").join("plugins")))
                    .context("outside the repository, name the output folder with --out")?;
                let wit = wit
                    .or_else(|| root.map(|r| r.join("wit")))
                    .context("outside the repository, name the WIT folder with --wit")?;
                let tools = crate::plugin_build::toolchain_dir(root);
                for folder in &packages {
                    let path = crate::plugin_build::build_lang(
                        lang,
                        &tools,
                        &wit,
                        Path::new(folder),
                        &out,
                    )?;
                    println!("{}", path.display());
                }
                return Ok(());
            }
            let workspace = found.context(
                "no cargo workspace found above the current folder; run this inside the repository",
            )?;
            let packages = if packages.is_empty() {
                crate::plugin_build::EXAMPLE_PLUGINS
                    .iter()
                    .map(|p| (*p).to_owned())
                    .collect()
            } else {
                packages
            };
            let out = out.unwrap_or_else(|| workspace.join("target").join("plugins"));
            for path in crate::plugin_build::build(&workspace, &packages, &out)? {
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}

/// Loads the base file at `path` with the overlay that `ELIOT_ENV` selects
/// and the override variables, and logs which layers were applied.
pub(crate) fn load_config(path: &Path) -> anyhow::Result<Config> {
    let config = Config::load_layered(path, &Layers::from_process())
        .map_err(|errors| anyhow::anyhow!("{errors}"))?;
    tracing::info!(layers = %config.describe_layers(), "configuration loaded");
    Ok(config)
}

async fn run(config_path: &Path) -> anyhow::Result<()> {
    let mut signals = StopSignals::new()?;
    let config = Config::load_layered(config_path, &Layers::from_process())
        .map_err(|errors| anyhow::anyhow!("{errors}"))?;
    // The log format is part of the configuration, so logging starts once
    // the configuration is read, and its first line names the layers.
    crate::init_logging_with(config.log.format);
    tracing::info!(layers = %config.describe_layers(), "configuration loaded");
    let watch = config.watch;
    let host = Host::start(config).await?;
    // Dropping the watcher stops reloads; it lives as long as `run`.
    let _watcher = if watch {
        Some(host.reloader.watch().await?)
    } else {
        None
    };
    tracing::info!(broker = %host.broker, "eliot is running; stop it with Ctrl-C or SIGTERM");
    let mut escalation = host.supervisor.escalation();
    let escalated = tokio::select! {
        () = signals.wait() => None,
        reason = escalation.wait_for(Option::is_some) => reason.ok().and_then(|r| r.clone()),
        () = log_counts_periodically(&host) => None,
    };
    let stats = host.stats();
    host.shutdown(Duration::from_secs(30)).await;
    log_counts(&stats);
    match escalated {
        None => {
            tracing::info!("eliot stopped");
            Ok(())
        }
        Some(reason) => anyhow::bail!("stopped by the supervisor: {reason}"),
    }
}

/// Logs every pipeline's counters once a minute, when they changed.
async fn log_counts_periodically(host: &Host) {
    let mut last = host.snapshot();
    let mut interval = tokio::time::interval(Duration::from_secs(60));
    interval.tick().await;
    loop {
        interval.tick().await;
        let now = host.snapshot();
        if now != last {
            log_counts(&host.stats());
            last = now;
        }
    }
}

fn log_counts(
    pipelines: &std::collections::BTreeMap<String, std::sync::Arc<crate::stats::PipelineStats>>,
) {
    for (name, stats) in pipelines {
        stats.snapshot().log(name, "pipeline counts");
    }
}

/// SIGTERM and SIGINT, caught from the moment they are created: a signal
/// that arrives while the host starts then shuts it down gracefully instead
/// of killing the process.
struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// Validates the layered configuration and loads every plugin it names,
/// without connecting to a broker. Prints every problem, not only the
/// first, and fails when there is one.
async fn check(config_path: &Path) -> anyhow::Result<()> {
    let layers = Layers::from_process();
    let checked = Config::check_layered(config_path, &layers);
    let mut problems: Vec<String> = checked.errors.iter().map(ToString::to_string).collect();
    println!("base file: {}", config_path.display());
    if let Some(overlay) = &checked.overlay {
        println!("overlay: {}", overlay.display());
    }
    let names = layers.variable_names();
    if !names.is_empty() {
        println!("environment variables: {}", names.join(", "));
    }

    // Plugins whose entries validated are loaded even when other keys have
    // problems, so that one run shows both kinds. A missing plugin file is
    // already a configuration problem and is not loaded.
    let plugins: Vec<_> = checked
        .plugins
        .values()
        .filter(|plugin| plugin.path.is_file())
        .cloned()
        .collect();
    // Plugins are known only when the schema check passed, and then the
    // cache folder is known too.
    if let (false, Some(cache_dir)) = (plugins.is_empty(), &checked.cache_dir) {
        let runtime = crate::wasm::Runtime::new(cache_dir)?;
        for plugin in &plugins {
            match crate::wasm::LoadedPlugin::load(&runtime, plugin) {
                Ok(loaded) => println!(
                    "ok: plugin \"{}\" {} {}",
                    plugin.name, loaded.info.name, loaded.info.version
                ),
                // LoadError's text starts with the plugin's name.
                Err(e) => problems.push(e.to_string()),
            }
        }
    }

    if problems.is_empty() {
        println!("configuration is valid");
        Ok(())
    } else {
        anyhow::bail!(
            "{} problem{} found:\n  {}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            problems.join("\n  ")
        )
    }
}

/// Runs the quick start: builds the example plugins, starts the host, replays
/// the bundled data and prints a summary.
async fn demo(config_path: &Path, rate: u32, limit: Option<usize>) -> anyhow::Result<()> {
    let cwd = std::env::current_dir()?;
    let workspace = crate::plugin_build::workspace_root(&cwd)
        .context("`eliot demo` builds the example plugins and must run inside the repository")?;

    // Step 1: build the example plugins into the configured plugin folder.
    // The config cannot be validated before that, because it checks that
    // the plugin files exist.
    let plugin_dir = plugin_dir_of(config_path)?;
    let packages: Vec<String> = crate::plugin_build::EXAMPLE_PLUGINS
        .iter()
        .map(|p| (*p).to_owned())
        .collect();
    tracing::info!(dir = %plugin_dir.display(), "building the example plugins");
    crate::plugin_build::build(&workspace, &packages, &plugin_dir)?;

    // Step 2: start the host on a fresh output folder of the demo's own, so
    // that the counts below are this run's alone and nothing that `eliot
    // run` wrote with the same config is touched.
    let mut config = load_config(config_path)?;
    let demo_dir = workspace.join("target").join("eliot-demo");
    match std::fs::remove_dir_all(&demo_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot clear the demo output {}", demo_dir.display()))
        }
    }
    let in_demo_dir = |path: &Path| {
        demo_dir.join(
            path.file_name()
                .unwrap_or_else(|| std::ffi::OsStr::new("output")),
        )
    };
    config.dead_letter_path = in_demo_dir(&config.dead_letter_path);
    for sink in config.sinks.values_mut() {
        if let SinkKind::File { path } = &mut sink.kind {
            *path = in_demo_dir(path);
        }
    }
    let mut host = Host::start(config.clone()).await?;
    if !host.wait_connected(Duration::from_secs(10)).await {
        anyhow::bail!(
            "the host did not connect to the broker at {} within 10 s",
            host.broker
        );
    }

    // Step 3: replay the bundled data.
    let options = SimulateOptions {
        host: host.broker.ip().to_string(),
        port: host.broker.port(),
        rate,
        limit,
        qos: rumqttc::QoS::AtLeastOnce,
        client_id: "eliot-simulator".to_owned(),
    };
    tracing::info!(rate, "replaying the bundled sensor data");
    let replay = tokio::spawn(async move { simulate::replay(&options).await });

    // Step 4: report progress until every published message is accounted
    // for, or the bounded wait ends.
    let started = Instant::now();
    let mut published = None;
    let mut replay = Some(replay);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if replay.as_ref().is_some_and(|task| task.is_finished()) {
            published = Some(replay.take().expect("checked above").await??);
        }
        log_counts(&host.stats());
        let snapshot = host.snapshot();
        let finished: u64 = snapshot
            .values()
            .map(|s| s.delivered + s.dropped + s.dead_lettered)
            .sum();
        if published.is_some_and(|p| finished >= p) {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            tracing::warn!("gave up waiting after 600 s; the counts above are incomplete");
            break;
        }
    }
    let snapshot = host.snapshot();
    let broker = host.broker;
    host.shutdown(Duration::from_secs(30)).await;

    println!();
    println!(
        "Eliot demo finished: {} messages published from the bundled data.",
        published.unwrap_or(0)
    );
    for (name, stats) in &snapshot {
        println!(
            "  pipeline {name}: {} received, {} delivered ({} records), {} dropped, {} dead-lettered",
            stats.received, stats.delivered, stats.records_out, stats.dropped, stats.dead_lettered
        );
    }
    let used: std::collections::BTreeSet<&String> =
        config.pipelines.values().flat_map(|p| &p.sinks).collect();
    for (name, sink) in config.sinks.iter().filter(|(name, _)| used.contains(name)) {
        match &sink.kind {
            SinkKind::File { path } => println!("  sink {name}: {}", path.display()),
            SinkKind::Mqtt { .. } => {
                println!("  sink {name}: republished on the broker at {broker}")
            }
        }
    }
    println!("  dead letters: {}", config.dead_letter_path.display());
    Ok(())
}

/// Reads `runtime.plugin_dir` from the configuration layers without
/// validating the rest, which needs the plugins to exist.
fn plugin_dir_of(config_path: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read {}; pass --config", config_path.display()))?;
    let table = crate::layers::apply(config_path, &text, &Layers::from_process())
        .map_err(|errors| anyhow::anyhow!("{}", crate::config::ConfigErrors(errors)))?
        .table;
    let base = config_path.parent().unwrap_or(Path::new(""));
    let dir = table
        .get("runtime")
        .and_then(|r| r.get("plugin_dir"))
        .and_then(|d| d.as_str())
        .unwrap_or("plugins");
    Ok(base.join(dir))
}
