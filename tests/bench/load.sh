#!/usr/bin/env bash
# Slowloris load figures (issue 15): a coordinator on loopback holds
# ATTACKERS idle and slow connections (default 2000, from 8 loopback
# addresses other than the agents') while AGENTS simulated agents
# (default 100) register and open their map streams. Prints, for each
# build, how many agents made it and how long they took, without the
# attack (the reference) and under it.
#
#   tests/bench/load.sh
#   BEFORE_BIN=/path/to/old/warren-coordinator tests/bench/load.sh
#
# BEFORE_BIN adds a second run against another build (say, the commit
# before the accept loop got its deadlines and caps: ec5a171^). Each build
# runs with the file limit it is deployed with: the old unit had no
# LimitNOFILE (1024), the current one sets 65536 (BEFORE_NOFILE and
# NOFILE change them). Builds in release mode: these are measurements.
set -euo pipefail
cd "$(dirname "$0")/../.."

AGENTS=${AGENTS:-100}
ATTACKERS=${ATTACKERS:-2000}
NOFILE=${NOFILE:-65536}
BEFORE_NOFILE=${BEFORE_NOFILE:-1024}
PORT=${PORT:-18443}
# The load generator itself holds ATTACKERS + AGENTS sockets.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cargo build --release -q -p warren-coordinator --bin warren-coordinator --example load_bench
BIN=target/release/warren-coordinator
BENCH=target/release/examples/load_bench
WORK=$(mktemp -d)
PID=
cleanup() {
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# run LABEL BIN NOFILE
run() {
    local label=$1 bin=$2 nofile=$3
    local dir="$WORK/$label"
    mkdir -p "$dir"
    local token
    token=$(RUST_LOG=warn "$bin" --data-dir "$dir" token create --reusable | head -1)
    (ulimit -n "$nofile" 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec env RUST_LOG=warn "$bin" --data-dir "$dir" serve --listen "127.0.0.1:$PORT" --no-relay) \
        >"$dir/log" 2>&1 &
    PID=$!
    local i
    for i in $(seq 1 100); do
        curl -s -o /dev/null -m 1 "http://127.0.0.1:$PORT/key" && break
        sleep 0.1
    done
    if ! kill -0 "$PID" 2>/dev/null; then echo "coordinator did not start:"; cat "$dir/log"; exit 1; fi
    echo "== $label: coordinator pid $PID on port $PORT, file limit $nofile"
    "$BENCH" --url "http://127.0.0.1:$PORT" --token "$token" --agents "$AGENTS" --attackers "$ATTACKERS"
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
}

run current "$BIN" "$NOFILE"
if [ -n "${BEFORE_BIN:-}" ]; then
    run before "$BEFORE_BIN" "$BEFORE_NOFILE"
fi
