"""PEFT adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``) -> compiled form.

Supported (METHODS.md sections 1, 2, 3, 6, 8), per module with the scale s folded into ``lora_b``:

    LoRA / rsLoRA   lora_a = A, lora_b = s B                 s = alpha/r, or alpha/sqrt(r) with use_rslora
    DoRA            as LoRA, out_scale = m / ||W0 + s B A||_row (fp32, from the base's exact weights)
    EDoRA           DoRA keys + ``<module>_lora_latent_mapping.weight`` R [r, r]: lora_b = s B R (never dropped)
    AdaLoRA         lora_a = diag(E) A, lora_b = s B over the triplets with E != 0; s = alpha/(init_r + 1e-5)
                    (PEFT's ``ranknum`` is never saved and always init_r); rank-0 modules are omitted

``rank_pattern``/``alpha_pattern`` keys match a module name as PEFT matches them: the regex suffix
``(.*\\.)?{key}$``, first matching key wins; keys that could backtrack catastrophically are refused
(peft_patterns.py). ``fan_in_fan_out`` describes the *base* weight's layout
(GPT-2 Conv1D); PEFT stores lora_A/lora_B in nn.Linear orientation either way and forces the flag off for
nn.Linear targets, and every target of a rankserve base is an nn.Linear, so the factors are read as-is.

Pickle formats are refused by name and by magic bytes, never opened. Every config or tensor problem is
collected into one ``AdapterFormatError`` naming the field or tensor.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from adapters_store.basemodels import BaseModel
from adapters_store.format import (
    AdapterFormatError,
    AdapterMeta,
    CompiledAdapter,
    ModuleWeights,
    json_value,
    load_tensors,
    read_header,
)
from adapters_store.peft_patterns import MAX_KEYS, key_problems, pattern_value, work_problems
from adapters_store.validate import (
    REFUSED_SUFFIXES,
    Limits,
    PickleRefused,
    count_nonfinite,
    looks_pickled,
    validate,
)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
ADALORA_EPS = 1e-5  # PEFT: scaling / (ranknum + 1e-5)

# Tensor key suffix -> role; longest first so ".lora_A.weight" wins over ".lora_A".
ROLES = (
    (".lora_magnitude_vector.weight", "m"), (".lora_magnitude_vector", "m"), ("_lora_latent_mapping.weight", "R"),
    (".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "lora_bias"),
    (".lora_A", "A"), (".lora_B", "B"), (".lora_E", "E"),
    (".lora_embedding_A", "embedding"), (".lora_embedding_B", "embedding"),
)
# Config fields that do not change the forward of the saved tensors (or that the checks below handle).
KNOWN = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_core", "loftq_config", "eva_config", "corda_config", "use_dora",
    "qalora_group_size", "runtime_config", "lora_bias", "ensure_weight_tying",
}
ADALORA_KNOWN = {"target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step"}
# Inits that leave the base weights untouched; pissa/olora/corda/loftq/lora_ga rewrite W0 and mica is a variant.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
HEAD_NAMES = {"score", "classifier"}  # what PEFT's SEQ_CLS task puts into modules_to_save
__all__ = ["PickleRefused", "convert_peft", "import_peft", "pattern_value"]


def _read_source(source: str | Path | dict[str, bytes | Path], limits: Limits) -> tuple[bytes, bytes | Path]:
    """(config bytes, weights) from a directory or an upload ({file name: bytes, or the path of a spooled
    file}); only those two files are ever read, and weights that are a file stay one (mapped, not copied)."""
    if isinstance(source, dict):
        names = {Path(n).name: n for n in source}
        pickles = sorted(n for n in names if n.lower().endswith(REFUSED_SUFFIXES))
        if pickles:
            raise PickleRefused(f"pickle/archive formats are refused, never opened: {', '.join(pickles)} (save with "
                                f"safe_serialization=True to get {WEIGHTS})")
        extra = sorted(set(names) - {CONFIG, WEIGHTS})
        if extra:
            raise AdapterFormatError(f"unexpected files {extra}: a PEFT upload is {CONFIG} + {WEIGHTS}")
        files = {n: source[names[n]] for n in (CONFIG, WEIGHTS) if n in names}
    else:
        d = Path(source)
        if not d.is_dir():
            raise AdapterFormatError(f"{d} is not a directory holding {CONFIG} and {WEIGHTS}")
        present = {p.name for p in d.iterdir()}
        if WEIGHTS not in present:
            pickles = sorted(n for n in present if n.lower().endswith(REFUSED_SUFFIXES))
            if pickles:
                raise PickleRefused(f"{d} holds only pickle weights {pickles}; they are refused, never opened "
                                    f"(save with safe_serialization=True to get {WEIGHTS})")
        files = {n: d / n for n in (CONFIG, WEIGHTS) if n in present}
    missing = [n for n in (CONFIG, WEIGHTS) if n not in files]
    if missing:
        raise AdapterFormatError(f"{' and '.join(missing)} missing: a PEFT adapter is {CONFIG} + {WEIGHTS}")
    for name, cap in ((CONFIG, MAX_CONFIG_BYTES), (WEIGHTS, limits.max_file_bytes)):
        f = files[name]
        size = f.stat().st_size if isinstance(f, Path) else len(f)
        if size > cap:  # before reading a byte
            raise AdapterFormatError(f"{name} is {size} bytes, over the cap of {cap} bytes")
    config, weights = files[CONFIG], files[WEIGHTS]
    if looks_pickled(weights):
        raise PickleRefused(f"{WEIGHTS} holds a pickle/zip payload, not safetensors; refused, never opened")
    return config if isinstance(config, bytes) else config.read_bytes(), weights


def _parse_config(data: bytes) -> dict:
    cfg = json_value(data, CONFIG)
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{CONFIG} must hold a JSON object")
    return cfg


def _int_field(cfg: dict, name: str, lo: int, hi: int, problems: list[str]) -> int:
    v = cfg.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        problems.append(f"{CONFIG} field {name!r} is {v!r}, expected an integer in [{lo}, {hi}]")
        return lo
    return v


def _check_config(cfg: dict, base: BaseModel, limits: Limits, problems: list[str]) -> str:
    """Validate the config; returns the peft_type ("LORA" | "ADALORA")."""
    kind = cfg.get("peft_type")
    if kind not in ("LORA", "ADALORA"):
        problems.append(f"{CONFIG} field 'peft_type' is {kind!r}: rankserve imports LORA (incl. DoRA, EDoRA) and ADALORA")
        return str(kind)
    known = KNOWN | (ADALORA_KNOWN if kind == "ADALORA" else set())
    for name, value in cfg.items():
        if name not in known and value not in (None, False, [], {}, "", 0):
            problems.append(f"{CONFIG} field {name!r} = {value!r} is not supported: it changes the forward in a way "
                            "the compiled format cannot represent")
    if kind == "LORA":
        _int_field(cfg, "r", 1, limits.max_rank, problems)
    else:
        _int_field(cfg, "init_r", 1, limits.max_rank, problems)
        if cfg.get("use_dora"):
            problems.append(f"{CONFIG} field 'use_dora' is true, which PEFT's AdaLoRA does not support")
    if not isinstance(cfg.get("lora_alpha", 8), (int, float)) or isinstance(cfg.get("lora_alpha"), bool):
        problems.append(f"{CONFIG} field 'lora_alpha' is {cfg.get('lora_alpha')!r}, expected a number")
    for name in ("rank_pattern", "alpha_pattern"):
        pats = cfg.get(name) or {}
        if not isinstance(pats, dict):
            problems.append(f"{CONFIG} field {name!r} must be a JSON object")
            continue
        problems.extend(key_problems(name, pats))
        if len(pats) > MAX_KEYS:
            continue
        for key, v in pats.items():
            if kind == "LORA" and name == "rank_pattern" and (not isinstance(v, int) or not 1 <= v <= limits.max_rank):
                problems.append(f"{CONFIG} field 'rank_pattern'[{key!r}] is {v!r}, expected an integer in "
                                f"[1, {limits.max_rank}] (max_rank)")
            if name == "alpha_pattern" and not isinstance(v, (int, float)):
                problems.append(f"{CONFIG} field 'alpha_pattern'[{key!r}] is {v!r}, expected a number")
    if cfg.get("bias", "none") != "none":
        problems.append(f"{CONFIG} field 'bias' is {cfg['bias']!r}: trained base biases cannot be served; use 'none'")
    if cfg.get("lora_bias"):
        problems.append(f"{CONFIG} field 'lora_bias' is true: the compiled format has no LoRA bias term")
    if cfg.get("init_lora_weights", True) not in PLAIN_INITS:
        problems.append(f"{CONFIG} field 'init_lora_weights' is {cfg['init_lora_weights']!r}: that init rewrites the "
                        "base weights (or is a LoRA variant), so the adapter is not valid against the plain base")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        for t in targets:
            hit = isinstance(t, str) and any(p == t or p.endswith("." + t) or t.endswith("." + p)
                                             for p in base.targets)
            if not hit:
                problems.append(f"{CONFIG} field 'target_modules' entry {t!r} names no target module of base "
                                f"{base.name!r} (its targets end in {', '.join(_leaf_names(base))})")
    elif targets is not None and not isinstance(targets, str):
        problems.append(f"{CONFIG} field 'target_modules' must be a list of names or a regex string")
    return kind


def _leaf_names(base: BaseModel) -> list[str]:
    return sorted({p.rsplit(".", 1)[-1] for p in base.targets})


def _split_keys(sd: dict[str, torch.Tensor], problems: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """``base_model.model.<name>.<role>`` -> {PEFT module name: {role: tensor}}, and the other tensors."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        name = key.removeprefix("base_model.model.")
        for suffix, role in ROLES:
            if name.endswith(suffix):
                if role in ("lora_bias", "embedding"):
                    problems.append(f"tensor {key!r}: {'LoRA biases' if role == 'lora_bias' else 'embedding LoRA'} "
                                    "cannot be represented in the compiled format")
                else:
                    groups.setdefault(name[: -len(suffix)], {})[role] = t
                break
        else:
            others[name] = t
    return groups, others


def _base_path(name: str, base: BaseModel) -> str | None:
    """The base target path equal to the PEFT module name, or the one unique path that one ends with the
    other (a ``bert.`` prefix of *ForSequenceClassification, or a bare backbone's missing ``model.``)."""
    if name in base.targets:
        return name
    hits = [p for p in base.targets if name.endswith("." + p) or p.endswith("." + name)]
    return hits[0] if len(hits) == 1 else None


def _expect(key: str, t: torch.Tensor, shape: list[int], problems: list[str]) -> bool:
    if list(t.shape) != shape:
        problems.append(f"tensor {key!r}: shape {list(t.shape)}, expected {shape}")
        return False
    return True


def _lora_module(name: str, parts: dict, cfg: dict, weight: torch.Tensor,
                 problems: list[str]) -> ModuleWeights | None:
    """LoRA, rsLoRA, DoRA or EDoRA for one module; None (with problems recorded) when it does not fit."""
    d_out, d_in = weight.shape
    a, b, m, rot = (parts.get(k) for k in ("A", "B", "m", "R"))
    key = f"base_model.model.{name}"
    if a is None or b is None:
        problems.append(f"module {name!r}: needs both {key}.lora_A.weight and {key}.lora_B.weight")
        return None
    r = int(a.shape[0]) if a.dim() == 2 else -1
    ok = _expect(f"{key}.lora_A.weight", a, [r, d_in], problems) & _expect(f"{key}.lora_B.weight", b, [d_out, r], problems)
    r_cfg = pattern_value(cfg.get("rank_pattern") or {}, name, cfg.get("r"))
    if ok and r != r_cfg:
        problems.append(f"module {name!r}: lora_A has rank {r} but the config gives r={r_cfg} (r/rank_pattern)")
        ok = False
    if bool(cfg.get("use_dora")) != (m is not None):
        problems.append(f"module {name!r}: use_dora is {bool(cfg.get('use_dora'))} but lora_magnitude_vector is "
                        f"{'present' if m is not None else 'absent'}")
        ok = False
    if m is not None:
        ok &= _expect(f"{key}.lora_magnitude_vector", m, [d_out], problems)
    if rot is not None:
        ok &= _expect(f"{key}_lora_latent_mapping.weight", rot, [r, r], problems)
    if not ok:
        return None
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8))
    scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    up = b.float() if rot is None else b.float() @ rot.float()  # [d_out, r]: EDoRA's R folded as B R
    lora_b = up * scale  # the one place the scale is folded
    lora_a = a.float()  # [r, d_in]
    out_scale = None
    if m is not None:  # g = m / ||W0 + s B (R) A||_row, fp32, against these exact base weights
        out_scale = m.float() / torch.linalg.norm(weight.float() + lora_b @ lora_a, dim=1)  # [d_out]
    return ModuleWeights(lora_a.contiguous(), lora_b.contiguous(), out_scale=out_scale)


def _adalora_module(name: str, parts: dict, cfg: dict, weight: torch.Tensor,
                    problems: list[str]) -> ModuleWeights | None:
    """AdaLoRA: fold E into A, keep the triplets with E != 0; None when no rank is left (module omitted)."""
    d_out, d_in = weight.shape
    a, b, e = (parts.get(k) for k in ("A", "B", "E"))
    key = f"base_model.model.{name}"
    if a is None or b is None or e is None:
        problems.append(f"module {name!r}: AdaLoRA needs {key}.lora_A, {key}.lora_B and {key}.lora_E")
        return None
    r = int(a.shape[0]) if a.dim() == 2 else -1
    init_r = int(cfg.get("init_r") or 0)
    ok = _expect(f"{key}.lora_A", a, [r, d_in], problems) & _expect(f"{key}.lora_B", b, [d_out, r], problems)
    ok &= _expect(f"{key}.lora_E", e, [r, 1], problems)
    if ok and r > init_r:
        problems.append(f"module {name!r}: {r} ranks saved but init_r is {init_r}")
        ok = False
    if not ok:
        return None
    keep = e[:, 0] != 0  # [r]: masked triplets have E exactly 0
    if not bool(keep.any()):
        return None
    alpha = cfg.get("lora_alpha", 8)
    scale = (alpha if alpha > 0 else init_r) / (init_r + ADALORA_EPS)  # ranknum is init_r, never the kept rank
    lora_a = e.float()[keep] * a.float()[keep]  # [r_kept, d_in] = diag(E) A
    lora_b = b.float()[:, keep] * scale  # [d_out, r_kept]
    return ModuleWeights(lora_a.contiguous(), lora_b.contiguous())


def _head(others: dict[str, torch.Tensor], cfg: dict, base: BaseModel, labels: list[str] | None,
          problems: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A LlamaForSequenceClassification ``score`` head in modules_to_save -> (head.weight, head.bias)."""
    saved = cfg.get("modules_to_save") or []
    if not saved:
        return None
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved) or not set(saved) <= HEAD_NAMES:
        problems.append(f"{CONFIG} field 'modules_to_save' is {saved!r}: full copies of modules cannot be served; "
                        "only a decoder's classification head 'score' can be mapped")
        return None
    heads = {k for k in others if k.split(".")[0] in HEAD_NAMES}
    if not base.is_decoder or heads - {"score.weight", "score.bias"}:
        problems.append(f"{CONFIG} field 'modules_to_save' holds {sorted(heads)}: only a decoder's 'score' head "
                        "maps exactly (BERT's classifier reads the pooler, which rankserve's encoders do not have)")
        return None
    if "score.weight" not in others:
        problems.append(f"{CONFIG} field 'modules_to_save' names a head but {WEIGHTS} has no score.weight")
        return None
    w = others["score.weight"].float()  # [num_labels, hidden]
    n = int(w.shape[0])
    if labels is not None and len(labels) != n:
        problems.append(f"score.weight has {n} rows but {len(labels)} labels were given")
    bias = others["score.bias"].float() if "score.bias" in others else torch.zeros(n)
    return w, bias


def import_peft(source: str | Path | dict[str, bytes | Path], base: BaseModel, limits: Limits | None = None,
                labels: list[str] | None = None) -> CompiledAdapter:
    """Convert a PEFT adapter (a directory, or {filename: bytes}) into a validated CompiledAdapter for
    ``base``. ``labels`` names the classes of a mapped ``score`` head (default LABEL_0, LABEL_1, ...)."""
    limits = limits or Limits()
    adapter = convert_peft(source, base, limits, labels)
    validate(adapter, base, limits)
    return adapter


def convert_peft(source: str | Path | dict[str, bytes | Path], base: BaseModel, limits: Limits,
                 labels: list[str] | None = None) -> CompiledAdapter:
    """The conversion alone, without the final check of the result against the base's tasks and caps."""
    config_bytes, weights = _read_source(source, limits)
    cfg = _parse_config(config_bytes)
    problems: list[str] = []
    kind = _check_config(cfg, base, limits, problems)
    try:  # container checks before safetensors allocates; a file is mapped in place, not copied
        read_header(weights, limits.max_header_bytes)
        sd = load_tensors(weights)
    except AdapterFormatError as e:
        raise AdapterFormatError(problems + [f"{WEIGHTS}: {p}" for p in e.problems]) from None
    except Exception as e:  # safetensors raises its own error types
        raise AdapterFormatError(problems + [f"{WEIGHTS}: safetensors could not read it: {e}"]) from None
    if problems:  # a config that cannot be trusted makes every tensor message noise
        raise AdapterFormatError(problems)
    for key, t in sd.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in limits.allowed_dtypes:
            problems.append(f"tensor {key!r}: dtype {dtype} is not allowed (allowed: {', '.join(limits.allowed_dtypes)})")
        elif count_nonfinite(t):
            problems.append(f"tensor {key!r}: holds NaN or Inf values")
    groups, others = _split_keys(sd, problems)
    head = _head(others, cfg, base, labels, problems)
    saved = cfg.get("modules_to_save") or []
    saved = saved if isinstance(saved, list) else []
    # Copies of modules_to_save entries are _head's business (mapped or already refused by field name).
    stray = sorted(k for k in others if not any(k.startswith(f"{s}.") or f".{s}." in k for s in saved))
    if stray:
        problems.append(f"tensors not part of a PEFT LoRA/AdaLoRA adapter: {stray[:5]}")
    if kind == "LORA":  # AdaLoRA's rank_pattern is a record of masks, never matched
        problems.extend(work_problems(cfg, [n for n in groups if _base_path(n, base) is not None]))
    if problems:  # before any key is matched against a name
        raise AdapterFormatError(problems)
    modules: dict[str, ModuleWeights] = {}
    for name, parts in sorted(groups.items()):
        path = _base_path(name, base)
        if path is None:
            problems.append(f"module {name!r} (from base_model.model.{name}.*) is not a target module of base "
                            f"{base.name!r} (its targets end in {', '.join(_leaf_names(base))})")
            continue
        weight = base.base_weight(path)  # fp32 host W0, never the live (maybe merged, bf16, CUDA) weight
        if kind == "ADALORA":
            stray_roles = sorted(set(parts) - {"A", "B", "E"})
            mw = None if stray_roles else _adalora_module(name, parts, cfg, weight, problems)
        else:
            stray_roles = sorted(set(parts) - {"A", "B", "m", "R"})
            mw = None if stray_roles else _lora_module(name, parts, cfg, weight, problems)
        if stray_roles:
            problems.append(f"module {name!r}: tensors {stray_roles} do not belong to a {kind} adapter")
        if mw is not None:
            modules[path] = mw
    if problems:
        raise AdapterFormatError(problems)
    has = {role for parts in groups.values() for role in parts}
    method = "adalora" if kind == "ADALORA" else "edora" if "R" in has else "dora" if "m" in has else "lora"
    if "R" in has and "m" not in has:
        raise AdapterFormatError("lora_latent_mapping tensors without lora_magnitude_vector: not an EDoRA checkpoint")
    classify = head is not None
    n_labels = 0 if head is None else int(head[0].shape[0])
    meta = AdapterMeta(
        method=method, task="classify" if classify else "generate", base_model=base.name,
        base_fingerprint=base.fingerprint,
        labels=(labels or [f"LABEL_{i}" for i in range(n_labels)]) if classify else None,
        pooling="last" if classify else None,
        ranks={p: mw.rank for p, mw in sorted(modules.items())},
        trainable_params=sum(t.numel() for t in sd.values()),
        training={"source": "peft", "peft_version": cfg.get("peft_version"), "peft_type": kind,
                  "base_model_name_or_path": cfg.get("base_model_name_or_path"),
                  "use_rslora": bool(cfg.get("use_rslora")), "r": cfg.get("init_r" if kind == "ADALORA" else "r"),
                  "lora_alpha": cfg.get("lora_alpha")},
    )
    return CompiledAdapter(meta=meta, modules=modules, head_weight=head[0] if head else None,
                           head_bias=head[1] if head else None)
