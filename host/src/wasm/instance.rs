//! Loading a plugin component and calling it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use wasmtime::component::{Component, ResourceTable};
use wasmtime::{Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::engine::{Runtime, EPOCH_TICK};
use super::limiter::InstanceLimiter;
use super::trap::describe_trap;
use super::{eliot, Message, Outcome, Plugin, PluginError, PluginInfo, PluginPre};
use crate::config::{Grants, PluginConfig, PluginLimits, StageBreakerConfig};

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin \"{plugin}\": cannot read {path}: {source}")]
    Read {
        plugin: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "plugin \"{plugin}\": {path} is not a valid Wasm component: {reason}; \
         build it for wasm32-wasip2 or as a component, or correct plugins.{plugin}.file"
    )]
    Compile {
        plugin: String,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "plugin \"{plugin}\": {path} does not match the Eliot plugin contract \
         (world eliot:plugin/plugin@0.1.0): {reason}"
    )]
    Contract {
        plugin: String,
        path: PathBuf,
        reason: String,
    },
    #[error("plugin \"{plugin}\": init rejected its config: {reason}")]
    InitRejected { plugin: String, reason: String },
    #[error("plugin \"{plugin}\": trapped while starting: {reason}")]
    Trapped { plugin: String, reason: String },
}

/// Why a call into a plugin instance failed. After any of these the
/// instance is discarded, because its state may be inconsistent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("exceeded its time budget of {budget_ms} ms")]
    Timeout { budget_ms: u64 },
    #[error("trapped: {0}")]
    Trap(String),
}

/// Per-plugin counters that plugins raise through the `host` import.
pub type PluginCounters = Arc<Mutex<BTreeMap<String, u64>>>;

/// The state each store carries: WASI with nothing granted, the resource
/// limiter, and who the plugin is for log attribution.
pub struct StoreState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: InstanceLimiter,
    plugin: Arc<str>,
    counters: PluginCounters,
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl eliot::plugin::types::Host for StoreState {}

impl eliot::plugin::log::Host for StoreState {
    fn write(
        &mut self,
        level: eliot::plugin::log::Level,
        message: String,
        fields: Vec<(String, String)>,
    ) {
        use eliot::plugin::log::Level;

        let plugin = &*self.plugin;
        let fields = fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        match level {
            Level::Trace => tracing::trace!(target: "eliot::plugin", plugin, fields, "{message}"),
            Level::Debug => tracing::debug!(target: "eliot::plugin", plugin, fields, "{message}"),
            Level::Info => tracing::info!(target: "eliot::plugin", plugin, fields, "{message}"),
            Level::Warn => tracing::warn!(target: "eliot::plugin", plugin, fields, "{message}"),
            Level::Error => tracing::error!(target: "eliot::plugin", plugin, fields, "{message}"),
        }
    }
}

impl eliot::plugin::host::Host for StoreState {
    fn now_ms(&mut self) -> u64 {
        crate::clock::now_ms()
    }

    fn counter_add(&mut self, name: String, delta: u64) {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        *counters.entry(name).or_default() += delta;
    }
}

/// Largest component file a plugin may have. The Python components, the
/// biggest ones, are about 18 MB.
pub const MAX_COMPONENT_BYTES: u64 = 256 << 20;

/// Reads the component file of `config`. Refuses anything but a regular
/// file of at most [`MAX_COMPONENT_BYTES`]: reading a FIFO would block, and
/// a device such as `/dev/zero` would never end.
///
/// # Errors
///
/// [`LoadError::Read`] naming why.
pub fn read_component(config: &PluginConfig) -> Result<Vec<u8>, LoadError> {
    let error = |source: std::io::Error| LoadError::Read {
        plugin: config.name.clone(),
        path: config.path.clone(),
        source,
    };
    // Opened without blocking and checked on the open handle, so that a FIFO
    // swapped in between cannot block the read.
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&config.path)
        .map_err(error)?;
    let metadata = file.metadata().map_err(error)?;
    if !metadata.is_file() {
        return Err(error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file; put a Wasm component there",
        )));
    }
    if metadata.len() > MAX_COMPONENT_BYTES {
        return Err(error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} bytes is more than the {MAX_COMPONENT_BYTES} bytes a component may have",
                metadata.len()
            ),
        )));
    }
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    use std::io::Read as _;
    file.take(MAX_COMPONENT_BYTES)
        .read_to_end(&mut bytes)
        .map_err(error)?;
    Ok(bytes)
}

/// Lists the `eliot:` interfaces a component imports and exports, for an
/// error that names the contract version it was built against.
fn eliot_interfaces(component: &Component, engine: &wasmtime::Engine) -> String {
    let ty = component.component_type();
    let pick = |names: Vec<&str>| {
        names
            .into_iter()
            .filter(|name| name.starts_with("eliot:"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let exports = pick(ty.exports(engine).map(|(name, _)| name).collect());
    let imports = pick(ty.imports(engine).map(|(name, _)| name).collect());
    match (exports.is_empty(), imports.is_empty()) {
        (true, true) => "; the component uses no eliot: interface at all; build it against wit/world.wit".to_owned(),
        _ => format!(
            "; the component exports [{exports}] and imports [{imports}]; rebuild it against wit/world.wit (eliot:plugin@0.1.0)"
        ),
    }
}

/// Returns a hash of a component file's bytes.
pub fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};

    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// A compiled, linked plugin whose config its `init` accepted. Cheap to
/// instantiate again: one per worker, and a fresh one after every trap.
pub struct LoadedPlugin {
    pub name: String,
    pub path: PathBuf,
    pub info: PluginInfo,
    pub limits: PluginLimits,
    pub breaker: StageBreakerConfig,
    pub grants: Grants,
    pub max_retries: usize,
    pub counters: PluginCounters,
    /// Hash of the component file's bytes, to tell a changed file from a
    /// touched one. Not a security check.
    pub digest: u64,
    /// When this version was loaded, in ms since the Unix epoch.
    pub loaded_at_ms: u64,
    config_json: String,
    pre: PluginPre<StoreState>,
    engine: wasmtime::Engine,
}

impl LoadedPlugin {
    /// Compiles the component at `config.path`, links it, and runs `init`
    /// on a trial instance so that a bad config is found now and not on the
    /// first message.
    ///
    /// # Errors
    ///
    /// See [`LoadError`]: unreadable file, invalid Wasm, a component that does
    /// not match the WIT world, or an `init` that rejects the config.
    pub fn load(runtime: &Runtime, config: &PluginConfig) -> Result<Self, LoadError> {
        Self::from_bytes(runtime, config, &read_component(config)?)
    }

    /// Like [`LoadedPlugin::load`], with the component's bytes already read
    /// from `config.path`.
    ///
    /// # Errors
    ///
    /// As [`LoadedPlugin::load`], except for reading the file.
    pub fn from_bytes(
        runtime: &Runtime,
        config: &PluginConfig,
        bytes: &[u8],
    ) -> Result<Self, LoadError> {
        let plugin = config.name.clone();
        let component =
            Component::from_binary(&runtime.engine, bytes).map_err(|e| LoadError::Compile {
                plugin: plugin.clone(),
                path: config.path.clone(),
                // The first line names the problem; the rest is a dump of
                // bytes, which does not help a reader of a config error.
                reason: {
                    let text = format!("{e:#}");
                    let first = text.lines().next().unwrap_or_default();
                    // wasmparser appends "- expected=[" and a dump of the
                    // expected bytes, one per line.
                    first
                        .split(" - expected=")
                        .next()
                        .unwrap_or(first)
                        .to_owned()
                },
            })?;
        let contract = |e: wasmtime::Error| LoadError::Contract {
            plugin: plugin.clone(),
            path: config.path.clone(),
            reason: format!("{e:#}{}", eliot_interfaces(&component, &runtime.engine)),
        };
        let instance_pre = runtime
            .linker
            .instantiate_pre(&component)
            .map_err(contract)?;
        let pre = PluginPre::new(instance_pre).map_err(contract)?;

        let mut loaded = Self {
            name: plugin.clone(),
            path: config.path.clone(),
            info: PluginInfo {
                name: String::new(),
                version: String::new(),
            },
            limits: config.limits.clone(),
            breaker: config.breaker.clone(),
            grants: config.grants.clone(),
            max_retries: config.max_retries,
            counters: PluginCounters::default(),
            digest: digest(bytes),
            loaded_at_ms: crate::clock::now_ms(),
            config_json: config.config.to_string(),
            pre,
            engine: runtime.engine.clone(),
        };
        let mut trial = loaded.instantiate()?;
        loaded.info = trial.describe().map_err(|e| LoadError::Trapped {
            plugin,
            reason: e.to_string(),
        })?;
        Ok(loaded)
    }

    /// Creates a new instance and runs its `init` with the plugin's config.
    ///
    /// # Errors
    ///
    /// [`LoadError::InitRejected`] when `init` returns an error, and
    /// [`LoadError::Trapped`] when instantiation or `init` traps.
    pub fn instantiate(&self) -> Result<StageInstance, LoadError> {
        let trapped = |e: wasmtime::Error| LoadError::Trapped {
            plugin: self.name.clone(),
            reason: format!("{e:#}"),
        };
        let limits = InstanceLimiter::new(self.limits.memory_mib);
        let state = StoreState {
            wasi: self.wasi_context()?,
            table: ResourceTable::new(),
            limits,
            plugin: Arc::from(self.name.as_str()),
            counters: self.counters.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        store.set_epoch_deadline(budget_ticks(self.limits.call_budget_ms));

        let bindings = self.pre.instantiate(&mut store).map_err(trapped)?;
        store.set_epoch_deadline(budget_ticks(self.limits.call_budget_ms));
        bindings
            .eliot_plugin_processor()
            .call_init(&mut store, &self.config_json)
            .map_err(trapped)?
            .map_err(|reason| LoadError::InitRejected {
                plugin: self.name.clone(),
                reason,
            })?;
        Ok(StageInstance {
            store,
            bindings,
            budget_ms: self.limits.call_budget_ms,
        })
    }
}

impl LoadedPlugin {
    /// WASI with only what the config grants. By default nothing: no args,
    /// no environment, no folders, no sockets, no stdio (the plugin logs
    /// through the log import).
    fn wasi_context(&self) -> Result<WasiCtx, LoadError> {
        let mut builder = WasiCtxBuilder::new();
        for name in &self.grants.env {
            if let Ok(value) = std::env::var(name) {
                builder.env(name, value);
            }
        }
        for dir in &self.grants.read_dirs {
            builder
                .preopened_dir(&dir.host, &dir.guest, wasmtime_wasi::FsPerms::ReadOnly)
                .map_err(|e| LoadError::Trapped {
                    plugin: self.name.clone(),
                    reason: format!("cannot open granted folder {}: {e:#}", dir.host.display()),
                })?;
        }
        if self.grants.network {
            // In wasmtime-wasi 48 `inherit_network` alone still denies TCP
            // and UDP; each needs its own switch.
            builder
                .inherit_network()
                .allow_tcp(true)
                .allow_udp(true)
                .allow_ip_name_lookup(true);
        }
        Ok(builder.build())
    }
}

fn budget_ticks(budget_ms: u64) -> u64 {
    let tick_ms = EPOCH_TICK.as_millis() as u64;
    budget_ms.div_ceil(tick_ms) + 1
}

/// One live instance of a plugin, owned by one worker thread.
pub struct StageInstance {
    store: Store<StoreState>,
    bindings: Plugin,
    budget_ms: u64,
}

impl StageInstance {
    fn describe(&mut self) -> Result<PluginInfo, CallError> {
        self.start_call();
        let result = self
            .bindings
            .eliot_plugin_processor()
            .call_describe(&mut self.store);
        result.map_err(|e| self.classify(e))
    }

    /// Calls `process` under the time budget.
    ///
    /// # Errors
    ///
    /// The outer error is a trap or timeout: the instance must be discarded.
    /// The inner `Result` is the plugin's own answer.
    pub fn process(
        &mut self,
        message: &Message,
    ) -> Result<Result<Outcome, PluginError>, CallError> {
        self.start_call();
        let result = self
            .bindings
            .eliot_plugin_processor()
            .call_process(&mut self.store, message);
        result.map_err(|e| self.classify(e))
    }

    /// Sets the time budget of the next call and clears the record of a
    /// denied memory growth, so that it refers to that call only.
    fn start_call(&mut self) {
        self.store.set_epoch_deadline(budget_ticks(self.budget_ms));
        self.store.data_mut().limits.take_memory_denied();
    }

    fn classify(&mut self, error: wasmtime::Error) -> CallError {
        if let Some(Trap::Interrupt) = error.downcast_ref::<Trap>() {
            return CallError::Timeout {
                budget_ms: self.budget_ms,
            };
        }
        // The first line of `{error:#}` is only the header of the wasm
        // backtrace, so the trap and where it happened are described here.
        let mut reason = describe_trap(&error);
        let limits = &mut self.store.data_mut().limits;
        if limits.take_memory_denied() {
            let limit_mib = limits.memory_limit_mib();
            reason.push_str(&format!(
                ", after a memory growth beyond the memory limit of {limit_mib} MiB was denied"
            ));
        }
        CallError::Trap(reason)
    }
}
