#!/usr/bin/env bash
# The whole test suite, as CI runs it (README: "Set-up: two commands"). Installs what it needs first.
#
#   ci/test.sh            everything
#   SKIP_SETUP=1 ...      skip ci/setup.sh (already installed)
#   SKIP_MIRI=1 ...       skip the Miri run (slowest step)
#   SKIP_FUZZ=1 ...       skip the bounded fuzzing step
#   SKIP_GUESTS=1 ...     skip the QEMU guest matrix
#   SKIP_PEERS=1 ...      skip the DPDK testpmd peer matrix (about 40 s), the NIC uplink's
#                         peer cases (about 20 s) and the DPDK benchmarks (about 4 min)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==== %s\n' "$*"; }

# Every `cargo test` / `cargo miri test` output goes through here so that the totals can be
# printed as the run's last line.
RESULTS=$(mktemp)
# hugetlbfs guest memory for the fault tests (tests/hostile.rs `hugetlbfs_*`): 16 huge pages of
# 2 MiB, reserved for the run (as root) and given back after it.
HUGE=/proc/sys/vm/nr_hugepages
HUGE_BEFORE=""
if [[ -w $HUGE ]] && (($(cat "$HUGE") < 16)); then
    HUGE_BEFORE=$(cat "$HUGE")
    echo 16 > "$HUGE" || HUGE_BEFORE=""
fi
cleanup() {
    rm -f "$RESULTS"
    if [[ -n $HUGE_BEFORE ]]; then echo "$HUGE_BEFORE" > "$HUGE" || true; fi
}
trap cleanup EXIT
counted() { "$@" 2>&1 | tee -a "$RESULTS"; }

if [[ -z ${SKIP_SETUP:-} ]]; then
    step "setup"
    bash ci/setup.sh
fi

step "format"
cargo fmt --all --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p virtq --all-targets --features defmt,testing --locked -- -D warnings

step "rustdoc (warnings are errors: broken links, missing docs)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --locked
# The README's core example is the crate-level doctest (run by `cargo test` below).
bash ci/readme-example.sh

step "MSRV: the core and the vhost-user library build with Rust 1.87"
cargo +1.87 build -q -p virtq --features defmt,testing --locked
cargo +1.87 build -q -p virtq-vhost-user --locked

step "tests (host; doctests included)"
counted cargo test --workspace --locked

if [[ -z ${SKIP_PEERS:-} ]]; then
    step "vhost-user against a real peer: DPDK testpmd (net_virtio_user front-end)"
    counted bash ci/peer-testpmd.sh
    step "the NIC uplink against real peers: testpmd front-end, virtq-net --nic on a veth (xdp, packet)"
    counted bash ci/peer-nic.sh
fi

step "firmware example on the host (self-check against the test driver)"
cargo run -q -p virtq-firmware-example --locked

step "no_std builds"
bash ci/nostd.sh

if [[ -z ${SKIP_MIRI:-} ]]; then
    step "Miri: the core's tests"
    # Stacked borrows + data-race detection over every test of the core; proptest runs a
    # few cases per property under Miri (see core/tests/model.rs).
    MIRIFLAGS="${MIRIFLAGS:--Zmiri-strict-provenance}" counted cargo +nightly miri test -p virtq --locked
fi

if [[ -z ${SKIP_FUZZ:-} ]]; then
    step "fuzz targets, bounded (FUZZ_SECONDS=${FUZZ_SECONDS:-30} each; ci/fuzz.sh documents the long run)"
    bash ci/fuzz.sh
fi

if [[ -z ${SKIP_GUESTS:-} ]]; then
    step "real guests: Linux virtio-net in QEMU (TCG) against virtq-net (ci/guest)"
    counted env GUEST_SUMMARY=target/guest/summary.md bash ci/guest/run-matrix.sh
fi

step "ring benchmark (callgrind instruction counts; a report, not a gate)"
# Both builds: fat LTO on both sides (what VMMs ship) and cargo's release defaults (what most
# users build, and the build behind the core issue's rust-vmm reference figure).
N1=20 N2=120 TIME=0 bash benches/ringbench.sh
N1=20 N2=120 TIME=0 PROFILE=ringbench-cargo-default bash benches/ringbench.sh

step "switch benchmark (virtq-net's data plane between two guests, in-process; a report, not a gate)"
bash benches/switchbench.sh

step "software offload fallback (callgrind instructions per 64 KiB segmented and per checksum; a report)"
bash benches/offloadbench.sh

if [[ -z ${SKIP_PEERS:-} ]]; then
    step "virtq-net against DPDK's vhost back-end (short run; a report, not a gate: README Benchmarks)"
    # One short round of every case proves the benchmark runs on a fresh machine; the figures
    # in the closing notes come from the full run (5 rounds of 5 s), on an otherwise idle machine.
    ROUNDS=1 SECS=2 bash benches/vs-dpdk.sh
    DEVICES="1 8 64" SECS=2 bash benches/footprint.sh
    step "the NIC path: virtq-net --nic vs DPDK testpmd bridging the same veth (short run, about 50 s; a report)"
    ROUNDS=1 SECS=2 bash benches/nic-vs-dpdk.sh
fi

# The closing line: totals over every test binary run above (host and Miri).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i + 1) ~ /^passed/) p += $i; if ($(i + 1) ~ /^failed/) f += $i } }
     /^(guests|peer): [0-9]+ passed, [0-9]+ failed/ { p += $2; f += $4 }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$RESULTS"
