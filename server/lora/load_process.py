"""Cold adapter loads in a separate process: the engine's interpreter does not run the load's Python.

A loader thread's read, hash and copies release the GIL, but parsing the header, building the modules and
packing them (``image.pack``) is Python, and it holds the GIL the engine thread needs between two torch
ops. With 128 cold adapters per round on the hidden-256 fixture the engine thread waited 0.22-0.53 s per
round inside its steps on loader threads, 0.05-0.06 s warm (BENCHMARKS.md, "The hot path, fourth pass").
A loader *process* does the whole load (read, sha256 against the captured digest, the full validation
against the base, the fit check, the packing) and sends back one small pickled description and the
packed bytes over its stdout pipe. The engine's process then does one ``readinto`` into a fresh tensor
(the GIL released) and builds the module views (``image.module_views``): 0.44 ms of thread CPU per load
against ~1.2 ms for the whole load on a thread; the waiting fell to 0.15 s per round.

Served this way: LoRA-shaped adapters (LoRA, AdaLoRA, AROMA; no out_scale, no router, no head) from a
local-directory store. Anything else (MoR, DoRA/EDoRA's out_scale, classify heads, a file that fails a
check, a digest that no longer matches, an object store) is answered "fallback", and the loader thread
loads it itself the usual way, which also reports any failure exactly as before. A worker that dies,
hangs past ``TIMEOUT_S`` or is not ready yet (it imports torch first: ~1.3 s idle) is skipped the same
way; a dead one is not restarted.

Protocol (this module both sides; ``python -m server.lora.load_process`` is the worker): the parent writes
one pickled init dict, then one pickled ``(key, digest, known)`` per load; the worker answers ``("ready",)`` once,
then per load ``("ok", nbytes, dtype, rows, ranks, header_meta, need)`` followed by ``nbytes`` raw bytes,
or ``("fallback", why)``. Only this package's own processes are on either end of the pipes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import queue
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters_store.format import AdapterMeta, CompiledAdapter
from adapters_store.validate import passed, remember_passed
from server.lora.image import Layout, Packed, module_views, packed_shapes, rank_table

log = logging.getLogger("rankserve.load_process")
TIMEOUT_S = 30.0  # one load longer than this: the worker is killed and the load falls back to a thread
WORKER_NICE = 10  # the worker yields a shared core to the engine (and to the loader thread holding the GIL)
READY_POLL_S = 0.0  # how long a load waits for a starting worker (0: use a thread meanwhile)
_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class BaseSpec:
    """What validation reads of the base (``adapters_store.validate``), without its weights."""

    name: str
    fingerprint: str
    tasks: tuple[str, ...]
    targets: dict[str, tuple[int, int]]
    hidden_size: int


@dataclass(frozen=True)
class Dims:
    d_in: int
    d_out: int


def init_message(store, base, layout: Layout, max_rank: int, max_experts: int) -> dict | None:
    """The worker's configuration, or None when this store cannot be read from another process (only a
    local directory can: an object store's client and blob cache live in this process)."""
    from adapters_store.backend import LocalDirBackend
    backend = getattr(store, "backend", None)
    if not isinstance(backend, LocalDirBackend):
        return None
    return {"root": str(backend.adapters.parent), "limits": store.limits, "layout": layout,
            "spec": BaseSpec(base.name, base.fingerprint, tuple(base.tasks), dict(base.targets), base.hidden_size),
            "max_rank": max_rank, "max_experts": max_experts, "nice": WORKER_NICE}


# ---------------------------------------------------------------------------------------------- worker side
def load_packed(init: dict, backend, key: str, digest: str, known: bool = False) -> tuple[tuple, list[torch.Tensor]]:
    """One load, in the worker: (the reply, the packed group tensors to send after it, in ``packed_shapes``
    order; none for a fallback). ``known``: these
    bytes passed every check in the server's process already (``validate.passed``), so only the parse runs."""
    from adapters_store.format import read_header
    from adapters_store.validate import validate_bytes
    from server.lora.buffers import check_fit
    from server.lora.image import pack

    data = backend.read(key)
    if hashlib.sha256(data).hexdigest() != digest:
        return ("fallback", "the stored file is no longer this version"), []
    if known:
        remember_passed(digest, init["spec"], init["limits"])
    adapter = validate_bytes(data, init["spec"], init["limits"], digest)
    if adapter.head_weight is not None or adapter.head_bias is not None:
        return ("fallback", "a classify head"), []
    layout: Layout = init["layout"]  # the pool's modules and widths: the fit is checked against the slots
    d_in = {p: d for d, ps in layout.a_groups for p in ps}
    d_out = {p: d for d, ps in layout.bt_groups for p in ps}
    dims = {p: Dims(d_in[p], d_out[p]) for p in layout.paths}
    need = check_fit(adapter, dims, init["max_rank"], init["max_experts"])  # type: ignore[arg-type]
    packed = pack(adapter, layout)
    if packed is None:
        return ("fallback", "not packable"), []
    groups = packed[1].a + packed[1].bt  # contiguous (stacked or zero-padded), one dtype
    ranks = {p: mw.rank for p, mw in adapter.modules.items()}
    header_meta = read_header(data, init["limits"].max_header_bytes)[1]
    nbytes = sum(t.numel() * t.element_size() for t in groups)
    dtype = str(groups[0].dtype).removeprefix("torch.")
    return ("ok", nbytes, dtype, packed[1].rows, ranks, header_meta, need), groups


def worker_main() -> None:
    from adapters_store.backend import LocalDirBackend
    out = os.fdopen(os.dup(1), "wb")  # the replies; stray prints of any import go to stderr, not the pipe
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    torch.set_num_threads(1)
    init = pickle.load(inp)
    if init.get("nice"):
        os.nice(init["nice"])
    backend = LocalDirBackend(init["root"])
    pickle.dump(("ready",), out)
    out.flush()
    while True:
        try:
            key, digest, known = pickle.load(inp)
        except EOFError:  # the parent closed the pipe or died
            return
        try:
            reply, groups = load_packed(init, backend, key, digest, known)
        except Exception as e:  # noqa: BLE001 - one bad file must not end the worker; the thread path reports it
            reply, groups = ("fallback", f"{type(e).__name__}: {e}"), []
        pickle.dump(reply, out)
        for t in groups:
            out.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        out.flush()


# ---------------------------------------------------------------------------------------------- parent side
class _Worker:
    def __init__(self, init: dict) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen([sys.executable, "-m", "server.lora.load_process"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.inp, self.out = self.proc.stdin, self.proc.stdout
        pickle.dump(init, self.inp)
        self.inp.flush()
        self.ready = False
        self.dead = False

    def _readable(self, timeout: float) -> bool:
        return bool(select.select([self.out], [], [], timeout)[0])

    def poll_ready(self, timeout: float) -> bool:
        if not self.ready and not self.dead and self._readable(timeout):
            try:
                self.ready = pickle.load(self.out) == ("ready",)
            except (OSError, EOFError, ValueError, pickle.UnpicklingError) as e:  # it died starting
                log.warning("adapter loader process %d did not start (%s: %s); loading on threads",
                            self.proc.pid, type(e).__name__, e)
            if not self.ready:
                self.kill()
        return self.ready

    def request(self, key: str, digest: str, known: bool) -> tuple[tuple, torch.Tensor | None]:
        pickle.dump((key, digest, known), self.inp)
        self.inp.flush()
        if not self._readable(TIMEOUT_S):
            raise TimeoutError(f"the loader process answered nothing in {TIMEOUT_S} s")
        reply = pickle.load(self.out)
        if reply[0] != "ok":
            return reply, None
        flat = torch.empty(reply[1], dtype=torch.uint8)
        view, got = memoryview(flat.numpy()), 0
        while got < len(view):
            n = self.out.readinto(view[got:])
            if not n:
                raise EOFError("the loader process closed its pipe mid-reply")
            got += n
        return reply, flat

    def close(self) -> None:
        self.dead = True
        for f in (self.inp, self.out):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.close()


class LoaderProcesses:
    """``n`` worker processes, started at construction; ``load`` borrows an idle one (waits for one while
    all are busy: the loader threads are the queue)."""

    def __init__(self, n: int, init: dict) -> None:
        self.layout: Layout = init["layout"]
        self.spec: BaseSpec = init["spec"]
        self.limits = init["limits"]
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: list[_Worker] = []
        try:
            for _ in range(n):
                self._workers.append(_Worker(init))
        except BaseException:
            for w in self._workers:
                w.kill()
            raise
        for w in self._workers:
            self._idle.put(w)
        self._closed = threading.Event()
        self.served = 0  # loads answered by a worker (the rest fell back to the calling thread)

    def wait_ready(self, timeout: float) -> bool:
        """Block until every worker has started (tests, benchmarks); True when all have."""
        borrowed = [self._idle.get() for _ in self._workers]
        try:
            return all([w.poll_ready(timeout) for w in borrowed])
        finally:
            for w in borrowed:
                self._idle.put(w)

    def alive(self) -> bool:
        return not self._closed.is_set() and any(not w.dead for w in self._workers)

    def load(self, key: str, digest: str) -> tuple[CompiledAdapter, tuple[int, Packed]] | None:
        """(the adapter, its pool-ready (rank rows, packed form)), or None: load it on this thread instead."""
        if not self.alive():
            return None
        w = self._idle.get()
        try:
            if w.dead or self._closed.is_set() or not w.poll_ready(READY_POLL_S):
                return None
            try:
                reply, flat = w.request(key, digest, passed(digest, self.spec, self.limits))
            except (OSError, EOFError, TimeoutError, ValueError, pickle.UnpicklingError) as e:
                log.warning("adapter loader process %d failed (%s: %s); loading on threads from now on",
                            w.proc.pid, type(e).__name__, e)
                w.kill()
                return None
            if reply[0] != "ok" or flat is None:
                log.debug("loader process declined %s: %s", digest[:12], reply[1])
                return None
            _, _, dtype_name, rows, ranks, header_meta, need = reply
            packed = self._unflatten(flat, getattr(torch, dtype_name), rows, ranks)
            adapter = CompiledAdapter(AdapterMeta.from_header(header_meta), module_views(packed, self.layout, ranks))
            remember_passed(digest, self.spec, self.limits)  # checked there: a reload here parses only
            self.served += 1
            if self.served == 1:
                log.info("adapter loader processes serve cold loads (%d, pids %s)", len(self._workers),
                         ", ".join(str(x.proc.pid) for x in self._workers))
            return adapter, (need, packed)
        finally:
            self._idle.put(w)

    def _unflatten(self, flat: torch.Tensor, dtype: torch.dtype, rows: int, ranks: dict[str, int]) -> Packed:
        groups, at = [], 0
        for shape in packed_shapes(self.layout, rows):
            n = shape[0] * shape[1] * shape[2] * dtype.itemsize
            groups.append(flat[at:at + n].view(dtype).view(shape))
            at += n
        k = len(self.layout.a_groups)
        return Packed(rows, groups[:k], groups[k:], rank_table(self.layout, ranks))

    def close(self) -> None:
        self._closed.set()
        for w in self._workers:
            w.close()


if __name__ == "__main__":
    worker_main()
