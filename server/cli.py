"""`rankserve serve ...` (the HTTP server) and `rankserve adapters ...` (the store's CLI).

SIGTERM/SIGINT drain instead of stopping at once: readiness turns 503 immediately and new requests get
503, while what is in flight finishes (up to --drain-timeout); then uvicorn's own shutdown runs (close
the sockets, lifespan shutdown stops the engine) and the process exits 0. A second signal exits at once.

A dead engine thread or a step hung past --hang-timeout: every request still in the engine gets an error
event, and --unhealthy-exit-after seconds later the process exits 1 so that its supervisor restarts it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

import uvicorn  # imports no torch: OMP_WAIT_POLICY below must be set before torch loads OpenMP

from server.common.config import Settings, add_arguments, settings_from  # server.common imports no torch
from server.common.errors import Unavailable
from server.common.logs import event, setup_logging


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state, drain_timeout: float):
        super().__init__(config)
        self.state = state  # server.state.ServerState
        self.drain_timeout = drain_timeout
        self.exit_code = 0
        self._drain_started = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in uvicorn's _captured_signals: it would re-raise the signal after shutdown and the
        # process would die of SIGTERM instead of exiting 0.
        if self._drain_started:
            self.force_exit = self.should_exit = True
            return
        self._drain_started = True
        event("drain started", signal=signal.Signals(sig).name, in_flight=self.state.inflight,
              timeout_s=self.drain_timeout)
        self.state.begin_drain()
        threading.Thread(target=self._drain, name="rankserve-drain", daemon=True).start()

    def _drain(self) -> None:
        drained = self.state.wait_drained(self.drain_timeout)
        event("drain finished" if drained else "drain timed out; exiting with requests in flight",
              in_flight=self.state.inflight)
        self.should_exit = True

    def fail(self) -> None:
        """Loading the runtime failed: exit non-zero so a supervisor restarts or reports it."""
        self.exit_code = 1
        self.should_exit = True

    def watch_engine(self, exit_after: float, interval: float = 0.5) -> None:
        """A dead engine thread or a hung step (RELIABILITY row 30): /health and /ready already say 503; tell
        every request still in the engine (streams get an error event, not silence), wait `exit_after`
        seconds so those events reach the clients, then exit 1 so the supervisor (Kubernetes, systemd,
        docker --restart) starts a fresh process. This holds during a drain too: a hung engine would never
        finish what the drain waits for."""
        while not self.should_exit:
            time.sleep(interval)
            runtime = self.state.runtime
            failure = runtime.engine.failure if runtime is not None else None
            if failure is None:
                continue
            told = runtime.engine.abandon(Unavailable(f"the server is restarting: {failure}", retry_after=5))
            event("engine unhealthy; exiting so the process is restarted", reason=failure, requests_told=told,
                  exit_in_s=exit_after, level=logging.ERROR)
            time.sleep(exit_after)
            self.exit_code = 1
            self.should_exit = True
            return


def serve(settings: Settings) -> int:
    from server.api.app import create_app
    from server.api.transport import guarded_h11

    setup_logging(settings.log_level)
    holder: list[DrainingServer] = []
    app = create_app(settings, on_load_failure=lambda: holder[0].fail())
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=1, log_level=settings.log_level.lower(),
                            http=guarded_h11(settings.header_timeout), limit_concurrency=settings.limit_concurrency)
    server = DrainingServer(config, app.state.rankserve, settings.drain_timeout)
    holder.append(server)
    if settings.unhealthy_exit_after >= 0:
        threading.Thread(target=server.watch_engine, args=(settings.unhealthy_exit_after,), name="rankserve-watchdog",
                         daemon=True).start()
    event("starting", model=settings.model, host=settings.host, port=settings.port, store=settings.store,
          auth=app.state.rankserve.keys.enabled)
    server.run()
    return server.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankserve", description="serve many low-rank adapters on one base model")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                                 description="every flag also reads RANKSERVE_<FLAG> (flags win)"))
    sub.add_parser("adapters", help="push, list, rm, import-peft, inspect, export-peft adapters (rankserve adapters --help)",
                   add_help=False)
    sub.add_parser("cluster", help="the same API on Ray Serve: N replicas routed by adapter id (rankserve cluster --help)",
                   add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The base model loads in a thread (so probes answer meanwhile) and runs in the engine's thread. With
    # OpenMP's default spin-waiting, the idle team of the loading thread keeps spinning on these small
    # machines and every engine step got ~20x slower (measured: 100 tokens on tiny-llama 3.3 s vs 0.15 s).
    # Passive waiting removes that; set before torch (and its OpenMP runtime) is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if argv and argv[0] == "adapters":
        from adapters_store.cli import main as adapters_main

        return int(adapters_main(argv[1:]) or 0)
    if argv and argv[0] == "cluster":
        from server.cluster.cli import main as cluster_main

        return cluster_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except ValueError as e:
        parser.error(str(e))
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
