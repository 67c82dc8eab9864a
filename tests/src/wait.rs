//! Bounded waits that poll a condition until a deadline.
//!
//! The short sleep between polls only paces the polling. Every wait ends at
//! its deadline with a panic that states what was expected and what was
//! found.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Pause between two polls of a condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Polls `condition` until it returns true.
///
/// # Panics
///
/// Panics with `description` when `timeout` passes first. Write the
/// description as the awaited state, for example "the host subscribed".
pub fn wait_until(description: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {description}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Returns the complete lines of a file, each without its line ending. A
/// last line without a final `\n` is left out, because its writer may not
/// have finished it. A missing file has no lines.
///
/// # Panics
///
/// Panics when the file exists but cannot be read.
pub fn read_complete_lines(path: impl AsRef<Path>) -> Vec<String> {
    let path = path.as_ref();
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == ErrorKind::NotFound => return Vec::new(),
        Err(err) => panic!("failed to read {}: {err}", path.display()),
    };
    let complete = match bytes.iter().rposition(|&byte| byte == b'\n') {
        Some(last_newline) => &bytes[..=last_newline],
        None => return Vec::new(),
    };
    String::from_utf8_lossy(complete)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Polls a JSON-lines file until it has at least `n` complete lines, and
/// returns all its complete lines, which may be more than `n`. The file may
/// be missing at first.
///
/// # Panics
///
/// Panics when `timeout` passes first, with the number of lines found and
/// the last one.
pub fn wait_for_lines(path: impl AsRef<Path>, n: usize, timeout: Duration) -> Vec<String> {
    let path = path.as_ref();
    let deadline = Instant::now() + timeout;
    loop {
        let lines = read_complete_lines(path);
        if lines.len() >= n {
            return lines;
        }
        if Instant::now() >= deadline {
            let last = lines.last().map_or("(none)", String::as_str);
            panic!(
                "timed out after {timeout:?} waiting for {n} lines in {}: found {} complete lines; last line: {last}",
                path.display(),
                lines.len()
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Does the same as [`wait_for_lines`] and parses each line as JSON.
///
/// # Panics
///
/// Panics on a timeout, or when a line is not valid JSON.
pub fn wait_for_json_lines(path: impl AsRef<Path>, n: usize, timeout: Duration) -> Vec<Value> {
    let path = path.as_ref();
    wait_for_lines(path, n, timeout)
        .iter()
        .enumerate()
        .map(|(index, line)| {
            serde_json::from_str(line).unwrap_or_else(|err| {
                panic!(
                    "{} line {}: invalid JSON: {err}: {line}",
                    path.display(),
                    index + 1
                )
            })
        })
        .collect()
}
