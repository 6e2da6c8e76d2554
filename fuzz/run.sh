#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 20), for CI and by hand:
#   fuzz/run.sh 60
# Needs the nightly toolchain and cargo-fuzz (cargo-fuzz is installed here
# if missing; tests/setup.sh installs nightly). Exits non-zero as soon as a
# target crashes, panics, hangs on one input or leaks past the RSS limit;
# the input that did it is kept in fuzz/artifacts/TARGET/.
#
# All targets are built in one `cargo fuzz build` first, so the shared
# dependencies compile once and the SECONDS budget is spent fuzzing.
#
# FUZZ_FLAGS (default `--dev -s none`): an unoptimised build without
# AddressSanitizer. The decoders are safe Rust, so ASan finds nothing a
# panic would not, and a release ASan build of the whole dependency tree
# costs CI ~15 CPU-minutes; coverage guidance (sancov) stays on either way.
# `FUZZ_FLAGS="" fuzz/run.sh 600` for a long optimised ASan run by hand.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"
# shellcheck disable=SC2206
flags=(${FUZZ_FLAGS---dev -s none})
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
start=$SECONDS
cargo +nightly fuzz build "${flags[@]}"
echo "== fuzz targets built in $((SECONDS - start))s"
mkdir -p corpus
for target in $(cargo +nightly fuzz list); do
    echo "== fuzz $target for ${secs}s"
    mkdir -p "corpus/$target"
    # -timeout: one input taking over 10 s is a hang (every target's own
    # waits are bounded well below that).
    cargo +nightly fuzz run "${flags[@]}" "$target" "corpus/$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048
done
echo "== fuzzing done in $((SECONDS - start))s"
