#!/usr/bin/env bash
# The core must build without std or alloc for bare-metal targets, with every feature firmware
# may enable: ci/nostd-guard fails to compile there if any dependency pulls in std. The
# firmware example (split and packed rings, feature `small`) is linked for Cortex-M4F and must
# fit 16 KiB of .text.
set -euo pipefail
cd "$(dirname "$0")/.."
# Warnings are errors here too (these targets compile cfg paths the host build does not).
export RUSTFLAGS="${RUSTFLAGS:-} -D warnings"

for target in thumbv7em-none-eabihf aarch64-unknown-none riscv64gc-unknown-none-elf; do
    echo "no_std guard: $target"
    cargo build -q -p virtq-nostd-guard --target "$target"
    cargo build -q -p virtq-nostd-guard --features defmt --target "$target"
done

echo "firmware example: thumbv7em-none-eabihf, profile firmware"
cargo build -q -p virtq-firmware-example --profile firmware --target thumbv7em-none-eabihf
elf=target/thumbv7em-none-eabihf/firmware/virtq-firmware-example
text_hex=$(readelf -SW "$elf" | awk '{ for (i = 1; i < NF; i++) if ($i == ".text") { print $(i + 4); exit } }')
[[ -n $text_hex ]] || { echo "no .text in $elf" >&2; exit 1; }
text=$((16#$text_hex))
echo "firmware example .text: $text bytes (both ring layouts, virtq feature small)"
# Firmware budget (issue 17): a device serving split and packed rings in 16 KiB of flash.
((text <= 16384)) || { echo "firmware example .text $text bytes exceeds 16 KiB" >&2; exit 1; }
