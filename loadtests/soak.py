"""Soak test: a long run at a multiple of the server's measured capacity, watching memory and the store.

    loadtests/run --soak --model smollm2 --adapters 20 --duration 600 --factor 2

1. start a server on loopback with a small admission bound (--max-running/--max-queue below), so that
   offered load above capacity is refused with 429 instead of queueing without end;
2. upload the fixed adapters (kept if already in the store) and record their ids and digests;
3. capacity: a closed-loop run (max-running + max-queue users, short think time, so the server is
   saturated without refusing) for --capacity-seconds; capacity = completed HTTP requests per second.
   The soak is generate-only by default (--classify-adapters 0): classification requests are ~10x
   cheaper, and a closed loop would weight them by their speed, unlike the paced soak;
4. soak: --users users, each paced at factor * capacity / users tasks per second (Locust's
   constant_throughput), for --duration seconds, while the server's RSS is sampled every --rss-every s.
   A user waiting on a slow answer cannot keep its pace, so --users must be well above what the server
   admits; the rate actually offered (including 429s) is reported next to the target;
5. list the adapters again, SIGTERM the server (drain) and check its exit code.

Pass: no unexpected client failures; no 5xx at the server (the documented 503 appears only while
draining, after the load); the fixed adapters unchanged (ids and digests); exit code 0; and the RSS
slope over the second half of the soak below --max-slope MiB/min (the first half includes the warm-up of
the adapter caches, which are bounded). Writes soak.json, soak.md, soak.png and rss.csv into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests import plots, runner  # noqa: E402


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB), in MiB per minute."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mm = sum(m for _, m in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    if var == 0:
        return None
    return 60.0 * sum((t - mt) * (m - mm) for t, m in samples) / var


def rss_figures(samples: list[tuple[float, float]]) -> dict:
    if not samples:
        return {}
    half = [s for s in samples if s[0] >= samples[-1][0] / 2]
    whole, second = slope_mib_per_min(samples), slope_mib_per_min(half)
    return {"samples": len(samples), "first_mib": round(samples[0][1], 1), "last_mib": round(samples[-1][1], 1),
            "peak_mib": round(max(m for _, m in samples), 1),
            "slope_mib_per_min": None if whole is None else round(whole, 2),
            "slope_second_half_mib_per_min": None if second is None else round(second, 2)}


def fixed_adapters(host: str, headers: dict, ids: list[str]) -> dict[str, str]:
    listed = httpx.get(host + "/v1/adapters", headers=headers, timeout=60).json()["data"]
    return {a["id"]: a["digest"] for a in listed if a["id"] in set(ids)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    runner.add_common_arguments(ap)
    ap.set_defaults(adapters=20, users=48, classify_adapters=0)
    ap.add_argument("--duration", type=int, default=600, help="seconds of soak")
    ap.add_argument("--factor", type=float, default=2.0, help="offered load as a multiple of capacity")
    ap.add_argument("--capacity-seconds", type=int, default=60)
    ap.add_argument("--capacity-users", type=int, default=None, help="default: max-running + max-queue")
    ap.add_argument("--max-running", type=int, default=8, help="the server's --max-running")
    ap.add_argument("--max-queue", type=int, default=8, help="the server's --max-queue")
    ap.add_argument("--rss-every", type=float, default=5.0)
    ap.add_argument("--max-slope", type=float, default=2.0, help="MiB/min allowed over the second half")
    ap.add_argument("--out", default=str(ROOT / "loadtests/out/soak"))
    args = ap.parse_args(argv)
    args.server_arg += [f"--max-running={args.max_running}", f"--max-queue={args.max_queue}"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = runner.free_port()
    host = f"http://127.0.0.1:{port}"
    server = runner.start_server(args, Path(args.store) if args.store else out / "store", port)
    admin = {"Authorization": f"Bearer {args.admin_key}"} if args.admin_key else {}
    probe = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    exit_code = None
    try:
        runner.wait_ready(host, timeout=600)
        manifest = runner.make_adapters(args, host, admin)
        manifest_path = out / "manifest.json"
        manifest_path.write_text(json.dumps(manifest, indent=1))
        ids = manifest["generate"] + manifest["classify"]
        fixed_before = fixed_adapters(host, admin, ids)

        t0 = time.monotonic()
        cap_users = args.capacity_users or args.max_running + args.max_queue
        cap_prefix = runner.run_locust(args, host, manifest_path, name="capacity", users=cap_users,
                                       duration=args.capacity_seconds)
        cap_wall = time.monotonic() - t0
        cap_view = runner.client_view(cap_prefix, cap_wall)
        per_s = cap_view["completed"] / cap_wall
        rate = args.factor * per_s / args.users
        print(f"capacity {per_s:.2f} completed requests/s; soak: {args.users} users at {rate:.3f}/s each", flush=True)

        before = runner.scrape(host, probe)
        sampler = runner.RssSampler(server.pid, every=args.rss_every)
        sampler.start()
        t0 = time.monotonic()
        prefix = runner.run_locust(args, host, manifest_path, name="soak", rate=rate)
        wall = time.monotonic() - t0
        after = runner.scrape(host, probe)
        sampler.stop.set()
        fixed_after = fixed_adapters(host, admin, ids)
    finally:
        exit_code = runner.stop_server(server)

    summary = runner.summarise(args, prefix, before, after, sampler.samples, wall)
    summary["command"] = " ".join(["loadtests/run --soak", *sys.argv[1:]])
    summary["capacity_requests_per_second"] = round(per_s, 3)
    summary["capacity_run"] = {k: cap_view[k] for k in ("requests", "completed", "rejected", "failures")}
    summary["offered_requests_per_second_target"] = round(args.factor * per_s, 3)
    summary["offered_over_capacity"] = round(summary["requests_per_second"] / per_s, 2) if per_s else None
    summary["rss"] = rss_figures(sampler.samples)
    summary["fixed_adapters"] = {"before": len(fixed_before), "after": len(fixed_after),
                                 "unchanged": fixed_before == fixed_after and len(fixed_before) == len(ids)}
    summary["server_exit_code"] = exit_code
    slope = summary["rss"].get("slope_second_half_mib_per_min")
    checks = {"no unexpected failures": summary["failures"] == 0,
              "no 5xx": summary["server"]["status_5xx"] == 0,
              "fixed adapters unchanged": summary["fixed_adapters"]["unchanged"],
              "server exit code 0": exit_code == 0,
              f"RSS slope (2nd half) < {args.max_slope} MiB/min": slope is not None and slope < args.max_slope}
    summary["checks"] = checks
    (out / "soak.json").write_text(json.dumps(summary, indent=1))
    (out / "rss.csv").write_text("seconds,rss_mib\n" + "".join(f"{t:.1f},{m:.1f}\n" for t, m in sampler.samples))
    rss = summary["rss"]
    extra = [f"| capacity (completed req/s) / offered target / offered actually (req/s) | "
             f"{summary['capacity_requests_per_second']} / {summary['offered_requests_per_second_target']} / "
             f"{summary['requests_per_second']} ({summary['offered_over_capacity']}x capacity) |",
             f"| RSS first / last / peak (MiB) | {rss.get('first_mib')} / {rss.get('last_mib')} / {rss.get('peak_mib')} |",
             f"| RSS slope whole / second half (MiB/min) | {rss.get('slope_mib_per_min')} / {slope} |",
             f"| fixed adapters before / after, unchanged | {len(fixed_before)} / {len(fixed_after)}, "
             f"{summary['fixed_adapters']['unchanged']} |",
             f"| server exit code after SIGTERM | {exit_code} |"]
    extra += [f"| check: {name} | {'PASS' if ok else 'FAIL'} |" for name, ok in checks.items()]
    runner.write_markdown(summary, out / "soak.md", title="Soak test summary", extra=extra)
    plots.soak_plot(prefix, sampler.samples, args.factor * per_s, out / "soak.png")
    print((out / "soak.md").read_text())
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
