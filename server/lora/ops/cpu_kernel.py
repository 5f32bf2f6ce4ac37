"""The low-rank op's fused CPU kernel (BGMV: per token, a gathered matrix-vector product), built at run time.

For each token i of the plan's row table, with its adapter's rank rows ``rows[i, :]`` in the module's flat
tables (``buffers.ModuleSlots``):

    h_j   = x[t_i] . A[rows[i, j]]            j < R (rows past the adapter's rank point to the zero row)
    y[t_i] += sum_j h_j * B^T[rows[i, j]]

in one C++ loop per module call: no gathered copy of any weight, no intermediate tensor, one Python call
instead of the four or more of the torch formulations (Punica's BGMV, written for one CPU thread; the
innermost loops are contiguous and vectorised by the compiler). fp32 only, no MoR routing (the op's
other formulations serve those). With many distinct adapters in a step the rows come from memory, not
cache (32 adapters x 28 modules of a hidden-256 model: 19 MB per step), so the loop is written for that:
four rank rows per pass (four independent sums share each load of x in the shrink; one pass over y per
four rows in the expand) and the start of the next token's rows prefetched while this one computes, when
they belong to another adapter (BENCHMARKS.md, "The hot path, fourth pass": the 28 module calls of a
32-adapter decode step 1.37 -> 1.06 ms, a 5-adapter one unchanged; ~1e-8 from the old loop's sums on
outputs of ~0.1, rounding).

The extension is compiled with torch's ``cpp_extension`` (g++ and ninja, both on the machine) on first use,
about 30 s, into a directory of torch's extension cache named after the source, torch, Python and the CPU
(``-march=native``) and torch's install path (its headers are in the build's command), then loaded from there in well under a second. Builds of several processes are
serialised by an ``flock`` (released by the kernel when its holder dies), and under it any lock file of
torch's own is one left by a process killed mid-build: it is removed, so it never blocks a build. ``start()``
builds it on a background thread so that nothing waits for it: until it is ready ``get()`` returns None
and the op keeps to its torch formulations. ``RANKSERVE_CPU_KERNEL=0`` turns it off; a failed build is
logged once and leaves the torch formulations in charge.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

log = logging.getLogger("rankserve.lora")

SOURCE = r"""
#include <torch/extension.h>
#include <pybind11/pybind11.h>

// y[t_i] += sum_j (x[t_i] . A[rows[i, j]]) * Bt[rows[i, j]]; t_i = tok[i], or i when tok is empty.
void bgmv_(const torch::Tensor& x, torch::Tensor& y, const torch::Tensor& a, const torch::Tensor& bt,
           const torch::Tensor& rows, const torch::Tensor& tok) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && y.scalar_type() == torch::kFloat &&
              a.scalar_type() == torch::kFloat && bt.scalar_type() == torch::kFloat, "bgmv_: fp32 only");
  TORCH_CHECK(rows.scalar_type() == torch::kLong && rows.dim() == 2 && rows.is_contiguous(), "bgmv_: rows [N, R] long");
  TORCH_CHECK(tok.scalar_type() == torch::kLong && tok.is_contiguous(), "bgmv_: tok long");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && a.stride(1) == 1 && bt.stride(1) == 1, "bgmv_: unit inner stride");
  const int64_t N = rows.size(0), R = rows.size(1), din = x.size(1), dout = y.size(1);
  TORCH_CHECK(a.size(1) == din && bt.size(1) == dout, "bgmv_: A/Bt widths");
  TORCH_CHECK(tok.numel() == 0 || tok.numel() == N, "bgmv_: tok must be empty or one per row");
  TORCH_CHECK(tok.numel() != 0 || N <= x.size(0), "bgmv_: more rows than tokens");
  TORCH_CHECK(R <= 1024, "bgmv_: over 1024 rank rows");
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const float* A = a.data_ptr<float>();
  const float* B = bt.data_ptr<float>();
  const int64_t* RW = rows.data_ptr<int64_t>();
  const int64_t* TK = tok.numel() ? tok.data_ptr<int64_t>() : nullptr;
  const int64_t xs = x.stride(0), ys = y.stride(0), as = a.stride(0), bs = bt.stride(0);
  const int64_t T = x.size(0), ra = a.size(0), rb = bt.size(0);
  for (int64_t i = 0; i < N * R; ++i) TORCH_CHECK(RW[i] >= 0 && RW[i] < ra && RW[i] < rb, "bgmv_: row out of range");
  for (int64_t i = 0; TK && i < N; ++i) TORCH_CHECK(TK[i] >= 0 && TK[i] < T, "bgmv_: token out of range");
  std::vector<float> h(R + 4, 0.f);
  {
    pybind11::gil_scoped_release no_gil;  // pure C++ from here: other Python threads run meanwhile
    for (int64_t i = 0; i < N; ++i) {
      const int64_t t = TK ? TK[i] : i;
      const float* xt = X + t * xs;
      const int64_t* ri = RW + i * R;
      const int64_t* rn = RW + (i + 1) * R;
      if (R > 0 && i + 1 < N && rn[0] != ri[0]) {  // another adapter next: its rows stream in while this token computes
        for (int64_t j = 0; j < R; ++j) {
          // each row's first two lines: the hardware prefetcher follows a row once it is started, and
          // whole-row prefetches cost more than they save when the rows are already cached
          const char* an = reinterpret_cast<const char*>(A + rn[j] * as);
          const char* bn = reinterpret_cast<const char*>(B + rn[j] * bs);
          __builtin_prefetch(an, 0, 1); __builtin_prefetch(an + 64, 0, 1);
          __builtin_prefetch(bn, 0, 1); __builtin_prefetch(bn + 64, 0, 1);
        }
      }
      // shrink, four rows at a time: four independent sums share each load of x
      int64_t j = 0;
      for (; j + 4 <= R; j += 4) {
        const float *a0 = A + ri[j] * as, *a1 = A + ri[j + 1] * as, *a2 = A + ri[j + 2] * as, *a3 = A + ri[j + 3] * as;
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t k = 0; k < din; ++k) {
          const float xk = xt[k];
          s0 += xk * a0[k]; s1 += xk * a1[k]; s2 += xk * a2[k]; s3 += xk * a3[k];
        }
        h[j] = s0; h[j + 1] = s1; h[j + 2] = s2; h[j + 3] = s3;
      }
      for (; j < R; ++j) {
        const float* ar = A + ri[j] * as;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < din; ++k) acc += xt[k] * ar[k];
        h[j] = acc;
      }
      // expand, four rows per pass over y; blocks whose h are all zero (padding rows) are skipped
      float* yt = Y + t * ys;
      j = 0;
      for (; j + 4 <= R; j += 4) {
        const float h0 = h[j], h1 = h[j + 1], h2 = h[j + 2], h3 = h[j + 3];
        if (h0 == 0.f && h1 == 0.f && h2 == 0.f && h3 == 0.f) continue;
        const float *b0 = B + ri[j] * bs, *b1 = B + ri[j + 1] * bs, *b2 = B + ri[j + 2] * bs, *b3 = B + ri[j + 3] * bs;
#pragma omp simd
        for (int64_t k = 0; k < dout; ++k) yt[k] += h0 * b0[k] + h1 * b1[k] + h2 * b2[k] + h3 * b3[k];
      }
      for (; j < R; ++j) {
        const float hj = h[j];
        if (hj == 0.f) continue;
        const float* br = B + ri[j] * bs;
#pragma omp simd
        for (int64_t k = 0; k < dout; ++k) yt[k] += hj * br[k];
      }
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("bgmv_", &bgmv_, "fused gathered low-rank correction, in place"); }
"""

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module" once built, "error" if the build failed, "thread" while building


def enabled() -> bool:
    return os.environ.get("RANKSERVE_CPU_KERNEL", "1") not in ("0", "false", "no")


def build_directory() -> Path:
    import torch

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    # torch's install path too: ninja rebuilds when a build's include paths change, so two environments
    # (a clone's own venv beside another) sharing one directory would rebuild on every switch
    tag = hashlib.sha256(f"{SOURCE}|{torch.__version__}|{Path(torch.__file__).resolve().parent}|{platform.python_version()}|"
                         f"{platform.machine()}|{_cpu_model()}".encode()).hexdigest()[:16]
    return root / f"rankserve_bgmv_{tag}"


def _cpu_model() -> str:
    """The CPU's model and instruction-set flags (``-march=native`` code runs only where they match)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    model = next((ln for ln in lines if ln.startswith("model name")), "")
    flags = next((ln for ln in lines if ln.startswith("flags")), "")
    return f"{model}|{flags}"


def _build() -> None:
    try:
        from torch.utils.cpp_extension import load_inline

        where = build_directory()
        where.mkdir(parents=True, exist_ok=True)
        with open(where / "rankserve.flock", "a+") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # one builder at a time; a dead holder's lock is released
            stale = where / "lock"  # torch's FileBaton: nobody else is building, so it is a dead process's
            if stale.exists():
                log.warning("removing %s, left by a process that died while building", stale)
                stale.unlink(missing_ok=True)
            module = load_inline(name="rankserve_bgmv", cpp_sources=SOURCE, build_directory=str(where),
                                 extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)
        _state["module"] = module
        log.info("fused CPU low-rank kernel ready")
    except Exception as e:  # no compiler, no ninja, no headers: the torch formulations serve
        _state["error"] = f"{type(e).__name__}: {e}"
        log.warning("fused CPU low-rank kernel unavailable (%s); the torch formulations serve", _state["error"])


def start() -> None:
    """Build (or load from torch's cache) on a background thread, once per process."""
    if not enabled():
        return
    with _lock:
        if "thread" in _state or "module" in _state or "error" in _state:
            return
        thread = threading.Thread(target=_build, name="rankserve-kernel-build", daemon=True)
        _state["thread"] = thread
        thread.start()


def get(wait: bool = False):
    """The compiled module, or None (not ready yet, disabled, or failed). ``wait``: block until the build
    ends (tests, benchmarks, a forced strategy)."""
    module = _state.get("module")
    if module is not None or not wait:
        return module
    start()
    thread = _state.get("thread")
    if isinstance(thread, threading.Thread):
        thread.join()
    return _state.get("module")


def error() -> str | None:
    """Why the kernel is unavailable, once its build has failed."""
    err = _state.get("error")
    return None if err is None else str(err)
