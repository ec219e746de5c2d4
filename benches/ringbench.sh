#!/usr/bin/env bash
# Device-side split-virtqueue benchmark: instructions per chain (callgrind) and wall-clock
# ns per chain for the `virtq` core, rust-vmm's virtio-queue 0.18, and a memcpy floor.
#
# Ir/chain = (Ir(N2 batches) - Ir(N1 batches)) / ((N2 - N1) * 32): setup and verification cost
# the same for any N, so they cancel.
#
# Environment (all optional):
#   IMPLS="memcpy virtq virtq-log rustvmm"  implementations to run (virtq-log: with a dirty log;
#                                   also virtq-net, virtq-net-log: the virtio-net RX/TX path;
#                                   virtq-packed: the packed ring, same chains, its driver's
#                                   per-chain work included, see benches/src/packed_impl.rs)
#   SHAPES="1desc 2desc indirect4"  chain shapes
#   SIZES="64 1500"                 payload sizes
#   DIRS="tx rx"                    directions
#   N1=200 N2=1200                  batch counts of the two callgrind runs
#   CALLGRIND=1                     0 skips the callgrind runs
#   TIME=1                          0 skips the native --time runs
#   TIME_ITERS=50000 TIME_REPS=5    batches per timed repetition, repetitions (best is shown)
#   PROFILE=auto                    cargo profile; auto = "ringbench" if the workspace
#                                   manifest defines [profile.ringbench], else "release"
#   RINGBENCH=/path/to/ringbench    use this binary, skip the build
#   TSV=/path/out.tsv               also write raw numbers as TSV
#
# Exit status: 0 if every run succeeded (and verified); 1 if any run failed (for example the
# virtq binary); 2 on usage/build problems.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMPLS=${IMPLS:-"memcpy virtq virtq-log rustvmm"}
SHAPES=${SHAPES:-"1desc 2desc indirect4"}
SIZES=${SIZES:-"64 1500"}
DIRS=${DIRS:-"tx rx"}
N1=${N1:-200}
N2=${N2:-1200}
CALLGRIND=${CALLGRIND:-1}
TIME=${TIME:-1}
TIME_ITERS=${TIME_ITERS:-50000}
TIME_REPS=${TIME_REPS:-5}
PROFILE=${PROFILE:-auto}
TSV=${TSV:-}

die() { echo "ringbench.sh: $*" >&2; exit 2; }

for i in $IMPLS; do
    case $i in memcpy | virtq | virtq-log | virtq-net | virtq-net-log | virtq-packed | rustvmm) ;; *) die "unknown impl '$i' in IMPLS" ;; esac
done
[[ $N2 -gt $N1 ]] || die "N2 ($N2) must be greater than N1 ($N1)"
if [[ $CALLGRIND == 1 ]] && ! command -v valgrind > /dev/null; then
    die "valgrind not found (install it, or set CALLGRIND=0)"
fi
command -v python3 > /dev/null || die "python3 not found"

# ---- build ---------------------------------------------------------------------------------
if [[ -n ${RINGBENCH:-} ]]; then
    BIN=$RINGBENCH
else
    if [[ $PROFILE == auto ]]; then
        manifest=$(cd "$HERE" && cargo locate-project --workspace --message-format plain) ||
            die "cargo locate-project failed"
        if grep -q '^\[profile\.ringbench\]' "$manifest"; then PROFILE=ringbench; else PROFILE=release; fi
    fi
    echo "building ringbench (profile $PROFILE)..." >&2
    build_json=$(mktemp)
    trap 'rm -f "$build_json"' EXIT
    (cd "$HERE" && cargo build --profile "$PROFILE" -p virtq-benches --bin ringbench \
        --message-format=json-render-diagnostics > "$build_json") || die "cargo build failed"
    BIN=$(python3 -c '
import json, sys
exe = None
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "ringbench" and m.get("executable"):
        exe = m["executable"]
print(exe or "")
' "$build_json")
    [[ -n $BIN && -x $BIN ]] || die "could not find the ringbench executable in cargo's output"
fi

# ---- runs ----------------------------------------------------------------------------------
declare -A IR NS
failed=0

# ir_of ARGS...: prints the "Collected" instruction count of one callgrind run.
ir_of() {
    local err rc=0
    err=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null "$BIN" "$@" 2>&1 > /dev/null) || rc=$?
    if [[ $rc -ne 0 ]]; then
        echo "ringbench.sh: FAILED (exit $rc) under callgrind: $BIN $*" >&2
        grep -v '^==[0-9]*==' <<< "$err" | tail -n 15 >&2
        return 1
    fi
    awk '/Collected :/ { print $NF; found = 1 } END { exit !found }' <<< "$err"
}

for shape in $SHAPES; do
    for size in $SIZES; do
        for dir in $DIRS; do
            sc="$shape/$size/$dir"
            for impl in $IMPLS; do
                args=(--impl "$impl" --shape "$shape" --size "$size" --dir "$dir")
                echo "  $sc $impl" >&2
                if [[ $CALLGRIND == 1 ]]; then
                    if a=$(ir_of "${args[@]}" --iters "$N1") && b=$(ir_of "${args[@]}" --iters "$N2"); then
                        IR[$sc,$impl]=$(awk -v a="$a" -v b="$b" -v n1="$N1" -v n2="$N2" \
                            'BEGIN { printf "%.1f", (b - a) / ((n2 - n1) * 32) }')
                    else
                        IR[$sc,$impl]=FAIL
                        failed=1
                    fi
                fi
                if [[ $TIME == 1 && ${IR[$sc,$impl]:-} != FAIL ]]; then
                    rc=0
                    out=$("$BIN" "${args[@]}" --iters "$TIME_ITERS" --reps "$TIME_REPS" --time 2>&1) || rc=$?
                    if [[ $rc -eq 0 ]] && ns=$(grep -o 'ns_per_chain=[0-9.]*' <<< "$out" | head -n1 | cut -d= -f2) && [[ -n $ns ]]; then
                        NS[$sc,$impl]=$ns
                    else
                        echo "ringbench.sh: FAILED (exit $rc): $BIN ${args[*]} --time" >&2
                        tail -n 15 <<< "$out" >&2
                        NS[$sc,$impl]=FAIL
                        failed=1
                    fi
                fi
            done
        done
    done
done

# ---- report --------------------------------------------------------------------------------
get() { # get ARRAY KEY -> value or "-"
    local -n arr=$1
    echo "${arr[$2]:--}"
}
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else print "-" }'
}

echo
echo "Ir = instructions per chain (callgrind, ($N2 - $N1) batches x 32 chains); ns = best of $TIME_REPS x $TIME_ITERS batches; binary: $BIN"
echo
echo "| scenario | memcpy floor Ir | virtq Ir | rust-vmm Ir | virtq/rust-vmm | virtq-log Ir | log/virtq | memcpy ns | virtq ns | rust-vmm ns |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
[[ -n $TSV ]] && printf 'scenario\timpl\tir_per_chain\tns_per_chain\n' > "$TSV"
for shape in $SHAPES; do
    for size in $SIZES; do
        for dir in $DIRS; do
            sc="$shape/$size/$dir"
            m=$(get IR "$sc,memcpy") v=$(get IR "$sc,virtq") r=$(get IR "$sc,rustvmm") l=$(get IR "$sc,virtq-log")
            echo "| $shape $size $dir | $m | $v | $r | $(ratio "$v" "$r") | $l | $(ratio "$l" "$v") | $(get NS "$sc,memcpy") | $(get NS "$sc,virtq") | $(get NS "$sc,rustvmm") |"
            if [[ -n $TSV ]]; then
                for impl in $IMPLS; do
                    printf '%s\t%s\t%s\t%s\n' "$sc" "$impl" "$(get IR "$sc,$impl")" "$(get NS "$sc,$impl")" >> "$TSV"
                done
            fi
        done
    done
done

if [[ " $IMPLS " == *" virtq-net "* || " $IMPLS " == *" virtq-net-log "* ]]; then
    echo
    echo "virtio-net path (net::receive_burst / parse_tx_copied, as virtq-net runs it), per frame:"
    echo
    echo "| scenario | virtq-net Ir | virtq-net-log Ir | log/net |"
    echo "|---|---:|---:|---:|"
    for shape in $SHAPES; do
        for size in $SIZES; do
            for dir in $DIRS; do
                sc="$shape/$size/$dir"
                n=$(get IR "$sc,virtq-net") l=$(get IR "$sc,virtq-net-log")
                echo "| $shape $size $dir | $n | $l | $(ratio "$l" "$n") |"
            done
        done
    done
fi

if [[ " $IMPLS " == *" virtq-packed "* ]]; then
    echo
    echo "packed ring (PackedQueue, same buffers and chains; includes the packed driver's per-chain"
    echo "re-publishing, see benches/src/packed_impl.rs), per chain:"
    echo
    echo "| scenario | virtq split Ir | virtq packed Ir | packed/split | memcpy floor Ir |"
    echo "|---|---:|---:|---:|---:|"
    for shape in $SHAPES; do
        for size in $SIZES; do
            for dir in $DIRS; do
                sc="$shape/$size/$dir"
                v=$(get IR "$sc,virtq") p=$(get IR "$sc,virtq-packed")
                echo "| $shape $size $dir | $v | $p | $(ratio "$p" "$v") | $(get IR "$sc,memcpy") |"
            done
        done
    done
fi

if [[ $failed -ne 0 ]]; then
    echo "ringbench.sh: some runs FAILED (see above)" >&2
    exit 1
fi
