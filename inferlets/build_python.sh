#!/usr/bin/env bash
# Builds the Python inferlets into WebAssembly components under
# inferlets/target/components/python_NAME.wasm, with componentize-py (from
# PyPI, pinned below) installed into a local virtual environment
# (inferlets/target/pyenv, ignored by git).
#
# Each directory python/NAME/ holding an app.py becomes python_NAME.wasm;
# python/pie_inferlet/ (the SDK-lite) is on the module path of every one.
# The components import WASI p2, which the runtime links with an empty
# sandbox (no files, network, environment or arguments).
set -euo pipefail
cd "$(dirname "$0")"

COMPONENTIZE_PY_VERSION=0.25.1
VENV=target/pyenv
PYTHON=${PYTHON:-python3}

die() {
    echo "inferlets/build_python.sh: $*" >&2
    exit 1
}

install_venv() {
    command -v apt-get >/dev/null 2>&1 ||
        die "$PYTHON -m venv failed and there is no apt-get to install python3-venv"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    echo "== installing python3-venv"
    $sudo apt-get install -y python3-venv ||
        { $sudo apt-get update -qq && $sudo apt-get install -y python3-venv; } ||
        die "apt-get install python3-venv failed"
}

ensure_componentize_py() {
    local have=""
    if [ -x "$VENV/bin/componentize-py" ]; then
        have=$("$VENV/bin/componentize-py" --version 2>/dev/null | awk '{print $2}')
    fi
    [ "$have" = "$COMPONENTIZE_PY_VERSION" ] && return
    command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON (need Python >= 3.9 with venv)"
    if [ ! -x "$VENV/bin/pip" ]; then
        echo "== creating $VENV"
        if ! "$PYTHON" -m venv "$VENV"; then
            # Debian ships venv (and ensurepip) separately.
            rm -rf "$VENV"
            install_venv
            "$PYTHON" -m venv "$VENV" ||
                die "$PYTHON -m venv failed (on Debian: apt-get install python3-venv)"
        fi
    fi
    echo "== installing componentize-py $COMPONENTIZE_PY_VERSION"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "componentize-py==$COMPONENTIZE_PY_VERSION" ||
        die "pip install componentize-py==$COMPONENTIZE_PY_VERSION failed"
}

ensure_componentize_py
out=target/components
mkdir -p "$out"
n=0
for app in python/*/app.py; do
    [ -e "$app" ] || continue
    dir=$(dirname "$app")
    name=python_$(basename "$dir")
    echo "== componentize-py $dir -> $out/$name.wasm"
    "$VENV/bin/componentize-py" -d ../runtime/wit -w inferlet componentize \
        -p "$dir" -p python app -o "$out/$name.wasm" >/dev/null ||
        die "componentize-py failed for $dir"
    echo "   $out/$name.wasm ($(wc -c <"$out/$name.wasm") bytes)"
    n=$((n + 1))
done
[ "$n" -gt 0 ] || die "no python/*/app.py"
