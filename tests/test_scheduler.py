"""Scheduler policy with fake KV space and residency: budget, chunking, fairness, faults, bounded waits."""

import pytest

from server.common.errors import AdapterLoadFailed, QueueFull, Unavailable
from server.engine.request import Request
from server.engine.scheduler import Scheduler
from server.engine.tokens import TokenState
from server.lora.residency import AdapterBusy, AdapterLoading


class FakeKV:
    """A cache whose blocks hold one token each."""

    def __init__(self, tokens=10_000):
        self.free_tokens = tokens
        self.live = {}
        self.next = 0

    def can_allocate(self, n, spare_blocks=0):
        return n + spare_blocks <= self.free_tokens

    def allocate(self, n):
        self.free_tokens -= n
        self.next += 1
        self.live[self.next] = n
        return self.next

    def grow(self, seq, n):
        need = n - self.live[seq]
        if need > self.free_tokens:
            return False
        if need > 0:
            self.free_tokens -= need
            self.live[seq] = n
        return True

    def free(self, seq):
        self.free_tokens += self.live.pop(seq)


class FakeResidency:
    def __init__(self, slots=100, broken=()):
        self.slots = slots
        self.pins = {}
        self.broken = set(broken)
        self.loads = []

    def acquire(self, req):
        if req.key in self.broken:
            raise AdapterLoadFailed(f"adapter {req.key} is corrupt")
        if req.key is None:
            return -1
        if req.key not in self.pins and len(self.pins) >= self.slots:
            raise AdapterBusy()
        self.loads.append(req.key)
        self.pins[req.key] = self.pins.get(req.key, 0) + 1
        return 0

    def release(self, req):
        if req.key is None:
            return
        self.pins[req.key] -= 1
        assert self.pins[req.key] >= 0
        if not self.pins[req.key]:
            del self.pins[req.key]


def req(i, key=None, prompt=4, max_tokens=4):
    return Request(f"r{i}", key, TokenState(list(range(prompt))), max_tokens)


def make(**kw):
    res = kw.pop("residency", FakeResidency())
    kv = kw.pop("kv", FakeKV())
    opts = dict(max_batch_tokens=64, max_running=8, max_queue=100)
    opts.update(kw)
    return Scheduler(res, kv, **opts), res, kv


def advance(batch):
    """What the engine does after a step: computed tokens advance, a finished prompt yields a token."""
    for r, n in batch.chunks:
        r.num_computed += n
        if r.num_computed == r.num_tokens:
            r.tokens.append(0)


def test_chunked_prefill_under_token_budget_with_decodes_first():
    s, _, _ = make(max_batch_tokens=8)
    a, b = req(0, prompt=3), req(1, prompt=20)
    s.add(a)
    s.add(b)
    b1 = s.schedule()
    assert [(r.request_id, n) for r, n in b1.chunks] == [("r0", 3), ("r1", 5)]
    advance(b1)
    b2 = s.schedule()
    assert [(r.request_id, n) for r, n in b2.chunks] == [("r0", 1), ("r1", 7)]  # decode first, then chunk
    advance(b2)
    b3 = s.schedule()
    assert [(r.request_id, n) for r, n in b3.chunks] == [("r0", 1), ("r1", 7)]
    advance(b3)
    assert [(r.request_id, n) for r, n in s.schedule().chunks] == [("r0", 1), ("r1", 1)]


def test_max_running_and_queue_bound():
    s, _, _ = make(max_running=2, max_queue=3)
    for i in range(3):
        s.add(req(i))
    with pytest.raises(QueueFull) as e:
        s.add(req(9))
    assert e.value.retry_after >= 1 and e.value.http_status == 429
    assert len(s.schedule().chunks) == 2 and s.num_running == 2 and s.num_waiting == 1
    s.add(req(10))  # room again in the queue: 2 waiting of 3
    s.add(req(11))
    with pytest.raises(QueueFull):
        s.check_capacity()


def test_round_robin_over_adapters_so_a_hot_adapter_cannot_starve_cold_ones():
    s, _, _ = make(max_running=1)
    for i in range(10):
        s.add(req(i, key="hot"))
    for i, k in enumerate(["c1", "c2", "c3"]):
        s.add(req(100 + i, key=k))
    admitted = []
    for _ in range(8):
        batch = s.schedule()
        (r, _n), = batch.chunks
        admitted.append(r.key)
        s.finish(r)
    assert admitted[:4] == ["hot", "c1", "c2", "c3"]
    assert admitted[4:] == ["hot"] * 4


def test_round_robin_rotation_persists_across_steps():
    s, _, _ = make(max_running=2)
    for i in range(3):
        s.add(req(i, key="a"))
        s.add(req(10 + i, key="b"))
    first = [r.key for r, _ in s.schedule().chunks]
    assert sorted(first) == ["a", "b"]


def test_corrupt_adapter_fails_only_its_requests():
    res = FakeResidency(broken={"bad"})
    s, _, kv = make(residency=res)
    s.add(req(0, key="bad"))
    s.add(req(1, key="good"))
    s.add(req(2, key="bad"))
    s.add(req(3))
    batch = s.schedule()
    assert sorted(r.request_id for r, _ in batch.failed) == ["r0", "r2"]
    assert all(isinstance(e, AdapterLoadFailed) for _, e in batch.failed)
    assert sorted(r.request_id for r, _ in batch.chunks) == ["r1", "r3"]
    assert s.num_waiting == 0


def test_busy_pool_waits_in_place_then_times_out():
    now = [0.0]
    res = FakeResidency(slots=1)
    s, _, _ = make(residency=res, slot_wait_s=5.0, clock=lambda: now[0])
    s.add(req(0, key="a"))
    s.add(req(1, key="b"))
    s.add(req(2))  # base requests need no slot and are not held up by "b"
    batch = s.schedule()
    assert sorted(r.request_id for r, _ in batch.chunks) == ["r0", "r2"] and s.num_waiting == 1
    now[0] = 3.0
    assert not s.schedule().failed
    a = next(r for r in s.running if r.key == "a")
    s.finish(a)  # the slot frees: "b" is admitted at the next step
    assert [r.request_id for r, _ in s.schedule().chunks if r.request_id == "r1"] == ["r1"]
    s.add(req(3, key="c"))
    s.schedule()
    now[0] = 20.0
    batch = s.schedule()
    assert [(r.request_id, type(e)) for r, e in batch.failed] == [("r3", Unavailable)]


def test_a_load_in_flight_waits_in_place_without_the_slot_wait_limit():
    now = [0.0]
    res = FakeResidency()
    loading = {"a"}
    plain = res.acquire

    def acquire(r):
        if r.key in loading:
            raise AdapterLoading()
        return plain(r)

    res.acquire = acquire
    s, _, _ = make(residency=res, slot_wait_s=5.0, clock=lambda: now[0])
    s.add(req(0, key="a"))
    s.add(req(1, key="b"))
    batch = s.schedule()
    assert [r.request_id for r, _ in batch.chunks] == ["r1"] and s.num_waiting == 1  # "b" is not held up
    now[0] = 60.0  # far past the slot wait: a slow read is not a full pool
    batch = s.schedule()
    assert not batch.failed and s.num_waiting == 1
    loading.clear()  # the read finished
    assert [r.request_id for r, _ in s.schedule().chunks if r.request_id == "r0"] == ["r0"]


def test_kv_space_gates_admission_and_finish_releases_everything():
    res = FakeResidency()
    kv = FakeKV(tokens=10)
    s, _, _ = make(residency=res, kv=kv)
    s.add(req(0, key="a", prompt=6))
    s.add(req(1, key="a", prompt=6))
    assert len(s.schedule().chunks) == 1 and s.num_waiting == 1  # 6 of 10 taken, 6 more do not fit
    r0 = s.running[0]
    s.finish(r0)
    s.finish(r0)  # idempotent: no double release
    assert kv.free_tokens == 10 and res.pins == {} and s.num_running == 0
    assert len(s.schedule().chunks) == 1
    s.finish(s.running[0])
    assert kv.free_tokens == 10 and res.pins == {}


def test_full_cache_preempts_the_newest_which_recomputes_later():
    res = FakeResidency()
    kv = FakeKV(tokens=12)
    s, _, _ = make(residency=res, kv=kv, max_batch_tokens=64)
    old, new = req(0, key="a", prompt=5), req(1, key="b", prompt=5)
    s.add(old)
    s.add(new)
    batch = s.schedule()  # 5 + 5 taken, 2 free (one spare block per running request)
    assert [r.request_id for r, _ in batch.chunks] == ["r0", "r1"]
    advance(batch)  # both sampled a token: 6 known tokens each, 5 computed
    advance(s.schedule())  # decode: 6 + 6 = 12 taken
    assert kv.free_tokens == 0
    batch = s.schedule()  # both need a 7th position: the newest yields
    assert batch.preempted == [new] and [r for r, _ in batch.chunks] == [old]
    assert new.seq == -1 and new.num_computed == 0 and new.preemptions == 1 and res.pins == {"a": 1}
    assert s.num_waiting == 1 and new.num_tokens == 7
    advance(batch)
    s.finish(old)
    batch = s.schedule()  # readmitted: prompt + generated tokens recomputed in one chunk
    assert [(r.request_id, n) for r, n in batch.chunks] == [("r1", 7)] and res.pins == {"b": 1}


def test_a_lone_request_preempts_nobody_but_itself():
    kv = FakeKV(tokens=6)
    s, _, _ = make(kv=kv)
    r = req(0, prompt=6)
    s.add(r)
    advance(s.schedule())
    batch = s.schedule()  # needs a 7th position in a 6-token cache: it yields to nobody but itself
    assert batch.preempted == [r] and batch.chunks == [] and s.num_waiting == 1


def test_remove_waiting():
    s, _, _ = make()
    r = req(0, key="x")
    s.add(r)
    assert s.remove_waiting(r) and s.num_waiting == 0
    assert not s.remove_waiting(r)
    assert s.schedule().chunks == []
