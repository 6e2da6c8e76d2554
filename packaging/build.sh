#!/usr/bin/env bash
# Builds the .deb packages `warren` and `warren-coordinator` with cargo-deb.
#
#   packaging/build.sh [--dev] [--out DIR]
#
# --out DIR  where the .deb files go (default target/debian)
# --dev      package the debug build instead of a release build: quick, for
#            the package test (tests/lab/package.rs); never ship it.
#
# Installs cargo-deb from crates.io when it is missing. Prints the paths of
# the built packages, one per line, on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/debian
profile=(--profile release)
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dev) profile=(--profile dev --fast); shift ;;
        --out) out="$2"; shift 2 ;;
        *) echo "build.sh: unknown argument $1 (use --dev, --out DIR)" >&2; exit 2 ;;
    esac
done

if ! cargo deb --version >/dev/null 2>&1; then
    echo "build.sh: installing cargo-deb" >&2
    cargo install --locked cargo-deb >&2
fi

mkdir -p "$out"
for pkg in warren warren-coordinator; do
    # cargo-deb prints the package's path as its last line on stdout.
    cargo deb -p "$pkg" "${profile[@]}" -o "$out" | tail -n 1
done
