#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the integration suite (real
# sockets, real SQLite, real Redis and PostgreSQL, real wasm components
# built from plugins/), the plugins' own tests and the doc tests. Starts
# whatever servers the suite needs first. Extra arguments go to the main
# `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
# The policy plugins the suite loads (installs the wasm target if missing).
scripts/build-plugins.sh

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# The plugins' own unit tests (their decision logic, on the host target).
cargo test --manifest-path plugins/Cargo.toml 2>&1 | tee -a "$log"
cargo test --doc 2>&1 | tee -a "$log"
cargo test --all-targets "$@" 2>&1 | tee -a "$log"

# One closing line for the whole run.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1); if ($i ~ /^ignored;?$/) s += $(i-1) } }
     END { printf "%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
