"""MoR's compact file form, and its one expansion into the serving form.

MoR's up-projection is B' = s [diag(lamB_1) B | ... | diag(lamB_N) B]  [d_out, N*r]: every expert's
block is the ONE shared B [d_out, r] with its rows scaled by that expert's lamB_i [d_out]. A file may
therefore store, instead of B' (N*r*d_out values),

    M.lora_b            [d_out, r]   s B, the method's scale folded in
    M.expert_out_scale  [N, d_out]   lamB (Omega_B): row i scales the rows of lora_b for expert i

(r*d_out + N*d_out values), beside ``M.gate`` and ``M.rank_scale``. The loader expands it once:

    B'[o, i*r + j] = expert_out_scale[i, o] * lora_b[o, j]        (expert-major columns, as in an expanded file)

one product per element, rounded once in the file's dtype, so the expansion is exact: in fp32 it equals,
bitwise, the trainer's own B' (``trainer/methods/mor.py`` computes B' with this same function).
Everything past the loader sees B' only.
"""

from __future__ import annotations

import torch

KEY = "expert_out_scale"


def expert_up(lora_b: torch.Tensor, expert_out_scale: torch.Tensor) -> torch.Tensor:
    """B' = [diag(e_1) b | ... | diag(e_N) b] for b [d_out, r] and e [N, d_out] -> [d_out, N*r].

    Built as [d_out, N, r] directly (no permute, so one allocation), differentiable for the trainer."""
    d_out = lora_b.shape[0]
    return (expert_out_scale.T[:, :, None] * lora_b[:, None, :]).reshape(d_out, -1)  # [d_out, N*r]


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def compact_problems(path: str, lora_a: torch.Tensor, lora_b: torch.Tensor, gate: torch.Tensor,
                     expert_out_scale: torch.Tensor) -> list[str]:
    """What keeps a compact module from expanding: its tensors must agree with each other (N from
    ``gate``, r from ``lora_a``, d_out from ``lora_b``) and share one dtype. Checks against the base model,
    the caps and the values come after, in ``adapters_store.validate``."""
    e_name, b_name = f"{path}.{KEY}", f"{path}.lora_b"
    problems = [f"{path}.{key}: expected 2 dimensions, got shape {_shape(t)}"
                for key, t in (("lora_a", lora_a), ("lora_b", lora_b), ("gate", gate), (KEY, expert_out_scale))
                if t.dim() != 2]
    if problems:
        return problems
    n, r, d_out = gate.shape[0], lora_a.shape[0], lora_b.shape[0]
    if lora_b.shape[1] != r:
        problems.append(f"{b_name}: shape {_shape(lora_b)}, expected [{d_out}, {r}]: beside {e_name} (MoR's compact "
                        f"form) lora_b is the shared B, as wide as {path}.lora_a has rows (r={r}), not N*r")
    if _shape(expert_out_scale) != [n, d_out]:
        problems.append(f"{e_name}: shape {_shape(expert_out_scale)}, expected [{n}, {d_out}] "
                        f"(experts={n} from {path}.gate, d_out={d_out} from {b_name})")
    if expert_out_scale.dtype != lora_b.dtype:
        problems.append(f"{e_name}: dtype {str(expert_out_scale.dtype).removeprefix('torch.')}, expected "
                        f"{b_name}'s {str(lora_b.dtype).removeprefix('torch.')} (the expansion multiplies them)")
    return problems


def expanded_numel(lora_b: torch.Tensor, expert_out_scale: torch.Tensor) -> int:
    """Values of B' once expanded: d_out * N * r."""
    return int(lora_b.shape[0]) * int(expert_out_scale.shape[0]) * int(lora_b.shape[-1])
