#!/usr/bin/env bash
# Makes sure the servers the test suite talks to are running: Redis on
# 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (trust auth), installing
# them from Debian's packages when the machine lacks them.
set -euo pipefail

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
