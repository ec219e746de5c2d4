#!/usr/bin/env bash
# Instructions per frame of virtq-net's data plane between two guests on its switch
# (benches/src/switchbench.rs): in-process, every data-plane pass moves one full burst of 32
# frames from guest A to guest B, and callgrind counts only the passes (--toggle-collect), so
# the figures do not depend on timing. With the dirty log on (as while both guests migrate)
# and off.
#
# Ir/frame = (Ir(N2 passes) - Ir(N1 passes)) / ((N2 - N1) * 32): the first pass (which moves
# B's one frame that teaches the switch where B is) cancels out.
#
# Environment (all optional):
#   SIZES="64 1500 tso" frame sizes; "tso": the TCP stream of two guests that negotiated TSO
#                       both ways (CSUM/HOST_TSO4, GUEST_CSUM/GUEST_TSO4, MRG_RXBUF), 64 KiB
#                       GSO frames sent as Linux sends them (header and headers in one buffer,
#                       the payload in 4 KiB fragments behind an indirect table) into 4 KiB
#                       mergeable buffers (switchbench --tso)
#   MRG="on"            VIRTIO_NET_F_MRG_RXBUF ("on off": both; a frame that fits one buffer
#                       takes the same path either way)
#   LOG="off on"        the dirty log
#   N1=50 N2=250        passes of the two callgrind runs (TSO_N1=10 TSO_N2=50 for "tso": a
#                       frame costs some 15,000 instructions)
#   THREADS="1 2"       data-plane threads (2: A and B polled by different threads, every frame
#                       handed between them; measured with the log off)
#   SWITCHBENCH=PATH    use this binary, skip the build (default: cargo's release profile,
#                       the profile virtq-net ships with)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SIZES=${SIZES:-"64 1500 tso"}
MRG=${MRG:-"on"}
LOG=${LOG:-"off on"}
THREADS=${THREADS:-"1 2"}
N1=${N1:-50}
N2=${N2:-250}
TSO_N1=${TSO_N1:-10}
TSO_N2=${TSO_N2:-50}

die() { echo "switchbench.sh: $*" >&2; exit 2; }
command -v valgrind > /dev/null || die "valgrind not found"
[[ $N2 -gt $N1 ]] || die "N2 ($N2) must be greater than N1 ($N1)"
[[ $TSO_N2 -gt $TSO_N1 ]] || die "TSO_N2 ($TSO_N2) must be greater than TSO_N1 ($TSO_N1)"

if [[ -n ${SWITCHBENCH:-} ]]; then
    BIN=$SWITCHBENCH
else
    echo "building switchbench (release)..." >&2
    (cd "$HERE" && cargo build --release -p virtq-benches --bin switchbench) >&2 || die "cargo build failed"
    BIN=${CARGO_TARGET_DIR:-$HERE/../target}/release/switchbench
fi
[[ -x $BIN ]] || die "no switchbench binary at $BIN"

# ir_of ARGS...: the instructions callgrind counted inside the data-plane passes.
ir_of() {
    local err rc=0
    err=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null --toggle-collect='switchbench::step' \
        "$BIN" "$@" 2>&1 > /dev/null) || rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "switchbench.sh: FAILED (exit $rc): $BIN $*" >&2
        grep -v '^==[0-9]*==' <<< "$err" | tail -n 15 >&2
        return 1
    fi
    awk '/Collected :/ { print $NF; found = 1 } END { exit !found }' <<< "$err"
}

# measure KEY ARGS...: Ir/frame into IR[KEY] from two runs ($N1 and $N2 passes, or the TSO
# ones for a --tso run).
measure() {
    local key=$1 n1=$N1 n2=$N2 a b
    shift
    if [[ " $* " == *" --tso "* ]]; then
        n1=$TSO_N1 n2=$TSO_N2
    fi
    if a=$(ir_of "$@" --steps "$n1") && b=$(ir_of "$@" --steps "$n2"); then
        IR[$key]=$(awk -v a="$a" -v b="$b" -v n1="$n1" -v n2="$n2" 'BEGIN { printf "%.1f", (b - a) / ((n2 - n1) * 32) }')
    else
        IR[$key]=FAIL
        failed=1
    fi
}

# size_args SIZE: switchbench's arguments for a frame size or "tso".
size_args() {
    if [[ $1 == tso ]]; then echo --tso; else echo --size "$1"; fi
}

# label SIZE: the table's name for it.
label() {
    if [[ $1 == tso ]]; then echo "64 KiB TSO"; else echo "$1"; fi
}

declare -A IR
failed=0
for size in $SIZES; do
    for mrg in $MRG; do
        for log in $LOG; do
            [[ $size == tso && $mrg != on ]] && continue
            # shellcheck disable=SC2207
            args=($(size_args "$size") --mrg "$mrg")
            [[ $log == on ]] && args+=(--log)
            echo "  size $size mrg $mrg log $log" >&2
            measure "$size,$mrg,$log" "${args[@]}"
        done
    done
done

for size in $SIZES; do
    for mrg in $MRG; do
        for threads in $THREADS; do
            [[ $threads == 1 ]] && continue
            [[ $size == tso && $mrg != on ]] && continue
            echo "  size $size mrg $mrg threads $threads" >&2
            # shellcheck disable=SC2207
            args=($(size_args "$size") --mrg "$mrg" --threads "$threads")
            measure "$size,$mrg,t$threads" "${args[@]}"
        done
    done
done

echo
echo "Ir per frame, guest A -> switch -> guest B (callgrind, ($N2 - $N1) passes x 32 frames, TSO ($TSO_N2 - $TSO_N1)); binary: $BIN"
echo
echo "| frame | mrg_rxbuf | Ir/frame | with dirty log | ratio |"
echo "|---:|---|---:|---:|---:|"
for size in $SIZES; do
    for mrg in $MRG; do
        [[ $size == tso && $mrg != on ]] && continue
        off=${IR[$size,$mrg,off]:--} on=${IR[$size,$mrg,on]:--}
        ratio=$(awk -v a="$on" -v b="$off" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else print "-" }')
        echo "| $(label "$size") | $mrg | $off | $on | $ratio |"
    done
done
if [[ $THREADS == *2* ]]; then
    echo
    echo "Handed between two data-plane threads (A's ring on one, B's on the other; dirty log off):"
    echo
    echo "| frame | mrg_rxbuf | one thread | two threads | ratio |"
    echo "|---:|---|---:|---:|---:|"
    for size in $SIZES; do
        for mrg in $MRG; do
            [[ $size == tso && $mrg != on ]] && continue
            one=${IR[$size,$mrg,off]:--} two=${IR[$size,$mrg,t2]:--}
            ratio=$(awk -v a="$two" -v b="$one" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else print "-" }')
            echo "| $(label "$size") | $mrg | $one | $two | $ratio |"
        done
    done
fi
if [[ $failed -ne 0 ]]; then
    echo "switchbench.sh: some runs FAILED (see above)" >&2
    exit 1
fi
