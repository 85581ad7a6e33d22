#!/usr/bin/env bash
# Scale-out benchmark (issue 13): sessiongate on one Redis server against
# sessiongate on a 3-shard Redis Cluster, in the same run, and the delay
# with which a revocation made on one instance reaches another.
#
#   bench/cluster.sh [--duration S] [--rounds N] [--sessions N] [--samples N]
#                    [--parts throughput,revocation] [--skip-build] [--out DIR]
#
# What it starts (everything on 127.0.0.1, servers pinned to CPU 1 with
# `taskset -c 1`, wrk and the clients on CPU 0), and stops by pid at the end:
#   origin        nginx, :18080 (bench/conf/upstream.nginx.conf)
#   redis         one redis-server, :6395 (no persistence)
#   cluster       six redis-servers, :7311-7316 (bus ports +10000), created
#                 with `redis-cli --cluster create --cluster-replicas 1`
#                 (3 primaries, 3 replicas), cluster-node-timeout 2000
#   sg-redis      sessiongate on the one Redis, :18096 (admin :18196)
#   sg-cluster    sessiongate on the cluster (store.redis_cluster_urls = the
#                 six nodes), :18097 (admin :18197)
# Both gateways: bench/load.sh's config C (PostgreSQL database
# sessiongate_cluster, dropped and created again; no local cache, so one
# Redis GET per request; one worker thread; the bundled policy chain).
#
# throughput: seeds --sessions sessions into each gateway (admin API,
#   bench/seed.py), checks 401 without a session and 200 with one, then runs
#   --rounds interleaved rounds of `wrk -t1 -c32 -d<duration> --latency`
#   rotating over every seeded token (bench/rotate.lua: the keys spread over
#   the three shards), a 1 s warm-up before each, and records req/s, p50,
#   p99 and the CPU time per request of the gateway and of its Redis
#   (all six nodes for the cluster).
# revocation: for each of redis/cluster × local cache off/on (60 s), starts
#   two gateways A (:18098, admin :18198) and B (:18099, admin :18199) on
#   that fast tier and one database, and runs bench/revocation_delay.py with
#   --samples revocations: revoke through A's admin API, poll B until 401.
#
# Results (raw wrk output, results.tsv, revocation.tsv, meta.txt) go to
# bench/results/cluster-<timestamp>/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/bench"
# shellcheck source=bench/sg_config.sh
source "$BENCH/sg_config.sh"
COMMAND_LINE="bench/cluster.sh $*"
DURATION=10
ROUNDS=3
SESSIONS=10000
SAMPLES=200
PARTS=throughput,revocation
SKIP_BUILD=0
OUT_DIR=""
while (($#)); do
    case "$1" in
        --duration) DURATION="${2%s}"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        --sessions) SESSIONS="$2"; shift ;;
        --samples) SAMPLES="$2"; shift ;;
        --parts) PARTS="$2"; shift ;;
        --skip-build) SKIP_BUILD=1 ;;
        --out) OUT_DIR="$2"; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "cluster.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for v in DURATION ROUNDS SESSIONS SAMPLES; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "cluster.sh: $v must be a whole number, not '${!v}'" >&2; exit 2; }
done
if ((DURATION < 1 || DURATION > 600 || ROUNDS < 1 || ROUNDS > 20 || SESSIONS < 1 ||
    SESSIONS > 1000000 || SAMPLES < 1 || SAMPLES > 100000)); then
    echo "cluster.sh: duration 1..600 s, rounds 1..20, sessions 1..1000000, samples 1..100000" >&2
    exit 2
fi
has_part() { [[ ",$PARTS," == *",$1,"* ]]; }

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

ORIGIN_PORT=18080
REDIS_PORT=6395
CLUSTER_PORTS=(7311 7312 7313 7314 7315 7316)
declare -A PORT=([sg-redis]=18096 [sg-cluster]=18097 [rev-a]=18098 [rev-b]=18099)
declare -A ADMIN=([sg-redis]=18196 [sg-cluster]=18197 [rev-a]=18198 [rev-b]=18199)
ADMIN_TOKEN="cluster-bench-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
PG_ADMIN="postgres://postgres@127.0.0.1:5432/postgres"
PG_DB=sessiongate_cluster
PG_URL="postgres://postgres@127.0.0.1:5432/$PG_DB"
export PGCONNECT_TIMEOUT=5

for tool in wrk nginx redis-server redis-cli psql curl python3 taskset; do
    command -v "$tool" >/dev/null || die "$tool is missing (bench/load.sh installs what it needs)"
done
build_release
timeout 10 pg_isready -h 127.0.0.1 -p 5432 -q || die "PostgreSQL is not answering on 127.0.0.1:5432"
ports_free "$ORIGIN_PORT" "$REDIS_PORT" "${CLUSTER_PORTS[@]}" "${PORT[@]}" "${ADMIN[@]}"

bench_run cluster
START_PIN=1

# ---------------------------------------------------------------- servers
log "run directory $RUN"
start origin nginx -p "$RUN/" -e "$RUN/logs/origin.error.log" -c "$BENCH/conf/upstream.nginx.conf" -g 'daemon off;'
wait_port origin "$ORIGIN_PORT"
mkdir -p "$RUN/redis"
start redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$RUN/redis" --daemonize no --logfile ""
wait_port redis "$REDIS_PORT"
CLUSTER_URLS=()
for p in "${CLUSTER_PORTS[@]}"; do
    mkdir -p "$RUN/node-$p"
    start "node-$p" redis-server --bind 127.0.0.1 --port "$p" --cluster-enabled yes \
        --cluster-config-file "$RUN/node-$p/nodes.conf" --cluster-node-timeout 2000 \
        --save "" --appendonly no --dir "$RUN/node-$p" --daemonize no --logfile ""
    wait_port "node-$p" "$p"
    CLUSTER_URLS+=("redis://127.0.0.1:$p")
done
redis-cli --cluster create $(printf '127.0.0.1:%s ' "${CLUSTER_PORTS[@]}") --cluster-replicas 1 \
    --cluster-yes >"$RUN/logs/cluster-create.log" 2>&1 || { cat "$RUN/logs/cluster-create.log" >&2; die "cluster create"; }
for ((i = 0; i < 300; i++)); do
    ok=1
    for p in "${CLUSTER_PORTS[@]}"; do
        redis-cli -p "$p" cluster info | grep -q 'cluster_state:ok' || ok=0
    done
    ((ok)) && break
    sleep 0.1
done
((ok)) || die "the cluster did not come up"
log "cluster up: $(redis-cli -p "${CLUSTER_PORTS[0]}" cluster nodes | awk '$3 ~ /master/ {n++} END {print n}') primaries"
CLUSTER_LIST="$(IFS=,; echo "${CLUSTER_URLS[*]}")"

log "PostgreSQL: database $PG_DB (dropped and created again)"
psql -q -v ON_ERROR_STOP=1 "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null
psql -q -v ON_ERROR_STOP=1 "$PG_ADMIN" -c "CREATE DATABASE $PG_DB" >/dev/null

# start_sg NAME FAST LOCAL_CACHE_MS PREFIX: FAST is a Redis URL or a
# comma-separated list of cluster seed URLs (sg_config.sh).
start_sg() {
    local name="$1" conf="$RUN/$1.toml" i code=""
    write_sg_config "$conf" "${PORT[$name]}" "${ADMIN[$name]}" "$ADMIN_TOKEN" "$ORIGIN_PORT" \
        "$PG_URL" "$2" "$3" "$4" required "$ROOT" || die "cannot write $conf"
    "$SG" check --config "$conf" >"$RUN/logs/$name.check.log" 2>&1 ||
        { cat "$RUN/logs/$name.check.log" >&2; die "sessiongate check failed for $conf"; }
    start "$name" "$SG" serve --config "$conf"
    for ((i = 0; i < 300; i++)); do
        code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:${ADMIN[$name]}/readyz" || true)"
        [[ "$code" == 200 ]] && return 0
        [[ -d /proc/${PID[$name]} ]] || break
        sleep 0.1
    done
    tail -n 30 "$RUN/logs/$name.log" >&2 || true
    die "$name is not ready (GET /readyz: $code)"
}
stop_sg() { stop_pid "${PID[$1]}"; }

[[ -n "$OUT_DIR" ]] || OUT_DIR="$BENCH/results/cluster-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT_DIR/raw"
{
    echo "date: $(date -Iseconds)"
    echo "command: $COMMAND_LINE"
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r)"
    echo "versions: redis $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), sessiongate $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml || echo ' + uncommitted changes')"
    echo "pinning: gateways, Redis nodes and the origin on CPU 1, wrk and the clients on CPU 0"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT_DIR/meta.txt"

CLK_TCK="$(getconf CLK_TCK)"
proc_ticks() { # pids...: utime + stime of each, summed
    local total=0 p
    for p in "$@"; do
        total=$((total + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
node_pids() { local p; for p in "${CLUSTER_PORTS[@]}"; do echo "${PID[node-$p]}"; done; }

# ------------------------------------------------------------- throughput
if has_part throughput; then
    start_sg sg-redis "redis://127.0.0.1:$REDIS_PORT" 0 "bench:"
    start_sg sg-cluster "$CLUSTER_LIST" 0 "bench:"
    for t in sg-redis sg-cluster; do
        log "seeding $SESSIONS sessions into $t (admin API)"
        taskset -c 0 timeout 1800 python3 "$BENCH/seed.py" gateway "http://127.0.0.1:${ADMIN[$t]}" \
            "$ADMIN_TOKEN" "$SESSIONS" "$RUN/tokens-$t.tsv" 8 "$t" || die "seeding $t failed"
        token="$(head -n 1 "$RUN/tokens-$t.tsv" | cut -f1)"
        code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PORT[$t]}/")"
        [[ "$code" == 401 ]] || die "$t answered $code without a session"
        code="$(curl -s -o /dev/null -w '%{http_code}' -H "Cookie: sg_session=$token" "http://127.0.0.1:${PORT[$t]}/")"
        [[ "$code" == 200 ]] || die "$t answered $code to a seeded session"
    done
    keys=""
    for p in "${CLUSTER_PORTS[@]}"; do
        if [[ "$(redis-cli -p "$p" role | head -n 1)" == master ]]; then keys+="$(redis-cli -p "$p" dbsize) "; fi
    done
    log "keys per cluster primary: $keys"
    echo "keys per cluster primary after seeding: $keys" >>"$OUT_DIR/meta.txt"
    printf 'round\ttarget\trps\tp50_us\tp99_us\tnon2xx\tsocket_errors\trequests\tgateway_us_per_req\tredis_us_per_req\tload1\n' >"$OUT_DIR/results.tsv"
    for ((r = 1; r <= ROUNDS; r++)); do
        for t in sg-redis sg-cluster; do
            export TOKENS="$RUN/tokens-$t.tsv"
            url="http://127.0.0.1:${PORT[$t]}/"
            taskset -c 0 timeout 60 wrk -t1 -c32 -d1s -s "$BENCH/rotate.lua" "$url" >/dev/null 2>&1 || die "wrk warm-up"
            if [[ "$t" == sg-redis ]]; then aux=("${PID[redis]}"); else mapfile -t aux < <(node_pids); fi
            g0="$(proc_ticks "${PID[$t]}")" a0="$(proc_ticks "${aux[@]}")"
            raw="$OUT_DIR/raw/r$r-$t.txt"
            taskset -c 0 timeout $((DURATION + 30)) wrk -t1 -c32 -d"${DURATION}s" --latency \
                -s "$BENCH/rotate.lua" "$url" >"$raw" 2>&1 || { cat "$raw" >&2; die "wrk failed"; }
            g1="$(proc_ticks "${PID[$t]}")" a1="$(proc_ticks "${aux[@]}")"
            read -r rps p50 p99 non2xx sockerr requests < <(python3 "$BENCH/report.py" parse "$raw")
            gus=$(python3 -c "print(round(($g1 - $g0) / $CLK_TCK * 1e6 / max($requests, 1), 1))")
            aus=$(python3 -c "print(round(($a1 - $a0) / $CLK_TCK * 1e6 / max($requests, 1), 1))")
            load1="$(cut -d' ' -f1 /proc/loadavg)"
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$t" "$rps" "$p50" "$p99" "$non2xx" \
                "$sockerr" "$requests" "$gus" "$aus" "$load1" >>"$OUT_DIR/results.tsv"
            log "round $r $t: $rps req/s, p50 $p50 µs, p99 $p99 µs, CPU/request gateway $gus µs + Redis $aus µs (load $load1)$( ((non2xx + sockerr)) && echo ", $non2xx non-2xx, $sockerr socket errors")"
        done
    done
    stop_sg sg-cluster
    stop_sg sg-redis
fi

# ------------------------------------------------------------- revocation
if has_part revocation; then
    printf 'fast_tier\tlocal_cache_ms\tresult\n' >"$OUT_DIR/revocation.tsv"
    for fast in redis cluster; do
        for cache in 0 60000; do
            if [[ "$fast" == redis ]]; then url="redis://127.0.0.1:$REDIS_PORT"; else url="$CLUSTER_LIST"; fi
            prefix="rev-$cache:"
            start_sg rev-a "$url" "$cache" "$prefix"
            start_sg rev-b "$url" "$cache" "$prefix"
            if ((cache > 0)); then
                # Both subscribed before the first sample.
                for n in rev-a rev-b; do
                    for ((i = 0; i < 100; i++)); do
                        curl -s "http://127.0.0.1:${ADMIN[$n]}/metrics" | grep -q '^sessiongate_local_cache_subscribed 1' && break
                        sleep 0.1
                    done
                done
            fi
            line="$(taskset -c 0 timeout 1800 python3 "$BENCH/revocation_delay.py" "http://127.0.0.1:${ADMIN[rev-a]}" \
                "http://127.0.0.1:${PORT[rev-b]}" "$ADMIN_TOKEN" "$SAMPLES" "$fast/cache=$cache")" ||
                die "revocation delay ($fast, cache $cache ms)"
            log "$line"
            printf '%s\t%s\t%s\n' "$fast" "$cache" "$line" >>"$OUT_DIR/revocation.tsv"
            stop_sg rev-b
            stop_sg rev-a
        done
    done
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT_DIR/meta.txt"
[[ -f "$OUT_DIR/results.tsv" ]] && column -t -s$'\t' "$OUT_DIR/results.tsv"
[[ -f "$OUT_DIR/revocation.tsv" ]] && cat "$OUT_DIR/revocation.tsv"
log "results in ${OUT_DIR#"$ROOT"/}"
