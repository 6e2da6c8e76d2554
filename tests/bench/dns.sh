#!/usr/bin/env bash
# The resolver's figures (issue 17): answers per second and p50/p99
# latency for a mesh name, and for a forwarded name with a warm cache and
# without one (a fresh name per query), each beside the upstream resolver
# queried directly in the same run.
#
# It runs the demo network (tests/demo.sh) in release, starts dnsmasq in
# host a's namespace on 127.0.0.2 (answering anything under bench.example)
# and makes it host a's own resolver (a's /etc/resolv.conf, which warren
# takes as the host's and forwards to). tests/bench/dnsload.py then
# queries 100.100.100.100 and 127.0.0.2 from inside host a.
#
# Usage (as root):  tests/bench/dns.sh
#   SECONDS_PER=6   seconds per figure (a third for latency, one query at
#                   a time; the rest for throughput, 32 in flight)
# Nothing leaves the demo's namespaces.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
SECS=${SECONDS_PER:-6}
DIR=/tmp/warren-demo

if [[ $(id -u) -ne 0 ]]; then
    echo "dns.sh: needs root (network namespaces)" >&2
    exit 1
fi
command -v dnsmasq >/dev/null || apt-get install -y -q --no-install-recommends dnsmasq-base >/dev/null

cargo build --release -q -p warren -p warren-coordinator
BIN=$ROOT/target/release
cleanup() {
    [[ -f $DIR/bench-dnsmasq.pid ]] && kill "$(cat "$DIR/bench-dnsmasq.pid")" 2>/dev/null || true
    tests/demo.sh down >/dev/null 2>&1 || true
}
trap cleanup EXIT
WARREN_DEMO_BIN_DIR=$BIN tests/demo.sh up >/tmp/dns-bench.log 2>&1

ip netns exec wdemo-a ip addr add 127.0.0.2/8 dev lo 2>/dev/null || true
ip netns exec wdemo-a dnsmasq --no-resolv --no-hosts --bind-interfaces \
    --listen-address=127.0.0.2 --address=/bench.example/198.51.100.7 \
    --local-ttl=300 --cache-size=10000 --user=root --pid-file="$DIR/bench-dnsmasq.pid"
# The host's own resolver is now dnsmasq: warren takes the rewrite.
printf 'nameserver 127.0.0.2\n' > /etc/netns/wdemo-a/resolv.conf
for _ in $(seq 1 50); do
    "$BIN/warren" --socket "$DIR/a.sock" dns status --json | grep -q '127.0.0.2' && break
    sleep 0.1
done

load() { ip netns exec wdemo-a python3 tests/bench/dnsload.py "$@" --seconds "$SECS"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }

MESH=$(load 100.100.100.100 b.warren.internal)
WARM=$(load 100.100.100.100 www.bench.example)
COLD=$(load 100.100.100.100 bench.example --unique)
UP_WARM=$(load 127.0.0.2 www.bench.example)
UP_COLD=$(load 127.0.0.2 bench.example --unique)

row() {
    printf '%-32s %10s %9s %9s   %10s %9s %9s\n' "$1" \
        "$(field "$2" qps)" "$(field "$2" p50_ms)" "$(field "$2" p99_ms)" \
        "${3:+$(field "$3" qps)}" "${3:+$(field "$3" p50_ms)}" "${3:+$(field "$3" p99_ms)}"
}
echo
printf '%-32s %30s   %30s\n' "" "warren's resolver" "the upstream directly"
printf '%-32s %10s %9s %9s   %10s %9s %9s\n' "" "q/s" "p50 ms" "p99 ms" "q/s" "p50 ms" "p99 ms"
row "a mesh name" "$MESH" ""
row "forwarded, warm cache" "$WARM" "$UP_WARM"
row "forwarded, a new name each time" "$COLD" "$UP_COLD"
echo "(lost queries: mesh $(field "$MESH" lost), warm $(field "$WARM" lost), cold $(field "$COLD" lost))"
