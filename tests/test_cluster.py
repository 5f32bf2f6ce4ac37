"""`rankserve cluster` on a real Ray with 2 replicas of the tiny model and a real SeaweedFS: the single-node API
through Ray Serve, PEFT's greedy output, a separate `rankserve serve` on the same bucket, one aggregated
/metrics, and a replica killed under load (RELIABILITY row 44)."""

from __future__ import annotations

import collections
import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.test_e2e_s3 import complete, peft_greedy
from tests.util_cluster import ClusterProcess
from tests.util_server import LiveServer, compiled_bytes, multipart, peft_files

pytestmark = pytest.mark.slow


def test_two_replica_cluster_on_s3_serves_peft_outputs_and_survives_a_replica_death(seaweed, tmp_path, tiny_llama):
    pytest.importorskip("ray.serve")
    url = f"s3://{seaweed.bucket()}/cluster"
    cluster = ClusterProcess(tmp_path, "tiny-llama", url, 2)
    single = LiveServer(tmp_path, "tiny-llama", "--store-cache", str(tmp_path / "single-cache"), store=url)
    try:
        cluster.start()
        c = httpx.Client(base_url=cluster.url, timeout=60)
        files = {f"p{i}": peft_files(tiny_llama.model, seed=20 + i) for i in range(3)}
        for adapter_id, f in files.items():
            r = c.post("/v1/adapters", **multipart(adapter_id, f))
            assert r.status_code == 201, r.text
        want = {adapter_id: peft_greedy(tiny_llama, f, 6) for adapter_id, f in files.items()}
        for adapter_id in files:
            r = complete(c, adapter_id)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want[adapter_id]
        with c.stream("POST", "/v1/completions", json={"model": "p0", "prompt": [11, 23, 35, 47, 59, 71],
                                                       "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                                                       "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1]) == want["p0"]
        assert c.post("/v1/adapters", **multipart("p0", files["p0"])).status_code == 409
        assert complete(c, "absent").status_code == 404

        single.start()  # a separate single-node server on the same bucket sees the cluster's uploads
        cs = single.client()
        assert {"p0", "p1", "p2"} <= {m["id"] for m in cs.get("/v1/models").json()["data"]}
        assert complete(cs, "p1").json()["choices"][0]["text"] == want["p1"]
        assert cs.post("/v1/adapters", **multipart("from-single", {"x.safetensors": compiled_bytes(tiny_llama)}))\
            .status_code == 201
        assert complete(c, "from-single").status_code == 200

        deadline = time.monotonic() + 30  # one /metrics for the cluster: every replica's samples, labelled
        while len({line.split('replica="')[1].split('"')[0] for line in c.get("/metrics").text.splitlines()
                   if 'replica="' in line}) < 2:
            assert time.monotonic() < deadline, c.get("/metrics").text[:2000]
            time.sleep(1)

        statuses: collections.Counter = collections.Counter()
        problems: list[str] = []
        stop_at = time.monotonic() + 20

        def load(i: int) -> None:
            while time.monotonic() < stop_at:
                try:
                    r = complete(c, f"p{i % 3}")
                except httpx.HTTPError as e:  # a hang (timeout) or a dropped connection
                    problems.append(f"{type(e).__name__}: {e}")
                    continue
                statuses[r.status_code] += 1
                if r.status_code == 503 and not r.headers.get("Retry-After"):
                    problems.append("503 without Retry-After")
                elif r.status_code not in (200, 503):
                    problems.append(f"{r.status_code}: {r.text[:300]}")
                elif r.status_code == 200 and r.json()["choices"][0]["text"] != want[f"p{i % 3}"]:
                    problems.append("wrong output")

        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(4)
        victim = cluster.engine_pids()[0]
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join(90)
        assert not problems, problems[:5]
        assert statuses[200] > 0
        cluster.wait_replicas(2, 120)  # Ray started a new replica
        assert victim not in cluster.engine_pids()
        for adapter_id in files:  # nothing in the store was lost; the cluster serves again
            assert complete(c, adapter_id).json()["choices"][0]["text"] == want[adapter_id]
    finally:
        single.stop()
        cluster.stop()
    assert not [cmd for cmd in _ray_processes_of(cluster)], "the cluster left Ray processes behind"


def _ray_processes_of(cluster: ClusterProcess) -> list[str]:
    from tests.util_cluster import session_pids

    return list(session_pids(cluster.proc.pid).values())
