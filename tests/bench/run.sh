#!/usr/bin/env bash
# Runs every benchmark of tests/bench/BENCHMARKS.md: it builds the release
# host and the benchmark driver (the test suite's build), installs Node-RED for the comparison, and
# measures against Mosquitto instances that the driver starts on loopback.
#
#   tests/bench/run.sh           the full run; its output is BENCHMARKS.md's
#   tests/bench/run.sh --smoke   a short run of every part, for CI: it only
#                                proves that the benchmarks still work
#
# The driver exits non-zero when a QoS 1 measurement loses a message, so the
# smoke run also checks delivery.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

smoke=false
case "${1:-}" in
    --smoke) smoke=true ;;
    "") ;;
    *) echo "usage: tests/bench/run.sh [--smoke]" >&2; exit 2 ;;
esac

if ! command -v mosquitto >/dev/null 2>&1 \
    && [ ! -x /usr/sbin/mosquitto ] && [ ! -x /usr/local/sbin/mosquitto ]; then
    echo "mosquitto is missing; install it with: apt-get install -y mosquitto" >&2
    exit 1
fi
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

# Node-RED 4.1 is the newest release that runs on Node.js 20 (5.0 needs 22).
# It goes under target/, next to the other build outputs, and is not
# committed.
node_red_version=4.1.15
node_red_dir=target/bench/node-red
node_red="$node_red_dir/node_modules/.bin/node-red"
if [ ! -x "$node_red" ] || ! "$node_red" --help 2>/dev/null | grep -q "v$node_red_version"; then
    mkdir -p "$node_red_dir"
    npm install --prefix "$node_red_dir" --no-audit --no-fund --loglevel=error "node-red@$node_red_version"
fi

# The same build as the test suite's (tests/run.sh), so that after the tests
# this compiles nothing: the driver and the host binary it measures,
# eliot-under-test, which is the eliot command line built with the test
# crate's features. A build of -p eliot alone would resolve the
# dependencies' features differently and compile the host a second time.
cargo test --release --workspace --no-run
bench=target/release/eliot-bench

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo) of memory"

if $smoke; then
    echo "smoke run: each benchmark runs briefly to show that it works; its numbers and target comparisons are no measurement"
    "$bench" throughput --messages 2000
    "$bench" latency --burst 2000 --seconds 1
    "$bench" reload --rate 200 --seconds 1 --swaps 1
    "$bench" memory --messages 1000
    "$bench" startup --runs 1
    # Without --bench, criterion runs each benchmark once as a test.
    cargo test --release -p eliot-tests --bench stage_cost
else
    "$bench" throughput
    "$bench" latency
    "$bench" reload
    "$bench" memory
    "$bench" startup
    cargo bench -p eliot-tests --bench stage_cost
fi
