#!/usr/bin/env bash
# Whole-gateway load benchmark: sessiongate against nginx, haproxy and an
# nginx + Lua + Redis session gateway, all in front of the same nginx origin,
# on loopback, with wrk.
#
#   bench/load.sh [--quick] [--duration S] [--rounds N] [--warmup S]
#                 [--connections N] [--sessions N] [--rss-sessions N]
#                 [--targets a,b,...] [--out DIR] [--skip-install] [--skip-build]
#                 [--profile]
#
# What it does, in order:
#  1. installs what is missing from Debian's packages (nginx,
#     libnginx-mod-http-lua, lua-nginx-redis, haproxy, wrk, redis-server);
#  2. builds sessiongate (release) and the bundled policy plugins;
#  3. starts, each pinned to CPU 1 (`taskset -c 1`; wrk runs on CPU 0):
#       origin          nginx, 127.0.0.1:18080 (bench/conf/upstream.nginx.conf)
#       nginx-proxy     nginx plain reverse proxy, :18081
#       haproxy         haproxy plain reverse proxy, :18082
#       nginx-lua       nginx + Lua session gateway, :18083, its Redis on :6390
#       sg-embedded     sessiongate A, :18090 (admin :18190): in-process tier +
#                       SQLite, the bundled policy chain of gateway.toml
#       sg-redis-cache  sessiongate B, :18091 (admin :18191): Redis :6391 +
#                       PostgreSQL (database sessiongate_load), local cache 1 s
#       sg-redis        sessiongate C, :18092 (admin :18192): Redis :6392 +
#                       PostgreSQL, no local cache (one Redis GET per request)
#       sg-passthrough  sessiongate, :18094 (admin :18194), embedded store, the
#                       route with auth = "none" and no policies: what the
#                       proxy itself costs, without authentication (a floor)
#     every sessiongate with server.worker_threads = 1 and log level warn;
#  4. seeds --sessions sessions per session gateway (admin API / redis-cli);
#  5. checks that every target proxies and that the session gateways
#     authenticate (401 without a session, 200 and the identity header at
#     the origin with one) — a misconfigured target stops the run;
#  6. runs --rounds interleaved rounds: for each target a warm-up, then
#     `wrk -t1 -c32 --latency`, then the same at 1 connection; samples the
#     resident memory (VmRSS) of each sessiongate during load;
#  7. with --rss-sessions N (default 100000; 0 skips it), starts one more
#     sessiongate A, seeds N sessions, and measures its RSS while wrk
#     rotates through every token;
#  8. with --profile, records a CPU profile of each sessiongate under load
#     (`perf record -e cpu-clock`, software clock: this VM has no hardware
#     counters) and writes its top costs to profile-<target>.txt;
#  9. prints the report (bench/report.py) and stops everything it started.
#
# For every run at --connections it also records the CPU time (utime +
# stime from /proc) that the proxy, its Redis and the origin spent per
# request.
#
# Environment: the same settings as DURATION, ROUNDS, WARMUP, CONNECTIONS,
# SESSIONS, RSS_SESSIONS, TARGETS, OUT_DIR, SKIP_INSTALL=1, SKIP_BUILD=1,
# PROFILE=1.
# PostgreSQL must listen on 127.0.0.1:5432 with trust auth for user postgres
# (scripts/services.sh starts it); the database sessiongate_load is dropped
# and created again on every run. Results go to bench/results/<timestamp>/
# (raw wrk output, results.tsv, report.md). Everything is on loopback.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/bench"
# shellcheck source=bench/sg_config.sh
source "$BENCH/sg_config.sh"
COMMAND_LINE="bench/load.sh $*"

DURATION="${DURATION:-10}"
ROUNDS="${ROUNDS:-3}"
WARMUP="${WARMUP:-1}"
CONNECTIONS="${CONNECTIONS:-32}"
SESSIONS="${SESSIONS:-}"
RSS_SESSIONS="${RSS_SESSIONS:-}"
TARGETS="${TARGETS:-nginx-proxy,haproxy,nginx-lua,sg-embedded,sg-redis-cache,sg-redis,sg-passthrough}"
OUT_DIR="${OUT_DIR:-}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
SKIP_BUILD="${SKIP_BUILD:-0}"
PROFILE="${PROFILE:-0}"
QUICK=0

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --duration) DURATION="$2"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        --warmup) WARMUP="$2"; shift ;;
        --connections) CONNECTIONS="$2"; shift ;;
        --sessions) SESSIONS="$2"; shift ;;
        --rss-sessions) RSS_SESSIONS="$2"; shift ;;
        --targets) TARGETS="$2"; shift ;;
        --out) OUT_DIR="$2"; shift ;;
        --skip-install) SKIP_INSTALL=1 ;;
        --skip-build) SKIP_BUILD=1 ;;
        --profile) PROFILE=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "load.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ "$QUICK" == 1 ]]; then
    DURATION=2
    ROUNDS=1
    SESSIONS="${SESSIONS:-1000}"
    RSS_SESSIONS="${RSS_SESSIONS:-0}"
fi
SESSIONS="${SESSIONS:-10000}"
RSS_SESSIONS="${RSS_SESSIONS:-100000}"
DURATION="${DURATION%s}"
WARMUP="${WARMUP%s}"
for v in DURATION ROUNDS WARMUP CONNECTIONS SESSIONS RSS_SESSIONS; do
    if ! [[ "${!v}" =~ ^[0-9]+$ ]]; then
        echo "load.sh: $v must be a whole number, not '${!v}'" >&2
        exit 2
    fi
done
if ((DURATION < 1 || DURATION > 600 || ROUNDS < 1 || ROUNDS > 20 || WARMUP > 60)); then
    echo "load.sh: duration 1..600 s, rounds 1..20, warm-up 0..60 s" >&2
    exit 2
fi
if ((SESSIONS < 1 || SESSIONS > 1000000 || RSS_SESSIONS > 1000000)); then
    echo "load.sh: at most 1,000,000 sessions" >&2
    exit 2
fi
IFS=, read -r -a TARGET_LIST <<<"$TARGETS"

# Ports (all on 127.0.0.1).
ORIGIN_PORT=18080
declare -A PORT=([nginx-proxy]=18081 [haproxy]=18082 [nginx-lua]=18083
    [sg-embedded]=18090 [sg-redis-cache]=18091 [sg-redis]=18092 [sg-big]=18093 [sg-passthrough]=18094)
declare -A ADMIN_PORT=([sg-embedded]=18190 [sg-redis-cache]=18191 [sg-redis]=18192 [sg-big]=18193
    [sg-passthrough]=18194)
declare -A REDIS_PORT=([nginx-lua]=6390 [sg-redis-cache]=6391 [sg-redis]=6392)
for t in "${TARGET_LIST[@]}"; do
    case "$t" in
        nginx-proxy | haproxy | nginx-lua | sg-embedded | sg-redis-cache | sg-redis | sg-passthrough) ;;
        *) echo "load.sh: unknown target '$t' (nginx-proxy, haproxy, nginx-lua, sg-embedded, sg-redis-cache, sg-redis, sg-passthrough)" >&2; exit 2 ;;
    esac
done
PG_URL_ADMIN="postgres://postgres@127.0.0.1:5432/postgres"
PG_DB=sessiongate_load
export PGCONNECT_TIMEOUT=5
PG_URL="postgres://postgres@127.0.0.1:5432/$PG_DB"
ADMIN_TOKEN="bench-admin-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# ---------------------------------------------------------------- 1. install
install_missing() {
    local pkgs=()
    command -v nginx >/dev/null || pkgs+=(nginx)
    [[ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ]] || pkgs+=(libnginx-mod-http-lua)
    [[ -f /usr/share/lua/5.1/nginx/redis.lua ]] || pkgs+=(lua-nginx-redis)
    command -v haproxy >/dev/null || pkgs+=(haproxy)
    command -v wrk >/dev/null || pkgs+=(wrk)
    command -v redis-server >/dev/null || pkgs+=(redis-server)
    command -v redis-cli >/dev/null || pkgs+=(redis-tools)
    command -v psql >/dev/null || pkgs+=(postgresql-client)
    command -v curl >/dev/null || pkgs+=(curl)
    command -v python3 >/dev/null || pkgs+=(python3)
    if [[ "$PROFILE" == 1 ]]; then command -v perf >/dev/null || pkgs+=(linux-perf); fi
    if ((${#pkgs[@]})); then
        log "installing ${pkgs[*]}"
        timeout 900 apt-get update -qq
        DEBIAN_FRONTEND=noninteractive timeout 1800 apt-get install -y -qq "${pkgs[@]}" >/dev/null
    fi
}
if [[ "$SKIP_INSTALL" != 1 ]]; then install_missing; fi

# ------------------------------------------------------------------ 2. build
SG="$ROOT/target/release/sessiongate"
if [[ "$SKIP_BUILD" != 1 ]]; then
    log "building sessiongate (release) and the policy plugins"
    (cd "$ROOT" && timeout 3600 cargo build --quiet --release --bin sessiongate)
    (cd "$ROOT" && timeout 1800 scripts/build-plugins.sh)
fi
if [[ ",$TARGETS," == *,sg-* ]] || ((RSS_SESSIONS > 0)); then
    [[ -x "$SG" ]] || die "$SG is missing (run without --skip-build)"
    for p in ttl activity-refresh max-sessions; do
        [[ -f "$ROOT/plugins/$p.wasm" ]] || die "plugins/$p.wasm is missing (scripts/build-plugins.sh)"
    done
fi

# ------------------------------------------------------- processes & cleanup
RUN="$(mktemp -d /tmp/sessiongate-load.XXXXXX)"
mkdir -p "$RUN/logs" "$RUN/tmp" "$RUN/www"
declare -A PID=()
STARTED=()   # names, in start order
SAMPLER_PID=""
KEEP_RUN_DIR=0

stop_pid() { # name pid: TERM, up to 10 s, then KILL (children too)
    local name="$1" pid="$2" children i
    [[ -d /proc/$pid ]] || return 0
    children="$(cat /proc/"$pid"/task/*/children 2>/dev/null || true)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        [[ -d /proc/$pid && "$(awk '{print $3}' /proc/"$pid"/stat 2>/dev/null)" != Z ]] || break
        sleep 0.1
    done
    if [[ -d /proc/$pid && "$(awk '{print $3}' /proc/"$pid"/stat 2>/dev/null)" != Z ]]; then
        log "$name ($pid) did not stop within 10 s of SIGTERM; killing it (its log: $RUN/logs/$name.log)"
        tail -n 5 "$RUN/logs/$name.log" >&2 2>/dev/null || true
        KEEP_RUN_DIR=1
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    for c in $children; do
        if [[ -d /proc/$c ]]; then kill -KILL "$c" 2>/dev/null || true; fi
    done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$SAMPLER_PID" ]]; then kill "$SAMPLER_PID" 2>/dev/null || true; wait "$SAMPLER_PID" 2>/dev/null || true; fi
    local i
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
        stop_pid "${STARTED[$i]}" "${PID[${STARTED[$i]}]}"
    done
    if ((rc != 0)); then KEEP_RUN_DIR=1; fi
    if [[ "$KEEP_RUN_DIR" == 0 ]]; then rm -rf "$RUN"; else log "logs kept in $RUN/logs"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# start NAME CMD...: runs CMD pinned to CPU 1, logging to $RUN/logs/NAME.log.
start() {
    local name="$1"
    shift
    taskset -c 1 "$@" >"$RUN/logs/$name.log" 2>&1 &
    PID[$name]=$!
    STARTED+=("$name")
}

# wait_port NAME PORT: until PORT accepts connections (15 s at most).
wait_port() {
    local name="$1" port="$2" i
    for ((i = 0; i < 150; i++)); do
        port_open "$port" && return 0
        [[ -d /proc/${PID[$name]} ]] || break
        sleep 0.1
    done
    tail -n 20 "$RUN/logs/$name.log" >&2 || true
    die "$name did not listen on 127.0.0.1:$port"
}

require_free() {
    local port
    for port in "$@"; do
        if port_open "$port"; then die "127.0.0.1:$port is already in use (a previous run still going?)"; fi
    done
}

# ---------------------------------------------------------------- 3. start
timeout 10 pg_isready -h 127.0.0.1 -p 5432 -q ||
    die "PostgreSQL is not answering on 127.0.0.1:5432 (scripts/services.sh starts it)"
require_free "$ORIGIN_PORT" "${PORT[@]}" "${ADMIN_PORT[@]}" "${REDIS_PORT[@]}"

has_target() { [[ ",$TARGETS," == *",$1,"* ]]; }

head -c 16384 /dev/zero | tr '\0' 'x' >"$RUN/www/16k"

start_nginx() { # name conf
    start "$1" nginx -p "$RUN/" -e "$RUN/logs/$1.error.log" -c "$BENCH/conf/$2" -g 'daemon off;'
}
start_redis() { # name port
    start "$1" redis-server --bind 127.0.0.1 --port "$2" --save "" --appendonly no \
        --dir "$RUN/tmp" --daemonize no --logfile ""
    wait_port "$1" "$2"
}

log "run directory $RUN"
start_nginx origin upstream.nginx.conf
wait_port origin "$ORIGIN_PORT"
if has_target nginx-proxy; then
    start_nginx nginx-proxy nginx-proxy.conf
    wait_port nginx-proxy "${PORT[nginx-proxy]}"
fi
if has_target haproxy; then
    start haproxy haproxy -db -f "$BENCH/conf/haproxy.cfg"
    wait_port haproxy "${PORT[haproxy]}"
fi
if has_target nginx-lua; then
    start_redis redis-lua "${REDIS_PORT[nginx-lua]}"
    start_nginx nginx-lua nginx-lua-session.conf
    wait_port nginx-lua "${PORT[nginx-lua]}"
fi

# sg_config NAME DATABASE_URL REDIS_URL LOCAL_CACHE_MS [passthrough]: writes
# $RUN/NAME.toml. The [[policies]] are gateway.toml's own, with absolute
# plugin paths; "passthrough" means auth = "none" and no policies.
sg_config() {
    local name="$1" db="$2" redis="$3" cache_ms="$4" mode="${5:-}" file="$RUN/$1.toml"
    local auth=required
    if [[ "$mode" == passthrough ]]; then auth=none; fi
    write_sg_config "$file" "${PORT[$name]}" "${ADMIN_PORT[$name]}" "$ADMIN_TOKEN" "$ORIGIN_PORT" \
        "$db" "$redis" "$cache_ms" "load:$name:" "$auth" "$ROOT" || die "cannot write $file"
    "$SG" check --config "$file" >"$RUN/logs/$name.check.log" 2>&1 ||
        { cat "$RUN/logs/$name.check.log" >&2; die "sessiongate check failed for $file"; }
}

# start_sg NAME: starts the gateway of $RUN/NAME.toml and waits for /readyz.
start_sg() {
    local name="$1" i code
    start "$name" "$SG" serve --config "$RUN/$name.toml"
    for ((i = 0; i < 300; i++)); do
        code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 \
            "http://127.0.0.1:${ADMIN_PORT[$name]}/readyz" || true)"
        [[ "$code" == 200 ]] && return 0
        [[ -d /proc/${PID[$name]} ]] || break
        sleep 0.1
    done
    tail -n 30 "$RUN/logs/$name.log" >&2 || true
    die "$name is not ready (GET /readyz: $code)"
}

if has_target sg-redis-cache || has_target sg-redis; then
    log "PostgreSQL: database $PG_DB (dropped and created again)"
    timeout 60 psql -q -v ON_ERROR_STOP=1 "$PG_URL_ADMIN" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null
    timeout 60 psql -q -v ON_ERROR_STOP=1 "$PG_URL_ADMIN" -c "CREATE DATABASE $PG_DB" >/dev/null
fi
if has_target sg-embedded; then
    sg_config sg-embedded "sqlite://$RUN/sg-embedded.db" "" 0
    start_sg sg-embedded
fi
if has_target sg-redis-cache; then
    start_redis redis-sg-redis-cache "${REDIS_PORT[sg-redis-cache]}"
    sg_config sg-redis-cache "$PG_URL" "redis://127.0.0.1:${REDIS_PORT[sg-redis-cache]}" 1000
    start_sg sg-redis-cache
fi
if has_target sg-redis; then
    start_redis redis-sg-redis "${REDIS_PORT[sg-redis]}"
    sg_config sg-redis "$PG_URL" "redis://127.0.0.1:${REDIS_PORT[sg-redis]}" 0
    start_sg sg-redis
fi
if has_target sg-passthrough; then
    sg_config sg-passthrough "sqlite://$RUN/sg-passthrough.db" "" 0 passthrough
    start_sg sg-passthrough
fi

# ---------------------------------------------------------------- 4. seed
declare -A TOKEN=() USER_ID=()
seed_sg() { # name count file prefix
    taskset -c 0 timeout 1800 python3 "$BENCH/seed.py" gateway \
        "http://127.0.0.1:${ADMIN_PORT[$1]}" "$ADMIN_TOKEN" "$2" "$3" 8 "$4" ||
        die "seeding $1 failed"
}
for t in "${TARGET_LIST[@]}"; do
    case "$t" in
        sg-passthrough) ;;
        sg-*)
            log "seeding $SESSIONS sessions into $t (admin API)"
            seed_sg "$t" "$SESSIONS" "$RUN/tokens-$t.tsv" "$t"
            ;;
        nginx-lua)
            log "seeding $SESSIONS sessions into the Lua peer's Redis"
            python3 "$BENCH/seed.py" redis "$SESSIONS" "$RUN/tokens-$t.tsv" "$t" |
                timeout 300 redis-cli -p "${REDIS_PORT[nginx-lua]}" --pipe >"$RUN/logs/redis-pipe.log" 2>&1 ||
                { cat "$RUN/logs/redis-pipe.log" >&2; die "redis-cli --pipe failed"; }
            grep -q "errors: 0, replies: $SESSIONS" "$RUN/logs/redis-pipe.log" ||
                { cat "$RUN/logs/redis-pipe.log" >&2; die "redis-cli --pipe reported errors"; }
            ;;
        nginx-proxy | haproxy) ;;
    esac
done
for t in "${TARGET_LIST[@]}"; do
    if [[ -f "$RUN/tokens-$t.tsv" ]]; then
        # The middle session: neither the first nor the last created.
        IFS=$'\t' read -r TOKEN[$t] USER_ID[$t] < <(sed -n "$(((SESSIONS + 1) / 2))p" "$RUN/tokens-$t.tsv")
    else
        # Plain proxies get a cookie of the same size, which they ignore.
        TOKEN[$t]="$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"
        USER_ID[$t]=""
    fi
done

# ---------------------------------------------------------------- 5. check
http() { # url [curl args...]: prints "status body"
    local url="$1"
    shift
    local resp
    resp="$(curl -s --max-time 5 -w ' %{http_code}' "$@" "$url" || true)"
    echo "${resp##* } ${resp% *}"
}
expect() { # target what got want
    if [[ "$3" != "$4" ]]; then die "$1: $2: got '$3', want '$4'"; fi
}
for t in "${TARGET_LIST[@]}"; do
    base="http://127.0.0.1:${PORT[$t]}"
    cookie="Cookie: sg_session=${TOKEN[$t]}"
    forged="Cookie: sg_session=$(python3 -c 'import secrets; print(secrets.token_urlsafe(48))')"
    expect "$t" "GET / with the cookie" "$(http "$base/" -H "$cookie")" "200 ok"
    if [[ -n "${USER_ID[$t]}" ]]; then
        expect "$t" "GET / without a cookie" "$(http "$base/" | head -1 | cut -d' ' -f1)" 401
        expect "$t" "GET / with an unknown token" "$(http "$base/" -H "$forged" | head -1 | cut -d' ' -f1)" 401
        expect "$t" "identity at the origin" \
            "$(http "$base/__whoami" -H "$cookie" -H 'X-User-Id: mallory')" "200 ${USER_ID[$t]}"
    else
        expect "$t" "GET / without a cookie" "$(http "$base/")" "200 ok"
    fi
    log "check $t: ok${USER_ID[$t]:+ (401 without a session, identity ${USER_ID[$t]} at the origin)}"
done

# ---------------------------------------------------------------- 6. measure
if [[ -z "$OUT_DIR" ]]; then OUT_DIR="$BENCH/results/$(date +%Y%m%d-%H%M%S)"; fi
mkdir -p "$OUT_DIR/raw"
{
    echo "date: $(date -Iseconds)"
    echo "command: $COMMAND_LINE"
    echo "settings: duration ${DURATION}s, warm-up ${WARMUP}s, rounds $ROUNDS, connections $CONNECTIONS and 1, $SESSIONS sessions per session gateway"
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
    echo "versions: $(nginx -v 2>&1 | sed 's/.*: //'), $(haproxy -v | head -1 | awk '{print "haproxy " $3}'), redis $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), $(wrk -v 2>&1 | head -1 | awk '{print "wrk " $2}'), sessiongate $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ' + uncommitted changes')"
    echo "binary: target/release/sessiongate built $(date -r "$SG" -Iseconds 2>/dev/null || echo '?')"
    echo "pinning: servers on CPU 1 (taskset -c 1), wrk on CPU 0; PostgreSQL (system service) unpinned"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT_DIR/meta.txt"
printf 'round\ttarget\tconns\trps\tp50_us\tp99_us\tnon2xx\tsocket_errors\n' >"$OUT_DIR/results.tsv"
printf 'target\tround\tpeak_kib\thwm_kib\n' >"$OUT_DIR/rss.tsv"
printf 'target\tround\trequests\tclk_tck\tproxy_ticks\tredis_ticks\torigin_ticks\tcpu0_busy\tcpu0_total\tcpu1_busy\tcpu1_total\tsteal0\tsteal1\n' >"$OUT_DIR/cpu.tsv"

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# CPU time (clock ticks, utime + stime) of a process, its threads and its
# direct children (nginx's worker).
CLK_TCK="$(getconf CLK_TCK)"
proc_ticks() {
    local pid="$1" total=0 p
    for p in "$pid" $(cat /proc/"$pid"/task/*/children 2>/dev/null); do
        total=$((total + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
# cpu_snapshot: "busy0 total0 busy1 total1 steal0 steal1" in clock ticks from
# /proc/stat (busy = user + nice + system + irq + softirq).
cpu_snapshot() {
    awk '$1 == "cpu0" || $1 == "cpu1" {
        busy = $2 + $3 + $4 + $7 + $8; total = busy + $5 + $6 + $9
        b[$1] = busy; t[$1] = total; st[$1] = $9 }
        END { print b["cpu0"], t["cpu0"], b["cpu1"], t["cpu1"], st["cpu0"], st["cpu1"] }' /proc/stat
}
declare -A AUX=([nginx-lua]=redis-lua [sg-redis-cache]=redis-sg-redis-cache [sg-redis]=redis-sg-redis)
aux_ticks() { if [[ -n "${AUX[$1]:-}" ]]; then proc_ticks "${PID[${AUX[$1]}]}"; else echo 0; fi; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

# rss_sampler PID FILE: writes the highest VmRSS seen (KiB) to FILE, every 0.25 s.
start_sampler() {
    local pid="$1" file="$2"
    (
        max=0
        while [[ -d /proc/$pid ]]; do
            v="$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)"
            if ((v > max)); then max=$v; echo "$max" >"$file"; fi
            sleep 0.25
        done
    ) &
    SAMPLER_PID=$!
}
stop_sampler() {
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=""
}

# wrk_run OUT CONNS SECONDS URL [wrk args...]
wrk_run() {
    local out="$1" conns="$2" secs="$3" url="$4"
    shift 4
    taskset -c 0 timeout $((secs + 30)) wrk -t1 -c"$conns" -d"${secs}s" --latency "$@" "$url" >"$out" 2>&1 ||
        { cat "$out" >&2; die "wrk failed: $url"; }
}

log "load average before measuring: $(cut -d' ' -f1-3 /proc/loadavg)"
for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r/$ROUNDS (load average $(cut -d' ' -f1-3 /proc/loadavg); rustc processes running: $(pgrep -c -x rustc || true))"
    echo "round $r: load average $(cut -d' ' -f1-3 /proc/loadavg), rustc processes $(pgrep -c -x rustc || true)" >>"$OUT_DIR/meta.txt"
    for conns in "$CONNECTIONS" 1; do
        for t in "${TARGET_LIST[@]}"; do
            url="http://127.0.0.1:${PORT[$t]}/"
            hdr=(-H "Cookie: sg_session=${TOKEN[$t]}")
            if ((WARMUP > 0)); then
                wrk_run "$OUT_DIR/raw/warmup.txt" "$conns" "$WARMUP" "$url" "${hdr[@]}"
            fi
            raw="$OUT_DIR/raw/r$r-$t-c$conns.txt"
            if [[ "$conns" != 1 ]]; then
                [[ "$t" == sg-* ]] && start_sampler "${PID[$t]}" "$RUN/rss-peak"
                p0="$(proc_ticks "${PID[$t]}")" a0="$(aux_ticks "$t")" o0="$(proc_ticks "${PID[origin]}")"
                read -r -a s0 < <(cpu_snapshot)
                wrk_run "$raw" "$conns" "$DURATION" "$url" "${hdr[@]}"
                read -r -a s1 < <(cpu_snapshot)
                p1="$(proc_ticks "${PID[$t]}")" a1="$(aux_ticks "$t")" o1="$(proc_ticks "${PID[origin]}")"
                if [[ "$t" == sg-* ]]; then
                    stop_sampler
                    printf '%s\t%s\t%s\t%s\n' "$t" "$r" "$(cat "$RUN/rss-peak")" "$(hwm_kib "${PID[$t]}")" >>"$OUT_DIR/rss.tsv"
                fi
            else
                wrk_run "$raw" "$conns" "$DURATION" "$url" "${hdr[@]}"
            fi
            read -r rps p50 p99 non2xx sockerr requests < <(python3 "$BENCH/report.py" parse "$raw")
            if [[ "$conns" != 1 ]]; then
                printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$r" "$requests" "$CLK_TCK" \
                    $((p1 - p0)) $((a1 - a0)) $((o1 - o0)) $((s1[0] - s0[0])) $((s1[1] - s0[1])) \
                    $((s1[2] - s0[2])) $((s1[3] - s0[3])) $((s1[4] - s0[4])) $((s1[5] - s0[5])) >>"$OUT_DIR/cpu.tsv"
                foreign=$(( (s1[2] - s0[2] - (p1 - p0) - (a1 - a0) - (o1 - o0)) * 100 / (s1[3] - s0[3] + 1) ))
                if ((foreign < 0)); then foreign=0; fi # tick-sampling granularity
            fi
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$t" "$conns" "$rps" "$p50" "$p99" "$non2xx" "$sockerr" >>"$OUT_DIR/results.tsv"
            log "  $t c$conns: $rps req/s, p50 ${p50} µs, p99 ${p99} µs$( ((non2xx + sockerr)) && echo ", $non2xx non-2xx, $sockerr socket errors")$([[ "$conns" != 1 ]] && echo " (CPU 0 busy $(( (s1[0] - s0[0]) * 100 / (s1[1] - s0[1] + 1) ))%, CPU 1 busy $(( (s1[2] - s0[2]) * 100 / (s1[3] - s0[3] + 1) ))%, of which not ours ${foreign}%)")"
        done
    done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT_DIR/meta.txt"
for t in "${TARGET_LIST[@]}"; do
    if [[ "$t" == sg-* ]]; then
        curl -s --max-time 5 "http://127.0.0.1:${ADMIN_PORT[$t]}/metrics" >"$OUT_DIR/raw/metrics-$t.txt" || true
    fi
done

# ------------------------------------------------------- 7. RSS, many sessions
if ((RSS_SESSIONS > 0)); then
    sg_config sg-big "sqlite://$RUN/sg-big.db" "" 0
    start_sg sg-big
    idle0="$(rss_kib "${PID[sg-big]}")"
    log "RSS run: seeding $RSS_SESSIONS sessions into sessiongate A (RSS before: $((idle0 / 1024)) MiB)"
    seed_sg sg-big "$RSS_SESSIONS" "$RUN/tokens-sg-big.tsv" sg-big
    sleep 2
    idle="$(rss_kib "${PID[sg-big]}")"
    start_sampler "${PID[sg-big]}" "$RUN/rss-peak"
    export TOKENS="$RUN/tokens-sg-big.tsv"
    wrk_run "$OUT_DIR/raw/rss-big.txt" "$CONNECTIONS" \
        "$((DURATION > 10 ? DURATION : 10))" "http://127.0.0.1:${PORT[sg-big]}/" -s "$BENCH/rotate.lua"
    stop_sampler
    read -r rps _ _ non2xx sockerr requests < <(python3 "$BENCH/report.py" parse "$OUT_DIR/raw/rss-big.txt")
    ((non2xx == 0 && sockerr == 0)) || die "RSS run: $non2xx non-2xx responses, $sockerr socket errors"
    ((requests >= RSS_SESSIONS)) || log "RSS run: only $requests requests, fewer than the $RSS_SESSIONS sessions"
    printf 'sessions\tidle_kib\tpeak_kib\thwm_kib\trps\n%s\t%s\t%s\t%s\t%s\n' "$RSS_SESSIONS" "$idle" \
        "$(cat "$RUN/rss-peak")" "$(hwm_kib "${PID[sg-big]}")" "$rps" >"$OUT_DIR/rss-big.tsv"
    log "RSS run: $((idle / 1024)) MiB after seeding, $(($(cat "$RUN/rss-peak") / 1024)) MiB peak under load ($requests requests rotating over every token)"
    curl -s --max-time 5 "http://127.0.0.1:${ADMIN_PORT[sg-big]}/metrics" >"$OUT_DIR/raw/metrics-sg-big.txt" || true
    stop_pid sg-big "${PID[sg-big]}"
fi

# ---------------------------------------------------------------- 8. profile
# perf_top N ARGS...: the first N lines of `perf report --stdio ARGS`.
perf_top() {
    local n="$1"
    shift
    perf report --stdio -g none "$@" 2>/dev/null | grep -v '^#' | grep -v '^$' | head -n "$n" || true
}
if [[ "$PROFILE" == 1 ]]; then
    for t in "${TARGET_LIST[@]}"; do
        [[ "$t" == sg-* ]] || continue
        secs=$((DURATION > 4 ? DURATION - 2 : 2))
        log "profiling $t under load (perf record -e cpu-clock, ${secs}s)"
        taskset -c 0 timeout $((secs + 40)) wrk -t1 -c"$CONNECTIONS" -d"$((secs + 2))s" \
            -H "Cookie: sg_session=${TOKEN[$t]}" "http://127.0.0.1:${PORT[$t]}/" >"$OUT_DIR/raw/profile-$t-wrk.txt" 2>&1 &
        wrk_pid=$!
        sleep 1
        taskset -c 0 timeout $((secs + 60)) perf record -q -e cpu-clock -F 499 -g --call-graph dwarf,16384 \
            -p "${PID[$t]}" -o "$RUN/perf-$t.data" -- sleep "$secs" >"$RUN/logs/perf-$t.log" 2>&1 ||
            { cat "$RUN/logs/perf-$t.log" >&2; die "perf record failed"; }
        wait "$wrk_pid" || true
        data="$RUN/perf-$t.data"
        {
            echo "# $t: perf record -e cpu-clock -F 499 -g --call-graph dwarf, ${secs}s at $CONNECTIONS connections"
            grep 'Requests/sec' "$OUT_DIR/raw/profile-$t-wrk.txt" || true
            echo
            echo "## Share by DSO (self)"
            perf_top 8 -i "$data" --no-children --sort dso
            echo
            echo "## Top symbols (self)"
            perf_top 40 -i "$data" --no-children --sort sym
            echo
            echo "## sessiongate functions (inclusive, with children)"
            perf_top 100000 -i "$data" --children --sort sym |
                grep -E '\] (sessiongate::[A-Za-z_:]+|hyper_util::client::legacy::client::Client<C,B>::send_request|uuid::[^ ]+|redis::[A-Za-z_:]+|moka::sync::[A-Za-z_:<>,]+)' |
                awk '{print $1, $2, $4}' | sort -u -k3,3 | sort -rn | head -40 || true
        } >"$OUT_DIR/profile-$t.txt" 2>&1
    done
fi

# ---------------------------------------------------------------- 9. report
rc=0
python3 "$BENCH/report.py" summary "$OUT_DIR" >"$OUT_DIR/report.md" || rc=$?
cat "$OUT_DIR/report.md"
log "results in ${OUT_DIR#"$ROOT"/}"
exit "$rc"
