#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the integration suite (real
# sockets, real SQLite, real Redis and PostgreSQL, real wasm components
# built from plugins/) and the doc tests.
# Starts whatever servers the suite needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
# The policy plugins the suite loads (installs the wasm target if missing).
scripts/build-plugins.sh
# The plugins' own unit tests (their decision logic, on the host target).
cargo test --quiet --manifest-path plugins/Cargo.toml
cargo test --all-targets "$@"
cargo test --doc
