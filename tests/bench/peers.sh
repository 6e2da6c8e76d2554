#!/usr/bin/env bash
# Idle-peer footprint: starts one warren agent with many configured peers
# (fresh random keys, one distinct /32 each, an endpoint each so every tunnel
# is live, no traffic) and reports
#   - start-up time: from spawn until "agent ready" is in its log and the
#     TUN device exists,
#   - resident memory (VmRSS) once ready and again after IDLE seconds, when
#     every peer's WireGuard timers have run many times,
#   - CPU seconds the idle agent burnt over those IDLE seconds.
# Targets: 1,000 idle peers in at most 50 MB (issue #8), 10,000 in at
# most 100 MB (issue #19).
#
# Peer public keys are 32 random bytes: any 32 bytes are a valid X25519
# public key. The endpoints point into the /16 of a veth link in the
# agent's own namespace, so even a stray handshake would go nowhere; with no
# traffic and no keepalive configured, WireGuard sends nothing anyway.
#
# Usage (as root):  tests/bench/peers.sh
#   PEERS=1000   how many peers
#   IDLE=10      seconds to watch the idle agent
#   WARREN_BIN=path  use this binary instead of building target/release/warren
#   WARREN_BASE_BIN=path  measures this build too, in the same run, as the
#                    second column (the previous build: the reference)
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "peers.sh: must run as root (it creates a network namespace and a TUN device)" >&2
    exit 1
fi
for tool in ip base64 awk getconf; do
    command -v "$tool" >/dev/null || { echo "peers.sh: $tool not installed" >&2; exit 1; }
done

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEERS=${PEERS:-1000}
IDLE=${IDLE:-10}
# Issue #8: 1,000 idle peers in 50 MB; issue #19: 10,000 in 100 MB.
LIMIT_MB=$((PEERS > 1000 ? 100 : 50))
HZ=$(getconf CLK_TCK)
if ((PEERS > 65000)); then echo "peers.sh: at most 65000 peers" >&2; exit 2; fi
if [[ -z ${WARREN_BIN:-} ]]; then
    echo "building warren (release)..." >&2
    (cd "$ROOT" && cargo build --release --bin warren >&2)
    WARREN_BIN=$ROOT/target/release/warren
fi

NS=wp-$$
TMP=$(mktemp -d /tmp/warren-peers-XXXXXX)
AGENT=
stop_agent() {
    if [[ -n $AGENT ]]; then
        kill "$AGENT" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$AGENT" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$AGENT" 2>/dev/null || true
        wait "$AGENT" 2>/dev/null || true
        AGENT=
    fi
}
cleanup() {
    set +e
    stop_agent
    for pid in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$NS" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NS"
ip -n "$NS" link set lo up
# A veth pair with both ends in the namespace stands in for a dummy link
# (the dummy module may be missing): nothing behind it answers ARP.
ip -n "$NS" link add void0 type veth peer name void1
ip -n "$NS" addr add 10.98.0.1/16 dev void0
ip -n "$NS" link set void0 up
ip -n "$NS" link set void1 up

# The peers, written once: both builds get the same keys and endpoints.
echo "writing $PEERS peers..." >&2
for ((i = 0; i < PEERS; i++)); do
    n=$((i + 2))
    echo
    echo "[[peer]]"
    echo "public_key = \"$(head -c 32 /dev/urandom | base64)\""
    echo "allowed_ips = [\"100.64.$((n / 256)).$((n % 256))/32\"]"
    echo "endpoint = \"10.98.$((n / 256)).$((n % 256)):51820\""
done >"$TMP/peers.toml"

# measure BIN: starts BIN with every peer, idles, stops it; sets the
# globals UP (s), RSS0, RSS1 (MB), CPU (s), SEEN.
measure() {
    local bin=$1
    {
        # Its own local API socket (the default path is machine-wide);
        # builds older than the local API know no `[agent]`.
        if "$bin" --help 2>/dev/null | grep -q -- --socket; then
            echo "[agent]"
            echo "socket = \"$TMP/agent.sock\""
        fi
        echo "[interface]"
        echo "name = \"warren0\""
        echo "private_key = \"$("$bin" genkey)\""
        echo "listen_port = 51820"
        echo "addresses = [\"100.64.0.1/10\"]"
        cat "$TMP/peers.toml"
    } >"$TMP/agent.toml"

    echo "starting $bin..." >&2
    : >"$TMP/agent.log"
    local t0 ready=
    t0=$(date +%s.%N)
    ip netns exec "$NS" "$bin" agent --config "$TMP/agent.toml" >"$TMP/agent.log" 2>&1 &
    AGENT=$!
    for _ in $(seq 600); do
        if grep -q "agent ready" "$TMP/agent.log" && ip -n "$NS" link show warren0 >/dev/null 2>&1; then
            ready=$(date +%s.%N)
            break
        fi
        kill -0 "$AGENT" 2>/dev/null || { echo "peers.sh: agent exited:" >&2; cat "$TMP/agent.log" >&2; exit 1; }
        sleep 0.05
    done
    [[ -n $ready ]] || { echo "peers.sh: agent not ready after 30 s" >&2; tail "$TMP/agent.log" >&2; exit 1; }
    UP=$(awk -v a="$t0" -v b="$ready" 'BEGIN { printf "%.3f", b - a }')
    RSS0=$(rss)
    local c0 c1
    c0=$(ticks)
    echo "idling ${IDLE}s..." >&2
    sleep "$IDLE"
    c1=$(ticks)
    RSS1=$(rss)
    CPU=$(awk -v d=$((c1 - c0)) -v hz="$HZ" 'BEGIN { printf "%.2f", d / hz }')
    SEEN=$(grep -o 'peers=[0-9]*' "$TMP/agent.log" | head -1 | cut -d= -f2 || true)
    stop_agent
    # The next agent makes the device again.
    for _ in $(seq 50); do ip -n "$NS" link show warren0 >/dev/null 2>&1 || break; sleep 0.1; done
}
rss() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$AGENT/status"; }
ticks() { sed 's/.*) //' "/proc/$AGENT/stat" | awk '{ print $12 + $13 }'; }

measure "$WARREN_BIN"
NEW=("$UP" "$RSS0" "$RSS1" "$CPU" "${SEEN:-?}")
BASE=("-" "-" "-" "-" "-")
if [[ -n ${WARREN_BASE_BIN:-} ]]; then
    measure "$WARREN_BASE_BIN"
    BASE=("$UP" "$RSS0" "$RSS1" "$CPU" "${SEEN:-?}")
fi

echo
echo "warren agent with $PEERS configured peers (log says peers=${NEW[4]}), no traffic"
awk -v lim="$LIMIT_MB" -v idle="$IDLE" \
    -v u="${NEW[0]}" -v r0="${NEW[1]}" -v r1="${NEW[2]}" -v c="${NEW[3]}" \
    -v bu="${BASE[0]}" -v br0="${BASE[1]}" -v br1="${BASE[2]}" -v bc="${BASE[3]}" 'BEGIN {
    printf "%-46s %12s %12s\n", "", "this build", "base build"
    printf "%-46s %10.3f s %12s\n", "start-up (spawn to ready and device up)", u, bu
    printf "%-46s %9.1f MB %12s\n", "RSS when ready", r0, br0
    printf "%-46s %9.1f MB %12s  (target <= %d MB: %s)\n", "RSS after " idle " s idle", r1, br1, lim, (r1 <= lim) ? "met" : "MISSED"
    printf "%-46s %10.2f s %12s  (per %d s; %.1f%% of a core)\n", "CPU while idle", c, bc, idle, 100 * c / idle
}'
