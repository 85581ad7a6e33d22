#!/usr/bin/env python3
"""Parses wrk output and summarizes a bench/load.sh run (standard library only).

  report.py parse WRK_OUTPUT_FILE
      prints "rps p50_us p99_us non2xx socket_errors requests" (one line)

  report.py summary RESULTS_DIR
      reads RESULTS_DIR/results.tsv (round target conns rps p50_us p99_us
      non2xx socket_errors), rss.tsv (target round peak_kib hwm_kib),
      rss-big.tsv (optional) and meta.txt, and prints a Markdown report:
      medians with the spread (min-max) over rounds, ratios to the nginx
      plain proxy, and the issue's targets.
"""

import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

BASELINE = "nginx-proxy"

LABELS = {
    "nginx-proxy": "nginx plain proxy",
    "haproxy": "haproxy plain proxy",
    "nginx-lua": "nginx + Lua + Redis (session peer)",
    "sg-embedded": "sessiongate A: embedded (memory + SQLite)",
    "sg-redis-cache": "sessiongate B: Redis + PG, local cache 1 s",
    "sg-redis": "sessiongate C: Redis + PG, no local cache",
    "sg-passthrough": "sessiongate, auth = none, no policies (proxy floor)",
}
ORDER = list(LABELS)

UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0, "m": 60_000_000.0}


def to_us(text):
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unknown latency {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def parse(path):
    text = Path(path).read_text()
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    reqs = re.search(r"^\s+(\d+) requests in", text, re.M)
    if not (rps and p50 and p99 and reqs):
        raise SystemExit(f"report.py: cannot parse wrk output {path}:\n{text}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors:(.*)", text)
    sock_errors = sum(int(n) for n in re.findall(r"\d+", sock.group(1))) if sock else 0
    return (
        float(rps.group(1)),
        to_us(p50.group(1)),
        to_us(p99.group(1)),
        int(non2xx.group(1)) if non2xx else 0,
        sock_errors,
        int(reqs.group(1)),
    )


def spread(values, fmt):
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}–{fmt(max(values))})"


def overlap(a, b):
    return min(a) <= max(b) and min(b) <= max(a)


def summary(results_dir):
    d = Path(results_dir)
    rows = defaultdict(lambda: defaultdict(list))  # target -> metric -> values
    per_round = defaultdict(dict)  # (conns, round) -> target -> rps
    bad = []
    for line in (d / "results.tsv").read_text().splitlines():
        if not line or line.startswith("round"):
            continue
        rnd, target, conns, rps, p50, p99, non2xx, sockerr = line.split("\t")
        conns = int(conns)
        rps, p50, p99 = float(rps), float(p50), float(p99)
        if int(non2xx) or int(sockerr):
            bad.append(f"{target} c{conns} round {rnd}: {non2xx} non-2xx, {sockerr} socket errors")
        rows[target][f"rps{conns}"].append(rps)
        rows[target][f"p50_{conns}"].append(p50)
        rows[target][f"p99_{conns}"].append(p99)
        per_round[(conns, rnd)][target] = rps
    rss = defaultdict(list)
    hwm = defaultdict(list)
    if (d / "rss.tsv").exists():
        for line in (d / "rss.tsv").read_text().splitlines():
            if not line or line.startswith("target"):
                continue
            target, _rnd, peak, high = line.split("\t")
            rss[target].append(int(peak) / 1024)
            hwm[target].append(int(high) / 1024)

    targets = [t for t in ORDER if t in rows] + sorted(t for t in rows if t not in ORDER)
    conns_hi = max(int(k[3:]) for t in rows for k in rows[t] if k.startswith("rps"))
    has_c1 = any("rps1" in rows[t] for t in rows)
    base = rows.get(BASELINE)

    out = []
    meta = d / "meta.txt"
    if meta.exists():
        out.append("```")
        out.append(meta.read_text().rstrip())
        out.append("```")
        out.append("")

    def ratio_spread(target, conns):
        rs = [
            r[target] / r[BASELINE]
            for (c, _), r in sorted(per_round.items())
            if c == conns and target in r and BASELINE in r
        ]
        if not rs:
            return "–"
        if target == BASELINE:
            return "1.00"
        med = statistics.median(rows[target][f"rps{conns}"]) / statistics.median(
            rows[BASELINE][f"rps{conns}"]
        )
        return f"{med:.2f} ({min(rs):.2f}–{max(rs):.2f})" if len(rs) > 1 else f"{med:.2f}"

    n = lambda v: f"{v:,.0f}"  # noqa: E731
    us = lambda v: f"{v:,.0f}"  # noqa: E731
    out.append(
        f"| target | req/s, {conns_hi} conns | × nginx | p50 µs, {conns_hi} conns | p99 µs, {conns_hi} conns "
        + ("| req/s, 1 conn | p50 µs, 1 conn | p99 µs, 1 conn " if has_c1 else "")
        + "| RSS under load, MiB |"
    )
    out.append("|" + " --- |" * (9 if has_c1 else 6))
    for t in targets:
        r = rows[t]
        cells = [
            LABELS.get(t, t),
            spread(r[f"rps{conns_hi}"], n),
            ratio_spread(t, conns_hi),
            spread(r[f"p50_{conns_hi}"], us),
            spread(r[f"p99_{conns_hi}"], us),
        ]
        if has_c1:
            cells += [spread(r["rps1"], n), spread(r["p50_1"], us), spread(r["p99_1"], us)]
        cells.append(f"{max(rss[t]):.1f} (peak)" if rss.get(t) else "–")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append(
        "Medians over the rounds, (min–max) in brackets; × nginx is the ratio of medians, "
        "(min–max) of the per-round ratios (each target against nginx in the same round)."
    )
    out.append("")

    # CPU per request (from /proc, runs at the high connection count).
    cpu = defaultdict(lambda: defaultdict(list))
    if (d / "cpu.tsv").exists():
        for line in (d / "cpu.tsv").read_text().splitlines():
            if not line or line.startswith("target"):
                continue
            f = line.split("\t")
            target, _rnd, requests, tck, proxy, redis, origin = f[:7]
            per = 1e6 / int(tck) / max(int(requests), 1)
            if len(f) >= 13:
                b0, t0, b1, t1, st0, st1 = (int(x) for x in f[7:13])
                ours = int(proxy) + int(redis) + int(origin)
                cpu[target]["busy0"].append(100 * b0 / max(t0, 1))
                cpu[target]["busy1"].append(100 * b1 / max(t1, 1))
                cpu[target]["foreign1"].append(max(0.0, 100 * (b1 - ours) / max(t1, 1)))
                cpu[target]["steal"].append(100 * (st0 + st1) / max(t0 + t1, 1))
            cpu[target]["proxy"].append(int(proxy) * per)
            cpu[target]["redis"].append(int(redis) * per)
            cpu[target]["origin"].append(int(origin) * per)
            cpu[target]["total"].append((int(proxy) + int(redis) + int(origin)) * per)
    if cpu:
        f1 = lambda v: f"{v:.1f}"  # noqa: E731
        out.append(
            f"CPU time per request at {conns_hi} connections (utime + stime from /proc; "
            "the proxy, the session gateway's own Redis, the origin — all on CPU 1):"
        )
        out.append("")
        out.append(
            "| target | proxy µs/req | its Redis µs/req | origin µs/req | CPU 1 total µs/req "
            "| CPU 0 (wrk) busy % | CPU 1 busy % | CPU 1 not ours % | steal % |"
        )
        out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        f0 = lambda v: f"{v:.0f}"  # noqa: E731
        for t in targets:
            if t in cpu:
                c = cpu[t]
                redis = spread(c["redis"], f1) if any(c["redis"]) else "–"
                extra = [
                    spread(c[k], f0) if c.get(k) else "–" for k in ("busy0", "busy1", "foreign1", "steal")
                ]
                out.append(
                    f"| {LABELS.get(t, t)} | {spread(c['proxy'], f1)} | {redis} | "
                    f"{spread(c['origin'], f1)} | {spread(c['total'], f1)} | " + " | ".join(extra) + " |"
                )
        out.append("")
        out.append(
            "\"CPU 1 not ours\" is CPU 1's busy time minus what the proxy, its Redis and the origin used: "
            "other processes (compilers, the system PostgreSQL, the kernel's own work) competing during the run."
        )
        out.append("")

    # Noise: does a target's range overlap the baseline's?
    if base:
        notes = []
        for t in targets:
            if t == BASELINE:
                continue
            r = rows[t]
            for metric, name in [
                (f"rps{conns_hi}", f"req/s at {conns_hi}"),
                (f"p99_{conns_hi}", f"p99 at {conns_hi}"),
                ("p50_1", "p50 at 1"),
            ]:
                if metric in r and metric in base and len(r[metric]) > 1:
                    if overlap(r[metric], base[metric]):
                        notes.append(f"{LABELS.get(t, t)}: {name} overlaps nginx's range (within noise)")
        if notes:
            out.append("Within noise of the nginx plain proxy (ranges overlap):")
            out += [f"* {x}" for x in notes]
            out.append("")

    # The targets.
    def med(t, m):
        return statistics.median(rows[t][m]) if t in rows and m in rows[t] else None

    out.append("Targets of the issue:")
    checks = []
    nb = med(BASELINE, f"rps{conns_hi}")
    for t in ["sg-embedded", "sg-redis-cache"]:
        v = med(t, f"rps{conns_hi}")
        if v is not None and nb:
            x = v / nb
            checks.append(
                f"(1) {LABELS[t]}: {x:.2f}× nginx req/s (target ≥ 1.00×): "
                + ("met" if x >= 1.0 else f"MISSED by {(1 - x) * 100:.0f}% ({n(nb - v)} req/s)")
            )
    v, lua = med("sg-redis", f"rps{conns_hi}"), med("nginx-lua", f"rps{conns_hi}")
    if v is not None and lua:
        x = v / lua
        checks.append(
            f"(2) {LABELS['sg-redis']}: {x:.2f}× the nginx+Lua+Redis peer (target ≥ 2.00×): "
            + ("met" if x >= 2.0 else f"MISSED (needs {n(2 * lua)} req/s, has {n(v)})")
        )
    for t in ["sg-embedded", "sg-redis-cache", "sg-redis"]:
        if t not in rows or not base:
            continue
        p99, bp99 = med(t, f"p99_{conns_hi}"), med(BASELINE, f"p99_{conns_hi}")
        p50, bp50 = med(t, "p50_1"), med(BASELINE, "p50_1")
        parts = [
            f"p99 at {conns_hi} conns {us(p99)} µs vs {us(bp99)} µs: "
            + ("met" if p99 <= bp99 else f"MISSED by {us(p99 - bp99)} µs ({p99 / bp99:.2f}×)")
        ]
        if p50 is not None and bp50:
            parts.append(
                f"p50 at 1 conn {us(p50)} µs vs {us(bp50)} µs: "
                + ("met" if p50 <= bp50 else f"MISSED by {us(p50 - bp50)} µs ({p50 / bp50:.2f}×)")
            )
        checks.append(f"(3) {LABELS[t]}: " + "; ".join(parts))
    big = d / "rss-big.tsv"
    if big.exists():
        for line in big.read_text().splitlines():
            if not line or line.startswith("sessions"):
                continue
            sessions, idle, peak, high, rps = line.split("\t")
            peak_mib = int(peak) / 1024
            checks.append(
                f"(4) sessiongate A with {int(sessions):,} live sessions: RSS {int(idle) / 1024:.1f} MiB "
                f"after seeding, {peak_mib:.1f} MiB peak under load (every session touched; "
                f"VmHWM {int(high) / 1024:.1f} MiB) (target ≤ 64 MiB): "
                + ("met" if peak_mib <= 64 else f"MISSED by {peak_mib - 64:.1f} MiB")
            )
    else:
        checks.append("(4) RSS with 100,000 sessions: not measured in this run")
    out += [f"* {c}" for c in checks]
    out.append("")
    if bad:
        out.append("**Invalid measurements (errors during the run):**")
        out += [f"* {b}" for b in bad]
        out.append("")
    print("\n".join(out))
    return 1 if bad else 0


def main(argv):
    if len(argv) == 2 and argv[0] == "parse":
        rps, p50, p99, non2xx, sock, reqs = parse(argv[1])
        print(f"{rps:.0f} {p50:.0f} {p99:.0f} {non2xx} {sock} {reqs}")
    elif len(argv) == 2 and argv[0] == "summary":
        sys.exit(summary(argv[1]))
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
