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
import gc
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
sys.path.insert(0, str(ROOT))  # run as a script: loadtests/ and adapters_store/ import from the root

from loadtests import plots  # noqa: E402

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
    classify ones; keep a handful of files for the admin user's upload/use/delete churn. Ids the server
    already has (a rerun on the same --out store) are kept, not rebuilt: the ids and seeds are fixed."""
    from adapters_store.basemodels import load_base
    from adapters_store.synth import random_adapter

    base = load_base(args.model)
    files_dir = Path(args.out) / "adapters"
    files_dir.mkdir(parents=True, exist_ok=True)
    churn_task = "generate" if base.is_decoder else "classify"
    manifest = {"generate": [], "classify": [], "upload_files": [], "churn_task": churn_task,
                "base": args.served_name or args.model}
    plan = [("generate", i) for i in range(args.adapters if base.is_decoder else 0)]
    plan += [("classify", i) for i in range(args.classify_adapters)]
    labels = ["business", "sport", "science"]
    with httpx.Client(base_url=host, headers=headers, timeout=120) as client:
        for task, i in plan:
            adapter_id = f"lt-{task[:3]}-{i:04d}"
            manifest[task].append(adapter_id)
            if client.get(f"/v1/adapters/{adapter_id}").status_code == 200:
                continue
            method = METHODS[i % len(METHODS)]
            ad = random_adapter(base, method=method, rank=4 + (i % 4) * 4, seed=i, task=task,
                                variable_rank=method in ("adalora", "aroma"),
                                labels=labels if task == "classify" else None)
            r = client.post("/v1/adapters", data={"adapter_id": adapter_id},
                            files=[("files", (f"{adapter_id}.safetensors", ad.to_bytes()))])
            if r.status_code not in (201, 409):
                raise SystemExit(f"upload of {adapter_id} failed: {r.status_code} {r.text[:300]}")
        for i in range(args.churn_files):
            path = files_dir / f"churn-{churn_task}-{i}.safetensors"
            if not path.exists():
                random_adapter(base, method=METHODS[i % len(METHODS)], rank=8, seed=10_000 + i, task=churn_task,
                               labels=labels if churn_task == "classify" else None).save(path)
            manifest["upload_files"].append(str(path))
    del base  # the runner holds no model while Locust runs
    gc.collect()
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


def by_label(before: dict, after: dict, name: str, label: str) -> dict[str, float]:
    """Increase of every sample of ``name`` over the run, summed per value of ``label``."""
    out: dict[str, float] = {}
    for key, value in after.items():
        if not key.startswith(name + "{"):
            continue
        labels = dict(kv.split("=", 1) for kv in key[len(name) + 1:-1].split(",") if kv)
        out[labels.get(label, "")] = out.get(labels.get(label, ""), 0.0) + value - before.get(key, 0.0)
    return {k: v for k, v in out.items() if v}


def server_view(before: dict, after: dict) -> dict:
    """What the server's own metrics say about the run (independent of what Locust saw)."""
    statuses = by_label(before, after, "rankserve_requests_total", "status")
    load_sum = by_label(before, after, "rankserve_adapter_load_duration_seconds_sum", "source")
    load_n = by_label(before, after, "rankserve_adapter_load_duration_seconds_count", "source")
    return {
        "status_counts": {k: int(v) for k, v in sorted(statuses.items())},
        "status_5xx": int(sum(v for k, v in statuses.items() if k.startswith("5"))),
        "rejected_by_reason": {k: int(v) for k, v in by_label(before, after, "rankserve_requests_rejected_total",
                                                               "reason").items()},
        "cancelled": int(delta(before, after, "rankserve_requests_cancelled_total")),
        "adapter_loads_by_source": {k: int(v) for k, v in load_n.items()},
        "adapter_load_mean_seconds": {k: round(load_sum.get(k, 0.0) / n, 3) for k, n in load_n.items() if n},
        "adapter_load_seconds_total": round(sum(load_sum.values()), 1),
    }


class RssSampler(threading.Thread):
    """(seconds since start, MiB) of a process's resident set every ``every`` seconds, from /proc."""

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
            except (FileNotFoundError, ProcessLookupError):
                return
            self.stop.wait(self.every)


def locust_env(args, manifest_path: Path, rate: float, users: int) -> dict[str, str]:
    return dict(os.environ, RANKSERVE_LT_MANIFEST=str(manifest_path), RANKSERVE_LT_API_KEY=args.api_key or "",
                RANKSERVE_LT_ADMIN_KEY=args.admin_key or args.api_key or "",
                RANKSERVE_LT_MAX_TOKENS=str(args.max_tokens),
                RANKSERVE_LT_SHAPE="1" if getattr(args, "shape", False) else "0",
                RANKSERVE_LT_USERS=str(users), RANKSERVE_LT_TIMEOUT=str(args.request_timeout),
                RANKSERVE_LT_RATE=str(rate))


def run_locust(args, host: str, manifest_path: Path, name: str = "locust", rate: float = 0.0,
               users: int | None = None, duration: int | None = None) -> Path:
    """Locust headless in its own process (it patches sockets), bounded by -t plus the stop timeout."""
    prefix = Path(args.out) / name
    users = users or args.users
    duration = duration or args.duration
    cmd = [str(ROOT / ".venv/bin/locust"), "-f", str(ROOT / "loadtests/locustfile.py"), "--headless",
           "-u", str(users), "-r", str(args.spawn_rate), "-t", f"{duration}s", "--host", host,
           "--csv", str(prefix), "--csv-full-history", "--only-summary", "--stop-timeout", "30",
           "--exit-code-on-error", "0"]
    with open(Path(args.out) / f"{name}.log", "wb") as log:
        subprocess.run(cmd, env=locust_env(args, manifest_path, rate, users), check=True, stdout=log,
                       stderr=subprocess.STDOUT, timeout=duration + 120)
    return prefix


def read_stats(prefix: Path) -> dict[str, dict]:
    with open(f"{prefix}_stats.csv") as f:
        return {f"{row['Type']} {row['Name']}": row for row in csv.DictReader(f)}


def pct(row: dict | None, key: str) -> float | None:
    if not row or row.get(key) in (None, "", "N/A") or not int(row.get("Request Count") or 0):
        return None
    return float(row[key]) / 1000.0


SYNTHETIC = plots.SYNTHETIC


def client_view(prefix: Path, wall: float) -> dict:
    """What Locust saw: requests, failures (with their kinds), rejections and latency percentiles."""
    stats = read_stats(prefix)
    rejected = {k.split(" ", 1)[1]: int(r["Request Count"]) for k, r in stats.items() if k.startswith("REJECTED")}
    measured = {k: r for k, r in stats.items() if not k.startswith(SYNTHETIC) and "Aggregated" not in k}
    requests = sum(int(r["Request Count"]) for r in measured.values())
    with open(f"{prefix}_failures.csv") as f:
        failures = {f"{r['Method']} {r['Name']}: {r['Error'][:160]}": int(r["Occurrences"]) for r in csv.DictReader(f)}
    with open(f"{prefix}_exceptions.csv") as f:  # a task that raised: a bug in the locustfile or a crash
        exceptions = {r["Message"][:160]: int(r["Count"]) for r in csv.DictReader(f)}
    ttft, itl = stats.get("TTFT time to first token"), stats.get("ITL inter-token latency")
    e2e_row = stats.get("POST /v1/completions")
    return {
        "requests": requests, "rejected": rejected, "completed": requests - sum(rejected.values()),
        "failures": sum(failures.values()) + sum(exceptions.values()),
        "failures_by_kind": failures, "exceptions": exceptions,
        "requests_per_second": round(requests / max(wall, 1e-9), 2),
        "ttft_seconds": {p: pct(ttft, f"{p}%") for p in ("50", "90", "99")},
        "itl_seconds": {p: pct(itl, f"{p}%") for p in ("50", "90", "99")},
        "completion_e2e_seconds": {p: pct(e2e_row, f"{p}%") for p in ("50", "90", "99")},
        "classify_e2e_seconds": {p: pct(stats.get("POST /v1/classify"), f"{p}%") for p in ("50", "90", "99")},
    }


def summarise(args, prefix: Path, before: dict, after: dict, rss: list, wall: float) -> dict:
    client = client_view(prefix, wall)
    server = server_view(before, after)
    hits = delta(before, after, "rankserve_adapter_cache_hits_total")
    misses = delta(before, after, "rankserve_adapter_cache_misses_total")
    gen_tokens = delta(before, after, "rankserve_generation_tokens_total")
    return {
        "command": command_line(),
        "config": {k: v for k, v in vars(args).items() if k not in ("api_key", "admin_key")},
        "wall_seconds": round(wall, 1),
        **client,
        "generated_tokens_per_second": round(gen_tokens / max(wall, 1e-9), 2),
        "adapter_cache_hit_ratio": round(hits / (hits + misses), 3) if hits + misses else None,
        "server": server,
        "peak_rss_mib": round(max(m for _, m in rss), 1) if rss else None,  # None: --host, pid unknown
        "rss_first_last_mib": [round(rss[0][1], 1), round(rss[-1][1], 1)] if rss else None,
    }


def fmt(d: dict) -> str:
    return " / ".join("-" if v is None else f"{v:.3f}" for v in d.values())


def command_line() -> str:
    return " ".join(["loadtests/run", *sys.argv[1:]])


def write_markdown(summary: dict, path: Path, title: str = "Load test summary", extra: list[str] = ()) -> None:
    srv = summary["server"]
    lines = [
        f"# {title}", "",
        f"Command: `{summary.get('command', command_line())}`", "",
        "| metric | value |", "|---|---|",
        f"| wall time of the load (s) | {summary['wall_seconds']} |",
        f"| requests / completed / unexpected failures | {summary['requests']} / {summary['completed']} / "
        f"{summary['failures']} |",
        f"| rejections (expected) | {summary['rejected'] or 0} |",
        f"| requests/s (all, incl. rejected) | {summary['requests_per_second']} |",
        f"| generated tokens/s (server counter) | {summary['generated_tokens_per_second']} |",
        f"| TTFT p50/p90/p99 (s) | {fmt(summary['ttft_seconds'])} |",
        f"| inter-chunk latency p50/p90/p99 (s) | {fmt(summary['itl_seconds'])} |",
        f"| /v1/completions e2e p50/p90/p99 (s) | {fmt(summary['completion_e2e_seconds'])} |",
        f"| /v1/classify e2e p50/p90/p99 (s) | {fmt(summary['classify_e2e_seconds'])} |",
        f"| adapter cache hit ratio (all tiers) | {summary['adapter_cache_hit_ratio']} |",
        f"| adapter loads by source / mean s | {srv['adapter_loads_by_source']} / {srv['adapter_load_mean_seconds']} |",
        f"| server statuses | {srv['status_counts']} |",
        f"| server 5xx | {srv['status_5xx']} |",
        f"| server peak RSS (MiB) | {summary['peak_rss_mib']} |",
        *extra,
    ]
    for name in ("failures_by_kind", "exceptions"):
        if summary[name]:
            lines += ["", f"{name}:", ""] + [f"- {k}: {v}" for k, v in summary[name].items()]
    path.write_text("\n".join(lines) + "\n")


def add_common_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--host", help="a running server; default: start one on loopback")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--served-name", default=None, help="the base model's id at the server (default: --model)")
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--classify-adapters", type=int, default=4)
    ap.add_argument("--churn-files", type=int, default=4, help="distinct files the admin user uploads")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--spawn-rate", type=float, default=4.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--request-timeout", type=float, default=300.0, help="client timeout per request (s)")
    ap.add_argument("--api-key", default=os.environ.get("RANKSERVE_API_KEY"))
    ap.add_argument("--admin-key", default=os.environ.get("RANKSERVE_ADMIN_KEY"))
    ap.add_argument("--store", default=None, help="store directory of the started server (default: OUT/store)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra flag for `rankserve serve`, e.g. --server-arg=--max-queue=16 (repeatable)")


def stop_server(server: subprocess.Popen | None, timeout: float = 60.0) -> int | None:
    """SIGTERM (the server drains), then SIGKILL after ``timeout``; the exit code."""
    if server is None:
        return None
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    return server.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(ap)
    ap.add_argument("--duration", type=int, default=120, help="seconds of load")
    ap.add_argument("--shape", action="store_true", help="ramp-up / steady / spike shape instead of -u/-r/-t")
    ap.add_argument("--out", default=str(ROOT / "loadtests/out"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = None
    host = args.host
    if host is None:
        port = free_port()
        host = f"http://127.0.0.1:{port}"
        server = start_server(args, Path(args.store) if args.store else out / "store", port)
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
        plots.load_plot(prefix, sampler.samples, out / "plot.png")
        print((out / "summary.md").read_text())
        return 0 if summary["failures"] == 0 and summary["server"]["status_5xx"] == 0 else 1
    finally:
        code = stop_server(server)
        if code not in (None, 0):
            print(f"server exited with {code} (see {out / 'server.log'})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
