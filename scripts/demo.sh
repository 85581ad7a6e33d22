#!/usr/bin/env bash
# Starts the bundled demo app and sessiongate in front of it, with the
# reference gateway.toml, on the embedded store, with the bundled policy
# plugins (built from plugins/ first). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build-plugins.sh
cargo build --release --bin sessiongate --example demo_app

target/release/examples/demo_app &
demo_pid=$!
trap 'kill "$demo_pid" 2>/dev/null || true' EXIT

cat <<MSG

  sessiongate demo
  ----------------
  open   http://127.0.0.1:8080/            (redirects to the login form)
  or     curl -i http://127.0.0.1:8080/public/login -d user=alice
  admin  curl -H 'Authorization: Bearer demo-admin-token-change-me' http://127.0.0.1:9090/v1/users/alice/sessions

MSG
target/release/sessiongate serve --config gateway.toml
