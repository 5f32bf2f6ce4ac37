"""The cluster's pure parts without starting Ray: the routing key, the merged /metrics, the in-process ASGI call."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

pytest.importorskip("ray.serve")

from server.cluster.app import adapter_id  # noqa: E402
from server.cluster.asgi import HttpRequest, call  # noqa: E402
from server.cluster.metrics import merge  # noqa: E402


def post(path: str, body) -> HttpRequest:
    return HttpRequest("POST", path, headers=[("Content-Type", "application/json")],
                       body=json.dumps(body).encode() if not isinstance(body, bytes) else body)


def test_the_routing_key_is_the_adapter_the_request_names():
    base = {"tiny-llama"}
    assert adapter_id(post("/v1/completions", {"model": "a1", "prompt": "x"}), base) == "a1"
    assert adapter_id(post("/v1/chat/completions", {"model": "a2", "messages": []}), base) == "a2"
    assert adapter_id(post("/v1/classify", {"model": "c", "input": ["x"]}), base) == "c"
    assert adapter_id(post("/generate", {"inputs": "x", "parameters": {"adapter_id": "l"}}), base) == "l"
    assert adapter_id(post("/v1/completions", {"model": "tiny-llama"}), base) == ""  # the base: any replica
    assert adapter_id(post("/v1/completions", b"not json"), base) == ""  # the replica answers the 400
    assert adapter_id(post("/v1/completions", [1, 2]), base) == ""
    assert adapter_id(post("/v1/adapters", {"model": "a1"}), base) == ""
    assert adapter_id(HttpRequest("GET", "/v1/models"), base) == ""


def test_metrics_of_replicas_merge_into_one_exposition_labelled_by_replica():
    a = ('# HELP x_total X\n# TYPE x_total counter\nx_total{endpoint="/a"} 1.0\n'
         '# HELP g G\n# TYPE g gauge\ng 3.0\n')
    b = '# HELP x_total X\n# TYPE x_total counter\nx_total{endpoint="/a"} 2.0\n# HELP g G\n# TYPE g gauge\ng 4.0\n'
    lines = merge({"r1": a, "r2": b}).splitlines()
    assert lines == ["# HELP x_total X", "# TYPE x_total counter", 'x_total{replica="r1",endpoint="/a"} 1.0',
                     'x_total{replica="r2",endpoint="/a"} 2.0', "# HELP g G", "# TYPE g gauge",
                     'g{replica="r1"} 3.0', 'g{replica="r2"} 4.0']
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(merge({"r1": a, "r2": b}))}
    assert sum(s.value for s in families["x"].samples) == 3.0


def test_asgi_call_streams_status_headers_then_chunks():
    app = FastAPI()

    @app.post("/echo")
    async def echo(body: dict):
        async def gen():
            for word in body["words"]:
                yield f"data: {word}\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream", status_code=201)

    async def run():
        return [item async for item in call(app, post("/echo", {"words": ["a", "b"]}))]

    items = asyncio.run(run())
    status, headers = items[0]
    assert status == 201 and ("content-type", "text/event-stream; charset=utf-8") in headers
    assert items[1:] == [b"data: a\n\n", b"data: b\n\n"]


def test_replicas_and_autoscaling_settings_reach_the_engine_deployment():
    import argparse

    from server.cluster.app import app_builder
    from server.cluster.cli import add_cluster_arguments, options_from

    def engine(app):  # Ingress.bind(Engine.bind(...), ...): the engine deployment Ray will run
        return app._bound_deployment.init_args[0]._bound_deployment

    fixed = engine(app_builder({"model": "tiny-llama", "store": "s3://b/p", "replicas": 3, "replica_cpus": 0.5}))
    assert fixed.num_replicas == 3 and fixed.ray_actor_options["num_cpus"] == 0.5
    auto = {"min_replicas": 1, "max_replicas": 5, "target_ongoing_requests": 4}
    scaled = engine(app_builder({"model": "tiny-llama", "store": "s3://b/p", "autoscaling": auto}))
    cfg = scaled._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests) == (1, 5, 4)
    parser = argparse.ArgumentParser()
    add_cluster_arguments(parser)
    opts = options_from(parser.parse_args(["--autoscaling", '{"min_replicas": 2, "max_replicas": 4}']))
    assert opts.autoscaling == {"min_replicas": 2, "max_replicas": 4}
    for bad in (["--replicas", "0"], ["--autoscaling", "[1]"], ["--adapters-per-replica", "0"]):
        with pytest.raises(ValueError, match=bad[0]):
            options_from(parser.parse_args(bad))
