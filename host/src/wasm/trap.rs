//! Describing a trap of a plugin call for logs and dead letters.

use wasmtime::{Trap, WasmBacktrace};

/// Crates and functions of the Rust standard library and wasi-libc. The
/// frames of a trap's backtrace that belong to them are skipped to find the
/// plugin's own function, because a panic or a failed allocation traps
/// inside them.
const RUNTIME_NAMES: [&str; 9] = [
    "std",
    "core",
    "alloc",
    "__rustc",
    "dlmalloc",
    "abort",
    "rust_panic",
    "rust_begin_unwind",
    "__rust_start_panic",
];

/// Describes a failed call in one line: the trap (or the root error when it
/// is not a trap), the innermost plugin function on the stack, and whether a
/// Rust panic was on the stack, for example "wasm trap: wasm `unreachable`
/// instruction executed in <flaky_panic::FlakyPanic as
/// eliot_sdk::Processor>::process, after a panic".
pub fn describe_trap(error: &wasmtime::Error) -> String {
    let mut text = match error.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => error.root_cause().to_string(),
    };
    let Some(backtrace) = error.downcast_ref::<WasmBacktrace>() else {
        return text;
    };
    let names: Vec<String> = backtrace
        .frames()
        .iter()
        .filter_map(|frame| frame.func_name())
        .map(demangle)
        .collect();
    if let Some(function) = names.iter().find(|name| !is_runtime_function(name)) {
        text.push_str(" in ");
        text.push_str(function);
    }
    if names.iter().any(|name| name.contains("::panicking::")) {
        text.push_str(", after a panic");
    }
    text
}

/// Tells whether a demangled function name belongs to the language runtime,
/// by its first path segment: `std` in `std[1a2b]::process::abort`,
/// `flaky_panic` in `<flaky_panic::FlakyPanic as eliot_sdk::Processor>::process`.
fn is_runtime_function(name: &str) -> bool {
    let path = name.trim_start_matches('<');
    let end = path.find([':', '[', '<', ' ']).unwrap_or(path.len());
    RUNTIME_NAMES.contains(&&path[..end])
}

/// Demangles a Rust symbol name without its hashes. The name section may
/// hold mangled v0 names (`_RNv...`) or names that the linker demangled
/// already, which keep their `::h0123456789abcdef` hash. Other names are
/// returned unchanged.
fn demangle(name: &str) -> String {
    let demangled = format!("{:#}", rustc_demangle::demangle(name));
    without_hash(&demangled).to_owned()
}

fn without_hash(name: &str) -> &str {
    match name.rsplit_once("::h") {
        Some((path, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            path
        }
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_frames_are_recognized() {
        assert!(is_runtime_function("abort"));
        assert!(is_runtime_function("std[d123b7a1a2ed1472]::process::abort"));
        assert!(is_runtime_function(
            "__rustc[b7974e8690430dd9]::rust_begin_unwind"
        ));
        assert!(is_runtime_function(
            "core[6d9e98711c484d2e]::panicking::panic_fmt"
        ));
        assert!(is_runtime_function(
            "alloc[60c8babfd1b21f68]::raw_vec::handle_error"
        ));
        assert!(is_runtime_function(
            "<std::io::Error as core::fmt::Display>::fmt"
        ));
    }

    #[test]
    fn plugin_frames_are_not_runtime() {
        assert!(!is_runtime_function(
            "memory_hog::grow_until_allocation_fails::h3b398530a2724674"
        ));
        assert!(!is_runtime_function(
            "<flaky_panic::FlakyPanic as eliot_sdk::Processor>::process::hd75cb339561d009d"
        ));
        assert!(!is_runtime_function("eliot:plugin/processor@0.1.0#process"));
        assert!(!is_runtime_function("stdlib_user::run"));
    }

    #[test]
    fn v0_symbol_is_demangled() {
        assert_eq!(
            demangle("_RNvNtNtNtNtCshXfaRvt2tfW_3std3sys3pal4wasi7helpers14abort_internal"),
            "std::sys::pal::wasi::helpers::abort_internal"
        );
    }

    #[test]
    fn hash_suffix_is_removed() {
        assert_eq!(
            without_hash("memory_hog::grow_until_allocation_fails::h3b398530a2724674"),
            "memory_hog::grow_until_allocation_fails"
        );
        assert_eq!(
            without_hash("eliot:plugin/processor@0.1.0#process"),
            "eliot:plugin/processor@0.1.0#process"
        );
        assert_eq!(without_hash("crate::hash::hello"), "crate::hash::hello");
    }
}
