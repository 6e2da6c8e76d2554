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

# As root on a fresh machine, install the lab tools and start PostgreSQL
# first (.ci/run has done it already).
if [[ $(id -u) -eq 0 && -z "${WARREN_SETUP_DONE:-}" ]]; then
    tests/setup.sh
fi
if [[ $(id -u) -eq 0 && -z "${WARREN_TEST_POSTGRES_URL:-}" ]]; then
    export WARREN_TEST_POSTGRES_URL=postgres://warren:warren@127.0.0.1:5432/warren
fi
if ! command -v cargo >/dev/null && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null; then
    echo "tests/run.sh: cargo not found: install Rust with rustup" >&2
    exit 1
fi
cargo --version
# A clean one-shot build gains nothing from incremental state, which is
# hundreds of MB; CI machines may have little free disk.
if [[ "${CI:-}" == true ]]; then
    export CARGO_INCREMENTAL=0
fi

cargo build --workspace --all-targets
rm -f target/nat-matrix.txt target/test-output.txt
status=0
# The output is kept so that the failures can be repeated at the very end:
# CI shows a run's tail, and fuzzing and the matrix come after the tests.
cargo test --workspace --no-fail-fast -- --test-threads="$threads" 2>&1 |
    tee target/test-output.txt || status=$?
# Every fuzz target for a few seconds (fuzz/run.sh; WARREN_FUZZ_SECS=0
# skips it). A crash fails the run. Without nightly and cargo-fuzz
# (tests/setup.sh installs both) it is skipped, except in CI.
fuzz_secs="${WARREN_FUZZ_SECS:-5}"
if [[ "$fuzz_secs" != 0 ]]; then
    if cargo +nightly fuzz --version >/dev/null 2>&1; then
        fuzz/run.sh "$fuzz_secs" || status=$?
    elif [[ "${CI:-}" == true ]]; then
        echo "tests/run.sh: nightly or cargo-fuzz missing (tests/setup.sh installs them)" >&2
        status=1
    else
        echo "tests/run.sh: skipping fuzzing: needs nightly and cargo-fuzz (tests/setup.sh)"
    fi
fi
# The NAT matrix (tests/lab/matrix.rs) writes its table here; show it.
if [[ -f target/nat-matrix.txt ]]; then
    echo
    cat target/nat-matrix.txt
fi
# Each failing test's own output (libtest's "failures:" blocks), last.
if grep -q '^failures:$' target/test-output.txt; then
    echo
    echo "== failed tests, their output again =="
    awk '/^failures:$/ { on = 1 } on { print } /^test result:/ { on = 0 }' \
        target/test-output.txt | tail -n 400
fi
exit "$status"
