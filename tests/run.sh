#!/usr/bin/env bash
# The project's test command: README and CI (.ci/run) run exactly this.
#
# Builds every target first, so compile errors show up before any test runs
# and the test phase measures tests, not the compiler. Then runs the whole
# workspace's tests, NAT-lab tests included. The lab tests need root; run
# as a normal user they print "skipping" (with CI=true they fail instead).
#
# --test-threads=2: each lab test runs a few agents (tokio runtimes) and
# namespaces; two at a time keep a 2-core machine responsive and the tests'
# time bounds meaningful. Test binaries run one after another anyway.
set -euo pipefail
cd "$(dirname "$0")/.."

threads="${WARREN_TEST_THREADS:-2}"

cargo build --workspace --all-targets
cargo test --workspace -- --test-threads="$threads"
