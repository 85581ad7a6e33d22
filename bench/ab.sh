#!/usr/bin/env bash
# Compares gateway builds on the proxy path (BENCHMARKS.md, "What each
# optimization bought"), in one of two ways:
#
#   --measure instructions (default): user-space instructions per proxied
#     request, counted by valgrind's callgrind: repeatable for the same
#     binary and inputs whatever else the machine is doing, so two builds
#     compare on a busy machine where req/s cannot;
#   --measure time: req/s and the gateway's CPU time per request (utime +
#     stime from /proc), the gateway and the origin pinned to CPU 1 and wrk
#     to CPU 0, the binaries interleaved over --rounds rounds.
#
#   bench/ab.sh [--binary PATH]... [--configs floor,auth] [--measure M]
#               [--rounds N] [--duration S] [--warmup S] [--connections N]
#               [--skip-install]
#
# For every binary (default: target/release/sessiongate, built if missing)
# and every config:
#   floor   route `/` with auth = "none", no policies, embedded store
#   auth    route `/` with auth = "required", embedded store (in-process
#           tier + SQLite), one session (made through the admin API) sent
#           as a cookie by every request, no policies: wasmtime's pooling
#           allocator reserves about 1 TiB of address space, which valgrind
#           refuses, so the policy chain is measured by criterion instead
# it starts the origin (nginx, bench/conf/upstream.nginx.conf's settings)
# and the gateway (instructions: under `valgrind --tool=callgrind`), warms
# up with wrk, then (instructions) zeroes the counters (`callgrind_control
# -z`), runs `wrk -t1 -c N -d S`, dumps (`callgrind_control -d`), and
# divides the instructions of all the gateway's threads by wrk's request
# count; (time) runs wrk and reads the gateway's CPU ticks before and
# after. Defaults: 8 connections and 8 s for instructions, 32 and 5 s for
# time. Everything on loopback (ports 18480-18491); everything started is
# stopped by pid. Dumps and wrk output stay in bench/results/ab-<time>/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/bench"
# shellcheck source=bench/sg_config.sh
source "$BENCH/sg_config.sh"
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

BINARIES=()
CONFIGS="floor,auth"
MEASURE=instructions
ROUNDS=1
DURATION=""
WARMUP=3
CONNECTIONS=""
SKIP_INSTALL=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --binary) BINARIES+=("$(realpath "$2")"); shift ;;
        --configs) CONFIGS="$2"; shift ;;
        --measure) MEASURE="$2"; shift ;;
        --rounds) ROUNDS="$2"; shift ;;
        --duration) DURATION="${2%s}"; shift ;;
        --warmup) WARMUP="${2%s}"; shift ;;
        --connections) CONNECTIONS="$2"; shift ;;
        --skip-install) SKIP_INSTALL=1 ;;
        -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
case "$MEASURE" in
    instructions) DURATION="${DURATION:-8}"; CONNECTIONS="${CONNECTIONS:-8}" ;;
    time) DURATION="${DURATION:-5}"; CONNECTIONS="${CONNECTIONS:-32}" ;;
    *) die "--measure is instructions or time" ;;
esac
if ((${#BINARIES[@]} == 0)); then
    [[ -x "$SG" ]] || (cd "$ROOT" && cargo build --quiet --release --bin sessiongate)
    BINARIES=("$SG")
fi
if [[ "$SKIP_INSTALL" != 1 ]]; then install_packages nginx wrk valgrind curl; fi

ORIGIN_PORT=18480
PORT=18490
ADMIN_PORT=18491
ADMIN_TOKEN="instructions-$$"
OUT="$ROOT/bench/results/ab-$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
ports_free "$ORIGIN_PORT" "$PORT" "$ADMIN_PORT"
bench_run ab

sed "s/127.0.0.1:18080/127.0.0.1:$ORIGIN_PORT/" "$BENCH/conf/upstream.nginx.conf" >"$RUN/origin.conf"
[[ "$MEASURE" == time ]] && START_PIN=1
start origin nginx -p "$RUN/" -e "$RUN/logs/origin.error.log" -c "$RUN/origin.conf" -g 'daemon off;'
wait_port origin "$ORIGIN_PORT"

if [[ "$MEASURE" == instructions ]]; then
    printf '| binary | config | requests | instructions | per request |\n| --- | --- | ---: | ---: | ---: |\n' >"$OUT/report.md"
else
    printf '| round | binary | config | req/s | CPU µs per request |\n| --- | --- | --- | ---: | ---: |\n' >"$OUT/report.md"
fi
ticks_per_s="$(getconf CLK_TCK)"
for ((round = 1; round <= ROUNDS; round++)); do
n=0
for bin in "${BINARIES[@]}"; do
    n=$((n + 1))
    for config in ${CONFIGS//,/ }; do
        case "$config" in
            floor) auth=none ;;
            auth) auth=required ;;
            *) die "unknown config $config (floor or auth)" ;;
        esac
        rm -f "$RUN/sessions.db"*
        # No policies (ROOT empty): see the header.
        write_sg_config "$RUN/$config.toml" "$PORT" "$ADMIN_PORT" "$ADMIN_TOKEN" "$ORIGIN_PORT" \
            "sqlite://$RUN/sessions.db" "" 0 "" "$auth" ""
        name="sg-$round-$n-$config"
        if [[ "$MEASURE" == instructions ]]; then
            start "$name" valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.$n.$config.%p" \
                "$bin" serve --config "$RUN/$config.toml"
        else
            start "$name" "$bin" serve --config "$RUN/$config.toml"
        fi
        # valgrind starts slowly: up to 60 s.
        wait_port "$name" "$PORT" 600
        headers=()
        if [[ "$auth" == required ]]; then
            token="$(curl -sf -X POST -H "Authorization: Bearer $ADMIN_TOKEN" \
                -H 'content-type: application/json' -d '{"user_id":"bench-user"}' \
                "http://127.0.0.1:$ADMIN_PORT/v1/sessions" |
                python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')"
            headers=(-H "Cookie: sg_session=$token")
        fi
        status="$(curl -s -o /dev/null -w '%{http_code}' "${headers[@]}" "http://127.0.0.1:$PORT/")"
        [[ "$status" == 200 ]] || die "$name answered $status, not 200"
        wrk_cmd=(wrk -t1 -c"$CONNECTIONS")
        [[ "$MEASURE" == time ]] && wrk_cmd=(taskset -c 0 "${wrk_cmd[@]}")
        "${wrk_cmd[@]}" -d"${WARMUP}s" "${headers[@]}" "http://127.0.0.1:$PORT/" >/dev/null
        out="$OUT/wrk.$round.$n.$config.txt"
        if [[ "$MEASURE" == instructions ]]; then
            callgrind_control -z "${PID[$name]}" >/dev/null
            "${wrk_cmd[@]}" -d"${DURATION}s" "${headers[@]}" "http://127.0.0.1:$PORT/" >"$out"
            callgrind_control -d "${PID[$name]}" >/dev/null
            requests="$(awk '/requests in/ { print $1 }' "$out")"
            # The dump `-d` wrote (the first, numbered 1) covers exactly the
            # measured run; its `totals:` line sums every thread's part.
            dump="$OUT/cg.$n.$config.${PID[$name]}.1"
            for ((i = 0; i < 100; i++)); do [[ -s "$dump" ]] && break; sleep 0.1; done
            total="$(awk '/^(totals|summary):/ { print $2; exit }' "$dump")"
            per=$((total / (requests > 0 ? requests : 1)))
            printf '| %s | %s | %s | %s | %s |\n' "$bin" "$config" "$requests" "$total" "$per" | tee -a "$OUT/report.md"
        else
            before="$(cpu_ticks "${PID[$name]}")"
            "${wrk_cmd[@]}" -d"${DURATION}s" "${headers[@]}" "http://127.0.0.1:$PORT/" >"$out"
            after="$(cpu_ticks "${PID[$name]}")"
            requests="$(awk '/requests in/ { print $1 }' "$out")"
            rps="$(awk '/^Requests\/sec/ { printf "%d", $2 }' "$out")"
            us="$(python3 -c "print(f'{($after - $before) / $ticks_per_s * 1e6 / max($requests, 1):.1f}')")"
            printf '| %s | %s | %s | %s | %s |\n' "$round" "$bin" "$config" "$rps" "$us" | tee -a "$OUT/report.md"
        fi
        stop_pid "${PID[$name]}"
    done
done
done
log "report: $OUT/report.md"
