//! Rust guest SDK for Eliot plugins.
//!
//! A plugin implements [`Processor`] on plain Rust types and registers it with
//! [`export_processor!`]. Built for `wasm32-wasip2`, the macro exports the
//! `eliot:plugin/processor` interface of the WIT package in `wit/`. Built
//! natively, the macro expands to nothing, so the processor can be unit-tested
//! with `cargo test` and the helpers in [`testing`], without any Wasm tooling.
//!
//! ```
//! use eliot_sdk::{Message, Outcome, PluginError, Processor};
//!
//! struct Uppercase;
//!
//! impl Processor for Uppercase {
//!     const NAME: &'static str = "uppercase";
//!     const VERSION: &'static str = "1.0.0";
//!
//!     fn new(_config: serde_json::Value) -> Result<Self, String> {
//!         Ok(Uppercase)
//!     }
//!
//!     fn process(&mut self, mut msg: Message) -> Result<Outcome, PluginError> {
//!         msg.payload = msg.payload.to_ascii_uppercase();
//!         Ok(Outcome::Forward(msg))
//!     }
//! }
//!
//! eliot_sdk::export_processor!(Uppercase);
//!
//! let mut plugin = Uppercase::new(serde_json::json!({})).unwrap();
//! let out = plugin.process(eliot_sdk::testing::message("t", b"abc")).unwrap();
//! assert_eq!(eliot_sdk::testing::forwarded(out).payload, b"ABC");
//! ```

mod types;

pub mod log;
pub mod testing;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod guest;

pub use types::{ErrorKind, Message, Outcome, PluginError, Qos};

/// A message processor: one stage of an Eliot pipeline.
///
/// The host creates one instance per worker with [`Processor::new`] and then
/// calls [`Processor::process`] for every message routed to that worker, in
/// order per device. An instance may keep state across messages (a rolling
/// window, a counter), but the host may discard it after a trap and create a
/// fresh one, so state is a cache, not a record.
pub trait Processor: Sized + 'static {
    /// Plugin name, reported to the host and written to its logs.
    const NAME: &'static str;
    /// Plugin version, recorded with every message this plugin processed.
    const VERSION: &'static str;

    /// Creates an instance from the plugin's own configuration table (a JSON
    /// object, empty when the TOML has no table for the plugin).
    ///
    /// # Errors
    ///
    /// Returns a text that names the bad key and the expected value; the host
    /// refuses to load the plugin and shows that text.
    fn new(config: serde_json::Value) -> Result<Self, String>;

    /// Processes one message.
    ///
    /// # Errors
    ///
    /// [`ErrorKind::Invalid`] for a message that can never succeed (it goes to
    /// the dead-letter store), [`ErrorKind::Transient`] for a failure worth
    /// retrying.
    fn process(&mut self, msg: Message) -> Result<Outcome, PluginError>;
}

/// Deserializes a plugin's configuration into `T`, turning a serde error into
/// the text the host shows when it rejects the plugin.
///
/// Give `T` `#[serde(deny_unknown_fields)]` so that a misspelt key is
/// reported instead of silently ignored.
///
/// # Errors
///
/// Returns serde's description of the first problem, prefixed with the
/// plugin's view of it, for example ``invalid config: unknown field `maxx` ``.
pub fn parse_config<T: serde::de::DeserializeOwned>(config: serde_json::Value) -> Result<T, String> {
    serde_json::from_value(config).map_err(|e| format!("invalid config: {e}"))
}

/// Registers a [`Processor`] implementation as the plugin's export.
///
/// Use it once per plugin crate, at the top level. On targets other than
/// `wasm32` it expands to nothing.
#[macro_export]
macro_rules! export_processor {
    ($processor:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            use $crate::guest::bindings::eliot::plugin::types as wit;
            use $crate::guest::bindings::exports::eliot::plugin::processor::Guest;

            struct EliotComponent;

            impl Guest for EliotComponent {
                fn describe() -> wit::PluginInfo {
                    $crate::guest::describe::<$processor>()
                }

                fn init(config: String) -> Result<(), String> {
                    $crate::guest::init::<$processor>(config)
                }

                fn process(msg: wit::Message) -> Result<wit::Outcome, wit::Error> {
                    $crate::guest::process::<$processor>(msg)
                }
            }

            $crate::guest::bindings::export!(EliotComponent with_types_in $crate::guest::bindings);
        };
    };
}
