#!/usr/bin/env bash
# The README's "Using the core" example is the crate-level doctest of core/src/lib.rs, which
# `cargo test` compiles and runs. This checks that the two copies are the same code, so the
# README shows an example that builds (issue 15). Cheap: no build.
set -euo pipefail
cd "$(dirname "$0")/.."

# The first code block after "//! ## Example" in the crate docs, without the `//! ` prefix.
lib=$(awk '/^\/\/! ## Example/ { f = 1 } f && /^\/\/! ```/ { if (c) exit; c = 1; next } c { sub(/^\/\/! ?/, ""); print }' core/src/lib.rs)
# The code block after the README's marker comment.
readme=$(awk '/^<!-- doctest: core\/src\/lib.rs/ { f = 1; next } f && /^```/ { if (c) exit; c = 1; next } c { print }' README.md)

if [[ -z $lib || -z $readme ]]; then
    echo "readme-example: example not found (core/src/lib.rs '## Example' or the README marker)" >&2
    exit 1
fi
if ! diff -u <(printf '%s\n' "$lib") <(printf '%s\n' "$readme"); then
    echo "readme-example: README.md's core example differs from the doctest in core/src/lib.rs" >&2
    exit 1
fi
echo "readme-example: README.md's core example is the doctest of core/src/lib.rs"
