#!/usr/bin/env bash
# The vhost-user library against a real peer: DPDK testpmd with net_virtio_user as the
# front-end, the `reflect` example (adapters/vhost-user/examples/reflect.rs) as the back-end.
#
#   ci/peer-testpmd.sh              the whole matrix
#   PEER_SECONDS=5 ...              seconds of traffic per case (default 2)
#   PEER_CASES='client-mrg1 ...'    run only these cases (names as printed)
#   PEER_KEEP=1 ...                 keep the logs directory (printed) instead of deleting it
#
# Matrix: front-end as client (back-end listens) and as server (virtio-user server=1, back-end
# --client) × mrg_rxbuf on/off (both sides: testpmd's vdev argument and what the back-end
# offers); two queue pairs in each socket role; and a front-end restart in each role (two testpmd
# runs against one back-end process: it accepts again as a server, reconnects with backoff as a
# client). The same with packed virtqueues (virtio-user packed_vq=1; the back-end offers
# VIRTIO_F_RING_PACKED by default), with and without in_order. Every testpmd session:
#   1. testpmd (interactive, commands fed through a fifo) in `flowgen` mode with 64-byte
#      frames: it transmits and also receives and counts what comes back (txonly never polls
#      its RX queue). The back-end sends every frame back on the same pair.
#   2. `stop`, a pause for the back-end to drain the TX ring, then a short `rxonly` run so that
#      testpmd reads every frame left in its RX ring; then `show port stats 0`; `quit`.
# Then the back-end gets SIGTERM and writes its counters (totals over the sessions). Checks:
# testpmd TX-packets/TX-bytes == frames/bytes the back-end dequeued, frames/bytes the back-end
# enqueued == testpmd RX-packets/RX-bytes, both > 0, no malformed chains (vq errors) and, with
# two pairs, traffic on pair 1. Frames the back-end could not place (testpmd's RX ring full)
# are reported as `dropped` and are not an error.
#
# No hugepages (--no-huge -m 64: memfd memory that virtio-user can share; 8192 mbufs fit), no
# NIC (--no-pci). testpmd is pinned to CPU 1 and the back-end to CPU 0 (both busy-poll).
# Installs dpdk-dev if dpdk-testpmd is missing. Every process started is ended by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${PEER_SECONDS:-2}
START=$SECONDS

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
if ! command -v dpdk-testpmd > /dev/null; then
    echo "peer: installing dpdk-dev (dpdk-testpmd)" >&2
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpdk-dev
fi
TESTPMD=$(command -v dpdk-testpmd)

cargo build --release --locked -p virtq-vhost-user --example reflect
REFLECT=${CARGO_TARGET_DIR:-target}/release/examples/reflect

# Pinning: the front-end on CPU 1, the back-end on CPU 0 (one CPU: both on 0).
FE_CPU=1 BE_CPU=0
if (($(nproc) < 2)); then FE_CPU=0; fi
PIN=()
if command -v taskset > /dev/null; then PIN=(taskset -c "$BE_CPU"); fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/virtq-peer.XXXXXX")
PIDS=()       # every process started, ended by PID on exit
PREFIXES=()   # DPDK --file-prefix values (runtime directories to remove)
FIFO_FD=""
# The script runs from the repository root (cd above).
# shellcheck source=lib/processes.sh
source ci/lib/processes.sh

cleanup() {
    local pid
    if [[ -n $FIFO_FD ]]; then exec {FIFO_FD}>&- || true; fi
    for pid in "${PIDS[@]}"; do stop_pid "$pid" INT; done
    remove_dpdk_runtime "${PREFIXES[@]}"
    if [[ -n ${PEER_KEEP:-} ]]; then
        echo "peer: logs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# be_stat KEY FILE: a value from the back-end's `key value` stats file.
be_stat() { awk -v k="$1" '$1 == k { print $2 }' "$2"; }

# RX-packets, RX-bytes, TX-packets and TX-bytes of the last `show port stats 0` in a testpmd log.
port_stats() {
    awk '/NIC statistics for port 0/ { inb = 1; rx = ""; rxb = ""; tx = ""; txb = ""; next }
         inb && /RX-packets:/ { rx = $2; rxb = $6 }
         inb && /TX-packets:/ { tx = $2; txb = $6; inb = 0 }
         END { print rx, rxb, tx, txb }' "$1"
}

PASSED=0 FAILED=0
declare -a SUMMARY

# run_case NAME FE_ROLE MRG QUEUES SESSIONS [PACKED [IN_ORDER]]
#   FE_ROLE client: the back-end listens, virtio-user connects (server=0)
#   FE_ROLE server: virtio-user listens (server=1), the back-end connects (--client)
#   SESSIONS: testpmd runs one after the other against the same back-end process (2: the
#   front-end restarts; the back-end accepts again, or reconnects with backoff as a client).
#   The back-end's counters are totals over all sessions.
run_case() {
    local name=$1 role=$2 mrg=$3 queues=$4 sessions=$5 packed=${6:-0} in_order=${7:-1}
    local dir=$WORK/$name sock be_pid="" tp_pid ok=1 why=() s
    mkdir -p "$dir"
    sock=$dir/vu.sock

    local be_args=(--socket-path "$sock" --queues "$queues" --stats-file "$dir/backend.stats")
    if [[ $mrg == 0 ]]; then be_args+=(--no-mrg-rxbuf); fi
    local server=0
    if [[ $role == server ]]; then
        be_args+=(--client)
        server=1
    fi

    start_backend() {
        "${PIN[@]}" "$REFLECT" "${be_args[@]}" > "$dir/backend.out" 2> "$dir/backend.log" &
        be_pid=$!
        PIDS+=("$be_pid")
    }
    start_testpmd() { # start_testpmd SESSION
        local prefix=virtq-peer-$$-$name-$1
        PREFIXES+=("$prefix")
        mkfifo "$dir/cmd-$1"
        # Read-write open of the fifo: never blocks, and testpmd sees no EOF while it is open.
        exec {FIFO_FD}<> "$dir/cmd-$1"
        stdbuf -oL "$TESTPMD" --lcores "0@$FE_CPU,1@$FE_CPU" --no-huge -m 64 --file-prefix="$prefix" \
            --no-pci --no-telemetry \
            --vdev "net_virtio_user0,path=$sock,queues=$queues,queue_size=256,mrg_rxbuf=$mrg,in_order=$in_order,packed_vq=$packed,server=$server" \
            -- -i --forward-mode=flowgen --txpkts=64 --total-num-mbufs=8192 \
            --rxq="$queues" --txq="$queues" --nb-cores=1 \
            < "$dir/cmd-$1" > "$dir/testpmd-$1.log" 2>&1 &
        tp_pid=$!
        PIDS+=("$tp_pid")
    }
    cmd() { printf '%s\n' "$*" >&"$FIFO_FD"; }
    # Timeline of the case, kept with the logs (PEER_KEEP=1).
    mark() { echo "$(date +%s.%N) $*" >> "$dir/timeline"; }

    local t0=$SECONDS tp_rx=0 tp_tx=0 tp_rxb=0 tp_txb=0 srx srxb stx stxb log
    if [[ $role == client ]]; then
        start_backend
        wait_socket "$sock" 10 || ok=0
    fi
    for ((s = 1; s <= sessions && ok; s++)); do
        log=$dir/testpmd-$s.log
        mark "session $s: launch"
        start_testpmd "$s"
        if [[ $role == server && -z $be_pid ]]; then
            wait_socket "$sock" 10 && start_backend || ok=0
        fi
        # Up: testpmd started the port and the back-end has the first pair running (for the
        # n-th session, the n-th time).
        if ((ok)); then
            wait_for "$log" 'Checking link statuses' 1 30 "$tp_pid" "$be_pid" &&
                wait_for "$dir/backend.log" 'device ready' "$s" 15 "$tp_pid" "$be_pid" || ok=0
        fi
        if ((ok)); then
            mark "session $s: up"
            cmd start
            sleep "$SECS"
            cmd stop
            wait_for "$log" 'Accumulated forward statistics' 1 10 "$tp_pid" || ok=0
        fi
        if ((ok)); then
            # Traffic stopped: let the back-end drain the TX ring and reflect the last frames,
            # then have testpmd read everything left in its RX ring (`start` flushes the RX
            # queues first; the port counters count those frames too).
            sleep 0.3
            cmd set fwd rxonly
            cmd start
            sleep 0.3
            cmd stop
            wait_for "$log" 'Accumulated forward statistics' 2 10 "$tp_pid" || ok=0
        fi
        if ((ok)); then
            cmd show port stats 0
            wait_for "$log" 'NIC statistics for port 0' 1 10 "$tp_pid" || ok=0
        fi
        if ((ok)); then
            mark "session $s: counted"
            read -r srx srxb stx stxb < <(port_stats "$log")
            if [[ -n $srx && -n $stxb ]]; then
                tp_rx=$((tp_rx + srx)) tp_tx=$((tp_tx + stx)) tp_rxb=$((tp_rxb + srxb)) tp_txb=$((tp_txb + stxb))
            else
                ok=0
            fi
            cmd quit
        fi
        # testpmd ends on `quit` (or gets SIGINT).
        local i
        for ((i = 0; i < 100; i++)); do
            kill -0 "$tp_pid" 2> /dev/null || break
            sleep 0.05
        done
        if kill -0 "$tp_pid" 2> /dev/null; then
            # Slow exit: record where it is (seen: the kernel freeing its memfd memory under load,
            # hence the small -m).
            for t in /proc/"$tp_pid"/task/*; do
                echo "$(cat "$t/comm") $(cat "$t/wchan") $(cut -d' ' -f3 "$t/stat")"
                cat "$t/stack" 2> /dev/null
            done > "$dir/testpmd-$s.hang" 2>&1 || true
        fi
        stop_pid "$tp_pid" INT
        mark "session $s: testpmd exited"
        exec {FIFO_FD}>&-
        FIFO_FD=""
    done
    if [[ -n $be_pid ]]; then stop_pid "$be_pid" TERM; fi
    mark "back-end exited"
    local secs=$((SECONDS - t0))

    # Counters.
    local be_rx="?" be_tx="?" be_drop="?" be_rxb=0 be_txb=0 errors=0 pair1_rx=0
    if [[ -s $dir/backend.stats ]]; then
        be_rx=$(be_stat rx_packets "$dir/backend.stats")
        be_tx=$(be_stat tx_packets "$dir/backend.stats")
        be_drop=$(be_stat tx_dropped "$dir/backend.stats")
        errors=$(awk '$1 ~ /^vq[0-9]+\.errors$/ { s += $2 } END { print s + 0 }' "$dir/backend.stats")
        # Frame bytes (no virtio-net header): RX queues are even, TX queues odd.
        read -r be_txb be_rxb < <(awk '$1 ~ /^vq[0-9]+\.bytes$/ { q = substr($1, 3) + 0; b[q % 2] += $2 }
            END { printf "%.0f %.0f\n", b[0], b[1] }' "$dir/backend.stats")
        pair1_rx=$(be_stat pair1.rx_packets "$dir/backend.stats")
    fi
    if ((!ok)); then why+=("did not complete"); fi
    if [[ $be_rx == "?" ]]; then
        why+=("no back-end counters")
    else
        ((tp_tx > 0)) || why+=("testpmd sent nothing")
        ((tp_rx > 0)) || why+=("testpmd received nothing")
        ((tp_tx == be_rx)) || why+=("testpmd TX $tp_tx != back-end dequeued $be_rx")
        ((tp_rx == be_tx)) || why+=("testpmd RX $tp_rx != back-end enqueued $be_tx")
        ((tp_txb == be_rxb)) || why+=("testpmd TX-bytes $tp_txb != back-end dequeued bytes $be_rxb")
        ((tp_rxb == be_txb)) || why+=("testpmd RX-bytes $tp_rxb != back-end enqueued bytes $be_txb")
        ((errors == 0)) || why+=("$errors malformed chains")
        if ((queues > 1 && ${pair1_rx:-0} == 0)); then why+=("no traffic on pair 1"); fi
    fi
    if grep -q ' WARN ' "$dir/backend.log" 2> /dev/null; then
        echo "    back-end warnings:"
        grep ' WARN ' "$dir/backend.log" | sed 's/^/      /' | head -20
    fi

    local line
    line=$(printf '%-22s fe=%-6s mrg=%s q=%s packed=%s in_order=%s sessions=%s  testpmd tx=%s rx=%s  backend rx=%s tx=%s dropped=%s  %ss' \
        "$name" "$role" "$mrg" "$queues" "$packed" "$in_order" "$sessions" "$tp_tx" "$tp_rx" "$be_rx" "$be_tx" "$be_drop" "$secs")
    if ((${#why[@]} == 0)); then
        PASSED=$((PASSED + 1))
        line="PASS $line"
    else
        FAILED=$((FAILED + 1))
        line="FAIL $line: $(
            IFS=';'
            echo "${why[*]}"
        )"
        for log in "$dir"/testpmd-*.log "$dir/backend.log"; do
            [[ -f $log ]] || continue
            echo "    --- $(basename "$log") (tail) ---"
            tail -25 "$log" | sed 's/^/    /'
        done
    fi
    echo "peer: $line"
    SUMMARY+=("$line")
}

CASES=(
    "client-mrg1 client 1 1 1"
    "client-mrg0 client 0 1 1"
    "server-mrg1 server 1 1 1"
    "server-mrg0 server 0 1 1"
    "client-mq2 client 1 2 1"
    "server-mq2 server 0 2 1"
    "client-restart client 1 1 2"
    "server-restart server 0 1 2"
    "client-packed-mrg1 client 1 1 1 1 1"
    "client-packed-mrg0-noio client 0 1 1 1 0"
    "server-packed-mrg1-noio server 1 1 1 1 0"
    "server-packed-mrg0 server 0 1 1 1 1"
    "client-packed-mq2 client 1 2 1 1 1"
    "client-packed-restart client 1 1 2 1 0"
)
echo "peer: $("$TESTPMD" -v --help 2>&1 | grep -o 'DPDK [0-9.]*' || true) testpmd (CPU $FE_CPU) <-> reflect (CPU $BE_CPU), ${SECS}s of 64-byte flowgen traffic per case"
for c in "${CASES[@]}"; do
    read -r name role mrg queues sessions packed in_order <<< "$c"
    if [[ -n ${PEER_CASES:-} && " $PEER_CASES " != *" $name "* ]]; then continue; fi
    run_case "$name" "$role" "$mrg" "$queues" "$sessions" "${packed:-0}" "${in_order:-1}"
done

echo
printf 'peer: %s\n' "${SUMMARY[@]}"
echo "peer: $PASSED passed, $FAILED failed ($((SECONDS - START))s)"
((FAILED == 0))
