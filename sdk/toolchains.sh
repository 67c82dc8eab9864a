#!/usr/bin/env bash
# Installs what `eliot plugin build --lang python|js|c` needs, where it is
# missing: componentize-py (PyPI) in a virtual environment and
# componentize-js (npm) under target/toolchains, and clang with wasi-libc
# from Debian's packages. Safe to run again; it skips what is there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tools=target/toolchains
mkdir -p "$tools"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if [ ! -x "$tools/python/bin/componentize-py" ]; then
    echo "installing componentize-py into $tools/python" >&2
    python3 -m venv "$tools/python"
    "$tools/python/bin/pip" install --quiet componentize-py==0.25.1
fi

if [ ! -d "$tools/js/node_modules/@bytecodealliance/componentize-js" ]; then
    if ! command -v npm >/dev/null; then
        as_root apt-get update -q
        as_root apt-get install -y -q nodejs npm
    fi
    echo "installing componentize-js into $tools/js" >&2
    npm install --silent --no-audit --no-fund --prefix "$tools/js" @bytecodealliance/componentize-js@0.23.0
fi

missing=()
for package in clang lld wasi-libc libclang-rt-14-dev-wasm32; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]} from Debian's packages" >&2
    as_root apt-get update -q
    as_root apt-get install -y -q "${missing[@]}"
fi
echo "toolchains ready: componentize-py, componentize-js, clang and wasi-libc" >&2
