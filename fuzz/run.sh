#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 20), for CI and by hand:
#   fuzz/run.sh 60
# Needs the nightly toolchain and cargo-fuzz (installed here if missing).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install --locked cargo-fuzz
fi
mkdir -p corpus
for target in $(cargo +nightly fuzz list); do
    echo "== fuzz $target for ${secs}s"
    mkdir -p "corpus/$target"
    cargo +nightly fuzz run "$target" "corpus/$target" -- -max_total_time="$secs" -rss_limit_mb=2048
done
