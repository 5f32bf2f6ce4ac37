"""The training loop, top to bottom: wrap, optimise, evaluate. No framework.

    layers = inject(base.model, Method, cfg, targets)       # freeze the base, wrap target linears
    for step in range(total_steps):
        for _ in range(grad_accum):                          # micro-batches, loss / grad_accum
            (task loss + controller.regularizer()).backward()
        clip, optimizer.step(), scheduler.step()
        controller.after_optimizer_step(step, optimizer)     # AdaLoRA allocate, AROMA check/merge/reset
        optimizer.zero_grad()
        if controller.should_stop(): break                   # AROMA: every module converged

AdamW over the adapter's trainable parameters and the classify head; linear warmup then linear decay
(transformers' schedule), unless the method brings its own (AROMA: cosine with restarts).
The base model is modified in place (its target linears are wrapped): pass a copy to keep the original.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from adapters_store.basemodels import BaseModel
from trainer import tasks
from trainer.data import Example, collate
from trainer.inject import inject, select_targets
from trainer.methods.base import AdapterLayer, Controller, get_method, make_config


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
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int | None = None  # optimizer steps between evaluations; None: at start and end only
    eval_batch_size: int = 32
    progress: bool = True


@dataclass
class TrainResult:
    layers: dict[str, AdapterLayer]
    head: nn.Linear | None
    pooling: str | None
    labels: list[str] | None
    controller: Controller
    log: dict  # JSON-serialisable: config, per-step history, evaluations, rank history, timings


def linear_schedule(step: int, *, warmup: int, total: int) -> float:
    """transformers' get_linear_schedule_with_warmup as a multiplier."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def count_params(params) -> int:
    return sum(p.numel() for p in params)


@torch.no_grad()
def evaluate(base: BaseModel, head: nn.Module | None, pooling: str | None, examples: list[Example],
             batch_size: int, pad_id: int) -> dict:
    """Mean loss over every scored term (tokens or examples), and accuracy for classify."""
    was_training = base.model.training
    base.model.eval()
    total, count, correct = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
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


def batches(loader: DataLoader):
    while True:  # epochs run back to back; gradient accumulation may straddle an epoch boundary
        yield from loader


def train(base: BaseModel, train_set: list[Example], eval_set: list[Example], cfg: TrainConfig,
          labels: list[str] | None = None) -> TrainResult:
    if cfg.task not in base.tasks:
        raise ValueError(f"base {base.name!r} supports tasks {list(base.tasks)}, not {cfg.task!r}")
    if not train_set:
        raise ValueError("the training set is empty")
    torch.manual_seed(cfg.seed)
    method = get_method(cfg.method)
    mcfg = make_config(cfg.method, **cfg.method_options)
    layers = inject(base.model, method, mcfg, select_targets(base, cfg.targets))
    head, pooling = None, None
    if cfg.task == "classify":
        if not labels:
            raise ValueError("classify needs the label list")
        head, pooling = tasks.make_head(base, len(labels)), tasks.default_pooling(base)

    pad_id = base.tokenizer.pad_token_id
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, collate_fn=partial(collate, pad_id=pad_id),
                        generator=torch.Generator().manual_seed(cfg.seed))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(loader) / cfg.grad_accum))
    controller = method.make_controller(layers, mcfg, total)
    adapter_params = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    head_params = list(head.parameters()) if head is not None else []
    optimizer = torch.optim.AdamW(adapter_params + head_params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = controller.lr_lambda(total) or partial(linear_schedule, warmup=round(cfg.warmup_ratio * total), total=total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    run_eval = partial(evaluate, base, head, pooling, eval_set, cfg.eval_batch_size, pad_id)
    evals = [{"step": 0, **run_eval()}]
    history: list[dict] = []
    rank_history: list[list[int]] = []
    if controller.total_rank() is not None:
        rank_history.append([0, controller.total_rank()])
    started = time.perf_counter()
    stream = batches(loader)
    base.model.train()
    bar = tqdm(range(total), desc=f"{cfg.method} {cfg.task}", disable=not cfg.progress, dynamic_ncols=True)
    step = 0
    for step in bar:
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            batch = next(stream)
            loss, _ = tasks.loss_and_count(tasks.logits(base, batch, head, pooling), batch)
            step_loss += float(loss.detach()) / cfg.grad_accum
            reg = controller.regularizer()
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
        bar.set_postfix(loss=f"{step_loss:.4f}", **({"rank": rank} if rank is not None else {}))
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < total:
            evals.append({"step": step + 1, **run_eval()})
        if controller.should_stop():
            break
    steps_done = step + 1
    train_seconds = time.perf_counter() - started
    evals.append({"step": steps_done, **run_eval()})
    base.model.eval()

    log = {
        "config": {**asdict(cfg), "method_config": asdict(mcfg)},
        "base_model": base.name,
        "targets": sorted(layers),
        "total_steps": total,
        "steps": steps_done,
        "stopped_early": steps_done < total,
        "train_examples": len(train_set),
        "eval_examples": len(eval_set),
        "trainable_params": count_params(adapter_params) + count_params(head_params),
        "adapter_trainable_params": count_params(adapter_params),
        "head_params": count_params(head_params),
        "train_seconds": round(train_seconds, 3),
        "initial_eval": evals[0],
        "final_eval": evals[-1],
        "evals": evals,
        "history": history,
        "rank_history": rank_history,
        "method_summary": controller.summary(),
    }
    return TrainResult(layers=layers, head=head, pooling=pooling, labels=labels, controller=controller, log=log)
