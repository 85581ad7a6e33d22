#!/usr/bin/env bash
# HTTPS benchmark: sessiongate terminating TLS against nginx terminating
# TLS with the same certificate, both proxying to the same nginx origin
# over plain HTTP, on loopback, with wrk.
#
#   bench/tls.sh [--duration S] [--rounds N] [--connections N]
#                [--out DIR] [--skip-install] [--skip-build]
#
# Targets, each pinned to CPU 1 with the origin (`taskset -c 1`; wrk runs
# on CPU 0), one worker each:
#   nginx-tls        nginx, `listen ... ssl`, http2 on, TLS 1.2 + 1.3
#   sg-tls           sessiongate, [server.tls], route with auth = "none"
#                    and no policies (what TLS + proxying cost)
#   sg-tls-auth      sessiongate, [server.tls], embedded store, the bundled
#                    policy chain, one session (authenticated requests)
# The certificate: ECDSA P-256 from scripts/demo-cert.sh (full chain).
#
# Two measurements per target and round (rounds interleaved):
#   keep-alive       wrk -c N: requests/s and latency on N TLS connections
#   new-connection   wrk -c N -H 'Connection: close': every request on a
#                    fresh TCP connection with a full TLS handshake (wrk
#                    does not resume sessions): handshakes/s
# plus the CPU time (utime + stime, /proc) the proxy spent per request.
# The report is a Markdown table of medians with the spread between rounds.
# Everything runs on loopback; everything started is stopped by pid.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/bench"
# shellcheck source=bench/sg_config.sh
source "$BENCH/sg_config.sh"

DURATION=10
ROUNDS=3
CONNECTIONS=32
OUT_DIR=""
SKIP_INSTALL=0
SKIP_BUILD=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --duration) DURATION="${2%s}"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        --connections) CONNECTIONS="$2"; shift ;;
        --out) OUT_DIR="$2"; shift ;;
        --skip-install) SKIP_INSTALL=1 ;;
        --skip-build) SKIP_BUILD=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "tls.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for v in DURATION ROUNDS CONNECTIONS; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "tls.sh: $v must be a whole number" >&2; exit 2; }
done
if ((DURATION < 1 || DURATION > 600 || ROUNDS < 1 || ROUNDS > 20 || CONNECTIONS < 1 || CONNECTIONS > 1000)); then
    echo "tls.sh: duration 1..600 s, rounds 1..20, connections 1..1000" >&2
    exit 2
fi

ORIGIN_PORT=18080
declare -A PORT=([nginx-tls]=18441 [sg-tls]=18442 [sg-tls-auth]=18443)
declare -A ADMIN_PORT=([sg-tls]=18542 [sg-tls-auth]=18543)
TARGETS=(nginx-tls sg-tls sg-tls-auth)
ADMIN_TOKEN="bench-admin-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"

# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

if [[ "$SKIP_INSTALL" != 1 ]]; then install_packages nginx wrk curl openssl; fi
build_release

bench_run tls
START_PIN=1
[[ -n "$OUT_DIR" ]] || OUT_DIR="$BENCH/results/tls-$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$OUT_DIR"
ports_free "$ORIGIN_PORT" "${PORT[@]}" "${ADMIN_PORT[@]}"

"$ROOT/scripts/demo-cert.sh" "$RUN/tls" 2>/dev/null
CA="$RUN/tls/ca.pem"

start origin nginx -p "$RUN/" -e "$RUN/logs/origin.error.log" -c "$BENCH/conf/upstream.nginx.conf" -g 'daemon off;'
wait_port origin "$ORIGIN_PORT"

sed -e "s#@PORT@#${PORT[nginx-tls]}#; s#@CERT@#$RUN/tls/cert.pem#; s#@KEY@#$RUN/tls/key.pem#; s#@ORIGIN@#$ORIGIN_PORT#" \
    "$BENCH/conf/nginx-tls.conf" >"$RUN/nginx-tls.conf"
start nginx-tls nginx -p "$RUN/" -e "$RUN/logs/nginx-tls.error.log" -c "$RUN/nginx-tls.conf" -g 'daemon off;'
wait_port nginx-tls "${PORT[nginx-tls]}"

for t in sg-tls sg-tls-auth; do
    auth=required
    [[ "$t" == sg-tls ]] && auth=none
    write_sg_config "$RUN/$t.toml" "${PORT[$t]}" "${ADMIN_PORT[$t]}" "$ADMIN_TOKEN" "$ORIGIN_PORT" \
        "sqlite://$RUN/$t.db" "" 0 "" "$auth" "$ROOT"
    printf '\n[server.tls]\ncert_file = "%s"\nkey_file = "%s"\n' "$RUN/tls/cert.pem" "$RUN/tls/key.pem" >>"$RUN/$t.toml"
    "$SG" check --config "$RUN/$t.toml" >"$RUN/logs/$t.check.log" 2>&1 ||
        { cat "$RUN/logs/$t.check.log" >&2; die "sessiongate check failed for $t"; }
    start "$t" "$SG" serve --config "$RUN/$t.toml"
    for ((i = 0; i < 300; i++)); do
        code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:${ADMIN_PORT[$t]}/readyz" || true)"
        [[ "$code" == 200 ]] && break
        [[ -d /proc/${PID[$t]} ]] || break
        sleep 0.1
    done
    [[ "$code" == 200 ]] || { tail -n 20 "$RUN/logs/$t.log" >&2; die "$t is not ready"; }
done

# One session for the authenticated target.
TOKEN="$(curl -s --max-time 5 -H "Authorization: Bearer $ADMIN_TOKEN" -H 'Content-Type: application/json' \
    -d '{"user_id":"bench-user"}' "http://127.0.0.1:${ADMIN_PORT[sg-tls-auth]}/v1/sessions" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')" || die "cannot create a session"
declare -A HDR=([nginx-tls]="Cookie: sg_session=$TOKEN" [sg-tls]="Cookie: sg_session=$TOKEN" [sg-tls-auth]="Cookie: sg_session=$TOKEN")

# Every target must answer 200 over HTTPS with the certificate verified,
# over HTTP/2 and HTTP/1.1; the authenticated one 401 without the cookie.
for t in "${TARGETS[@]}"; do
    url="https://localhost:${PORT[$t]}/"
    got="$(curl -s --http2 --cacert "$CA" -o /dev/null -w '%{http_code} %{http_version}' -H "${HDR[$t]}" "$url" || true)"
    [[ "$got" == "200 2" ]] || die "$t: GET / over HTTP/2: got '$got', want '200 2'"
    got="$(curl -s --http1.1 --cacert "$CA" -o /dev/null -w '%{http_code} %{http_version}' -H "${HDR[$t]}" "$url" || true)"
    [[ "$got" == "200 1.1" ]] || die "$t: GET / over HTTP/1.1: got '$got', want '200 1.1'"
done
got="$(curl -s --cacert "$CA" -o /dev/null -w '%{http_code}' "https://localhost:${PORT[sg-tls-auth]}/" || true)"
[[ "$got" == 401 ]] || die "sg-tls-auth: GET / without a session: got $got, want 401"

TICK="$(getconf CLK_TCK)"
results="$OUT_DIR/results.tsv"
printf 'round\ttarget\tmode\treq_per_s\tp50_ms\tp99_ms\terrors\tproxy_cpu_us_per_req\n' >"$results"
wrk_run() { # round target mode [extra wrk args]
    local r="$1" t="$2" mode="$3" out before after rps p50 p99 errors cpu
    shift 3
    out="$OUT_DIR/wrk-$t-$mode-$r.txt"
    before="$(cpu_ticks "${PID[$t]}")"
    taskset -c 0 timeout $((DURATION + 30)) wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency \
        -H "${HDR[$t]}" "$@" "https://localhost:${PORT[$t]}/" >"$out" 2>&1 || { cat "$out" >&2; die "wrk failed on $t"; }
    after="$(cpu_ticks "${PID[$t]}")"
    rps="$(awk '/^Requests\/sec/ {print $2}' "$out")"
    p50="$(awk '$1 == "50%" {print $2}' "$out")"
    p99="$(awk '$1 == "99%" {print $2}' "$out")"
    errors="$(awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(/,/, ""); n += $4 + $6 + $8 + $10} END {print n + 0}' "$out")"
    cpu="$(python3 -c "import sys; t,rps,d,tick=float(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3]),float(sys.argv[4]); print(round(t/tick*1e6/(rps*d),1) if rps else 0)" \
        "$((after - before))" "$rps" "$DURATION" "$TICK")"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$t" "$mode" "$rps" "$p50" "$p99" "$errors" "$cpu" >>"$results"
    log "round $r $t $mode: $rps req/s, p50 $p50, p99 $p99, errors $errors, proxy CPU $cpu µs/req"
}
{
    echo "command: bench/tls.sh --duration $DURATION --rounds $ROUNDS --connections $CONNECTIONS"
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "versions: $(nginx -v 2>&1 | sed 's/.*: //') ($(nginx -V 2>&1 | grep -o 'built with OpenSSL [^ ]*')), $(wrk -v 2>&1 | head -1 | awk '{print "wrk " $2}'), sessiongate $(cd "$ROOT" && git rev-parse --short HEAD)"
    echo "certificate: ECDSA P-256 leaf + CA chain (scripts/demo-cert.sh); wrk negotiates TLS 1.3, HTTP/1.1"
} >"$OUT_DIR/meta.txt"
for ((r = 1; r <= ROUNDS; r++)); do
    for t in "${TARGETS[@]}"; do
        wrk_run "$r" "$t" keep-alive
        wrk_run "$r" "$t" new-connection -H 'Connection: close'
    done
done
python3 - "$results" "$OUT_DIR/meta.txt" >"$OUT_DIR/report.md" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print("".join(open(sys.argv[2]).readlines()).replace("\n", "  \n"))
def med(t, m, k):
    v = [float(r[k]) for r in rows if r["target"] == t and r["mode"] == m]
    return statistics.median(v), min(v), max(v)
for mode, what in (("keep-alive", "requests/s"), ("new-connection", "handshakes/s")):
    base = med("nginx-tls", mode, "req_per_s")[0]
    print(f"\n| {mode} | {what} (median, min–max) | × nginx | p50 ms | p99 ms | errors | proxy CPU µs/request |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in ("nginx-tls", "sg-tls", "sg-tls-auth"):
        rps, lo, hi = med(t, mode, "req_per_s")
        vals = [r for r in rows if r["target"] == t and r["mode"] == mode]
        errs = sum(int(float(r["errors"])) for r in vals)
        cpu = statistics.median(float(r["proxy_cpu_us_per_req"]) for r in vals)
        def lat(k):
            xs = [r[k] for r in vals]
            return xs[len(xs) // 2]
        print(f"| {t} | {rps:,.0f} ({lo:,.0f}–{hi:,.0f}) | {rps / base:.2f} | {lat('p50_ms')} | {lat('p99_ms')} | {errs} | {cpu} |")
PY
cat "$OUT_DIR/report.md"
log "results in $OUT_DIR"
