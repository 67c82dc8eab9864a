//! Integration-test harness for Eliot.
//!
//! - [`broker`]: a real Mosquitto broker on a free loopback port.
//! - [`mqtt`]: an MQTT publisher that waits for every acknowledgement, and a
//!   subscriber that collects messages.
//! - [`plugins`]: builds the example plugin components, and the misbehaving
//!   test plugins of `tests/plugins/`, for `wasm32-wasip2`.
//! - [`dead_letters`]: reads the host's dead-letter store.
//! - [`data`]: the bundled sensor CSVs as the device messages the simulator
//!   sends.
//! - [`http`]: a minimal HTTP client for the admin server.
//! - [`silent_broker`]: an MQTT listener that never confirms a publish.
//! - [`wait`]: bounded polling waits.
//!
//! Helpers panic with a message that names what failed, because they run
//! inside tests. Every wait has a deadline.

use std::path::{Path, PathBuf};

pub mod broker;
pub mod config;
pub mod data;
pub mod dead_letters;
pub mod http;
pub mod mqtt;
pub mod plugins;
pub mod process;
pub mod silent_broker;
pub mod wait;

pub use broker::{free_port, Mosquitto, MosquittoBuilder, TlsListener};
pub use data::DeviceMessage;
pub use mqtt::{publish_all, QoS, ReceivedMessage, Subscriber};
pub use wait::{wait_for_lines, wait_until};

/// Returns the root of the cargo workspace, the parent of this crate's folder.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the eliot-tests crate folder has a parent")
        .to_path_buf()
}
