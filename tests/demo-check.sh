#!/usr/bin/env bash
# The README's first command, checked as a new user would try it: runs
# `tests/demo.sh up` exactly as written, pings host b from host a over the
# overlay, checks that host a's `warren status` lists b as a peer, runs
# `tests/demo.sh down`, and checks that nothing is left behind (no demo
# namespace, no demo process, no demo directory). .ci/run calls it before
# the test command; it needs root, as the demo does.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=/tmp/warren-demo
fail() {
    echo "demo-check: $*" >&2
    [ -d "$DIR" ] && tail -n 30 "$DIR"/*.log >&2 || true
    tests/demo.sh down >/dev/null 2>&1 || true
    exit 1
}

tests/demo.sh up || fail "tests/demo.sh up failed"

profile=${WARREN_DEMO_PROFILE:-dev}
[ "$profile" = dev ] && profile=debug
bin=$PWD/target/$profile/warren
ipb=$("$bin" --socket "$DIR/b.sock" ip -4) || fail "host b has no overlay address"
ip netns exec wdemo-a ping -c 3 -W 2 "$ipb" || fail "no ping from host a to b ($ipb) over the overlay"

status=$("$bin" --socket "$DIR/a.sock" status --json) || fail "warren status failed on host a"
peer=$(printf '%s' "$status" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(" ".join(p.get("hostname") or "" for p in s.get("peers", [])))
') || fail "warren status --json is not JSON: $status"
case " $peer " in
    *" b "*) echo "demo-check: host a's status lists peer b" ;;
    *) fail "host a's status does not list peer b (peers: '$peer')" ;;
esac
"$bin" --socket "$DIR/a.sock" status

# Names: b by its short name through a's resolver and resolv.conf.
got=$(ip netns exec wdemo-a getent ahostsv4 b | awk 'NR==1 {print $1}') || true
[ "$got" = "$ipb" ] || fail "host a does not resolve b to $ipb (got '$got')"
echo "demo-check: host a resolves b to $ipb"
# By name over both families: the resolver's own addresses on the TUN must
# never become the source of the overlay's traffic.
ip netns exec wdemo-a ping -4 -c 2 -W 2 b >/dev/null || fail "no ping from a to b by name over IPv4"
ip netns exec wdemo-a ping -6 -c 2 -W 2 b >/dev/null || fail "no ping from a to b by name over IPv6"
echo "demo-check: host a pings b by name over IPv4 and IPv6"

tests/demo.sh down || fail "tests/demo.sh down failed"

left=$(ip netns list | awk '$1 ~ /^wdemo-/ { print $1 }')
[ -z "$left" ] || fail "namespaces left behind: $left"
procs=$(pgrep -af "$DIR" || true)
[ -z "$procs" ] || fail "processes left behind: $procs"
[ ! -e "$DIR" ] || fail "$DIR left behind"
for h in a b; do [ ! -e "/etc/netns/wdemo-$h" ] || fail "/etc/netns/wdemo-$h left behind"; done
echo "demo-check: up, ping across, status, down: nothing left behind"
