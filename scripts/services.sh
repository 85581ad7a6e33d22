#!/usr/bin/env bash
# Makes sure the servers the test suite talks to are running: Redis on
# 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (trust auth), installing
# them from Debian's packages when the machine lacks them. Also installs the
# real origins the security suite (tests/it/sec_origins.rs) starts by
# itself on loopback ports: Debian's nginx, and Hypercorn (h2c) in a
# virtualenv at target/pyenv.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_updated=0
need_pkg() {
    if ! command -v "$1" >/dev/null 2>&1; then
        if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    fi
}

# Redis
need_pkg redis-server redis-server
need_pkg redis-cli redis-tools
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi

# PostgreSQL
need_pkg pg_ctlcluster postgresql
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start || true
fi

# nginx: only the binary (Debian's package, with auth_request: the
# forward-auth suite, tests/it/forward_auth.rs, puts it in front of the
# gateway). The tests run their own instances with generated configs; the packaged service must not start (nor take port 80), so a
# policy-rc.d refuses it for the install if the machine has none.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
    if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
# nginx's stream module (a package of its own on Debian): the tests put an
# nginx speaking the PROXY protocol in front of the gateway.
if [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then
    if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
    own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnginx-mod-stream >/dev/null || true
    if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# Hypercorn, the h2c-capable origin (tests/origins/echo_asgi.py), pinned,
# in a virtualenv so that the machine's Python is left as it is.
pyenv=target/pyenv
if ! "$pyenv/bin/python" -c 'import hypercorn' >/dev/null 2>&1; then
    need_pkg python3 python3
    rm -rf "$pyenv"
    mkdir -p target
    if ! python3 -m venv "$pyenv" >/dev/null 2>&1; then
        if [ "$apt_updated" = 0 ]; then apt-get update -qq; apt_updated=1; fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        rm -rf "$pyenv"
        python3 -m venv "$pyenv"
    fi
    "$pyenv/bin/python" -m pip install -q --disable-pip-version-check 'hypercorn==0.18.0'
    "$pyenv/bin/python" -c 'import hypercorn'
fi

for _ in $(seq 1 50); do
    if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && pg_isready -h 127.0.0.1 -p 5432 -q; then
        exit 0
    fi
    sleep 0.2
done
echo "services.sh: Redis or PostgreSQL did not come up" >&2
redis-cli -h 127.0.0.1 -p 6379 ping || true
pg_isready -h 127.0.0.1 -p 5432 || true
exit 1
