"""Report of bench/scaling.sh: markdown tables and scaling.png.

    python3 bench/scaling_report.py RESULTS_DIR

Reads RESULTS_DIR/results.tsv and meta.txt; prints the tables (req/s and
p99 against sessions and connections, per target) and writes
RESULTS_DIR/scaling.png when matplotlib is importable.
"""

import csv
import sys
from collections import defaultdict
from pathlib import Path

NAMES = {
    "sg-embedded": "sessiongate A: embedded (memory + SQLite)",
    "sg-redis": "sessiongate C: Redis + PostgreSQL, a Redis GET per request",
}


def main(out_dir):
    out = Path(out_dir)
    rows = list(csv.DictReader((out / "results.tsv").open(), delimiter="\t"))
    data = defaultdict(dict)
    for r in rows:
        data[r["target"]][(int(r["sessions"]), int(r["connections"]))] = r
    print("```")
    print((out / "meta.txt").read_text().strip())
    print("```")
    print()
    for target, cells in data.items():
        sessions = sorted({s for s, _ in cells})
        conns = sorted({c for _, c in cells})
        print(f"**{NAMES.get(target, target)}**")
        print()
        head = " | ".join(f"{c} conn{'s' if c > 1 else ''}: req/s, p50 / p99 µs" for c in conns)
        print(f"| live sessions | {head} | RSS MiB |")
        print("| --- |" + " --- |" * len(conns) + " --- |")
        for s in sessions:
            cols = []
            rss = 0
            for c in conns:
                r = cells.get((s, c))
                if r is None:
                    cols.append("–")
                    continue
                errs = int(r["non2xx"]) + int(r["socket_errors"])
                note = f" ({errs} errors)" if errs else ""
                cols.append(
                    f"{float(r['rps']):,.0f}, {float(r['p50_us']):,.0f} / {float(r['p99_us']):,.0f}{note}"
                )
                rss = max(rss, int(r["rss_kib"]))
            print(f"| {s:,} | " + " | ".join(cols) + f" | {rss / 1024:.0f} |")
        print()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no plot)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"sg-embedded": "-", "sg-redis": "--"}
    for target, cells in data.items():
        conns = sorted({c for _, c in cells})
        for c in conns:
            pts = sorted((s, r) for (s, cc), r in cells.items() if cc == c)
            xs = [s for s, _ in pts]
            label = f"{'A embedded' if target == 'sg-embedded' else 'C Redis+PG'}, {c} conn{'s' if c > 1 else ''}"
            left.plot(xs, [float(r["rps"]) for _, r in pts], styles.get(target, ":"), marker="o", label=label)
            right.plot(xs, [float(r["p99_us"]) for _, r in pts], styles.get(target, ":"), marker="o", label=label)
    for ax, title, unit in ((left, "Throughput", "requests/s"), (right, "p99 latency", "µs (log)")):
        ax.set_xscale("log")
        ax.set_xlabel("live sessions (every request a different one)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    right.set_yscale("log")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    fig.suptitle("sessiongate scaling: sessions × connections (bench/scaling.sh)")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    print(f"plot: {out / 'scaling.png'}")


if __name__ == "__main__":
    main(sys.argv[1])
