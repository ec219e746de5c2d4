#!/usr/bin/env bash
# Software offload fallback (issue 16): instructions per operation under callgrind for
# segmenting a 64 KiB TCPv4 GSO frame at MSS 1448 (45 segments, checksums complete or partial)
# and for checksumming 1500 bytes, built like ringbench ([profile.ringbench], fat LTO).
#
# Ir/op = (Ir(N2 iterations) - Ir(N1 iterations)) / (N2 - N1): setup cancels out.
#
# Environment (all optional):
#   CASES="tso4-64k tso4-64k-partial csum-1500 complete-1514"
#   N1=10 N2=60                 iterations of the two callgrind runs
#   PROFILE=ringbench           cargo profile
#   OFFLOADBENCH=/path/to/bin   use this binary, skip the build
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CASES=${CASES:-"tso4-64k tso4-64k-partial csum-1500 complete-1514"}
N1=${N1:-10}
N2=${N2:-60}
PROFILE=${PROFILE:-ringbench}

die() { echo "offloadbench.sh: $*" >&2; exit 2; }
[[ $N2 -gt $N1 ]] || die "N2 ($N2) must be greater than N1 ($N1)"
command -v valgrind > /dev/null || die "valgrind not found"

if [[ -n ${OFFLOADBENCH:-} ]]; then
    BIN=$OFFLOADBENCH
else
    echo "building offloadbench (profile $PROFILE)..." >&2
    (cd "$HERE" && cargo build -q --profile "$PROFILE" -p virtq-benches --bin offloadbench) || die "cargo build failed"
    dir=$(cd "$HERE" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    BIN=$dir/$PROFILE/offloadbench
fi
[[ -x $BIN ]] || die "no executable at $BIN"

ir_of() { # ir_of CASE ITERS
    local err
    err=$(valgrind --tool=callgrind --callgrind-out-file=/dev/null "$BIN" --case "$1" --iters "$2" 2>&1 > /dev/null) ||
        { echo "offloadbench.sh: FAILED under callgrind: $BIN --case $1 --iters $2" >&2; return 1; }
    awk '/Collected :/ { print $NF; found = 1 } END { exit !found }' <<< "$err"
}

echo
echo "| case | Ir/op |"
echo "|---|---:|"
failed=0
for c in $CASES; do
    if a=$(ir_of "$c" "$N1") && b=$(ir_of "$c" "$N2"); then
        echo "| $c | $(awk -v a="$a" -v b="$b" -v n1="$N1" -v n2="$N2" 'BEGIN { printf "%.0f", (b - a) / (n2 - n1) }') |"
    else
        echo "| $c | FAIL |"
        failed=1
    fi
done
exit $failed
