#!/usr/bin/env bash
# Builds every inferlet in this workspace into a WebAssembly component under
# inferlets/target/components/NAME.wasm.
#
# Works on a fresh Debian 12 machine without a rustup wasm target: Debian's
# rustc-web (Rust 1.85) builds std for wasm32 from rust-web-src
# (-Zbuild-std), lld links, and `wasm-tools component new` wraps the module
# as a component. With rustup and the wasm32-unknown-unknown target
# installed, set PIE_WASM_RUSTUP=1 to use that instead.
set -euo pipefail
cd "$(dirname "$0")"

die() {
    echo "inferlets/build.sh: $*" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# The newest wasm-ld that apt has (Debian 12: lld-19).
find_wasm_ld() {
    for v in 22 21 20 19 18 17 16 15; do
        if command -v "wasm-ld-$v" >/dev/null 2>&1; then
            echo "wasm-ld-$v"
            return
        fi
    done
    command -v wasm-ld >/dev/null 2>&1 && echo wasm-ld
}

install_debian_toolchain() {
    command -v apt-get >/dev/null 2>&1 ||
        die "no /usr/bin/rustc (rustc-web) and no apt-get: install a Rust with the wasm32-unknown-unknown target and set PIE_WASM_RUSTUP=1"
    local lld
    as_root apt-get update -qq || true
    lld=$(apt-cache search --names-only '^lld-[0-9]+$' | cut -d' ' -f1 | sort -t- -k2 -n | tail -1)
    [ -n "$lld" ] || die "apt has no lld-NN package (run apt-get update?)"
    echo "== installing rustc-web cargo-web rust-web-src $lld"
    as_root apt-get install -y rustc-web cargo-web rust-web-src "$lld" ||
        die "apt-get install failed (on a fresh machine run apt-get update first)"
}

ensure_wasm_tools() {
    if command -v wasm-tools >/dev/null 2>&1; then
        return
    fi
    command -v cargo >/dev/null 2>&1 ||
        die "wasm-tools not found and no cargo to install it (cargo install wasm-tools)"
    echo "== installing wasm-tools (component subcommand only)"
    cargo install wasm-tools --locked --no-default-features --features component ||
        die "cargo install wasm-tools failed (it needs Rust >= 1.88 from rustup)"
}

build_modules() {
    if [ "${PIE_WASM_RUSTUP:-0}" = 1 ]; then
        cargo build --release --target wasm32-unknown-unknown
        return
    fi
    if [ ! -x /usr/bin/rustc ] || [ ! -x /usr/bin/cargo ] ||
        [ ! -d /usr/lib/rustlib/src/rust/library ] || [ -z "$(find_wasm_ld)" ]; then
        install_debian_toolchain
    fi
    local ld
    ld=$(find_wasm_ld)
    [ -n "$ld" ] || die "no wasm-ld after installing lld"
    echo "== building inferlets with $(/usr/bin/rustc --version), linker $ld"
    # RUSTC_BOOTSTRAP: -Zbuild-std on a stable compiler, to build std for
    # wasm32 from source. RUSTFLAGS from the caller would not fit that std.
    env -u RUSTFLAGS RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 \
        CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER="$ld" \
        /usr/bin/cargo build --release --locked -Zbuild-std=std,panic_abort \
        --target wasm32-unknown-unknown
}

make_components() {
    local out=target/components
    mkdir -p "$out"
    local n=0
    for module in target/wasm32-unknown-unknown/release/*.wasm; do
        [ -e "$module" ] || continue
        local name
        name=$(basename "$module")
        wasm-tools component new "$module" -o "$out/$name" ||
            die "wasm-tools component new failed for $module"
        echo "   $out/$name ($(wc -c <"$out/$name") bytes)"
        n=$((n + 1))
    done
    [ "$n" -gt 0 ] || die "no modules under target/wasm32-unknown-unknown/release"
}

ensure_wasm_tools
build_modules
echo "== making components"
make_components
echo "== building Python inferlets"
./build_python.sh
