#!/usr/bin/env bash
# Coordinator figures: registrations per second, time for one change to
# reach every open map stream, and the coordinator's memory, for N simulated
# nodes (default 2000) against SQLite and then PostgreSQL.
#
#   tests/bench/coordinator.sh [NODES]
#
# The first phase is itself the reconnect storm a coordinator restart
# causes: every stream opens at once, and each one coming online is a
# change every other stream hears about. The bench reports how long that
# takes to go quiet, how many lines, full maps and bytes it cost, and how
# long the host's TCP memory was under pressure meanwhile (the load
# generator shares the coordinator's kernel: a storm that stalls on
# retransmission timeouts is the kernel's limit, not the coordinator's).
#
# Then a policy of POLICY_RULES rules (default 200; 0 skips it) is set
# where there was none, and then edited (a rule added): for each, the
# time until every stream has its `filter_changed`, the lines and bytes
# it cost, beside the endpoint change as the reference.
#
# COORDINATOR_BIN and BENCH_BIN run other builds (say, of an older commit
# for a before/after comparison) instead of building this tree.
# PostgreSQL runs only when WARREN_TEST_POSTGRES_URL points at a server whose
# user may CREATE DATABASE (a fresh database is made for the run), with
# REPLICAS coordinators (default 2) sharing it: node i registers and
# streams at replica i mod REPLICAS, and memory, CPU and the change's
# latency are printed per replica. STORES="postgres" (default "sqlite
# postgres") runs only the stores named; REGISTER_ONLY=1 stops each run
# after its registrations; CONCURRENCY (default 32) is how many
# registrations are in flight at once; COMPRESS=1 turns on the coordinator's zstd map
# streams (--compress-maps).
# Builds in release mode: these are measurements.
set -euo pipefail
cd "$(dirname "$0")/../.."

NODES=${1:-2000}
POLICY_RULES=${POLICY_RULES:-200}
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if [ -z "${COORDINATOR_BIN:-}" ] || [ -z "${BENCH_BIN:-}" ]; then
    cargo build --release -q -p warren-coordinator --bin warren-coordinator --example coordinator_bench
fi
BIN=${COORDINATOR_BIN:-target/release/warren-coordinator}
BENCH=${BENCH_BIN:-target/release/examples/coordinator_bench}
REPLICAS=${REPLICAS:-2}
STORES=${STORES:-sqlite postgres}
# COMPRESS=1: the coordinators run with --compress-maps (zstd frames to
# the streams, which ask for them as agents do).
SERVE_FLAGS=()
if [ "${COMPRESS:-0}" = 1 ]; then SERVE_FLAGS+=(--compress-maps); fi
WORK=$(mktemp -d)
PIDS=()
stop_all() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}
cleanup() {
    stop_all
    rm -rf "$WORK"
}
trap cleanup EXIT

# run LABEL REPLICAS [--database URL]
run() {
    local label=$1 replicas=$2; shift 2
    local dir="$WORK/$label"
    mkdir -p "$dir/r1"
    local token
    token=$(RUST_LOG=warn "$BIN" --data-dir "$dir/r1" "$@" token create --reusable | head -1)
    local targets=() ports=() r
    for r in $(seq 1 "$replicas"); do
        mkdir -p "$dir/r$r"
        # Replicas are one coordinator to the agents: the same key.
        if [ "$r" -gt 1 ]; then cp "$dir/r1/coordinator.key" "$dir/r$r/"; fi
        RUST_LOG=warn "$BIN" --data-dir "$dir/r$r" "$@" serve --listen 127.0.0.1:0 --no-stun "${SERVE_FLAGS[@]}" >"$dir/r$r.log" 2>&1 &
        local pid=$!
        PIDS+=("$pid")
        # The port is chosen by the kernel; read it from the process's
        # sockets (--no-stun: STUN over TCP would be a second listening
        # socket).
        local port= i
        for i in $(seq 1 100); do
            port=$(ss -Hltnp 2>/dev/null | awk -v pid="pid=$pid," '$0 ~ pid {split($4, a, ":"); print a[length(a)]; exit}')
            [ -n "$port" ] && break
            sleep 0.1
        done
        if [ -z "$port" ]; then echo "coordinator did not start:"; cat "$dir/r$r.log"; exit 1; fi
        targets+=(--url "http://127.0.0.1:$port" --pid "$pid")
        ports+=("$port")
    done
    # The first replica's data directory holds the SQLite store.
    dir=$dir/r1
    echo "== $label: $NODES nodes, $replicas coordinator(s): pid ${PIDS[*]} on port ${ports[*]}${SERVE_FLAGS[*]:+, ${SERVE_FLAGS[*]}}"
    local policy=()
    if [ "$POLICY_RULES" -gt 0 ]; then
        # Rule i lets the whole overlay reach port 1000+i of one /16 of it.
        {
            echo '{"acls": ['
            for i in $(seq 0 $((POLICY_RULES - 1))); do
                echo "  {\"action\": \"accept\", \"src\": [\"100.64.0.0/10\"], \"dst\": [\"100.$((64 + i % 64)).0.0/16:$((1000 + i))\"]},"
            done
            echo ']}'
        } >"$dir/policy.hujson"
        # The edit: one more rule, port 999 of every node; every filter
        # changes, no node's peers do.
        sed 's|^{"acls": \[$|&\n  {"action": "accept", "src": ["100.64.0.0/10"], "dst": ["100.64.0.0/10:999"]},|' \
            "$dir/policy.hujson" >"$dir/edit.hujson"
        policy=(--policy-cmd "RUST_LOG=warn $BIN --data-dir $dir $* policy set $dir/policy.hujson >/dev/null"
            --policy-cmd "RUST_LOG=warn $BIN --data-dir $dir $* policy set $dir/edit.hujson >/dev/null")
    fi
    "$BENCH" "${targets[@]}" --token "$token" --nodes "$NODES" --concurrency "${CONCURRENCY:-32}" "${policy[@]}"
    stop_all
}

if [[ " $STORES " == *" sqlite "* ]]; then run sqlite 1; fi
if [[ " $STORES " != *" postgres "* ]]; then
    :
elif [ -n "${WARREN_TEST_POSTGRES_URL:-}" ]; then
    db="warren_bench_$$"
    psql "$WARREN_TEST_POSTGRES_URL" -qc "CREATE DATABASE $db" >/dev/null
    run postgres "$REPLICAS" --database "${WARREN_TEST_POSTGRES_URL%/*}/$db"
    psql "$WARREN_TEST_POSTGRES_URL" -qc "DROP DATABASE $db" >/dev/null || true
else
    echo "== postgres: skipped (WARREN_TEST_POSTGRES_URL not set)"
fi
