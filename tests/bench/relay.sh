#!/bin/sh
# Relay figures on loopback: throughput (1 pair, 50 pairs), the relay's CPU
# time and RSS, and the latency it adds over direct UDP/TCP echoes.
# Release build; the relay runs in its own process so its usage is separate.
#   tests/bench/relay.sh          # plain TCP (lab mode) and TLS
set -eu
cd "$(dirname "$0")/../.."
cargo build --release -p warren-coordinator --example relay_bench
bin=target/release/examples/relay_bench
"$bin"
echo
"$bin" --tls
