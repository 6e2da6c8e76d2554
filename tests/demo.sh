#!/usr/bin/env bash
# Starts a small working warren network on this machine, in network
# namespaces: a coordinator ("wdemo-coord", also STUN server and relay) on
# an "internet" namespace, and two hosts ("wdemo-a", "wdemo-b"), each behind
# its own NAT gateway. Each host runs a warren agent that joins the network
# with `warren up` and a token; the peers come from the coordinator's map,
# traffic starts on the relay and turns direct through the NATs.
#
#   tests/demo.sh up      build, create the namespaces, start it all
#
# It builds the dev profile (the tunnel's hot crates are optimised there,
# see Cargo.toml): a first build takes half the time of a release build,
# and `tests/run.sh` reuses it. Set WARREN_DEMO_PROFILE=release for a
# release build, or WARREN_DEMO_BIN_DIR=DIR to build nothing and run the
# `warren` and `warren-coordinator` in DIR (tests/bench/relayed.sh runs
# two builds that way). WARREN_DEMO_TLS=1 serves the coordinator and
# relay over TLS with a certificate made for the run (openssl), which the
# agents trust with `up --ca-file`, as on real hosts.
#   tests/demo.sh down    stop everything and remove it
#
# Everything stays inside the namespaces; nothing is routed out.
set -euo pipefail

cd "$(dirname "$0")/.."
DIR=/tmp/warren-demo
NS=(wdemo-inet wdemo-coord wdemo-gwa wdemo-gwb wdemo-a wdemo-b)
PROFILE=${WARREN_DEMO_PROFILE:-dev}
OUT=$PROFILE
[ "$PROFILE" = dev ] && OUT=debug

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "demo.sh: network namespaces need root (CAP_NET_ADMIN); run with sudo" >&2
        exit 1
    fi
}

# Every process still running in a demo namespace.
demo_pids() {
    local ns
    for ns in "${NS[@]}"; do ip netns pids "$ns" 2>/dev/null || true; done
}

down() {
    # SIGTERM lets the agents remove their TUN devices and port mappings;
    # what has not exited after 5 s is killed, so nothing outlives `down`.
    local pids
    pids=$(demo_pids)
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill $pids 2>/dev/null || true
        for _ in $(seq 1 50); do
            [ -z "$(demo_pids)" ] && break
            sleep 0.1
        done
        pids=$(demo_pids)
        # shellcheck disable=SC2086
        [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    fi
    for ns in "${NS[@]}"; do
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    rm -rf "$DIR"
}

# sudo resets PATH (secure_path), which drops rustup's ~/.cargo/bin: look
# there for the invoking user's toolchain before giving up.
find_cargo() {
    command -v cargo >/dev/null && return 0
    local home
    for home in "${SUDO_USER:+$(getent passwd "$SUDO_USER" | cut -d: -f6)}" "$HOME"; do
        if [ -n "$home" ] && [ -x "$home/.cargo/bin/cargo" ]; then
            export PATH="$home/.cargo/bin:$PATH"
            return 0
        fi
    done
    echo "demo.sh: cargo is missing: install Rust with rustup (https://rustup.rs)" >&2
    exit 1
}

link() { # link NS1 IF1 NS2 IF2
    ip link add "$2" netns "$1" type veth peer name "$4" netns "$3"
    ip -n "$1" link set "$2" up
    ip -n "$3" link set "$4" up
}

build() {
    find_cargo
    # The agent and the coordinator are two packages of the workspace; the
    # root package is the default member, so `--bin warren-coordinator`
    # alone is not found there (issue 14). Select both packages by name.
    if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
        # Under sudo, build as the user who owns the checkout, so target/
        # stays theirs and their rustup toolchain is the one used.
        sudo -u "$SUDO_USER" env "PATH=$PATH" cargo build --profile "$PROFILE" -p warren -p warren-coordinator
    else
        cargo build --profile "$PROFILE" -p warren -p warren-coordinator
    fi
}

up() {
    need_root
    if ! command -v nft >/dev/null || ! command -v ping >/dev/null || ! command -v ip >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 nftables iputils-ping
    fi
    local bin cbin
    if [ -n "${WARREN_DEMO_BIN_DIR:-}" ]; then
        bin=$WARREN_DEMO_BIN_DIR/warren
        cbin=$WARREN_DEMO_BIN_DIR/warren-coordinator
    else
        build
        bin=$PWD/target/$OUT/warren
        cbin=$PWD/target/$OUT/warren-coordinator
    fi
    down
    mkdir -p "$DIR"
    for ns in "${NS[@]}"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
    # Each host's own /etc/resolv.conf (`ip netns exec` mounts it over the
    # machine's): the agents point it at their resolver, so names work
    # inside the demo and the machine's own DNS is never touched.
    for h in a b; do
        mkdir -p "/etc/netns/wdemo-$h"
        printf '# warren demo\nnameserver 192.0.2.53\n' > "/etc/netns/wdemo-$h/resolv.conf"
    done

    # The internet: a bridge in wdemo-inet; gateways at 11.11.0.1 and .2,
    # the coordinator at 11.11.0.10.
    ip -n wdemo-inet link add br0 type bridge
    ip -n wdemo-inet link set br0 up
    link wdemo-inet ia wdemo-gwa wan
    link wdemo-inet ib wdemo-gwb wan
    link wdemo-inet ic wdemo-coord wan
    for i in ia ib ic; do ip -n wdemo-inet link set $i master br0; done
    ip -n wdemo-gwa addr add 11.11.0.1/24 dev wan
    ip -n wdemo-gwb addr add 11.11.0.2/24 dev wan
    ip -n wdemo-coord addr add 11.11.0.10/24 dev wan

    # Homes: 10.0.1.0/24 behind gwa, 10.0.2.0/24 behind gwb.
    link wdemo-gwa lan wdemo-a eth0
    link wdemo-gwb lan wdemo-b eth0
    ip -n wdemo-gwa addr add 10.0.1.1/24 dev lan
    ip -n wdemo-gwb addr add 10.0.2.1/24 dev lan
    ip -n wdemo-a addr add 10.0.1.2/24 dev eth0
    ip -n wdemo-b addr add 10.0.2.2/24 dev eth0
    ip -n wdemo-a route add default via 10.0.1.1
    ip -n wdemo-b route add default via 10.0.2.1
    for gw in wdemo-gwa wdemo-gwb; do
        ip netns exec $gw sysctl -qw net.ipv4.ip_forward=1
        # Masquerade, and drop unsolicited packets on the WAN side as a home
        # router does.
        printf '%s\n' 'table ip nat {' \
            '  chain post { type nat hook postrouting priority 100; oifname "wan" masquerade; }' \
            '}' 'table ip filter {' \
            '  chain input { type filter hook input priority 0; iifname "wan" ct state new drop; }' \
            '}' | ip netns exec $gw nft -f -
    done

    # The coordinator: control API and relay on TCP 443 (plain HTTP, which
    # --insecure-http allows for labs, or TLS), STUN on UDP 3478.
    local url=http://11.11.0.10:443 serve_tls=(--insecure-http) agent_plain='insecure_http = true\n' ca=()
    mkdir -p "$DIR"
    if [ "${WARREN_DEMO_TLS:-0}" = 1 ]; then
        command -v openssl >/dev/null || { echo "demo.sh: WARREN_DEMO_TLS=1 needs openssl" >&2; exit 1; }
        # A CA the agents trust, and the coordinator's certificate for its
        # address signed by it (a CA certificate cannot serve as its own
        # server certificate in rustls).
        local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
        cert_failed() {
            echo "demo.sh: making the demo's certificate failed:" >&2
            cat "$DIR/openssl.log" >&2
            exit 1
        }
        openssl req -x509 "${ec[@]}" -days 2 -subj /CN=warren-demo-ca \
            -keyout "$DIR/ca.key" -out "$DIR/ca.pem" 2>"$DIR/openssl.log" || cert_failed
        openssl req "${ec[@]}" -subj /CN=11.11.0.10 -keyout "$DIR/tls.key" -out "$DIR/tls.csr" \
            2>>"$DIR/openssl.log" || cert_failed
        printf 'subjectAltName=IP:11.11.0.10\nbasicConstraints=CA:FALSE\n' > "$DIR/tls.ext"
        openssl x509 -req -in "$DIR/tls.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" -CAcreateserial \
            -days 2 -extfile "$DIR/tls.ext" -out "$DIR/tls.pem" 2>>"$DIR/openssl.log" || cert_failed
        url=https://11.11.0.10:443
        serve_tls=(--tls-cert "$DIR/tls.pem" --tls-key "$DIR/tls.key")
        agent_plain=
        ca=(--ca-file "$DIR/ca.pem")
    fi
    ip netns exec wdemo-coord "$cbin" --data-dir "$DIR/coord" serve \
        --listen 11.11.0.10:443 "${serve_tls[@]}" >"$DIR/coord.log" 2>&1 &
    echo $! > "$DIR/coord.pid"
    for _ in $(seq 1 100); do
        ip netns exec wdemo-coord bash -c "exec 3<>/dev/tcp/11.11.0.10/443" 2>/dev/null && break
        sleep 0.1
    done
    local token
    token=$("$cbin" --data-dir "$DIR/coord" token create --reusable --expires 24h | head -1)

    for h in a b; do
        mkdir -p "$DIR/$h"
        # insecure_http: the demo's coordinator speaks plain HTTP on the
        # demo's own "internet" (11.11.0.10) unless WARREN_DEMO_TLS=1; real
        # networks use https://.
        printf "[agent]\\nstate_dir = \"%s\"\\nportmap = false\\n$agent_plain" "$DIR/$h" > "$DIR/$h.toml"
        ip netns exec wdemo-$h "$bin" agent --config "$DIR/$h.toml" --socket "$DIR/$h.sock" >"$DIR/$h.log" 2>&1 &
        echo $! > "$DIR/$h.pid"
    done
    for h in a b; do
        for _ in $(seq 1 50); do [ -S "$DIR/$h.sock" ] && break; sleep 0.1; done
        WARREN_TOKEN=$token "$bin" --socket "$DIR/$h.sock" up --coordinator $url --hostname $h "${ca[@]}"
    done
    local ipb=""
    for _ in $(seq 1 50); do
        ipb=$("$bin" --socket "$DIR/b.sock" ip -4 2>/dev/null || true)
        [ -n "$ipb" ] && break
        sleep 0.1
    done
    for _ in $(seq 1 100); do
        if ip netns exec wdemo-a ping -c1 -W1 "$ipb" >/dev/null 2>&1; then
            # Traffic starts path discovery: give it a moment to go direct.
            ip netns exec wdemo-a ping -c 10 -i 0.2 -W1 "$ipb" >/dev/null 2>&1 || true
            echo
            "$bin" --socket "$DIR/a.sock" status
            echo
            echo "warren demo is up: hosts a and b behind two NATs, coordinator at $url"
            echo "  sudo ip netns exec wdemo-a ping $ipb      (or by name: ping b)"
            echo "  sudo $bin --socket $DIR/a.sock status      (also: netcheck, ip, ping b)"
            echo "  sudo $cbin --data-dir $DIR/coord node list"
            echo "  logs: $DIR/coord.log $DIR/a.log $DIR/b.log"
            echo "  tear down:  sudo tests/demo.sh down"
            return 0
        fi
        sleep 0.2
    done
    echo "demo.sh: the tunnel did not come up; logs follow" >&2
    cat "$DIR"/*.log >&2
    exit 1
}

case "${1:-up}" in
    up) up ;;
    down) need_root; down; echo "warren demo removed" ;;
    *) echo "usage: $0 [up|down]" >&2; exit 2 ;;
esac
