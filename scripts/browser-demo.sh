#!/usr/bin/env bash
# A browser logs in to the demo over HTTPS: starts the demo app and
# sessiongate with --https settings (see scripts/demo.sh) on their usual
# ports, then headless Chromium (Debian's package, driven by playwright-core
# from npm) opens https://localhost:8443/, is sent to the login form, logs
# in as alice, and checks the page the app served: the user, the
# X-Forwarded-Proto the app received (https), the client address
# (X-Forwarded-For), and that the page came over HTTP/2 and TLS 1.3. A
# screenshot goes to docs/demo-https.png (or $1).
#
# Chromium trusts exactly the demo certificate's key
# (--ignore-certificate-errors-spki-list), nothing else. Installs chromium
# and playwright-core when missing. Stops what it started, by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
shot="${1:-docs/demo-https.png}"

command -v chromium >/dev/null || {
    timeout 900 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 1800 apt-get install -y -qq chromium >/dev/null
}
if [[ ! -d target/browser/node_modules/playwright-core ]]; then
    mkdir -p target/browser
    timeout 600 npm install --silent --prefix target/browser playwright-core@1 >/dev/null
fi
scripts/build-plugins.sh
cargo build --quiet --release --bin sessiongate --example demo_app
scripts/demo-cert.sh target/demo-tls

for port in 3000 8080 8443 9090; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "browser-demo: 127.0.0.1:$port is in use (a demo already running?)" >&2
        exit 1
    fi
done
run="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$run"
}
trap cleanup EXIT

target/release/examples/demo_app >"$run/demo_app.log" 2>&1 &
pids+=($!)
SESSIONGATE_SERVER__LISTEN=127.0.0.1:8443 \
    SESSIONGATE_SERVER__TLS__CERT_FILE="$PWD/target/demo-tls/cert.pem" \
    SESSIONGATE_SERVER__TLS__KEY_FILE="$PWD/target/demo-tls/key.pem" \
    SESSIONGATE_SERVER__TLS__REDIRECT_LISTEN=127.0.0.1:8080 \
    SESSIONGATE_SESSION__COOKIE_SECURE=true \
    SESSIONGATE_STORE__DATABASE_URL="sqlite://$run/demo.db" \
    target/release/sessiongate serve --config gateway.toml >"$run/gateway.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
    curl -s -o /dev/null --max-time 1 http://127.0.0.1:9090/readyz && break
    sleep 0.1
done
curl -sf -o /dev/null --max-time 2 http://127.0.0.1:9090/readyz || { cat "$run/gateway.log" >&2; exit 1; }

mkdir -p "$(dirname "$shot")"
NODE_PATH="$PWD/target/browser/node_modules" node scripts/browser-demo.mjs \
    "$(cat target/demo-tls/spki.txt)" "$shot"
