"""Headless load test of a rankserve server: prepare adapters, run Locust, summarise.

    loadtests/run --model smollm2 --adapters 100 --duration 120 --users 16

Steps: start a server on loopback unless --host is given; create N random-but-valid adapters of several
methods and ranks for the server's base and upload them; scrape /metrics; run Locust headless as its own
process with --csv; scrape /metrics again while sampling the server's RSS; write summary.json,
summary.md and plot.png into --out. Traffic goes to loopback (or the --host you give) only, and every
phase is bounded in time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "dora", "adalora", "aroma", "edora", "mor")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, store: Path, port: int) -> subprocess.Popen:
    cmd = [str(ROOT / ".venv/bin/rankserve"), "serve", "--model", args.model, "--store", str(store),
           "--host", "127.0.0.1", "--port", str(port)]
    if args.admin_key:
        cmd += ["--admin-key", args.admin_key]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    cmd += args.server_arg
    log = open(Path(args.out) / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(host: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(host + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"server at {host} not ready after {timeout:.0f}s")


def make_adapters(args, host: str, headers: dict) -> dict:
    """Upload N generate adapters (mixed methods and ranks, variable-rank for AdaLoRA/AROMA) and a few
    classify ones; keep a handful of files for the admin user's upload/delete churn."""
    from adapters_store.basemodels import load_base
    from adapters_store.synth import random_adapter

    base = load_base(args.model)
    files_dir = Path(args.out) / "adapters"
    files_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"generate": [], "classify": [], "upload_files": [], "base": args.served_name or args.model}
    plan = [("generate", i) for i in range(args.adapters if base.is_decoder else 0)]
    plan += [("classify", i) for i in range(args.classify_adapters)]
    with httpx.Client(base_url=host, headers=headers, timeout=60) as client:
        for task, i in plan:
            method = METHODS[i % len(METHODS)]
            ad = random_adapter(base, method=method, rank=4 + (i % 4) * 4, seed=i, task=task,
                                variable_rank=method in ("adalora", "aroma"),
                                labels=["business", "sport", "science"] if task == "classify" else None)
            adapter_id = f"lt-{task[:3]}-{i:04d}"
            r = client.post("/v1/adapters", data={"adapter_id": adapter_id},
                            files=[("files", (f"{adapter_id}.safetensors", ad.to_bytes()))])
            if r.status_code not in (201, 409):
                raise SystemExit(f"upload of {adapter_id} failed: {r.status_code} {r.text[:300]}")
            manifest[task].append(adapter_id)
        for i in range(4):
            path = files_dir / f"churn-{i}.safetensors"
            random_adapter(base, method=METHODS[i], rank=8, seed=10_000 + i).save(path)
            manifest["upload_files"].append(str(path))
    return manifest


def scrape(host: str, headers: dict) -> dict[str, float]:
    """Flatten /metrics samples into {"name{label=value,...}": value}."""
    text = httpx.get(host + "/metrics", headers=headers, timeout=10).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def delta(before: dict, after: dict, prefix: str) -> float:
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k.startswith(prefix))


class RssSampler(threading.Thread):
    def __init__(self, pid: int | None, every: float = 2.0):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self.stop = pid, every, [], threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while self.pid and not self.stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.samples.append((time.monotonic() - t0, int(line.split()[1]) / 1024.0))
            except FileNotFoundError:
                return
            self.stop.wait(self.every)


def run_locust(args, host: str, manifest_path: Path) -> Path:
    prefix = Path(args.out) / "locust"
    env = dict(os.environ, RANKSERVE_LT_MANIFEST=str(manifest_path), RANKSERVE_LT_API_KEY=args.api_key or "",
               RANKSERVE_LT_ADMIN_KEY=args.admin_key or args.api_key or "",
               RANKSERVE_LT_MAX_TOKENS=str(args.max_tokens), RANKSERVE_LT_SHAPE="1" if args.shape else "0",
               RANKSERVE_LT_USERS=str(args.users))
    cmd = [str(ROOT / ".venv/bin/locust"), "-f", str(ROOT / "loadtests/locustfile.py"), "--headless",
           "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration}s", "--host", host,
           "--csv", str(prefix), "--csv-full-history", "--only-summary", "--stop-timeout", "30",
           "--exit-code-on-error", "0"]
    subprocess.run(cmd, env=env, check=True, timeout=args.duration + 120)
    return prefix


def read_stats(prefix: Path) -> dict[str, dict]:
    with open(f"{prefix}_stats.csv") as f:
        return {f"{row['Type']} {row['Name']}": row for row in csv.DictReader(f)}


def pct(row: dict | None, key: str) -> float | None:
    if not row or row.get(key) in (None, "", "N/A"):
        return None
    return float(row[key]) / 1000.0


def summarise(args, prefix: Path, before: dict, after: dict, rss: list, wall: float) -> dict:
    stats = read_stats(prefix)
    agg = stats.get(" Aggregated") or stats.get("None Aggregated") or {}
    rejected = sum(int(r["Request Count"]) for k, r in stats.items() if k.startswith("REJECTED"))
    measured = {k: r for k, r in stats.items() if not k.startswith(("TTFT", "ITL", "REJECTED")) and "Aggregated" not in k}
    requests = sum(int(r["Request Count"]) for r in measured.values())
    failures = sum(int(r["Failure Count"]) for r in measured.values())
    with open(f"{prefix}_failures.csv") as f:
        failures_by_kind = {f"{r['Method']} {r['Name']}: {r['Error'][:120]}": int(r["Occurrences"]) for r in csv.DictReader(f)}
    hits = delta(before, after, "rankserve_adapter_cache_hits_total")
    misses = delta(before, after, "rankserve_adapter_cache_misses_total")
    gen_tokens = delta(before, after, "rankserve_generation_tokens_total")
    ttft, itl = stats.get("TTFT time to first token"), stats.get("ITL inter-token latency")
    e2e = {k: r for k, r in measured.items() if "/v1/completions" in k or "/v1/chat" in k}
    e2e_row = max(e2e.values(), key=lambda r: int(r["Request Count"])) if e2e else None
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("api_key", "admin_key")},
        "wall_seconds": round(wall, 1),
        "requests": requests, "failures": failures, "rejected_429": rejected,
        "failures_by_kind": failures_by_kind,
        "requests_per_second": round(requests / max(wall, 1e-9), 2),
        "generated_tokens_per_second": round(gen_tokens / max(wall, 1e-9), 2),
        "ttft_seconds": {p: pct(ttft, f"{p}%") for p in ("50", "90", "99")},
        "itl_seconds": {p: pct(itl, f"{p}%") for p in ("50", "90", "99")},
        "e2e_seconds": {p: pct(e2e_row, f"{p}%") for p in ("50", "90", "99")},
        "e2e_entry": (e2e_row or {}).get("Name"),
        "aggregate_p50_seconds": pct(agg, "50%"),
        "adapter_cache_hit_ratio": round(hits / (hits + misses), 3) if hits + misses else None,
        "peak_rss_mib": round(max((m for _, m in rss), default=0.0), 1),
        "rss_first_last_mib": [round(rss[0][1], 1), round(rss[-1][1], 1)] if rss else None,
    }


def write_markdown(summary: dict, path: Path) -> None:
    def fmt(d):
        return " / ".join("-" if v is None else f"{v:.3f}" for v in d.values())

    lines = [
        "# Load test summary", "",
        f"Command: `loadtests/run {' '.join(sys.argv[1:])}`", "",
        "| metric | value |", "|---|---|",
        f"| wall time (s) | {summary['wall_seconds']} |",
        f"| requests / failures / 429 rejections | {summary['requests']} / {summary['failures']} / {summary['rejected_429']} |",
        f"| requests/s | {summary['requests_per_second']} |",
        f"| generated tokens/s | {summary['generated_tokens_per_second']} |",
        f"| TTFT p50/p90/p99 (s) | {fmt(summary['ttft_seconds'])} |",
        f"| ITL p50/p90/p99 (s) | {fmt(summary['itl_seconds'])} |",
        f"| e2e p50/p90/p99 (s), {summary['e2e_entry']} | {fmt(summary['e2e_seconds'])} |",
        f"| adapter cache hit ratio | {summary['adapter_cache_hit_ratio']} |",
        f"| server peak RSS (MiB) | {summary['peak_rss_mib']} |",
    ]
    if summary["failures_by_kind"]:
        lines += ["", "Failures by kind:", ""] + [f"- {k}: {v}" for k, v in summary["failures_by_kind"].items()]
    path.write_text("\n".join(lines) + "\n")


def plot(prefix: Path, rss: list, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(f"{prefix}_stats_history.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    t0 = int(rows[0]["Timestamp"]) if rows else 0
    ts = [int(r["Timestamp"]) - t0 for r in rows]

    def col(name):
        return [float(r[name]) if r[name] not in ("", "N/A") else float("nan") for r in rows]

    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=False)
    axes[0].plot(ts, col("Requests/s"), label="requests/s")
    axes[0].plot(ts, col("Failures/s"), label="failures/s")
    axes[0].set_ylabel("rate")
    axes[0].legend()
    for p in ("50%", "90%", "99%"):
        axes[1].plot(ts, [v / 1000 for v in col(p)], label=f"p{p[:-1]}")
    axes[1].set_ylabel("latency (s)")
    axes[1].legend()
    if rss:
        axes[2].plot([t for t, _ in rss], [m for _, m in rss])
    axes[2].set_ylabel("server RSS (MiB)")
    axes[2].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", help="a running server; default: start one on loopback")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--served-name", default=None, help="the base model's id at the server (default: --model)")
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--classify-adapters", type=int, default=4)
    ap.add_argument("--duration", type=int, default=120, help="seconds of load")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--spawn-rate", type=float, default=4.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--shape", action="store_true", help="ramp-up / steady / spike shape instead of -u/-r/-t")
    ap.add_argument("--api-key", default=os.environ.get("RANKSERVE_API_KEY"))
    ap.add_argument("--admin-key", default=os.environ.get("RANKSERVE_ADMIN_KEY"))
    ap.add_argument("--out", default=str(ROOT / "loadtests/out"))
    ap.add_argument("--server-arg", action="append", default=[], help="extra flag for `rankserve serve`")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = None
    host = args.host
    if host is None:
        port = free_port()
        host = f"http://127.0.0.1:{port}"
        server = start_server(args, out / "store", port)
    try:
        wait_ready(host, timeout=600)
        admin = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
        manifest = make_adapters(args, host, admin)
        manifest_path = out / "manifest.json"
        manifest_path.write_text(json.dumps(manifest, indent=1))
        probe = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        before = scrape(host, probe)
        sampler = RssSampler(server.pid if server else None)
        sampler.start()
        t0 = time.monotonic()
        prefix = run_locust(args, host, manifest_path)
        wall = time.monotonic() - t0
        after = scrape(host, probe)
        sampler.stop.set()
        summary = summarise(args, prefix, before, after, sampler.samples, wall)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        write_markdown(summary, out / "summary.md")
        plot(prefix, sampler.samples, out / "plot.png")
        print((out / "summary.md").read_text())
        return 0 if summary["failures"] == 0 else 1
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
