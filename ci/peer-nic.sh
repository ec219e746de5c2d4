#!/usr/bin/env bash
# virtq-net's NIC uplink (`--nic`) against real peers: DPDK testpmd with net_virtio_user as the
# front-end of a switch port, and a veth pair as the NIC, whose far end is driven by the kernel
# (counted in its sysfs statistics) and by a second testpmd (net_af_packet, a frame generator).
#
#   ci/peer-nic.sh                  both NIC modes (xdp, packet)
#   PEER_SECONDS=5 ...              seconds of traffic per direction (default 2)
#   PEER_CASES='nic-xdp' ...        only these cases (nic-xdp, nic-packet)
#   PEER_KEEP=1 ...                 keep the logs directory (printed) instead of deleting it
#
# Set-up: two network namespaces this script creates, IPv6 off in both (no neighbour discovery
# or MLD frames: only the test's frames cross the veth). virtq-net runs in the first with
# `--socket-path SOCK --nic vqnic0,mode=MODE --control CTL --busy-poll`; vqnic0's peer, vqpeer0,
# is in the second. The front-end (testpmd, interactive, commands through a fifo) connects to
# SOCK from the root namespace (a unix socket). Per case:
#   1. guest -> NIC: the front-end runs `txonly` (64-byte UDP frames) for PEER_SECONDS; the
#      switch floods them (unknown destination) to the NIC, the kernel delivers them to vqpeer0.
#   2. NIC -> guest: the front-end runs `rxonly`; a second testpmd inside the peer namespace
#      sends 64-byte frames on vqpeer0 (`--vdev net_af_packet0,iface=vqpeer0`, txonly) for
#      PEER_SECONDS; the switch floods them to the front-end.
# Then `ctl stats` (the NIC's mode and counters, the port's queue counters) and SIGTERM.
# Checks: the NIC runs in the mode asked for (af_xdp / af_packet); direction 1: front-end
# TX-packets > 0 and equal to the frames virtq-net dequeued from its TX ring, NIC tx > 0 and
# vqpeer0's rx_packets grew by exactly the NIC's tx count (less what the veth dropped, its
# tx_dropped, reported); direction 2: the generator sent
# frames, NIC rx > 0, front-end RX-packets > 0 and equal to the frames virtq-net put in its RX
# ring; no malformed chains (queue errors), no NIC rx_drops, and virtq-net exits 0 on SIGTERM.
# Drops where a ring was full (front-end RX ring, NIC TX ring, kernel) are reported, not errors.
#
# Pinning as in ci/peer-testpmd.sh: virtq-net on CPU 0, the front-end on CPU 1; the generator
# also on CPU 1 (the front-end then only receives). Needs root (namespaces, AF_XDP, AF_PACKET;
# re-runs itself under sudo). Installs dpdk-dev if dpdk-testpmd is missing. Every process
# started is ended by PID on exit, and both namespaces (with the veth pair) are deleted.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${PEER_SECONDS:-2}
START=$SECONDS

if [[ -z ${VIRTQ_NET:-} ]]; then
    cargo build --release --locked -p virtq-net
    VIRTQ_NET=$(pwd)/${CARGO_TARGET_DIR:-target}/release/virtq-net
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "peer-nic: re-running as root (network namespaces, AF_XDP)" >&2
    exec sudo --preserve-env=PEER_SECONDS,PEER_CASES,PEER_KEEP VIRTQ_NET="$VIRTQ_NET" bash "$0" "$@"
fi
if ! command -v dpdk-testpmd > /dev/null; then
    echo "peer-nic: installing dpdk-dev (dpdk-testpmd)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpdk-dev
fi
TESTPMD=$(command -v dpdk-testpmd)

FE_CPU=1 BE_CPU=0
if (($(nproc) < 2)); then FE_CPU=0; fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/virtq-peer-nic.XXXXXX")
NS_VQ=vqpn$$-vq NS_PEER=vqpn$$-peer
NETNS=()
PIDS=()
PREFIXES=()
FIFO_FD=""
# shellcheck source=lib/processes.sh
source ci/lib/processes.sh

cleanup() {
    local pid ns
    if [[ -n $FIFO_FD ]]; then exec {FIFO_FD}>&- || true; fi
    for pid in "${PIDS[@]}"; do stop_pid "$pid" INT; done
    for ns in "${NETNS[@]}"; do ip netns del "$ns" 2> /dev/null || true; done
    remove_dpdk_runtime "${PREFIXES[@]}"
    if [[ -n ${PEER_KEEP:-} ]]; then echo "peer-nic: logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

make_nic_veth "$NS_VQ" "$NS_PEER"

peer_rx() { ip netns exec "$NS_PEER" cat /sys/class/net/vqpeer0/statistics/rx_packets; }
# Frames the veth dropped on the way (the far end's backlog full): vqnic0's tx_dropped.
veth_drops() { ip netns exec "$NS_VQ" cat /sys/class/net/vqnic0/statistics/tx_dropped; }

# RX-packets and TX-packets of the last `show port stats 0` in a testpmd log.
port_stats() {
    awk '/NIC statistics for port 0/ { inb = 1; rx = ""; tx = ""; next }
         inb && /RX-packets:/ { rx = $2 }
         inb && /TX-packets:/ { tx = $2; inb = 0 }
         END { print rx, tx }' "$1"
}

PASSED=0 FAILED=0
declare -a SUMMARY

run_case() { # NAME MODE(xdp|packet)
    local name=$1 mode=$2 dir=$WORK/$1 ok=1 why=()
    mkdir -p "$dir"
    local sock=$dir/vu.sock ctl=$dir/ctl vq_pid fe_pid gen_pid log=$dir/frontend.log
    ip netns exec "$NS_VQ" taskset -c "$BE_CPU" "$VIRTQ_NET" --socket-path "$sock" --nic "vqnic0,mode=$mode" \
        --control "$ctl" --busy-poll > "$dir/virtq-net.log" 2>&1 &
    vq_pid=$!
    PIDS+=("$vq_pid")
    wait_for "$dir/virtq-net.log" 'attached to the switch' 1 15 "$vq_pid" || ok=0

    local prefix=virtq-peer-nic-$$-$name-fe
    PREFIXES+=("$prefix")
    mkfifo "$dir/cmd"
    exec {FIFO_FD}<> "$dir/cmd"
    if ((ok)); then
        stdbuf -oL "$TESTPMD" --lcores "0@$FE_CPU,1@$FE_CPU" --no-huge -m 64 --file-prefix="$prefix" --no-pci \
            --no-telemetry --vdev "net_virtio_user0,path=$sock,queues=1,queue_size=256,mrg_rxbuf=1,in_order=1,server=0" \
            -- -i --forward-mode=txonly --txpkts=64 --total-num-mbufs=8192 --rxq=1 --txq=1 --nb-cores=1 \
            < "$dir/cmd" > "$log" 2>&1 &
        fe_pid=$!
        PIDS+=("$fe_pid")
        wait_for "$log" 'testpmd>' 1 30 "$fe_pid" "$vq_pid" \
            && wait_for "$dir/virtq-net.log" ': ready' 1 15 "$fe_pid" "$vq_pid" || ok=0
    fi
    cmd() { printf '%s\n' "$*" >&"$FIFO_FD"; }

    # 1. guest -> NIC.
    local p0=0 p1=0 d0=0 d1=0 fe_tx=0 fe_rx=0
    if ((ok)); then
        p0=$(peer_rx) d0=$(veth_drops)
        cmd start
        sleep "$SECS"
        cmd stop
        wait_for "$log" 'Accumulated forward statistics' 1 10 "$fe_pid" || ok=0
        sleep 0.5
        p1=$(peer_rx) d1=$(veth_drops)
    fi
    # 2. NIC -> guest.
    local gen_log=$dir/generator.log gen_tx=""
    if ((ok)); then
        cmd set fwd rxonly
        cmd start
        prefix=virtq-peer-nic-$$-$name-gen
        PREFIXES+=("$prefix")
        ip netns exec "$NS_PEER" taskset -c "$FE_CPU" "$TESTPMD" --lcores "0@$FE_CPU,1@$FE_CPU" --no-huge -m 64 \
            --file-prefix="$prefix" --no-pci --no-telemetry --vdev "net_af_packet0,iface=vqpeer0" -- \
            --forward-mode=txonly --txpkts=64 --total-num-mbufs=8192 --nb-cores=1 --stats-period 3600 \
            < /dev/null > "$gen_log" 2>&1 &
        gen_pid=$!
        PIDS+=("$gen_pid")
        wait_for "$gen_log" 'Start automatic packet forwarding\|Logical Core' 1 30 "$gen_pid" || ok=0
        sleep "$SECS"
        stop_pid "$gen_pid" INT
        gen_tx=$(awk '/TX-packets:/ { v = $6 } END { print v }' "$gen_log")
        sleep 0.5
        cmd stop
        wait_for "$log" 'Accumulated forward statistics' 2 10 "$fe_pid" || ok=0
    fi
    if ((ok)); then
        cmd show port stats 0
        wait_for "$log" 'NIC statistics for port 0' 1 10 "$fe_pid" || ok=0
        read -r fe_rx fe_tx < <(port_stats "$log")
    fi

    # virtq-net's view: the NIC's mode and counters, the port's queues.
    local stats counters=""
    stats=$("$VIRTQ_NET" ctl "$ctl" stats 2> /dev/null || true)
    echo "$stats" > "$dir/stats.json"
    counters=$(python3 -c '
import json, sys
v = json.loads(sys.argv[1])
n = [p for p in v["ports"] if p["type"] == "nic"][0]
h = [p for p in v["ports"] if p["type"] == "vhost-user"][0]
s = lambda k: sum(q[k] for q in n["queues"])
hq = lambda d, k: sum(q[k] for q in h["queues"] if q["direction"] == d)
print(n["mode"].split(" ")[0], s("rx_packets"), s("tx_packets"), s("rx_drops"), s("tx_drops"), s("kernel_drops"),
      hq("rx", "packets"), hq("tx", "packets"), hq("rx", "drops"), hq("rx", "errors") + hq("tx", "errors"))
' "$stats" 2> /dev/null || true)
    if ((ok)); then cmd quit; fi
    stop_pid "$fe_pid" INT
    exec {FIFO_FD}>&-
    FIFO_FD=""
    local vq_rc=0
    kill -TERM "$vq_pid" 2> /dev/null || true
    wait "$vq_pid" 2> /dev/null || vq_rc=$?

    local nmode nrx ntx nrxd ntxd nkd vrx vtx vrxd verr
    read -r nmode nrx ntx nrxd ntxd nkd vrx vtx vrxd verr <<< "$counters"
    local peer=$((p1 - p0)) vdrop=$((d1 - d0))
    if ((!ok)); then why+=("did not complete"); fi
    if [[ -z $counters ]]; then
        why+=("no ctl stats")
    else
        [[ $nmode == "af_$mode" ]] || why+=("NIC mode $nmode, not af_$mode")
        ((fe_tx > 0)) || why+=("front-end sent nothing")
        ((fe_tx == vtx)) || why+=("front-end TX $fe_tx != virtq-net dequeued $vtx")
        ((ntx > 0)) || why+=("NIC sent nothing")
        ((peer + vdrop == ntx)) || why+=("vqpeer0 received $peer (+ $vdrop dropped by the veth) != NIC tx $ntx")
        ((${gen_tx:-0} > 0)) || why+=("generator sent nothing")
        ((nrx > 0)) || why+=("NIC received nothing")
        ((fe_rx > 0)) || why+=("front-end received nothing")
        ((fe_rx == vrx)) || why+=("front-end RX $fe_rx != virtq-net enqueued $vrx")
        ((verr == 0)) || why+=("$verr queue errors")
        ((nrxd == 0)) || why+=("$nrxd NIC rx_drops")
    fi
    ((vq_rc == 0)) || why+=("virtq-net exited $vq_rc")
    if grep -q ' WARN \| ERROR ' "$dir/virtq-net.log"; then
        echo "    virtq-net warnings:"
        grep ' WARN \| ERROR ' "$dir/virtq-net.log" | sed 's/^/      /' | head -10
    fi

    local line
    line=$(printf '%-10s %s  guest->NIC: front-end tx=%s NIC tx=%s (drops %s) peer rx=%s (veth drops %s)  NIC->guest: generator tx=%s NIC rx=%s (kernel drops %s) front-end rx=%s (ring full %s)' \
        "$name" "$(sed -n 's/.*attached to the switch: \(.*\), [0-9]* queue.*/\1/p' "$dir/virtq-net.log" | tail -1)" \
        "$fe_tx" "${ntx:-?}" "${ntxd:-?}" "$peer" "$vdrop" "${gen_tx:-?}" "${nrx:-?}" "${nkd:-?}" "$fe_rx" "${vrxd:-?}")
    if ((${#why[@]} == 0)); then
        PASSED=$((PASSED + 1))
        line="PASS $line"
    else
        FAILED=$((FAILED + 1))
        line="FAIL $line: $(
            IFS=';'
            echo "${why[*]}"
        )"
        for f in "$log" "$gen_log" "$dir/virtq-net.log"; do
            [[ -f $f ]] || continue
            echo "    --- $(basename "$f") (tail) ---"
            tail -20 "$f" | sed 's/^/    /'
        done
    fi
    echo "peer-nic: $line"
    SUMMARY+=("$line")
}

echo "peer-nic: $("$TESTPMD" -v --help 2>&1 | grep -o 'DPDK [0-9.]*' || true) testpmd (CPU $FE_CPU) <-> virtq-net (CPU $BE_CPU) <-> veth, ${SECS}s of 64-byte frames each way"
for c in "nic-xdp xdp" "nic-packet packet"; do
    read -r name mode <<< "$c"
    if [[ -n ${PEER_CASES:-} && " $PEER_CASES " != *" $name "* ]]; then continue; fi
    run_case "$name" "$mode"
done
echo
printf 'peer-nic: %s\n' "${SUMMARY[@]}"
# Counted into ci/test.sh's totals (as `peer: N passed, M failed`).
echo "peer: $PASSED passed, $FAILED failed ($((SECONDS - START))s)"
((FAILED == 0))
