# Shared by the bench scripts (sourced, after ROOT is set): logging, the
# build, the processes a run starts (stopped by pid, newest first, however
# the run ends) and port checks.
# shellcheck shell=bash

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ports_free() { # port...: dies on the first one something listens on
    local p
    for p in "$@"; do
        if port_open "$p"; then die "127.0.0.1:$p is already in use (a previous run still going?)"; fi
    done
}

install_packages() { # command...: installs the Debian packages of the same names that are missing
    local pkgs=() c
    for c in "$@"; do command -v "$c" >/dev/null || pkgs+=("$c"); done
    if ((${#pkgs[@]})); then
        log "installing ${pkgs[*]}"
        timeout 900 apt-get update -qq
        DEBIAN_FRONTEND=noninteractive timeout 1800 apt-get install -y -qq "${pkgs[@]}" >/dev/null
    fi
}

SG="$ROOT/target/release/sessiongate"
build_release() { # the gateway (release) and the policy plugins, unless SKIP_BUILD=1
    if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
        log "building sessiongate (release) and the policy plugins"
        (cd "$ROOT" && timeout 3600 cargo build --quiet --release --bin sessiongate)
        (cd "$ROOT" && timeout 1800 scripts/build-plugins.sh >/dev/null)
    fi
    [[ -x "$SG" ]] || die "$SG is missing (run without --skip-build)"
}

# The processes of a run, by name, in start order.
declare -A PID=()
STARTED=()
# CPUs `start` pins to with taskset (empty: not pinned).
START_PIN=""

stop_pid() { # pid: TERM, up to 10 s, then KILL
    local pid="$1" i
    [[ -d /proc/$pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        [[ -d /proc/$pid && "$(awk '{print $3}' /proc/"$pid"/stat 2>/dev/null)" != Z ]] || break
        sleep 0.1
    done
    if [[ -d /proc/$pid && "$(awk '{print $3}' /proc/"$pid"/stat 2>/dev/null)" != Z ]]; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

bench_cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    # Stopping goes on whatever fails on the way.
    set +e
    for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do stop_pid "${PID[${STARTED[$i]}]}"; done
    if ((rc == 0)); then rm -rf "$RUN"; else log "logs kept in $RUN/logs"; fi
    exit "$rc"
}

bench_run() { # name: makes $RUN (logs/, tmp/, www/) and stops what was started on exit
    RUN="$(mktemp -d "/tmp/sessiongate-$1.XXXXXX")"
    mkdir -p "$RUN/logs" "$RUN/tmp" "$RUN/www"
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

start() { # name cmd...: in the background, its output in $RUN/logs/<name>.log
    local name="$1"
    shift
    if [[ -n "$START_PIN" ]]; then
        taskset -c "$START_PIN" "$@" >"$RUN/logs/$name.log" 2>&1 &
    else
        "$@" >"$RUN/logs/$name.log" 2>&1 &
    fi
    PID[$name]=$!
    STARTED+=("$name")
}

wait_port() { # name port [tenths]: until it listens (15 s, or tenths/10 s), or dies with its log's tail
    local i
    for ((i = 0; i < ${3:-150}; i++)); do
        port_open "$2" && return 0
        [[ -d /proc/${PID[$1]} ]] || break
        sleep 0.1
    done
    tail -n 20 "$RUN/logs/$1.log" >&2 || true
    die "$1 did not listen on 127.0.0.1:$2"
}

cpu_ticks() { # pid: utime + stime of the process (all its threads) and its children (nginx's workers)
    local total=0 p
    for p in "$1" $(cat /proc/"$1"/task/*/children 2>/dev/null); do
        total=$((total + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
