"""``rankserve-train``: train one adapter, export it, log the run, optionally push it to a server.

    rankserve-train --method aroma --model minilm --task classify --data train.jsonl --out topics.safetensors \
        --eval-split 0.1 --lr 5e-4 --epochs 3 --set eps_out=0.005 --set max_inner_steps=100

Method-specific options go through ``--set KEY=VALUE`` (listed per method at the end of ``--help``).
Next to ``--out`` it writes ``<stem>.train.json`` (the run log), ``<stem>.log.jsonl`` (the same run as
events, streamed while it trains), with ``--eval-every`` ``<stem>.best.safetensors`` (the adapter at the
best evaluation), with ``--save-every`` checkpoints in ``<stem>.checkpoints/`` (``--resume`` continues
from the newest), and for AdaLoRA and AROMA ``<stem>.ranks.png`` and ``<stem>.rank_history.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path

# Before torch loads OpenMP: spin-waiting idle threads cost ~2.5x on small shared machines (measured on
# smollm2 under load: 4 steps 13.9 s spinning vs 5.6 s passive). A user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from trainer.export import SERVER_MAX_RANK, fit_problem, planned_width  # noqa: E402
from trainer.methods.base import make_config  # noqa: E402
from trainer.options import method_options, methods_help, parse_value  # noqa: E402
from trainer.schedules import SCHEDULERS  # noqa: E402

__all__ = ["build_parser", "main", "parse_value", "run"]

METHOD_NAMES = ("lora", "dora", "adalora", "aroma", "mor", "edora")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rankserve-train", description=__doc__.split("\n\n")[0],
                                epilog=methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to train")
    what.add_argument("--method", required=True, choices=METHOD_NAMES, help="the adapter method")
    what.add_argument("--model", required=True, help="smollm2, minilm, tiny-llama, tiny-bert or a local HF directory")
    what.add_argument("--task", required=True, choices=("generate", "classify"),
                      help="generate: causal LM loss; classify: a linear head on the pooled final state")
    what.add_argument("--data", required=True,
                      help="JSONL (prompt/completion, text, messages, or text/label) or CSV/TSV (text,label)")
    what.add_argument("--out", required=True, help="the compiled adapter to write (.safetensors)")
    held_out = what.add_mutually_exclusive_group()
    held_out.add_argument("--eval-data", help="held-out records (default: --eval-split of --data)")
    held_out.add_argument("--eval-split", type=float, default=0.1,
                          help="share of --data held out for evaluation, stratified by label for classify "
                               "(default 0.1)")
    what.add_argument("--max-length", type=int, default=256, help="tokens per example; longer ones are truncated")
    what.add_argument("--targets", nargs="+", metavar="NAME",
                      help="leaf names of the linears to adapt, e.g. q_proj v_proj (default: every target)")
    opts = p.add_argument_group("method options (per method: see the list below)")
    opts.add_argument("--rank", type=int, help="rank r (default: the method's)")
    opts.add_argument("--alpha", type=float, help="scale numerator alpha (default: the method's)")
    opts.add_argument("--dropout", type=float, help="dropout on the adapter's input (default: the method's)")
    opts.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other method option (repeatable)")
    loop = p.add_argument_group("optimisation")
    loop.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of AdamW (default 2e-4)")
    loop.add_argument("--epochs", type=float, default=1.0, help="passes over the data, may be fractional (default 1)")
    loop.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    loop.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch (default 8)")
    loop.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    loop.add_argument("--lr-scheduler", choices=SCHEDULERS,
                      help="decay after the warmup (default linear); refused for aroma, which has its own")
    loop.add_argument("--warmup-ratio", type=float,
                      help="share of the steps spent warming up (default 0.06); refused for aroma, which sets "
                           "its warmups with --set first_warmup / restart_warmup")
    loop.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    loop.add_argument("--seed", type=int, default=0, help="initialisation, data order and dropout (default 0)")
    dev = p.add_argument_group("device")
    dev.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N] (default auto)")
    dev.add_argument("--dtype", default="auto",
                     help="the base's dtype: auto (bfloat16 on cuda, float32 on cpu), float32 or bfloat16; the "
                          "adapter's parameters and optimizer state stay float32")
    dev.add_argument("--gradient-checkpointing", action="store_true",
                     help="recompute the base's activations in the backward pass (less memory, more time)")
    dev.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    runs = p.add_argument_group("evaluation, checkpoints and resuming")
    runs.add_argument("--eval-every", type=int,
                     help="optimizer steps between evaluations; the best one is written to <stem>.best.safetensors")
    runs.add_argument("--save-every", type=int, help="optimizer steps between checkpoints (in --checkpoint-dir)")
    runs.add_argument("--save-total-limit", type=int, default=2, help="step checkpoints kept, 0 = all (default 2)")
    runs.add_argument("--checkpoint-dir", help="default: <stem>.checkpoints next to --out")
    runs.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                     help="continue from a checkpoint file, or from the newest in a directory (no value: "
                          "--checkpoint-dir); the rest of the command must match the interrupted run")
    runs.add_argument("--no-progress", action="store_true", help="no progress bar")
    serve = p.add_argument_group("serving")
    serve.add_argument("--server-max-rank", type=int, default=SERVER_MAX_RANK,
                       help=f"the server's --max-rank; the adapter is checked against it before training "
                            f"(default {SERVER_MAX_RANK}, the server's default)")
    serve.add_argument("--push", metavar="URL", help="upload the result to a running rankserve server")
    serve.add_argument("--adapter-id", help="id for --push (default: the --out file stem)")
    serve.add_argument("--api-key", default=os.environ.get("RANKSERVE_API_KEY"),
                       help="bearer key for --push (default: $RANKSERVE_API_KEY)")
    return p


def run(args: argparse.Namespace) -> dict:
    from adapters_store.basemodels import load_base
    from trainer.checkpoint import load_adapter_state
    from trainer.data import build_datasets, read_records, split_records
    from trainer.export import build_adapter, served_width, write_adapter
    from trainer.loop import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    stem = out.with_suffix("") if out.suffix == ".safetensors" else out
    ckpt_dir = args.checkpoint_dir or str(stem) + ".checkpoints"
    options = method_options(args.method, args)
    mcfg = make_config(args.method, **options)  # every option checked before the base loads
    problem = fit_problem(args.method, planned_width(mcfg), args.server_max_rank, "before training:")
    if problem:
        raise ValueError(problem)
    cfg = TrainConfig(method=args.method, task=args.task, method_options=options,
                      targets=tuple(args.targets) if args.targets else None, lr=args.lr, epochs=args.epochs,
                      max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      warmup_ratio=args.warmup_ratio, lr_scheduler=args.lr_scheduler,
                      weight_decay=args.weight_decay, seed=args.seed, eval_every=args.eval_every,
                      progress=not args.no_progress, device=args.device, dtype=args.dtype,
                      gradient_checkpointing=args.gradient_checkpointing, save_every=args.save_every,
                      save_total_limit=args.save_total_limit, checkpoint_dir=ckpt_dir,
                      resume_from=(args.resume or ckpt_dir) if args.resume is not None else None,
                      log_path=str(stem) + ".log.jsonl")
    base = load_base(args.model)
    records = read_records(args.data)
    if args.eval_data:
        train_records, eval_records = records, read_records(args.eval_data)
    else:
        stratify = "label" if args.task == "classify" else None
        train_records, eval_records = split_records(records, args.eval_split, args.seed, stratify)
    eval_note = None
    if not eval_records:
        eval_records, eval_note = train_records, "no held-out records: evaluated on the training set"
    train_set, eval_set, labels = build_datasets(args.task, base.tokenizer, train_records, eval_records, args.max_length)

    result = train(base, train_set, eval_set, cfg, labels)
    adapter = build_adapter(base, result, args.method, args.task)
    size = write_adapter(adapter, out, base)
    log = {**result.log, "out": str(out), "file_bytes": size, "ranks": adapter.meta.ranks,
           "exported_adapter_params": adapter.meta.training["exported_adapter_params"]}
    late = fit_problem(args.method, served_width(adapter), args.server_max_rank, f"{out} is written, but")
    if late:  # AROMA grows while it trains: its width is only known now
        print(f"rankserve-train: warning: {late}", file=sys.stderr)
        log["server_fit_warning"] = late
    if eval_note:
        log["eval_note"] = eval_note
    if result.best_state is not None:
        load_adapter_state(result.layers, result.head, result.best_state, "cpu")
        best_path = Path(str(stem) + ".best.safetensors")
        write_adapter(build_adapter(base, result, args.method, args.task, picked=result.log["best_eval"]), best_path, base)
        log["best_out"] = str(best_path)
    if args.method in ("adalora", "aroma"):
        from trainer.plots import plot_ranks

        pngs = plot_ranks(adapter.meta.ranks, sorted(result.layers), result.log["rank_history"], stem,
                          f"{args.method} on {args.model}")
        log["plots"] = [str(p) for p in pngs]
    if args.push:
        from trainer.push import push_adapter

        log["pushed"] = push_adapter(out, args.push, args.adapter_id or stem.name, args.api_key)
    Path(str(stem) + ".train.json").write_text(json.dumps(log, indent=1, default=str))
    return log


def main(argv: typing.Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        log = run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"rankserve-train: error: {e}", file=sys.stderr)
        return 2
    final = log["final_eval"]
    metric = f" accuracy {final['accuracy']:.4f}" if "accuracy" in final else ""
    print(f"wrote {log['out']} ({log['file_bytes']} bytes, {log['exported_adapter_params']} adapter params) "
          f"after {log['steps']} steps: eval loss {log['initial_eval']['loss']:.4f} -> {final['loss']:.4f}{metric}")
    if "best_out" in log:
        print(f"wrote {log['best_out']} (the best evaluation, step {log['best_eval']['step']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
