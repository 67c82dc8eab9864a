//! The process-wide wasmtime engine, its linker and the epoch ticker that
//! enforces per-call time budgets.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Cache, CacheConfig, Engine};

use super::instance::StoreState;
use super::Plugin;

/// How often the epoch advances. A call's time budget is rounded up to whole
/// ticks, so a budget is enforced to within one tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot create the compiled-component cache in {dir}: {source}")]
    Cache {
        dir: String,
        source: wasmtime::Error,
    },
    #[error("cannot create the wasmtime engine: {0}")]
    Engine(wasmtime::Error),
    #[error("cannot link the host functions: {0}")]
    Link(wasmtime::Error),
}

/// The engine, the linker every plugin is instantiated against, and the
/// ticker thread.
pub struct Runtime {
    pub(super) engine: Engine,
    pub(super) linker: Arc<Linker<StoreState>>,
    ticker: Option<Ticker>,
}

struct Ticker {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Runtime {
    /// Creates the engine with epoch interruption on and the compiled
    /// component cache in `cache_dir`, and starts the epoch ticker.
    ///
    /// # Errors
    ///
    /// Fails when the cache folder cannot be created or wasmtime rejects
    /// the configuration.
    pub fn new(cache_dir: &Path) -> Result<Self, RuntimeError> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);

        std::fs::create_dir_all(cache_dir).map_err(|e| RuntimeError::Cache {
            dir: cache_dir.display().to_string(),
            source: e.into(),
        })?;
        let mut cache_config = CacheConfig::new();
        cache_config.with_directory(cache_dir);
        let cache = Cache::new(cache_config).map_err(|source| RuntimeError::Cache {
            dir: cache_dir.display().to_string(),
            source,
        })?;
        config.cache(Some(cache));

        let engine = Engine::new(&config).map_err(RuntimeError::Engine)?;

        // Plugins may import WASI (every Rust std component and the Python
        // and JavaScript toolchains do), but each store's WASI context grants
        // nothing: no preopened folders, no environment, no sockets.
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(RuntimeError::Link)?;
        Plugin::add_to_linker::<StoreState, HasSelf<StoreState>>(&mut linker, |state| state)
            .map_err(RuntimeError::Link)?;

        let ticker = Ticker::start(engine.clone());
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            ticker: Some(ticker),
        })
    }
}

impl Ticker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("eliot-epoch".to_owned())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch ticker thread");
        Self { stop, thread }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.stop.store(true, Ordering::Relaxed);
            let _ = ticker.thread.join();
        }
    }
}
