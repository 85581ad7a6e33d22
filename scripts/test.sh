#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the integration suite (real
# sockets, real SQLite, real Redis and PostgreSQL) and the doc tests.
# Starts whatever servers the suite needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
cargo test --all-targets "$@"
cargo test --doc
