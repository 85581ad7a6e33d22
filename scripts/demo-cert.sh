#!/usr/bin/env bash
# Makes a certificate authority and a server certificate for this machine
# (localhost, 127.0.0.1, ::1), for the HTTPS demo and the HTTPS benchmark:
#
#   scripts/demo-cert.sh DIR
#
# writes DIR/ca.pem (the CA to trust), DIR/cert.pem (the server
# certificate followed by the CA: a full chain), DIR/key.pem (its key,
# mode 0600) and DIR/spki.txt (the base64 SHA-256 of the server key, for
# Chromium's --ignore-certificate-errors-spki-list). ECDSA P-256, valid
# 30 days. An existing set is kept while it has a week or more left.
set -euo pipefail

dir="${1:?usage: scripts/demo-cert.sh DIR}"
mkdir -p "$dir"
if [[ -f "$dir/cert.pem" && -f "$dir/key.pem" && -f "$dir/ca.pem" && -f "$dir/spki.txt" ]] &&
    openssl x509 -checkend 604800 -noout -in "$dir/cert.pem" >/dev/null 2>&1; then
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
umask 077
openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/ca.key" 2>/dev/null
openssl req -x509 -new -key "$tmp/ca.key" -days 30 -subj "/CN=sessiongate demo CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$tmp/ca.pem" 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/leaf.key" 2>/dev/null
# PKCS#8, the form every TLS stack reads.
openssl pkcs8 -topk8 -nocrypt -in "$tmp/leaf.key" -out "$tmp/key.pem"
openssl req -new -key "$tmp/key.pem" -subj "/CN=localhost" -out "$tmp/leaf.csr" 2>/dev/null
cat >"$tmp/leaf.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
EXT
openssl x509 -req -in "$tmp/leaf.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
    -days 30 -extfile "$tmp/leaf.ext" -out "$tmp/leaf.pem" 2>/dev/null
cat "$tmp/leaf.pem" "$tmp/ca.pem" >"$tmp/cert.pem"
openssl pkey -in "$tmp/key.pem" -pubout -outform der 2>/dev/null |
    openssl dgst -sha256 -binary | base64 >"$tmp/spki.txt"

install -m 0644 "$tmp/ca.pem" "$dir/ca.pem"
install -m 0644 "$tmp/cert.pem" "$dir/cert.pem"
install -m 0600 "$tmp/key.pem" "$dir/key.pem"
install -m 0644 "$tmp/spki.txt" "$dir/spki.txt"
echo "demo-cert: wrote $dir/{ca,cert,key}.pem (trust ca.pem for this machine only)" >&2
