#!/usr/bin/env bash
# Runs every test of the workspace, unit and integration, from any folder.
# On a fresh Debian or Ubuntu machine with rustup it first installs what the
# tests need: the mosquitto broker (with apt-get), the wasm32-wasip2 target,
# and the plugin build tools of sdk/toolchains.sh. Extra arguments go to
# `cargo test`, for example a test name filter. Without them, a smoke run of
# the benchmarks follows the tests.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if [ "$(id -u)" -eq 0 ]; then
    sudo=""
else
    sudo="sudo"
fi

# The harness starts its own mosquitto processes on free ports of 127.0.0.1
# and never uses port 1883, so the system service that the Debian package
# may start does not affect the tests.
if ! command -v mosquitto >/dev/null 2>&1 \
    && [ ! -x /usr/sbin/mosquitto ] && [ ! -x /usr/local/sbin/mosquitto ]; then
    echo "run.sh: mosquitto not found; installing the Debian package" >&2
    $sudo apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto
fi

# A non-login shell may lack rustup's PATH entry.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi

if command -v rustup >/dev/null 2>&1; then
    installed_targets="$(rustup target list --installed)"
    if ! grep -qx wasm32-wasip2 <<<"$installed_targets"; then
        rustup target add wasm32-wasip2
    fi
else
    echo "run.sh: rustup not found; the wasm32-wasip2 target must already be installed" >&2
fi

# The build tools of the Python, JavaScript and C example plugins.
bash sdk/toolchains.sh

# Release mode, because wasmtime compiles plugins far too slowly in a debug
# build. The tests build the plugins with the same release profile.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?

# A short run of every benchmark, so that they cannot rot. Its numbers mean
# nothing on a busy CI machine; it fails only when a benchmark breaks or a
# QoS 1 run loses a message. A run with a test filter skips it.
bench_status=0
if [ "$#" -eq 0 ]; then
    bash tests/bench/run.sh --smoke || bench_status=$?
    if [ "$bench_status" -ne 0 ]; then
        echo "run.sh: the benchmark smoke run failed with status $bench_status" >&2
        status=1
    fi
fi

# cargo prints one result line per test binary, and the last one is often a
# crate without doc tests ("0 passed"). One total line says what ran.
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i + 1) ~ /^passed/) passed += $i
            if ($(i + 1) ~ /^failed/) failed += $i
        }
     }
     END { printf "total: %d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
