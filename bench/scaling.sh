#!/usr/bin/env bash
# Scaling benchmark: sessiongate's throughput and latency against the number
# of live sessions and the number of client connections, with every request
# carrying a different session (wrk rotating through all the tokens).
#
#   bench/scaling.sh [--sessions 10000,100000,1000000] [--connections 1,32,256]
#                    [--duration S] [--targets sg-embedded,sg-redis]
#                    [--skip-build] [--out DIR]
#   (environment: EMBEDDED_MAX, default 100000: the largest session count
#   for sg-embedded; 0 for no cap)
#
# Targets (the same configs as bench/load.sh's A and C):
#   sg-embedded  in-process tier + SQLite, the bundled policy chain
#   sg-redis     Redis (its own server, :6393) + PostgreSQL (database
#                sessiongate_scale), no local cache: one Redis GET per request
#
# For each target and session count: fresh stores, sessions seeded straight
# into them by examples/seed_sessions.rs (the admin API would take most of an
# hour for a million), the gateway started pinned to CPU 1 with the origin
# (nginx, bench/conf/upstream.nginx.conf), one warm-up pass over every token
# (the embedded store restores each session from SQLite on its first
# lookup), then wrk on CPU 0 at each connection count. Writes results.tsv,
# report.md and scaling.png (matplotlib, installed with pip if missing) to
# bench/results/scaling-<timestamp>/. Stops what it started, by pid.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/bench"
# shellcheck source=bench/sg_config.sh
source "$BENCH/sg_config.sh"
SESSIONS_LIST="${SESSIONS_LIST:-10000,100000,1000000}"
# The embedded store's sessions come from SQLite on their first lookup: a
# million of them take minutes to seed and minutes more to warm, for a
# hash-map lookup. Its largest count is capped here (0 = no cap).
EMBEDDED_MAX="${EMBEDDED_MAX:-100000}"
CONNECTIONS_LIST="${CONNECTIONS_LIST:-1,32,256}"
DURATION="${DURATION:-10}"
TARGETS="${TARGETS:-sg-embedded,sg-redis}"
SKIP_BUILD="${SKIP_BUILD:-0}"
OUT_DIR=""
while (($#)); do
    case "$1" in
        --sessions) SESSIONS_LIST="$2"; shift ;;
        --connections) CONNECTIONS_LIST="$2"; shift ;;
        --duration) DURATION="$2"; shift ;;
        --targets) TARGETS="$2"; shift ;;
        --skip-build) SKIP_BUILD=1 ;;
        --out) OUT_DIR="$2"; shift ;;
        -h | --help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "scaling.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ORIGIN_PORT=18080
SG_PORT=18095
ADMIN_PORT=18195
REDIS_PORT=6393
ADMIN_TOKEN="scaling-admin-token-0123456789abcdef"
PG_ADMIN="postgres://postgres@127.0.0.1:5432/postgres"
PG_DB=sessiongate_scale
PG_URL="postgres://postgres@127.0.0.1:5432/$PG_DB"
SG="$ROOT/target/release/sessiongate"
SEED="$ROOT/target/release/examples/seed_sessions"

command -v wrk >/dev/null || die "wrk is missing (bench/load.sh installs it)"
command -v nginx >/dev/null || die "nginx is missing (bench/load.sh installs it)"
if [[ "$SKIP_BUILD" != 1 ]]; then
    log "building sessiongate, the seeder and the plugins (release)"
    (cd "$ROOT" && scripts/build-plugins.sh >/dev/null &&
        cargo build --release --bin sessiongate --example seed_sessions)
fi
[[ -x "$SG" && -x "$SEED" ]] || die "build first (or drop --skip-build)"
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install -q matplotlib >&2 ||
    log "matplotlib could not be installed: no plot"

STAMP="$(date +%Y%m%d-%H%M%S)"
OUT_DIR="${OUT_DIR:-$BENCH/results/scaling-$STAMP}"
mkdir -p "$OUT_DIR/raw"
RUN="$(mktemp -d /tmp/sessiongate-scaling.XXXXXX)"
mkdir -p "$RUN/logs" "$RUN/tmp" "$RUN/www"
for p in "$ORIGIN_PORT" "$SG_PORT" "$ADMIN_PORT" "$REDIS_PORT"; do
    port_open "$p" && die "127.0.0.1:$p is already in use"
done

declare -a STARTED_PIDS=()
stop_pid() {
    local pid="$1" i
    [[ -d /proc/$pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        [[ -d /proc/$pid && "$(awk '{print $3}' /proc/"$pid"/stat 2>/dev/null)" != Z ]] || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do stop_pid "$pid"; done
    rm -rf "$RUN"
}
trap cleanup EXIT

start() { # name cmd...: pinned to CPU 1; sets LAST_PID
    local name="$1"
    shift
    taskset -c 1 "$@" >"$RUN/logs/$name.log" 2>&1 &
    LAST_PID=$!
    STARTED_PIDS+=("$LAST_PID")
}
wait_port() {
    local port="$1" pid="$2" i
    for ((i = 0; i < 300; i++)); do
        port_open "$port" && return 0
        [[ -d /proc/$pid ]] || break
        sleep 0.1
    done
    die "nothing listens on 127.0.0.1:$port"
}

start origin nginx -p "$RUN/" -e "$RUN/logs/origin.error.log" -c "$BENCH/conf/upstream.nginx.conf" -g 'daemon off;'
wait_port "$ORIGIN_PORT" "$LAST_PID"

# config FILE DATABASE_URL [REDIS_URL]: a gateway like bench/load.sh's A / C.
config() {
    write_sg_config "$1" "$SG_PORT" "$ADMIN_PORT" "$ADMIN_TOKEN" "$ORIGIN_PORT" \
        "$2" "${3:-}" 0 "scale:" required "$ROOT" || die "cannot write $1"
}

IFS=, read -r -a TARGET_LIST <<<"$TARGETS"
IFS=, read -r -a N_LIST <<<"$SESSIONS_LIST"
IFS=, read -r -a C_LIST <<<"$CONNECTIONS_LIST"
printf 'target\tsessions\tconnections\trps\tp50_us\tp99_us\tnon2xx\tsocket_errors\trss_kib\n' >"$OUT_DIR/results.tsv"
{
    echo "date: $(date -Iseconds)"
    echo "command: bench/scaling.sh --sessions $SESSIONS_LIST --connections $CONNECTIONS_LIST --duration $DURATION --targets $TARGETS"
    echo "sessiongate: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src || echo ' + uncommitted changes')"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT_DIR/meta.txt"

for t in "${TARGET_LIST[@]}"; do
    for n in "${N_LIST[@]}"; do
        if [[ "$t" == sg-embedded ]] && ((EMBEDDED_MAX > 0 && n > EMBEDDED_MAX)); then
            log "$t, $n sessions: skipped (over EMBEDDED_MAX=$EMBEDDED_MAX)"
            continue
        fi
        conf="$RUN/$t-$n.toml"
        seed_conf="$RUN/$t-$n.seed.toml"
        tokens="$RUN/tokens-$t-$n.tsv"
        case "$t" in
            sg-embedded)
                config "$conf" "sqlite://$RUN/$t-$n.db"
                cp "$conf" "$seed_conf"
                ;;
            sg-redis)
                if [[ -z "${REDIS_PID:-}" ]]; then
                    start redis redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" \
                        --appendonly no --dir "$RUN/tmp" --daemonize no --logfile ""
                    REDIS_PID=$LAST_PID
                    wait_port "$REDIS_PORT" "$REDIS_PID"
                fi
                redis-cli -p "$REDIS_PORT" FLUSHALL >/dev/null
                psql -q -v ON_ERROR_STOP=1 "$PG_ADMIN" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null
                psql -q -v ON_ERROR_STOP=1 "$PG_ADMIN" -c "CREATE DATABASE $PG_DB" >/dev/null
                config "$conf" "$PG_URL" "redis://127.0.0.1:$REDIS_PORT"
                # The seeder alone commits without waiting for the WAL
                # flush: it fills the database faster; the gateway does not.
                config "$seed_conf" "$PG_URL?options=-c%20synchronous_commit%3Doff" "redis://127.0.0.1:$REDIS_PORT"
                ;;
            *) die "unknown target $t" ;;
        esac
        log "$t, $n sessions: seeding"
        taskset -c 0 "$SEED" "$seed_conf" "$n" "$tokens" "$t" 2>"$RUN/logs/seed-$t-$n.log" ||
            { cat "$RUN/logs/seed-$t-$n.log" >&2; die "seeding failed"; }
        tail -n 1 "$RUN/logs/seed-$t-$n.log" >&2
        start "$t-$n" "$SG" serve --config "$conf"
        pid=$LAST_PID
        for ((i = 0; i < 300; i++)); do
            [[ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$ADMIN_PORT/readyz" || true)" == 200 ]] && break
            [[ -d /proc/$pid ]] || { tail -n 20 "$RUN/logs/$t-$n.log" >&2; die "$t did not start"; }
            sleep 0.1
        done
        # The gateway authenticates: 401 without a session, 200 with one.
        code="$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$SG_PORT/")"
        [[ "$code" == 401 ]] || die "$t answered $code without a session"
        code="$(curl -s -o /dev/null -w '%{http_code}' -H "Cookie: sg_session=$(head -n1 "$tokens" | cut -f1)" "http://127.0.0.1:$SG_PORT/")"
        [[ "$code" == 200 ]] || die "$t answered $code to a seeded session"
        export TOKENS="$tokens"
        if [[ "$t" == sg-embedded ]]; then
            # One pass over every token, in 5 s pieces that continue where
            # the last stopped: the embedded store's first lookup of each
            # session reads SQLite, at a rate nobody can guess well.
            log "$t, $n sessions: warm-up pass over every token"
            done_n=0
            while ((done_n < n)); do
                START=$done_n taskset -c 0 timeout 60 wrk -t1 -c64 -d5s -s "$BENCH/rotate.lua" \
                    "http://127.0.0.1:$SG_PORT/" >"$OUT_DIR/raw/warm-$t-$n.txt" 2>&1 || die "wrk failed"
                got="$(awk '/requests in/ {print $1}' "$OUT_DIR/raw/warm-$t-$n.txt")"
                ((got > 0)) || die "warm-up: no requests answered"
                done_n=$((done_n + got))
            done
            log "  warm-up: $done_n requests"
        else
            # Redis holds every session already: a short warm-up.
            log "$t, $n sessions: warm-up (3 s)"
            taskset -c 0 timeout 60 wrk -t1 -c64 -d3s -s "$BENCH/rotate.lua" \
                "http://127.0.0.1:$SG_PORT/" >"$OUT_DIR/raw/warm-$t-$n.txt" 2>&1 || die "wrk failed"
        fi
        for c in "${C_LIST[@]}"; do
            raw="$OUT_DIR/raw/$t-$n-c$c.txt"
            taskset -c 0 timeout $((DURATION + 30)) wrk -t1 -c"$c" -d"${DURATION}s" --latency \
                -s "$BENCH/rotate.lua" "http://127.0.0.1:$SG_PORT/" >"$raw" 2>&1 || die "wrk failed"
            read -r rps p50 p99 non2xx sockerr _ < <(python3 "$BENCH/report.py" parse "$raw")
            rss="$(awk '/^VmRSS/ {print $2}' /proc/"$pid"/status)"
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$n" "$c" "$rps" "$p50" "$p99" "$non2xx" "$sockerr" "$rss" >>"$OUT_DIR/results.tsv"
            log "  $t $n sessions c$c: $rps req/s, p50 $p50 µs, p99 $p99 µs, RSS $((rss / 1024)) MiB$( ((non2xx + sockerr)) && echo ", $non2xx non-2xx, $sockerr socket errors")"
        done
        stop_pid "$pid"
    done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT_DIR/meta.txt"
python3 "$BENCH/scaling_report.py" "$OUT_DIR" >"$OUT_DIR/report.md"
cat "$OUT_DIR/report.md"
log "results in ${OUT_DIR#"$ROOT"/}"
