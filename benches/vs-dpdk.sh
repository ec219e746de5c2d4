#!/usr/bin/env bash
# virtq-net against DPDK's vhost back-end (testpmd `net_vhost`), both driven by the same real
# front-end: DPDK testpmd with `net_virtio_user`. In one invocation the two back-ends alternate
# A B A B … per case, so both see the same machine state; the table gives per case the median
# Mpps of each over the rounds, the spread (min–max) and the ratio virtq/DPDK of the medians,
# the median (and spread) of the ratios within each round (A and B back to back), the best
# round of each, and the medians of the rounds' averages.
#
# A round's rate is its best one-second window (its average is in the last columns and the
# TSV). The machine is a shared VM: the same pair of processes runs at about 5 or 15+ Mpps, in
# states that last seconds to minutes. What changes is how far apart the host puts the two
# vCPUs: `linelat` (benches/src/linelat.rs) measures a cache line's round trip between CPU 0
# and CPU 1 before and after every sample, and it reads about 50-120 ns or about 500 ns, with
# the rates following. So a median over a handful of rounds mixes states. A second table sorts
# the samples by state: `near` (both readings below the threshold), `far` (both at or above it)
# or `mixed` (the state changed during the sample), and compares the back-ends within a state,
# including the within-round ratio of rounds whose A and B samples ran in the same state. The
# threshold is the widest gap between the run's readings, if the reading above it is at least
# twice the one below (FAR_NS=... sets it). The state can also change and change back during a
# sample without either reading showing it, so `near` and `far` are likely, not certain.
#
#   benches/vs-dpdk.sh                      every case, 7 rounds of 5 one-second windows
#   ROUNDS=3 SECS=3 benches/vs-dpdk.sh      shorter
#   CASES='rx64-mrg tx64-mrg' ...           only these cases
#   PVP_BURSTS=4 ...                        frames circulating in the pvp cases, in bursts of 32
#   TSV=out.tsv ...                         also every round as TSV (case, backend, round, best,
#                                           average, round trip before and after in ns)
#   FAR_NS=300 ...                          threshold of the `far` state (default: the widest
#                                           gap between the run's readings, see above)
#   KEEP=1 ...                              keep the logs directory (printed)
#   VIRTQ_NET=path ...                      use this virtq-net binary (no build)
#   IR=1 ...                                instructions per frame instead of Mpps: each back-end
#                                           runs under `valgrind --tool=callgrind` (one round);
#                                           counters are zeroed after WARM s and dumped SECS s
#                                           later, divided by the frames the front-end counted
#                                           meanwhile. Wall time on a shared machine swings by
#                                           2-3x; instruction counts do not.
#   A=virtq=/tmp/old B=virtq ...            compare two virtq-net builds instead (A and B are
#                                           `dpdk`, `virtq` or `virtq=PATH`; defaults virtq, dpdk;
#                                           B=none runs A alone)
#
# Cases (front-end mode → what each back-end does):
#   tx<SIZE>-<mrg|nomrg>   guest TX: the front-end runs `txonly`; the back-end drains
#                          (virtq-net `--backend sink`, testpmd `rxonly`). Rate = front-end Tx-pps
#                          (frames the back-end freed ring space for).
#   rx<SIZE>-<mrg|nomrg>   guest RX: the front-end runs `rxonly`; the back-end generates SIZE-byte
#                          UDP frames (virtq-net `--backend source:SIZE`, testpmd `txonly`).
#                          Rate = front-end Rx-pps.
#   loop64-<mrg|nomrg>     the front-end runs `flowgen` (sends and counts what comes back); the
#                          back-end echoes (virtq-net `--backend reflect`, testpmd `io` with
#                          `--port-topology=loop`). Rate = front-end Rx-pps.
#   pvp64-<mrg|nomrg>      the same echo, but the front-end sends PVP_BURSTS bursts of 32 frames
#                          (`start tx_first`) and then forwards whatever comes back (`io`): a
#                          fixed population of frames circulates, and the front-end does the
#                          least work per frame (no allocation, no headers, no checksum), as
#                          in DPDK's PVP loopback tests. With `flowgen`, the loop cases spend
#                          the front-end's CPU on generating (virtq-net idles between its
#                          bursts in loop64-mrg-packed); here the back-end is the bottleneck.
#                          Rate = front-end Rx-pps. A frame dropped on the way leaves the
#                          population; each round starts anew.
# `mrg` sets the front-end's mrg_rxbuf (both back-ends offer MRG_RXBUF). A `-packed` suffix
# (e.g. rx64-mrg-packed) has the front-end use packed virtqueues (packed_vq=1; both back-ends
# offer VIRTIO_F_RING_PACKED). The front-end is otherwise as in ../shared/reference/peers.md:
# split ring, queue_size=256, in_order=1.
#
# Pinning: each back-end on CPU 0 (testpmd's main and forwarding lcores both there; virtq-net's
# control and data threads both there), the front-end on CPU 1. Both back-ends busy-poll.
# Measurement: `start`, WARM seconds, `show port stats 0` (testpmd's pps baseline), then SECS
# times: one second, `show port stats 0` (testpmd computes the pps since the previous `show`
# from its TSC).
#
# For virtq-net, each round's line also gives its data-plane thread's busy share and the frames
# per non-empty burst over the windows (`virtq-net ctl ... stats`): a back-end that is the
# bottleneck is busy throughout; one that idles between full bursts waits for the front-end,
# and making it cheaper per frame does not raise the rate.
#
# Needs dpdk-testpmd (installs dpdk-dev if missing) and 2 CPUs. Every process started is ended
# by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

IR=${IR:-0}
if [[ $IR == 1 ]]; then
    ROUNDS=1 SECS=${SECS:-8} WARM=${WARM:-3}
    command -v valgrind > /dev/null || { echo "vs-dpdk: IR=1 needs valgrind" >&2; exit 2; }
fi
ROUNDS=${ROUNDS:-7}
SECS=${SECS:-5}
WARM=${WARM:-1}
PVP_BURSTS=${PVP_BURSTS:-4}
ALL_CASES="tx64-mrg tx64-nomrg rx64-mrg rx64-nomrg tx1518-mrg tx1518-nomrg rx1518-mrg rx1518-nomrg loop64-mrg loop64-nomrg"
ALL_CASES+=" tx64-mrg-packed rx64-mrg-packed rx64-nomrg-packed tx1518-mrg-packed rx1518-mrg-packed loop64-mrg-packed"
ALL_CASES+=" pvp64-mrg pvp64-mrg-packed"
CASES=${CASES:-$ALL_CASES}
TSV=${TSV:-}
FAR_NS=${FAR_NS:-}

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
if ! command -v dpdk-testpmd > /dev/null; then
    echo "vs-dpdk: installing dpdk-dev (dpdk-testpmd)" >&2
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dpdk-dev
fi
TESTPMD=$(command -v dpdk-testpmd)
if (($(nproc) < 2)); then
    echo "vs-dpdk: needs 2 CPUs (back-end and front-end each on its own)" >&2
    exit 2
fi

if [[ -z ${VIRTQ_NET:-} ]]; then
    cargo build --release --locked -p virtq-net
    VIRTQ_NET=${CARGO_TARGET_DIR:-target}/release/virtq-net
fi
if [[ -z ${LINELAT:-} ]]; then
    cargo build --release --locked -p virtq-benches --bin linelat
    LINELAT=${CARGO_TARGET_DIR:-target}/release/linelat
fi
A=${A:-virtq}
B=${B:-dpdk}

BE_CPU=0 FE_CPU=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/virtq-vs-dpdk.XXXXXX")
PIDS=()
PREFIXES=()
FIFO_FD=""
# shellcheck source=../ci/lib/processes.sh
source ci/lib/processes.sh

cleanup() {
    local pid
    if [[ -n $FIFO_FD ]]; then exec {FIFO_FD}>&- || true; fi
    for pid in "${PIDS[@]}"; do stop_pid "$pid" INT; done
    remove_dpdk_runtime "${PREFIXES[@]}"
    if [[ -n ${KEEP:-} ]]; then echo "vs-dpdk: logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# packets_of LOG FIELD N: RX-packets or TX-packets of the N-th `show port stats` in LOG.
packets_of() {
    awk -v f="$2:" -v n="$3" '/NIC statistics for port 0/ { k++ } k == n { for (i = 1; i < NF; i++) if ($i == f) { print $(i + 1); exit } }' "$1"
}

# round_trip: the cache line round trip between the two CPUs in ns (`-` if linelat failed).
round_trip() { "$LINELAT" "$BE_CPU" "$FE_CPU" || echo -; }

# sample CASE BACKEND ROUND: one measurement into $RESULT ("best average rtt_before rtt_after"
# in Mpps and ns, or Ir/frame with IR=1); runs in the main shell (not in a command
# substitution) so that cleanup knows every PID it started.
sample() {
    local case=$1 be=$2 round=$3
    local dir=$WORK/$case-${be//[^a-z0-9]/_}-$round sock be_pid fe_pid fe_mode size mrg field prefix
    local rtt_before=- rtt_after=-
    mkdir -p "$dir"
    if [[ $IR != 1 ]]; then rtt_before=$(round_trip); fi
    sock=$dir/vu.sock
    [[ $case =~ ^(tx|rx|loop|pvp)([0-9]+)-(mrg|nomrg)(-packed)?$ ]] || { echo "unknown case $case" >&2; return 1; }
    local kind=${BASH_REMATCH[1]} packed=0
    size=${BASH_REMATCH[2]}
    mrg=0
    [[ ${BASH_REMATCH[3]} == mrg ]] && mrg=1
    [[ -n ${BASH_REMATCH[4]} ]] && packed=1
    local vq_backend dpdk_mode counter
    case $kind in
        tx) fe_mode=txonly field=Tx-pps counter=TX-packets vq_backend=sink dpdk_mode=rxonly ;;
        rx) fe_mode=rxonly field=Rx-pps counter=RX-packets vq_backend=source:$size dpdk_mode=txonly ;;
        loop) fe_mode=flowgen field=Rx-pps counter=RX-packets vq_backend=reflect dpdk_mode=io ;;
        pvp) fe_mode=io field=Rx-pps counter=RX-packets vq_backend=reflect dpdk_mode=io ;;
    esac
    local wrap=()
    if [[ $IR == 1 ]]; then wrap=(valgrind --tool=callgrind --compress-strings=no "--callgrind-out-file=$dir/callgrind.out"); fi

    if [[ $be == virtq* ]]; then
        local bin=$VIRTQ_NET
        [[ $be == virtq=* ]] && bin=${be#virtq=}
        taskset -c "$BE_CPU" "${wrap[@]}" "$bin" --socket-path "$sock" --backend "$vq_backend" --busy-poll \
            --control "$dir/ctl" --log-level warn > "$dir/backend.log" 2>&1 &
    else
        prefix=virtq-vsd-$$-be-$case-$round
        PREFIXES+=("$prefix")
        taskset -c "$BE_CPU" "${wrap[@]}" "$TESTPMD" --lcores "0@$BE_CPU,1@$BE_CPU" --no-huge -m 1024 \
            --file-prefix="$prefix" --no-pci --no-telemetry --vdev "net_vhost0,iface=$sock,queues=1,client=0" -- \
            --forward-mode="$dpdk_mode" --port-topology=loop --txpkts="$size" --total-num-mbufs=32768 \
            --rxq=1 --txq=1 --nb-cores=1 --stats-period 3600 < /dev/null > "$dir/backend.log" 2>&1 &
    fi
    be_pid=$!
    PIDS+=("$be_pid")
    if ! wait_socket "$sock" || ! kill -0 "$be_pid" 2> /dev/null; then
        stop_pid "$be_pid" INT
        return 1
    fi

    prefix=virtq-vsd-$$-fe-$case-$round-$RANDOM
    PREFIXES+=("$prefix")
    mkfifo "$dir/cmd"
    exec {FIFO_FD}<> "$dir/cmd"
    stdbuf -oL "$TESTPMD" --lcores "0@$FE_CPU,1@$FE_CPU" --no-huge -m 1024 --file-prefix="$prefix" --no-pci \
        --no-telemetry \
        --vdev "net_virtio_user0,path=$sock,queues=1,queue_size=256,mrg_rxbuf=$mrg,in_order=1,packed_vq=$packed,server=0" \
        -- -i --forward-mode="$fe_mode" --txpkts="$size" --total-num-mbufs=32768 --rxq=1 --txq=1 --nb-cores=1 \
        < "$dir/cmd" > "$dir/frontend.log" 2>&1 &
    fe_pid=$!
    PIDS+=("$fe_pid")
    local ok=1
    wait_for "$dir/frontend.log" 'testpmd>' 1 30 "$fe_pid" "$be_pid" || ok=0
    if ((ok)); then
        if [[ $kind == pvp ]]; then
            printf 'start tx_first %d\n' "$PVP_BURSTS" >&"$FIFO_FD"
        else
            printf 'start\n' >&"$FIFO_FD"
        fi
        sleep "$WARM"
        if [[ $IR == 1 ]]; then callgrind_control -z "$be_pid" > /dev/null 2>&1 || ok=0; fi
        # virtq-net's own counters around the windows (its data-plane thread's busy and idle
        # cycles, its rings' bursts): is the back-end the bottleneck? Asked on the back-end's
        # CPU, outside the windows.
        if [[ $be == virtq* && $IR != 1 ]]; then
            taskset -c "$BE_CPU" "$bin" ctl "$dir/ctl" stats > "$dir/stats1.json" 2> /dev/null || true
        fi
        printf 'show port stats 0\n' >&"$FIFO_FD"
        wait_for "$dir/frontend.log" 'NIC statistics for port 0' 1 10 "$fe_pid" || ok=0
    fi
    if ((ok)) && [[ $IR == 1 ]]; then
        sleep "$SECS"
        callgrind_control -d "$be_pid" > /dev/null 2>&1 || ok=0
        printf 'show port stats 0\n' >&"$FIFO_FD"
        wait_for "$dir/frontend.log" 'NIC statistics for port 0' 2 10 "$fe_pid" || ok=0
    elif ((ok)); then
        # One-second windows: testpmd's pps is over the time since the previous `show`.
        local w
        for ((w = 1; w <= SECS && ok; w++)); do
            sleep 1
            printf 'show port stats 0\n' >&"$FIFO_FD"
            wait_for "$dir/frontend.log" 'NIC statistics for port 0' $((w + 1)) 10 "$fe_pid" || ok=0
        done
        if [[ $be == virtq* ]]; then
            taskset -c "$BE_CPU" "$bin" ctl "$dir/ctl" stats > "$dir/stats2.json" 2> /dev/null || true
        fi
    fi
    if ((ok)); then printf 'stop\nquit\n' >&"$FIFO_FD"; fi
    stop_pid "$fe_pid" INT
    exec {FIFO_FD}>&-
    FIFO_FD=""
    stop_pid "$be_pid" INT
    ((ok)) || return 1
    if [[ $IR != 1 ]]; then rtt_after=$(round_trip); fi
    if [[ $IR == 1 ]]; then
        local ir p1 p2
        ir=$(awk '/^totals:/ { print $2 }' "$dir/callgrind.out.1" 2> /dev/null)
        p1=$(packets_of "$dir/frontend.log" "$counter" 1)
        p2=$(packets_of "$dir/frontend.log" "$counter" 2)
        [[ -n $ir && -n $p1 && -n $p2 ]] && ((p2 > p1)) || return 1
        RESULT=$(awk -v i="$ir" -v n=$((p2 - p1)) 'BEGIN { printf "%.1f\n", i / n }')
        return 0
    fi
    # The best window and the average of all windows, in Mpps.
    RESULT=$(awk -v f="$field:" '/NIC statistics for port 0/ { k++ }
        k >= 2 { for (i = 1; i < NF; i++) if ($i == f) { v = $(i + 1) / 1e6; s += v; n++; if (v > b) b = v } }
        END { if (n) printf "%.3f %.3f", b, s / n }' "$dir/frontend.log")
    [[ -n $RESULT ]] && RESULT+=" $rtt_before $rtt_after"
    if [[ -s $dir/stats1.json && -s $dir/stats2.json ]]; then BUSY=$(busy_of "$dir/stats1.json" "$dir/stats2.json"); fi
}

# stat_sums FILE: busy and idle cycles, bursts and packets, summed over a `virtq-net ctl ...
# stats` reply's threads and rings.
stat_sums() {
    grep -o '"\(busy\|idle\|bursts\|packets\)":[0-9]*' "$1" |
        awk -F'[":]+' '{ s[$2] += $3 } END { printf "%.0f %.0f %.0f %.0f", s["busy"], s["idle"], s["bursts"], s["packets"] }'
}

# busy_of BEFORE AFTER: from two stats replies, the share of the data-plane thread's cycles
# spent on passes that moved frames, and the frames per non-empty burst over all rings ("83%
# busy, 32.0 frames per burst"); empty if they cannot be read. A back-end that is the
# bottleneck is busy all the time; one with idle passes waits for the front-end.
busy_of() {
    local b1 i1 u1 p1 b2 i2 u2 p2
    read -r b1 i1 u1 p1 <<< "$(stat_sums "$1")"
    read -r b2 i2 u2 p2 <<< "$(stat_sums "$2")"
    awk -v b=$((b2 - b1)) -v i=$((i2 - i1)) -v u=$((u2 - u1)) -v p=$((p2 - p1)) \
        'BEGIN { if (b + i > 0 && u > 0) printf "%.0f%% busy, %.1f frames per burst", 100 * b / (b + i), p / u }'
}

# median/min/max of numbers on stdin
stats() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "- - -"; exit } m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.2f %.2f %.2f\n", m, v[1], v[NR] }'; }

# Every sample, for the report by machine state (and the TSV).
ALL=$WORK/samples.tsv
printf 'case\tbackend\tround\tvalue\taverage\trtt_before_ns\trtt_after_ns\tside\n' > "$ALL"
declare -A SAMPLES AVERAGES PAIRED
FAILED=0
UNIT=Mpps
if [[ $IR == 1 ]]; then UNIT="Ir/frame"; fi
echo "vs-dpdk: $ROUNDS rounds × ${SECS}s per back-end and case ($UNIT); back-end on CPU $BE_CPU, front-end on CPU $FE_CPU" >&2
for case in $CASES; do
    for ((r = 1; r <= ROUNDS; r++)); do
        a_value=""
        for side in A B; do
            be=${!side}
            [[ $be == none ]] && continue
            RESULT="" BUSY=""
            if sample "$case" "$be" "$r" && [[ -n $RESULT ]]; then
                read -r v avg rb ra <<< "$RESULT"
                SAMPLES[$case/$side]+="$v "
                AVERAGES[$case/$side]+="${avg:-$v} "
                # The ratio within a round: A and B ran back to back, so a slow drift of the
                # machine's state affects both alike.
                if [[ $side == A ]]; then
                    a_value=$v
                elif [[ -n $a_value ]]; then
                    PAIRED[$case]+="$(awk -v a="$a_value" -v b="$v" 'BEGIN { if (b > 0) printf "%.4f", a / b }') "
                fi
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$case" "$be" "$r" "$v" "${avg:-$v}" "${rb:--}" "${ra:--}" \
                    "$side" >> "$ALL"
                echo "  $case round $r $be: $v $UNIT${avg:+ (average $avg)}${rb:+ (round trip $rb → $ra ns)}${BUSY:+ (virtq-net $BUSY)}" >&2
            else
                FAILED=$((FAILED + 1))
                echo "  $case round $r $be: FAILED" >&2
            fi
        done
    done
done

# by_state: the second table, the samples of $ALL sorted by the machine's state (see the top).
by_state() {
    awk -F '\t' -v far="$FAR_NS" -v cases="$CASES" -v la="$(label "$A")" -v lb="$(label "$B")" '
        function median(list, n, i, j, t, v) {
            n = split(list, v, " ")
            for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
            if (n == 0) return "-"
            return (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
        }
        function spread(list, n, i, v, lo, hi) {
            n = split(list, v, " ")
            for (i = 1; i <= n; i++) { if (i == 1 || v[i] + 0 < lo) lo = v[i] + 0; if (i == 1 || v[i] + 0 > hi) hi = v[i] + 0 }
            return sprintf("%.2f–%.2f", lo, hi)
        }
        function state(rb, ra) {
            if (rb == "-" || ra == "-") return "unknown"
            if (rb + 0 < far && ra + 0 < far) return "near"
            if (rb + 0 >= far && ra + 0 >= far) return "far"
            return "mixed"
        }
        NR > 1 { n++; c[n] = $1; r[n] = $3; v[n] = $4; rb[n] = $6; ra[n] = $7; side[n] = $8
            if ($6 != "-") t[++nt] = $6 + 0
            if ($7 != "-") t[++nt] = $7 + 0 }
        END {
            if (nt == 0) { print "\n(no round trips measured: no table by machine state)"; exit }
            # The threshold: the widest gap between readings, if the reading above it is at
            # least twice the one below (otherwise a single state).
            for (i = 2; i <= nt; i++) for (j = i; j > 1 && t[j - 1] > t[j]; j--) { x = t[j]; t[j] = t[j - 1]; t[j - 1] = x }
            if (far == "") {
                far = 1e18; best = 2
                for (i = 1; i < nt; i++) if (t[i] > 0 && t[i + 1] / t[i] >= best) { best = t[i + 1] / t[i]; far = t[i + 1] }
            }
            for (i = 1; i <= n; i++) {
                st[i] = state(rb[i], ra[i]); k = c[i] SUBSEP st[i] SUBSEP side[i]
                vals[k] = vals[k] " " v[i]; cnt[k]++
                if (side[i] == "A") a_of[c[i] SUBSEP r[i]] = i; else b_of[c[i] SUBSEP r[i]] = i
            }
            for (key in a_of) if (key in b_of) {
                ia = a_of[key]; ib = b_of[key]
                if (st[ia] == st[ib] && v[ib] > 0) { k = c[ia] SUBSEP st[ia]; pairs[k] = pairs[k] " " v[ia] / v[ib]; np[k]++ }
            }
            if (far < 1e18) printf "\nBy machine state: cache line round trip CPU 0 <-> CPU 1 before and after each sample, %d–%d ns; far = at least %d ns.\n\n", t[1], t[nt], far
            else printf "\nBy machine state: cache line round trip CPU 0 <-> CPU 1 before and after each sample, %d–%d ns: one state.\n\n", t[1], t[nt]
            printf "| case | state | %s: rounds, median Mpps (spread) | %s: rounds, median (spread) | ratio of medians | ratio within a round, both in this state: median (spread), rounds |\n", la, lb
            print "|---|---|---:|---:|---:|---:|"
            nc = split(cases, cs, " "); ns = split("near far mixed unknown", sts, " ")
            for (i = 1; i <= nc; i++) for (j = 1; j <= ns; j++) {
                ka = cs[i] SUBSEP sts[j] SUBSEP "A"; kb = cs[i] SUBSEP sts[j] SUBSEP "B"; kp = cs[i] SUBSEP sts[j]
                if (!cnt[ka] && !cnt[kb]) continue
                ma = median(vals[ka]); mb = median(vals[kb])
                ra_ = (ma != "-" && mb != "-" && mb > 0) ? sprintf("%.2f", ma / mb) : "-"
                pr = np[kp] ? sprintf("%.2f (%s), %d", median(pairs[kp]), spread(pairs[kp]), np[kp]) : "-"
                printf "| %s | %s | %d, %s | %d, %s | %s | %s |\n", cs[i], sts[j],
                    cnt[ka], cnt[ka] ? sprintf("%.2f (%s)", ma, spread(vals[ka])) : "-",
                    cnt[kb], cnt[kb] ? sprintf("%.2f (%s)", mb, spread(vals[kb])) : "-", ra_, pr
            }
        }' "$ALL"
}

echo
label() { case $1 in dpdk) echo "DPDK net_vhost" ;; virtq) echo "virtq-net" ;; *) echo "$1" ;; esac; }
med() { tr ' ' '\n' <<< "$1" | grep . | stats; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }
if [[ $IR == 1 ]]; then
    printf '| case | %s Ir/frame | %s Ir/frame | ratio A/B |\n|---|---:|---:|---:|\n' "$(label "$A")" "$(label "$B")"
    for case in $CASES; do
        read -r vm _ _ < <(med "${SAMPLES[$case/A]:-}")
        read -r dm _ _ < <(med "${SAMPLES[$case/B]:-}")
        printf '| %s | %s | %s | %s |\n' "$case" "$vm" "$dm" "$(ratio "$vm" "$dm")"
    done
else
    printf '| case | %s Mpps: median of best 1-s windows (spread) | %s Mpps (spread) | ratio of medians A/B | ratio A/B within a round: median (spread) | best of all rounds: %s | %s | ratio | median of averages: %s | %s |\n' \
        "$(label "$A")" "$(label "$B")" "$(label "$A")" "$(label "$B")" "$(label "$A")" "$(label "$B")"
    printf '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
    for case in $CASES; do
        read -r vm vmin vmax < <(med "${SAMPLES[$case/A]:-}")
        read -r dm dmin dmax < <(med "${SAMPLES[$case/B]:-}")
        read -r va _ _ < <(med "${AVERAGES[$case/A]:-}")
        read -r da _ _ < <(med "${AVERAGES[$case/B]:-}")
        read -r pm pmin pmax < <(med "${PAIRED[$case]:-}")
        printf '| %s | %s (%s–%s) | %s (%s–%s) | %s | %s (%s–%s) | %s | %s | %s | %s | %s |\n' "$case" "$vm" "$vmin" "$vmax" \
            "$dm" "$dmin" "$dmax" "$(ratio "$vm" "$dm")" "$pm" "$pmin" "$pmax" "$vmax" "$dmax" "$(ratio "$vmax" "$dmax")" \
            "$va" "$da"
    done
    by_state
fi
[[ -n $TSV ]] && cp "$ALL" "$TSV"
if ((FAILED)); then
    echo "vs-dpdk: $FAILED sample(s) failed" >&2
    exit 1
fi
