//! Test plugin that tries what the sandbox must deny, and forwards a report
//! of each attempt instead of the message's payload, so that tests can check
//! what a plugin can reach.
//!
//! For every message it tries to read `/etc/passwd`, list `/`, read the
//! environment variable `HOME`, count the environment variables, and open a
//! TCP connection to `127.0.0.1:PORT`, where `PORT` is the payload's JSON
//! field `port`. The forwarded payload is a JSON object such as:
//!
//! ```json
//! {"passwd": "denied: ...", "root_dir": "denied: ...", "home": "denied: ...",
//!  "env_vars": 0, "connect": "denied: ..."}
//! ```
//!
//! A permitted attempt is reported as `"read N bytes"`, `"listed N
//! entries"`, `"set, N bytes"` or `"connected to 127.0.0.1:PORT"`. The
//! plugin never panics, so every message reaches the sink with its report.

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};

use eliot_sdk::{Message, Outcome, PluginError, Processor};
use serde_json::{json, Value};

/// The sandbox-probe processor.
pub struct SandboxProbe;

impl Processor for SandboxProbe {
    const NAME: &'static str = "sandbox-probe";
    const VERSION: &'static str = "0.1.0";

    fn new(_config: Value) -> Result<Self, String> {
        Ok(SandboxProbe)
    }

    fn process(&mut self, mut msg: Message) -> Result<Outcome, PluginError> {
        let report = json!({
            "passwd": probe_file("/etc/passwd"),
            "root_dir": probe_dir("/"),
            "home": probe_env_var("HOME"),
            "env_vars": std::env::vars_os().count(),
            "connect": probe_connect(&msg.payload),
        });
        msg.payload = report.to_string().into_bytes();
        Ok(Outcome::Forward(msg))
    }
}

fn probe_file(path: &str) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => format!("read {} bytes", text.len()),
        Err(error) => format!("denied: {error}"),
    }
}

fn probe_dir(path: &str) -> String {
    match std::fs::read_dir(path) {
        Ok(entries) => format!("listed {} entries", entries.count()),
        Err(error) => format!("denied: {error}"),
    }
}

fn probe_env_var(name: &str) -> String {
    match std::env::var_os(name) {
        Some(value) => format!("set, {} bytes", value.len()),
        None => "denied: environment variable not found".to_owned(),
    }
}

/// Connects to 127.0.0.1 and no other address, on the port from the
/// payload.
fn probe_connect(payload: &[u8]) -> String {
    let Some(port) = port_from_payload(payload) else {
        return "skipped: the payload has no \"port\" field between 1 and 65535".to_owned();
    };
    let address = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    match TcpStream::connect(address) {
        Ok(_stream) => format!("connected to {address}"),
        Err(error) => format!("denied: {error}"),
    }
}

fn port_from_payload(payload: &[u8]) -> Option<u16> {
    let value: Value = serde_json::from_slice(payload).ok()?;
    let port = value.get("port")?.as_u64()?;
    u16::try_from(port).ok().filter(|&port| port != 0)
}

eliot_sdk::export_processor!(SandboxProbe);

#[cfg(test)]
mod tests {
    use super::*;

    // The probes themselves are not run natively, where nothing denies them.

    #[test]
    fn port_from_payload_reads_port_field() {
        assert_eq!(port_from_payload(br#"{"port": 18830}"#), Some(18830));
    }

    #[test]
    fn port_from_payload_rejects_invalid_ports() {
        assert_eq!(port_from_payload(br#"{"port": 0}"#), None);
        assert_eq!(port_from_payload(br#"{"port": 70000}"#), None);
        assert_eq!(port_from_payload(br#"{"port": "1883"}"#), None);
        assert_eq!(port_from_payload(b"not json"), None);
    }

    #[test]
    fn missing_port_skips_connect() {
        assert!(probe_connect(b"{}").starts_with("skipped: "));
    }
}
