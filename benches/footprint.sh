#!/usr/bin/env bash
# Memory footprint and aggregate rate of virtq-net and of DPDK's vhost back-end (testpmd
# `net_vhost`) with 1, 8 and 64 vhost-user devices in one process, each device driven by a
# DPDK testpmd `net_virtio_user` front-end port in `txonly` mode (guest TX, 64-byte frames).
#
#   benches/footprint.sh                 devices 1 8 64, 5 s of traffic each
#   DEVICES='1 8' SECS=3 ...             other counts / duration
#   KEEP=1 ...                           keep the logs directory
#   IR=1 ...                             instructions per frame instead of memory and rate: the
#                                        back-end runs under `valgrind --tool=callgrind`; counters
#                                        are zeroed after WARM s (default 5) and dumped SECS s
#                                        later, divided by the frames all front-end ports sent
#                                        meanwhile. Under valgrind the back-end is the bottleneck,
#                                        so this shows whether its cost per frame grows with the
#                                        number of devices it serves (wall time here swings 3x).
#
# Per back-end and device count it reports, from /proc/PID/smaps_rollup once every device
# carries traffic:
#   - Private: memory only the back-end maps: heap, stacks, its binary's written pages, and
#     for DPDK its --no-huge memory (a memfd of -m MiB, mbufs inside) — the back-end's own cost;
#   - Shared: pages it maps together with other processes: the front-ends' (guest) memory it
#     touched or populated, and shared libraries. DPDK maps guest memory with MAP_POPULATE, so
#     it counts all of it; virtq-net maps it lazily and counts the rings and buffers it used.
#     A region mapped once per device is counted once per device;
#   - the aggregate rate: the sum of every front-end port's Tx-pps over SECS seconds.
# Back-end on CPU 0; front-ends on CPU 1 (32 ports per front-end process: DPDK's
# RTE_MAX_ETHPORTS). The same limit caps a DPDK back-end process at 32 devices, so DPDK serves
# 64 devices with two processes (both on CPU 0, memory summed); virtq-net uses one. Each DPDK
# back-end process runs with 32768 mbufs as in benches/vs-dpdk.sh but only `--no-huge -m 256`
# (DPDK_MEM=MiB): the smallest power of two that holds that pool (-m 128 fails), so its
# private memory is not inflated by an oversized heap.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=${DEVICES:-"1 8 64"}
SECS=${SECS:-5}
PER_FE=32
DPDK_MEM=${DPDK_MEM:-256}
IR=${IR:-0}
WARM=${WARM:-5}
if [[ $IR == 1 ]]; then
    command -v valgrind > /dev/null || { echo "footprint: IR=1 needs valgrind" >&2; exit 2; }
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
if ! command -v dpdk-testpmd > /dev/null; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpdk-dev
fi
TESTPMD=$(command -v dpdk-testpmd)
if [[ -z ${VIRTQ_NET:-} ]]; then
    cargo build --release --locked -p virtq-net
    VIRTQ_NET=${CARGO_TARGET_DIR:-target}/release/virtq-net
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/virtq-footprint.XXXXXX")
PIDS=()
PREFIXES=()
FIFOS=()
# shellcheck source=../ci/lib/processes.sh
source ci/lib/processes.sh

cleanup() {
    local pid fd
    for fd in "${FIFOS[@]}"; do exec {fd}>&- || true; done
    for pid in "${PIDS[@]}"; do stop_pid "$pid" INT; done
    remove_dpdk_runtime "${PREFIXES[@]}"
    if [[ -n ${KEEP:-} ]]; then echo "footprint: logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# mem PID: "private_kb shared_kb" from smaps_rollup
mem() {
    awk '$1 ~ /^Private_(Clean|Dirty):$/ { p += $2 } $1 ~ /^Shared_(Clean|Dirty):$/ { s += $2 }
        END { print p, s }' "/proc/$1/smaps_rollup"
}

# measure BACKEND N: sets RESULT="private_kb shared_kb mpps" (in the main shell,
# so that cleanup knows every PID it started)
measure() {
    local be=$1 n=$2 dir=$WORK/$1-$2 i be_pids=()
    mkdir -p "$dir"
    local wrap=()
    if [[ $IR == 1 ]]; then wrap=(valgrind --tool=callgrind --compress-strings=no "--callgrind-out-file=$dir/cg.%p.out"); fi
    local args=()
    if [[ $be == virtq ]]; then
        for ((i = 0; i < n; i++)); do args+=(--socket-path "$dir/s$i.sock"); done
        taskset -c 0 "${wrap[@]}" "$VIRTQ_NET" "${args[@]}" --backend sink --busy-poll --log-level warn > "$dir/backend.log" 2>&1 &
        be_pids+=("$!")
        PIDS+=("$!")
    else
        # One testpmd holds at most RTE_MAX_ETHPORTS (32 in Debian's DPDK 22.11) ports, so 64
        # devices need two back-end processes; their memory is summed.
        local be_i
        for ((be_i = 0; be_i * PER_FE < n; be_i++)); do
            args=()
            for ((i = be_i * PER_FE; i < n && i < (be_i + 1) * PER_FE; i++)); do
                args+=(--vdev "net_vhost$i,iface=$dir/s$i.sock,queues=1,client=0")
            done
            local prefix=virtq-fp-$$-be-$n-$be_i
            PREFIXES+=("$prefix")
            taskset -c 0 "${wrap[@]}" "$TESTPMD" --lcores 0@0,1@0 --no-huge -m "$DPDK_MEM" --file-prefix="$prefix" --no-pci --no-telemetry \
                "${args[@]}" -- --forward-mode=rxonly --total-num-mbufs=32768 --nb-cores=1 --stats-period 3600 \
                < /dev/null > "$dir/backend$be_i.log" 2>&1 &
            be_pids+=("$!")
            PIDS+=("$!")
        done
    fi
    for ((i = 0; i < 2400; i++)); do
        [[ -S $dir/s$((n - 1)).sock ]] && break
        sleep 0.05
    done
    # Front-ends, PER_FE ports each.
    local fe fes=$(((n + PER_FE - 1) / PER_FE)) fe_fds=()
    for ((fe = 0; fe < fes; fe++)); do
        local vdevs=() first=$((fe * PER_FE)) last=$(((fe + 1) * PER_FE))
        ((last > n)) && last=$n
        for ((i = first; i < last; i++)); do
            vdevs+=(--vdev "net_virtio_user$i,path=$dir/s$i.sock,queues=1,queue_size=256,mrg_rxbuf=1,in_order=1,packed_vq=0,server=0")
        done
        local prefix=virtq-fp-$$-fe-$be-$n-$fe fd
        PREFIXES+=("$prefix")
        mkfifo "$dir/cmd$fe"
        exec {fd}<> "$dir/cmd$fe"
        FIFOS+=("$fd")
        fe_fds+=("$fd")
        stdbuf -oL "$TESTPMD" --lcores "0@1,1@1" --no-huge -m 1024 --file-prefix="$prefix" --no-pci --no-telemetry \
            "${vdevs[@]}" -- -i --forward-mode=txonly --txpkts=64 --total-num-mbufs=$((8192 + 2048 * (last - first))) \
            --nb-cores=1 < "$dir/cmd$fe" > "$dir/fe$fe.log" 2>&1 &
        PIDS+=("$!")
        wait_for "$dir/fe$fe.log" 'testpmd>' 1 60 || return 1
    done
    local pid private=0 shared=0 p sh
    if [[ $IR == 1 ]]; then
        for fd in "${fe_fds[@]}"; do printf 'start\n' >&"$fd"; done
        sleep "$WARM"
        for pid in "${be_pids[@]}"; do callgrind_control -z "$pid" > /dev/null 2>&1 || return 1; done
        for fd in "${fe_fds[@]}"; do printf 'show port stats all\n' >&"$fd"; done
        sleep "$SECS"
        for pid in "${be_pids[@]}"; do callgrind_control -d "$pid" > /dev/null 2>&1 || return 1; done
    else
        for fd in "${fe_fds[@]}"; do printf 'start\nshow port stats all\n' >&"$fd"; done
        sleep "$SECS"
        for pid in "${be_pids[@]}"; do
            read -r p sh < <(mem "$pid")
            private=$((private + p)) shared=$((shared + sh))
        done
    fi
    for fd in "${fe_fds[@]}"; do printf 'show port stats all\n' >&"$fd"; done
    for ((fe = 0; fe < fes; fe++)); do
        local ports=$((n - fe * PER_FE))
        ((ports > PER_FE)) && ports=$PER_FE
        wait_for "$dir/fe$fe.log" 'NIC statistics for port' $((2 * ports)) 20 || return 1
    done
    for fd in "${fe_fds[@]}"; do printf 'stop\nquit\n' >&"$fd"; done
    if [[ $IR == 1 ]]; then
        # Ir of every back-end process over the frames every port sent between the two shows.
        local ir frames
        ir=$(awk '/^totals:/ { s += $2 } END { printf "%.0f", s }' "$dir"/cg.*.out.1)
        frames=$(awk '/NIC statistics for port/ { p = FILENAME "/" $(NF - 1) }
            /TX-packets:.*TX-errors:/ { if (!(p in a)) a[p] = $2; b[p] = $2 } END { for (p in a) s += b[p] - a[p]; printf "%.0f", s }' \
            "$dir"/fe*.log)
        ((ir > 0 && frames > 0)) || return 1
        RESULT="- - $(awk -v i="$ir" -v f="$frames" 'BEGIN { printf "%.1f", i / f }') ${#be_pids[@]}"
        return 0
    fi
    # Tx-pps of the second `show port stats all` of each port: the last per port in the logs.
    local pps
    pps=$(awk '/NIC statistics for port/ { p = FILENAME "/" $(NF - 1) } /Tx-pps:/ { v[p] = $2 }
        END { for (p in v) s += v[p]; printf "%.2f", s / 1e6 }' "$dir"/fe*.log)
    RESULT="$private $shared $pps ${#be_pids[@]}"
}

if [[ $IR == 1 ]]; then
    echo "| back-end | devices | back-end Ir per guest-TX frame |"
    echo "|---|---:|---:|"
else
    echo "| back-end | devices | private MiB | shared MiB (guest memory mapped, libraries) | aggregate guest-TX Mpps |"
    echo "|---|---:|---:|---:|---:|"
fi
for n in $DEVICES; do
    for be in virtq dpdk; do
        RESULT=""
        if measure "$be" "$n" && [[ -n $RESULT ]]; then
            read -r private shared pps procs <<< "$RESULT"
            label=virtq-net
            [[ $be == dpdk ]] && label="DPDK testpmd net_vhost"
            ((procs > 1)) && label="$label ($procs processes)"
            if [[ $IR == 1 ]]; then
                echo "| $label | $n | $pps |"
            else
                awk -v l="$label" -v n="$n" -v a="$private" -v s="$shared" -v p="$pps" \
                    'BEGIN { printf "| %s | %d | %.1f | %.1f | %s |\n", l, n, a / 1024, s / 1024, p }'
            fi
        else
            echo "| $be | $n | failed | | |"
        fi
        # End this measurement's processes before the next one.
        for pid in "${PIDS[@]}"; do stop_pid "$pid" INT; done
        PIDS=()
        for fd in "${FIFOS[@]}"; do exec {fd}>&- || true; done
        FIFOS=()
    done
done
