"""The fused CPU kernel's build: a lock left by a process killed mid-build never blocks later builds, and
the kernel can be switched off. (Its results are held to the reference in test_ops.py, backend
"torch-bgmv".)"""

from __future__ import annotations

import pytest
import torch

from server.lora.ops import cpu_kernel
from tests.test_ops import HAS_TOOLCHAIN


@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="no g++/ninja: the torch formulations serve")
def test_a_lock_left_by_a_dead_builder_never_blocks_and_the_kernel_loads(monkeypatch):
    assert cpu_kernel.get(wait=True) is not None, cpu_kernel.error()  # built (or loaded) once for the suite
    lock = cpu_kernel.build_directory() / "lock"  # what torch's FileBaton leaves when its process is killed
    lock.write_text("")
    monkeypatch.setattr(cpu_kernel, "_state", {})  # a fresh process's view
    cpu_kernel._build()
    assert cpu_kernel._state.get("module") is not None, cpu_kernel._state.get("error")
    assert not lock.exists()
    x, y = torch.randn(2, 4), torch.zeros(2, 3)
    a, bt = torch.randn(3, 4), torch.randn(3, 3)
    rows = torch.tensor([[0, 1], [2, 2]])
    cpu_kernel._state["module"].bgmv_(x, y, a, bt, rows, torch.empty(0, dtype=torch.long))
    want = torch.stack([(x[0] @ a[0]) * bt[0] + (x[0] @ a[1]) * bt[1], 2 * (x[1] @ a[2]) * bt[2]])
    torch.testing.assert_close(y, want)
    with pytest.raises(RuntimeError, match="row out of range"):  # never reads past the tables
        cpu_kernel._state["module"].bgmv_(x, y, a, bt, torch.tensor([[0, 3]]), torch.empty(0, dtype=torch.long))


def test_switched_off_it_never_builds(monkeypatch):
    monkeypatch.setenv("RANKSERVE_CPU_KERNEL", "0")
    monkeypatch.setattr(cpu_kernel, "_state", {})
    cpu_kernel.start()
    assert cpu_kernel._state == {} and cpu_kernel.get() is None


@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="no g++/ninja: the torch formulations serve")
@pytest.mark.parametrize("R", [0, 1, 3, 4, 5, 8, 9, 16])
def test_the_kernel_equals_a_plain_loop(R):
    """Every path of the loop: rank rows in blocks of four and the tail, blocks of padding (the zero row),
    a token table and the identity one, consecutive tokens on one adapter and on different ones."""
    kernel = cpu_kernel.get(wait=True)
    assert kernel is not None, cpu_kernel.error()
    g = torch.Generator().manual_seed(R)
    din, dout, slots, N = 37, 29, 5, 23
    a = torch.randn(slots * max(R, 1) + 1, din, generator=g)
    bt = torch.randn(slots * max(R, 1) + 1, dout, generator=g)
    zero = a.shape[0] - 1
    a[zero], bt[zero] = 0, 0
    slot_of = torch.randint(0, slots, (N,), generator=g)
    slot_of[5:9] = slot_of[4]  # a run of tokens on one adapter
    ranks = torch.randint(0, R + 1, (slots,), generator=g)
    rows = torch.full((N, R), zero, dtype=torch.long)
    for i in range(N):
        s, r = int(slot_of[i]), int(ranks[slot_of[i]])
        rows[i, :r] = torch.arange(s * R, s * R + r)
    for tok in (torch.empty(0, dtype=torch.long), torch.randperm(N + 4, generator=g)[:N]):
        x = torch.randn(N + 4, din, generator=g)
        y = torch.randn(N + 4, dout, generator=g)
        want = y.clone()
        for i in range(N):
            t = int(tok[i]) if tok.numel() else i
            for j in range(R):
                want[t] += (x[t] @ a[rows[i, j]]) * bt[rows[i, j]]
        kernel.bgmv_(x, y, a, bt, rows, tok)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
