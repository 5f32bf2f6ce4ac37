"""Adapter store benchmark: put throughput, cold start and list time with many small adapters.

    RANKSERVE_CACHE=.cache HF_HUB_OFFLINE=1 .venv/bin/python bench/store_bench.py --n 10000

Generates N rank-1 tiny-llama adapters (3 modules each, ~3 KB) into a temporary store (deleted after),
then measures:
  * put: ``AdapterStore.put`` per adapter (validation against the base, 3 fsyncs, one rename)
  * cold start: ``AdapterStore(root)`` + the first ``list()``, in a fresh process (imports excluded);
    the page cache is warm (dropping it needs root), so this is the syscall + parse cost, not disk seeks
  * list: a warm ``list()`` with the directory unchanged (cached), and a rescan as after another
    process's put (one directory scan + two lstat per adapter, no file reads)
and asserts that start-up reads no tensor: the backend's ``read`` and safetensors' loaders are patched
to count calls (must be 0), and the bytes the process read (``/proc/self/io`` rchar) are reported next to
the total size of the adapter files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLD = r"""
import json, sys, time
import safetensors.torch as st
from adapters_store import backend, store as store_mod
calls = {"backend.read": 0, "safetensors.load": 0}
def counting(name, fn):
    def wrapper(*a, **k):
        calls[name] += 1
        return fn(*a, **k)
    return wrapper
backend.LocalDirBackend.read = counting("backend.read", backend.LocalDirBackend.read)
st.load = counting("safetensors.load", st.load)
st.load_file = counting("safetensors.load", st.load_file)
def rchar():
    return int(next(l for l in open("/proc/self/io") if l.startswith("rchar")).split()[1])
r0, t0 = rchar(), time.perf_counter()
s = store_mod.AdapterStore(sys.argv[1])
t1 = time.perf_counter()
n = len(s.list())
t2 = time.perf_counter()
r1 = rchar()
t3 = time.perf_counter()
s.list()
t4 = time.perf_counter()
s._listed = None  # as after another process's put or delete: a full rescan (lstat per adapter)
s.list()
t5 = time.perf_counter()
print(json.dumps({"construct_s": t1 - t0, "first_list_s": t2 - t1, "warm_list_s": t4 - t3,
                  "rescan_list_s": t5 - t4, "listed": n, "bytes_read": r1 - r0, "calls": calls}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dir", help="parent of the temporary store (default: the system temp dir)")
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4, help="also time the last 10%% of puts from this many threads")
    args = ap.parse_args()

    from adapters_store.basemodels import load_base
    from adapters_store.store import AdapterStore
    from adapters_store.synth import random_adapter

    base = load_base("tiny-llama")
    modules = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"]
    t = time.perf_counter()
    blobs = [random_adapter(base, "lora", rank=1, seed=i, modules=modules).to_bytes() for i in range(args.n)]
    gen_s = time.perf_counter() - t
    parent = tempfile.mkdtemp(prefix="rankserve-store-bench-", dir=args.dir)
    root = Path(parent) / "store"
    try:
        store = AdapterStore(root)
        serial = len(blobs) - len(blobs) // 10
        lat = []
        t = time.perf_counter()
        for i, data in enumerate(blobs[:serial]):
            t0 = time.perf_counter()
            store.put(f"adapter-{i:05d}", data, base=base)
            lat.append(time.perf_counter() - t0)
        put_s = time.perf_counter() - t
        lat.sort()
        t = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:  # the server runs uploads in a threadpool
            list(pool.map(lambda i: store.put(f"adapter-{i:05d}", blobs[i], base=base), range(serial, len(blobs))))
        threaded_s = time.perf_counter() - t
        total_bytes = sum(len(b) for b in blobs)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        colds = []
        for _ in range(args.cold_runs):
            out = subprocess.run([sys.executable, "-c", COLD, str(root)], capture_output=True, text=True,
                                 env=env, check=True)
            colds.append(json.loads(out.stdout.strip().splitlines()[-1]))
        for c in colds:
            assert c["listed"] == args.n, c
            assert c["calls"] == {"backend.read": 0, "safetensors.load": 0}, c["calls"]
        best = min(colds, key=lambda c: c["construct_s"] + c["first_list_s"])
        report = {
            "adapters": args.n,
            "adapter_bytes_each": len(blobs[0]),
            "generate_s": round(gen_s, 2),
            "put_serial_s": round(put_s, 2),
            "put_serial_per_s": round(serial / put_s, 1),
            f"put_{args.threads}_threads_per_s": round((len(blobs) - serial) / threaded_s, 1),
            "put_latency_ms_p50": round(1e3 * statistics.median(lat), 2),
            "put_latency_ms_p99": round(1e3 * lat[int(0.99 * (len(lat) - 1))], 2),
            "cold_construct_s": [round(c["construct_s"], 3) for c in colds],
            "cold_first_list_s": [round(c["first_list_s"], 3) for c in colds],
            "warm_list_s": round(best["warm_list_s"], 4),
            "rescan_list_s": round(best["rescan_list_s"], 3),
            "startup_bytes_read": best["bytes_read"],
            "adapter_files_total_bytes": total_bytes,
            "startup_tensor_reads": best["calls"],
            "filesystem": subprocess.run(["df", "-T", parent], capture_output=True, text=True).stdout.split("\n")[1]
            .split()[1],
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    main()
