"""Plots of a load test (throughput, latency, RSS) and of a soak (RSS, offered and rejected rates), from
Locust's ``--csv-full-history`` file and the runner's RSS samples. matplotlib is imported lazily."""

from __future__ import annotations

import csv
from pathlib import Path

SYNTHETIC = ("TTFT", "ITL", "REJECTED")  # entries the locustfile records itself; not HTTP requests


def history(prefix: Path) -> dict[str, list[tuple[int, dict]]]:
    """Locust's per-second history rows, by entry name."""
    out: dict[str, list[tuple[int, dict]]] = {}
    with open(f"{prefix}_stats_history.csv") as f:
        for r in csv.DictReader(f):
            out.setdefault(f"{r['Type']} {r['Name']}".strip(), []).append((int(r["Timestamp"]), r))
    return out


def requests_per_second(hist: dict[str, list[tuple[int, dict]]], t0: int) -> dict[int, float]:
    """HTTP requests/s summed over every endpoint (not the synthetic entries), by second since t0."""
    per_second: dict[int, float] = {}
    for entry, rows in hist.items():
        if entry != "Aggregated" and not entry.startswith(SYNTHETIC):
            for t, r in rows:
                per_second[t - t0] = per_second.get(t - t0, 0.0) + float(r["Requests/s"] or 0)
    return per_second


def load_plot(prefix: Path, rss: list, out: Path) -> None:
    """Throughput (HTTP requests and 429s per second), latency percentiles of the main entries, RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = history(prefix)
    t0 = min((rows[0][0] for rows in hist.values() if rows), default=0)

    def series(entry: str, column: str, scale: float = 1.0):
        rows = hist.get(entry, [])
        return ([t - t0 for t, _ in rows],
                [float(r[column]) * scale if r[column] not in ("", "N/A") else float("nan") for _, r in rows])

    fig, axes = plt.subplots(3, 1, figsize=(9, 9))
    per_second = requests_per_second(hist, t0)
    ts = sorted(per_second)
    axes[0].plot(ts, [per_second[t] for t in ts], label="HTTP requests/s")
    for entry in [e for e in hist if e.startswith("REJECTED")]:
        axes[0].plot(*series(entry, "Requests/s"), label=entry.split(" ", 1)[1].lower() + " /s")
    axes[0].plot(*series("Aggregated", "Failures/s"), label="failures/s")
    axes[0].set_ylabel("rate (10 s window)")
    axes[0].legend(fontsize=8)
    for entry, label in (("POST /v1/completions", "completion"), ("TTFT time to first token", "TTFT"),
                         ("POST /v1/classify", "classify")):
        for p, style in (("50%", "-"), ("90%", "--")):
            x, y = series(entry, p, 1e-3)
            if x:
                axes[1].plot(x, y, style, label=f"{label} p{p[:-1]}")
    axes[1].set_ylabel("latency (s)")
    axes[1].set_xlabel("seconds since Locust started")
    axes[1].legend(fontsize=8)
    if rss:
        axes[2].plot([t for t, _ in rss], [m for _, m in rss])
    axes[2].set_ylabel("server RSS (MiB)")
    axes[2].set_xlabel("seconds since the load started")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def soak_plot(prefix: Path, rss: list, rate_target: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = history(prefix)
    t0 = min((rows[0][0] for rows in hist.values() if rows), default=0)
    fig, axes = plt.subplots(2, 1, figsize=(8, 6))
    if rss:
        axes[0].plot([t / 60 for t, _ in rss], [m for _, m in rss])
    axes[0].set_ylabel("server RSS (MiB)")
    axes[0].set_xlabel("minutes of soak")
    per_second = requests_per_second(hist, t0)
    ts = sorted(per_second)
    axes[1].plot([t / 60 for t in ts], [per_second[t] for t in ts], label="HTTP requests/s (offered)")
    for entry in [e for e in hist if e.startswith("REJECTED")]:
        rows = hist[entry]
        axes[1].plot([(t - t0) / 60 for t, _ in rows], [float(r["Requests/s"] or 0) for _, r in rows],
                     label=entry.split(" ", 1)[1].lower() + " /s")
    axes[1].axhline(rate_target, linestyle=":", color="grey", label="target offered rate")
    axes[1].set_xlabel("minutes of soak")
    axes[1].set_ylabel("rate (10 s window)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=70)
    plt.close(fig)
