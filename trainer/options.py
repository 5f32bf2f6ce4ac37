"""Method options on the command line: ``--set KEY=VALUE`` typed by the method's config dataclass, and
the per-method option list that ``rankserve-train --help`` prints.

Every field of every method's config has a line in :data:`OPTION_HELP` (a test checks it), so a new
field cannot reach the CLI undocumented.
"""

from __future__ import annotations

import argparse
import dataclasses

from trainer.methods.base import REGISTRY, get_method

OPTION_HELP = {
    "rank": "rank r of the low-rank pair (adalora: the target rank per module; aroma: one component's rank)",
    "alpha": "scale numerator: s = alpha / r (rslora: alpha / sqrt(r); adalora: alpha / (init_r + 1e-5))",
    "dropout": "dropout on the adapter branch's input",
    "rslora": "rsLoRA scale alpha / sqrt(r)",
    "init_r": "initial rank per module before pruning (default ceil(1.5 * rank))",
    "tinit": "steps at the full budget before pruning starts (default 10% of the steps)",
    "tfinal": "steps at the final budget after the forced final mask (default 50% of the steps; 0 allowed)",
    "delta_t": "steps between budget masks",
    "beta1": "importance smoothing in [0, 1]",
    "beta2": "uncertainty smoothing in [0, 1]",
    "orth_reg_weight": "weight of the orthogonality penalty on A and B",
    "eps_in": "inner loop: a component is stable when ||BA - BA_prev|| / ||BA_prev|| < eps_in",
    "eps_out": "outer loop: a module converges when ||s b a|| / ||W0 + merged|| < eps_out",
    "check_first": "judge the first component with the outer test too (the paper); false keeps it always, as the authors' code does",
    "check_every": "steps between inner-loop stability checks",
    "max_inner_steps": "steps after which a component counts as done even if not stable",
    "window": "outer ratios averaged over this many resets",
    "patience": "stop when every module has converged for this many resets in a row",
    "cycle_length": "lr restart cadence in steps (default max_inner_steps)",
    "first_warmup": "lr warmup steps at the start (default min(100, cycle / 2)); aroma's own schedule",
    "restart_warmup": "lr warmup steps after each restart (default min(50, cycle / 4))",
    "min_lr_ratio": "the cosine's floor as a share of --lr",
    "moment_prune": "share of Adam moment entries zeroed at each reset",
    "num_experts": "experts N over the shared pair (the served width is rank x N)",
    "r_std": "std of the trainable r x r core R at init",
}


def parse_value(raw: str, hint: str):
    """A --set value by its dataclass annotation (``int``, ``float | None``, ``bool``, ``str``)."""
    if "None" in hint and raw.lower() in ("none", "null"):
        return None
    if hint.startswith("bool"):
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected a boolean, got {raw!r}")
        return raw.lower() in ("true", "1", "yes")
    for name, conv in (("int", int), ("float", float)):
        if hint.startswith(name):
            return conv(raw)
    return raw


def method_options(method: str, args: argparse.Namespace) -> dict:
    """The method's option values from --rank/--alpha/--dropout and every --set KEY=VALUE."""
    cls = get_method(method).Config
    hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    opts = {k: getattr(args, k) for k in ("rank", "alpha", "dropout") if getattr(args, k) is not None}
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep or key not in hints:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of {method}'s options {sorted(hints)} "
                             "(see rankserve-train --help)")
        try:
            opts[key] = parse_value(raw, hints[key])
        except ValueError as e:
            raise SystemExit(f"--set {key}: {e}") from None
    return opts


def methods_help() -> str:
    """Each method's options, with type, default and meaning (the epilog of ``--help``)."""
    get_method("lora")  # registers every method
    lines = ["method options (--rank, --alpha, --dropout, or --set KEY=VALUE):"]
    for name, layer in sorted(REGISTRY.items()):
        lines.append(f"  {name}:")
        for f in dataclasses.fields(layer.Config):
            text = OPTION_HELP.get(f.name, "")
            lines.append(f"    {f.name} ({f.type}, default {f.default}): {text}")
    return "\n".join(lines)
