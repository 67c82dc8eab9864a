//! Eliot: an IoT ingestion host. MQTT in, a chain of sandboxed WebAssembly
//! component plugins in the order the TOML sets, sinks out.
//!
//! The binary (`src/main.rs`) is a thin command line over this library;
//! integration tests drive the same [`host::Host`].

pub mod ack;
pub mod admin;
pub mod breaker;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod deadletter;
pub mod device;
pub mod events;
pub mod fleet;
pub mod host;
pub mod layers;
pub mod mqtt;
pub mod outbox;
pub mod pipeline;
pub mod plugin_build;
pub mod plugin_new;
pub mod reload;
pub mod restart;
pub mod simulate;
pub mod sink;
pub mod source;
pub mod stats;
pub mod supervisor;
pub mod tls;
pub mod topic;
pub mod wasm;

/// The log filter used unless `RUST_LOG` is set. rumqttd logs an ERROR line
/// on every client disconnect, which is routine for a broker; its own log is
/// off unless asked for.
pub const DEFAULT_LOG_FILTER: &str = "info,rumqttd=off";

/// Installs the tracing subscriber with readable text lines; see
/// [`init_logging_with`].
pub fn init_logging() {
    init_logging_with(config::LogFormat::Text);
}

/// Installs the tracing subscriber: `RUST_LOG` if set, otherwise
/// [`DEFAULT_LOG_FILTER`]. The embedded broker stays silent unless
/// `RUST_LOG` names `rumqttd`. `Json` writes one JSON object per line with
/// the fields of the current span, for a log collector. A second call does
/// nothing.
pub fn init_logging_with(format: config::LogFormat) {
    let directives = match std::env::var("RUST_LOG") {
        Ok(value) if value.contains("rumqttd") => value,
        Ok(value) => format!("{value},rumqttd=off"),
        Err(_) => DEFAULT_LOG_FILTER.to_owned(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let _ = match format {
        config::LogFormat::Text => {
            // Colours only on a terminal, so that a log file holds plain text.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(ansi)
                .with_writer(std::io::stderr)
                .try_init()
        }
        config::LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init(),
    };
}
