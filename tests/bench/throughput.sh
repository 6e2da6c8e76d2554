#!/usr/bin/env bash
# Throughput benchmark: iperf3 TCP between two network namespaces joined by
# one veth link, measured in one run for
#   1. the plain link (no tunnel),
#   2. warren (release build, one agent per namespace),
#   3. Debian's wireguard-go (configured with wg set),
# then the ratios warren/wireguard-go and warren/plain. Absolute figures vary
# between runs and machines; the ratios from one run are what to compare.
#
# Usage (as root):  tests/bench/throughput.sh
#   DURATION=10      seconds per iperf3 run
#   WARREN_BIN=path  use this warren binary instead of building target/release/warren
#   WARREN_OFFLOAD=false  run warren without TUN/UDP offload
#
# Everything lives in two namespaces named wb-<pid>-a/b on 10.99.0.0/24 with
# no route out; a trap removes them and every process on exit.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "throughput.sh: must run as root (it creates network namespaces and TUN devices)" >&2
    exit 1
fi
for tool in ip iperf3 wireguard-go wg ping; do
    command -v "$tool" >/dev/null || { echo "throughput.sh: $tool not installed" >&2; exit 1; }
done

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DURATION=${DURATION:-10}
OFFLOAD=${WARREN_OFFLOAD:-true}
if [[ -z ${WARREN_BIN:-} ]]; then
    echo "building warren (release)..." >&2
    (cd "$ROOT" && cargo build --release --bin warren >&2)
    WARREN_BIN=$ROOT/target/release/warren
fi

NA=wb-$$-a
NB=wb-$$-b
WGA=wb$$a # wireguard-go's UAPI socket dir is global: names must be unique
WGB=wb$$b
TMP=$(mktemp -d /tmp/warren-bench-XXXXXX)
PIDS=()

cleanup() {
    set +e
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    done
    for ns in "$NA" "$NB"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    rm -f "/var/run/wireguard/$WGA.sock" "/var/run/wireguard/$WGB.sock"
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

inA() { ip netns exec "$NA" "$@"; }
inB() { ip netns exec "$NB" "$@"; }

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.1 s.
wait_for() {
    local secs=$1 what=$2
    shift 2
    for _ in $(seq $((secs * 10))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "throughput.sh: timed out after ${secs}s waiting for $what" >&2
    for f in "$TMP"/*.log; do [[ -f $f ]] && { echo "== $f" >&2; tail -20 "$f" >&2; }; done
    exit 1
}

# measure ADDR: iperf3 from A to a server in B at ADDR; prints Mbit/s.
measure() {
    local addr=$1
    inB iperf3 -s -1 -B "$addr" -p 5201 >"$TMP/iperf3-server.log" 2>&1 &
    local spid=$!
    wait_for 5 "iperf3 server on $addr" sh -c "ip netns exec $NB ss -ltn | grep -q '$addr:5201'"
    local out
    out=$(inA timeout $((DURATION + 30)) iperf3 -c "$addr" -p 5201 -t "$DURATION" -f m --connect-timeout 3000)
    wait "$spid" || true
    awk '/receiver/ { for (i = 1; i <= NF; i++) if ($i == "Mbits/sec") print $(i - 1) }' <<<"$out" | tail -1
}

stop() { # PID: SIGTERM and wait (bounded)
    kill "$1" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$1" 2>/dev/null || true
}

# --- topology: A (10.99.0.1) <-veth-> B (10.99.0.2), nothing else.
ip netns add "$NA"
ip netns add "$NB"
ip link add veth netns "$NA" type veth peer name veth netns "$NB"
inA ip link set lo up
inB ip link set lo up
inA ip addr add 10.99.0.1/24 dev veth
inB ip addr add 10.99.0.2/24 dev veth
inA ip link set veth up
inB ip link set veth up
wait_for 5 "veth link" inA ping -c1 -W1 10.99.0.2

echo "plain veth: iperf3 ${DURATION}s..." >&2
PLAIN=$(measure 10.99.0.2)

# --- warren
KA=$("$WARREN_BIN" genkey)
KB=$("$WARREN_BIN" genkey)
PA=$("$WARREN_BIN" pubkey <<<"$KA")
PB=$("$WARREN_BIN" pubkey <<<"$KB")
warren_conf() { # PRIVATE ADDR PEER_PUB PEER_OVERLAY PEER_ENDPOINT
    cat <<CONF
[interface]
name = "warren0"
private_key = "$1"
listen_port = 51820
addresses = ["$2/24"]
offload = $OFFLOAD
[[peer]]
public_key = "$3"
allowed_ips = ["$4/32"]
endpoint = "$5:51820"
CONF
}
warren_conf "$KA" 100.64.0.1 "$PB" 100.64.0.2 10.99.0.2 >"$TMP/a.toml"
warren_conf "$KB" 100.64.0.2 "$PA" 100.64.0.1 10.99.0.1 >"$TMP/b.toml"
inA "$WARREN_BIN" agent --config "$TMP/a.toml" --socket "$TMP/a.sock" >"$TMP/warren-a.log" 2>&1 &
WA=$!
PIDS+=("$WA")
inB "$WARREN_BIN" agent --config "$TMP/b.toml" --socket "$TMP/b.sock" >"$TMP/warren-b.log" 2>&1 &
WB=$!
PIDS+=("$WB")
wait_for 15 "warren tunnel" inA ping -c1 -W1 100.64.0.2
echo "warren: iperf3 ${DURATION}s..." >&2
WARREN=$(measure 100.64.0.2)
stop "$WA"
stop "$WB"

# --- wireguard-go
(umask 077 && wg genkey >"$TMP/wga.key" && wg genkey >"$TMP/wgb.key")
start_wg() { # NS IF KEYFILE ADDR PEER_KEYFILE PEER_OVERLAY PEER_ENDPOINT
    ip netns exec "$1" wireguard-go -f "$2" >"$TMP/$2.log" 2>&1 &
    PIDS+=("$!")
    wait_for 10 "wireguard-go $2" test -S "/var/run/wireguard/$2.sock"
    ip netns exec "$1" wg set "$2" private-key "$3" listen-port 51821 \
        peer "$(wg pubkey <"$5")" allowed-ips "$6/32" endpoint "$7:51821"
    ip netns exec "$1" ip addr add "$4/24" dev "$2"
    ip netns exec "$1" ip link set "$2" up
}
start_wg "$NA" "$WGA" "$TMP/wga.key" 100.65.0.1 "$TMP/wgb.key" 100.65.0.2 10.99.0.2
start_wg "$NB" "$WGB" "$TMP/wgb.key" 100.65.0.2 "$TMP/wga.key" 100.65.0.1 10.99.0.1
wait_for 15 "wireguard-go tunnel" inA ping -c1 -W1 100.65.0.2
echo "wireguard-go: iperf3 ${DURATION}s..." >&2
WGGO=$(measure 100.65.0.2)

for v in PLAIN WARREN WGGO; do
    [[ -n ${!v} ]] || { echo "throughput.sh: no result for $v" >&2; exit 1; }
done
echo
echo "iperf3 TCP, ${DURATION}s each, one veth between two namespaces (offload=$OFFLOAD)"
printf '%-14s %10s Mbit/s\n' "plain veth" "$PLAIN" "warren" "$WARREN" "wireguard-go" "$WGGO"
awk -v w="$WARREN" -v g="$WGGO" -v p="$PLAIN" 'BEGIN {
    printf "warren / wireguard-go = %.2f\n", w / g
    printf "warren / plain        = %.3f\n", w / p
}'
