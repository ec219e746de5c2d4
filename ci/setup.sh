#!/usr/bin/env bash
# Installs everything the build, the tests and the benchmarks need on a fresh Debian machine
# that has only Rust (rustup) installed. Idempotent: re-running it is cheap.
set -euo pipefail

log() { printf '\n== setup: %s\n' "$*" >&2; }

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

# Debian packages: valgrind (instruction counts in benches/), binutils (readelf for the
# firmware size report), python3 (bench table), iproute2 (network namespaces for TAP tests),
# dpdk-dev (dpdk-testpmd: the real vhost-user peer). ci/guest installs the QEMU guest tools.
need_apt=()
command -v valgrind > /dev/null || need_apt+=(valgrind)
command -v readelf > /dev/null || need_apt+=(binutils)
command -v python3 > /dev/null || need_apt+=(python3)
command -v ip > /dev/null || need_apt+=(iproute2)
command -v dpdk-testpmd > /dev/null || need_apt+=(dpdk-dev)
if ((${#need_apt[@]})); then
    log "apt packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

log "stable components and bare-metal targets"
rustup component add rustfmt clippy
rustup target add thumbv7em-none-eabihf aarch64-unknown-none riscv64gc-unknown-none-elf

log "MSRV toolchain (1.87, rust-version in Cargo.toml)"
rustup toolchain install 1.87 --profile minimal > /dev/null

log "nightly with Miri"
if ! rustup run nightly cargo miri --version > /dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal --component miri,rust-src
fi
cargo +nightly miri setup > /dev/null 2>&1 || cargo +nightly miri setup

log "cargo-fuzz"
if ! cargo +nightly fuzz --version > /dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
log "done"
