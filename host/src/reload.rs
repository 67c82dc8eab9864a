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

    /// Returns a copy of the configuration in force.
    pub async fn config(&self) -> Config {
        self.state.lock().await.config.clone()
    }

    /// Returns the plugin currently loaded under `name`.
    pub async fn plugin(&self, name: &str) -> Option<Arc<LoadedPlugin>> {
        let state = self.state.lock().await;
        state.slots.get(name).map(|slot| slot.current().1)
    }

    /// Reloads every plugin whose file is `path`.
    pub async fn plugin_file_changed(&self, path: &Path) -> Vec<Outcome> {
        let state = self.state.lock().await;
        let plugins: Vec<PluginConfig> = state
            .config
            .plugins
            .values()
            .filter(|plugin| same_file(&plugin.path, path))
            .cloned()
            .collect();
        let mut outcomes = Vec::new();
        for plugin in plugins {
            let slot = state.slots[&plugin.name].clone();
            let outcome = self.reload_plugin(&plugin, &slot).await;
            self.report(&outcome);
            outcomes.push(outcome);
        }
        outcomes
    }

    /// Reloads one plugin from its file unless the file contains the running
    /// version.
    async fn reload_plugin(&self, plugin: &PluginConfig, slot: &Arc<PluginSlot>) -> Outcome {
        let running = slot.current().1;
        let path = plugin.path.clone();
        match self.load_if_changed(plugin.clone(), running.digest).await {
            Ok(None) => {
                tracing::info!(plugin = %plugin.name, file = %path.display(), "plugin file contains the running version; nothing to reload");
                Outcome::Unchanged
            }
            Ok(Some(loaded)) if loaded.info.name != running.info.name => Outcome::RolledBack {
                file: path,
                key: format!("plugins.{}", plugin.name),
                reason: format!(
                    "the new file is plugin \"{}\", not \"{}\" as the running version; to run another plugin under this stage, point plugins.{}.file at it in the config",
                    loaded.info.name, running.info.name, plugin.name
                ),
            },
            Ok(Some(loaded)) => {
                let summary = format!(
                    "plugin \"{}\" from {} is now version {} (was {})",
                    plugin.name,
                    path.display(),
                    loaded.info.version,
                    running.info.version
                );
                slot.replace(Arc::new(loaded));
                self.reset_breakers(slot);
                Outcome::Applied { summary }
            }
            Err(e) if recently_written(&path) && incomplete(&e) => {
                tracing::info!(plugin = %plugin.name, file = %path.display(), error = %e, "plugin file does not load yet and was just written; waiting for the rest of it");
                Outcome::Incomplete
            }
            Err(e) => Outcome::RolledBack {
                file: path,
                key: format!("plugins.{}", plugin.name),
                reason: e.to_string(),
            },
        }
    }

    /// Reads `plugin`'s file off the async runtime, and loads it unless its
    /// bytes hash to `running`.
    async fn load_if_changed(
        &self,
        plugin: PluginConfig,
        running: u64,
    ) -> Result<Option<LoadedPlugin>, LoadError> {
        let runtime = self.runtime.clone();
        off_runtime(plugin.name.clone(), move || {
            let bytes = crate::wasm::read_component(&plugin)?;
            if crate::wasm::digest(&bytes) == running {
                return Ok(None);
            }
            LoadedPlugin::from_bytes(&runtime, &plugin, &bytes).map(Some)
        })
        .await
    }

    /// Looks at every plugin file and the config again, after a watched
    /// folder was moved, replaced or switched through a symlink: the events
    /// of the files inside it may not have come.
    async fn rescan(&self) {
        let plugins: Vec<(PluginConfig, Arc<PluginSlot>)> = {
            let state = self.state.lock().await;
            state
                .config
                .plugins
                .values()
                .map(|plugin| (plugin.clone(), state.slots[&plugin.name].clone()))
                .collect()
        };
        self.config_changed().await;
        for (plugin, slot) in plugins {
            let outcome = self.reload_plugin(&plugin, &slot).await;
            self.report(&outcome);
        }
    }

    /// Returns the folders to watch: the plugin folder, the config file's
    /// folder, and the folder of every plugin file.
    async fn watched_folders(&self) -> Vec<PathBuf> {
        let state = self.state.lock().await;
        let mut folders = vec![state.config.plugin_dir.clone()];
        folders.extend(state.config.file.parent().map(Path::to_owned));
        folders.extend(
            state
                .config
                .plugins
                .values()
                .filter_map(|plugin| plugin.path.parent().map(Path::to_owned)),
        );
        folders.sort();
        folders.dedup();
        folders
    }

    /// Tells what an event on `path` concerns.
    async fn classify(&self, path: &Path) -> Change {
        let state = self.state.lock().await;
        if same_file(path, &state.config.file)
            || state
                .config
                .overlay
                .as_deref()
                .is_some_and(|overlay| same_file(path, overlay))
        {
            return Change::Config;
        }
        if state
            .config
            .plugins
            .values()
            .any(|plugin| same_file(&plugin.path, path))
        {
            return Change::Plugin;
        }
        // A folder on the way to the files, or a folder or symlink beside
        // them: a deployment may have switched the folder the files live in
        // (a Kubernetes ConfigMap swaps a `..data` symlink).
        let on_the_way = std::iter::once(&state.config.file)
            .chain(state.config.plugins.values().map(|plugin| &plugin.path))
            .chain(std::iter::once(&state.config.plugin_dir))
            .any(|file| file.starts_with(path));
        let is_link_or_folder =
            std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() || m.file_type().is_symlink());
        if on_the_way || is_link_or_folder {
            return Change::Folder;
        }
        Change::Other
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
        // The same layers as at start: the overlay and the variables are
        // read again from the files, but which ones apply is fixed for the
        // life of the process, as its environment is.
        let new = match Config::load_layered(&file, &state.config.layers) {
            Ok(config) => config,
            Err(errors) => {
                // The file of the first problem: an edit of the overlay is
                // reported as the overlay's.
                let file = errors
                    .0
                    .iter()
                    .find_map(|e| match &e.origin {
                        crate::layers::Origin::File(path) => Some(path.clone()),
                        crate::layers::Origin::Variables(_) => None,
                    })
                    .unwrap_or(file);
                return Outcome::RolledBack {
                    file,
                    key: errors
                        .0
                        .iter()
                        .map(|e| e.key.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    reason: errors.to_string(),
                };
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
            tracing::info!(plugin = %name, file = %plugin.path.display(), "reload is loading a plugin; the pipelines keep running meanwhile");
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
            tracing::info!(file = %file.display(), "config file has no change to apply");
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
                match self
                    .launcher
                    .start_off_runtime(&new.pipelines[*name], &state.slots)
                    .await
                {
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
        off_runtime(plugin.name.clone(), move || {
            LoadedPlugin::load(&runtime, &plugin)
        })
        .await
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
            }
            Outcome::Incomplete => {}
        }
    }

    /// Watches the plugin folder, the config file and every plugin file,
    /// and reloads what changes until the returned watcher is dropped.
    ///
    /// # Errors
    ///
    /// Fails when a folder cannot be watched.
    pub async fn watch(self: &Arc<Self>) -> anyhow::Result<Watcher> {
        use anyhow::Context as _;
        use notify::Watcher as _;

        let (events, received) = tokio::sync::mpsc::unbounded_channel();
        let to_task = events.clone();
        let mut watcher = notify::recommended_watcher(
            move |result: notify::Result<notify::Event>| match result {
                Ok(event) if is_write(&event.kind) => {
                    for path in event.paths {
                        let _ = to_task.send(FileEvent::Written(path));
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "file watch error; a change may be missed"),
            },
        )
        .context("cannot start the file watcher")?;
        let folders = self.watched_folders().await;
        for folder in &folders {
            watcher
                .watch(folder, notify::RecursiveMode::NonRecursive)
                .with_context(|| format!("cannot watch {}", folder.display()))?;
        }
        tracing::info!(folders = ?folders, "watching for plugin and config changes");

        let watcher = Arc::new(std::sync::Mutex::new(watcher));
        let task =
            tokio::spawn(
                self.clone()
                    .handle_changes(watcher.clone(), folders, events, received),
            );
        Ok(Watcher {
            _watcher: watcher,
            task,
        })
    }

    /// Handles file events: each path once it has been quiet for
    /// [`DEBOUNCE`], one at a time.
    async fn handle_changes(
        self: Arc<Self>,
        watcher: Arc<std::sync::Mutex<notify::RecommendedWatcher>>,
        mut folders: Vec<PathBuf>,
        events: tokio::sync::mpsc::UnboundedSender<FileEvent>,
        mut received: tokio::sync::mpsc::UnboundedReceiver<FileEvent>,
    ) {
        // When each changed path is due.
        let mut due: BTreeMap<PathBuf, tokio::time::Instant> = BTreeMap::new();
        loop {
            let next = due.values().min().copied();
            tokio::select! {
                event = received.recv() => match event {
                    // A new write postpones the path.
                    Some(FileEvent::Written(path)) => {
                        due.insert(path, tokio::time::Instant::now() + DEBOUNCE);
                    }
                    // A second look never overtakes a write still pending.
                    Some(FileEvent::LookAgain(path)) => {
                        due.entry(path).or_insert_with(tokio::time::Instant::now);
                    }
                    None => return,
                },
                () = tokio::time::sleep_until(next.unwrap_or_else(tokio::time::Instant::now)), if next.is_some() => {
                    let now = tokio::time::Instant::now();
                    let ready: Vec<PathBuf> = due
                        .iter()
                        .filter(|(_, at)| **at <= now)
                        .map(|(path, _)| path.clone())
                        .collect();
                    for path in ready {
                        due.remove(&path);
                        match self.classify(&path).await {
                            Change::Config => {
                                self.config_changed().await;
                            }
                            Change::Plugin => {
                                let outcomes = self.plugin_file_changed(&path).await;
                                if outcomes.contains(&Outcome::Incomplete) {
                                    let events = events.clone();
                                    tokio::spawn(async move {
                                        tokio::time::sleep(SETTLE).await;
                                        let _ = events.send(FileEvent::LookAgain(path));
                                    });
                                }
                            }
                            Change::Folder => {
                                tracing::info!(path = %path.display(), "a watched folder changed; looking at every plugin and the config again");
                                folders = self.rewatch(&watcher, &folders).await;
                                self.rescan().await;
                            }
                            Change::Other => {}
                        }
                    }
                    // The config may name plugin files in new folders.
                    let wanted = self.watched_folders().await;
                    if wanted != folders {
                        folders = self.rewatch(&watcher, &folders).await;
                    }
                }
            }
        }
    }

    /// Watches the current folders anew, because a watch follows the folder
    /// it was set on, not the path: after the path was moved or switched,
    /// the old watch reports nothing. Returns the folders now watched.
    async fn rewatch(
        &self,
        watcher: &std::sync::Mutex<notify::RecommendedWatcher>,
        old: &[PathBuf],
    ) -> Vec<PathBuf> {
        use notify::Watcher as _;

        let folders = self.watched_folders().await;
        let mut watcher = watcher.lock().unwrap_or_else(|e| e.into_inner());
        for folder in old {
            let _ = watcher.unwatch(folder);
        }
        for folder in &folders {
            if let Err(e) = watcher.watch(folder, notify::RecursiveMode::NonRecursive) {
                tracing::warn!(folder = %folder.display(), error = %e, "cannot watch the folder; its changes are not reloaded");
            }
        }
        folders
    }
}

/// Runs a load of plugin `name` on a blocking thread, because compiling and
/// `init` take long and `init` may use WASI, which blocks. A panic becomes a
/// load error.
async fn off_runtime<T: Send + 'static>(
    name: String,
    load: impl FnOnce() -> Result<T, LoadError> + Send + 'static,
) -> Result<T, LoadError> {
    tokio::task::spawn_blocking(load)
        .await
        .unwrap_or_else(|panic| {
            Err(LoadError::Trapped {
                plugin: name,
                reason: format!("loading panicked: {panic}"),
            })
        })
}

/// A file event for the reload task.
enum FileEvent {
    /// The watcher saw a write to the path.
    Written(PathBuf),
    /// A plugin file did not load while it was being written: look again.
    LookAgain(PathBuf),
}

/// Kind of a changed path.
enum Change {
    Config,
    Plugin,
    /// A folder or symlink that the files may live behind.
    Folder,
    /// Anything else in a watched folder, such as a log file.
    Other,
}

/// Watches files for a [`Reloader`] until dropped.
pub struct Watcher {
    _watcher: Arc<std::sync::Mutex<notify::RecommendedWatcher>>,
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
    // The log subscriber, the admin server and the status subscription are
    // set up once at start.
    if old.log != new.log {
        return restart("log");
    }
    if old.admin != new.admin {
        return restart("admin");
    }
    if old.devices != new.devices {
        return restart("devices");
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
        if before.device_key != after.device_key {
            return restart(&format!("pipelines.{name}.device_key"));
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
/// written: not valid Wasm yet. A file that cannot be read, or is not a
/// regular file, is not being written.
fn incomplete(error: &LoadError) -> bool {
    matches!(error, LoadError::Compile { .. })
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
        let cases: [(&str, Edit); 5] = [
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
            ("pipelines.telemetry.device_key", |t| {
                t.replace(
                    "sinks = [\"file\"]",
                    "sinks = [\"file\"]\ndevice_key = { payload = \"id\" }",
                )
            }),
        ];
        for (key, edit) in cases {
            assert_eq!(restart_key(edit).as_deref(), Some(key), "{key}");
        }
    }

    #[test]
    fn operations_changes_need_restart() {
        type Edit = fn(&str) -> String;
        let cases: [(&str, Edit); 3] = [
            ("log", |t| format!("{t}\n[log]\nformat = \"json\"\n")),
            ("admin", |t| {
                format!("{t}\n[admin]\nlisten = \"127.0.0.1:0\"\n")
            }),
            ("devices", |t| {
                format!("{t}\n[devices]\nstatus_topic = \"devices/+/status\"\n")
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
