#!/usr/bin/env bash
# Builds the release host and the benchmark driver, then runs the
# benchmarks against a Mosquitto the driver starts on loopback.
# Extra arguments go to `eliot-bench reload`, for example `--seconds 2`.
set -euo pipefail
cd "$(dirname "$0")/../.."

command -v mosquitto >/dev/null || command -v /usr/sbin/mosquitto >/dev/null || {
    echo "mosquitto is missing; install it with: apt-get install -y mosquitto" >&2
    exit 1
}
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

cargo build --release -p eliot --bin eliot -p eliot-tests --bin eliot-bench
target/release/eliot-bench reload --eliot target/release/eliot "$@"
