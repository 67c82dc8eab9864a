//! Structured logging into the host's log.
//!
//! Inside a component these calls go to the host's `eliot:plugin/log`
//! import, and the host writes them with the plugin's name attached. In a
//! native build (unit tests) they are written to standard error.

/// Severity of a log event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Writes one log event with key-value fields.
pub fn write(level: Level, message: &str, fields: &[(&str, &str)]) {
    #[cfg(target_arch = "wasm32")]
    crate::guest::write_log(level, message, fields);

    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[{level:?}] {message} {fields:?}");
}

pub fn debug(message: &str, fields: &[(&str, &str)]) {
    write(Level::Debug, message, fields);
}

pub fn info(message: &str, fields: &[(&str, &str)]) {
    write(Level::Info, message, fields);
}

pub fn warn(message: &str, fields: &[(&str, &str)]) {
    write(Level::Warn, message, fields);
}

/// Current wall-clock time in milliseconds since the Unix epoch, from the
/// host's clock inside a component and the system clock natively.
pub fn now_ms() -> u64 {
    #[cfg(target_arch = "wasm32")]
    return crate::guest::bindings::eliot::plugin::host::now_ms();

    #[cfg(not(target_arch = "wasm32"))]
    return std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
}

/// Adds `delta` to the plugin's counter `name` in the host's statistics.
/// Natively this does nothing.
pub fn counter_add(name: &str, delta: u64) {
    #[cfg(target_arch = "wasm32")]
    crate::guest::bindings::eliot::plugin::host::counter_add(name, delta);

    #[cfg(not(target_arch = "wasm32"))]
    let _ = (name, delta);
}
