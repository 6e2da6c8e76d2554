#!/usr/bin/env bash
# Data-plane benchmark: every tunnel between the same two network namespaces
# joined by one veth link, measured in one run:
#   plain          the veth link itself, no tunnel
#   warren         release build, one agent per namespace (offload on)
#   warren-nooff   the same with `offload = false` (per-packet TUN and UDP IO)
#   warren-policy  `warren` with 1,000 peers on each side (999 of them
#                  never heard from) and a packet filter of 1,000 rules,
#                  one per peer (`[interface] filter_file`): the cost of
#                  an access policy, printed beside `warren` at the end
#   warren-peers   `warren` with the same 1,000 peers and no filter: with
#                  it the policy's own cost is printed apart from the
#                  cost of the peers
#   wireguard-go   Debian's wireguard-go, configured with `wg set`
#   boringtun      `boringtun-cli` from crates.io (installed by this script
#                  into target/bench-tools; its column is skipped, with the
#                  reason printed, when the install fails)
# For each: iperf3 TCP with 1 and 4 streams, UDP packets per second at 64-byte
# payloads (iperf3 -u -l 64 -b 0 -w 4M: received pps and loss), ping RTT median
# (200 pings, 10 ms apart) and the latency the tunnel adds over the plain
# link, CPU seconds per GB moved (utime+stime of both tunnel processes over
# the two TCP runs, from /proc/PID/stat) and resident memory (VmRSS, the
# larger of the two sides, after the traffic). Every figure is also printed
# as a ratio to wireguard-go's: absolute figures swing with machine load, the
# ratios from one run are what to compare.
#
# Usage (as root):  tests/bench/throughput.sh
#   DURATION=10           seconds per iperf3 run
#   WARREN_BIN=path       use this warren binary instead of building target/release/warren
#   SYSTEMS="plain warren warren-peers warren-policy warren-nooff wireguard-go boringtun"   which columns to run
#   WARREN_BASE_BIN=path  adds a column `warren-base` for another warren build
#                         (offload on), to compare a change in the same run
#   PINGS=200             pings per latency figure
#   BUSY_POLL_US=N        the agents' [agent] busy_poll_us (default: the
#                         agent's own, 200; 0 turns the spin off)
#   ONLY=latency          ping figures only (median and 90th percentile), no
#                         iperf3: a quick loop for latency work
#   PERF=dir              records `perf record -g` of warren's two agents
#                         during the ping, TCP 1-stream and 64-byte phases into
#                         dir/<phase>.data and prints the top symbols of each:
#                         where the time goes when a target is missed
#
# Everything lives in two namespaces wb-<pid>-a/b on 10.99.0.0/24 with no
# route out; a trap removes them and every process on exit.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "throughput.sh: must run as root (it creates network namespaces and TUN devices)" >&2
    exit 1
fi
for tool in ip iperf3 wireguard-go wg ping jq awk getconf; do
    command -v "$tool" >/dev/null || { echo "throughput.sh: $tool not installed" >&2; exit 1; }
done

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DURATION=${DURATION:-10}
SYSTEMS=${SYSTEMS:-plain warren warren-peers warren-policy warren-nooff wireguard-go boringtun}
PINGS=${PINGS:-200}
ONLY=${ONLY:-}
HZ=$(getconf CLK_TCK)
if [[ -z ${WARREN_BIN:-} ]]; then
    echo "building warren (release)..." >&2
    (cd "$ROOT" && cargo build --release --bin warren >&2)
    WARREN_BIN=$ROOT/target/release/warren
fi

NA=wb-$$-a
NB=wb-$$-b
# wireguard-go's and boringtun's UAPI socket dir is global: names must be unique.
WGA=wg$$a
WGB=wg$$b
BTA=bt$$a
BTB=bt$$b
TMP=$(mktemp -d /tmp/warren-bench-XXXXXX)
PIDS=()    # every background process, for the trap
TUNNEL=()  # the current system's tunnel processes (both sides)

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
    for s in "$WGA" "$WGB" "$BTA" "$BTB"; do rm -f "/var/run/wireguard/$s.sock"; done
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
    return 1
}

stop() { # PID: SIGTERM and wait (bounded)
    kill "$1" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$1" 2>/dev/null || true
}

# cpu_ticks: utime+stime of the current tunnel processes, in clock ticks.
# The comm field may hold spaces, so fields are counted after its ')'.
cpu_ticks() {
    local total=0 pid t
    for pid in "${TUNNEL[@]}"; do
        t=$(sed 's/.*) //' "/proc/$pid/stat" | awk '{ print $12 + $13 }')
        total=$((total + t))
    done
    echo "$total"
}

# wakeups: voluntary context switches of every thread of the current
# tunnel processes.
wakeups() {
    local pid
    for pid in "${TUNNEL[@]}"; do cat /proc/"$pid"/task/*/status; done |
        awk '/^voluntary_ctxt_switches:/ { s += $2 } END { print s + 0 }'
}

# rss_mb: the largest VmRSS of the current tunnel processes, in MB.
rss_mb() {
    local pid
    for pid in "${TUNNEL[@]}"; do awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status"; done |
        sort -n | tail -1 | awk '{ printf "%.1f", $1 / 1024 }'
}

# iperf ADDR ARGS...: one iperf3 client run from A to the server in B; JSON out.
iperf() {
    local addr=$1
    shift
    inA timeout $((DURATION + 30)) iperf3 -c "$addr" -p 5201 -t "$DURATION" \
        --connect-timeout 3000 -J "$@"
}

# ping_rtts ADDR: RTTs (ms, sorted) of $PINGS pings from A, 10 ms apart.
ping_rtts() {
    inA ping -n -c "$PINGS" -i 0.01 -W 1 "$1" |
        sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' | sort -n
}

# median / p90: of sorted numbers on stdin.
median() {
    awk '{ v[NR] = $1 } END { if (NR == 0) exit 1; print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
p90() {
    awk '{ v[NR] = $1 } END { if (NR == 0) exit 1; i = int(NR * 0.9); if (i < 1) i = 1; print v[i] }'
}

declare -A R # R[system,metric]

# perf_start PHASE / perf_stop: profile warren's agents during one phase
# (only with PERF=dir, only for the `warren` column).
PERF_PID=
perf_start() {
    [[ -n ${PERF:-} && $sys == warren && ${#TUNNEL[@]} -gt 0 ]] || return 0
    mkdir -p "$PERF"
    local pids
    pids=$(IFS=,; echo "${TUNNEL[*]}")
    perf record -q -F 2999 -g -p "$pids" -o "$PERF/$1.data" >/dev/null 2>&1 &
    PERF_PID=$!
    PIDS+=("$PERF_PID")
    sleep 0.5
}
perf_stop() {
    [[ -n $PERF_PID ]] || return 0
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    PERF_PID=
}
perf_top() { # prints the top symbols of every recorded phase
    [[ -n ${PERF:-} ]] || return 0
    local f
    for f in "$PERF"/*.data; do
        [[ -f $f ]] || continue
        echo
        echo "perf: $(basename "$f" .data), warren agents, self time by symbol (top 20)"
        perf report -i "$f" --no-children -g none --sort dso,sym --percent-limit 1 --stdio 2>/dev/null |
            grep -E '^ +[0-9]' | head -20
    done
}

# bench NAME ADDR: every measurement through the path to ADDR (in B).
bench() {
    local sys=$1 addr=$2 j bytes c0 c1
    ip netns exec "$NB" iperf3 -s -B "$addr" -p 5201 >"$TMP/iperf3-$sys.log" 2>&1 &
    local spid=$!
    PIDS+=("$spid")
    wait_for 5 "iperf3 server on $addr" sh -c "ip netns exec $NB ss -ltn | grep -q '$addr:5201'"
    # Latency first, on an idle tunnel: after the UDP flood, queues that are
    # still draining would be measured instead of the path.
    echo "  $sys: ping x$PINGS..." >&2
    local w0 w1
    w0=$(wakeups)
    perf_start ping
    ping_rtts "$addr" >"$TMP/rtt-$sys"
    perf_stop
    w1=$(wakeups)
    # Context switches of the tunnel processes per ping (both sides): how
    # often a round trip puts a thread to sleep and wakes it again.
    R[$sys,wakes]=$(awk -v a="$w0" -v b="$w1" -v n="$PINGS" 'BEGIN { printf "%.1f", (b - a) / n }')
    R[$sys,rtt]=$(median <"$TMP/rtt-$sys")
    R[$sys,rtt90]=$(p90 <"$TMP/rtt-$sys")
    if [[ $ONLY == latency ]]; then
        stop "$spid"
        return
    fi
    echo "  $sys: TCP 1 stream, ${DURATION}s..." >&2
    c0=$(cpu_ticks)
    perf_start tcp1
    j=$(iperf "$addr")
    perf_stop
    R[$sys,tcp1]=$(jq '.end.sum_received.bits_per_second / 1e6' <<<"$j")
    bytes=$(jq '.end.sum_received.bytes' <<<"$j")
    echo "  $sys: TCP 4 streams, ${DURATION}s..." >&2
    j=$(iperf "$addr" -P 4)
    R[$sys,tcp4]=$(jq '.end.sum_received.bits_per_second / 1e6' <<<"$j")
    bytes=$((bytes + $(jq '.end.sum_received.bytes' <<<"$j")))
    c1=$(cpu_ticks)
    if ((${#TUNNEL[@]})); then
        R[$sys,cpu]=$(awk -v t=$((c1 - c0)) -v hz="$HZ" -v b="$bytes" 'BEGIN { printf "%.2f", t / hz / (b / 1e9) }')
    fi
    echo "  $sys: UDP 64-byte packets, ${DURATION}s..." >&2
    # -w 4M: the receiving iperf3's socket buffer. With the default 208 KB a
    # burst of coalesced datagrams (UDP GRO on the TUN write) overflows the
    # server's socket, and the figure measures iperf3, not the tunnel.
    perf_start udp64
    j=$(iperf "$addr" -u -l 64 -b 0 -w 4M)
    perf_stop
    R[$sys,pps]=$(jq '.end.sum_received.bytes / 64 / .end.sum_received.seconds / 1000' <<<"$j")
    R[$sys,loss]=$(jq '.end.sum.lost_percent' <<<"$j")
    if ((${#TUNNEL[@]})); then R[$sys,rss]=$(rss_mb); fi
    stop "$spid"
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

# --- warren
warren_conf() { # PRIVATE ADDR PEER_PUB PEER_OVERLAY PEER_ENDPOINT OFFLOAD BINARY [FILTER [PEERS]]
    # Each agent its own local API socket (the default path is machine-wide);
    # builds older than the local API (an A/B base) know no `[agent]`.
    if "$7" --help 2>/dev/null | grep -q -- --socket; then
        printf '[agent]\nsocket = "%s"\n' "$TMP/warren-$2.sock"
        if [[ -n ${BUSY_POLL_US:-} ]]; then printf 'busy_poll_us = %s\n' "$BUSY_POLL_US"; fi
    fi
    local filter=
    if [[ -n ${8:-} ]]; then filter="filter_file = \"$8\""; fi
    cat <<CONF
[interface]
name = "warren0"
private_key = "$1"
listen_port = 51820
addresses = ["$2/24"]
offload = $6
$filter
[[peer]]
public_key = "$3"
allowed_ips = ["$4/32"]
endpoint = "$5:51820"
CONF
    if [[ -n ${9:-} ]]; then cat "$TMP/fake-peers.toml"; fi
}

# fake_ip I: the overlay address of fake peer I (1..999), outside the /24.
fake_ip() { echo "100.64.$((4 + $1 / 250)).$(($1 % 250 + 1))"; }

# policy_files: 999 peers that never send (random keys) and, per side, a
# filter of 1,000 rules: one per peer, the real one's letting in iperf3
# (TCP and UDP 5201) and ping, as `policy filter --json` would compile a
# policy of one rule per user.
policy_files() {
    local i side me peer
    : >"$TMP/fake-peers.toml"
    for i in $(seq 1 999); do
        printf '[[peer]]\npublic_key = "%s"\nallowed_ips = ["%s/32"]\n' \
            "$(head -c 32 /dev/urandom | base64)" "$(fake_ip "$i")" >>"$TMP/fake-peers.toml"
    done
    for side in a b; do
        if [[ $side == a ]]; then me=100.64.0.1 peer=100.64.0.2; else me=100.64.0.2 peer=100.64.0.1; fi
        {
            printf '[{"proto":[6,17,1],"src":["%s/32"],"dst":[{"net":"%s/32","ports":[5201,5201]}]}' "$peer" "$me"
            for i in $(seq 1 999); do
                printf ',\n{"proto":[6,17],"src":["%s/32"],"dst":[{"net":"%s/32","ports":[%d,%d]}]}' \
                    "$(fake_ip "$i")" "$me" $((10000 + i)) $((10000 + i))
            done
            echo ']'
        } >"$TMP/filter-$side.json"
    done
}
run_warren() { # SYSTEM OFFLOAD BINARY [peers|policy]
    local ka kb pa pb bin=$3 fa= fb= many=
    ka=$("$bin" genkey)
    kb=$("$bin" genkey)
    pa=$("$bin" pubkey <<<"$ka")
    pb=$("$bin" pubkey <<<"$kb")
    if [[ -n ${4:-} ]]; then
        [[ -f $TMP/fake-peers.toml ]] || policy_files
        many=yes
    fi
    if [[ ${4:-} == policy ]]; then
        fa=$TMP/filter-a.json fb=$TMP/filter-b.json
    fi
    warren_conf "$ka" 100.64.0.1 "$pb" 100.64.0.2 10.99.0.2 "$2" "$bin" "$fa" "$many" >"$TMP/a.toml"
    warren_conf "$kb" 100.64.0.2 "$pa" 100.64.0.1 10.99.0.1 "$2" "$bin" "$fb" "$many" >"$TMP/b.toml"
    # Not through inA/inB: `$!` of a backgrounded function is a subshell's
    # pid, and the CPU and RSS figures need the agent's own.
    ip netns exec "$NA" "$bin" agent --config "$TMP/a.toml" >"$TMP/$1-a.log" 2>&1 &
    TUNNEL=("$!")
    ip netns exec "$NB" "$bin" agent --config "$TMP/b.toml" >"$TMP/$1-b.log" 2>&1 &
    TUNNEL+=("$!")
    PIDS+=("${TUNNEL[@]}")
    wait_for 15 "warren tunnel" inA ping -c1 -W1 100.64.0.2
    bench "$1" 100.64.0.2
}

# --- wireguard-go and boringtun: both are driven over the UAPI with `wg set`.
uapi_pair() { # SYSTEM IF_A IF_B SUBNET PORT COMMAND...
    local sys=$1 ia=$2 ib=$3 net=$4 port=$5
    shift 5
    (umask 077 && wg genkey >"$TMP/$sys-a.key" && wg genkey >"$TMP/$sys-b.key")
    TUNNEL=()
    local ns ifn key peer me them ep
    for side in a b; do
        if [[ $side == a ]]; then
            ns=$NA ifn=$ia key=$TMP/$sys-a.key peer=$TMP/$sys-b.key me=1 them=2 ep=10.99.0.2
        else
            ns=$NB ifn=$ib key=$TMP/$sys-b.key peer=$TMP/$sys-a.key me=2 them=1 ep=10.99.0.1
        fi
        ip netns exec "$ns" "$@" "$ifn" >"$TMP/$sys-$side.log" 2>&1 &
        TUNNEL+=("$!")
        PIDS+=("$!")
        wait_for 10 "$sys $ifn" test -S "/var/run/wireguard/$ifn.sock" || return 1
        ip netns exec "$ns" wg set "$ifn" private-key "$key" listen-port "$port" \
            peer "$(wg pubkey <"$peer")" allowed-ips "$net.$them/32" endpoint "$ep:$port"
        ip netns exec "$ns" ip addr add "$net.$me/24" dev "$ifn"
        ip netns exec "$ns" ip link set "$ifn" up
    done
    wait_for 15 "$sys tunnel" inA ping -c1 -W1 "$net.2" || return 1
    bench "$sys" "$net.2"
}

# boringtun_bin: path of boringtun-cli, installing it once into target/.
boringtun_bin() {
    local dir=$ROOT/target/bench-tools
    if [[ ! -x $dir/bin/boringtun-cli ]]; then
        echo "installing boringtun-cli into $dir (once)..." >&2
        cargo install boringtun-cli --locked --root "$dir" >"$TMP/boringtun-install.log" 2>&1 ||
            { tail -5 "$TMP/boringtun-install.log" >&2; return 1; }
    fi
    echo "$dir/bin/boringtun-cli"
}

declare -A SKIPPED
stop_tunnel() {
    local pid
    for pid in "${TUNNEL[@]}"; do stop "$pid"; done
    TUNNEL=()
}
for sys in $SYSTEMS; do
    echo "$sys:" >&2
    case $sys in
        plain) TUNNEL=(); bench plain 10.99.0.2 ;;
        warren) run_warren warren true "$WARREN_BIN" ;;
        warren-peers) run_warren warren-peers true "$WARREN_BIN" peers ;;
        warren-policy) run_warren warren-policy true "$WARREN_BIN" policy ;;
        warren-nooff) run_warren warren-nooff false "$WARREN_BIN" ;;
        warren-base)
            if [[ -x ${WARREN_BASE_BIN:-} ]]; then
                run_warren warren-base true "$WARREN_BASE_BIN"
            else
                SKIPPED[$sys]="WARREN_BASE_BIN is not set to an executable"
            fi ;;
        wireguard-go)
            uapi_pair wireguard-go "$WGA" "$WGB" 100.65.0 51821 wireguard-go -f ||
                SKIPPED[$sys]="did not come up (see above)" ;;
        boringtun)
            if bt=$(boringtun_bin); then
                uapi_pair boringtun "$BTA" "$BTB" 100.66.0 51822 \
                    env WG_SUDO=1 "$bt" --foreground --disable-drop-privileges ||
                    SKIPPED[$sys]="did not come up (see above)"
            else
                SKIPPED[$sys]="cargo install boringtun-cli failed"
            fi ;;
        *) echo "throughput.sh: unknown system $sys" >&2; exit 2 ;;
    esac
    stop_tunnel
done

# --- report
cols=()
for sys in $SYSTEMS; do [[ -n ${SKIPPED[$sys]:-} ]] || cols+=("$sys"); done
for sys in $SYSTEMS; do
    [[ -n ${R[$sys,rtt]:-} && -n ${R[plain,rtt]:-} ]] &&
        R[$sys,added]=$(awk -v a="${R[$sys,rtt]}" -v b="${R[plain,rtt]}" 'BEGIN { printf "%.3f", a - b }')
    [[ -n ${R[$sys,rtt90]:-} && -n ${R[plain,rtt90]:-} ]] &&
        R[$sys,added90]=$(awk -v a="${R[$sys,rtt90]}" -v b="${R[plain,rtt90]}" 'BEGIN { printf "%.3f", a - b }')
done
# cell SYSTEM METRIC: "value (ratio x)", the ratio to wireguard-go's figure.
cell() {
    local v=${R[$1,$2]:-} g=${R[wireguard-go,$2]:-}
    [[ -n $v ]] || { echo "-"; return; }
    awk -v v="$v" -v g="$g" 'BEGIN {
        f = (v >= 100 || v <= -100) ? sprintf("%.0f", v) : sprintf("%.3g", v)
        if (g != "" && g + 0 != 0) printf "%s (%.2fx)", f, v / g; else printf "%s", f
    }'
}
echo
echo "warren data-plane benchmark, one veth between two namespaces, ${DURATION}s per iperf3 run"
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores; ratios are to wireguard-go"
printf '%-24s' "metric"
for sys in "${cols[@]}"; do printf ' %18s' "$sys"; done
echo
for m in "tcp1:TCP 1 stream Mbit/s" "tcp4:TCP 4 streams Mbit/s" "pps:UDP 64B kpps received" \
    "loss:UDP 64B loss %" "rtt:ping RTT median ms" "added:added latency ms" \
    "rtt90:ping RTT p90 ms" "added90:added latency p90 ms" "wakes:thread wakes per ping" \
    "cpu:CPU s per GB" "rss:RSS MB"; do
    printf '%-24s' "${m#*:}"
    for sys in "${cols[@]}"; do printf ' %18s' "$(cell "$sys" "${m%%:*}")"; done
    echo
done
for sys in "${!SKIPPED[@]}"; do echo "skipped $sys: ${SKIPPED[$sys]}"; done
# What the access policy costs: warren-policy against warren (and against
# the same 1,000 peers without a filter), same run.
for base in warren warren-peers; do
    [[ -n ${R[warren-policy,tcp1]:-} && -n ${R[$base,tcp1]:-} ]] || continue
    echo
    echo "warren-policy (1,000 rules over 1,000 peers) against $base, same run:"
    for m in "tcp1:TCP 1 stream" "tcp4:TCP 4 streams" "pps:UDP 64B pps" "rtt:ping RTT median" "cpu:CPU s per GB"; do
        awk -v p="${R[warren-policy,${m%%:*}]}" -v w="${R[$base,${m%%:*}]}" -v what="${m#*:}" \
            'BEGIN { printf "  %-20s %10.3g vs %10.3g (%+.1f%%)\n", what, p, w, (p - w) / w * 100 }'
    done
done
perf_top
