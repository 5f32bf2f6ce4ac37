"""Locust load for a running rankserve server. Run it as its own process (locust patches sockets):

    locust -f loadtests/locustfile.py --headless -u 32 -r 8 -t 2m --host http://127.0.0.1:8000 --csv out/lt

`loadtests/run` prepares the adapters and writes the manifest this file reads (RANKSERVE_LT_MANIFEST):
``{"generate": [ids], "classify": [ids], "upload_files": [paths], "base": "<served model name>"}``.

- adapters are drawn from a Zipf popularity over the manifest's ids (RANKSERVE_LT_ZIPF, default 1.1), so a
  few are hot and many are cold: the residency tiers are exercised;
- streaming users report time to first token and inter-token latency as their own entries (TTFT, ITL);
- 429 answers are counted as rejections (entry "REJECTED 429"), not failures, and so is a 503 that says the
  server is draining (entry "REJECTED 503 draining", the documented answer during shutdown); every other
  status >= 400, a timeout, or a stream without ``data: [DONE]`` is a failure;
- one admin user uploads an adapter, generates with it once, and deletes it, during the load;
- every request has a client timeout (RANKSERVE_LT_TIMEOUT seconds, default 300): nothing waits forever;
- RANKSERVE_LT_RATE > 0 paces each user at that many tasks per second (``constant_throughput``) instead
  of a short random think time: the soak uses it to offer a fixed load;
- RANKSERVE_LT_SHAPE=1 replaces -u/-r/-t with a ramp-up / steady / spike / steady shape.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import requests
from locust import HttpUser, LoadTestShape, between, constant_throughput, events, task

MANIFEST = json.loads(Path(os.environ.get("RANKSERVE_LT_MANIFEST", "loadtests/out/manifest.json")).read_text())
API_KEY = os.environ.get("RANKSERVE_LT_API_KEY", "")
ADMIN_KEY = os.environ.get("RANKSERVE_LT_ADMIN_KEY", API_KEY)
MAX_TOKENS = int(os.environ.get("RANKSERVE_LT_MAX_TOKENS", "16"))
ZIPF_S = float(os.environ.get("RANKSERVE_LT_ZIPF", "1.1"))
TIMEOUT = float(os.environ.get("RANKSERVE_LT_TIMEOUT", "300"))
RATE = float(os.environ.get("RANKSERVE_LT_RATE", "0"))  # tasks per second per user; 0 = think time
PROMPTS = ["Write a haiku about the sea.", "Explain what a hash table is.", "List three colours.",
           "What is the capital of France?", "Give me a short tip for sleeping better."]
TEXTS = ["the movie was wonderful", "a dull and tiring afternoon", "great service, friendly staff",
         "the battery died after an hour", "an ordinary day at the office"]


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k ** s) for k in range(1, n + 1)]


GEN_IDS = list(MANIFEST.get("generate", []))
CLS_IDS = list(MANIFEST.get("classify", []))
GEN_W = zipf_weights(len(GEN_IDS), ZIPF_S)
CLS_W = zipf_weights(len(CLS_IDS), ZIPF_S)


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def record(name: str, request_type: str, seconds: float, exc: Exception | None = None) -> None:
    events.request.fire(request_type=request_type, name=name, response_time=seconds * 1000.0,
                        response_length=0, exception=exc, context={})


def think_time():
    return constant_throughput(RATE) if RATE > 0 else between(0.05, 0.3)


def judge(resp) -> None:
    """429 (and 503 while draining) is the server protecting itself: a rejection, not a failure."""
    if resp.status_code == 429:
        resp.success()
        record("REJECTED 429", "REJECTED", 0.0)
    elif resp.status_code == 503 and "draining" in resp.text:
        resp.success()
        record("REJECTED 503 draining", "REJECTED", 0.0)
    elif resp.status_code >= 400 or resp.status_code == 0:  # 0: no answer (connection error, timeout)
        resp.failure(f"{resp.status_code}: {resp.text[:200] if resp.text else resp.error}")


class GenerateUser(HttpUser):
    weight = 6
    wait_time = think_time()

    def adapter(self) -> str:
        return random.choices(GEN_IDS, GEN_W)[0] if GEN_IDS else MANIFEST["base"]

    @task(3)
    def completion(self):
        body = {"model": self.adapter(), "prompt": random.choice(PROMPTS), "max_tokens": MAX_TOKENS,
                "temperature": 0.0}
        with self.client.post("/v1/completions", json=body, headers=headers(API_KEY), name="/v1/completions",
                              catch_response=True, timeout=TIMEOUT) as r:
            judge(r)

    @task(2)
    def chat(self):
        body = {"model": self.adapter(), "max_tokens": MAX_TOKENS, "temperature": 0.7, "top_p": 0.9,
                "messages": [{"role": "user", "content": random.choice(PROMPTS)}]}
        with self.client.post("/v1/chat/completions", json=body, headers=headers(API_KEY),
                              name="/v1/chat/completions", catch_response=True, timeout=TIMEOUT) as r:
            judge(r)

    @task(2)
    def stream(self):
        body = {"model": self.adapter(), "prompt": random.choice(PROMPTS), "max_tokens": MAX_TOKENS,
                "stream": True, "temperature": 0.0}
        start = time.perf_counter()
        with self.client.post("/v1/completions", json=body, headers=headers(API_KEY), stream=True,
                              name="/v1/completions [stream]", catch_response=True,
                              timeout=TIMEOUT) as r:
            if r.status_code != 200:
                judge(r)
                return
            try:
                done = self._read_stream(r, start)
            except requests.RequestException as e:  # a timeout or reset mid-stream is a failure, not a crash
                r.failure(f"stream broken: {type(e).__name__}: {e}"[:200])
                return
            if done is False:
                r.failure("stream ended without data: [DONE]")

    @staticmethod
    def _read_stream(r, start: float) -> bool | None:
        """True at ``data: [DONE]``; None after an error event (already marked a failure)."""
        last = None
        for line in r.iter_lines():
            if not line or not line.startswith(b"data: "):
                continue
            now = time.perf_counter()
            if line == b"data: [DONE]":
                return True
            if line.startswith(b'data: {"error"'):
                r.failure(line.decode()[:200])
                return None
            if last is None:
                record("time to first token", "TTFT", now - start)
            else:
                record("inter-token latency", "ITL", now - last)
            last = now
        return False


class ClassifyUser(HttpUser):
    weight = 2 if CLS_IDS else 0
    wait_time = think_time()

    @task
    def classify(self):
        body = {"model": random.choices(CLS_IDS, CLS_W)[0], "input": random.sample(TEXTS, 2)}
        with self.client.post("/v1/classify", json=body, headers=headers(API_KEY), name="/v1/classify",
                              catch_response=True, timeout=TIMEOUT) as r:
            judge(r)


class AdminUser(HttpUser):
    """Uploads a fresh adapter, uses it once (a cold load), deletes it: registry churn during the load."""

    fixed_count = 1 if MANIFEST.get("upload_files") else 0
    wait_time = between(2.0, 4.0)

    @task
    def churn(self):
        path = Path(random.choice(MANIFEST["upload_files"]))
        adapter_id = f"churn-{os.getpid()}-{random.randrange(1 << 30)}"
        with path.open("rb") as f:
            files = [("files", (path.name, f, "application/octet-stream"))]
            with self.client.post("/v1/adapters", data={"adapter_id": adapter_id}, files=files,
                                  headers=headers(ADMIN_KEY), name="/v1/adapters [upload]",
                                  catch_response=True, timeout=TIMEOUT) as r:
                judge(r)
                if r.status_code != 201:
                    return
        if MANIFEST.get("churn_task", "generate") == "classify":
            route, body = "/v1/classify", {"model": adapter_id, "input": [random.choice(TEXTS)]}
        else:
            route, body = "/v1/completions", {"model": adapter_id, "prompt": random.choice(PROMPTS), "max_tokens": 4}
        with self.client.post(route, json=body, headers=headers(API_KEY), name=f"{route} [fresh adapter]",
                              catch_response=True, timeout=TIMEOUT) as r:
            judge(r)
        with self.client.delete(f"/v1/adapters/{adapter_id}", headers=headers(ADMIN_KEY),
                                name="/v1/adapters/{id} [delete]", catch_response=True, timeout=TIMEOUT) as r:
            judge(r)


if os.environ.get("RANKSERVE_LT_SHAPE") == "1":

    class RampSteadySpike(LoadTestShape):
        """(end second, users, spawn rate): ramp to U, hold, spike to 2U, back to U, stop."""

        users = int(os.environ.get("RANKSERVE_LT_USERS", "16"))
        stages = [(20, users, users / 10), (80, users, users), (100, 2 * users, users), (120, users, users)]

        def tick(self):
            t = self.get_run_time()
            for end, users, rate in self.stages:
                if t < end:
                    return users, rate
            return None
