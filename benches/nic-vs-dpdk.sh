#!/usr/bin/env bash
# The NIC path: virtq-net's NIC uplink (`--nic`) against DPDK testpmd bridging the same
# interface to a vhost-user port, both driven by the same front-end (DPDK testpmd with
# `net_virtio_user`). The NIC is one end of a veth pair; its far end is the wire. In one
# invocation the two back-ends alternate A B A B … per case, and each round's ratio
# virtq/DPDK is printed: the machine (a shared VM) swings between a fast and a slow state that
# last seconds to minutes, so only figures taken back to back compare (benches/README.md).
#
#   benches/nic-vs-dpdk.sh                  every case, 5 rounds of 5 one-second windows
#   ROUNDS=1 SECS=2 benches/nic-vs-dpdk.sh  the short run of ci/test.sh
#   CASES='tx-xdp rx-xdp' ...               only these cases
#   TSV=out.tsv ...                         also every sample as TSV
#   KEEP=1 ...                              keep the logs directory (printed)
#   QSIZE=256 ...                           the front-end's ring size (default 1024)
#   GEN_CPU=1 ...                           the generator's CPU (default 0, see below)
#   VIRTQ_NET=path ...                      use this virtq-net binary (no build)
#
# Cases: DIRECTION-MODE.
#   DIRECTION tx (guest -> NIC): the front-end runs `txonly` (64-byte UDP frames); the rate is
#             the growth of the far end's rx_packets (sysfs), frames that crossed the veth.
#   DIRECTION rx (NIC -> guest): a generator sends 64-byte frames into the far end (a second
#             testpmd, `--vdev net_af_packet0,iface=vqpeer0`, txonly, inside its namespace); the
#             front-end runs `rxonly`; the rate is its Rx-pps. The generator's own rate (the far
#             end's tx_packets) is printed too: where both back-ends reach it, it was the limit.
#   MODE xdp: virtq-net `--nic vqnic0,mode=xdp` vs testpmd `--vdev net_af_xdp0,iface=vqnic0`
#             (both native XDP on the veth, copy mode).
#   MODE packet: virtq-net `--nic vqnic0,mode=packet` vs testpmd `--vdev net_af_packet0,iface=vqnic0`.
# The DPDK back-end is `--vdev net_vhost0,iface=SOCK --vdev <NIC>`, `--forward-mode=io` (port
# 0 <-> port 1); virtq-net is `--socket-path SOCK --nic ...` (the switch floods the front-end's
# and the generator's frames, whose destinations it never learned, to the other port).
#
# Set-up: two network namespaces this script creates, IPv6 off in both (only the benchmark's
# frames cross the veth): the back-end runs in the first, with vqnic0; vqpeer0 is in the
# second. Pinning as in benches/vs-dpdk.sh: the back-end on CPU 0 (testpmd's main and
# forwarding lcores, virtq-net's threads; both busy-poll), the front-end on CPU 1; the
# front-end's rings have 1024 entries (QSIZE=...). A machine with two CPUs has no third for the
# generator: it runs on CPU 0 with the back-end (GEN_CPU=...), which it shares half and half.
# The kernel's share of the work (veth, XDP redirect, filling the AF_PACKET ring) runs on the CPU
# of whoever sends: the back-end's for tx, the generator's for rx; the back-end must then drain
# in its half what the NIC queued in the generator's, so the depth of its NIC rings counts
# (virtq-net: 1024 XDP descriptors, a 2 MiB TPACKET_V3 ring; DPDK's defaults: 2048
# descriptors for net_af_xdp, 512 frames for net_af_packet). On CPU 1 instead, next to the
# front-end, the generator starves the front-end (a busy poller too): it then takes one ring of
# frames per time slice whatever the back-end, which measures the scheduler, not the back-end.
# Measurement: `start`, WARM seconds, then SECS one-second windows; a sample's rate is its best
# window (its average is printed too). Checks (a sample fails): the back-end started, the
# front-end connected, and the rate is above zero.
#
# Needs root (namespaces, AF_XDP; re-runs itself under sudo), dpdk-testpmd (installs dpdk-dev if
# missing) and 2 CPUs. Every process started is ended by PID on exit; both namespaces (with the
# veth pair) are deleted.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
SECS=${SECS:-5}
WARM=${WARM:-1}
CASES=${CASES:-tx-xdp rx-xdp tx-packet rx-packet}
TSV=${TSV:-}
QSIZE=${QSIZE:-1024}
GEN_CPU=${GEN_CPU:-0}

if [[ -z ${VIRTQ_NET:-} ]]; then
    cargo build --release --locked -p virtq-net
    VIRTQ_NET=$(pwd)/${CARGO_TARGET_DIR:-target}/release/virtq-net
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "nic-vs-dpdk: re-running as root (network namespaces, AF_XDP)" >&2
    exec sudo --preserve-env=ROUNDS,SECS,WARM,CASES,TSV,KEEP,QSIZE,GEN_CPU VIRTQ_NET="$VIRTQ_NET" bash "$0" "$@"
fi
if ! command -v dpdk-testpmd > /dev/null; then
    echo "nic-vs-dpdk: installing dpdk-dev (dpdk-testpmd)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpdk-dev
fi
TESTPMD=$(command -v dpdk-testpmd)
if (($(nproc) < 2)); then
    echo "nic-vs-dpdk: needs 2 CPUs (back-end and front-end each on its own)" >&2
    exit 2
fi

BE_CPU=0 FE_CPU=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/virtq-nic-vs-dpdk.XXXXXX")
NS_BE=vqnb$$-be NS_PEER=vqnb$$-peer
NETNS=()
PIDS=()
PREFIXES=()
FIFO_FD=""
# shellcheck source=../ci/lib/processes.sh
source ci/lib/processes.sh

cleanup() {
    local pid ns
    if [[ -n $FIFO_FD ]]; then exec {FIFO_FD}>&- || true; fi
    for pid in "${PIDS[@]}"; do stop_pid "$pid" INT; done
    for ns in "${NETNS[@]}"; do ip netns del "$ns" 2> /dev/null || true; done
    remove_dpdk_runtime "${PREFIXES[@]}"
    if [[ -n ${KEEP:-} ]]; then echo "nic-vs-dpdk: logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

make_nic_veth "$NS_BE" "$NS_PEER"

# peer_stat rx_packets|tx_packets: the far end's counter.
peer_stat() { ip netns exec "$NS_PEER" cat "/sys/class/net/vqpeer0/statistics/$1"; }
now() { date +%s.%N; }

# sample CASE BACKEND ROUND: one measurement into $RESULT ("best average offered" in Mpps;
# offered: the generator's rate, rx cases only); in the main shell, so that cleanup knows every
# PID it started.
sample() {
    local case=$1 be=$2 round=$3
    local dir=$WORK/$case-$be-$round sock be_pid fe_pid gen_pid="" prefix
    mkdir -p "$dir"
    sock=$dir/vu.sock
    [[ $case =~ ^(tx|rx)-(xdp|packet)$ ]] || { echo "unknown case $case" >&2; return 1; }
    local dirn=${BASH_REMATCH[1]} mode=${BASH_REMATCH[2]}
    if [[ $be == virtq ]]; then
        ip netns exec "$NS_BE" taskset -c "$BE_CPU" "$VIRTQ_NET" --socket-path "$sock" --nic "vqnic0,mode=$mode" \
            --busy-poll --log-level warn > "$dir/backend.log" 2>&1 &
    else
        local nic=net_af_xdp0,iface=vqnic0
        [[ $mode == packet ]] && nic=net_af_packet0,iface=vqnic0
        prefix=virtq-nvd-$$-be-$case-$round
        PREFIXES+=("$prefix")
        ip netns exec "$NS_BE" taskset -c "$BE_CPU" "$TESTPMD" --lcores "0@$BE_CPU,1@$BE_CPU" --no-huge -m 512 \
            --file-prefix="$prefix" --no-pci --no-telemetry --vdev "net_vhost0,iface=$sock,queues=1,client=0" \
            --vdev "$nic" -- --forward-mode=io --total-num-mbufs=32768 --rxq=1 --txq=1 --nb-cores=1 \
            --stats-period 3600 < /dev/null > "$dir/backend.log" 2>&1 &
    fi
    be_pid=$!
    PIDS+=("$be_pid")
    if ! wait_socket "$sock" 30 || ! kill -0 "$be_pid" 2> /dev/null; then
        stop_pid "$be_pid" INT
        return 1
    fi

    local fe_mode=txonly
    [[ $dirn == rx ]] && fe_mode=rxonly
    prefix=virtq-nvd-$$-fe-$case-$round-$be
    PREFIXES+=("$prefix")
    mkfifo "$dir/cmd"
    exec {FIFO_FD}<> "$dir/cmd"
    stdbuf -oL "$TESTPMD" --lcores "0@$FE_CPU,1@$FE_CPU" --no-huge -m 512 --file-prefix="$prefix" --no-pci \
        --no-telemetry --vdev "net_virtio_user0,path=$sock,queues=1,queue_size=$QSIZE,mrg_rxbuf=1,in_order=1,server=0" \
        -- -i --forward-mode="$fe_mode" --txpkts=64 --total-num-mbufs=32768 --rxq=1 --txq=1 --nb-cores=1 \
        < "$dir/cmd" > "$dir/frontend.log" 2>&1 &
    fe_pid=$!
    PIDS+=("$fe_pid")
    local ok=1 w
    wait_for "$dir/frontend.log" 'testpmd>' 1 30 "$fe_pid" "$be_pid" || ok=0
    if ((ok)); then
        printf 'start\n' >&"$FIFO_FD"
        if [[ $dirn == rx ]]; then
            prefix=virtq-nvd-$$-gen-$case-$round-$be
            PREFIXES+=("$prefix")
            ip netns exec "$NS_PEER" taskset -c "$GEN_CPU" "$TESTPMD" --lcores "0@$GEN_CPU,1@$GEN_CPU" --no-huge -m 256 \
                --file-prefix="$prefix" --no-pci --no-telemetry --vdev net_af_packet0,iface=vqpeer0 -- \
                --forward-mode=txonly --txpkts=64 --total-num-mbufs=16384 --nb-cores=1 --stats-period 3600 \
                < /dev/null > "$dir/generator.log" 2>&1 &
            gen_pid=$!
            PIDS+=("$gen_pid")
            wait_for "$dir/generator.log" 'Port statistics' 1 30 "$gen_pid" || ok=0
        fi
    fi
    if ((ok)); then
        sleep "$WARM"
        if [[ $dirn == tx ]]; then
            # Windows at the far end: rx_packets with a time stamp, once a second.
            echo "$(now) $(peer_stat rx_packets)" > "$dir/windows"
            for ((w = 1; w <= SECS; w++)); do
                sleep 1
                echo "$(now) $(peer_stat rx_packets)" >> "$dir/windows"
            done
        else
            echo "$(now) $(peer_stat tx_packets)" > "$dir/offered"
            printf 'show port stats 0\n' >&"$FIFO_FD"
            wait_for "$dir/frontend.log" 'NIC statistics for port 0' 1 10 "$fe_pid" || ok=0
            # One-second windows: testpmd's pps is over the time since the previous `show`.
            for ((w = 1; w <= SECS && ok; w++)); do
                sleep 1
                printf 'show port stats 0\n' >&"$FIFO_FD"
                wait_for "$dir/frontend.log" 'NIC statistics for port 0' $((w + 1)) 10 "$fe_pid" || ok=0
            done
            echo "$(now) $(peer_stat tx_packets)" >> "$dir/offered"
        fi
    fi
    if [[ -n $gen_pid ]]; then stop_pid "$gen_pid" INT; fi
    if ((ok)); then printf 'stop\nquit\n' >&"$FIFO_FD"; fi
    stop_pid "$fe_pid" INT
    exec {FIFO_FD}>&-
    FIFO_FD=""
    stop_pid "$be_pid" INT
    ((ok)) || return 1
    # The best window, the average of all windows, the offered rate; in Mpps.
    if [[ $dirn == tx ]]; then
        RESULT=$(awk 'NR > 1 { v = ($2 - n) / ($1 - t) / 1e6; s += v; k++; if (v > b) b = v } { t = $1; n = $2 }
            END { if (k) printf "%.3f %.3f -", b, s / k }' "$dir/windows")
    else
        local offered
        offered=$(awk 'NR == 1 { t = $1; n = $2 } NR == 2 { printf "%.3f", ($2 - n) / ($1 - t) / 1e6 }' "$dir/offered")
        RESULT=$(awk -v o="$offered" '/NIC statistics for port 0/ { k++ }
            k >= 2 { for (i = 1; i < NF; i++) if ($i == "Rx-pps:") { v = $(i + 1) / 1e6; s += v; n++; if (v > b) b = v } }
            END { if (n) printf "%.3f %.3f %s", b, s / n, o }' "$dir/frontend.log")
    fi
    [[ -n $RESULT ]] && awk -v r="$RESULT" 'BEGIN { split(r, v, " "); exit !(v[1] > 0) }'
}

label() { case $1 in dpdk) echo "DPDK testpmd" ;; virtq) echo "virtq-net" ;; esac; }
nic_of() { # BACKEND CASE
    case $1/${2#*-} in
        virtq/xdp) echo "mode=xdp" ;; virtq/packet) echo "mode=packet" ;;
        dpdk/xdp) echo "net_af_xdp" ;; dpdk/packet) echo "net_af_packet" ;;
    esac
}

ALL=$WORK/samples.tsv
printf 'case\tround\tbackend\tbest_mpps\taverage_mpps\toffered_mpps\n' > "$ALL"
declare -A BEST RATIOS
FAILED=0
ROWS=()
echo "nic-vs-dpdk: $ROUNDS rounds × ${SECS}s per back-end and case (Mpps, 64-byte frames); back-end on CPU $BE_CPU, front-end on CPU $FE_CPU, generator on CPU $GEN_CPU; NIC: a veth" >&2
for case in $CASES; do
    for ((r = 1; r <= ROUNDS; r++)); do
        declare -A V=()
        for be in virtq dpdk; do
            RESULT=""
            if sample "$case" "$be" "$r"; then
                read -r best avg offered <<< "$RESULT"
                V[$be]=$best
                BEST[$case/$be]+="$best "
                printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$case" "$r" "$be" "$best" "$avg" "$offered" >> "$ALL"
                echo "  $case round $r $be ($(nic_of "$be" "$case")): $best Mpps (average $avg)$([[ $offered != - ]] && echo ", offered $offered")" >&2
            else
                FAILED=$((FAILED + 1))
                echo "  $case round $r $be: FAILED (logs: $WORK/$case-$be-$r)" >&2
            fi
        done
        ratio=-
        if [[ -n ${V[virtq]:-} && -n ${V[dpdk]:-} ]]; then
            ratio=$(awk -v a="${V[virtq]}" -v b="${V[dpdk]}" 'BEGIN { printf "%.2f", a / b }')
            RATIOS[$case]+="$ratio "
        fi
        ROWS+=("| ${case#*-} | $([[ $case == tx-* ]] && echo 'guest → NIC' || echo 'NIC → guest') | $r | ${V[virtq]:--} | ${V[dpdk]:--} | $ratio |")
        unset V
    done
done

med() { tr ' ' '\n' <<< "$1" | grep . | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "-"; exit } printf "%.2f\n", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo
echo "Per round (best one-second window, Mpps; ratio virtq-net / DPDK within the round):"
echo
echo "| mode | direction | round | virtq-net Mpps | DPDK testpmd Mpps | ratio |"
echo "|---|---|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
echo
echo "Medians over the rounds:"
echo
echo "| mode | direction | virtq-net Mpps | DPDK testpmd Mpps | ratio within a round (median) |"
echo "|---|---|---:|---:|---:|"
for case in $CASES; do
    echo "| ${case#*-} | $([[ $case == tx-* ]] && echo 'guest → NIC' || echo 'NIC → guest') | $(med "${BEST[$case/virtq]:-}") | $(med "${BEST[$case/dpdk]:-}") | $(med "${RATIOS[$case]:-}") |"
done
[[ -n $TSV ]] && cp "$ALL" "$TSV"
if ((FAILED)); then
    echo "nic-vs-dpdk: $FAILED sample(s) failed" >&2
    exit 1
fi
