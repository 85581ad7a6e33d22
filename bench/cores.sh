#!/usr/bin/env bash
# Cores benchmark (issue 13): requests/s against the number of workers,
# sessiongate with `server.worker_threads` 1 and 2 next to nginx with
# `worker_processes` 1 and 2, all in front of the same nginx origin, on
# loopback, with wrk.
#
#   bench/cores.sh [--duration S] [--rounds N] [--connections N]
#                  [--targets a,b,...] [--out DIR] [--skip-install]
#                  [--skip-build]
#
# Targets (the number is the workers):
#   nginx-1, nginx-2   nginx plain reverse proxy (bench/conf/nginx-proxy.conf);
#                      nginx-2 with `worker_processes 2` and `listen ...
#                      reuseport` (a socket per worker, as sessiongate's)
#   sg-auth-1, sg-auth-2
#                      sessiongate A: in-process tier + SQLite, the bundled
#                      policy chain of gateway.toml, route `/` with
#                      auth = "required", one session (created through the
#                      admin API) presented by every request
#   sg-none-1, sg-none-2
#                      sessiongate, route `/` with auth = "none", no policies
#                      (the proxy path alone)
# The origin is nginx with one worker (bench/conf/upstream.nginx.conf).
#
# Nothing is pinned: this machine has 2 CPUs, and a target with 2 workers
# needs both, so wrk (one thread), the origin and the target share them.
# The req/s of 2 workers is therefore bounded by what wrk and the origin
# leave free, and cannot show a doubling; the CPU time the target spends
# per request (utime + stime of the process, its threads and, for nginx,
# its worker processes, from /proc, divided by wrk's request count) does
# not depend on that, and is what shows whether a second worker keeps the
# one-worker cost per request. The load average is recorded before every
# run, because the machine is shared.
#
# Rounds are interleaved; every measurement follows a 1 s warm-up. The
# report (report.md) gives medians and the spread between rounds.
# Everything runs on loopback; everything started is stopped by pid.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/bench"
# shellcheck source=bench/sg_config.sh
source "$BENCH/sg_config.sh"
COMMAND_LINE="bench/cores.sh $*"

DURATION=10
ROUNDS=3
CONNECTIONS=32
TARGETS_ARG="nginx-1,nginx-2,sg-auth-1,sg-auth-2,sg-none-1,sg-none-2"
OUT_DIR=""
SKIP_INSTALL=0
SKIP_BUILD=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --duration) DURATION="${2%s}"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        --connections) CONNECTIONS="$2"; shift ;;
        --targets) TARGETS_ARG="$2"; shift ;;
        --out) OUT_DIR="$2"; shift ;;
        --skip-install) SKIP_INSTALL=1 ;;
        --skip-build) SKIP_BUILD=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "cores.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for v in DURATION ROUNDS CONNECTIONS; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "cores.sh: $v must be a whole number" >&2; exit 2; }
done
if ((DURATION < 1 || DURATION > 600 || ROUNDS < 1 || ROUNDS > 20 || CONNECTIONS < 1 || CONNECTIONS > 1000)); then
    echo "cores.sh: duration 1..600 s, rounds 1..20, connections 1..1000" >&2
    exit 2
fi

ORIGIN_PORT=18080
declare -A PORT=([nginx-1]=18601 [nginx-2]=18602 [sg-auth-1]=18611 [sg-auth-2]=18612 [sg-none-1]=18621 [sg-none-2]=18622)
declare -A ADMIN_PORT=([sg-auth-1]=18711 [sg-auth-2]=18712 [sg-none-1]=18721 [sg-none-2]=18722)
IFS=, read -r -a TARGETS <<<"$TARGETS_ARG"
for t in "${TARGETS[@]}"; do
    [[ -n "${PORT[$t]:-}" ]] || { echo "cores.sh: unknown target $t (known: ${!PORT[*]})" >&2; exit 2; }
done
ADMIN_TOKEN="bench-admin-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

if [[ "$SKIP_INSTALL" != 1 ]]; then install_packages nginx wrk curl; fi
build_release

bench_run cores
[[ -n "$OUT_DIR" ]] || OUT_DIR="$BENCH/results/cores-$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$OUT_DIR"
ports_free "$ORIGIN_PORT" "${PORT[@]}" "${ADMIN_PORT[@]}"

start origin nginx -p "$RUN/" -e "$RUN/logs/origin.error.log" -c "$BENCH/conf/upstream.nginx.conf" -g 'daemon off;'
wait_port origin "$ORIGIN_PORT"

TOKEN=""
for t in "${TARGETS[@]}"; do
    workers="${t##*-}"
    case "$t" in
    nginx-*)
        listen="listen 127.0.0.1:${PORT[$t]} backlog=4096"
        ((workers > 1)) && listen="$listen reuseport"
        sed -e "s/^worker_processes 1;/worker_processes $workers;/" \
            -e "s/^pid nginx-proxy.pid;/pid $t.pid;/" \
            -e "s#error_log logs/nginx-proxy.error.log#error_log logs/$t.error.log#" \
            -e "s/listen 127.0.0.1:18081 backlog=4096/$listen/" \
            "$BENCH/conf/nginx-proxy.conf" >"$RUN/$t.conf"
        grep -q "worker_processes $workers;" "$RUN/$t.conf" && grep -q "${PORT[$t]}" "$RUN/$t.conf" ||
            die "could not write the nginx config for $t"
        start "$t" nginx -p "$RUN/" -e "$RUN/logs/$t.error.log" -c "$RUN/$t.conf" -g 'daemon off;'
        wait_port "$t" "${PORT[$t]}"
        ;;
    sg-*)
        auth=required
        [[ "$t" == sg-none-* ]] && auth=none
        write_sg_config "$RUN/$t.toml" "${PORT[$t]}" "${ADMIN_PORT[$t]}" "$ADMIN_TOKEN" "$ORIGIN_PORT" \
            "sqlite://$RUN/$t.db" "" 0 "" "$auth" "$ROOT"
        sed -i "s/^worker_threads = 1$/worker_threads = $workers/" "$RUN/$t.toml"
        grep -q "^worker_threads = $workers$" "$RUN/$t.toml" || die "could not set worker_threads for $t"
        "$SG" check --config "$RUN/$t.toml" >"$RUN/logs/$t.check.log" 2>&1 ||
            { cat "$RUN/logs/$t.check.log" >&2; die "sessiongate check failed for $t"; }
        start "$t" "$SG" serve --config "$RUN/$t.toml"
        code=""
        for ((i = 0; i < 300; i++)); do
            code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:${ADMIN_PORT[$t]}/readyz" || true)"
            [[ "$code" == 200 ]] && break
            [[ -d /proc/${PID[$t]} ]] || break
            sleep 0.1
        done
        [[ "$code" == 200 ]] || { tail -n 20 "$RUN/logs/$t.log" >&2; die "$t is not ready"; }
        ;;
    esac
done

# One session per authenticating target; every target gets a cookie of
# the same size, so every target receives the same request.
declare -A HDR=()
for t in "${TARGETS[@]}"; do
    if [[ "$t" == sg-auth-* ]]; then
        token="$(curl -s --max-time 5 -H "Authorization: Bearer $ADMIN_TOKEN" -H 'Content-Type: application/json' \
            -d '{"user_id":"bench-user"}' "http://127.0.0.1:${ADMIN_PORT[$t]}/v1/sessions" |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')" || die "cannot create a session on $t"
        HDR[$t]="Cookie: sg_session=$token"
        TOKEN="$token"
    fi
done
[[ -n "$TOKEN" ]] || TOKEN="$(head -c 48 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
for t in "${TARGETS[@]}"; do
    [[ -n "${HDR[$t]:-}" ]] || HDR[$t]="Cookie: sg_session=$TOKEN"
done

# Every target must proxy; an authenticating one must refuse a request
# without its session.
for t in "${TARGETS[@]}"; do
    got="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H "${HDR[$t]}" "http://127.0.0.1:${PORT[$t]}/" || true)"
    [[ "$got" == 200 ]] || die "$t: GET / with its cookie: got '$got', want 200"
    if [[ "$t" == sg-auth-* ]]; then
        got="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:${PORT[$t]}/" || true)"
        [[ "$got" == 401 ]] || die "$t: GET / without a session: got '$got', want 401"
    fi
done

cpu_busy() { # the machine's busy and total jiffies
    awk '/^cpu / { busy = $2 + $3 + $4 + $7 + $8 + $9; print busy, busy + $5 + $6 }' /proc/stat
}
ms_of() { # percentile wrk-output: wrk's latency percentile in milliseconds
    awk -v p="$1" '$1 == p { v = $2
        if (v ~ /us$/) { sub(/us$/, "", v); v /= 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v) }
        else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1000 }
        print v }' "$2"
}
TICK="$(getconf CLK_TCK)"
results="$OUT_DIR/results.tsv"
printf 'round\ttarget\tworkers\treq_per_s\tp50_ms\tp99_ms\terrors\tproxy_cpu_us_per_req\torigin_cpu_us_per_req\tmachine_busy_pct\tload_1m\n' >"$results"
wrk_run() { # round target
    local r="$1" t="$2" out before after obefore oafter mb ma rps p50 p99 errors load
    out="$OUT_DIR/wrk-$t-$r.txt"
    timeout 30 wrk -t1 -c"$CONNECTIONS" -d1s -H "${HDR[$t]}" "http://127.0.0.1:${PORT[$t]}/" >/dev/null 2>&1 ||
        die "warm-up failed on $t"
    load="$(cut -d' ' -f1 /proc/loadavg)"
    before="$(cpu_ticks "${PID[$t]}")"
    obefore="$(cpu_ticks "${PID[origin]}")"
    mb="$(cpu_busy)"
    timeout $((DURATION + 30)) wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency \
        -H "${HDR[$t]}" "http://127.0.0.1:${PORT[$t]}/" >"$out" 2>&1 || { cat "$out" >&2; die "wrk failed on $t"; }
    after="$(cpu_ticks "${PID[$t]}")"
    oafter="$(cpu_ticks "${PID[origin]}")"
    ma="$(cpu_busy)"
    rps="$(awk '/^Requests\/sec/ {print $2}' "$out")"
    p50="$(ms_of 50% "$out")"
    p99="$(ms_of 99% "$out")"
    errors="$(awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(/,/, ""); n += $4 + $6 + $8 + $10} END {print n + 0}' "$out")"
    # shellcheck disable=SC2086 # $mb and $ma are two numbers each
    read -r proxy_cpu origin_cpu busy <<<"$(python3 -c '
import sys
proxy, origin, rps, d, tick = (float(x) for x in sys.argv[1:6])
b0, t0, b1, t1 = (float(x) for x in sys.argv[6:10])
n = rps * d
per = lambda ticks: round(ticks / tick * 1e6 / n, 1) if n else 0
print(per(proxy), per(origin), round(100 * (b1 - b0) / (t1 - t0)) if t1 > t0 else 0)
' "$((after - before))" "$((oafter - obefore))" "$rps" "$DURATION" "$TICK" $mb $ma)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$t" "${t##*-}" "$rps" "$p50" "$p99" "$errors" \
        "$proxy_cpu" "$origin_cpu" "$busy" "$load" >>"$results"
    log "round $r $t: $rps req/s, p50 $p50, p99 $p99, errors $errors, proxy CPU $proxy_cpu µs/req, origin $origin_cpu µs/req, machine $busy% busy, load $load"
}
{
    echo "command: $COMMAND_LINE"
    echo "settings: --duration $DURATION --rounds $ROUNDS --connections $CONNECTIONS, wrk -t1, nothing pinned"
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "versions: $(nginx -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | head -1 | awk '{print "wrk " $2}'), sessiongate $(cd "$ROOT" && git rev-parse --short HEAD)"
} >"$OUT_DIR/meta.txt"
for ((r = 1; r <= ROUNDS; r++)); do
    for t in "${TARGETS[@]}"; do
        wrk_run "$r" "$t"
    done
done
python3 - "$results" "$OUT_DIR/meta.txt" >"$OUT_DIR/report.md" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print("".join(open(sys.argv[2]).readlines()).replace("\n", "  \n"))
targets = list(dict.fromkeys(r["target"] for r in rows))
def vals(t, k):
    return [float(r[k]) for r in rows if r["target"] == t]
def one(t):
    return next((x for x in targets if x.rsplit("-", 1)[0] == t.rsplit("-", 1)[0] and x.endswith("-1")), None)
print("\n| target | workers | req/s (median, min–max) | × same target, 1 worker | p50 ms | p99 ms | errors | target CPU µs/request | origin CPU µs/request | machine busy % | load (1 min) before |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for t in targets:
    rps = vals(t, "req_per_s")
    base = one(t)
    ratio = f"{statistics.median(rps) / statistics.median(vals(base, 'req_per_s')):.2f}" if base else "–"
    lat = lambda k: sorted(vals(t, k))[len(rps) // 2]
    med = lambda k: statistics.median(vals(t, k))
    rng = lambda k: f"{med(k):.1f} ({min(vals(t, k)):.1f}–{max(vals(t, k)):.1f})"
    load = vals(t, "load_1m")
    print(f"| {t} | {t.rsplit('-', 1)[1]} | {statistics.median(rps):,.0f} ({min(rps):,.0f}–{max(rps):,.0f}) | {ratio} | "
          f"{lat('p50_ms'):.2f} | {lat('p99_ms'):.2f} | {int(sum(vals(t, 'errors')))} | {rng('proxy_cpu_us_per_req')} | "
          f"{med('origin_cpu_us_per_req'):.1f} | {med('machine_busy_pct'):.0f} | {min(load):.2f}–{max(load):.2f} |")
PY
cat "$OUT_DIR/report.md"
log "results in $OUT_DIR"
