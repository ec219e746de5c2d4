#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (FUZZ_SECONDS each, default 30) from the
# seed corpora in fuzz/corpus. Needs nightly (ci/setup.sh installs it) and cargo-fuzz
# (installed here if missing). A crash fails the run; its input and the run's whole log are in
# fuzz/artifacts/<target>/.
#
# Long run, e.g. ten minutes per target:  FUZZ_SECONDS=600 ci/fuzz.sh
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECONDS_PER_TARGET=${FUZZ_SECONDS:-30}
if ! cargo +nightly fuzz --version > /dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
cargo +nightly fuzz build
pass=0
fail=0
for t in $(cargo +nightly fuzz list); do
    # Work on a copy of the seeds: new inputs found in CI are not written into the tree.
    work=$(mktemp -d)
    cp -r "corpus/$t/." "$work/" 2> /dev/null || true
    if cargo +nightly fuzz run "$t" "$work" -- -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 \
        > "$work.log" 2>&1; then
        echo "fuzz $t: $(grep -E '^#[0-9]+.*DONE' "$work.log" | tail -1)"
        pass=$((pass + 1))
    else
        echo "fuzz $t: FAILED"
        # The cause (a panic's message, libFuzzer's or the sanitizer's report) comes before
        # the failing input's dump and the reproduction hints, which fill the tail: print it
        # first, and keep the whole log beside the input.
        grep -m1 -A30 -E 'panicked at|==[0-9]+== ?ERROR|ERROR: libFuzzer' "$work.log" || true
        echo "..."
        tail -40 "$work.log"
        mkdir -p "artifacts/$t"
        cp "$work.log" "artifacts/$t/run-$(date +%Y%m%d-%H%M%S).log"
        echo "fuzz $t: whole log in fuzz/artifacts/$t/"
        fail=$((fail + 1))
    fi
    rm -rf "$work" "$work.log"
done
echo "fuzz: $pass passed, $fail failed"
[[ $fail -eq 0 ]]
