//! The plugin sandbox: one wasmtime engine per process, components compiled
//! once (with the on-disk cache) and instantiated per worker from
//! `InstancePre`.

mod engine;
mod instance;
mod limiter;
mod trap;

pub use engine::{Runtime, RuntimeError};
pub use instance::{digest, read_component, CallError, LoadError, LoadedPlugin, StageInstance};

wasmtime::component::bindgen!({
    world: "plugin",
    path: "../wit",
});

pub use self::eliot::plugin::types::{
    Error as PluginError, ErrorKind, Message, Outcome, PluginInfo, Qos,
};
