#!/usr/bin/env bash
# Starts a small working warren network on this machine, in network
# namespaces: two hosts ("wdemo-a", "wdemo-b"), each behind its own NAT
# gateway, joined by an "internet" namespace. Each host runs a warren agent.
#
#   tests/demo.sh up      build (release), create the namespaces, start agents
#   tests/demo.sh down    stop the agents and remove everything
#
# Host b's gateway forwards UDP 51820 to b; host a knows only that public
# endpoint, and b learns a's address from a's first handshake (roaming).
# Everything stays inside the namespaces; nothing is routed out.
set -euo pipefail

cd "$(dirname "$0")/.."
DIR=/tmp/warren-demo
NS=(wdemo-inet wdemo-gwa wdemo-gwb wdemo-a wdemo-b)

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "demo.sh: network namespaces need root (CAP_NET_ADMIN); run with sudo" >&2
        exit 1
    fi
}

down() {
    if [ -d "$DIR" ]; then
        for pid in "$DIR"/*.pid; do
            [ -e "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
        done
        sleep 0.5
    fi
    for ns in "${NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$DIR"
}

link() { # link NS1 IF1 NS2 IF2
    ip link add "$2" netns "$1" type veth peer name "$4" netns "$3"
    ip -n "$1" link set "$2" up
    ip -n "$3" link set "$4" up
}

up() {
    need_root
    if ! command -v nft >/dev/null || ! command -v ping >/dev/null || ! command -v ip >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 nftables iputils-ping
    fi
    command -v cargo >/dev/null || { echo "demo.sh: cargo is missing: install Rust with rustup (https://rustup.rs)" >&2; exit 1; }
    cargo build --release --bin warren
    local bin=$PWD/target/release/warren
    down
    mkdir -p "$DIR"
    for ns in "${NS[@]}"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done

    # The internet: a bridge in wdemo-inet; gateways at 11.11.0.1 and .2.
    ip -n wdemo-inet link add br0 type bridge
    ip -n wdemo-inet link set br0 up
    link wdemo-inet ia wdemo-gwa wan
    link wdemo-inet ib wdemo-gwb wan
    ip -n wdemo-inet link set ia master br0
    ip -n wdemo-inet link set ib master br0
    ip -n wdemo-gwa addr add 11.11.0.1/24 dev wan
    ip -n wdemo-gwb addr add 11.11.0.2/24 dev wan

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
    done
    ip netns exec wdemo-gwa nft -f - <<EOF
table ip nat {
  chain post { type nat hook postrouting priority 100; oifname "wan" masquerade; }
}
EOF
    ip netns exec wdemo-gwb nft -f - <<EOF
table ip nat {
  chain pre { type nat hook prerouting priority -100; iifname "wan" udp dport 51820 dnat to 10.0.2.2:51820; }
  chain post { type nat hook postrouting priority 100; oifname "wan" masquerade; }
}
EOF

    local ka kb pa pb
    ka=$($bin genkey); kb=$($bin genkey)
    pa=$(echo "$ka" | $bin pubkey); pb=$(echo "$kb" | $bin pubkey)
    cat > "$DIR/a.toml" <<EOF
[interface]
private_key = "$ka"
addresses = ["100.64.0.1/24"]

[[peer]]
public_key = "$pb"
allowed_ips = ["100.64.0.2/32"]
endpoint = "11.11.0.2:51820"
persistent_keepalive = 25
EOF
    cat > "$DIR/b.toml" <<EOF
[interface]
private_key = "$kb"
addresses = ["100.64.0.2/24"]

[[peer]]
public_key = "$pa"
allowed_ips = ["100.64.0.1/32"]
EOF
    chmod 600 "$DIR"/*.toml
    for h in a b; do
        ip netns exec wdemo-$h "$bin" agent --config "$DIR/$h.toml" --socket "$DIR/$h.sock" >"$DIR/$h.log" 2>&1 &
        echo $! > "$DIR/$h.pid"
    done
    for _ in $(seq 1 50); do
        if ip netns exec wdemo-a ping -c1 -W1 100.64.0.2 >/dev/null 2>&1; then
            echo
            echo "warren demo is up: host a = 100.64.0.1, host b = 100.64.0.2"
            echo "  sudo ip netns exec wdemo-a ping 100.64.0.2"
            echo "  sudo $bin --socket $DIR/a.sock status"
            echo "  sudo ip netns exec wdemo-b ping 100.64.0.1"
            echo "  agent logs: $DIR/a.log $DIR/b.log"
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
