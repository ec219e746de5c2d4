#!/usr/bin/env bash
# Real guests against virtq-net: Linux's virtio-net driver in QEMU 7.2 (TCG) over vhost-user;
# and against virtq-blk: Linux's virtio-blk driver (case blk, see case_blk).
#
#   ci/guest/run-matrix.sh                 the whole matrix
#   GUEST_CASES="tap iperf3" ...           only these cases (names as printed)
#   GUEST_SUMMARY=FILE ...                 also write a markdown table to FILE (relative: to the repo root)
#   GUEST_DIR=DIR                          guest kernel + initramfs cache (default target/guest)
#   GUEST_LOGDIR=DIR                       where every case's logs are copied (default GUEST_DIR/logs)
#   CASE_TIMEOUT=SECS                      hard limit per case (default 150; iperf3-vs-dpdk: at
#                                          least 300)
#   SKIP_INSTALL=1                         do not apt-get anything
#
# iperf3-vs-dpdk measures iperf3 TCP between the same two guests through virtq-net (switch) and
# through DPDK testpmd (io forwarding between two net_vhost ports), alternating A B A B, with the
# backend pinned to CPU 0 and the guests to CPU 1 in both. It needs dpdk-testpmd (dpdk-dev is
# installed if that case is selected). Its ratio is a report, not a gate.
#
# Live migration (case_migrate documents them): migrate-dpdk migrates a guest between two QEMUs
# with DPDK testpmd's net_vhost as the back-end (the reference; needs dpdk-testpmd like
# iperf3-vs-dpdk), migrate, migrate-mrg-off-rarp (and guest_announce=off: virtq-net announces m on
# QEMU's SEND_RARP) and migrate-client the same with virtq-net (QEMU as
# client, mrg_rxbuf off, QEMU as server). Each compares both QEMUs' guest RAM page by page after
# the migration: a dirty log that misses a page the back-end wrote fails the case.
# Knobs: MIG_MIBS (migration bandwidth, MiB/s, default 16), MIG_SECS (stream length, default 20),
# MIG_MAX_LOST (ping replies that may be lost, default 5). QMP through ci/guest/qmp.py (python3).
#
# Prints `case NAME: PASS|FAIL|SKIP (details)` per case and `guests: N passed, M failed, K
# skipped` last (a SKIP counts as neither); exits non-zero if any case failed. Needs root (network namespaces, TAP devices; re-runs itself under
# sudo). Test traffic stays on unix sockets and in network namespaces this script creates; the
# host side of the TAP cases lives only in such a namespace. Every process started here is
# tracked by PID and ended on exit, and every namespace is deleted.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 2
GUEST_DIR=${GUEST_DIR:-$ROOT/target/guest}
GUEST_LOGDIR=${GUEST_LOGDIR:-$GUEST_DIR/logs}
CASE_TIMEOUT=${CASE_TIMEOUT:-150}
T_START=$(date +%s)

say() { printf '== guests: %s\n' "$*" >&2; }
case_selected() { [[ -z ${GUEST_CASES:-} || " $GUEST_CASES " == *" $1 "* ]]; }
die() {
    say "error: $*"
    exit 2
}

# --- set-up: packages, virtq-net, guest image --------------------------------------------------
if [[ -z ${VIRTQ_NET:-} ]]; then
    say "building virtq-net (release)"
    cargo build --release -p virtq-net --locked >&2 || die "cargo build failed"
    VIRTQ_NET=${CARGO_TARGET_DIR:-$ROOT/target}/release/virtq-net
fi
[[ -x $VIRTQ_NET ]] || die "no virtq-net binary at $VIRTQ_NET"
if { case_selected blk || case_selected blk-kill-restart || case_selected blk-ro; } && [[ -z ${VIRTQ_BLK:-} ]]; then
    say "building virtq-blk (release)"
    cargo build --release -p virtq-blk --locked >&2 || die "cargo build failed"
    VIRTQ_BLK=${CARGO_TARGET_DIR:-$ROOT/target}/release/virtq-blk
fi
if [[ $(id -u) -ne 0 ]]; then
    say "re-running as root (network namespaces and TAP devices)"
    exec sudo --preserve-env=GUEST_CASES,GUEST_SUMMARY,GUEST_DIR,GUEST_LOGDIR,CASE_TIMEOUT,SKIP_INSTALL,MIG_MIBS,MIG_SECS,MIG_MAX_LOST \
        VIRTQ_NET="$VIRTQ_NET" VIRTQ_BLK="${VIRTQ_BLK:-}" bash "$0" "$@"
fi

if [[ -z ${SKIP_INSTALL:-} ]]; then
    need=()
    command -v qemu-system-x86_64 > /dev/null || need+=(qemu-system-x86)
    command -v ip > /dev/null || need+=(iproute2)
    command -v iperf3 > /dev/null || need+=(iperf3)
    if [[ ! -x /bin/busybox ]] || ldd /bin/busybox > /dev/null 2>&1; then need+=(busybox-static); fi
    command -v python3 > /dev/null || need+=(python3)
    command -v e2fsck > /dev/null || need+=(e2fsprogs)
    command -v ethtool > /dev/null || need+=(ethtool)
    if { case_selected iperf3-vs-dpdk || case_selected migrate-dpdk; } && ! command -v dpdk-testpmd > /dev/null; then
        need+=(dpdk-dev)
    fi
    if ((${#need[@]})); then
        say "installing ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" > /dev/null \
            || die "apt-get install failed"
    fi
fi
bash "$ROOT/ci/guest/build-initramfs.sh" "$GUEST_DIR" || die "guest image build failed"
KERNEL=$GUEST_DIR/vmlinux
INITRD=$GUEST_DIR/initramfs.cpio
BUSYBOX=/bin/busybox

# --- process, namespace and temp-dir bookkeeping ---------------------------------------------
TMP=$(mktemp -d /tmp/virtq-guests.XXXXXX)
TAG=$$
ALL_PIDS=()
CASE_PIDS=()
NETNS=()
DPDK_PREFIXES=() # --file-prefix of every testpmd started here: /var/run/dpdk/PREFIX goes on exit
CASE_LIMIT=$CASE_TIMEOUT
CASE_LOGS=()
SEQ=0

kill_pids() { # PID... : SIGTERM, up to 3 s grace, then SIGKILL; reaps them.
    local p alive
    for p in "$@"; do kill -0 "$p" 2> /dev/null && kill -TERM "$p" 2> /dev/null; done
    for _ in $(seq 30); do
        alive=0
        for p in "$@"; do kill -0 "$p" 2> /dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for p in "$@"; do kill -0 "$p" 2> /dev/null && kill -KILL "$p" 2> /dev/null; done
    for p in "$@"; do wait "$p" 2> /dev/null; done
    return 0
}

del_netns() {
    local ns
    for ns in "${NETNS[@]}"; do ip netns del "$ns" 2> /dev/null; done
    NETNS=()
}

cleanup() {
    trap - EXIT INT TERM
    ((${#ALL_PIDS[@]})) && kill_pids "${ALL_PIDS[@]}"
    del_netns
    local p
    for p in "${DPDK_PREFIXES[@]}"; do rm -rf "/var/run/dpdk/$p"; done
    if [[ -d $TMP ]]; then
        mkdir -p "$GUEST_LOGDIR"
        # Only the previous run's logs go (the directory may be shared).
        find "$GUEST_LOGDIR" -maxdepth 1 -type f \( -name '*.serial' -o -name '*.qemu' -o -name '*.log' \) -delete
        find "$TMP" -maxdepth 1 -type f -exec cp {} "$GUEST_LOGDIR"/ \;
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

track() { # PID
    ALL_PIDS+=("$1")
    CASE_PIDS+=("$1")
}

mk_netns() { # -> NS (global): a fresh namespace with lo up
    SEQ=$((SEQ + 1))
    NS="vq$TAG-$SEQ"
    ip netns add "$NS" || return 1
    NETNS+=("$NS")
    ip -n "$NS" link set lo up
}

tap_name() { # -> TAP (global), <= 15 bytes
    SEQ=$((SEQ + 1))
    TAP="vqt$TAG$SEQ"
    TAP=${TAP:0:15}
}

left() { echo $((DEADLINE - $(date +%s))); }

# virtq-net, optionally inside a namespace. Sets VQ_PID and VQ_LOG.
vq_start() { # LOG NS|- ARGS...
    VQ_LOG=$1
    local ns=$2
    shift 2
    if [[ $ns == - ]]; then
        "$VIRTQ_NET" "$@" > "$VQ_LOG" 2>&1 &
    else
        ip netns exec "$ns" "$VIRTQ_NET" "$@" > "$VQ_LOG" 2>&1 &
    fi
    VQ_PID=$!
    track "$VQ_PID"
}

# SIGTERM to virtq-net; 0 if it exited 0 within 10 s (else STOP_ERR says why). Its statistics
# are in VQ_LOG. Not in a subshell: it reaps the process.
vq_stop() {
    local rc
    STOP_ERR=""
    kill -TERM "$VQ_PID" 2> /dev/null
    for _ in $(seq 100); do
        kill -0 "$VQ_PID" 2> /dev/null || break
        sleep 0.1
    done
    if kill -0 "$VQ_PID" 2> /dev/null; then
        kill -KILL "$VQ_PID"
        wait "$VQ_PID" 2> /dev/null
        STOP_ERR="virtq-net did not exit on SIGTERM"
        return 1
    fi
    wait "$VQ_PID"
    rc=$?
    ((rc == 0)) || { STOP_ERR="virtq-net exited $rc"; return 1; }
}

wait_for() { # DESCRIPTION COMMAND...: polls every 0.1 s until the case deadline
    local what=$1
    shift
    until "$@" > /dev/null 2>&1; do
        if (($(left) <= 0)); then
            echo "timeout waiting for $what"
            return 1
        fi
        sleep 0.1
    done
}

# A guest. Options as key=value: name sock mac ip cmd [role=client|server] [mrg=on|off]
# [queues=1] [smp=1] [cpus=LIST (taskset)] [timeout=SECS (of cmd; default case limit - 10)].
# For the migration cases also: [mem=256M (guest RAM = its memfd)] [kargs=EXTRA KERNEL ARGS]
# [qmp=PATH (QMP unix socket)] [incoming=URI (a migration destination)] [paused=1 (-S)]
# [serial=FILE (appended to, not truncated: a source and its destination share one log)]
# [announce=off (no VIRTIO_NET_F_GUEST_ANNOUNCE: after a migration QEMU asks the back-end to
# announce the guest, SEND_RARP)] [devopts=,PROP=VAL... (appended to -device virtio-net-pci)].
# Sets GPID[name] and GLOG[name].
declare -A GPID GLOG
guest() {
    local name sock mac ip cmd role=client mrg=on queues=1 smp=1 cpus="" timeout=$((CASE_LIMIT - 10))
    local mem=256M kargs="" qmp="" incoming="" paused="" serial="" announce=on devopts=""
    local "$@"
    local pin=() extra=()
    [[ -n $cpus ]] && pin=(taskset -c "$cpus")
    local log=$TMP/$CASE-$name.serial chardev="socket,id=c0,path=$sock" netdev="vhost-user,id=n0,chardev=c0"
    local device="virtio-net-pci,netdev=n0,mac=$mac,mrg_rxbuf=$mrg,vectors=0,romfile="
    [[ $role == server ]] && chardev+=",server=on,wait=off"
    [[ $announce == off ]] && device+=",guest_announce=off"
    device+=$devopts
    if ((queues > 1)); then
        netdev+=",queues=$queues"
        device+=",mq=on"
    fi
    if [[ -n $serial ]]; then
        log=$serial
        extra+=(-chardev "file,id=ser0,path=$log,append=on" -serial chardev:ser0)
    else
        extra+=(-serial "file:$log")
    fi
    [[ -n $qmp ]] && extra+=(-qmp "unix:$qmp,server=on,wait=off")
    [[ -n $incoming ]] && extra+=(-incoming "$incoming")
    [[ -n $paused ]] && extra+=(-S)
    "${pin[@]}" qemu-system-x86_64 -accel tcg -cpu max -machine q35,memory-backend=mem -m "$mem" -smp "$smp" \
        -object "memory-backend-memfd,id=mem,size=$mem,share=on" \
        -display none -nodefaults -no-reboot "${extra[@]}" \
        -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 loglevel=4 ${kargs:+$kargs }virtq.ip=$ip/24 virtq.timeout=$timeout virtq.cmd=\"$cmd\"" \
        -chardev "$chardev" -netdev "$netdev" -device "$device" \
        > "$TMP/$CASE-$name.qemu" 2>&1 &
    GPID[$name]=$!
    GLOG[$name]=$log
    track "${GPID[$name]}"
}

# Waits for guests to power off (QEMU exits), until the case deadline; kills the stragglers.
wait_guests() { # NAME...
    local n pid alive
    while :; do
        alive=0
        for n in "$@"; do kill -0 "${GPID[$n]}" 2> /dev/null && alive=1; done
        ((alive)) || break
        if (($(left) <= 0)); then
            for n in "$@"; do kill -0 "${GPID[$n]}" 2> /dev/null && echo "guest $n: timeout"; done
            for n in "$@"; do kill_pids "${GPID[$n]}"; done
            return 1
        fi
        sleep 0.2
    done
    for n in "$@"; do
        pid=${GPID[$n]}
        wait "$pid" 2> /dev/null
    done
}

# The guest's verdict line, without the CR of the serial console.
verdict() { grep -a 'RESULT:' "${GLOG[$1]}" 2> /dev/null | tail -1 | tr -d '\r' | sed 's/.*RESULT: //'; }
passed() { [[ $(verdict "$1") == PASS ]]; }
vline() { grep -a "VIRTQ: $2" "${GLOG[$1]}" 2> /dev/null | tail -1 | tr -d '\r'; }

check_guests() { # NAME...: every guest printed RESULT: PASS
    local n bad=0
    for n in "$@"; do
        if ! passed "$n"; then
            echo "guest $n: $(verdict "$n" || true)${GLOG[$n]:+ (log $(basename "${GLOG[$n]}"))}"
            bad=1
        fi
    done
    return $bad
}

# Ping from inside a namespace (busybox ping: the host may have no iputils). Prints "got/count".
ns_ping() { # NS IP COUNT
    wait_for "$2 from $1" ip netns exec "$1" "$BUSYBOX" ping -c 1 -W 1 "$2" || return 1
    local out got
    out=$(ip netns exec "$1" "$BUSYBOX" ping -c "$3" -i 0.2 -W 3 "$2" 2>&1)
    got=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
    echo "${got:-0}/$3"
    [[ ${got:-0} -eq $3 ]]
}

# The receiver's rate of GUEST's last `vt-iperf` run with ARGS ('' forward, -R reverse), e.g.
# "456 Mbits/sec"; empty if there is none.
iperf_rate() { # GUEST ARGS
    grep -a "VIRTQ: iperf3 $2 .*receiver" "${GLOG[$1]}" | tail -1 | tr -d '\r' | grep -o '[0-9.]* Mbits/sec'
}

# "stats PORT qN(dir): packets P bytes B drops D ..." from the virtq-net log -> P (or D).
qstat() { # PORT-PATH QUEUE [packets|drops]
    grep -a "stats $1 q$2(" "$VQ_LOG" | sed -n "s/.* ${3:-packets} \([0-9]*\).*/\1/p" | tail -1
}

# Has the log at least N+1 statistics lines for PORT's queue Q?
stats_after() { (($(grep -ac "stats $1 q$2(" "$VQ_LOG") > $3)); }

# Asks virtq-net for its statistics now (SIGUSR1) and waits until it has printed PORT's last
# queue Q; qstat then reads them.
vq_stats_now() { # PORT-PATH Q
    local n
    n=$(grep -ac "stats $1 q$2(" "$VQ_LOG")
    kill -USR1 "$VQ_PID"
    wait_for "statistics" stats_after "$1" "$2" "$n"
}

# --- the cases -----------------------------------------------------------------------------
# Each sets DETAIL and returns 0 for PASS. The runner kills what a case left running.

# One guest pings a TAP inside a namespace (virtq-net runs there, port back-end tap:NAME); the
# namespace pings the guest back.
case_tap() {
    local mrg=$1 sock=$TMP/$CASE.sock err
    mk_netns || { DETAIL="netns"; return 1; }
    tap_name
    vq_start "$TMP/$CASE-virtq-net.log" "$NS" --port "path=$sock,backend=tap:$TAP"
    wait_for "socket" test -S "$sock" || { DETAIL="virtq-net did not listen"; return 1; }
    wait_for "TAP" ip -n "$NS" link show "$TAP" || { DETAIL="no TAP"; return 1; }
    ip -n "$NS" addr add 10.0.0.1/24 dev "$TAP" && ip -n "$NS" link set "$TAP" up || { DETAIL="TAP set-up"; return 1; }
    guest name=g1 sock="$sock" mac=52:54:00:00:01:02 ip=10.0.0.2 mrg="$mrg" \
        cmd="vt-ping 10.0.0.1 10 && vt-wait-echos 10 90"
    local back
    back=$(ns_ping "$NS" 10.0.0.2 10)
    local back_ok=$?
    wait_guests g1
    err=$(check_guests g1)
    local guest_ok=$?
    vq_stop
    local stop_ok=$? stop=$STOP_ERR
    DETAIL="guest->tap $(vline g1 'ping' | sed -n 's/.*: \([0-9]*\/[0-9]*\) replies.*/\1/p'), ns->guest $back, $(vline g1 eth0 | grep -o 'mrg_rxbuf=[01]'), tap rx/tx $(qstat "$sock" 0)/$(qstat "$sock" 1) pkts"
    [[ $mrg == off ]] && ! vline g1 eth0 | grep -q 'mrg_rxbuf=0' && { DETAIL+="; MRG_RXBUF negotiated although off"; return 1; }
    ((back_ok == 0 && guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $stop"; return 1; }
}

# A guest with two queue pairs (-smp 2, mq=on) on a tap port over a multiqueue TAP
# (IFF_MULTI_QUEUE, one TAP queue per pair) in a namespace. The guest pings the TAP from each
# vCPU (XPS maps CPU n to TX queue n; the TAP answers on the queue a flow last came in on, so
# the replies come back on the same pair) and the namespace pings the guest. Every queue of both
# pairs must carry packets (virtq-net's per-queue statistics at exit).
case_tap_queues2() {
    local sock=$TMP/$CASE.sock err q per="" ok=1
    mk_netns || { DETAIL="netns"; return 1; }
    tap_name
    vq_start "$TMP/$CASE-virtq-net.log" "$NS" --port "path=$sock,backend=tap:$TAP,queues=2"
    wait_for "socket" test -S "$sock" || { DETAIL="virtq-net did not listen"; return 1; }
    wait_for "TAP" ip -n "$NS" link show "$TAP" || { DETAIL="no TAP"; return 1; }
    ip -n "$NS" addr add 10.0.0.1/24 dev "$TAP" && ip -n "$NS" link set "$TAP" up || { DETAIL="TAP set-up"; return 1; }
    guest name=g1 sock="$sock" mac=52:54:00:00:07:02 ip=10.0.0.2 queues=2 smp=2 \
        cmd="vt-ping 10.0.0.1 5 && taskset -c 1 vt-ping 10.0.0.1 5 && vt-wait-echos 10 90"
    local back
    back=$(ns_ping "$NS" 10.0.0.2 10)
    local back_ok=$?
    wait_guests g1
    err=$(check_guests g1)
    local guest_ok=$?
    vq_stop
    local stop_ok=$? stop=$STOP_ERR
    local pings
    pings=$(grep -a 'VIRTQ: ping' "${GLOG[g1]}" | tr -d '\r' | sed -n 's/.*: \([0-9]*\/[0-9]*\) replies.*/\1/p' | paste -sd' ')
    for q in 0 1 2 3; do
        per+=" q$q=$(qstat "$sock" $q)"
        [[ $(qstat "$sock" $q) -gt 0 ]] 2> /dev/null || { ok=0; err+=" no packets on q$q"; }
    done
    vline g1 eth0 | grep -q 'mq=1' || { ok=0; err+=" MQ not negotiated"; }
    DETAIL="guest->tap (cpu 0, cpu 1) ${pings:-none}, ns->guest $back, $(vline g1 eth0 | grep -o 'mq=[01]'), packets per queue:$per"
    ((ok && back_ok == 0 && guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $stop"; return 1; }
}

# Offloads on a tap port: the guest must negotiate CSUM, GUEST_CSUM, HOST_TSO4/6 and
# GUEST_TSO4/6 (virtq-net logs `features 0x...` and the TAP's `TAP offloads ...`), and iperf3
# TCP to a server in the namespace and back (-R) must work. TSO frames must cross the TAP both
# ways: the average frame on the guest's TX queue (guest -> TAP) and on its RX queue (TAP ->
# guest) is larger than the largest plain Ethernet frame (1514 bytes), which only GSO frames
# can make. No frame may be refused on RX (errors 0). With mrg=off the guest posts "big
# packet" buffers for 64 KiB frames instead of merged ones.
case_tap_offload() {
    local mrg=$1 sock=$TMP/$CASE.sock err ok=1
    mk_netns || { DETAIL="netns"; return 1; }
    tap_name
    vq_start "$TMP/$CASE-virtq-net.log" "$NS" --port "path=$sock,backend=tap:$TAP"
    wait_for "socket" test -S "$sock" || { DETAIL="virtq-net did not listen"; return 1; }
    wait_for "TAP" ip -n "$NS" link show "$TAP" || { DETAIL="no TAP"; return 1; }
    ip -n "$NS" addr add 10.0.0.1/24 dev "$TAP" && ip -n "$NS" link set "$TAP" up || { DETAIL="TAP set-up"; return 1; }
    ip netns exec "$NS" iperf3 -s -p 5201 > "$TMP/$CASE-iperf3-server.log" 2>&1 &
    track $!
    guest name=g1 sock="$sock" mac=52:54:00:00:06:02 ip=10.0.0.2 mrg="$mrg" \
        cmd="vt-ping 10.0.0.1 3 && vt-iperf 10.0.0.1 5 && vt-iperf 10.0.0.1 5 -R"
    wait_guests g1
    err=$(check_guests g1)
    local guest_ok=$?
    vq_stop
    local stop_ok=$? stop=$STOP_ERR
    # The features the guest set, as virtq-net logged them (the last SET_FEATURES).
    local hex names=(0 csum 1 guest_csum 7 guest_tso4 8 guest_tso6 9 guest_ecn 11 host_tso4 12 host_tso6 13 host_ecn)
    local i got="" missing=""
    hex=$(grep -a ': features 0x' "$VQ_LOG" | tail -1 | sed 's/.*: features //')
    if [[ $hex =~ ^0x[0-9a-f]+$ ]]; then
        for ((i = 0; i < ${#names[@]}; i += 2)); do
            if (((hex >> names[i]) & 1)); then
                got+="${got:+,}${names[i + 1]}"
            elif [[ ${names[i + 1]} != *ecn ]]; then
                missing+=" ${names[i + 1]}"
            fi
        done
    else
        missing=" (no features line in the virtq-net log)"
    fi
    [[ -z $missing ]] || { ok=0; err+=" not negotiated:$missing"; }
    local tapoff
    tapoff=$(grep -a 'TAP offloads' "$VQ_LOG" | tail -1 | sed 's/.*TAP offloads //')
    [[ $tapoff == csum,tso4,tso6* ]] || { ok=0; err+=" TAP offloads '${tapoff:-?}'"; }
    local fwd rev
    fwd=$(iperf_rate g1 '')
    rev=$(iperf_rate g1 -R)
    [[ -n $fwd && -n $rev ]] || { ok=0; err+=" no iperf3 result"; }
    # Average frame (bytes without the virtio-net header / packets) per direction.
    local txp txb rxp rxb avg_tx avg_rx
    txp=$(qstat "$sock" 1) txb=$(qstat "$sock" 1 bytes) rxp=$(qstat "$sock" 0) rxb=$(qstat "$sock" 0 bytes)
    avg_tx=$((${txb:-0} / (${txp:-0} > 0 ? txp : 1)))
    avg_rx=$((${rxb:-0} / (${rxp:-0} > 0 ? rxp : 1)))
    ((avg_tx > 1514)) || { ok=0; err+=" no TSO frames from the guest (average $avg_tx bytes)"; }
    ((avg_rx > 1514)) || { ok=0; err+=" no TSO frames to the guest (average $avg_rx bytes)"; }
    local rx_err
    rx_err=$(qstat "$sock" 0 errors)
    [[ ${rx_err:-x} == 0 ]] || { ok=0; err+=" $rx_err RX errors (frames refused or too large)"; }
    DETAIL="negotiated ${got:-none} (guest sees $(offloads g1)), TAP offloads ${tapoff:-?}, $(vline g1 eth0 | grep -o 'mrg_rxbuf=[01]')"
    DETAIL+=", iperf3 guest->ns ${fwd:-none}, ns->guest ${rev:-none}"
    DETAIL+=", average frame guest TX ${avg_tx} B ($txp pkts), RX ${avg_rx} B ($rxp pkts), RX errors ${rx_err:-?}"
    ((ok && guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $stop"; return 1; }
}

# Two guests ping each other through the switch (two --socket-path ports). role=client: QEMU
# connects, virtq-net listens; role=server: QEMU listens (server=on,wait=off), virtq-net --client.
case_switch() {
    local role=$1 mrg=$2 queues=${3:-1} smp=${4:-1}
    local s1=$TMP/$CASE-1.sock s2=$TMP/$CASE-2.sock args=() cmd1 cmd2 err
    ((queues > 1)) && args+=(--queues "$queues")
    if ((queues > 1)); then
        # One round of pings from each vCPU: XPS maps CPU n to TX queue n.
        cmd1="vt-ping 10.0.0.12 5 && taskset -c 1 vt-ping 10.0.0.12 5 && vt-wait-echos 10 90"
        cmd2="vt-ping 10.0.0.11 5 && taskset -c 1 vt-ping 10.0.0.11 5 && vt-wait-echos 10 90"
    else
        cmd1="vt-ping 10.0.0.12 10 && vt-wait-echos 10 90"
        cmd2="vt-ping 10.0.0.11 10 && vt-wait-echos 10 90"
    fi
    if [[ $role == client ]]; then
        vq_start "$TMP/$CASE-virtq-net.log" - "${args[@]}" --socket-path "$s1" --socket-path "$s2"
        wait_for "sockets" test -S "$s2" || { DETAIL="virtq-net did not listen"; return 1; }
    fi
    guest name=g1 sock="$s1" role="$role" mac=52:54:00:00:02:11 ip=10.0.0.11 mrg="$mrg" queues="$queues" smp="$smp" cmd="$cmd1"
    guest name=g2 sock="$s2" role="$role" mac=52:54:00:00:02:12 ip=10.0.0.12 mrg="$mrg" queues="$queues" smp="$smp" cmd="$cmd2"
    if [[ $role == server ]]; then
        wait_for "QEMU sockets" test -S "$s2" || { DETAIL="QEMU did not listen"; return 1; }
        vq_start "$TMP/$CASE-virtq-net.log" - --client "${args[@]}" --socket-path "$s1" --socket-path "$s2"
    fi
    wait_guests g1 g2
    err=$(check_guests g1 g2)
    local guest_ok=$?
    vq_stop
    local stop_ok=$? stop=$STOP_ERR
    local p1 p2
    p1=$(vline g1 'ping' | sed -n 's/.*: \([0-9]*\/[0-9]*\) replies.*/\1/p')
    p2=$(vline g2 'ping' | sed -n 's/.*: \([0-9]*\/[0-9]*\) replies.*/\1/p')
    DETAIL="g1->g2 $p1, g2->g1 $p2, $(vline g1 eth0 | grep -o 'mrg_rxbuf=[01]')"
    local ok=$((guest_ok == 0 && stop_ok == 0))
    if [[ $mrg == off ]] && ! vline g1 eth0 | grep -q 'mrg_rxbuf=0'; then
        DETAIL+="; MRG_RXBUF negotiated although off"
        ok=0
    fi
    if ((queues > 1)); then
        DETAIL+=", $(vline g1 eth0 | grep -o 'mq=[01]')"
        local s q per=""
        for s in "$s1" "$s2"; do
            per+=" $(basename "$s" .sock):"
            for q in 0 1 2 3; do per+=" q$q=$(qstat "$s" $q)"; done
            for q in 2 3; do
                [[ $(qstat "$s" $q) -gt 0 ]] 2> /dev/null || { ok=0; err+=" no packets on $(basename "$s") q$q"; }
            done
        done
        vline g1 eth0 | grep -q 'mq=1' || { ok=0; err+=" MQ not negotiated"; }
        DETAIL+=", packets per queue:$per"
    fi
    ((ok)) || { DETAIL+="; $err $stop"; return 1; }
}

# Two guests with two queue pairs (-smp 2, mq=on) on the switch; g1 uses only one
# (vt-channels 1: `ethtool -L eth0 combined 1`, after which QEMU disables g1's pair 1 on the
# back-end), g2 both. g1 pings g2, then g2 pings g1 from each vCPU: XPS sends g2's pings from
# CPU 1 on its pair 1, and the switch used to deliver them on g1's pair 1 too, which g1 no
# longer reads. Then iperf3 with 4 streams both ways. Every ping must be answered, g2's pair 1
# must have carried packets, g1's disabled receive queue must have been offered nothing once
# g1 was at one pair (no new drops; before g1 posts its buffers at boot, frames flooded to it
# may find none), and virtq-net must have logged that g1 receives on pair 0 only.
case_switch_mq_combined1() {
    local s1=$TMP/$CASE-1.sock s2=$TMP/$CASE-2.sock err ok=1
    vq_start "$TMP/$CASE-virtq-net.log" - --queues 2 --socket-path "$s1" --socket-path "$s2"
    wait_for "sockets" test -S "$s2" || { DETAIL="virtq-net did not listen"; return 1; }
    guest name=g1 sock="$s1" mac=52:54:00:00:08:11 ip=10.0.0.11 queues=2 smp=2 \
        cmd="vt-channels 1 && vt-ping 10.0.0.12 5 && taskset -c 1 vt-ping 10.0.0.12 5 && vt-wait-echos 10 60 && iperf3 -s -1 > /dev/null && iperf3 -s -1 > /dev/null"
    guest name=g2 sock="$s2" mac=52:54:00:00:08:12 ip=10.0.0.12 queues=2 smp=2 \
        cmd="vt-wait-echos 10 60 && vt-ping 10.0.0.11 5 && taskset -c 1 vt-ping 10.0.0.11 5 && vt-iperf 10.0.0.11 3 -P 4 && vt-iperf 10.0.0.11 3 -P 4 -R"
    # The start-up logs "pair(s) 0" too (pair 0 starts first): the last line must say it.
    g1_one_pair() { grep -a "$s1: guest receives on" "$VQ_LOG" | tail -1 | grep -q 'pair(s) 0$'; }
    local d0=""
    if wait_for "g1 at one pair" grep -aq 'VIRTQ: channels combined 1' "${GLOG[g1]}" \
        && wait_for "g1 pair 1 disabled" g1_one_pair \
        && vq_stats_now "$s1" 3; then
        d0=$(qstat "$s1" 2 drops)
    fi
    wait_guests g1 g2
    err=$(check_guests g1 g2)
    local guest_ok=$?
    vq_stop
    local stop_ok=$? stop=$STOP_ERR
    local p1 p2 fwd rev ch
    p1=$(grep -a 'VIRTQ: ping' "${GLOG[g1]}" | tr -d '\r' | sed -n 's/.*: \([0-9]*\/[0-9]*\) replies.*/\1/p' | paste -sd' ')
    p2=$(grep -a 'VIRTQ: ping' "${GLOG[g2]}" | tr -d '\r' | sed -n 's/.*: \([0-9]*\/[0-9]*\) replies.*/\1/p' | paste -sd' ')
    fwd=$(grep -a 'VIRTQ: iperf3 -P 4 \[SUM\].*receiver' "${GLOG[g2]}" | tail -1 | tr -d '\r' | grep -o '[0-9.]* Mbits/sec')
    rev=$(grep -a 'VIRTQ: iperf3 -P 4 -R \[SUM\].*receiver' "${GLOG[g2]}" | tail -1 | tr -d '\r' | grep -o '[0-9.]* Mbits/sec')
    ch=$(vline g1 channels | sed 's/.*VIRTQ: //')
    [[ $ch == "channels combined 1 of 2" ]] || { ok=0; err+=" g1 not at 1 of 2 pairs (${ch:-no channels line})"; }
    [[ $(qstat "$s2" 3) -gt 0 ]] 2> /dev/null || { ok=0; err+=" g2 sent nothing on pair 1"; }
    [[ -n $d0 && $(qstat "$s1" 2 drops) == "$d0" ]] || { ok=0; err+=" g1's disabled q2 dropped ${d0:-?} -> $(qstat "$s1" 2 drops)"; }
    grep -aq "$s1: guest receives on pair(s) 0\$" "$VQ_LOG" || { ok=0; err+=" no 'receives on pair(s) 0' for g1"; }
    [[ -n $fwd && -n $rev ]] || { ok=0; err+=" no iperf3 result"; }
    DETAIL="g1 ${ch:-?}; pings (cpu 0, cpu 1) g1->g2 ${p1:-none}, g2->g1 ${p2:-none}; iperf3 -P 4 g2->g1 ${fwd:-none}, g1->g2 ${rev:-none}"
    DETAIL+="; g2 TX q1/q3 $(qstat "$s2" 1)/$(qstat "$s2" 3) pkts, g1 RX q0 $(qstat "$s1" 0) pkts, q2 $(qstat "$s1" 2) pkts, drops ${d0:-?} at one pair -> $(qstat "$s1" 2 drops) at exit"
    ((ok && guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $stop"; return 1; }
}

# A guest with two queue pairs on a multiqueue tap port uses only one (vt-channels 1): virtq-net
# must detach TAP queue 1, so the kernel steers every flow to queue 0. The namespace then pings
# the guest from 8 addresses at once (8 flows: the TAP spreads flows over its attached queues by
# hash, and a flow on queue 1 used to go to the guest's disabled pair 1) and runs iperf3 with 4
# streams to it. Every ping must be answered and, while the guest uses one pair, nothing
# dropped on its disabled receive queue (before the guest posts its buffers at boot, the
# namespace's IPv6 frames may find none); when it goes back to 2 pairs, queue 1 must be
# attached again.
case_tap_mq_combined1() {
    local sock=$TMP/$CASE.sock err ok=1 i n pids=() got lost="" total=0
    mk_netns || { DETAIL="netns"; return 1; }
    tap_name
    vq_start "$TMP/$CASE-virtq-net.log" "$NS" --port "path=$sock,backend=tap:$TAP,queues=2"
    wait_for "socket" test -S "$sock" || { DETAIL="virtq-net did not listen"; return 1; }
    wait_for "TAP" ip -n "$NS" link show "$TAP" || { DETAIL="no TAP"; return 1; }
    ip -n "$NS" addr add 10.0.0.1/24 dev "$TAP" || { DETAIL="TAP set-up"; return 1; }
    for i in $(seq 21 28); do ip -n "$NS" addr add "10.0.0.$i/24" dev "$TAP" || { DETAIL="TAP set-up"; return 1; }; done
    ip -n "$NS" link set "$TAP" up || { DETAIL="TAP set-up"; return 1; }
    guest name=g1 sock="$sock" mac=52:54:00:00:09:02 ip=10.0.0.2 queues=2 smp=2 \
        cmd="vt-channels 1 && vt-wait-echos 40 60 && iperf3 -s -1 > /dev/null && sleep 3 && vt-channels 2"
    wait_for "the guest at one pair" grep -aq 'VIRTQ: channels combined 1' "${GLOG[g1]}" || { DETAIL="guest did not reach combined 1"; return 1; }
    # Rings start one by one, so queue 1 may have been detached and attached at start-up.
    q1_detached() { grep -a 'TAP queue 1 ' "$VQ_LOG" | tail -1 | grep -q detached; }
    wait_for "TAP queue 1 detached" q1_detached || { DETAIL="TAP queue 1 not detached"; return 1; }
    vq_stats_now "$sock" 3 || { DETAIL="no statistics on SIGUSR1"; return 1; }
    local d0
    d0=$(qstat "$sock" 2 drops)
    wait_for "the guest" ip netns exec "$NS" "$BUSYBOX" ping -c 1 -W 1 10.0.0.2 || { DETAIL="guest does not answer"; return 1; }
    for i in $(seq 21 28); do
        ip netns exec "$NS" "$BUSYBOX" ping -c 10 -i 0.2 -W 3 -I "10.0.0.$i" 10.0.0.2 > "$TMP/$CASE-ping-$i.log" 2>&1 &
        pids+=($!)
        track $!
    done
    for i in "${pids[@]}"; do wait "$i"; done
    for i in $(seq 21 28); do
        n=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' "$TMP/$CASE-ping-$i.log")
        total=$((total + ${n:-0}))
        [[ ${n:-0} -eq 10 ]] || lost+=" 10.0.0.$i:${n:-0}/10"
    done
    [[ -z $lost ]] || { ok=0; err+=" pings lost:$lost"; }
    local fwd="" tries
    for tries in $(seq 20); do
        fwd=$(ip netns exec "$NS" iperf3 -c 10.0.0.2 -P 4 -t 3 -f m 2>&1 | grep -a 'SUM.*receiver' | grep -o '[0-9.]* Mbits/sec') && break
        (($(left) > 0)) || break
        sleep 1
    done
    [[ -n $fwd ]] || { ok=0; err+=" no iperf3 result"; }
    # The counters while the guest still uses one pair (it goes back to two 3 s after iperf3;
    # then, and while QEMU stops the rings at poweroff, q2 may drop frames for want of buffers).
    vq_stats_now "$sock" 3 || { ok=0; err+=" no statistics on SIGUSR1"; }
    local d1
    d1=$(qstat "$sock" 2 drops)
    [[ -n $d0 && $d1 == "$d0" ]] || { ok=0; err+=" disabled q2 dropped ${d0:-?} -> ${d1:-?} at one pair"; }
    wait_guests g1
    err+=$(check_guests g1)
    local guest_ok=$?
    vq_stop
    local stop_ok=$? stop=$STOP_ERR
    local ch
    ch=$(grep -a 'VIRTQ: channels' "${GLOG[g1]}" | tr -d '\r' | sed 's/.*combined //' | paste -sd' ')
    grep -aq 'TAP queue 1 attached' "$VQ_LOG" || { ok=0; err+=" TAP queue 1 not attached again at 2 pairs"; }
    DETAIL="guest pairs ${ch:-?}; ns->guest pings from 8 addresses $total/80; iperf3 -P 4 ns->guest ${fwd:-none}"
    DETAIL+="; TAP queue 1 $(grep -ac 'TAP queue 1 detached' "$VQ_LOG")x detached, $(grep -ac 'TAP queue 1 attached' "$VQ_LOG")x attached"
    DETAIL+="; RX q2 drops at one pair ${d0:-?} -> ${d1:-?}; at exit RX q0 $(qstat "$sock" 0) pkts, q2 $(qstat "$sock" 2) pkts $(qstat "$sock" 2 drops) drops"
    ((ok && guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $stop"; return 1; }
}

# The guest powers off; then a guest is SIGKILLed mid-iperf3; then a NEW guest on the same
# socket must work. virtq-net: switch + a TAP in a namespace (the peer that stays).
case_kill() {
    local role=$1 sock=$TMP/$CASE.sock err rc
    mk_netns || { DETAIL="netns"; return 1; }
    tap_name
    local args=(--socket-path "$sock" --tap "$TAP")
    [[ $role == server ]] && args=(--client "${args[@]}")
    vq_start "$TMP/$CASE-virtq-net.log" "$NS" "${args[@]}"
    wait_for "TAP" ip -n "$NS" link show "$TAP" || { DETAIL="no TAP"; return 1; }
    ip -n "$NS" addr add 10.0.0.1/24 dev "$TAP" && ip -n "$NS" link set "$TAP" up || { DETAIL="TAP set-up"; return 1; }
    [[ $role == client ]] && { wait_for "socket" test -S "$sock" || { DETAIL="virtq-net did not listen"; return 1; }; }
    ip netns exec "$NS" iperf3 -s -p 5201 > "$TMP/$CASE-iperf3-server.log" 2>&1 &
    track $!

    # 1. Ping, then a clean guest poweroff.
    guest name=g1 sock="$sock" role="$role" mac=52:54:00:00:03:02 ip=10.0.0.2 cmd="vt-ping 10.0.0.1 5"
    wait_guests g1 || { DETAIL="first guest did not power off"; return 1; }
    err=$(check_guests g1) || { DETAIL="first guest: $err"; return 1; }
    kill -0 "$VQ_PID" 2> /dev/null || { DETAIL="virtq-net died after a guest poweroff"; return 1; }

    # 2. iperf3 to the namespace; SIGKILL QEMU once intervals are being reported.
    guest name=g2 sock="$sock" role="$role" mac=52:54:00:00:03:03 ip=10.0.0.3 \
        cmd="vt-ping 10.0.0.1 3 && echo VIRTQ: TRAFFIC && iperf3 -c 10.0.0.1 -t 100 -i 1 -f m"
    wait_for "iperf3 traffic" grep -aq 'sec .*Mbits/sec' "${GLOG[g2]}" || { DETAIL="no traffic from the second guest"; return 1; }
    sleep 2
    local mid
    mid=$(grep -a 'sec .*Mbits/sec' "${GLOG[g2]}" | tail -1 | tr -d '\r' | grep -o '[0-9.]* Mbits/sec')
    kill -KILL "${GPID[g2]}"
    wait "${GPID[g2]}" 2> /dev/null
    rc=$?
    sleep 1
    kill -0 "$VQ_PID" 2> /dev/null || { DETAIL="virtq-net died when QEMU was killed"; return 1; }

    # 3. A new guest on the same socket.
    guest name=g3 sock="$sock" role="$role" mac=52:54:00:00:03:04 ip=10.0.0.4 \
        cmd="vt-ping 10.0.0.1 10 && vt-wait-echos 10 90"
    local back
    back=$(ns_ping "$NS" 10.0.0.4 10)
    local back_ok=$?
    wait_guests g3
    err=$(check_guests g3)
    local guest_ok=$?
    vq_stop
    local stop_ok=$? stop=$STOP_ERR
    local disc
    disc=$(grep -ac 'disconnected' "$VQ_LOG")
    DETAIL="poweroff ok; SIGKILL (qemu rc $rc) at $mid; new guest->tap $(vline g3 'ping' | sed -n 's/.*: \([0-9]*\/[0-9]*\) replies.*/\1/p'), ns->new guest $back; $disc disconnects seen"
    ((back_ok == 0 && guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $stop"; return 1; }
}

# Issue 18: two pinned data-plane threads and ports at run time, with real guests. virtq-net
# starts with two switch ports on `--pmd-cpus 0,1` (g1's pair polled by thread 0, g2's by
# thread 1: every frame between them crosses threads) and a control socket. While g1 and g2
# run iperf3, a port is added (`ctl add-port`) and a guest on it (g3) pings g1; that port is
# then removed while g3 runs (`ctl del-port`), added again, and a new guest (g4) on it pings
# g1. PASS: g1 and g2's iperf3 ran to its end both ways (their connection survived the
# changes), g3 and g4 got every ping answered, the removed port's socket went away and
# `ports` no longer listed it, `stats` shows both threads moving frames with g1 and g2 on
# different threads, and virtq-net exits cleanly.
case_runtime_ports() {
    local s1=$TMP/$CASE-1.sock s2=$TMP/$CASE-2.sock s3=$TMP/$CASE-3.sock ctl=$TMP/$CASE.ctl err ok=1 out
    vq_start "$TMP/$CASE-virtq-net.log" - --pmd-cpus 0,1 --control "$ctl" --socket-path "$s1" --socket-path "$s2"
    wait_for "sockets" test -S "$ctl" || { DETAIL="virtq-net did not listen"; return 1; }
    guest name=g1 sock="$s1" mac=52:54:00:00:18:11 ip=10.0.0.11 \
        cmd="vt-wait-peer 10.0.0.12 90 && vt-iperf 10.0.0.12 20 && vt-iperf 10.0.0.12 10 -R && vt-wait-echos 12 200 3"
    guest name=g2 sock="$s2" mac=52:54:00:00:18:12 ip=10.0.0.12 \
        cmd="iperf3 -s -1 > /dev/null && iperf3 -s -1 > /dev/null"
    wait_for "g1 and g2 talking" grep -aq 'VIRTQ: 10.0.0.12 answers' "${GLOG[g1]}" || { DETAIL="g1 never reached g2"; return 1; }
    sleep 2
    out=$("$VIRTQ_NET" ctl "$ctl" add-port "path=$s3") || { DETAIL="add-port: $out"; return 1; }
    guest name=g3 sock="$s3" mac=52:54:00:00:18:13 ip=10.0.0.13 cmd="vt-ping 10.0.0.11 5 && sleep 600"
    wait_for "g3's pings" grep -aq 'VIRTQ: ping' "${GLOG[g3]}" || { DETAIL="g3 did not ping"; return 1; }
    local p3 p4
    p3=$(vline g3 'ping' | sed -n 's/.*: \([0-9]*\/[0-9]*\) replies.*/\1/p')
    [[ $p3 == 5/5 ]] || { ok=0; err+=" g3 got $p3 replies"; }
    out=$("$VIRTQ_NET" ctl "$ctl" del-port "$s3") || { DETAIL="del-port: $out"; return 1; }
    [[ -e $s3 ]] && { ok=0; err+=" $s3 still there after del-port"; }
    "$VIRTQ_NET" ctl "$ctl" ports | grep -q "$s3" && { ok=0; err+=" del-port: still listed"; }
    kill_pids "${GPID[g3]}"
    out=$("$VIRTQ_NET" ctl "$ctl" add-port "path=$s3") || { DETAIL="add-port again: $out"; return 1; }
    guest name=g4 sock="$s3" mac=52:54:00:00:18:14 ip=10.0.0.14 cmd="vt-ping 10.0.0.11 5"
    wait_guests g1 g2 g4
    err+=$(check_guests g1 g2 g4)
    local guest_ok=$?
    p4=$(vline g4 'ping' | sed -n 's/.*: \([0-9]*\/[0-9]*\) replies.*/\1/p')
    local stats threads
    stats=$("$VIRTQ_NET" ctl "$ctl" stats)
    echo "$stats" > "$TMP/$CASE-stats.json"
    CASE_LOGS+=("$TMP/$CASE-stats.json")
    threads=$(python3 -c '
import json, sys
v = json.loads(sys.argv[1])
t = v["threads"]
port = {p["name"]: p for p in v["ports"]}
g1, g2 = port[sys.argv[2]], port[sys.argv[3]]
ok = len(t) == 2 and all(x["frames"] > 0 for x in t) and g1["threads"] != g2["threads"]
print(("" if ok else "BAD ") + ", ".join("thread %d cpu %s: %d frames, busy %.1f%%" % (x["thread"], x["cpu"], x["frames"], x["busy_percent"]) for x in t)
      + "; g1 on %s, g2 on %s" % (g1["threads"], g2["threads"]))
' "$stats" "$s1" "$s2") || { ok=0; err+=" stats not JSON"; }
    [[ $threads == BAD* ]] && { ok=0; err+=" threads: $threads"; }
    vq_stop
    local stop_ok=$? stop=$STOP_ERR
    DETAIL="g1->g2 $(iperf_rate g1 '' || echo none), g2->g1 $(iperf_rate g1 -R || echo none) through two threads; add-port during iperf3: g3 ping $p3; del-port, add-port again: g4 ping $p4; $threads"
    ((ok && guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $stop"; return 1; }
}

# Two guests, iperf3 TCP through the switch: g1 -> g2 and g2 -> g1 (-R), 10 s each.
IPERF_REPORT=""
case_iperf3() {
    local s1=$TMP/$CASE-1.sock s2=$TMP/$CASE-2.sock err
    vq_start "$TMP/$CASE-virtq-net.log" - --socket-path "$s1" --socket-path "$s2"
    wait_for "sockets" test -S "$s2" || { DETAIL="virtq-net did not listen"; return 1; }
    guest name=g1 sock="$s1" mac=52:54:00:00:04:11 ip=10.0.0.11 \
        cmd="vt-wait-peer 10.0.0.12 90 && vt-iperf 10.0.0.12 10 && vt-iperf 10.0.0.12 10 -R"
    guest name=g2 sock="$s2" mac=52:54:00:00:04:12 ip=10.0.0.12 \
        cmd="iperf3 -s -1 > /dev/null && iperf3 -s -1 > /dev/null"
    wait_guests g1 g2
    err=$(check_guests g1 g2)
    local guest_ok=$?
    vq_stop
    local stop_ok=$? stop=$STOP_ERR
    local fwd rev
    fwd=$(iperf_rate g1 '')
    rev=$(iperf_rate g1 -R)
    local retr
    retr=$(grep -a 'VIRTQ: iperf3  .*sender' "${GLOG[g1]}" | tail -1 | tr -d '\r' | awk '{ for (i = 1; i < NF; i++) if ($(i+1) == "sender") print $i }')
    IPERF_REPORT="g1->g2 ${fwd:-?}, g2->g1 ${rev:-?} (TCP, 10 s each, TCG guests)"
    DETAIL="g1->g2 ${fwd:-none}, g2->g1 ${rev:-none}, TCP retransmits g1->g2 ${retr:-?}"
    DETAIL+=", virtq-net RX drops (guest ring full) g1/g2 $(qstat "$s1" 0 drops)/$(qstat "$s2" 0 drops)"
    [[ -n $fwd && -n $rev ]] || { guest_ok=1; err+=" no iperf3 result"; }
    ((guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $stop"; return 1; }
}

# Packed virtqueues (issue 17): two guests with QEMU's packed=on on the switch, so Linux's
# virtio-net drives packed rings; g1 with mergeable RX buffers, g2 without. g1 pings g2, then
# iperf3 both ways. PASS: every ping answered, both iperf3 directions carried data, both guests
# negotiated VIRTIO_F_RING_PACKED (bit 34 of the features the guest shows) and g2 not
# MRG_RXBUF, the back-end ends cleanly.
case_packed() {
    local s1=$TMP/$CASE-1.sock s2=$TMP/$CASE-2.sock err
    vq_start "$TMP/$CASE-virtq-net.log" - --socket-path "$s1" --socket-path "$s2"
    wait_for "sockets" test -S "$s2" || { DETAIL="virtq-net did not listen"; return 1; }
    guest name=g1 sock="$s1" mac=52:54:00:00:06:11 ip=10.0.0.11 devopts=",packed=on" \
        cmd="vt-wait-peer 10.0.0.12 90 && vt-ping 10.0.0.12 10 && vt-iperf 10.0.0.12 5 && vt-iperf 10.0.0.12 5 -R"
    guest name=g2 sock="$s2" mac=52:54:00:00:06:12 ip=10.0.0.12 mrg=off devopts=",packed=on" \
        cmd="iperf3 -s -1 > /dev/null && iperf3 -s -1 > /dev/null"
    wait_guests g1 g2
    err=$(check_guests g1 g2)
    local guest_ok=$?
    vq_stop
    local stop_ok=$? stop=$STOP_ERR
    local fwd rev ping p1 p2
    ping=$(vline g1 'ping' | sed -n 's/.*: \([0-9]*\/[0-9]*\) replies.*/\1/p')
    fwd=$(iperf_rate g1 '')
    rev=$(iperf_rate g1 -R)
    # Feature bit N is character N + 1 of the string the guest prints.
    p1=$(vline g1 features | awk '{ print substr($3, 35, 1) }')
    p2=$(vline g2 features | awk '{ print substr($3, 35, 1) }')
    DETAIL="ping g1->g2 ${ping:-none}, iperf3 g1->g2 ${fwd:-none}, g2->g1 ${rev:-none}, RING_PACKED g1=${p1:-?} g2=${p2:-?}"
    DETAIL+=", g2 $(vline g2 eth0 | grep -o 'mrg_rxbuf=[01]')"
    [[ -n $fwd && -n $rev ]] || { guest_ok=1; err+=" no iperf3 result"; }
    [[ $p1 == 1 && $p2 == 1 ]] || { guest_ok=1; err+=" packed rings not negotiated"; }
    vline g2 eth0 | grep -q 'mrg_rxbuf=0' || { guest_ok=1; err+=" g2 negotiated MRG_RXBUF although off"; }
    ((guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $stop"; return 1; }
}

# Jumbo frames (issue 16): two guests on switch ports with mtu=9000 (VIRTIO_NET_F_MTU; QEMU
# host_mtu=9000, so Linux brings eth0 up at the device's MTU, 9000) and offloads off, so that large frames
# are real 9000-byte frames, not TSO frames. g1 pings g2 with 8972-byte payloads (one
# 9014-byte frame each way), then iperf3 both ways. PASS: every ping answered, both iperf3
# directions carried data, both guests at MTU 9000, and the frames g1 sent and g2 received
# averaged more than 2000 bytes (impossible at MTU 1500 without TSO), no errors.
case_jumbo() {
    local s1=$TMP/$CASE-1.sock s2=$TMP/$CASE-2.sock err
    vq_start "$TMP/$CASE-virtq-net.log" - --port "path=$s1,mtu=9000,offload=off" --port "path=$s2,mtu=9000,offload=off"
    wait_for "sockets" test -S "$s2" || { DETAIL="virtq-net did not listen"; return 1; }
    # No virtq.mtu: eth0's MTU must come from the device (VIRTIO_NET_F_MTU, config space).
    guest name=g1 sock="$s1" mac=52:54:00:00:07:11 ip=10.0.0.11 devopts=",host_mtu=9000" \
        cmd="vt-wait-peer 10.0.0.12 90 && ping -c 5 -s 8972 10.0.0.12 && vt-iperf 10.0.0.12 5 && vt-iperf 10.0.0.12 5 -R"
    guest name=g2 sock="$s2" mac=52:54:00:00:07:12 ip=10.0.0.12 devopts=",host_mtu=9000" \
        cmd="iperf3 -s -1 > /dev/null && iperf3 -s -1 > /dev/null"
    wait_guests g1 g2
    err=$(check_guests g1 g2)
    local guest_ok=$?
    vq_stop
    local stop_ok=$? stop=$STOP_ERR
    local fwd rev pings m1 m2 txp txb rxp rxb avg_tx avg_rx errs
    pings=$(grep -a 'packets transmitted' "${GLOG[g1]}" | tail -1 | tr -d '\r' | sed -n 's/.*, \([0-9]*\) packets received.*/\1/p')
    fwd=$(iperf_rate g1 '')
    rev=$(iperf_rate g1 -R)
    m1=$(vline g1 eth0 | sed -n 's/.* mtu=\([0-9]*\).*/\1/p')
    m2=$(vline g2 eth0 | sed -n 's/.* mtu=\([0-9]*\).*/\1/p')
    txp=$(qstat "$s1" 1) txb=$(qstat "$s1" 1 bytes) rxp=$(qstat "$s2" 0) rxb=$(qstat "$s2" 0 bytes)
    avg_tx=$((${txb:-0} / (${txp:-0} + 1))) avg_rx=$((${rxb:-0} / (${rxp:-0} + 1)))
    errs=$(($(qstat "$s1" 1 errors) + $(qstat "$s2" 0 errors)))
    DETAIL="MTU g1/g2 ${m1:-?}/${m2:-?}, ping -s 8972 ${pings:-0}/5 replies, iperf3 g1->g2 ${fwd:-none}, g2->g1 ${rev:-none}"
    DETAIL+=", average frame g1 TX ${avg_tx} B ($txp pkts), g2 RX ${avg_rx} B ($rxp pkts), errors $errs"
    [[ $m1 == 9000 && $m2 == 9000 ]] || { guest_ok=1; err+=" guests not at MTU 9000"; }
    [[ ${pings:-0} == 5 ]] || { guest_ok=1; err+=" jumbo pings lost"; }
    [[ -n $fwd && -n $rev ]] || { guest_ok=1; err+=" no iperf3 result"; }
    ((avg_tx > 2000 && avg_rx > 2000)) || { guest_ok=1; err+=" no jumbo frames carried"; }
    ((errs == 0)) || { guest_ok=1; err+=" $errs errors"; }
    ((guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $stop"; return 1; }
}

# Offloads through the switch (issue 16). g1 negotiates checksum and TSO offloads; g2 none
# (QEMU csum=off,guest_csum=off); a TAP on the same switch, in a namespace, negotiates nothing
# (the kernel takes offloaded frames written to it). iperf3 g1 <-> g2 both ways: g1's TSO
# frames reach g2 segmented and checksummed in software, g2's plain frames reach g1. Then g1
# sends 10 MiB over TCP to the namespace (busybox nc): its TSO frames reach the TAP with their
# headers. PASS: both iperf3 directions carried data, the namespace got every byte, each guest
# negotiated what it was configured with, the back-end ends cleanly.
case_switch_offload() {
    local s1=$TMP/$CASE-1.sock s2=$TMP/$CASE-2.sock err bytes=10485760
    local got=$TMP/$CASE-nc.bytes fifo=$TMP/$CASE-nc.in fd nc_pid
    mk_netns || { DETAIL="netns"; return 1; }
    tap_name
    vq_start "$TMP/$CASE-virtq-net.log" "$NS" --socket-path "$s1" --socket-path "$s2" --tap "$TAP"
    wait_for "sockets" test -S "$s2" || { DETAIL="virtq-net did not listen"; return 1; }
    wait_for "TAP" ip -n "$NS" link show "$TAP" || { DETAIL="no TAP"; return 1; }
    ip -n "$NS" addr add 10.0.0.1/24 dev "$TAP" && ip -n "$NS" link set "$TAP" up || { DETAIL="TAP set-up"; return 1; }
    # The listener's stdin stays open (a fifo held here), so it keeps reading until g1 is done.
    mkfifo "$fifo" || return 1
    exec {fd}<> "$fifo"
    ip netns exec "$NS" "$BUSYBOX" nc -l -p 5001 < "$fifo" > "$got" &
    nc_pid=$!
    track "$nc_pid"
    guest name=g1 sock="$s1" mac=52:54:00:00:0e:11 ip=10.0.0.11 \
        cmd="vt-wait-peer 10.0.0.12 90 && vt-iperf 10.0.0.12 8 && vt-iperf 10.0.0.12 8 -R && vt-wait-peer 10.0.0.1 30 && dd if=/dev/zero bs=65536 count=$((bytes / 65536)) 2> /dev/null | nc 10.0.0.1 5001 && sleep 3"
    guest name=g2 sock="$s2" mac=52:54:00:00:0e:12 ip=10.0.0.12 devopts=",csum=off,guest_csum=off" \
        cmd="iperf3 -s -1 > /dev/null && iperf3 -s -1 > /dev/null"
    wait_guests g1 g2
    err=$(check_guests g1 g2)
    local guest_ok=$?
    local n
    n=$(stat -c %s "$got" 2> /dev/null || echo 0)
    exec {fd}>&-
    kill_pids "$nc_pid"
    rm -f "$fifo"
    vq_stop
    local stop_ok=$? stop=$STOP_ERR
    local fwd rev o1 o2
    fwd=$(iperf_rate g1 '')
    rev=$(iperf_rate g1 -R)
    o1=$(offloads g1) o2=$(offloads g2)
    DETAIL="g1 ($o1) -> g2 ($o2) ${fwd:-none}, g2 -> g1 ${rev:-none}; g1 -> TAP (no offloads) $n/$bytes bytes"
    DETAIL+="; virtq-net TX errors g1/g2 $(qstat "$s1" 1 errors)/$(qstat "$s2" 1 errors)"
    [[ -n $fwd && -n $rev ]] || { guest_ok=1; err+=" no iperf3 result"; }
    [[ $o1 == *host_tso4* && $o1 == *guest_tso4* ]] || { guest_ok=1; err+=" g1 did not negotiate TSO"; }
    # g2's driver acks host_tso4/guest_tso4 without csum/guest_csum (QEMU leaves them offered);
    # virtq-net leaves them unused. Without the checksum features g2 can neither send nor take
    # an offloaded frame.
    [[ ,$o2, != *,csum,* && ,$o2, != *,guest_csum,* ]] || { guest_ok=1; err+=" g2 negotiated checksum offloads"; }
    ((n == bytes)) || { guest_ok=1; err+=" the namespace got $n of $bytes bytes"; }
    ((guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $stop"; return 1; }
}

# The same iperf3 TCP test through two backends, alternating A B A B (VS_ROUNDS rounds each):
#   A: virtq-net, switch mode, two --socket-path ports (as case_iperf3);
#   B: DPDK testpmd, io forwarding between two net_vhost ports (port 0 <-> port 1).
# Every round boots a fresh pair of guests (same kernel, initramfs, MACs, IPs and QEMU flags) and
# runs g1 -> g2, then g2 -> g1 (-R), VS_SECS each. Same CPU budget for both backends: the backend
# on CPU 0 (testpmd: main and forwarding lcore both there), both guests on CPU 1. PASS: both
# backends carried traffic in both directions in every round. The ratio virtq/DPDK is a report,
# not a gate: under TCG the guests, not the backend, set the pace.
VS_ROUNDS=2
VS_SECS=8
VS_REPORT=""

# Which offloads the guest driver negotiated (from its sysfs feature bits).
offloads() { # GUEST
    local f names=(0 csum 1 guest_csum 7 guest_tso4 11 host_tso4 15 mrg_rxbuf 28 indirect 29 event_idx) i out=""
    f=$(vline "$1" features | sed 's/.*features //')
    for ((i = 0; i < ${#names[@]}; i += 2)); do
        [[ ${f:${names[i]}:1} == 1 ]] && out+="${out:+,}${names[i + 1]}"
    done
    echo "${out:-none}"
}

# One round: backend virtq|dpdk, round number. Sets RF RR (Mbit/s g1->g2, g2->g1), OFFLOADS,
# BSTATS (frames the backend put into the guests' RX rings / dropped because a ring was full)
# and ROUND_ERR; returns 0 if both directions carried traffic.
vs_round() { # virtq|dpdk ROUND BACKEND-CPU GUEST-CPU
    local b=$1 r=$2 bcpu=$3 gcpu=$4 tag=$1$2
    local s1=$TMP/$CASE-$tag-1.sock s2=$TMP/$CASE-$tag-2.sock blog pid prefix="" err guest_ok stop_ok=0 i
    RF="" RR="" OFFLOADS="" BSTATS="" ROUND_ERR=""
    if [[ $b == virtq ]]; then
        blog=$TMP/$CASE-$tag-virtq-net.log
        taskset -c "$bcpu" "$VIRTQ_NET" --socket-path "$s1" --socket-path "$s2" > "$blog" 2>&1 &
        pid=$!
        VQ_PID=$pid VQ_LOG=$blog
    else
        # Unique per run and round: another testpmd may be running on this machine.
        prefix="virtq-guests-$TAG-$tag"
        DPDK_PREFIXES+=("$prefix")
        blog=$TMP/$CASE-$tag-testpmd.log
        taskset -c "$bcpu" stdbuf -oL -eL dpdk-testpmd --lcores "0@$bcpu,1@$bcpu" --no-huge -m 1024 --no-pci \
            --no-telemetry --file-prefix="$prefix" \
            --vdev "net_vhost0,iface=$s1,queues=1" --vdev "net_vhost1,iface=$s2,queues=1" -- \
            --forward-mode=io --stats-period 30 --total-num-mbufs=32768 --rxq=1 --txq=1 --nb-cores=1 \
            < /dev/null > "$blog" 2>&1 &
        pid=$!
    fi
    track "$pid"
    CASE_LOGS+=("$blog")
    for ((i = 0; i < 300; i++)); do # 30 s; fail at once if the backend died
        [[ -S $s1 && -S $s2 ]] && break
        kill -0 "$pid" 2> /dev/null || break
        sleep 0.1
    done
    [[ -S $s1 && -S $s2 ]] || { ROUND_ERR="$b did not listen on both sockets (log $(basename "$blog"))"; return 1; }

    guest name="$tag-g1" sock="$s1" mac=52:54:00:00:05:11 ip=10.0.0.11 cpus="$gcpu" timeout=90 \
        cmd="vt-wait-peer 10.0.0.12 60 && vt-iperf 10.0.0.12 $VS_SECS && vt-iperf 10.0.0.12 $VS_SECS -R"
    guest name="$tag-g2" sock="$s2" mac=52:54:00:00:05:12 ip=10.0.0.12 cpus="$gcpu" timeout=90 \
        cmd="iperf3 -s -1 > /dev/null && iperf3 -s -1 > /dev/null"
    wait_guests "$tag-g1" "$tag-g2"
    err=$(check_guests "$tag-g1" "$tag-g2")
    guest_ok=$?

    if [[ $b == virtq ]]; then
        vq_stop || stop_ok=1
        local p1 p2 d1 d2
        p1=$(qstat "$s1" 0) p2=$(qstat "$s2" 0) d1=$(qstat "$s1" 0 drops) d2=$(qstat "$s2" 0 drops)
        BSTATS="$((${p1:-0} + ${p2:-0}))/$((${d1:-0} + ${d2:-0}))"
    else
        # SIGINT: testpmd stops forwarding, prints its forward statistics and exits.
        kill -INT "$pid" 2> /dev/null
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2> /dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2> /dev/null; then
            kill -KILL "$pid" 2> /dev/null
            STOP_ERR="testpmd did not exit on SIGINT"
            stop_ok=1
        fi
        wait "$pid" 2> /dev/null
        rm -rf "/var/run/dpdk/$prefix"
        BSTATS=$(grep -a -A2 'Accumulated forward statistics' "$blog" | tr -s ' ' \
            | sed -n 's/.*TX-packets: \([0-9]*\) TX-dropped: \([0-9]*\).*/\1\/\2/p' | head -1)
    fi

    OFFLOADS=$(offloads "$tag-g1")
    RF=$(grep -a 'VIRTQ: iperf3  .*receiver' "${GLOG[$tag-g1]}" | tail -1 | tr -d '\r' | sed -n 's/.* \([0-9.]*\) Mbits\/sec.*/\1/p')
    RR=$(grep -a 'VIRTQ: iperf3 -R .*receiver' "${GLOG[$tag-g1]}" | tail -1 | tr -d '\r' | sed -n 's/.* \([0-9.]*\) Mbits\/sec.*/\1/p')
    ((guest_ok == 0)) || ROUND_ERR+="$err "
    ((stop_ok == 0)) || ROUND_ERR+="$STOP_ERR "
    awk -v f="${RF:-0}" -v r="${RR:-0}" 'BEGIN { exit !(f > 0 && r > 0) }' \
        || ROUND_ERR+="no iperf3 throughput (g1->g2 ${RF:-none}, g2->g1 ${RR:-none}) "
    [[ -z $ROUND_ERR ]]
}

vs_mean() { echo "$1" | tr ',' '\n' | awk '$1 != "" { s += $1; n++ } END { if (n) printf "%.0f", s / n }'; }
vs_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "" && b > 0) printf "%.2f", a / b; else printf "?" }'; }

case_iperf3_vs_dpdk() {
    local bcpu=0 gcpu=1 r b ok=1
    (($(nproc) < 2)) && gcpu=0
    command -v dpdk-testpmd > /dev/null || { DETAIL="dpdk-testpmd missing (apt-get install dpdk-dev)"; return 1; }
    local -A fwd=() rev=() offl=() bst=()
    for ((r = 1; r <= VS_ROUNDS && ok; r++)); do
        for b in virtq dpdk; do
            say "case $CASE: round $r/$VS_ROUNDS, $b ($(left)s left)"
            if ! vs_round "$b" "$r" "$bcpu" "$gcpu"; then
                DETAIL="round $r ($b): $ROUND_ERR; "
                ok=0
                break
            fi
            fwd[$b]+="${fwd[$b]:+, }$RF"
            rev[$b]+="${rev[$b]:+, }$RR"
            offl[$b]=$OFFLOADS
            bst[$b]+="${bst[$b]:+, }${BSTATS:-?}"
        done
    done
    local fa fb ra rb
    fa=$(vs_mean "${fwd[virtq]:-}") fb=$(vs_mean "${fwd[dpdk]:-}") ra=$(vs_mean "${rev[virtq]:-}") rb=$(vs_mean "${rev[dpdk]:-}")
    local note="TCG guests are the bottleneck: the ratio is a report, not a gate"
    DETAIL+="g1->g2 virtq-net ${fa:-?} vs DPDK ${fb:-?} Mbit/s (virtq/DPDK $(vs_ratio "$fa" "$fb")), g2->g1 virtq-net ${ra:-?} vs DPDK ${rb:-?} Mbit/s (virtq/DPDK $(vs_ratio "$ra" "$rb"))"
    DETAIL+="; per round (A B A B, ${VS_SECS} s each) virtq-net ${fwd[virtq]:-none} / ${rev[virtq]:-none}, DPDK ${fwd[dpdk]:-none} / ${rev[dpdk]:-none}"
    DETAIL+="; offloads virtq-net ${offl[virtq]:-?}, DPDK ${offl[dpdk]:-?}"
    DETAIL+="; frames into guest RX rings/dropped (ring full) per round virtq-net ${bst[virtq]:-none}, testpmd ${bst[dpdk]:-none}; $note"
    VS_REPORT="iperf3 TCP between the same two guests, virtq-net (switch) vs DPDK testpmd (io, 2x net_vhost):"
    VS_REPORT+=$'\n'"$VS_ROUNDS rounds of ${VS_SECS} s per direction, alternating A B A B; backend on CPU $bcpu, both guests on CPU $gcpu."
    VS_REPORT+=$'\n\n'"| direction | virtq-net Mbit/s (rounds) | DPDK testpmd Mbit/s (rounds) | virtq/DPDK |"
    VS_REPORT+=$'\n'"|---|---|---|---|"
    VS_REPORT+=$'\n'"| g1 -> g2 | ${fa:-?} (${fwd[virtq]:-none}) | ${fb:-?} (${fwd[dpdk]:-none}) | $(vs_ratio "$fa" "$fb") |"
    VS_REPORT+=$'\n'"| g2 -> g1 | ${ra:-?} (${rev[virtq]:-none}) | ${rb:-?} (${rev[dpdk]:-none}) | $(vs_ratio "$ra" "$rb") |"
    VS_REPORT+=$'\n\n'"Offloads the guests negotiated: virtq-net ${offl[virtq]:-?}; DPDK ${offl[dpdk]:-?}. $note."
    ((ok))
}

# --- live migration ------------------------------------------------------------------------
# A guest m (10.0.0.11) migrates from one QEMU (source, NIC on back-end socket SRC) to another
# (destination, started with -incoming and -S, NIC on back-end socket DST) while it pings a
# second guest p (10.0.0.12, socket PEER, same back-end) every 0.2 s and receives a steady UDP
# stream from p (iperf3 -u -b MIG_RATE, p -> m: the back-end writes m's memory during the
# migration). Both QEMUs run TCG with memfd share=on RAM of MIG_MEM (not a multiple of 256 KiB:
# QEMU 7.2 TCG loses guest writes during migration with such sizes) and append to one serial
# log, m.serial: the source writes the part before the switch-over, the destination the rest.
# Migration over a unix socket, driven through QMP (ci/guest/qmp.py): max-bandwidth MIG_MIBS
# MiB/s so it takes several seconds, `migrate`, `query-migrate` until `completed`. At the
# switch-over both QEMUs are stopped: their RAM (each one's memfd, read through /proc/PID/fd) is
# compared page by page (a back-end that writes guest memory without logging it leaves pages
# that differ, which a ping that survives does not show: a virtq-net that logged the used ring
# but not the buffers had 91 pages differ and every ping answered), then the destination gets
# `cont` and the source `quit`.
# PASS: `completed`, identical RAM, at most MIG_MAX_LOST ping replies lost, m's ping and the
# stream carried on from the destination (replies and iperf3 intervals after the switch-over),
# both guests RESULT: PASS, the back-end ends cleanly. Reports QMP's total-time and downtime.
#
# Back-ends: dpdk = dpdk-testpmd with three net_vhost ports (SRC 0, DST 1, PEER 2), io
# forwarding between ports 0 and 2, switched to 1 and 2 at the switch-over (testpmd has no
# learning switch); virtq = virtq-net in switch mode with the three sockets (it learns m's MAC
# on DST from m's first frame there). QEMU refuses to migrate while a vhost-user back-end lacks
# VHOST_F_LOG_ALL or VHOST_USER_PROTOCOL_F_LOG_SHMFD (dirty logging) and says so in
# query-migrate's blocked-reasons: a FAIL for either back-end (virtq-net offers both).
MIG_MEM=262136K
MIG_MIBS=${MIG_MIBS:-16}
MIG_SECS=${MIG_SECS:-20}
MIG_RATE=10M
MIG_MAX_LOST=${MIG_MAX_LOST:-5}

qmp() { python3 "$ROOT/ci/guest/qmp.py" "$@"; }
qval() { sed -n "s/^$2=//p" <<< "$1" | head -1; } # QMP-OUTPUT KEY
# A QEMU's guest RAM (its memory-backend-memfd; the vhost log is another memfd, "vhost-log"),
# readable through /proc while QEMU runs.
guest_ram() { # QEMU-PID
    local f found=()
    for f in /proc/"$1"/fd/*; do
        [[ $(readlink "$f") == "/memfd:memory-backend-memfd (deleted)" ]] && found+=("$f")
    done
    ((${#found[@]} == 1)) && echo "${found[0]}"
}
all_sockets() {
    local s
    for s in "$@"; do [[ -S $s ]] || return 1; done
}

# dpdk-testpmd, interactive (commands through a fifo kept open read-write), pinned to CPU 0:
# net_vhost0..2 on SRC, DST, PEER; io forwarding between the ports of `set portlist`. Sets
# TP_PID, TP_LOG, TP_FD, TP_FIFO.
tp_start() { # ROLE(client|server: QEMU's) SRC DST PEER
    local client=0 prefix="virtq-guests-$TAG-$CASE"
    [[ $1 == server ]] && client=1
    DPDK_PREFIXES+=("$prefix")
    TP_LOG=$TMP/$CASE-testpmd.log TP_FIFO=$TMP/$CASE-testpmd.in
    CASE_LOGS+=("$TP_LOG")
    mkfifo "$TP_FIFO" || return 1
    exec {TP_FD}<> "$TP_FIFO"
    taskset -c 0 stdbuf -oL -eL dpdk-testpmd --lcores 0@0,1@0 --no-huge -m 1024 --no-pci --no-telemetry \
        --file-prefix="$prefix" --vdev "net_vhost0,iface=$2,queues=1,client=$client" \
        --vdev "net_vhost1,iface=$3,queues=1,client=$client" --vdev "net_vhost2,iface=$4,queues=1,client=$client" -- \
        -i --forward-mode=io --total-num-mbufs=32768 --rxq=1 --txq=1 --nb-cores=1 --disable-link-check \
        < "$TP_FIFO" > "$TP_LOG" 2>&1 &
    TP_PID=$!
    track "$TP_PID"
}
tp_cmd() { printf '%s\n' "$*" >&"$TP_FD"; }
tp_forwarding() { # RX-PORT TX-PORT: testpmd's last `start` forwards RX-PORT to TX-PORT
    grep -aq "RX P=$1/Q=0 .*-> TX P=$2/Q=0" <(tac "$TP_LOG" | sed '/Logical Core/q')
}
tp_starts_after() { (($(grep -ac 'Logical Core' "$TP_LOG") > $1)); } # N: more than N `start`s logged
tp_prompt() { grep -aq 'testpmd> ' "$TP_LOG"; }
tp_portlist() { # A B: forward between ports A and B (both ways)
    local n
    # Commands only once testpmd is at its prompt; otherwise they may go unread.
    wait_for "testpmd prompt" tp_prompt || return 1
    local try i
    for try in 1 2 3; do
        n=$(grep -ac 'Logical Core' "$TP_LOG")
        tp_cmd stop
        tp_cmd "set portlist $1,$2"
        tp_cmd start
        for ((i = 0; i < 50; i++)); do
            tp_starts_after "$n" && break
            sleep 0.1
        done
        tp_starts_after "$n" && break
        say "case $CASE: testpmd did not start forwarding $1 <-> $2 within 5 s (try $try)"
    done
    tp_starts_after "$n" && tp_forwarding "$1" "$2" && tp_forwarding "$2" "$1"
}
tp_quit() { # 0 if testpmd ended on `quit` within 10 s
    local i
    tp_cmd quit
    for ((i = 0; i < 100; i++)); do
        kill -0 "$TP_PID" 2> /dev/null || break
        sleep 0.1
    done
    exec {TP_FD}>&-
    TP_FD=""
    rm -f "$TP_FIFO"
    if kill -0 "$TP_PID" 2> /dev/null; then
        kill_pids "$TP_PID"
        STOP_ERR="testpmd did not quit"
        return 1
    fi
    wait "$TP_PID" 2> /dev/null
    rm -rf "/var/run/dpdk/virtq-guests-$TAG-$CASE"
}

case_migrate() { # BACKEND(dpdk|virtq) ROLE(client|server: QEMU's socket role) MRG(on|off) [ANNOUNCE(on|off)]
    local be=$1 role=$2 mrg=$3 announce=${4:-on} ring=${5:-split} ok=1 err="" out status blocked
    # ring=packed: every guest with QEMU's packed=on (packed virtqueues, issue 17).
    local devopts=""
    [[ $ring == packed ]] && devopts=",packed=on"
    local ss=$TMP/$CASE-src.sock sd=$TMP/$CASE-dst.sock sp=$TMP/$CASE-peer.sock mig=$TMP/$CASE-migration.sock
    local qs=$TMP/$CASE-src.qmp qd=$TMP/$CASE-dst.qmp log=$TMP/$CASE-m.serial
    if [[ $be == dpdk ]]; then
        command -v dpdk-testpmd > /dev/null || { DETAIL="dpdk-testpmd missing (apt-get install dpdk-dev)"; return 1; }
        tp_start "$role" "$ss" "$sd" "$sp" || { DETAIL="testpmd start"; return 1; }
        tp_portlist 0 2 || { DETAIL="testpmd did not forward between ports 0 and 2 (log $(basename "$TP_LOG"))"; return 1; }
    elif [[ $role == client ]]; then
        vq_start "$TMP/$CASE-virtq-net.log" - --socket-path "$ss" --socket-path "$sd" --socket-path "$sp"
    fi
    if [[ $role == client ]]; then
        wait_for "back-end sockets" all_sockets "$ss" "$sd" "$sp" || { DETAIL="$be did not listen on its 3 sockets"; return 1; }
    fi
    : > "$log"
    local mcmd="iperf3 -s -1 -i 1 -f m & vt-wait-peer 10.0.0.12 60 && ping -i 0.2 -w $((MIG_SECS + 2)) 10.0.0.12 && wait"
    local pcmd="vt-wait-peer 10.0.0.11 90 && vt-iperf 10.0.0.11 $MIG_SECS -u -b $MIG_RATE && vt-wait-echos 20 60 3"
    local m=(sock="$ss" role="$role" mrg="$mrg" mac=52:54:00:00:0a:11 ip=10.0.0.11 mem="$MIG_MEM" kargs=init_on_alloc=0
        serial="$log" cmd="$mcmd" announce="$announce" devopts="$devopts")
    guest name=src "${m[@]}" qmp="$qs"
    guest "${m[@]}" name=dst sock="$sd" qmp="$qd" incoming="unix:$mig" paused=1
    guest name=p sock="$sp" role="$role" mrg="$mrg" mac=52:54:00:00:0a:12 ip=10.0.0.12 cmd="$pcmd" devopts="$devopts"
    if [[ $role == server ]]; then
        wait_for "QEMU sockets" all_sockets "$ss" "$sd" "$sp" || { DETAIL="QEMU did not listen"; return 1; }
        [[ $be == virtq ]] && vq_start "$TMP/$CASE-virtq-net.log" - --client --socket-path "$ss" --socket-path "$sd" --socket-path "$sp"
    fi

    # 1. Can the source migrate at all with this back-end?
    wait_for "source QMP" qmp -t 2 "$qs" query-status || { DETAIL="no QMP from the source QEMU"; return 1; }
    out=$(qmp "$qs" query-migrate) || { DETAIL="query-migrate failed"; return 1; }
    blocked=$(qval "$out" blocked-reasons)
    if [[ -n $blocked ]]; then
        DETAIL="migration blocked: $blocked"
        return 1
    fi

    # 2. m pings p and receives the stream (iperf3's server prints a line a second).
    stream_up() { (($(grep -ac ' sec .*bits/sec' "$log") >= 2)) && grep -aq 'seq=' "$log"; }
    wait_for "ping and stream on m" stream_up || { DETAIL="m never pinged p while receiving the stream"; return 1; }
    wait_for "destination listening" test -S "$mig" || { DETAIL="destination QEMU did not listen for the migration"; return 1; }

    # 3. Migrate, slowed down.
    out=$(qmp "$qs" migrate-set-parameters "{\"max-bandwidth\": $((MIG_MIBS * 1048576))}" 2>&1) || { DETAIL="migrate-set-parameters: $out"; return 1; }
    out=$(qmp "$qs" migrate "{\"uri\": \"unix:$mig\"}" 2>&1) || {
        DETAIL="migrate: $out"
        return 1
    }
    local t0 remaining=""
    t0=$(date +%s)
    while :; do
        out=$(qmp "$qs" query-migrate)
        status=$(qval "$out" status)
        [[ $status == completed || $status == failed || $status == cancelled ]] && break
        [[ -n $(qval "$out" ram.remaining) ]] && remaining=$(qval "$out" ram.remaining)
        if (($(left) <= 0)); then
            DETAIL="migration not done after $(($(date +%s) - t0))s (status ${status:-?}, ${remaining:-?} bytes remaining)"
            return 1
        fi
        sleep 0.2
    done
    local off t_done
    off=$(stat -c %s "$log") t_done=$(date +%s%N)
    local total down sent syncs
    total=$(qval "$out" total-time) down=$(qval "$out" downtime)
    sent=$(qval "$out" ram.transferred) syncs=$(qval "$out" ram.dirty-sync-count)
    if [[ $status != completed ]]; then
        DETAIL="migration $status after ${total:-?} ms: $(qval "$out" error-desc)"
        return 1
    fi
    dst_paused() { [[ $(qval "$(qmp -t 2 "$qd" query-status)" status) == paused ]]; }
    wait_for "destination loaded" dst_paused || { DETAIL="destination not paused after the migration"; return 1; }

    # 4. Both stopped: compare their RAM, then run the destination.
    local ram rs rd
    rs=$(guest_ram "${GPID[src]}") && rd=$(guest_ram "${GPID[dst]}") || { DETAIL="no guest RAM memfd in /proc of the QEMUs"; return 1; }
    # cmp first (fast); the page-by-page report only when they differ.
    if cmp -s "$rs" "$rd"; then
        ram="pages=$(($(stat -L -c %s "$rs") / 4096))"$'\n'"differ=0"
    else
        ram=$(qmp --ram-diff "$rs" "$rd" 2>&1) || { ok=0; err+=" RAM differs at the switch-over: $(qval "$ram" differ) pages ($(qval "$ram" ranges))"; }
    fi
    if [[ $be == dpdk ]]; then
        tp_portlist 1 2 || { ok=0; err+=" testpmd did not switch to ports 1 <-> 2"; }
    fi
    qmp "$qd" cont > /dev/null || { DETAIL="cont on the destination failed"; return 1; }
    local paused_ms=$((($(date +%s%N) - t_done) / 1000000))
    qmp "$qs" quit > /dev/null 2>&1
    kill_pids "${GPID[src]}"
    [[ $(qval "$(qmp "$qd" query-status)" status) == running ]] || { ok=0; err+=" destination not running after cont"; }

    # 5. The guests finish (m's ping and p's stream run MIG_SECS from their start).
    wait_guests dst p
    err+=$(check_guests dst p)
    local guest_ok=$?
    local stop_ok=0
    if [[ $be == dpdk ]]; then
        tp_quit || stop_ok=1
    else
        vq_stop || stop_ok=1
    fi
    local tx rx lost after gap ivl slow recv
    tx=$(grep -a 'packets transmitted' "$log" | tail -1 | sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p')
    rx=$(grep -a 'packets transmitted' "$log" | tail -1 | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
    lost=$((${tx:-0} - ${rx:-0}))
    after=$(tail -c +$((off + 1)) "$log" | grep -ac 'seq=')
    # The longest run of missing sequence numbers among m's replies.
    gap=$(grep -a 'bytes from 10.0.0.12' "$log" | sed -n 's/.*seq=\([0-9]*\).*/\1/p' \
        | awk 'NR > 1 && $1 - p - 1 > g { g = $1 - p - 1 } { p = $1 } END { print g + 0 }')
    # iperf3 intervals (server side, on m) that the destination printed, and the slowest.
    ivl=$(tail -c +$((off + 1)) "$log" | tr -d '\r' | grep -a ' sec .*bits/sec' | grep -avc 'receiver\|sender')
    slow=$(tail -c +$((off + 1)) "$log" | tr -d '\r' | grep -a ' sec .*bits/sec' | grep -av 'receiver\|sender' \
        | sed -n 's/.* \([0-9.]*\) Mbits\/sec.*/\1/p' | sort -g | head -1)
    recv=$(tr -d '\r' < "$log" | grep -a 'receiver' | grep -a 'bits/sec' | tail -1 | sed -n 's/.*Mbits\/sec *[0-9.]* ms *\([0-9]*\/[0-9]* ([0-9.e+-]*%)\).*/\1/p')
    [[ -n $tx && $tx -gt 0 ]] || { ok=0; err+=" no ping summary from m"; }
    ((lost <= MIG_MAX_LOST)) || { ok=0; err+=" $lost ping replies lost (at most $MIG_MAX_LOST)"; }
    ((after >= 10)) || { ok=0; err+=" only $after ping replies from the destination"; }
    ((ivl >= 3)) || { ok=0; err+=" only $ivl stream intervals from the destination"; }
    [[ -n $recv ]] || { ok=0; err+=" no iperf3 receiver summary on m"; }
    DETAIL="migration $(awk -v t="${total:-0}" 'BEGIN { printf "%.1f", t / 1000 }') s (QMP total-time; max-bandwidth $MIG_MIBS MiB/s, $((${sent:-0} / 1048576)) MiB sent, ${syncs:-?} dirty syncs), downtime ${down:-?} ms"
    DETAIL+=", RAM at the switch-over: $(qval "$ram" differ)/$(qval "$ram" pages) pages differ (destination resumed ${paused_ms} ms after completion)"
    DETAIL+="; ping m->p ${rx:-?}/${tx:-?} replies ($lost lost, longest gap $gap), $after after the switch-over"
    DETAIL+="; UDP stream p->m $MIG_RATE: ${recv:-?} lost, $ivl intervals after the switch-over (slowest ${slow:-?} Mbit/s)"
    DETAIL+=", $(vline dst eth0 | grep -o 'mrg_rxbuf=[01]')"
    [[ $mrg == off ]] && ! vline dst eth0 | grep -q 'mrg_rxbuf=0' && { ok=0; err+=" MRG_RXBUF negotiated although off"; }
    if [[ $ring == packed ]]; then
        # Feature bit 34 is character 35 of the string the guest prints (at boot on the source).
        local pk
        pk=$(vline src features | awk '{ print substr($3, 35, 1) }')
        DETAIL+=", RING_PACKED=${pk:-?}"
        [[ $pk == 1 ]] || { ok=0; err+=" packed rings not negotiated"; }
    fi
    # Who announced m at its new place: the guest itself (GUEST_ANNOUNCE, QEMU sends no
    # SEND_RARP), or, with guest_announce=off, virtq-net on QEMU's SEND_RARP: a RARP from m's
    # MAC into the switch, logged, once per round of QEMU's announce (announce-rounds, 5 by
    # default).
    if [[ $be == virtq ]]; then
        local rarps
        rarps=$(grep -ac 'announced \[52, 54, 00, 00, 0a, 11\] (RARP)' "$VQ_LOG")
        if [[ $announce == off ]]; then
            ((rarps >= 1)) || { ok=0; err+=" virtq-net never announced m (no SEND_RARP acted on)"; }
            DETAIL+=", announced by virtq-net ($rarps RARPs on SEND_RARP)"
        else
            ((rarps == 0)) || { ok=0; err+=" virtq-net announced m although the guest announces itself"; }
            DETAIL+=", announced by the guest"
        fi
    fi
    MIG_REPORT+=("$CASE: migration $(awk -v t="${total:-0}" 'BEGIN { printf "%.1f", t / 1000 }') s, downtime ${down:-?} ms, ping lost $lost of ${tx:-?}")
    ((ok && guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $STOP_ERR"; return 1; }
}

# virtq-blk: Linux's virtio-blk driver over vhost-user-blk-pci (two request queues on two
# vCPUs) against a 256 MiB sparse raw image. In the guest (vt-blk): mkfs.ext4, a file written,
# synced, read back after a remount and compared by SHA-256, dd throughput, and a known raw
# pattern; after the guest powers off the host checks the pattern's bytes in the image, runs
# e2fsck on the file system, and reads virtq-blk's statistics (both queues served, no errors).
case_blk() {
    local sock=$TMP/$CASE.sock img=$TMP/$CASE.img log=$TMP/$CASE-g1.serial err
    rm -f "$img"
    truncate -s 256M "$img" || { DETAIL="image"; return 1; }
    VQ_LOG=$TMP/$CASE-virtq-blk.log
    "$VIRTQ_BLK" --socket-path "$sock" --image "$img" --queues 2 --serial virtq-blk-ci > "$VQ_LOG" 2>&1 &
    VQ_PID=$!
    track "$VQ_PID"
    wait_for "socket" test -S "$sock" || { DETAIL="virtq-blk did not listen"; return 1; }
    qemu-system-x86_64 -accel tcg -cpu max -machine q35,memory-backend=mem -m 256M -smp 2 \
        -object "memory-backend-memfd,id=mem,size=256M,share=on" \
        -display none -nodefaults -no-reboot -serial "file:$log" \
        -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 loglevel=4 virtq.timeout=$((CASE_LIMIT - 20)) virtq.cmd=vt-blk" \
        -chardev "socket,id=c0,path=$sock" -device vhost-user-blk-pci,chardev=c0,num-queues=2 \
        > "$TMP/$CASE-g1.qemu" 2>&1 &
    GPID[g1]=$!
    GLOG[g1]=$log
    track "${GPID[g1]}"
    wait_guests g1
    err=$(check_guests g1)
    local guest_ok=$?
    vq_stop
    local stop_ok=$? stop=${STOP_ERR//virtq-net/virtq-blk}
    # The raw pattern, on the host, where the guest wrote it.
    local want got fsck
    want=$(yes virtq-blk-raw | head -c 1048576 | sha256sum | cut -d' ' -f1)
    got=$(dd if="$img" bs=1M skip=240 count=1 2> /dev/null | sha256sum | cut -d' ' -f1)
    fsck=$(e2fsck -fn "$img" 2>&1)
    local fsck_ok=$?
    fsck=$(echo "$fsck" | tail -1)
    local q0 q1 errors
    q0=$(grep -a 'stats .* q0:' "$VQ_LOG" | sed -n 's/.* requests \([0-9]*\).*/\1/p' | tail -1)
    q1=$(grep -a 'stats .* q1:' "$VQ_LOG" | sed -n 's/.* requests \([0-9]*\).*/\1/p' | tail -1)
    errors=$(grep -a 'stats .* q[01]:' "$VQ_LOG" | sed -n 's/.* errors \([0-9]*\).*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
    DETAIL="$(vline g1 'vda' | sed 's/.*VIRTQ: //'); $(vline g1 'ext4' | sed 's/.*VIRTQ: //' | cut -c1-40)...; $(vline g1 'dd' | sed 's/.*VIRTQ: //')"
    DETAIL+="; host: raw pattern $([[ $want == "$got" ]] && echo intact || echo DIFFERS), e2fsck: ${fsck:-?}; requests q0/q1 ${q0:-?}/${q1:-?}, errors $errors"
    [[ $want == "$got" ]] || { DETAIL+="; raw pattern not in the image"; return 1; }
    ((fsck_ok == 0)) || { DETAIL+="; e2fsck found errors"; return 1; }
    ((${q0:-0} > 0 && ${q1:-0} > 0)) || { DETAIL+="; not both queues served"; return 1; }
    ((errors == 0)) || { DETAIL+="; request errors"; return 1; }
    ((guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $stop"; return 1; }
}

# virtq-blk killed with SIGKILL three times during a guest's streamed write (after chunks 8, 24
# and 40 of 64, each time preferably inside a write: kill_mid_request; the guest runs its disk
# in writethrough mode, so that every write is synced before it completes) and started again on the same socket each time; QEMU (client, reconnect=1)
# reconnects and sets the rings up again, and the guest's write completes with its checksum
# intact, read back in the guest and on the host. With INFLIGHT_SHMFD, QEMU keeps the inflight
# area across the restarts: a request the killed back-end had taken and not completed is served
# again by the next one (counted in DETAIL from its log; a kill between two requests leaves
# none). Requests complete in order, so they are also the ones from the used index on, which
# QEMU restores as the rings' base.
# SIGKILL to virtq-blk, preferably while one of its threads is inside fdatasync(2) (syscall 75
# on x86-64; in writethrough mode every write is synced before it completes), i.e. with a
# request taken from the ring and not completed; polls /proc/PID/task/*/syscall (no fork per
# poll) for up to 3 s, then kills anyway. Sets MID=1 if it caught one.
kill_mid_request() { # PID
    local t f end=$((SECONDS + 3))
    MID=0
    while ((SECONDS < end)); do
        for f in /proc/"$1"/task/*/syscall; do
            read -r t _ < "$f" 2> /dev/null || continue
            if [[ $t == 75 ]]; then
                kill -KILL "$1"
                MID=1
                return 0
            fi
        done
    done
    kill -KILL "$1"
}

case_blk_kill() {
    local sock=$TMP/$CASE.sock img=$TMP/$CASE.img log=$TMP/$CASE-g1.serial err mib=64 k n=0 killed="" mid=0
    rm -f "$img"
    truncate -s 256M "$img" || { DETAIL="image"; return 1; }
    VQ_LOG=$TMP/$CASE-virtq-blk-0.log
    "$VIRTQ_BLK" --socket-path "$sock" --image "$img" > "$VQ_LOG" 2>&1 &
    VQ_PID=$!
    track "$VQ_PID"
    wait_for "socket" test -S "$sock" || { DETAIL="virtq-blk did not listen"; return 1; }
    qemu-system-x86_64 -accel tcg -cpu max -machine q35,memory-backend=mem -m 256M -smp 1 \
        -object "memory-backend-memfd,id=mem,size=256M,share=on" \
        -display none -nodefaults -no-reboot -serial "file:$log" \
        -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 loglevel=4 virtq.timeout=$((CASE_LIMIT - 20)) virtq.cmd=\"vt-blk-stream $mib writethrough\"" \
        -chardev "socket,id=c0,path=$sock,reconnect=1" -device vhost-user-blk-pci,chardev=c0 \
        > "$TMP/$CASE-g1.qemu" 2>&1 &
    GPID[g1]=$!
    GLOG[g1]=$log
    track "${GPID[g1]}"
    for k in 8 24 40; do
        wait_for "the guest's chunk $k" grep -aq "VIRTQ: chunk $k" "$log" || { DETAIL="the guest did not reach chunk $k"; return 1; }
        kill_mid_request "$VQ_PID"
        mid=$((mid + MID))
        wait "$VQ_PID" 2> /dev/null
        killed+="${killed:+, }$(grep -a 'VIRTQ: chunk' "$log" | tail -1 | tr -d '\r' | sed 's/.*chunk //')"
        sleep 1
        n=$((n + 1))
        VQ_LOG=$TMP/$CASE-virtq-blk-$n.log
        "$VIRTQ_BLK" --socket-path "$sock" --image "$img" > "$VQ_LOG" 2>&1 &
        VQ_PID=$!
        track "$VQ_PID"
    done
    wait_guests g1
    err=$(check_guests g1)
    local guest_ok=$?
    vq_stop
    local stop_ok=$? stop=${STOP_ERR//virtq-net/virtq-blk}
    local want got requests resubmitted tracked
    want=$(yes virtq-blk-stream | head -c $((mib << 20)) | sha256sum | cut -d' ' -f1)
    got=$(dd if="$img" bs=1M skip=16 count=$mib 2> /dev/null | sha256sum | cut -d' ' -f1)
    requests=$(grep -a 'stats .* q0:' "$VQ_LOG" | sed -n 's/.* requests \([0-9]*\).*/\1/p' | tail -1)
    resubmitted=$(cat "$TMP/$CASE"-virtq-blk-*.log | sed -n 's/.* \([0-9]*\) request(s) in flight before the restart.*/\1/p' | awk '{ s += $1 } END { print s + 0 }')
    tracked=$(grep -al 'requests tracked in the inflight area' "$TMP/$CASE"-virtq-blk-*.log | wc -l)
    DETAIL="killed after chunks $killed of $mib ($mid of 3 inside a write's fdatasync); $(vline g1 'stream' | sed 's/.*VIRTQ: //' | sed 's/, sha256.*//')"
    DETAIL+=", guest checksum $(vline g1 'stream' | awk '{ print ($(NF - 2) == $NF) ? "intact" : "DIFFERS" }'), host checksum $([[ $want == "$got" ]] && echo intact || echo DIFFERS)"
    DETAIL+="; inflight area used by $tracked of $((n + 1)) back-ends, $resubmitted request(s) in flight at a kill served again; the last back-end served ${requests:-?} requests"
    [[ $want == "$got" ]] || { DETAIL+="; the image lost data"; return 1; }
    ((tracked == n + 1)) || { DETAIL+="; INFLIGHT_SHMFD not in use"; return 1; }
    ((guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $stop"; return 1; }
}

# virtq-blk --read-only: the guest sees a read-only disk (VIRTIO_BLK_F_RO), reads what the host
# wrote, and cannot write; the image is unchanged afterwards.
case_blk_ro() {
    local sock=$TMP/$CASE.sock img=$TMP/$CASE.img log=$TMP/$CASE-g1.serial err before after
    rm -f "$img"
    # `yes` ends on SIGPIPE, which pipefail would count: its status is not checked, the size is.
    yes virtq-blk-ro | head -c 4194304 > "$img"
    (($(stat -c %s "$img") == 4194304)) && truncate -s 64M "$img" || { DETAIL="image"; return 1; }
    before=$(sha256sum < "$img" | cut -d' ' -f1)
    VQ_LOG=$TMP/$CASE-virtq-blk.log
    "$VIRTQ_BLK" --socket-path "$sock" --image "$img" --read-only > "$VQ_LOG" 2>&1 &
    VQ_PID=$!
    track "$VQ_PID"
    wait_for "socket" test -S "$sock" || { DETAIL="virtq-blk did not listen"; return 1; }
    qemu-system-x86_64 -accel tcg -cpu max -machine q35,memory-backend=mem -m 256M -smp 1 \
        -object "memory-backend-memfd,id=mem,size=256M,share=on" \
        -display none -nodefaults -no-reboot -serial "file:$log" \
        -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 loglevel=4 virtq.timeout=$((CASE_LIMIT - 20)) virtq.cmd=vt-blk-ro" \
        -chardev "socket,id=c0,path=$sock" -device vhost-user-blk-pci,chardev=c0 \
        > "$TMP/$CASE-g1.qemu" 2>&1 &
    GPID[g1]=$!
    GLOG[g1]=$log
    track "${GPID[g1]}"
    wait_guests g1
    err=$(check_guests g1)
    local guest_ok=$?
    vq_stop
    local stop_ok=$? stop=${STOP_ERR//virtq-net/virtq-blk}
    after=$(sha256sum < "$img" | cut -d' ' -f1)
    DETAIL="$(vline g1 'ro ' | sed 's/.*VIRTQ: //'); image $([[ $before == "$after" ]] && echo unchanged || echo CHANGED)"
    [[ $before == "$after" ]] || return 1
    ((guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $stop"; return 1; }
}

# NIC uplink (issue 18): a guest on a switch port and a host interface on the same switch
# (`--nic IF,mode=MODE`). IF is one end of a veth pair the case creates: virtq-net runs in one
# namespace with IF, the other end (10.0.0.1) is in a second namespace, with an iperf3 server.
# The guest pings the namespace, the namespace pings the guest, then iperf3 guest -> namespace
# and back (-R). mode=xdp: AF_XDP forced on the veth; the namespace's end sends no partial
# checksums (ethtool -K tx off, which also turns TSO off), as a wire would give, since XDP
# cannot say which frames carry one. mode=packet: AF_PACKET, with the namespace's offloads on
# (its TSO and partial-checksum frames arrive whole with their virtio-net header; the guest's
# TSO frames are segmented in software on the way out). PASS: every ping answered both ways,
# iperf3 rates both ways, `ctl stats` shows the NIC in the expected mode with rx and tx
# packets > 0, and virtq-net exits cleanly.
case_nic() {
    local mode=$1 sock=$TMP/$CASE.sock ctl=$TMP/$CASE.ctl err ok=1 vqns peerns
    mk_netns || { DETAIL="netns"; return 1; }
    vqns=$NS
    mk_netns || { DETAIL="netns"; return 1; }
    peerns=$NS
    # Created inside the namespaces: the names cannot clash with the host's interfaces.
    ip -n "$vqns" link add vqnic0 type veth peer name vqpeer0 netns "$peerns" || { DETAIL="veth"; return 1; }
    ip -n "$vqns" link set vqnic0 up && ip -n "$peerns" addr add 10.0.0.1/24 dev vqpeer0 \
        && ip -n "$peerns" link set vqpeer0 up || { DETAIL="veth set-up"; return 1; }
    if [[ $mode == xdp ]]; then
        ip netns exec "$peerns" ethtool -K vqpeer0 tx off > /dev/null || { DETAIL="ethtool -K tx off"; return 1; }
    fi
    ip netns exec "$peerns" iperf3 -s -p 5201 > "$TMP/$CASE-iperf3-server.log" 2>&1 &
    track $!
    vq_start "$TMP/$CASE-virtq-net.log" "$vqns" --control "$ctl" --socket-path "$sock" --nic "vqnic0,mode=$mode"
    wait_for "socket" test -S "$sock" || { DETAIL="virtq-net did not listen: $(tail -1 "$VQ_LOG")"; return 1; }
    guest name=g1 sock="$sock" mac=52:54:00:00:19:02 ip=10.0.0.2 \
        cmd="vt-ping 10.0.0.1 10 && vt-wait-echos 10 60 && vt-iperf 10.0.0.1 5 && vt-iperf 10.0.0.1 5 -R"
    local back
    back=$(ns_ping "$peerns" 10.0.0.2 10)
    local back_ok=$?
    wait_guests g1
    err=$(check_guests g1)
    local guest_ok=$?
    local stats nic
    stats=$("$VIRTQ_NET" ctl "$ctl" stats)
    echo "$stats" > "$TMP/$CASE-stats.json"
    CASE_LOGS+=("$TMP/$CASE-stats.json")
    # "MODE RX TX RX_DROPS TX_DROPS KERNEL_DROPS" of the NIC port, summed over its queues.
    nic=$(python3 -c '
import json, sys
v = json.loads(sys.argv[1])
n = [p for p in v["ports"] if p.get("type") == "nic"][0]
s = lambda k: sum(q[k] for q in n["queues"])
print(n["mode"].split(" ")[0], s("rx_packets"), s("tx_packets"), s("rx_drops"), s("tx_drops"), s("kernel_drops"))
' "$stats" 2> /dev/null)
    vq_stop
    local stop_ok=$? stop=$STOP_ERR
    local nmode nrx ntx nrxd ntxd nkd fwd rev
    read -r nmode nrx ntx nrxd ntxd nkd <<< "$nic"
    fwd=$(iperf_rate g1 '')
    rev=$(iperf_rate g1 -R)
    local want=af_$mode
    [[ $nmode == "$want" ]] || { ok=0; err+=" NIC mode ${nmode:-?}, not $want"; }
    ((${nrx:-0} > 0 && ${ntx:-0} > 0)) || { ok=0; err+=" NIC rx/tx ${nrx:-?}/${ntx:-?}"; }
    [[ -n $fwd && -n $rev ]] || { ok=0; err+=" no iperf3 result"; }
    DETAIL="$(sed -n 's/.*nic vqnic0 attached to the switch: \(.*\), [0-9]* queue.*/\1/p' "$VQ_LOG" | tail -1); guest->ns $(vline g1 'ping' | sed -n 's/.*: \([0-9]*\/[0-9]*\) replies.*/\1/p'), ns->guest $back"
    DETAIL+=", iperf3 guest->ns ${fwd:-none}, ns->guest ${rev:-none}; ctl stats: nic ${nmode:-?} rx ${nrx:-?} tx ${ntx:-?} drops rx/tx/kernel ${nrxd:-?}/${ntxd:-?}/${nkd:-?}"
    ((ok && back_ok == 0 && guest_ok == 0 && stop_ok == 0)) || { DETAIL+="; $err $stop"; return 1; }
}

# --- runner --------------------------------------------------------------------------------
MATRIX=(
    "tap|case_tap on"
    "tap-mrg-off|case_tap off"
    "tap-queues2|case_tap_queues2"
    "tap-offload|case_tap_offload on"
    "tap-offload-mrg-off|case_tap_offload off"
    "switch-qemu-client|case_switch client on"
    "switch-qemu-client-mrg-off|case_switch client off"
    "switch-qemu-server|case_switch server on"
    "switch-qemu-server-mrg-off|case_switch server off"
    "switch-queues2|case_switch client on 2 2"
    "switch-mq-combined1|case_switch_mq_combined1"
    "tap-mq-combined1|case_tap_mq_combined1"
    "poweroff-kill-new-guest|case_kill client"
    "poweroff-kill-new-guest-qemu-server|case_kill server"
    "iperf3|case_iperf3"
    "switch-offload|case_switch_offload"
    "packed|case_packed"
    "jumbo|case_jumbo"
    "runtime-ports|case_runtime_ports|240"
    "nic-xdp|case_nic xdp"
    "nic-packet|case_nic packet"
    "iperf3-vs-dpdk|case_iperf3_vs_dpdk|300"
    "migrate-dpdk|case_migrate dpdk client on"
    "migrate|case_migrate virtq client on"
    "migrate-mrg-off-rarp|case_migrate virtq client off off"
    "migrate-client|case_migrate virtq server on"
    "migrate-packed|case_migrate virtq client on on packed"
    "blk|case_blk"
    "blk-kill-restart|case_blk_kill"
    "blk-ro|case_blk_ro"
)
PASS=0
FAIL=0
SKIP=0
TP_FD=""
MIG_REPORT=()
ROWS=()
for entry in "${MATRIX[@]}"; do
    # NAME|FUNCTION ARGS[|MINIMUM CASE LIMIT IN SECONDS]
    IFS='|' read -r CASE fn min_limit <<< "$entry"
    case_selected "$CASE" || continue
    CASE_LIMIT=$CASE_TIMEOUT
    ((${min_limit:-0} > CASE_LIMIT)) && CASE_LIMIT=$min_limit
    CASE_PIDS=()
    CASE_LOGS=()
    GPID=()
    GLOG=()
    DETAIL=""
    SKIP_REASON=""
    t0=$(date +%s)
    DEADLINE=$((t0 + CASE_LIMIT))
    say "case $CASE"
    # shellcheck disable=SC2086
    # A case that cannot run here (SKIP_REASON set, returns 0) is a SKIP: neither passed nor failed.
    if $fn; then verdict=PASS; else verdict=FAIL; fi
    [[ $verdict == PASS && -n $SKIP_REASON ]] && verdict=SKIP DETAIL=$SKIP_REASON
    ((${#CASE_PIDS[@]})) && kill_pids "${CASE_PIDS[@]}"
    if [[ -n $TP_FD ]]; then
        exec {TP_FD}>&-
        TP_FD=""
    fi
    del_netns
    secs=$(($(date +%s) - t0))
    case $verdict in
        PASS) PASS=$((PASS + 1)) ;;
        SKIP) SKIP=$((SKIP + 1)) ;;
        *) FAIL=$((FAIL + 1)) ;;
    esac
    if ((secs >= CASE_LIMIT)); then DETAIL+=" [case timeout ${CASE_LIMIT}s]"; fi
    echo "case $CASE: $verdict (${secs}s; $DETAIL)"
    ROWS+=("| $CASE | $verdict | ${secs}s | ${DETAIL//|/\\|} |")
    if [[ $verdict == FAIL ]]; then
        for f in "$TMP/$CASE"-*.serial "$TMP/$CASE"-virtq-net.log "${CASE_LOGS[@]}"; do
            [[ -f $f ]] || continue
            echo "---- $(basename "$f") (last 15 lines)"
            tail -15 "$f" | tr -d '\r'
        done
    fi
done

TOTAL=$(($(date +%s) - T_START))
[[ -n $IPERF_REPORT ]] && echo "iperf3 through the switch: $IPERF_REPORT"
[[ -n $VS_REPORT ]] && printf '%s\n' "$VS_REPORT"
((${#MIG_REPORT[@]})) && printf 'live migration: %s\n' "${MIG_REPORT[@]}"
echo "guest matrix took ${TOTAL}s (logs in $GUEST_LOGDIR)"
if [[ -n ${GUEST_SUMMARY:-} ]]; then
    {
        echo "## Real guests (QEMU $(qemu-system-x86_64 --version | head -1 | awk '{ print $4 }'), TCG, Linux $(sed -n 's/^kernel \([^ ]*\).*/\1/p' "$GUEST_DIR/stamp"))"
        echo
        echo "| case | result | time | details |"
        echo "|---|---|---|---|"
        printf '%s\n' "${ROWS[@]}"
        echo
        [[ -n $IPERF_REPORT ]] && echo "iperf3 through the switch: $IPERF_REPORT" && echo
        [[ -n $VS_REPORT ]] && printf '%s\n\n' "$VS_REPORT"
        if ((${#MIG_REPORT[@]})); then
            printf -- '- live migration, %s\n' "${MIG_REPORT[@]}"
            echo
        fi
        echo "$PASS passed, $FAIL failed, $SKIP skipped in ${TOTAL}s"
    } > "$GUEST_SUMMARY"
fi
# ci/test.sh adds the first two numbers to its totals; a SKIP is in neither.
echo "guests: $PASS passed, $FAIL failed, $SKIP skipped"
((FAIL == 0))
