"""The compiled adapter: one safetensors file, the serving form shared by every method.

Contract (DESIGN.md section 2). Per adapted linear module ``M`` (the base model's own module name):

    M.lora_a      [r, d_in]              down-projection (r may be 0: module omitted)
    M.lora_b      [d_out, r] | [d_out, N*r]  up-projection, the method's scale already folded in
    M.out_scale   [d_out]                optional per-output scale g (DoRA, EDoRA)
    M.gate        [N, d_in]              optional, MoR router weights
    M.rank_scale  [N, r]                 optional, MoR per-expert rank-wise scaling
    M.expert_out_scale [N, d_out]        optional, MoR only (with gate and rank_scale): the compact form,
                                         lora_b then [d_out, r]; B'[:, i*r:(i+1)*r] = diag(row i) lora_b
    head.weight   [num_labels, d_model]  classify adapters only
    head.bias     [num_labels]

MoR's compact form (``adapters_store.mor_form``) is an extension of format_version "1": every file
without ``expert_out_scale`` means what it always meant, and a reader older than the extension refuses a
compact file (its unknown-tensor rule names ``M.expert_out_scale``), so it is never misread. Reading
expands it (:func:`from_state_dict`): every CompiledAdapter read from bytes holds B' [d_out, N*r] and no
``expert_out_scale``, so nothing past the loader knows the compact form. One built in memory (the
trainer's) may be compact: :meth:`CompiledAdapter.expanded` gives the serving form.

Metadata (``__metadata__``, strings only) is :class:`AdapterMeta`. The forward semantics live in
:mod:`adapters_store.semantics`; this module only moves tensors between memory and bytes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load
from safetensors.torch import load_file as _map_file

from adapters_store import mor_form

FORMAT_VERSION = "1"
METHODS = ("lora", "dora", "adalora", "aroma", "mor", "edora")
TASKS = ("generate", "classify")
POOLINGS = ("last", "first", "mean")
MODULE_KEYS = ("lora_a", "lora_b", "out_scale", "gate", "rank_scale", mor_form.KEY)
HEAD_KEYS = ("head.weight", "head.bias")


class AdapterFormatError(ValueError):
    """A compiled adapter that cannot be read or does not fit; ``problems`` lists every reason."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


@dataclass
class ModuleWeights:
    """One adapted linear module in serving form (see the module docstring for shapes)."""

    lora_a: torch.Tensor  # [r, d_in]
    lora_b: torch.Tensor  # [d_out, r] or [d_out, N*r]
    out_scale: torch.Tensor | None = None  # [d_out]
    gate: torch.Tensor | None = None  # [N, d_in]
    rank_scale: torch.Tensor | None = None  # [N, r]
    expert_out_scale: torch.Tensor | None = None  # [N, d_out]: MoR's compact form, lora_b then [d_out, r]

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def num_experts(self) -> int:
        return 0 if self.gate is None else int(self.gate.shape[0])

    @property
    def effective_rank(self) -> int:
        """Columns of the serving lora_b: r, or N*r for MoR (what the up-projection costs per token)."""
        width = int(self.lora_b.shape[1])
        return width if self.expert_out_scale is None else self.num_experts * width

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in asdict_shallow(self).items() if v is not None}

    def expanded(self) -> ModuleWeights:
        """The serving form: MoR's compact lora_b and expert_out_scale become B' [d_out, N*r]
        (``mor_form.expert_up``); any other module is returned as it is."""
        if self.expert_out_scale is None:
            return self
        return replace(self, lora_b=mor_form.expert_up(self.lora_b, self.expert_out_scale), expert_out_scale=None)


def asdict_shallow(mw: ModuleWeights) -> dict[str, torch.Tensor | None]:
    return {k: getattr(mw, k) for k in MODULE_KEYS}


@dataclass
class AdapterMeta:
    method: str
    task: str
    base_model: str
    base_fingerprint: str
    labels: list[str] | None = None
    pooling: str | None = None  # classify only: last | first | mean
    ranks: dict[str, int] = field(default_factory=dict)
    trainable_params: int = 0
    created_at: float = field(default_factory=time.time)
    training: dict = field(default_factory=dict)
    format_version: str = FORMAT_VERSION

    def to_header(self) -> dict[str, str]:
        d = asdict(self)
        out: dict[str, str] = {}
        for k, v in d.items():
            if v is None:
                continue
            out[k] = v if isinstance(v, str) else json.dumps(v)
        return out

    @classmethod
    def from_header(cls, header: dict[str, str] | None) -> AdapterMeta:
        """Parse metadata strings; every missing or malformed field is reported at once."""
        header = header or {}
        problems: list[str] = []

        def text(key: str, required: bool = True) -> str | None:
            v = header.get(key)
            if v is None and required:
                problems.append(f"metadata field {key!r} is missing")
            return v

        def js(key: str, default):
            raw = header.get(key)
            if raw is None:
                return default
            try:
                return json_value(raw, f"metadata field {key!r}")
            except AdapterFormatError as e:
                problems.extend(e.problems)
                return default

        method, task = text("method"), text("task")
        if method is not None and method not in METHODS:
            problems.append(f"metadata field 'method' is {method!r}, expected one of {METHODS}")
        if task is not None and task not in TASKS:
            problems.append(f"metadata field 'task' is {task!r}, expected one of {TASKS}")
        version = header.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            problems.append(f"metadata field 'format_version' is {version!r}, this server reads {FORMAT_VERSION!r}")
        labels = js("labels", None)
        if labels is not None and not (isinstance(labels, list) and all(isinstance(s, str) for s in labels)):
            problems.append("metadata field 'labels' must be a JSON list of strings")
            labels = None
        ranks = js("ranks", {})
        if not isinstance(ranks, dict):
            problems.append("metadata field 'ranks' must be a JSON object")
            ranks = {}
        pooling = header.get("pooling")
        if pooling is not None and pooling not in POOLINGS:
            problems.append(f"metadata field 'pooling' is {pooling!r}, expected one of {POOLINGS}")
        try:
            trainable = int(header.get("trainable_params", "0"))
        except ValueError:
            problems.append("metadata field 'trainable_params' is not an integer")
            trainable = 0
        try:
            created = float(header.get("created_at", "0"))
        except ValueError:
            problems.append("metadata field 'created_at' is not a number")
            created = 0.0
        training = js("training", {})
        base_model = text("base_model")
        fingerprint = text("base_fingerprint")
        if problems:
            raise AdapterFormatError(problems)
        return cls(
            method=method, task=task, base_model=base_model, base_fingerprint=fingerprint,  # type: ignore[arg-type]
            labels=labels, pooling=pooling, ranks=ranks, trainable_params=trainable, created_at=created,
            training=training if isinstance(training, dict) else {}, format_version=version,
        )


@dataclass
class CompiledAdapter:
    meta: AdapterMeta
    modules: dict[str, ModuleWeights]
    head_weight: torch.Tensor | None = None  # [num_labels, d_model]
    head_bias: torch.Tensor | None = None  # [num_labels]

    @property
    def mergeable(self) -> bool:
        """MoR's router depends on the input, so it has no exact merge."""
        return all(m.gate is None for m in self.modules.values())

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def expanded(self) -> CompiledAdapter:
        """This adapter in serving form (see :meth:`ModuleWeights.expanded`); itself if nothing is compact."""
        if all(mw.expert_out_scale is None for mw in self.modules.values()):
            return self
        return replace(self, modules={p: mw.expanded() for p, mw in self.modules.items()})

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for path, mw in sorted(self.modules.items()):
            for key, t in mw.tensors().items():
                sd[f"{path}.{key}"] = t
        if self.head_weight is not None:
            sd["head.weight"] = self.head_weight
        if self.head_bias is not None:
            sd["head.bias"] = self.head_bias
        return sd

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The safetensors file, piece by piece, each tensor's bytes in place: writing it to a file or a
        stream never holds a second copy of the adapter in memory."""
        meta = self.meta
        if not meta.ranks:
            meta.ranks = {p: m.rank for p, m in sorted(self.modules.items())}
        return safetensors_chunks(self.state_dict(), meta.to_header())

    def to_bytes(self) -> bytes:
        return b"".join(self.chunks())

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            for chunk in self.chunks():
                f.write(chunk)


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def safetensors_chunks(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> Iterator[bytes | memoryview]:
    """A safetensors file as chunks (the header, then every tensor's bytes), as safetensors' own save lays
    it out: tensors by element size (largest first, so every offset stays aligned) then name, the header
    padded with spaces to a multiple of 8."""
    tensors = sorted(((k, v.detach().contiguous().cpu()) for k, v in sd.items()), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors:
        if t.dtype not in _ST_DTYPES:
            raise AdapterFormatError(f"tensor {name!r}: dtype {t.dtype} cannot be written to safetensors")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    yield len(raw).to_bytes(8, "little") + raw
    for _, t in tensors:
        if t.numel():
            yield memoryview(t.reshape(-1).view(torch.uint8).numpy())


def split_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], list[str]]:
    """Group ``M.key`` tensors by module path. Returns (per-module dicts, head tensors, unknown keys)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for name, t in sd.items():
        if name in HEAD_KEYS:
            head[name] = t
            continue
        path, _, key = name.rpartition(".")
        if not path or key not in MODULE_KEYS:
            unknown.append(name)
            continue
        modules.setdefault(path, {})[key] = t
    return modules, head, unknown


def from_state_dict(sd: dict[str, torch.Tensor], meta: AdapterMeta, expand: bool = True) -> CompiledAdapter:
    """Assemble tensors into a CompiledAdapter; structural problems are collected, not raised one by one.

    MoR's compact modules are checked for agreement among their own tensors, then expanded to B' unless
    ``expand`` is False (``validate`` checks the compact form against the base and the caps first: B' may
    be up to N times lora_b, so a hostile file must not choose how much memory its expansion takes)."""
    modules, head, unknown = split_state_dict(sd)
    problems = [f"tensor {k!r} is not part of the compiled adapter format" for k in sorted(unknown)]
    built: dict[str, ModuleWeights] = {}
    for path, parts in sorted(modules.items()):
        missing = [k for k in ("lora_a", "lora_b") if k not in parts]
        if missing:
            problems.append(f"module {path!r} lacks {', '.join(path + '.' + k for k in missing)}")
            continue
        if ("gate" in parts) != ("rank_scale" in parts):
            problems.append(f"module {path!r}: MoR needs both {path}.gate and {path}.rank_scale")
            continue
        mw = ModuleWeights(**parts)
        if mw.expert_out_scale is not None:
            if mw.gate is None:
                problems.append(f"{path}.{mor_form.KEY}: MoR's compact form, allowed only beside {path}.gate and "
                                f"{path}.rank_scale")
                continue
            bad = mor_form.compact_problems(path, mw.lora_a, mw.lora_b, mw.gate, mw.expert_out_scale)
            problems.extend(bad)
            if bad:
                continue
            if expand:
                mw = mw.expanded()
        built[path] = mw
    if problems:
        raise AdapterFormatError(problems)
    return CompiledAdapter(meta=meta, modules=built, head_weight=head.get("head.weight"), head_bias=head.get("head.bias"))


def read_header(source: bytes | str | Path, max_header_bytes: int = 16 << 20) -> tuple[dict, dict[str, str]]:
    """Parse a safetensors header (of bytes, or of a file: only its header is read) without trusting it:
    lengths, offsets and coverage are checked before any tensor is allocated (RELIABILITY.md row 4).
    Returns (tensor entries, metadata)."""
    if isinstance(source, bytes):
        n = _header_length(source[:8], len(source), max_header_bytes)
        return _parse_header(source[8 : 8 + n], len(source) - 8 - n)
    with open(source, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = _header_length(f.read(8), size, max_header_bytes)
        return _parse_header(f.read(n), size - 8 - n)


def load_tensors(source: bytes | str | Path, header: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors, after read_header passed. A file is mapped copy-on-write by safetensors (its pages are
    read when first touched), so a file costs its size once, not twice. Bytes with their parsed ``header``
    are copied ONCE into one buffer and every tensor is a view of it (``tensors_from_bytes``); without the
    header, or for anything that view cannot serve exactly, safetensors' own load (a copy per tensor)."""
    if not isinstance(source, bytes):
        return _map_file(source)
    views = tensors_from_bytes(source, header) if header is not None else None
    return views if views is not None else load(source)


_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}


def tensors_from_bytes(data: bytes, header: dict) -> dict[str, torch.Tensor] | None:
    """Every tensor of a safetensors file as a view of one private copy of its body: one copy, then ONE
    ``as_strided`` per tensor, where safetensors' load copies each tensor into its own bytes object and then
    into a tensor (about 2.5x the host time for an adapter's ~60 small tensors: this is on every cold
    load's path). ``header`` is read_header's, whose offsets are already checked (in order, no gap, covering
    the body). None when a tensor's dtype is not one this reader knows, its shape does not match its byte
    length, or the host is big-endian: safetensors' load then reads the file and reports any problem."""
    if sys.byteorder != "little":
        return None
    ends = [e["data_offsets"][1] for e in header.values()]
    if not all(type(x) is int for x in ends):
        return None
    body_len = max(ends, default=0)
    body = torch.frombuffer(bytearray(memoryview(data)[len(data) - body_len:]), dtype=torch.uint8) if body_len else None
    typed: dict[torch.dtype, torch.Tensor] = {}  # the body as each dtype (whole elements only)
    out: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        dtype, shape = _FROM_ST.get(entry.get("dtype")), entry.get("shape")
        begin, end = entry["data_offsets"]
        if (dtype is None or type(begin) is not int or type(end) is not int or not isinstance(shape, list)
                or not all(type(d) is int and d >= 0 for d in shape)):
            return None
        itemsize = dtype.itemsize
        strides, numel = [], 1
        for d in reversed(shape):
            strides.append(numel)
            numel *= d
        if end - begin != numel * itemsize:
            return None
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        elif begin % itemsize:  # an unaligned offset (safetensors' writer never makes one): its own copy
            out[name] = body[begin:end].clone().view(dtype).view(shape)  # type: ignore[index]
        else:
            view = typed.get(dtype)
            if view is None:
                view = typed[dtype] = body[:body_len - body_len % itemsize].view(dtype)  # type: ignore[index]
            out[name] = view.as_strided(shape, strides[::-1], begin // itemsize)
    return out


def _header_length(first8: bytes, size: int, max_header_bytes: int) -> int:
    if size < 8:
        raise AdapterFormatError(f"file is {size} bytes: too short for a safetensors header")
    n = int.from_bytes(first8, "little")
    if n > max_header_bytes:
        raise AdapterFormatError(f"declared header length {n} exceeds the cap of {max_header_bytes} bytes")
    if 8 + n > size:
        raise AdapterFormatError(f"declared header length {n} is larger than the file ({size} bytes)")
    return n


def json_value(raw: str | bytes, what: str):
    """``json.loads``, with every way it can fail on hostile input answered as a format error naming
    ``what``: not JSON, not UTF-8, and nesting so deep that the parser recurses past Python's limit."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise AdapterFormatError(f"{what} is nested too deeply to be valid JSON here") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{what} is not valid JSON: {e}") from None


def _parse_header(raw: bytes, body: int) -> tuple[dict, dict[str, str]]:
    """The header JSON of a file whose tensor data is ``body`` bytes long."""
    header = json_value(raw, "header")
    if not isinstance(header, dict):
        raise AdapterFormatError("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterFormatError("__metadata__ must map strings to strings")
    spans = []
    problems = []
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            spans.append((int(begin), int(end), name))
        except (KeyError, TypeError, ValueError):
            problems.append(f"tensor {name!r} has no valid data_offsets")
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos or end < begin:
            problems.append(f"tensor {name!r} offsets [{begin}, {end}) overlap or leave a gap (expected start {pos})")
        pos = max(pos, end)
    if pos != body:
        problems.append(f"tensor data covers {pos} bytes but the file body has {body} (truncated or trailing bytes)")
    if problems:
        raise AdapterFormatError(problems)
    return header, meta


def loads(data: bytes, max_header_bytes: int = 16 << 20) -> CompiledAdapter:
    """Bytes -> CompiledAdapter. Checks the container (read_header) before safetensors touches it."""
    _, meta_header = read_header(data, max_header_bytes)
    meta = AdapterMeta.from_header(meta_header)
    try:
        sd = load(data)
    except Exception as e:  # safetensors raises its own error types
        raise AdapterFormatError(f"safetensors could not read the file: {e}") from None
    return from_state_dict(sd, meta)


def load_file(path: str | Path, max_header_bytes: int = 16 << 20) -> CompiledAdapter:
    return loads(Path(path).read_bytes(), max_header_bytes)
