"""Focused tests of the fixed-rank methods: LoRA/rsLoRA, DoRA (against PEFT), MoR, EDoRA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adapters_store.semantics import merged_weight, module_forward
from trainer.methods.base import AdapterLayer, MethodConfig, get_method, make_config


def linear(d_in=16, d_out=12, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def wrap(method: str, base: nn.Linear | None = None, **opts):
    torch.manual_seed(1)
    return get_method(method)(base or linear(), make_config(method, **opts)).eval()


def randomise(layer, *names, std=0.3, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            p = getattr(layer, name)
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if name.startswith("lam") else 0.0))


def served(layer, x):
    return module_forward(x, layer.weight, layer.bias, layer.compile())


@pytest.mark.parametrize("method", ["lora", "dora", "mor", "edora"])
def test_starts_as_the_base(method):
    layer = wrap(method, rank=4)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), layer.base(x), atol=1e-3 if method == "edora" else 0, rtol=0)  # EDoRA: R ~ 1e-5, not 0


@pytest.mark.parametrize("rslora,scale", [(False, 16 / 4), (True, 16 / 2)])
def test_lora_scale_is_folded_into_b(rslora, scale):
    layer = wrap("lora", rank=4, alpha=16, rslora=rslora)
    randomise(layer, "lora_B")
    mw = layer.compile()
    torch.testing.assert_close(mw.lora_b, layer.lora_B.detach() * scale)
    torch.testing.assert_close(mw.lora_a, layer.lora_A.detach())
    x = torch.randn(7, 16)
    torch.testing.assert_close(served(layer, x), layer(x), atol=1e-6, rtol=0)


def peft_dora(ours):
    peft = pytest.importorskip("peft")
    holder = nn.Module()
    holder.lin = nn.Linear(ours.d_in, ours.d_out)
    holder.lin.load_state_dict(ours.base.state_dict())
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=ours.cfg.rank, lora_alpha=ours.cfg.alpha, target_modules=["lin"],
                                                         use_dora=True, lora_dropout=0.0), holder)
    with torch.no_grad():
        model.lin.lora_A.default.weight.copy_(ours.lora_A)
        model.lin.lora_B.default.weight.copy_(ours.lora_B)
        model.lin.lora_magnitude_vector.default.weight.copy_(ours.magnitude)
    return model.lin


def test_dora_matches_peft_forward_and_gradients():
    ours = wrap("dora", rank=4, alpha=8).train()
    randomise(ours, "lora_B")
    with torch.no_grad():
        ours.magnitude.mul_(1.1)
    theirs = peft_dora(ours).train()
    x = torch.randn(9, 16)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    # equal gradients also pin the detached norm (DoRA section 4.3): a live norm changes them
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A.default.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B.default.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.magnitude.grad, theirs.lora_magnitude_vector.default.weight.grad, atol=1e-4, rtol=1e-4)


def test_dora_magnitude_init_and_out_scale():
    layer = wrap("dora", rank=4, alpha=8)
    torch.testing.assert_close(layer.magnitude.detach(), layer.weight.norm(dim=1))
    assert torch.allclose(layer.compile().out_scale, torch.ones(12))  # B = 0: g = ||W0|| / ||W0||
    randomise(layer, "lora_B", "magnitude")
    mw = layer.compile()
    assert mw.out_scale.dtype == torch.float32
    want = layer.magnitude.detach() / (layer.weight + 2.0 * layer.lora_B @ layer.lora_A).detach().norm(dim=1)
    torch.testing.assert_close(mw.out_scale, want)
    x = torch.randn(6, 16)
    torch.testing.assert_close(served(layer, x), layer(x), atol=1e-5, rtol=0)
    # and it merges exactly: W' = g (W0 + sBA)
    torch.testing.assert_close(x @ merged_weight(layer.weight.detach(), mw).T + layer.bias, layer(x).detach(), atol=1e-5, rtol=0)


def mor_literal(layer, x):
    """The paper's sum, term by term: W0 x + sum_i G_i(x) s diag(lamB_i) B diag(lamA_i) A x + b."""
    s = layer.cfg.alpha / layer.cfg.rank
    g = torch.softmax(x @ layer.gate.T, dim=-1)  # [T, N]
    y = layer.base(x)
    for i in range(layer.cfg.num_experts):
        d_i = s * torch.diag(layer.lam_b[i]) @ layer.lora_B @ torch.diag(layer.lam_a[i]) @ layer.lora_A
        y = y + g[:, i : i + 1] * (x @ d_i.T)
    return y


def test_mor_forward_and_compile_equal_the_literal_mixture():
    layer = wrap("mor", rank=3, num_experts=4, alpha=6)
    randomise(layer, "lora_B", "lam_a", "lam_b", "gate")
    x = torch.randn(10, 16)
    with torch.no_grad():
        literal = mor_literal(layer, x)
        torch.testing.assert_close(layer(x), literal, atol=1e-5, rtol=0)
        mw = layer.compile()  # the compact form: the shared sB and lamB, not B'
        assert mw.lora_b.shape == (12, 3) and mw.expert_out_scale.shape == (4, 12)
        assert mw.gate.shape == (4, 16) and mw.rank_scale.shape == (4, 3) and mw.effective_rank == 4 * 3
        torch.testing.assert_close(mw.lora_b, layer.scale * layer.lora_B)
        torch.testing.assert_close(served(layer, x), literal, atol=1e-5, rtol=0)
        # expanded, it is the B' training multiplies by, bitwise (one function computes both)
        wide = mw.expanded()
        assert wide.expert_out_scale is None and wide.lora_b.shape == (12, 4 * 3)
        assert torch.equal(wide.lora_b, layer.expert_up())
        torch.testing.assert_close(module_forward(x, layer.weight, layer.bias, wide), literal, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="MoR"):
        merged_weight(layer.weight, mw)
    with pytest.raises(ValueError, match="MoR"):
        merged_weight(layer.weight, wide)


def test_mor_exports_the_compact_form():
    """The file holds r(d_in + d_out) + N(d_in + r + d_out) values, not B''s N*r*d_out."""
    layer = wrap("mor", base=linear(16, 24), rank=3, num_experts=4)
    exported = sum(t.numel() for t in layer.compile().tensors().values())
    assert exported == 3 * 16 + 3 * 24 + 4 * 24 + 4 * 16 + 4 * 3
    assert exported == sum(p.numel() for p in layer.parameters() if p.requires_grad)  # exactly what is trained


def test_mor_served_width_n_times_r_is_the_method_not_the_format():
    """docs/METHODS.md: B' = s[diag(lamB_i) B]_i has full column rank N*r once the lamB_i differ (d_out >= N*r),
    so no narrower exact serving form exists; with equal lamB_i (the init) it collapses to rank r."""
    layer = wrap("mor", base=linear(16, 24), rank=3, num_experts=4)
    randomise(layer, "lora_B")
    with torch.no_grad():
        assert torch.linalg.matrix_rank(layer.expert_up()) == 3  # lamB = 1 everywhere: N copies of s B
        randomise(layer, "lam_b", seed=3)
        assert torch.linalg.matrix_rank(layer.expert_up()) == 4 * 3
        trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert trainable == 3 * (16 + 24) + 4 * (3 + 16 + 24)  # r(d_in+d_out) + N(r + d_in + d_out)
        # the file stores sB and lamB (docs/FORMAT.md); B' is their function, expert-major columns
        rebuilt = torch.cat([layer.scale * layer.lam_b[i, :, None] * layer.lora_B for i in range(4)], dim=1)
        torch.testing.assert_close(layer.compile().expanded().lora_b, rebuilt, atol=1e-6, rtol=0)


def test_mor_router_init_breaks_expert_symmetry():
    layer = wrap("mor", rank=3, num_experts=4).train()
    assert layer.gate.abs().sum() > 0
    randomise(layer, "lora_B")  # after the first step B is no longer zero
    layer(torch.randn(8, 16)).square().sum().backward()
    grads = layer.lam_a.grad  # [N, r]
    assert not torch.allclose(grads[0], grads[1])
    assert layer.gate.grad.abs().sum() > 0


def test_edora_svd_init():
    base = linear(24, 20)
    layer = wrap("edora", base, rank=5, alpha=10)
    b, a = layer.lora_B, layer.lora_A
    torch.testing.assert_close(b.T @ b, torch.eye(5), atol=1e-5, rtol=0)  # orthonormal left vectors
    s = torch.linalg.svdvals(base.weight.detach())
    residual = (base.weight.detach() - b @ a).norm() ** 2
    assert math.isclose(float(residual), float((s[5:] ** 2).sum()), rel_tol=1e-4)  # Eckart-Young optimum
    torch.testing.assert_close(layer.magnitude.detach(), base.weight.detach().norm(dim=1))
    trainable = {n: p.numel() for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_R": 25, "magnitude": 20}  # r^2 + d_out
    r = layer.lora_R.detach()
    assert 1e-6 < float(r.std()) < 1e-4 and float(r.abs().sum()) > 0


def test_edora_folds_r_into_b():
    layer = wrap("edora", rank=4, alpha=8)
    randomise(layer, "lora_R", "magnitude", std=0.1)
    mw = layer.compile()
    torch.testing.assert_close(mw.lora_b, 2.0 * layer.lora_B @ layer.lora_R.detach())
    torch.testing.assert_close(mw.lora_a, layer.lora_A)
    x = torch.randn(6, 16)
    torch.testing.assert_close(served(layer, x), layer(x).detach(), atol=1e-5, rtol=0)


def test_edora_rank_larger_than_the_weight_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        wrap("edora", linear(4, 12), rank=8)


def test_unknown_options_name_the_valid_ones():
    with pytest.raises(ValueError, match="num_experts"):
        make_config("mor", experts=4)
    with pytest.raises(ValueError, match="unknown method"):
        get_method("ia3")


def test_a_method_without_compile_cannot_be_instantiated():
    class ForwardOnly(AdapterLayer):
        def forward(self, x):
            return self.base(x)

    with pytest.raises(TypeError, match="compile"):
        ForwardOnly(nn.Linear(4, 4), MethodConfig())
