#!/usr/bin/env bash
# Starts the bundled demo app and sessiongate in front of it, with the
# reference gateway.toml, on the embedded store, with the bundled policy
# plugins (built from plugins/ first). Ctrl-C stops both.
#
#   scripts/demo.sh            plain HTTP on 127.0.0.1:8080
#   scripts/demo.sh --https    HTTPS (HTTP/2 and HTTP/1.1) on 127.0.0.1:8443
#                              with a certificate made for this machine
#                              (target/demo-tls/), secure cookies, and
#                              127.0.0.1:8080 redirecting to it
#
# DEMO_HTTPS=1 is the same as --https.
set -euo pipefail
cd "$(dirname "$0")/.."

https="${DEMO_HTTPS:-0}"
for arg in "$@"; do
    case "$arg" in
        --https) https=1 ;;
        -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "demo.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

scripts/build-plugins.sh
cargo build --release --bin sessiongate --example demo_app

if [[ "$https" == 1 ]]; then
    scripts/demo-cert.sh target/demo-tls
    export SESSIONGATE_SERVER__LISTEN=127.0.0.1:8443
    export SESSIONGATE_SERVER__TLS__CERT_FILE="$PWD/target/demo-tls/cert.pem"
    export SESSIONGATE_SERVER__TLS__KEY_FILE="$PWD/target/demo-tls/key.pem"
    export SESSIONGATE_SERVER__TLS__REDIRECT_LISTEN=127.0.0.1:8080
    # Over HTTPS the session cookie can (and should) be Secure.
    export SESSIONGATE_SESSION__COOKIE_SECURE=true
    open_url="https://localhost:8443/"
    login="curl -i --cacert target/demo-tls/ca.pem https://localhost:8443/public/login -d user=alice"
    trust="  trust  target/demo-tls/ca.pem (a CA made for this machine only) to skip the browser warning"
else
    open_url="http://127.0.0.1:8080/"
    login="curl -i http://127.0.0.1:8080/public/login -d user=alice"
    trust=""
fi

target/release/examples/demo_app &
demo_pid=$!
trap 'kill "$demo_pid" 2>/dev/null || true' EXIT

cat <<MSG

  sessiongate demo
  ----------------
  open   $open_url            (redirects to the login form)
  or     $login
  admin  curl -H 'Authorization: Bearer demo-admin-token-change-me' http://127.0.0.1:9090/v1/users/alice/sessions
$trust

MSG
target/release/sessiongate serve --config gateway.toml
