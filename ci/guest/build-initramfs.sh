#!/usr/bin/env bash
# Builds the test guest for ci/guest/run-matrix.sh: a busybox-static initramfs with Debian's
# virtio-net and virtio-blk modules, ext4, iperf3, ethtool and mkfs.ext4, plus the uncompressed kernel (vmlinux, PVH entry), which boots
# several seconds faster than the bzImage under TCG.
#
#   ci/guest/build-initramfs.sh OUTDIR
#
# Writes OUTDIR/vmlinux, OUTDIR/initramfs.cpio and OUTDIR/stamp. Reruns with the same kernel,
# busybox, iperf3, ethtool and this script reuse them. Installs its Debian packages if missing (as root,
# or through sudo). Env: KVER=6.1.0-NN-amd64 picks a kernel among those installed.
#
# The guest's /init reads these kernel command line parameters:
#   virtq.ip=ADDR/PREFIX   address of eth0 (required for networking; without it eth0 is not
#                          waited for, as in the block cases, whose guest has no NIC)
#   virtq.mtu=N            MTU of eth0
#   virtq.arp=IP@MAC       a static neighbour entry (repeatable)
#   virtq.cmd="..."        the test command (sh -c); its exit status gives the verdict
#   virtq.timeout=SECS     kills the test command after SECS (default 120)
# and prints `VIRTQ: ...` progress lines, then `RESULT: PASS` or `RESULT: FAIL (...)` on the
# serial console, then powers off. Helpers inside the guest (see the heredocs below):
#   vt-wait-peer IP [SECS]          ping once a second until IP answers
#   vt-ping IP COUNT [MIN]          vt-wait-peer, then COUNT pings 0.2 s apart; needs MIN replies
#   vt-wait-echos N [SECS] [QUIET]  waits until N echo requests were answered and none came in
#                                   the last QUIET seconds (the peer finished pinging us)
#   vt-iperf IP SECS [ARGS]         iperf3 client, retrying the connect until the server is up
#   vt-channels N                   ethtool -L eth0 combined N, checked with ethtool -l
#   vt-blk                          the block test on /dev/vda (see its heredoc)
#   vt-blk-stream [MIB]             a streamed write to /dev/vda, read back and compared
#   vt-blk-ro                       /dev/vda read-only: contents checked, a write refused
set -euo pipefail

OUT=${1:?usage: build-initramfs.sh OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
log() { printf '== build-initramfs: %s\n' "$*" >&2; }

# --- packages --------------------------------------------------------------------------------
need=()
ls /boot/vmlinuz-* > /dev/null 2>&1 || need+=(linux-image-amd64)
# busybox-static, not the dynamic busybox (both install /bin/busybox): ldd fails on a static one.
if [[ ! -x /bin/busybox ]] || ldd /bin/busybox > /dev/null 2>&1; then need+=(busybox-static); fi
command -v cpio > /dev/null || need+=(cpio)
command -v iperf3 > /dev/null || need+=(iperf3)
command -v ethtool > /dev/null || need+=(ethtool)
command -v mke2fs > /dev/null || need+=(e2fsprogs)
command -v xz > /dev/null || need+=(xz-utils)
command -v zstd > /dev/null || need+=(zstd)
command -v ldd > /dev/null || need+=(libc-bin)
if ((${#need[@]})); then
    log "installing ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" > /dev/null
fi

# --- kernel ----------------------------------------------------------------------------------
if [[ -z ${KVER:-} ]]; then
    KVER=""
    for d in $(ls -d /lib/modules/* 2>/dev/null | sort -V); do
        v=$(basename "$d")
        [[ -f /boot/vmlinuz-$v && -f $d/modules.dep ]] && KVER=$v
    done
fi
[[ -n $KVER && -f /boot/vmlinuz-$KVER ]] || { echo "no kernel with modules found in /boot and /lib/modules" >&2; exit 1; }
MODDIR=/lib/modules/$KVER
BUSYBOX=/bin/busybox
IPERF=$(command -v iperf3)
ETHTOOL=$(command -v ethtool)
MKE2FS=$(command -v mke2fs)

key() {
    echo "kernel $KVER $(stat -c %s /boot/vmlinuz-"$KVER")"
    "$BUSYBOX" 2>&1 | head -1
    dpkg-query -W -f '${Package} ${Version}\n' iperf3 libiperf0 ethtool libmnl0 e2fsprogs 2>/dev/null || true
    sha256sum "$HERE/build-initramfs.sh" | cut -d' ' -f1
}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
KEY=$(key)
if [[ -f $OUT/stamp && -s $OUT/vmlinux && -s $OUT/initramfs.cpio ]] && [[ $(cat "$OUT/stamp") == "$KEY" ]]; then
    log "up to date in $OUT ($KVER)"
    exit 0
fi
rm -f "$OUT/stamp"

# --- vmlinux: the ELF inside the bzImage -----------------------------------------------------
# As the kernel's scripts/extract-vmlinux: find each compressed-stream signature, decompress
# from there, keep the first result that is an ELF file.
VMLINUZ=/boot/vmlinuz-$KVER
if [[ ! -r $VMLINUZ ]]; then
    # Debian installs /boot/vmlinuz-* mode 0600.
    $SUDO cat "$VMLINUZ" > "$OUT/vmlinuz.tmp"
    VMLINUZ=$OUT/vmlinuz.tmp
fi
is_elf() { [[ $(head -c 4 "$1" | od -An -c | tr -d ' ') == '177ELF' ]]; }
extract() { # MAGIC-REGEX DECOMPRESSOR...
    local magic=$1 off
    shift
    for off in $(LC_ALL=C grep -obUaP "$magic" "$VMLINUZ" | cut -d: -f1); do
        tail -c +$((off + 1)) "$VMLINUZ" | "$@" > "$OUT/vmlinux.tmp" 2> /dev/null || true
        if [[ -s $OUT/vmlinux.tmp ]] && is_elf "$OUT/vmlinux.tmp"; then
            return 0
        fi
    done
    return 1
}
log "extracting vmlinux from $VMLINUZ"
extract '\xFD7zXZ\x00' xz -dc \
    || extract '\x28\xb5\x2f\xfd' zstd -dc \
    || extract '\x1f\x8b\x08' gzip -dc \
    || extract '\x5d\x00\x00\x00' xz -dc --format=lzma \
    || { echo "could not extract vmlinux from $VMLINUZ" >&2; exit 1; }
mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
rm -f "$OUT/vmlinuz.tmp"
# QEMU boots an ELF kernel only through its PVH note (CONFIG_PVH); otherwise use the bzImage.
if ! grep -q '^CONFIG_PVH=y' "/boot/config-$KVER" 2>/dev/null; then
    log "no PVH note: using the bzImage"
    $SUDO cat "/boot/vmlinuz-$KVER" > "$OUT/vmlinux"
fi

# --- initramfs tree --------------------------------------------------------------------------
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/virtq-initramfs.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,lib/modules,lib64,proc,sys,dev,tmp,run,etc,root}

cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [[ $applet == busybox ]] || ln -sf busybox "$ROOT/bin/$applet"
done

# Modules in load order: a depth-first walk of modules.dep, dependencies first.
declare -A DEP SEEN
while IFS= read -r line; do
    m=${line%%:*}
    DEP[$m]=${line#*:}
done < "$MODDIR/modules.dep"
ORDER=()
walk() {
    local path=$1 d
    [[ -n ${SEEN[$path]:-} ]] && return
    SEEN[$path]=1
    for d in ${DEP[$path]}; do walk "$d"; done
    ORDER+=("$path")
}
# virtio_blk, ext4 (and crc32c, which ext4 asks the crypto API for) for the block cases.
for want in virtio_pci virtio_net virtio_blk crc32c_generic ext4; do
    path=""
    for k in "${!DEP[@]}"; do
        if [[ $(basename "$k") =~ ^$want\.ko(\.(xz|zst|gz))?$ ]]; then path=$k; fi
    done
    if [[ -z $path ]]; then
        # Built in (=y): nothing to load.
        grep -q "/$want.ko" "$MODDIR/modules.builtin" 2>/dev/null || { echo "module $want not found for $KVER" >&2; exit 1; }
        continue
    fi
    walk "$path"
done
: > "$ROOT/lib/modules/load.order"
for path in "${ORDER[@]}"; do
    name=$(basename "$path")
    case $name in
        *.ko.xz) xz -dc "$MODDIR/$path" > "$ROOT/lib/modules/${name%.xz}" ;;
        *.ko.zst) zstd -qdc "$MODDIR/$path" > "$ROOT/lib/modules/${name%.zst}" ;;
        *.ko.gz) gzip -dc "$MODDIR/$path" > "$ROOT/lib/modules/${name%.gz}" ;;
        *) cp "$MODDIR/$path" "$ROOT/lib/modules/$name" ;;
    esac
    name=${name%.xz}
    name=${name%.zst}
    echo "${name%.gz}" >> "$ROOT/lib/modules/load.order"
done
log "modules: $(tr '\n' ' ' < "$ROOT/lib/modules/load.order")"

# iperf3 and ethtool (busybox has no channel settings: `ethtool -L` sets the guest's queue pairs),
# mke2fs (busybox's makes only ext2) and the shared libraries they link (from the installed .debs).
for bin in "$IPERF" "$ETHTOOL" "$MKE2FS"; do
    cp "$bin" "$ROOT/usr/bin/$(basename "$bin")"
    ldd "$bin" | awk '/=>/ { print $3 } /^\t\/[^ ]*ld-linux/ { print $1 }' | while read -r lib; do
        [[ -f $lib ]] || continue
        mkdir -p "$ROOT$(dirname "$lib")"
        cp -L "$lib" "$ROOT$lib"
    done
done
ln -sf mke2fs "$ROOT/usr/bin/mkfs.ext4"
[[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$ROOT/etc/"
# The dynamic loader at its canonical path, whichever directory ldd named.
[[ -e $ROOT/lib64/ld-linux-x86-64.so.2 ]] || cp -L /lib64/ld-linux-x86-64.so.2 "$ROOT/lib64/"
echo "root:x:0:0:root:/root:/bin/sh" > "$ROOT/etc/passwd"
echo "root:x:0:" > "$ROOT/etc/group"
printf '127.0.0.1 localhost\n' > "$ROOT/etc/hosts"

cat > "$ROOT/init" << 'EOF'
#!/bin/sh
# virtq test guest: bring up eth0 from the kernel command line, run virtq.cmd, report, power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
exec < /dev/console > /dev/console 2>&1
mount -t tmpfs tmp /tmp

finish() {
    echo "RESULT: $*"
    sync
    poweroff -f
    sleep 2
    reboot -f
}

IP="" MTU="" ARPS="" CMD="true" TIMEOUT=120
eval "set -- $(cat /proc/cmdline)"
for a in "$@"; do
    case "$a" in
        virtq.ip=*) IP=${a#*=} ;;
        virtq.mtu=*) MTU=${a#*=} ;;
        virtq.arp=*) ARPS="$ARPS ${a#*=}" ;;
        virtq.cmd=*) CMD=${a#*=} ;;
        virtq.timeout=*) TIMEOUT=${a#*=} ;;
    esac
done
echo "VIRTQ: init up $(cut -d' ' -f1 /proc/uptime)s, $(nproc) cpu(s)"

for m in $(cat /lib/modules/load.order); do
    insmod "/lib/modules/$m" || finish "FAIL (insmod $m)"
done
ip link set lo up
# A guest without virtq.ip has no NIC (the block cases): eth0 is neither waited for nor set up.
if [ -n "$IP" ]; then
    n=0
    while [ ! -e /sys/class/net/eth0 ]; do
        n=$((n + 1))
        [ $n -gt 100 ] && finish "FAIL (no eth0)"
        sleep 0.1
    done
    [ -n "$MTU" ] && ip link set eth0 mtu "$MTU"
    ip link set eth0 up
    ip addr add "$IP" dev eth0
    for e in $ARPS; do arp -s "${e%@*}" "${e#*@}"; done
    feat=$(cat /sys/class/net/eth0/device/features 2>/dev/null)
    # Feature bits, as the guest driver negotiated them: 15 MRG_RXBUF, 22 MQ, 32 VERSION_1.
    bit() { echo "$feat" | cut -c$(($1 + 1)); }
    echo "VIRTQ: eth0 $IP mac $(cat /sys/class/net/eth0/address) mrg_rxbuf=$(bit 15) mq=$(bit 22) version_1=$(bit 32) mtu=$(cat /sys/class/net/eth0/mtu)" \
        "queues=$(ls /sys/class/net/eth0/queues | tr '\n' ' ')"
    echo "VIRTQ: features $feat"
fi
echo "VIRTQ: running: $CMD"
timeout "$TIMEOUT" sh -c "$CMD"
rc=$?
st=/sys/class/net/eth0/statistics
[ -d $st ] && echo "VIRTQ: counters eth0 rx $(cat $st/rx_packets) pkts $(cat $st/rx_dropped) dropped, tx $(cat $st/tx_packets) pkts $(cat $st/tx_dropped) dropped"
if [ $rc -eq 0 ]; then finish "PASS"; else finish "FAIL (rc=$rc)"; fi
EOF

cat > "$ROOT/bin/vt-wait-peer" << 'EOF'
#!/bin/sh
# vt-wait-peer IP [SECS]: until IP answers a ping.
ip=$1 secs=${2:-60} t0=$(cut -d. -f1 /proc/uptime)
while ! ping -c 1 -W 1 "$ip" > /dev/null 2>&1; do
    if [ $(($(cut -d. -f1 /proc/uptime) - t0)) -ge "$secs" ]; then
        echo "VIRTQ: $ip did not answer within ${secs}s"
        exit 1
    fi
done
echo "VIRTQ: $ip answers"
EOF

cat > "$ROOT/bin/vt-ping" << 'EOF'
#!/bin/sh
# vt-ping IP COUNT [MIN]: wait for IP, then COUNT pings 0.2 s apart; MIN replies needed.
ip=$1 count=$2 min=${3:-$2}
vt-wait-peer "$ip" 90 || exit 1
out=$(ping -c "$count" -i 0.2 -W 3 "$ip" 2>&1)
got=$(echo "$out" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p')
echo "VIRTQ: ping $ip on cpu mask $(taskset -p $$ | sed 's/.*: //'): ${got:-0}/$count replies ($(echo "$out" | tail -1))"
[ "${got:-0}" -ge "$min" ]
EOF

cat > "$ROOT/bin/vt-wait-echos" << 'EOF'
#!/bin/sh
# vt-wait-echos N [SECS] [QUIET]: until at least N ICMP echo requests came in and none in the
# last QUIET seconds (default 2), so a peer that pings us has finished.
n=$1 secs=${2:-90} quiet=${3:-2}
echos() { awk '/^Icmp:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "InEchos") c = i; h = 1 } else print $c }' /proc/net/snmp; }
t0=$(cut -d. -f1 /proc/uptime)
last=$(echos) still=0
while :; do
    sleep 0.5
    now=$(echos)
    if [ "$now" = "$last" ]; then still=$((still + 1)); else still=0; last=$now; fi
    if [ "$now" -ge "$n" ] && [ $still -ge $((quiet * 2)) ]; then
        echo "VIRTQ: answered $now echo requests"
        exit 0
    fi
    if [ $(($(cut -d. -f1 /proc/uptime) - t0)) -ge "$secs" ]; then
        echo "VIRTQ: only $now of $n echo requests within ${secs}s"
        exit 1
    fi
done
EOF

cat > "$ROOT/bin/vt-iperf" << 'EOF'
#!/bin/sh
# vt-iperf IP SECS [ARGS]: iperf3 TCP client; retries until the server accepts (30 s).
ip=$1 secs=$2
shift 2
i=0
while :; do
    out=$(iperf3 -c "$ip" -t "$secs" -f m "$@" 2>&1) && break
    i=$((i + 1))
    if [ $i -ge 30 ]; then
        echo "$out"
        exit 1
    fi
    sleep 1
done
echo "$out"
echo "$out" | grep -E 'sender|receiver' | sed "s/^/VIRTQ: iperf3 $* /"
EOF
cat > "$ROOT/bin/vt-channels" << 'EOF'
#!/bin/sh
# vt-channels N: the guest uses N queue pairs of eth0 (ethtool -L; the driver tells the device
# through its control queue, and QEMU disables the other pairs' rings on the back-end).
n=$1
ethtool -L eth0 combined "$n" || { echo "VIRTQ: ethtool -L eth0 combined $n failed"; exit 1; }
out=$(ethtool -l eth0)
max=$(echo "$out" | awk '/^Pre-set/ { s = 1 } /^Current/ { s = 0 } s && /^Combined:/ { print $2 }')
cur=$(echo "$out" | awk '/^Current/ { s = 1 } s && /^Combined:/ { print $2 }')
echo "VIRTQ: channels combined $cur of $max"
[ "$cur" = "$n" ]
EOF

cat > "$ROOT/bin/vt-blk" << 'EOF'
#!/bin/sh
# vt-blk: the block test on /dev/vda (at least 256 MiB). An ext4 file system on its first
# 128 MiB: a file of known content written, synced, read back after a remount (so from the
# device, not the page cache) and compared by SHA-256. Then raw throughput, 64 MiB written
# (fsync) and read (caches dropped) at 160 MiB; last a known 1 MiB pattern at 240 MiB
# (`yes virtq-blk-raw | head -c 1048576`, fsync) that the host checks in the image.
n=0
while [ ! -b /dev/vda ]; do
    n=$((n + 1))
    [ $n -gt 100 ] && { echo "VIRTQ: no /dev/vda"; exit 1; }
    sleep 0.1
done
q=/sys/block/vda/queue
echo "VIRTQ: vda $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) hw queue(s), serial $(cat /sys/block/vda/serial 2>/dev/null), ro $(cat /sys/block/vda/ro), cache $(cat $q/write_cache), discard_max $(cat $q/discard_max_bytes), write_zeroes_max $(cat $q/write_zeroes_max_bytes)"
now() { cut -d' ' -f1 /proc/uptime; }
mbs() { awk -v b="$1" -v t0="$2" -v t1="$3" 'BEGIN { t = t1 - t0; if (t <= 0) t = 0.01; printf "%.1f", b / 1048576 / t }'; }
mkfs.ext4 -q -F /dev/vda 128M || { echo "VIRTQ: mkfs.ext4 failed"; exit 1; }
mkdir -p /mnt
mount -t ext4 /dev/vda /mnt || { echo "VIRTQ: mount failed"; exit 1; }
yes virtq-blk-file | head -c 8388608 > /tmp/file
want=$(sha256sum < /tmp/file | cut -d' ' -f1)
cp /tmp/file /mnt/file && sync || { echo "VIRTQ: write failed"; exit 1; }
umount /mnt && mount -t ext4 /dev/vda /mnt || { echo "VIRTQ: remount failed"; exit 1; }
got=$(sha256sum < /mnt/file | cut -d' ' -f1)
umount /mnt
echo "VIRTQ: ext4 file sha256 wrote $want read $got"
[ "$want" = "$got" ] || exit 1
t0=$(now)
dd if=/dev/zero of=/dev/vda bs=1M count=64 seek=160 conv=fsync 2> /dev/null || { echo "VIRTQ: dd write failed"; exit 1; }
t1=$(now)
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/dev/null bs=1M count=64 skip=160 2> /dev/null || { echo "VIRTQ: dd read failed"; exit 1; }
t2=$(now)
echo "VIRTQ: dd write $(mbs 67108864 "$t0" "$t1") MB/s read $(mbs 67108864 "$t1" "$t2") MB/s"
yes virtq-blk-raw | head -c 1048576 > /tmp/raw
dd if=/tmp/raw of=/dev/vda bs=1M seek=240 conv=fsync 2> /dev/null || { echo "VIRTQ: raw write failed"; exit 1; }
echo "VIRTQ: raw pattern sha256 $(sha256sum < /tmp/raw | cut -d' ' -f1)"
EOF

cat > "$ROOT/bin/vt-blk-stream" << 'EOF'
#!/bin/sh
# vt-blk-stream [MIB] [writethrough]: writes MIB MiB (default 64) of a known pattern (`yes
# virtq-blk-stream`) to /dev/vda at 16 MiB, one 1 MiB O_DIRECT write at a time, printing
# `VIRTQ: chunk N` after each (the host kills the back-end and restarts it meanwhile); then
# reads it back with the caches dropped and compares SHA-256. With `writethrough` the disk's
# write cache is switched off first (virtio-blk `writeback` = 0 through CONFIG_WCE: the
# back-end makes every write stable before completing it).
mib=${1:-64}
n=0
while [ ! -b /dev/vda ]; do
    n=$((n + 1))
    [ $n -gt 100 ] && { echo "VIRTQ: no /dev/vda"; exit 1; }
    sleep 0.1
done
if [ "$2" = writethrough ]; then
    # virtio_blk's own attribute writes `writeback` in the config space (queue/write_cache
    # would only change the guest's view).
    echo "write through" > /sys/block/vda/cache_type || { echo "VIRTQ: cannot set write through"; exit 1; }
    echo "VIRTQ: cache $(cat /sys/block/vda/cache_type)"
fi
yes virtq-blk-stream | head -c $((mib * 1048576)) > /tmp/stream
want=$(sha256sum < /tmp/stream | cut -d' ' -f1)
t0=$(cut -d' ' -f1 /proc/uptime)
i=0
while [ $i -lt "$mib" ]; do
    dd if=/tmp/stream of=/dev/vda bs=1M count=1 skip=$i seek=$((16 + i)) oflag=direct 2> /dev/null \
        || { echo "VIRTQ: chunk $i failed"; exit 1; }
    echo "VIRTQ: chunk $i"
    i=$((i + 1))
done
t1=$(cut -d' ' -f1 /proc/uptime)
echo 3 > /proc/sys/vm/drop_caches
got=$(dd if=/dev/vda bs=1M skip=16 count="$mib" 2> /dev/null | sha256sum | cut -d' ' -f1)
echo "VIRTQ: stream of $mib MiB written in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')s, sha256 wrote $want read $got"
[ "$want" = "$got" ]
EOF

cat > "$ROOT/bin/vt-blk-ro" << 'EOF'
#!/bin/sh
# vt-blk-ro: /dev/vda must be read-only (VIRTIO_BLK_F_RO), its first 4 MiB read back as the host
# wrote them (`yes virtq-blk-ro`, compared by SHA-256), and a write refused.
n=0
while [ ! -b /dev/vda ]; do
    n=$((n + 1))
    [ $n -gt 100 ] && { echo "VIRTQ: no /dev/vda"; exit 1; }
    sleep 0.1
done
want=$(yes virtq-blk-ro | head -c 4194304 | sha256sum | cut -d' ' -f1)
got=$(dd if=/dev/vda bs=1M count=4 2> /dev/null | sha256sum | cut -d' ' -f1)
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2> /dev/null; then wrote=yes; else wrote=no; fi
echo "VIRTQ: ro $(cat /sys/block/vda/ro), read $([ "$want" = "$got" ] && echo intact || echo DIFFERS), write accepted $wrote"
[ "$(cat /sys/block/vda/ro)" = 1 ] && [ "$want" = "$got" ] && [ $wrote = no ]
EOF

chmod +x "$ROOT/init" "$ROOT"/bin/vt-*

# /dev/console must exist before /init runs, or the kernel starts init without a console.
if [[ $(id -u) -eq 0 ]]; then
    mknod -m 600 "$ROOT/dev/console" c 5 1
    mknod -m 666 "$ROOT/dev/null" c 1 3
fi

# Uncompressed: the kernel unpacks it faster under TCG than it would inflate it.
(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) > "$OUT/initramfs.cpio.tmp"
mv "$OUT/initramfs.cpio.tmp" "$OUT/initramfs.cpio"
echo "$KEY" > "$OUT/stamp"
log "built $OUT/vmlinux ($(du -h "$OUT/vmlinux" | cut -f1)) and $OUT/initramfs.cpio ($(du -h "$OUT/initramfs.cpio" | cut -f1)) for $KVER"
