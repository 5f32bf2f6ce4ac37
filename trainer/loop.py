"""The training loop, top to bottom: wrap, optimise, evaluate, checkpoint. No framework.

    layers = inject(base.model, Method, cfg, targets)       # freeze the base, wrap target linears
    place(base.model, ...)                                   # --device, --dtype (adapter stays fp32)
    [resume: adapter, head, optimizer, scheduler, controller, RNG, data position from a checkpoint]
    for step in range(start, total_steps):
        for _ in range(grad_accum):                          # micro-batches, loss / grad_accum
            (task loss + controller.regularizer()).backward()
        clip, optimizer.step(), scheduler.step()
        controller.after_optimizer_step(step, optimizer)     # AdaLoRA allocate, AROMA check/merge/reset
        optimizer.zero_grad()
        [eval every --eval-every steps, keep the best; checkpoint every --save-every steps]
        if controller.should_stop(): break                   # AROMA: every module converged

AdamW over the adapter's trainable parameters and the classify head; warmup then linear, cosine or
constant (transformers' schedules), unless the method brings its own (AROMA: cosine with restarts; a
--warmup-ratio or --lr-scheduler is then refused, never ignored). Every event is appended to the JSONL
run log as it happens, so a crash keeps it. The base model is modified in place (its target linears
are wrapped): pass a copy to keep the original.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from adapters_store.basemodels import BaseModel
from trainer import checkpoint, tasks
from trainer.data import Example, collate
from trainer.device import Placement, place, resolve_device, resolve_dtype, restore
from trainer.inject import inject, select_targets
from trainer.methods.base import AdapterLayer, Controller, get_method, make_config
from trainer.schedules import SCHEDULERS, linear_schedule, make_schedule

__all__ = ["TrainConfig", "TrainResult", "evaluate", "linear_schedule", "train"]

DEFAULT_WARMUP_RATIO = 0.06
# Fields that may differ between a run and its resumption (they do not change what is computed).
RESUMABLE_CHANGES = {"progress", "resume_from", "save_every", "save_total_limit", "checkpoint_dir", "log_path",
                     "eval_batch_size", "device", "gradient_checkpointing"}


@dataclass(frozen=True)
class TrainConfig:
    method: str
    task: str = "generate"
    method_options: dict = field(default_factory=dict)  # rank, alpha, dropout and method-specific fields
    targets: tuple[str, ...] | None = None  # leaf names; None: every target of the base
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when given
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float | None = None  # None: 0.06; refused for a method with its own schedule
    lr_scheduler: str | None = None  # linear | cosine | constant; None: linear
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int | None = None  # optimizer steps between evaluations; None: at start and end only
    eval_batch_size: int = 32
    progress: bool = True
    device: str = "cpu"  # auto | cpu | cuda[:N]
    dtype: str = "float32"  # auto (bf16 on cuda) | float32 | bfloat16: the base's; the adapter stays fp32
    gradient_checkpointing: bool = False
    save_every: int | None = None  # optimizer steps between checkpoints (needs checkpoint_dir)
    save_total_limit: int = 2  # step checkpoints kept (0: all)
    checkpoint_dir: str | None = None
    resume_from: str | None = None  # a checkpoint file, or a directory (its newest step-*.pt)
    log_path: str | None = None  # JSONL run log, one event per line, appended and flushed as it happens

    def __post_init__(self) -> None:
        problems = []
        if not math.isfinite(self.lr) or self.lr < 0:
            problems.append(f"--lr must be >= 0, got {self.lr}")
        if not math.isfinite(self.epochs) or self.epochs <= 0:
            problems.append(f"--epochs must be > 0, got {self.epochs}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size", "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.warmup_ratio is not None and not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr_scheduler is not None and self.lr_scheduler not in SCHEDULERS:
            problems.append(f"--lr-scheduler must be one of {list(SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.save_total_limit < 0:
            problems.append("--weight-decay, max_grad_norm and --save-total-limit must be >= 0")
        if self.save_every and not self.checkpoint_dir:
            problems.append("--save-every needs a checkpoint directory")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class TrainResult:
    layers: dict[str, AdapterLayer]
    head: nn.Linear | None
    pooling: str | None
    labels: list[str] | None
    controller: Controller
    log: dict  # JSON-serialisable: config, per-step history, evaluations, rank history, timings
    best_state: dict | None = None  # the adapter at the best evaluation (checkpoint.adapter_state), if any


class RunLog:
    """The JSONL run log: one JSON object per event, flushed at once (a crash keeps every line)."""

    def __init__(self, path: str | None):
        self.file = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, event: str, **fields) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def count_params(params) -> int:
    return sum(p.numel() for p in params)


@torch.no_grad()
def evaluate(base: BaseModel, head: nn.Module | None, pooling: str | None, examples: list[Example],
             batch_size: int, pad_id: int, placement: Placement | None = None) -> dict:
    """Mean loss over every scored term (tokens or examples), and accuracy for classify."""
    was_training = base.model.training
    base.model.eval()
    total, count, correct = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[start : start + batch_size], pad_id), placement)
        with placement.autocast() if placement else contextlib.nullcontext():
            out = tasks.logits(base, batch, head, pooling)
        loss, n = tasks.loss_and_count(out, batch)
        total += float(loss) * n
        count += n
        if "label" in batch:
            correct += int((out.argmax(dim=-1) == batch["label"]).sum())
    base.model.train(was_training)
    result = {"loss": total / max(1, count)}
    if head is not None:
        result["accuracy"] = correct / max(1, len(examples))
    return result


def to_device(batch: dict[str, torch.Tensor], placement: Placement | None) -> dict[str, torch.Tensor]:
    return batch if placement is None else {k: v.to(placement.device) for k, v in batch.items()}


def micro_batches(examples: list[Example], batch_size: int, seed: int, start: int = 0):
    """Micro-batches with epochs back to back (accumulation may straddle an epoch boundary). Epoch e is a
    permutation seeded by (seed, e), so the stream after k micro-batches is known without replaying it
    (what --resume needs)."""
    per_epoch = math.ceil(len(examples) / batch_size)
    k, epoch, order = start, -1, None
    while True:
        e, i = divmod(k, per_epoch)
        if e != epoch:
            epoch, order = e, torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 100_003 + e))
        yield [examples[j] for j in order[i * batch_size : (i + 1) * batch_size].tolist()]
        k += 1


def better(new: dict, old: dict | None) -> bool:
    """classify: higher accuracy, then lower loss; generate: lower loss."""
    if old is None:
        return True
    if "accuracy" in new:
        return (new["accuracy"], -new["loss"]) > (old["accuracy"], -old["loss"])
    return new["loss"] < old["loss"]


def check_resumable(saved: dict, cfg: TrainConfig, n_train: int) -> None:
    now = asdict(cfg)
    diff = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved["config"].get(k) != now[k])
    if diff:
        raise ValueError("--resume: this run differs from the checkpoint's in "
                         + ", ".join(f"{k} ({saved['config'].get(k)!r} -> {now[k]!r})" for k in diff))
    if saved["train_examples"] != n_train:
        raise ValueError(f"--resume: the checkpoint was trained on {saved['train_examples']} examples, "
                         f"this run has {n_train}")


def train(base: BaseModel, train_set: list[Example], eval_set: list[Example], cfg: TrainConfig,
          labels: list[str] | None = None) -> TrainResult:
    if cfg.task not in base.tasks:
        raise ValueError(f"base {base.name!r} supports tasks {list(base.tasks)}, not {cfg.task!r}")
    if not train_set:
        raise ValueError("the training set is empty")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    mcfg = make_config(cfg.method, **cfg.method_options)  # every option checked before anything runs
    saved = checkpoint.load(cfg.resume_from) if cfg.resume_from else None
    if saved is not None:
        check_resumable(saved, cfg, len(train_set))
    torch.manual_seed(cfg.seed)
    method = get_method(cfg.method)
    layers = inject(base.model, method, mcfg, select_targets(base, cfg.targets))
    head, pooling = None, None
    if cfg.task == "classify":
        if not labels:
            raise ValueError("classify needs the label list")
        head, pooling = tasks.make_head(base, len(labels)), tasks.default_pooling(base)

    per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    controller = method.make_controller(layers, mcfg, total)
    schedule = controller.lr_lambda(total)
    if schedule is not None and (cfg.warmup_ratio is not None or cfg.lr_scheduler is not None):
        raise ValueError(f"{cfg.method} brings its own learning-rate schedule, so --warmup-ratio and "
                         "--lr-scheduler do not apply to it (see its options in rankserve-train --help)")
    if schedule is None:
        warmup = round((DEFAULT_WARMUP_RATIO if cfg.warmup_ratio is None else cfg.warmup_ratio) * total)
        schedule = make_schedule(cfg.lr_scheduler or "linear", warmup, total)
    adapter_params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    head_params = list(head.parameters()) if head is not None else []
    own = {id(t) for layer in layers.values() for t in checkpoint.own_tensors(layer).values()}
    placement = place(base.model, own, device, dtype, cfg.gradient_checkpointing)
    if head is not None:
        head.to(device)
    optimizer = torch.optim.AdamW(adapter_params + head_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    pad_id = base.tokenizer.pad_token_id
    run_eval = partial(evaluate, base, head, pooling, eval_set, cfg.eval_batch_size, pad_id, placement)
    runlog = RunLog(cfg.log_path)
    history: list[dict] = []
    rank_history: list[list[int]] = []
    best: dict | None = None
    best_state: dict | None = None
    start, elapsed = 0, 0.0
    if saved is None:
        evals = [{"step": 0, **run_eval()}]
        if controller.total_rank() is not None:
            rank_history.append([0, controller.total_rank()])
        runlog.write("start", config=asdict(cfg), method_config=asdict(mcfg), total_steps=total,
                     device=str(device), dtype=str(dtype).removeprefix("torch."))
        runlog.write("eval", **evals[0])
    else:
        checkpoint.load_adapter_state(layers, head, saved["adapter"], device)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        checkpoint.load_controller_state(controller, saved["controller"], device)
        checkpoint.load_rng_state(saved["rng"])
        start, elapsed = saved["step"], saved["train_seconds"]
        evals, history, rank_history = saved["evals"], saved["history"], saved["rank_history"]
        best, best_state = saved["best"], saved["best_state"]
        runlog.write("resume", step=start, checkpoint=str(cfg.resume_from))

    def save_checkpoint(step: int) -> Path:
        path = Path(cfg.checkpoint_dir) / f"step-{step:06d}.pt"
        checkpoint.save({"step": step, "config": asdict(cfg), "train_examples": len(train_set),
                         "adapter": checkpoint.adapter_state(layers, head), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "controller": checkpoint.controller_state(controller),
                         "rng": checkpoint.rng_state(), "train_seconds": elapsed + time.perf_counter() - started,
                         "evals": evals, "history": history, "rank_history": rank_history,
                         "best": best, "best_state": best_state}, path)
        checkpoint.prune(Path(cfg.checkpoint_dir), cfg.save_total_limit)
        runlog.write("checkpoint", step=step, path=str(path))
        return path

    started = time.perf_counter()
    stream = micro_batches(train_set, cfg.batch_size, cfg.seed, start=start * cfg.grad_accum)
    base.model.train()
    bar = tqdm(range(start, total), desc=f"{cfg.method} {cfg.task}", disable=not cfg.progress, dynamic_ncols=True)
    step = start - 1
    for step in bar:
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            batch = to_device(collate(next(stream), pad_id), placement)
            with placement.autocast():
                loss, _ = tasks.loss_and_count(tasks.logits(base, batch, head, pooling), batch)
                reg = controller.regularizer()
            step_loss += float(loss.detach()) / cfg.grad_accum
            (loss + reg if reg is not None else loss).div(cfg.grad_accum).backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(adapter_params + head_params, cfg.max_grad_norm)
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        controller.after_optimizer_step(step, optimizer)
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": round(step_loss, 6), "lr": lr})
        rank = controller.total_rank()
        if rank is not None:
            rank_history.append([step + 1, rank])
        runlog.write("step", **history[-1], **({"rank": rank} if rank is not None else {}))
        bar.set_postfix(loss=f"{step_loss:.4f}", **({"rank": rank} if rank is not None else {}))
        stop = controller.should_stop() or step + 1 == total
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or stop):
            evals.append({"step": step + 1, **run_eval()})
            runlog.write("eval", **evals[-1])
            if better(evals[-1], best):
                best, best_state = evals[-1], checkpoint.adapter_state(layers, head)
                runlog.write("best", **best)
        if cfg.save_every and ((step + 1) % cfg.save_every == 0 or stop):
            save_checkpoint(step + 1)
        if controller.should_stop():
            break
    steps_done = step + 1
    train_seconds = elapsed + time.perf_counter() - started
    if not (cfg.eval_every and evals[-1]["step"] == steps_done):
        evals.append({"step": steps_done, **run_eval()})
        runlog.write("eval", **evals[-1])
    base.model.eval()
    restore(base.model, placement)
    if head is not None:
        head.to("cpu")

    log = {
        "config": {**asdict(cfg), "method_config": asdict(mcfg)},
        "base_model": base.name,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "targets": sorted(layers),
        "total_steps": total,
        "steps": steps_done,
        "resumed_from_step": start if saved is not None else None,
        "stopped_early": steps_done < total,
        "train_examples": len(train_set),
        "eval_examples": len(eval_set),
        "trainable_params": count_params(adapter_params) + count_params(head_params),
        "adapter_trainable_params": count_params(adapter_params),
        "head_params": count_params(head_params),
        "train_seconds": round(train_seconds, 3),
        "steps_per_second": round((steps_done - start) / max(1e-9, time.perf_counter() - started), 4),
        "initial_eval": evals[0],
        "final_eval": evals[-1],
        "best_eval": best,
        "evals": evals,
        "history": history,
        "rank_history": rank_history,
        "method_summary": controller.summary(),
    }
    runlog.write("end", steps=steps_done, final_eval=evals[-1], best_eval=best, train_seconds=round(train_seconds, 3))
    runlog.close()
    return TrainResult(layers=layers, head=head, pooling=pooling, labels=labels, controller=controller, log=log,
                       best_state=best_state)
