#!/usr/bin/env bash
# Through a subnet router (issue 18): TCP throughput and added latency from
# a to a plain host on b's LAN, with b as the subnet router, beside the
# same transfer to b itself (its overlay address) in the same run.
#
# It runs the demo network (tests/demo.sh: a coordinator that is also the
# relay, hosts a and b behind NAT gateways), then gives b a second LAN,
# 192.168.77.0/24, with a namespace wdemo-lan on it that runs no warren.
# b advertises the LAN (with source NAT, the default), the coordinator
# approves it, a takes it with --accept-routes. iperf3 and ping then run
# a → b's overlay address (the tunnel alone) and a → the LAN host (the
# tunnel, then b's forwarding and NAT).
#
# Usage (as root):  tests/bench/subnet.sh
#   DURATION=10   seconds per iperf3 run
#   PINGS=200     pings per latency figure
# Nothing leaves the demo's namespaces.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
DURATION=${DURATION:-10}
PINGS=${PINGS:-200}
DIR=/tmp/warren-demo
LAN_HOST=192.168.77.2

if [[ $(id -u) -ne 0 ]]; then
    echo "subnet.sh: needs root (network namespaces)" >&2
    exit 1
fi
command -v iperf3 >/dev/null || apt-get install -y -q iperf3 >/dev/null

cargo build --release -q -p warren -p warren-coordinator
BIN=$ROOT/target/release
W="$BIN/warren"

cleanup() {
    ip netns del wdemo-lan 2>/dev/null || true
    tests/demo.sh down >/dev/null 2>&1 || true
}
trap cleanup EXIT

WARREN_DEMO_BIN_DIR=$BIN tests/demo.sh up >/tmp/subnet-bench.log 2>&1
ipb=$("$W" --socket "$DIR/b.sock" ip -4)

# b's second LAN and the plain host on it.
ip netns add wdemo-lan
ip -n wdemo-lan link set lo up
ip link add blan netns wdemo-b type veth peer name eth0 netns wdemo-lan
ip -n wdemo-b addr add 192.168.77.1/24 dev blan
ip -n wdemo-b link set blan up
ip -n wdemo-lan addr add $LAN_HOST/24 dev eth0
ip -n wdemo-lan link set eth0 up
ip -n wdemo-lan route add default via 192.168.77.1
ip netns exec wdemo-b sysctl -qw net.ipv4.ip_forward=1

"$W" --socket "$DIR/b.sock" up --advertise-routes 192.168.77.0/24 --reconfigure >/dev/null
"$BIN/warren-coordinator" --data-dir "$DIR/coord" route approve b 192.168.77.0/24 >/dev/null
"$W" --socket "$DIR/a.sock" up --accept-routes --reconfigure >/dev/null
for _ in $(seq 1 100); do
    ip netns exec wdemo-a ping -c1 -W1 $LAN_HOST >/dev/null 2>&1 && break
    sleep 0.2
done
ip netns exec wdemo-a ping -c1 -W1 $LAN_HOST >/dev/null || {
    echo "subnet.sh: the LAN host is not reachable through b" >&2
    "$W" --socket "$DIR/a.sock" status >&2
    exit 1
}
# Let the path settle direct before measuring.
ip netns exec wdemo-a ping -c 20 -i 0.1 -W1 "$ipb" >/dev/null 2>&1 || true
path=$("$W" --socket "$DIR/a.sock" status --json | python3 -c \
    'import json,sys; print(json.load(sys.stdin)["peers"][0]["path"]["kind"])')

# gbits NS IP: iperf3 a → IP (a server in NS), Gbit/s.
gbits() {
    ip netns exec "$1" iperf3 -s -1 -B "$2" >/dev/null 2>&1 &
    local server=$!
    sleep 0.5
    ip netns exec wdemo-a iperf3 -c "$2" -t "$DURATION" -J 2>/dev/null |
        python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))' ||
        echo "-"
    wait "$server" 2>/dev/null || true
}

# rtt IP: "median p90" round trip in ms from a.
rtt() {
    ip netns exec wdemo-a ping -c "$PINGS" -i 0.01 -W1 "$1" 2>/dev/null |
        python3 -c '
import re, sys
t = sorted(float(m.group(1)) for m in re.finditer(r"time=([0-9.]+)", sys.stdin.read()))
print("%.3f %.3f" % (t[len(t) // 2], t[int(len(t) * 0.9)]) if t else "- -")'
}

TO_B=$(gbits wdemo-b "$ipb")
TO_LAN=$(gbits wdemo-lan $LAN_HOST)
read -r B50 B90 <<<"$(rtt "$ipb")"
read -r L50 L90 <<<"$(rtt $LAN_HOST)"

echo
echo "a → b: the path is $path; the LAN host is behind b (source NAT on)"
printf '%-30s %14s %18s %10s\n' "" "to b (router)" "to LAN host via b" "ratio"
ratio() { python3 -c "print('%.2f' % (float('$1') / float('$2')))" 2>/dev/null || echo -; }
printf '%-30s %14s %18s %10s\n' "TCP 1 stream, Gbit/s" "$TO_B" "$TO_LAN" "$(ratio "$TO_LAN" "$TO_B")"
printf '%-30s %14s %18s %10s\n' "round trip median, ms" "$B50" "$L50" "$(ratio "$L50" "$B50")"
printf '%-30s %14s %18s %10s\n' "round trip p90, ms" "$B90" "$L90" "$(ratio "$L90" "$B90")"
