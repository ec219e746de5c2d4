# Shell helpers shared by the scripts that start DPDK testpmd and virtq-net processes
# (ci/peer-testpmd.sh, benches/vs-dpdk.sh, benches/footprint.sh). Source it; it defines
# functions only. Every process is ended by the PID its script recorded, never by name.

# stop_pid PID SIGNAL: sends SIGNAL, waits up to 5 s, then SIGKILL; reaps the process.
stop_pid() {
    local pid=$1 sig=$2 i
    kill -0 "$pid" 2> /dev/null || return 0
    kill "-$sig" "$pid" 2> /dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2> /dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2> /dev/null; then
        echo "    (PID $pid ignored SIG$sig; killing it)" >&2
        kill -KILL "$pid" 2> /dev/null || true
    fi
    wait "$pid" 2> /dev/null || true
}

# wait_for FILE REGEX COUNT TIMEOUT_S [PID...]: until REGEX matches COUNT lines of FILE; fails
# (with a line on stderr) if the time runs out or one of the PIDs (the processes the wait
# depends on) exits.
wait_for() {
    local file=$1 re=$2 count=$3 timeout=$4 i n pid
    shift 4
    for ((i = 0; i < timeout * 20; i++)); do
        n=$(grep -c -- "$re" "$file" 2> /dev/null || true)
        if ((n >= count)); then return 0; fi
        for pid in "$@"; do
            if ! kill -0 "$pid" 2> /dev/null; then
                echo "    (PID $pid exited while waiting for '$re' in $file)" >&2
                return 1
            fi
        done
        sleep 0.05
    done
    echo "    (timed out after ${timeout}s waiting for '$re' in $file)" >&2
    return 1
}

# remove_dpdk_runtime PREFIX...: removes the runtime directories DPDK created for these
# --file-prefix values.
remove_dpdk_runtime() {
    local p
    for p in "$@"; do
        rm -rf "/var/run/dpdk/$p" "${XDG_RUNTIME_DIR:-/tmp}/dpdk/$p" "/tmp/dpdk/$p"
    done
}

# make_nic_veth NS_A NS_B: two fresh network namespaces (IPv6 off, lo up) joined by a veth
# pair, `vqnic0` in NS_A and `vqpeer0` in NS_B, both up: the NIC of the NIC-uplink tests and
# benchmarks. The namespaces are added to the caller's NETNS array (delete them on exit).
make_nic_veth() {
    local ns
    for ns in "$1" "$2"; do
        ip netns add "$ns"
        NETNS+=("$ns")
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
        ip -n "$ns" link set lo up
    done
    ip -n "$1" link add vqnic0 type veth peer name vqpeer0 netns "$2"
    ip -n "$1" link set vqnic0 up
    ip -n "$2" link set vqpeer0 up
}

# wait_socket PATH [SECONDS]: until a socket file exists at PATH (default: 60 s); prints why
# and fails otherwise.
wait_socket() {
    local i tries=$((${2:-60} * 20))
    for ((i = 0; i < tries; i++)); do
        [[ -S $1 ]] && return 0
        sleep 0.05
    done
    echo "    (no socket at $1)" >&2
    return 1
}
