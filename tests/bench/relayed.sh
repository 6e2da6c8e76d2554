#!/usr/bin/env bash
# The relayed path end to end: TCP throughput through the tunnel between
# two agents that can reach each other only through the relay, beside the
# same pair's direct path measured in the same run (issue 19, item 4).
#
# It runs the demo network (tests/demo.sh: a coordinator that is also the
# relay, two hosts behind NAT gateways), measures iperf3 a → b once the
# path is direct, then makes each gateway drop everything addressed to the
# other one (UDP and TCP alike, so neither direct UDP nor direct TCP can
# work), waits until a's status shows the relay, and measures again.
# Each column is one build: the current tree (release), and with
# WARREN_BASE_DIR=DIR the `warren` and `warren-coordinator` in DIR as a
# second column (say, a build of the commit before a change).
#
# Usage (as root):  tests/bench/relayed.sh
#   DURATION=10         seconds per iperf3 run
#   STREAMS=1           parallel iperf3 streams
#   WARREN_BASE_DIR=dir adds a column for the binaries in dir
#   TLS=1               the coordinator and its relay serve TLS, as on real
#                       hosts (tests/demo.sh's WARREN_DEMO_TLS); TLS=0 plain
#                       HTTP, to tell the agents' relay path from TLS's cost
#   PERF=dir            records `perf record -a -g` of the whole machine
#                       during each column's relayed run into
#                       dir/relayed-NAME.data (agents, relay and iperf3
#                       share the cores, so the whole machine is the
#                       profile that says which of them holds it back)
#
# Nothing leaves the demo's namespaces.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
DURATION=${DURATION:-10}
STREAMS=${STREAMS:-1}
export WARREN_DEMO_TLS=${TLS:-1}
DIR=/tmp/warren-demo

if [[ $(id -u) -ne 0 ]]; then
    echo "relayed.sh: needs root (network namespaces)" >&2
    exit 1
fi
command -v iperf3 >/dev/null || apt-get install -y -q iperf3 >/dev/null

cargo build --release -q -p warren -p warren-coordinator
CUR=$ROOT/target/release
COLUMNS=("current:$CUR")
if [[ -n ${WARREN_BASE_DIR:-} ]]; then COLUMNS+=("base:$WARREN_BASE_DIR"); fi

cleanup() { tests/demo.sh down >/dev/null 2>&1 || true; }
trap cleanup EXIT

# path_of BIN: the kind of a's path to its first peer ("direct", "relay", …).
path_of() {
    "$1" --socket "$DIR/a.sock" status --json 2>/dev/null | python3 -c '
import json, sys
try:
    s = json.load(sys.stdin)
    print(s["peers"][0]["path"]["kind"])
except Exception:
    print("none")'
}

# wait_path BIN KIND IP: pings b until a's path is KIND (30 s at most).
wait_path() {
    local i
    for i in $(seq 1 150); do
        [[ $(path_of "$1") == "$2" ]] && return 0
        ip netns exec wdemo-a ping -c1 -W1 "$3" >/dev/null 2>&1 || true
        sleep 0.2
    done
    echo "relayed.sh: the path never became $2 (it is $(path_of "$1"))" >&2
    return 1
}

# gbits IP: iperf3 a → b, in Gbit/s.
gbits() {
    ip netns exec wdemo-b iperf3 -s -1 -B "$1" >/dev/null 2>&1 &
    local server=$!
    sleep 0.5
    ip netns exec wdemo-a iperf3 -c "$1" -t "$DURATION" -P "$STREAMS" -J 2>/dev/null |
        python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9))' ||
        echo "-"
    wait "$server" 2>/dev/null || true
}

declare -A DIRECT RELAYED
for col in "${COLUMNS[@]}"; do
    name=${col%%:*} bin_dir=${col#*:}
    echo "== $name ($bin_dir)" >&2
    WARREN_DEMO_BIN_DIR=$bin_dir tests/demo.sh up >/tmp/relayed-bench-$name.log 2>&1
    ipb=$("$bin_dir/warren" --socket "$DIR/b.sock" ip -4)
    wait_path "$bin_dir/warren" direct "$ipb"
    DIRECT[$name]=$(gbits "$ipb")
    echo "   direct: ${DIRECT[$name]} Gbit/s" >&2
    for pair in "wdemo-gwa 11.11.0.2" "wdemo-gwb 11.11.0.1"; do
        set -- $pair
        printf 'table ip bench {\n chain block { type filter hook forward priority -10; ip daddr %s drop; }\n}\n' "$2" |
            ip netns exec "$1" nft -f -
    done
    wait_path "$bin_dir/warren" relay "$ipb"
    perf_pid=
    if [[ -n ${PERF:-} ]]; then
        mkdir -p "$PERF"
        (sleep 2 && perf record -q -F 499 -a -g -o "$PERF/relayed-$name.data" \
            -- sleep $((DURATION > 4 ? DURATION - 3 : 1)) >/dev/null 2>&1) &
        perf_pid=$!
    fi
    RELAYED[$name]=$(gbits "$ipb")
    [[ -z $perf_pid ]] || wait "$perf_pid" || true
    echo "   relayed: ${RELAYED[$name]} Gbit/s" >&2
    tests/demo.sh down >/dev/null
done

echo
printf '%-44s' "TCP a→b, $STREAMS stream(s), Gbit/s, relay $([[ $WARREN_DEMO_TLS = 1 ]] && echo TLS || echo plain)"
for col in "${COLUMNS[@]}"; do printf '%12s' "${col%%:*}"; done
echo
printf '%-44s' "direct"
for col in "${COLUMNS[@]}"; do printf '%12s' "${DIRECT[${col%%:*}]}"; done
echo
printf '%-44s' "relayed"
for col in "${COLUMNS[@]}"; do printf '%12s' "${RELAYED[${col%%:*}]}"; done
echo
printf '%-44s' "relayed / direct"
for col in "${COLUMNS[@]}"; do
    n=${col%%:*}
    printf '%12s' "$(python3 -c "print('%.2f' % (float('${RELAYED[$n]}') / float('${DIRECT[$n]}')))" 2>/dev/null || echo -)"
done
echo
