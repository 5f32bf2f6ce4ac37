"""Every check a compiled adapter must pass before it is stored or served; all problems in one error.

Like vLLM's adapter config validation, nothing stops at the first problem: ``AdapterFormatError.problems``
lists each offending tensor with what was expected and what was found, or the cap that was exceeded,
so a user fixes the file in one round trip. Order of work in :func:`validate_bytes`: the size cap
first (nothing parsed), then the container (``format.read_header`` refuses lying lengths and bad
offsets before anything is allocated), then tensors and metadata against the base model.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters_store import mor_form
from adapters_store.basemodels import BaseModel
from adapters_store.format import (
    AdapterFormatError,
    AdapterMeta,
    CompiledAdapter,
    ModuleWeights,
    from_state_dict,
    load_tensors,
    read_header,
)

FINITE_CHUNK = 1 << 18  # elements per finiteness check: small temporaries, reused (not retained) by malloc


@dataclass(frozen=True)
class Limits:
    """Caps on what an adapter may be; the defaults suit models up to a few billion parameters."""

    max_file_bytes: int = 256 << 20
    max_header_bytes: int = 1 << 20
    max_rank: int = 256
    max_experts: int = 16
    allowed_dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")


class PickleRefused(AdapterFormatError):
    """A pickle or zip (torch.save) payload: refused by name or magic bytes, never deserialised."""

    http_status = 415


# File names refused unopened wherever adapters come in (uploads, PEFT directories): pickles and archives
# (torch.save, joblib), and formats that are not an adapter (numpy, HDF5, GGUF).
REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".zip", ".tar", ".gz", ".npy", ".npz",
                    ".h5", ".joblib", ".gguf")


def sniff_refused(head: bytes) -> str | None:
    """What a payload is, from its first bytes, if it must be refused unopened: a zip archive (torch.save) or
    a pickle (protocol 2-5). A safetensors file's JSON header starts at byte 8, which tells it apart from a
    pickle whose first two bytes happen to match its little-endian header length (0x2_80 begins with the
    pickle opcode 0x80)."""
    if head[8:9] == b"{":
        return None
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save)"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle"
    return None


def looks_pickled(data: bytes | str | Path) -> bool:
    """sniff_refused on the first bytes of ``data``, or of the file it names."""
    if not isinstance(data, bytes):
        with open(data, "rb") as f:
            data = f.read(16)
    return sniff_refused(data[:16]) is not None


def count_nonfinite(t: torch.Tensor) -> int:
    """NaN/Inf values in ``t``, looked at in chunks so the check never allocates a tensor-sized mask. A
    chunk whose sum is finite holds none (a NaN or an infinity makes the sum NaN or infinite), so the
    common case costs one reduction per chunk; only a non-finite sum (or an overflow) counts the values."""
    flat = t.reshape(-1)
    bad = 0
    for i in range(0, flat.numel(), FINITE_CHUNK):
        part = flat[i:i + FINITE_CHUNK]
        if not math.isfinite(float(part.sum())):
            bad += int((~torch.isfinite(part)).sum())
    return bad


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check_tensor(name: str, t: torch.Tensor, limits: Limits, problems: list[str]) -> None:
    """dtype allowlist, then finiteness (safetensors itself never looks at the values)."""
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in limits.allowed_dtypes:
        problems.append(f"{name}: dtype {dtype} is not allowed (allowed: {', '.join(limits.allowed_dtypes)})")
        return
    bad = count_nonfinite(t)
    if bad:
        problems.append(f"{name}: {bad} of {t.numel()} values are NaN or Inf")


def _check_module(path: str, mw: ModuleWeights, base: BaseModel | None, limits: Limits,
                  problems: list[str]) -> None:
    for key, t in mw.tensors().items():
        _check_tensor(f"{path}.{key}", t, limits, problems)
    if mw.lora_a.dim() != 2:
        problems.append(f"{path}.lora_a: expected 2 dimensions [r, d_in], got shape {_shape(mw.lora_a)}")
        return
    r = mw.rank
    if r > limits.max_rank:
        problems.append(f"{path}: rank {r} exceeds the maximum rank {limits.max_rank}")
    n = mw.num_experts
    if n > limits.max_experts:
        problems.append(f"{path}: {n} experts exceed the maximum of {limits.max_experts}")
    if base is None:
        return
    if path not in base.targets:
        sample = ", ".join(sorted(base.targets)[:3])
        problems.append(f"{path}: not a target module of base {base.name!r} (targets look like {sample}, ...)")
        return
    d_in, d_out = base.targets[path]
    compact = mw.expert_out_scale is not None  # MoR's compact form: the shared B, expanded once read
    expected: dict[str, list[int] | None] = {
        "lora_a": [r, d_in],
        "lora_b": [d_out, n * r] if mw.gate is not None and not compact else [d_out, r],
        "out_scale": [d_out],
        "gate": [n, d_in],
        "rank_scale": [n, r],
        mor_form.KEY: [n, d_out],
    }
    for key, t in mw.tensors().items():
        want = expected[key]
        if _shape(t) != want:
            problems.append(f"{path}.{key}: shape {_shape(t)}, expected {want} (r={r}, d_in={d_in}, d_out={d_out}"
                            + (f", experts={n})" if mw.gate is not None else ")"))


def _check_meta(adapter: CompiledAdapter, base: BaseModel | None, limits: Limits, problems: list[str]) -> None:
    meta = adapter.meta
    if base is not None:
        if meta.base_fingerprint != base.fingerprint:
            problems.append(f"metadata base_fingerprint {meta.base_fingerprint!r} does not match base "
                            f"{base.name!r} (fingerprint {base.fingerprint!r}): out_scale and shapes are only valid "
                            "against the weights the adapter was built on")
        if meta.task not in base.tasks:
            problems.append(f"metadata task {meta.task!r}: base {base.name!r} supports only {list(base.tasks)}")
    has_head = adapter.head_weight is not None or adapter.head_bias is not None
    if meta.task == "generate" and has_head:
        problems.append("head.weight/head.bias present on a generate adapter (only classify adapters carry a head)")
    if meta.task == "classify":
        labels = meta.labels or []
        if not labels:
            problems.append("metadata labels: a classify adapter needs a non-empty list of labels")
        if adapter.head_weight is None:
            problems.append("head.weight: missing, a classify adapter needs its head")
        else:
            _check_tensor("head.weight", adapter.head_weight, limits, problems)
            hidden = base.hidden_size if base is not None else adapter.head_weight.shape[-1]
            if labels and _shape(adapter.head_weight) != [len(labels), hidden]:
                problems.append(f"head.weight: shape {_shape(adapter.head_weight)}, expected "
                                f"[{len(labels)}, {hidden}] (labels x hidden size)")
        if adapter.head_bias is not None:
            _check_tensor("head.bias", adapter.head_bias, limits, problems)
            if labels and _shape(adapter.head_bias) != [len(labels)]:
                problems.append(f"head.bias: shape {_shape(adapter.head_bias)}, expected [{len(labels)}] (labels)")
    has_gate = [p for p, mw in adapter.modules.items() if mw.gate is not None]
    if meta.method == "mor" and len(has_gate) != len(adapter.modules):
        missing = sorted(set(adapter.modules) - set(has_gate))
        problems.append(f"metadata method 'mor' but modules lack gate/rank_scale: {', '.join(missing[:5])}")
    if meta.method != "mor" and has_gate:
        problems.append(f"metadata method {meta.method!r} but MoR gate tensors are present: {', '.join(sorted(has_gate)[:5])}")
    if meta.ranks:
        actual = {p: mw.rank for p, mw in adapter.modules.items()}
        for p in sorted(set(meta.ranks) | set(actual)):
            want, got = meta.ranks.get(p), actual.get(p)
            if want != got and not (want == 0 and got is None):
                problems.append(f"metadata ranks[{p!r}] is {want}, but the tensors have rank {got}")


def check(adapter: CompiledAdapter, base: BaseModel | None, limits: Limits) -> list[str]:
    """Every problem with an in-memory adapter; base None checks only what needs no base model."""
    problems: list[str] = []
    for path, mw in sorted(adapter.modules.items()):
        _check_module(path, mw, base, limits, problems)
    _check_meta(adapter, base, limits, problems)
    _check_expansion(adapter, limits, problems)
    return problems


def _check_expansion(adapter: CompiledAdapter, limits: Limits, problems: list[str]) -> None:
    """The file-size cap also bounds what a compact MoR file becomes in memory once B' is expanded (up to N
    times its lora_b), exactly as it bounds an expanded file."""
    compact = {p: mw for p, mw in adapter.modules.items() if mw.expert_out_scale is not None}
    if not compact:
        return
    grown = sum((mor_form.expanded_numel(mw.lora_b, mw.expert_out_scale) - mw.lora_b.numel()
                 - mw.expert_out_scale.numel()) * mw.lora_b.element_size() for mw in compact.values())
    total = adapter.num_bytes() + grown
    if total > limits.max_file_bytes:
        problems.append(f"{sorted(compact)[0]}.{mor_form.KEY}: MoR's compact form expands to {total} bytes in "
                        f"serving form (B' [d_out, N*r] per module), over the cap of {limits.max_file_bytes} bytes")


def validate(adapter: CompiledAdapter, base: BaseModel | None, limits: Limits | None = None) -> None:
    """Raise one AdapterFormatError listing every problem of ``adapter`` against ``base``."""
    problems = check(adapter, base, limits or Limits())
    if problems:
        raise AdapterFormatError(problems)


def validate_bytes(data: bytes | str | Path, base: BaseModel | None, limits: Limits | None = None,
                   digest: str | None = None) -> CompiledAdapter:
    """A compiled adapter's bytes, or its file, -> CompiledAdapter, or one AdapterFormatError listing every
    problem. A file is read in place (load_tensors maps it): validating N bytes takes about N of memory, plus
    the expanded B' of a compact MoR file, which the file-size cap bounds too.

    ``digest``: the bytes' sha256, already checked by the caller. Bytes with a digest that passed every
    check against this base and these limits earlier in this process (an upload, then its reloads after
    eviction) skip the per-value checks: the container checks and the parse still run."""
    limits = limits or Limits()
    size = len(data) if isinstance(data, bytes) else Path(data).stat().st_size
    if size > limits.max_file_bytes:
        raise AdapterFormatError(f"file is {size} bytes, over the cap of {limits.max_file_bytes} bytes")
    if looks_pickled(data):
        raise PickleRefused("the file is a pickle/zip payload (torch.save?), not safetensors; refused, never opened")
    entries, header_meta = read_header(data, limits.max_header_bytes)  # container checks; raises on its own
    if digest is not None and passed(digest, base, limits):
        return from_state_dict(load_tensors(data, entries), AdapterMeta.from_header(header_meta))
    adapter = _validated(header_meta, lambda: load_tensors(data, entries), base, limits)
    if digest is not None:
        remember_passed(digest, base, limits)
    return adapter


def _passed_key(digest: str, base: BaseModel | None, limits: Limits) -> tuple:
    return digest, None if base is None else (base.name, base.fingerprint), limits


def passed(digest: str, base: BaseModel | None, limits: Limits) -> bool:
    """Whether bytes with this sha256 passed every check against this base and these limits in this process
    (then ``validate_bytes`` skips the per-value checks of a reload)."""
    key = _passed_key(digest, base, limits)
    with _PASSED_LOCK:
        if key not in _PASSED:
            return False
        _PASSED.move_to_end(key)
        return True


def remember_passed(digest: str, base: BaseModel | None, limits: Limits) -> None:
    """Record that bytes with this sha256 passed every check (here, or in this server's loader process)."""
    with _PASSED_LOCK:
        _PASSED[_passed_key(digest, base, limits)] = None
        while len(_PASSED) > PASSED_MAX:
            _PASSED.popitem(last=False)


PASSED_MAX = 1 << 16  # digests remembered as validated (a few MB)
_PASSED: OrderedDict[tuple, None] = OrderedDict()  # (sha256, base, limits) that passed, oldest first
_PASSED_LOCK = threading.Lock()  # loader threads and upload handlers validate concurrently


def _validated(header_meta: dict[str, str], load_tensors: Callable[[], dict[str, torch.Tensor]],
               base: BaseModel | None, limits: Limits) -> CompiledAdapter:
    """Metadata, then the tensors (loaded only now that the container passed read_header) against the base."""
    problems: list[str] = []
    try:
        meta: AdapterMeta | None = AdapterMeta.from_header(header_meta)
    except AdapterFormatError as e:
        problems.extend(e.problems)
        meta = None
    try:
        sd = load_tensors()
    except Exception as e:  # safetensors raises its own error types
        raise AdapterFormatError(problems + [f"safetensors could not read the file: {e}"]) from None
    # With broken metadata the tensors are still checked (so one error lists everything) under a
    # stand-in meta whose own checks are skipped.
    stand_in = AdapterMeta(method="lora", task="generate", base_model="", base_fingerprint="")
    try:
        adapter = from_state_dict(sd, meta or stand_in, expand=False)  # MoR's compact form: expanded once checked
    except AdapterFormatError as e:
        raise AdapterFormatError(problems + e.problems) from None
    if meta is None:
        for path, mw in sorted(adapter.modules.items()):
            _check_module(path, mw, base, limits, problems)
    else:
        problems.extend(check(adapter, base, limits))
    if problems:
        raise AdapterFormatError(problems)
    return adapter.expanded()
