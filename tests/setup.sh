#!/usr/bin/env bash
# Installs what the tests need on a Debian machine (root): the NAT-lab tools,
# wireguard-go, coturn, PostgreSQL (started on loopback, with a `warren` role
# and database for the coordinator's store tests), tmux and systemd-analyze,
# and for fuzzing the nightly toolchain and cargo-fuzz.
# Idempotent. tests/run.sh calls it when run as root; .ci/run calls it first.
#
# To add a dependency for a later issue, add one line to PACKAGES below.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "tests/setup.sh: installing packages needs root; skipping" >&2
    exit 0
fi

PACKAGES=(
    nftables iproute2 iputils-ping conntrack iperf3 tcpdump # NAT lab
    wireguard-go wireguard-tools                            # stock WireGuard peer for interop
    netcat-openbsd socat curl                               # ad-hoc lab traffic
    miniupnpd miniupnpd-nftables                            # Nat::Upnp gateways
    coturn                                                  # STUN interop (turnserver, turnutils_stunclient)
    tinyproxy                                               # relay through an HTTP proxy
    postgresql                                              # coordinator store tests on PostgreSQL
    tmux systemd util-linux                                 # terminal test, systemd-analyze, setpriv
    dnsmasq-base                                            # DNS servers in the lab (no service of its own)
    dbus-daemon                                             # a private system bus for systemd-resolved in the lab
)

# --no-install-recommends: wireguard-tools recommends wireguard-dkms, which
# would drag in a kernel toolchain. Never add linux-perf here for the same reason.
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"

# systemd-resolved for the DNS lab test, unpacked beside the system and
# never installed: installing it would turn this machine's own
# /etc/resolv.conf into resolved's stub. The lab runs it in a namespace
# with a private D-Bus system bus (tests/lab/dns_resolved.rs). It drops
# privileges to the systemd-resolve user, made here if missing.
RESOLVED_DIR=/opt/warren-lab/resolved
if [[ ! -x $RESOLVED_DIR/lib/systemd/systemd-resolved ]]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -q systemd-resolved 2>/dev/null) &&
        mkdir -p "$RESOLVED_DIR" && dpkg-deb -x "$tmp"/systemd-resolved_*.deb "$RESOLVED_DIR" ||
        echo "tests/setup.sh: systemd-resolved not unpacked; its lab test will be skipped" >&2
    rm -rf "$tmp"
fi
getent passwd systemd-resolve >/dev/null ||
    useradd --system --no-create-home --home-dir /run/systemd --shell /usr/sbin/nologin systemd-resolve

# PostgreSQL on loopback for the coordinator's store and replica tests. The
# machine has no systemd as PID 1, so the cluster is started by hand.
if ! pg_lsclusters -h | grep -q online; then
    cluster=$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')
    [[ -n "$cluster" ]] || { pg_createcluster 15 main >/dev/null; cluster="15 main"; }
    # shellcheck disable=SC2086
    pg_ctlcluster $cluster start
fi
su postgres -c "psql -q -v ON_ERROR_STOP=1" <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'warren') THEN
    CREATE ROLE warren LOGIN CREATEDB PASSWORD 'warren';
  END IF;
END $$;
SELECT 'CREATE DATABASE warren OWNER warren'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'warren') \gexec
SQL

# Fuzzing (tests/run.sh runs fuzz/run.sh for a few seconds per target):
# nightly with the minimal profile and cargo-fuzz, for the user who runs
# the tests (root in CI). Needs rustup; without it fuzzing is skipped.
if ! command -v rustup >/dev/null && [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
fi
if command -v rustup >/dev/null; then
    rustup toolchain list | grep -q '^nightly' ||
        rustup toolchain install nightly --profile minimal
    cargo +nightly fuzz --version >/dev/null 2>&1 ||
        cargo install --locked cargo-fuzz
else
    echo "tests/setup.sh: no rustup; fuzzing will be skipped" >&2
fi

echo "tests/setup.sh: done (PostgreSQL for tests: postgres://warren:warren@127.0.0.1:5432/warren)"
