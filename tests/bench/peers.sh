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
cleanup() {
    set +e
    if [[ -n $AGENT ]]; then
        kill "$AGENT" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$AGENT" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$AGENT" 2>/dev/null
    fi
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

echo "writing a config with $PEERS peers..." >&2
{
    # Its own local API socket (the default path is machine-wide); builds
    # older than the local API know no `[agent]`.
    if "$WARREN_BIN" --help 2>/dev/null | grep -q -- --socket; then
        echo "[agent]"
        echo "socket = \"$TMP/agent.sock\""
    fi
    echo "[interface]"
    echo "name = \"warren0\""
    echo "private_key = \"$("$WARREN_BIN" genkey)\""
    echo "listen_port = 51820"
    echo "addresses = [\"100.64.0.1/10\"]"
    for ((i = 0; i < PEERS; i++)); do
        n=$((i + 2))
        echo
        echo "[[peer]]"
        echo "public_key = \"$(head -c 32 /dev/urandom | base64)\""
        echo "allowed_ips = [\"100.64.$((n / 256)).$((n % 256))/32\"]"
        echo "endpoint = \"10.98.$((n / 256)).$((n % 256)):51820\""
    done
} >"$TMP/agent.toml"

echo "starting the agent..." >&2
t0=$(date +%s.%N)
ip netns exec "$NS" "$WARREN_BIN" agent --config "$TMP/agent.toml" >"$TMP/agent.log" 2>&1 &
AGENT=$!
ready=
for _ in $(seq 600); do
    if grep -q "agent ready" "$TMP/agent.log" && ip -n "$NS" link show warren0 >/dev/null 2>&1; then
        ready=$(date +%s.%N)
        break
    fi
    kill -0 "$AGENT" 2>/dev/null || { echo "peers.sh: agent exited:" >&2; cat "$TMP/agent.log" >&2; exit 1; }
    sleep 0.05
done
[[ -n $ready ]] || { echo "peers.sh: agent not ready after 30 s" >&2; tail "$TMP/agent.log" >&2; exit 1; }

rss() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$AGENT/status"; }
ticks() { sed 's/.*) //' "/proc/$AGENT/stat" | awk '{ print $12 + $13 }'; }
rss_ready=$(rss)
c0=$(ticks)
echo "idling ${IDLE}s..." >&2
sleep "$IDLE"
c1=$(ticks)
rss_idle=$(rss)
peers_seen=$(grep -o 'peers=[0-9]*' "$TMP/agent.log" | head -1 | cut -d= -f2)

echo
echo "warren agent with $PEERS configured peers (log says peers=${peers_seen:-?}), no traffic"
awk -v t0="$t0" -v t1="$ready" -v r0="$rss_ready" -v r1="$rss_idle" -v dc=$((c1 - c0)) \
    -v hz="$HZ" -v idle="$IDLE" -v lim="$LIMIT_MB" 'BEGIN {
    printf "start-up (spawn to \"agent ready\" and device up)  %8.3f s\n", t1 - t0
    printf "RSS when ready                                   %8.1f MB\n", r0
    printf "RSS after %3d s idle                             %8.1f MB  (target <= %d MB: %s)\n", idle, r1, lim, (r1 <= lim) ? "met" : "MISSED"
    printf "CPU while idle                                   %8.2f s per %d s (%.1f%% of a core)\n", dc / hz, idle, 100 * dc / hz / idle
}'
