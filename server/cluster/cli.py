"""`rankserve cluster --replicas N --model M --store URL --host H --port P [--ray-address A]`.

Starts Ray on this machine (or joins the cluster at --ray-address), starts Ray Serve's HTTP proxy on
--host/--port and deploys the application (app.py), then waits. SIGTERM/SIGINT delete the application and,
when this process started Ray, stop it. Every `rankserve serve` flag applies to each replica as well.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from server.common.config import Settings, add_arguments, settings_from
from server.common.logs import event, setup_logging

ROOT = Path(__file__).resolve().parents[2]


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    add_arguments(p)
    g = p.add_argument_group("cluster")
    g.add_argument("--replicas", type=int, default=2, help="engine replicas (each holds one base model)")
    g.add_argument("--ray-address", default=None, help="join this Ray cluster (default: start Ray here)")
    g.add_argument("--routing", choices=("adapter", "round-robin"), default="adapter",
                   help="adapter: Ray Serve model multiplexing keyed by adapter id; round-robin: no affinity")
    g.add_argument("--adapters-per-replica", type=int, default=64,
                   help="adapter ids a replica keeps its routing affinity for (serve.multiplexed's bound)")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs (and torch threads) per replica")
    g.add_argument("--max-ongoing-requests", type=int, default=64, help="requests one replica takes at once")
    g.add_argument("--autoscaling", default=None,
                   help='Ray Serve autoscaling_config as JSON, e.g. {"min_replicas":1,"max_replicas":4,'
                        '"target_ongoing_requests":8} (replaces --replicas)')


def options_from(args: argparse.Namespace):
    from server.cluster.app import ClusterOptions

    problems = []
    if args.replicas < 1:
        problems.append(f"--replicas must be >= 1, got {args.replicas}")
    if args.adapters_per_replica < 1:
        problems.append(f"--adapters-per-replica must be >= 1, got {args.adapters_per_replica}")
    if args.replica_cpus < 0:
        problems.append(f"--replica-cpus must be >= 0, got {args.replica_cpus}")
    autoscaling = {}
    if args.autoscaling:
        try:
            autoscaling = json.loads(args.autoscaling)
            assert isinstance(autoscaling, dict)
        except (ValueError, AssertionError):
            problems.append(f"--autoscaling: expected a JSON object, got {args.autoscaling!r}")
    if problems:
        raise ValueError("; ".join(problems))
    return ClusterOptions(replicas=args.replicas, routing=args.routing, adapters_per_replica=args.adapters_per_replica,
                          replica_cpus=args.replica_cpus, max_ongoing_requests=args.max_ongoing_requests,
                          autoscaling=autoscaling)


def run(settings: Settings, options, ray_address: str | None, stop: threading.Event | None = None) -> int:
    import ray
    from ray import serve

    from server.cluster.app import APP, BOARD, build, replica_env

    env = {**replica_env(), "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    started_ray = ray_address is None
    # "local": always a new Ray on this machine, never a cluster some other process left running here
    ray.init(address=ray_address or "local", include_dashboard=False, runtime_env={"env_vars": env},
             logging_level=logging.WARNING, log_to_driver=False)
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build(settings, options), name=APP, route_prefix="/", blocking=False)
        event("cluster ready", model=settings.model, store=settings.store, replicas=options.replicas,
              routing=options.routing, host=settings.host, port=settings.port)
        stop.wait()
        event("cluster stopping")
    finally:
        # Bounded: with a replica stuck (or Ray's own processes gone) serve.delete could wait forever, and
        # the Ray this process started must stop in any case.
        def teardown() -> None:
            serve.delete(APP)
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(BOARD, namespace="serve"))
            if started_ray:
                serve.shutdown()

        worker = threading.Thread(target=teardown, name="rankserve-teardown", daemon=True)
        worker.start()
        worker.join(30)
        if started_ray:
            ray.shutdown()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rankserve cluster",
                                     description="the rankserve HTTP API on Ray Serve: N replicas routed by adapter id")
    add_cluster_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
        options = options_from(args)
    except ValueError as e:
        parser.error(str(e))
    setup_logging(settings.log_level)
    return run(settings, options, args.ray_address)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
