"""The Ray Serve application: an ingress deployment that speaks rankserve's HTTP API on one port, and N
engine replicas, each running the whole single-node server (its app, engine and one resident base) in
process, on one shared store (s3://... or a shared directory).

Routing by adapter id is Ray Serve's model multiplexing: the ingress reads the adapter id from the request
(``model``, or LoRAX's ``parameters.adapter_id``) and sends the request with ``multiplexed_model_id`` set
to it; Ray's router prefers a replica that already holds that id (``serve.multiplexed`` keeps the ids a
replica served, least recently used first, up to ``adapters_per_replica``), so each adapter's traffic goes
where it is resident. ``routing="round-robin"`` leaves the id out (the baseline of the benchmark).

A replica that dies is restarted by Ray (its health check also fails when its engine is unhealthy); the
requests it held end with a 503 (``replica_unavailable``, Retry-After) or, mid-stream, an SSE error event.
The store lives outside the replicas, so nothing is lost with one. Replicas push their Prometheus text to a
named actor (metrics.py); the ingress's /metrics merges them with a ``replica`` label.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from server.cluster.asgi import HttpRequest, call
from server.cluster.metrics import MetricsBoard, merge
from server.common.config import Settings, settings_from

log = logging.getLogger("rankserve.cluster")
APP = "rankserve"
BOARD = f"{APP}-metrics"
PUSH_S = 2.0


@dataclass(frozen=True)
class ClusterOptions:
    replicas: int = 2
    routing: str = "adapter"  # adapter (multiplexed) | round-robin
    adapters_per_replica: int = 64  # serve.multiplexed's max_num_models_per_replica
    replica_cpus: float = 1.0  # Ray CPUs per engine replica (also its torch threads, at least 1)
    max_ongoing_requests: int = 64
    autoscaling: dict = field(default_factory=dict)  # Ray Serve autoscaling_config; empty = fixed replicas


def adapter_id(req: HttpRequest, base_names: set[str]) -> str:
    """The adapter a request names ("" = none: the base, an upload, a probe): the routing key."""
    if req.method != "POST" or not req.body or not req.path.startswith(("/v1/completions", "/v1/chat", "/v1/classify",
                                                                        "/generate")):
        return ""
    try:
        body = json.loads(req.body)
    except (ValueError, UnicodeDecodeError):
        return ""  # the replica answers the 400
    if not isinstance(body, dict):
        return ""
    name = body.get("model")
    params = body.get("parameters")
    if req.path.startswith("/generate") and isinstance(params, dict):
        name = params.get("adapter_id")
    return name if isinstance(name, str) and name not in base_names and len(name) <= 256 else ""


def unavailable(message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error", "param": None,
                                   "code": "replica_unavailable"}}, status_code=503, headers={"Retry-After": "2"})


def metrics_board():
    """The application's one MetricsBoard actor (created by whoever asks first; killed with the application)."""
    import ray

    return ray.remote(MetricsBoard).options(name=BOARD, namespace="serve", get_if_exists=True, lifetime="detached",
                                            num_cpus=0).remote()


def build(settings: Settings, options: ClusterOptions):
    """The bound application (ingress -> engine replicas), ready for ``serve.run``."""
    engine_opts: dict = dict(ray_actor_options={"num_cpus": options.replica_cpus}, health_check_period_s=5,
                             health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
                             max_ongoing_requests=options.max_ongoing_requests)
    if options.autoscaling:
        engine_opts["autoscaling_config"] = options.autoscaling
    else:
        engine_opts["num_replicas"] = options.replicas

    @serve.deployment(name="Engine", **engine_opts)
    class EngineReplica:
        def __init__(self, settings_dict: dict):
            import torch

            from server.api.app import create_app
            from server.common.metrics import Metrics
            from server.state import load_runtime

            torch.set_num_threads(max(1, round(options.replica_cpus)))
            self.settings = Settings(**settings_dict)
            metrics = Metrics(model=self.settings.base_name)
            self.runtime = load_runtime(self.settings, metrics)
            self.app = create_app(self.settings, self.runtime, metrics)
            self.state = self.app.state.rankserve
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.board = metrics_board()
            threading.Thread(target=self._push_metrics, name="rankserve-metrics-push", daemon=True).start()

        @serve.multiplexed(max_num_models_per_replica=options.adapters_per_replica)
        async def get_model(self, model_id: str) -> str:
            """Ray calls this the first time this replica serves ``model_id`` and from then on routes that id
            here by preference (dropping the least recently used id beyond the bound). The engine makes the
            adapter resident on the request itself, from the shared store through the local blob cache."""
            return model_id

        async def handle(self, req: HttpRequest):
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.get_model(model_id)
            async for item in call(self.app, req):
                yield item

        def _push_metrics(self) -> None:
            import ray

            while True:
                try:
                    engine = self.runtime.engine
                    self.state.metrics.running.set(engine.num_running)
                    self.state.metrics.waiting.set(engine.num_waiting)
                    ray.get(self.board.put.remote(self.replica, self.state.metrics.render().decode()), timeout=10)
                except Exception as e:  # noqa: BLE001 - metrics never take the replica down
                    log.warning("pushing metrics failed: %s", e)
                time.sleep(PUSH_S)

        def check_health(self) -> None:
            if not self.state.healthy:
                raise RuntimeError(f"engine unhealthy: {self.state.failure}")

    @serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
    class Ingress:
        def __init__(self, engine, settings_dict: dict):
            self.engine = engine
            s = Settings(**settings_dict)
            self.base_names = {s.model, s.base_name}
            self.board = metrics_board()

        async def __call__(self, request: Request) -> Response:
            if request.url.path == "/metrics":
                return Response(merge(await self.board.all.remote()), media_type="text/plain; version=0.0.4")
            req = HttpRequest(request.method, request.url.path, request.url.query,
                              [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "content-length")],
                              await request.body())
            model = adapter_id(req, self.base_names) if options.routing == "adapter" else ""
            stream = self.engine.options(stream=True, multiplexed_model_id=model).handle.remote(req)
            try:
                status, headers = await stream.__anext__()
            except Exception as e:  # noqa: BLE001 - a replica that died or cannot be reached
                log.warning("replica failed before answering %s %s: %s", req.method, req.path, e)
                return unavailable(f"the engine replica serving this request failed ({type(e).__name__}); "
                                   "it is being restarted: retry")
            headers = [(k, v) for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")]
            sse = any(k.lower() == "content-type" and "event-stream" in v for k, v in headers)
            return StreamingResponse(self._rest(stream, sse), status_code=status, headers=dict(headers))

        async def _rest(self, stream, sse: bool):
            try:
                async for chunk in stream:
                    yield chunk
            except Exception as e:  # noqa: BLE001 - the replica died mid-response
                log.warning("replica failed mid-response: %s", e)
                if sse:
                    error = {"error": {"message": f"the engine replica failed mid-stream ({type(e).__name__}); retry",
                                       "type": "server_error", "param": None, "code": "replica_unavailable"}}
                    yield f"data: {json.dumps(error)}\n\n".encode()

    settings_dict = asdict(settings)
    return Ingress.bind(EngineReplica.bind(settings_dict), settings_dict)


def app_builder(args: dict):
    """An application builder for `serve run` and KubeRay's serveConfigV2 (``import_path:
    server.cluster.app:app_builder``): ``args`` holds ClusterOptions fields (replicas, routing, ...) and
    `rankserve serve` settings by field name (model, store, max_slots, ...); RANKSERVE_* variables apply
    beneath them as for `rankserve serve`."""
    names = {f.name for f in fields(ClusterOptions)}
    env = {**os.environ, **{"RANKSERVE_" + k.upper(): str(v) for k, v in args.items() if k not in names}}
    return build(settings_from(env=env), ClusterOptions(**{k: v for k, v in args.items() if k in names}))


def replica_env() -> dict[str, str]:
    """The environment replicas need (runtime_env): the cache, offline hub, AWS variables, the tree itself."""
    keep = ("RANKSERVE_", "AWS_", "HF_", "TOKENIZERS_PARALLELISM", "OMP_WAIT_POLICY", "TRITON_")
    env = {k: v for k, v in os.environ.items() if k.startswith(keep)}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env
