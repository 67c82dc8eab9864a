//! Hot reload of plugin files and of the config file while messages flow.
//!
//! A changed plugin is compiled, linked and started (its `init` runs with its
//! config) off the message path, in a blocking task. Only then is it
//! swapped into its [`PluginSlot`]. Workers notice the swap between two
//! messages, so a message runs start to end on one version of every stage.
//! A config change applies as a diff: changed and added plugins are loaded
//! first, and the stage lists are replaced only when every one of them
//! loaded. Stages that did not change keep their instances. Anything that
//! fails keeps the running version and reports the outcome, with the file,
//! the key and the reason, in the log and in [`ReloadStats`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::{Config, PluginConfig};
use crate::pipeline::{PipelineLauncher, PipelineSet, PluginSlot, Stage};
use crate::wasm::{LoadError, LoadedPlugin, Runtime};

/// Quiet time after the last file event before a change is handled. Editors
/// and copies write in bursts; this lets a burst finish.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// How long a plugin file that is not a valid component yet may still be
/// being written. A copy that arrives in chunks is first seen half-written:
/// its load fails, and the reload waits this long for more writes before it
/// reports the failure.
const SETTLE: Duration = Duration::from_secs(1);

/// Reloads by outcome.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub applied: AtomicU64,
    pub rolled_back: AtomicU64,
    pub unchanged: AtomicU64,
}

/// Result of one reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new version serves from the next message on.
    Applied { summary: String },
    /// The running version keeps serving.
    RolledBack {
        file: PathBuf,
        key: String,
        reason: String,
    },
    /// The file is the one already running, or the config did not change.
    Unchanged,
    /// A plugin file that does not load yet was written to moments ago; the
    /// reload waits for the rest of it.
    Incomplete,
}

/// Applies changed plugin files and config to a running host.
pub struct Reloader {
    runtime: Arc<Runtime>,
    /// One reload at a time, so that two changes never interleave.
    state: tokio::sync::Mutex<State>,
    pipelines: Arc<PipelineSet>,
    launcher: Arc<PipelineLauncher>,
    pub stats: ReloadStats,
}

struct State {
    config: Config,
    slots: BTreeMap<String, Arc<PluginSlot>>,
}

impl Reloader {
    pub fn new(
        runtime: Arc<Runtime>,
        config: Config,
        slots: BTreeMap<String, Arc<PluginSlot>>,
        pipelines: Arc<PipelineSet>,
        launcher: Arc<PipelineLauncher>,
    ) -> Self {
        Self {
            runtime,
            state: tokio::sync::Mutex::new(State { config, slots }),
            pipelines,
            launcher,
            stats: ReloadStats::default(),
        }
    }

    /// Returns the plugin currently loaded under `name`.
    pub async fn plugin(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        let state = self.state.lock().await;
        state.slots.get(name).map(|slot| slot.current().1)
    }

    /// Reloads every plugin whose file is `path`. `settled` is set when the
    /// file has had [`SETTLE`] to be written in full.
    pub async fn plugin_file_changed(&self, path: &Path, settled: bool) -> Vec<Outcome> {
        let state = self.state.lock().await;
        let plugins: Vec<PluginConfig> = state
            .config
            .plugins
            .values()
            .filter(|plugin| same_file(&plugin.path, path))
            .cloned()
            .collect();
        if plugins.is_empty() {
            tracing::debug!(file = %path.display(), "changed file is not a configured plugin; ignored");
            return Vec::new();
        }
        let mut outcomes = Vec::new();
        for plugin in plugins {
            let slot = state.slots[&plugin.name].clone();
            let running = slot.current().1;
            let outcome = match std::fs::read(path) {
                Ok(bytes) if crate::wasm::digest(&bytes) == running.digest => Outcome::Unchanged,
                _ => match self.load(plugin.clone()).await {
                    Ok(loaded) => {
                        let summary = format!(
                            "plugin \"{}\" from {} is now version {} (was {})",
                            plugin.name,
                            path.display(),
                            loaded.info.version,
                            running.info.version
                        );
                        slot.replace(Arc::new(loaded));
                        self.reset_breakers(&slot);
                        Outcome::Applied { summary }
                    }
                    Err(e) if !settled && recently_written(path) && incomplete(&e) => {
                        tracing::info!(plugin = %plugin.name, file = %path.display(), error = %e, "plugin file does not load yet and was just written; waiting for the rest of it");
                        Outcome::Incomplete
                    }
                    Err(e) => Outcome::RolledBack {
                        file: path.to_owned(),
                        key: format!("plugins.{}", plugin.name),
                        reason: e.to_string(),
                    },
                },
            };
            self.report(&outcome);
            outcomes.push(outcome);
        }
        outcomes
    }

    /// Reloads the config file and applies what changed.
    pub async fn config_changed(&self) -> Outcome {
        let mut state = self.state.lock().await;
        let outcome = self.apply_config(&mut state).await;
        self.report(&outcome);
        outcome
    }

    async fn apply_config(&self, state: &mut State) -> Outcome {
        let file = state.config.file.clone();
        let new = match Config::load(&file) {
            Ok(config) => config,
            Err(errors) => {
                return Outcome::RolledBack {
                    file,
                    key: errors
                        .0
                        .iter()
                        .map(|e| e.key.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    reason: errors.to_string(),
                }
            }
        };
        if let Some((key, reason)) = needs_restart(&state.config, &new) {
            return Outcome::RolledBack { file, key, reason };
        }

        // Load every added or changed plugin before anything is swapped, so
        // that a failure leaves the running config whole.
        let mut loaded = BTreeMap::new();
        for (name, plugin) in &new.plugins {
            if state.config.plugins.get(name) == Some(plugin) {
                continue;
            }
            match self.load(plugin.clone()).await {
                Ok(plugin) => {
                    loaded.insert(name.clone(), Arc::new(plugin));
                }
                Err(e) => {
                    return Outcome::RolledBack {
                        file,
                        key: format!("plugins.{name}"),
                        reason: e.to_string(),
                    }
                }
            }
        }
        let restaged: Vec<&String> = new
            .pipelines
            .iter()
            .filter(|(name, pipeline)| {
                state
                    .config
                    .pipelines
                    .get(*name)
                    .is_some_and(|old| old.stages != pipeline.stages)
            })
            .map(|(name, _)| name)
            .collect();
        let added: Vec<&String> = new
            .pipelines
            .keys()
            .filter(|name| !state.config.pipelines.contains_key(*name))
            .collect();
        let dropped: Vec<&String> = state
            .config
            .pipelines
            .keys()
            .filter(|name| !new.pipelines.contains_key(*name))
            .collect();
        let removed: Vec<String> = state
            .config
            .plugins
            .keys()
            .filter(|name| !new.plugins.contains_key(*name))
            .cloned()
            .collect();
        if loaded.is_empty()
            && restaged.is_empty()
            && removed.is_empty()
            && added.is_empty()
            && dropped.is_empty()
        {
            state.config = new;
            return Outcome::Unchanged;
        }

        let mut summary = Vec::new();
        for (name, plugin) in loaded {
            match state.slots.get(&name) {
                Some(slot) => {
                    slot.replace(plugin);
                    self.reset_breakers(slot);
                    summary.push(format!("plugin \"{name}\" reloaded"));
                }
                None => {
                    state
                        .slots
                        .insert(name.clone(), Arc::new(PluginSlot::new(plugin)));
                    summary.push(format!("plugin \"{name}\" added"));
                }
            }
        }
        let running = self.pipelines.current();
        for pipeline in &restaged {
            let list = &running
                .iter()
                .find(|p| &p.config.name == *pipeline)
                .expect("a restaged pipeline runs")
                .stages;
            let stages_now = list.current().1;
            let stages = new.pipelines[*pipeline]
                .stages
                .iter()
                .map(|name| {
                    stages_now
                        .iter()
                        .find(|stage| &stage.name == name)
                        .cloned()
                        .unwrap_or_else(|| {
                            Arc::new(Stage::new(name.clone(), state.slots[name].clone()))
                        })
                })
                .collect();
            list.replace(stages);
            summary.push(format!(
                "pipeline \"{pipeline}\" now runs {:?}",
                new.pipelines[*pipeline].stages
            ));
        }
        if !added.is_empty() || !dropped.is_empty() {
            let mut next: Vec<Arc<crate::pipeline::Pipeline>> = running
                .iter()
                .filter(|p| !dropped.contains(&&p.config.name))
                .cloned()
                .collect();
            for name in &added {
                match self.launcher.start(&new.pipelines[*name], &state.slots) {
                    Ok(pipeline) => next.push(pipeline),
                    Err(e) => {
                        // NOTE: the plugins were swapped already; only the
                        // pipeline set stays as it was.
                        return Outcome::RolledBack {
                            file,
                            key: format!("pipelines.{name}"),
                            reason: format!("{e:#}"),
                        };
                    }
                }
            }
            if !self.pipelines.replace(next) {
                return Outcome::RolledBack {
                    file,
                    key: "pipelines".to_owned(),
                    reason: "the host is shutting down".to_owned(),
                };
            }
            for name in &added {
                summary.push(format!("pipeline \"{name}\" added"));
            }
            for name in &dropped {
                summary.push(format!(
                    "pipeline \"{name}\" removed; it finishes the messages it holds"
                ));
            }
        }
        for name in removed {
            state.slots.remove(&name);
            summary.push(format!("plugin \"{name}\" removed"));
        }
        state.config = new;
        Outcome::Applied {
            summary: summary.join("; "),
        }
    }

    /// Compiles and starts `plugin` off the async runtime.
    async fn load(&self, plugin: PluginConfig) -> Result<LoadedPlugin, LoadError> {
        let runtime = self.runtime.clone();
        let name = plugin.name.clone();
        tokio::task::spawn_blocking(move || LoadedPlugin::load(&runtime, &plugin))
            .await
            .unwrap_or_else(|panic| {
                Err(LoadError::Trapped {
                    plugin: name,
                    reason: format!("loading panicked: {panic}"),
                })
            })
    }

    fn reset_breakers(&self, slot: &Arc<PluginSlot>) {
        for pipeline in self.pipelines.current().iter() {
            for stage in pipeline.stages.current().1.iter() {
                if Arc::ptr_eq(&stage.slot, slot) {
                    stage.reset_breaker();
                }
            }
        }
    }

    fn report(&self, outcome: &Outcome) {
        match outcome {
            Outcome::Applied { summary } => {
                self.stats.applied.fetch_add(1, Ordering::Relaxed);
                tracing::info!(outcome = "applied", summary, "reload applied");
            }
            Outcome::RolledBack { file, key, reason } => {
                self.stats.rolled_back.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    outcome = "rolled-back",
                    file = %file.display(),
                    key,
                    reason,
                    "reload rolled back; the running version keeps serving"
                );
            }
            Outcome::Unchanged => {
                self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(outcome = "unchanged", "reload found nothing changed");
            }
            Outcome::Incomplete => {}
        }
    }

    /// Watches the plugin folder and the config file, and reloads what
    /// changes until the returned watcher is dropped.
    ///
    /// # Errors
    ///
    /// Fails when a folder cannot be watched.
    pub async fn watch(self: &Arc<Self>) -> anyhow::Result<Watcher> {
        use anyhow::Context as _;
        use notify::Watcher as _;

        let (plugin_dir, config_file) = {
            let state = self.state.lock().await;
            (state.config.plugin_dir.clone(), state.config.file.clone())
        };
        let config_dir = config_file
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        let (events, received) = tokio::sync::mpsc::unbounded_channel();
        let to_task = events.clone();
        let mut watcher = notify::recommended_watcher(
            move |result: notify::Result<notify::Event>| match result {
                Ok(event) if is_write(&event.kind) => {
                    for path in event.paths {
                        let _ = to_task.send((path, false));
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "file watch error; a change may be missed"),
            },
        )
        .context("cannot start the file watcher")?;
        for dir in [&plugin_dir, &config_dir] {
            watcher
                .watch(dir, notify::RecursiveMode::NonRecursive)
                .with_context(|| format!("cannot watch {}", dir.display()))?;
        }
        tracing::info!(plugin_dir = %plugin_dir.display(), config = %config_file.display(), "watching for plugin and config changes");

        let task = tokio::spawn(self.clone().handle_changes(config_file, events, received));
        Ok(Watcher {
            _watcher: watcher,
            task,
        })
    }

    /// Handles file events: each path once it has been quiet for
    /// [`DEBOUNCE`], one at a time.
    async fn handle_changes(
        self: Arc<Self>,
        config_file: PathBuf,
        events: tokio::sync::mpsc::UnboundedSender<(PathBuf, bool)>,
        mut received: tokio::sync::mpsc::UnboundedReceiver<(PathBuf, bool)>,
    ) {
        // When each changed path is due, and whether it had time to settle.
        let mut due: BTreeMap<PathBuf, (tokio::time::Instant, bool)> = BTreeMap::new();
        loop {
            let next = due.values().map(|(at, _)| *at).min();
            tokio::select! {
                event = received.recv() => {
                    let Some((path, settled)) = event else { return };
                    // A new write postpones the path and drops a pending
                    // settled check: the file is still being written.
                    let delay = if settled { Duration::ZERO } else { DEBOUNCE };
                    due.insert(path, (tokio::time::Instant::now() + delay, settled));
                }
                () = tokio::time::sleep_until(next.unwrap_or_else(tokio::time::Instant::now)), if next.is_some() => {
                    let now = tokio::time::Instant::now();
                    let ready: Vec<(PathBuf, bool)> = due
                        .iter()
                        .filter(|(_, (at, _))| *at <= now)
                        .map(|(path, (_, settled))| (path.clone(), *settled))
                        .collect();
                    for (path, settled) in ready {
                        due.remove(&path);
                        if same_file(&path, &config_file) {
                            self.config_changed().await;
                            continue;
                        }
                        let outcomes = self.plugin_file_changed(&path, settled).await;
                        if outcomes.contains(&Outcome::Incomplete) {
                            // Look again once the file had time to be
                            // completed, unless a write comes first.
                            let events = events.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(SETTLE).await;
                                let _ = events.send((path, true));
                            });
                        }
                    }
                }
            }
        }
    }
}

/// Watches files for a [`Reloader`] until dropped.
pub struct Watcher {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Tells whether an event changes a file's content or name. Opening and
/// reading a file raises events too, among them the reloader's own reads,
/// which must not trigger another reload.
fn is_write(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    use notify::EventKind;

    matches!(
        kind,
        EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any)
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

/// Returns the first change between `old` and `new` that a reload cannot
/// apply, as the key and the reason.
fn needs_restart(old: &Config, new: &Config) -> Option<(String, String)> {
    let restart = |key: &str| {
        Some((
            key.to_owned(),
            format!(
                "{key} changed, which only a restart applies; restart the host, or undo the change"
            ),
        ))
    };
    if old.mqtt != new.mqtt {
        return restart("mqtt");
    }
    if old.embedded_broker != new.embedded_broker {
        return restart("embedded_broker");
    }
    if old.plugin_dir != new.plugin_dir || old.cache_dir != new.cache_dir || old.watch != new.watch
    {
        return restart("runtime");
    }
    if old.dead_letter_path != new.dead_letter_path {
        return restart("dead_letters.path");
    }
    if old.sinks != new.sinks {
        return restart("sinks");
    }
    for (name, before) in &old.pipelines {
        // A pipeline added or removed applies live.
        let Some(after) = new.pipelines.get(name) else {
            continue;
        };
        let filters = |p: &crate::config::PipelineConfig| {
            p.topics
                .iter()
                .map(|t| t.as_str().to_owned())
                .collect::<Vec<_>>()
        };
        if filters(before) != filters(after) {
            return restart(&format!("pipelines.{name}.topics"));
        }
        if before.qos != after.qos {
            return restart(&format!("pipelines.{name}.qos"));
        }
        if before.workers != after.workers {
            return restart(&format!("pipelines.{name}.workers"));
        }
        if before.sinks != after.sinks {
            return restart(&format!("pipelines.{name}.sinks"));
        }
    }
    None
}

/// Tells whether two paths name the same file, comparing their folders
/// resolved, because a watcher reports the path it watched, not the one the
/// config wrote.
fn same_file(a: &Path, b: &Path) -> bool {
    let resolve = |path: &Path| {
        let folder = path
            .parent()
            .and_then(|p| std::fs::canonicalize(p).ok())
            .unwrap_or_else(|| path.parent().map(Path::to_owned).unwrap_or_default());
        folder.join(path.file_name().unwrap_or_default())
    };
    resolve(a) == resolve(b)
}

/// Tells whether `path` was written within [`SETTLE`].
fn recently_written(path: &Path) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|modified| SystemTime::now().duration_since(modified).ok())
        .is_some_and(|age| age < SETTLE)
}

/// Tells whether a load error could come from a file that is still being
/// written: not valid Wasm yet.
fn incomplete(error: &LoadError) -> bool {
    matches!(error, LoadError::Compile { .. } | LoadError::Read { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[mqtt]
broker = "127.0.0.1:1883"
client_id = "eliot"

[dead_letters]
path = "out/dead.sqlite"

[plugins.enrich]
file = "enrich.wasm"

[plugins.filter]
file = "filter.wasm"

[pipelines.telemetry]
topics = ["devices/+/telemetry"]
stages = ["enrich", "filter"]
sinks = ["file"]

[sinks.file]
type = "file"
path = "out/processed.jsonl"
"#;

    fn parse(dir: &Path, text: &str) -> Config {
        Config::parse(&dir.join("eliot.toml"), text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn restart_key(edit: impl Fn(&str) -> String) -> Option<String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
        for file in ["enrich.wasm", "filter.wasm"] {
            std::fs::write(dir.path().join("plugins").join(file), b"").unwrap();
        }
        let old = parse(dir.path(), BASE);
        let new = parse(dir.path(), &edit(BASE));
        needs_restart(&old, &new).map(|(key, _)| key)
    }

    #[test]
    fn stage_and_pipeline_changes_apply_live() {
        let reordered =
            |text: &str| text.replace(r#"["enrich", "filter"]"#, r#"["filter", "enrich"]"#);
        let removed = |text: &str| text.replace(r#"["enrich", "filter"]"#, r#"["enrich"]"#);
        let plugin_config = |text: &str| {
            text.replace(
                "file = \"filter.wasm\"",
                "file = \"filter.wasm\"\nconfig = { limit = 3 }",
            )
        };

        let pipeline_added = |text: &str| {
            format!("{text}\n[pipelines.extra]\ntopics = [\"x/#\"]\nstages = [\"enrich\"]\nsinks = [\"file\"]\n")
        };

        assert_eq!(restart_key(reordered), None);
        assert_eq!(restart_key(removed), None);
        assert_eq!(restart_key(plugin_config), None);
        assert_eq!(restart_key(pipeline_added), None);
    }

    #[test]
    fn connection_and_routing_changes_need_restart() {
        type Edit = fn(&str) -> String;
        let cases: [(&str, Edit); 4] = [
            ("mqtt", |t| {
                t.replace("client_id = \"eliot\"", "client_id = \"other\"")
            }),
            ("sinks", |t| {
                t.replace("out/processed.jsonl", "out/other.jsonl")
            }),
            ("pipelines.telemetry.topics", |t| {
                t.replace("devices/+/telemetry", "devices/#")
            }),
            ("pipelines.telemetry.workers", |t| {
                t.replace("sinks = [\"file\"]", "sinks = [\"file\"]\nworkers = 4")
            }),
        ];
        for (key, edit) in cases {
            assert_eq!(restart_key(edit).as_deref(), Some(key), "{key}");
        }
    }

    #[test]
    fn same_file_resolves_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let direct = dir.path().join("a.wasm");
        let indirect = dir.path().join(".").join("a.wasm");

        assert!(same_file(&direct, &indirect));
        assert!(!same_file(&direct, &dir.path().join("b.wasm")));
    }
}
