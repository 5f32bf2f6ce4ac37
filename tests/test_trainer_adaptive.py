"""Focused tests of the rank-adaptive methods: AdaLoRA (budget, masking, PEFT parity) and AROMA
(inner/outer decisions on crafted inputs, stacked export, optimizer reset, stopping, schedule)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapters_store.semantics import module_forward
from trainer.export import compile_modules
from trainer.methods.adalora import AdaLoRAConfig, AdaLoRAController, AdaLoRALinear
from trainer.methods.aroma import AROMAConfig, AROMAController, AROMALinear, cosine_restarts, prune_moments


def adalora_layers(n=2, init_r=6, rank=3, d=(16, 12), **opts):
    torch.manual_seed(0)
    cfg = AdaLoRAConfig(rank=rank, init_r=init_r, alpha=8, **opts)
    return {f"m{i}": AdaLoRALinear(nn.Linear(*d), cfg) for i in range(n)}, cfg


# ---------------------------------------------------------------- AdaLoRA


def test_adalora_budget_schedule_values():
    layers, cfg = adalora_layers(init_r=12, rank=8, tinit=10, tfinal=20, delta_t=5)
    ctl = AdaLoRAController(layers, cfg, total_steps=100)
    assert (ctl.init_budget, ctl.target_budget) == (24, 16)
    assert ctl.budget_schedule(0) == (24, False) and ctl.budget_schedule(10) == (24, False)
    # t = 15: 16 + 8 (1 - 5/70)^3 = 22.40 -> 22, and 15 % deltaT == 0 masks
    assert ctl.budget_schedule(15) == (22, True)
    assert ctl.budget_schedule(16) == (int(16 + 8 * (1 - 6 / 70) ** 3), False)
    assert ctl.budget_schedule(80) == (16, True)  # t = T - tfinal: the target
    assert ctl.budget_schedule(95) == (16, True)
    budgets = [ctl.budget_schedule(t)[0] for t in range(101)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False))  # never grows


def test_adalora_schedule_defaults_and_refusal():
    layers, cfg = adalora_layers()
    ctl = AdaLoRAController(layers, cfg, total_steps=200)
    assert (ctl.tinit, ctl.tfinal) == (20, 100)
    with pytest.raises(ValueError, match="tinit"):
        AdaLoRAController(layers, AdaLoRAConfig(rank=3, init_r=6, tinit=50, tfinal=50), total_steps=100)


def test_adalora_global_threshold_masks_the_least_important_triplets():
    layers, cfg = adalora_layers(init_r=4, rank=2)
    ctl = AdaLoRAController(layers, cfg, total_steps=100)
    # crafted importance: every entry of m0 scores high, m1's triplets score 0.1, 0.2, 5, 6
    for path, layer in layers.items():
        for name in ("lora_A", "lora_E", "lora_B"):
            p = getattr(layer, name)
            ctl.ipt_avg[f"{path}.{name}"] = torch.ones_like(p)
            ctl.unc_avg[f"{path}.{name}"] = torch.full_like(p, 10.0) if path == "m0" else torch.zeros_like(p)
        with torch.no_grad():
            layer.lora_E.fill_(1.0)
    ctl.unc_avg["m1.lora_E"] = torch.tensor([[0.1], [0.2], [5.0], [6.0]])
    ctl.mask_to_budget(6)  # 8 triplets, keep 6: the two weakest go, both in m1
    assert layers["m0"].kept.tolist() == [True] * 4
    assert layers["m1"].kept.tolist() == [False, False, True, True]
    assert layers["m1"].lora_E.detach().view(-1).tolist() == [0.0, 0.0, 1.0, 1.0]
    mw = layers["m1"].compile()
    assert mw.rank == 2
    # ranknum stays init_r: the scale is alpha / (init_r + 1e-5) whatever the kept rank
    torch.testing.assert_close(mw.lora_b, layers["m1"].lora_B.detach()[:, 2:] * 8 / (4 + 1e-5))
    torch.testing.assert_close(mw.lora_a, layers["m1"].lora_A.detach()[2:])  # E = 1 folded in
    x = torch.randn(5, 16)
    torch.testing.assert_close(module_forward(x, layers["m1"].weight, layers["m1"].bias, mw), layers["m1"](x).detach(),
                               atol=1e-6, rtol=0)


def test_adalora_fully_masked_module_is_left_out():
    layers, _ = adalora_layers()
    with torch.no_grad():
        layers["m0"].lora_E.fill_(0.5)
    assert layers["m1"].compile() is None
    assert set(compile_modules(layers)) == {"m0"}


def test_adalora_regulariser_is_the_mean_unsquared_frobenius_norm():
    layers, cfg = adalora_layers(orth_reg_weight=0.5)
    ctl = AdaLoRAController(layers, cfg, total_steps=100)
    terms = []
    for layer in layers.values():
        a, b = layer.lora_A.detach(), layer.lora_B.detach()
        terms += [(a @ a.T - torch.eye(6)).norm(), (b.T @ b - torch.eye(6)).norm()]
    torch.testing.assert_close(ctl.regularizer().detach(), 0.5 * torch.stack(terms).mean())


def test_adalora_allocation_matches_peft_step_by_step():
    peft = pytest.importorskip("peft")
    from peft.tuners.adalora.model import AdaLoraModel

    total, tinit, tfinal, delta_t = 30, 4, 8, 2
    layers, cfg = adalora_layers(init_r=6, rank=3, tinit=tinit, tfinal=tfinal, delta_t=delta_t)
    ours = AdaLoRAController(layers, cfg, total_steps=total)
    holder = nn.Module()
    holder.m0, holder.m1 = nn.Linear(16, 12), nn.Linear(16, 12)
    theirs = AdaLoraModel(holder, peft.AdaLoraConfig(init_r=6, target_r=3, total_step=total, tinit=tinit, tfinal=tfinal,
                                                     deltaT=delta_t, lora_alpha=8, target_modules=["m0", "m1"]), "default")
    pairs = []
    for path, layer in layers.items():
        peft_layer = getattr(theirs.model, path)
        for name in ("lora_A", "lora_E", "lora_B"):
            p_theirs = getattr(peft_layer, name)["default"]
            with torch.no_grad():
                p_theirs.copy_(getattr(layer, name))
            pairs.append((getattr(layer, name), p_theirs))
    gen = torch.Generator().manual_seed(3)
    for step in range(total):
        for p_ours, p_theirs in pairs:  # the same gradient and the same plain SGD update on both
            g = torch.randn(p_ours.shape, generator=gen)
            p_ours.grad, p_theirs.grad = g.clone(), g.clone()
            with torch.no_grad():
                p_ours.sub_(0.05 * g)
                p_theirs.sub_(0.05 * g)
        ours.after_optimizer_step(step, optimizer=None)
        theirs.update_and_allocate(step)
        for p_ours, p_theirs in pairs:
            torch.testing.assert_close(p_ours.detach(), p_theirs.detach(), atol=1e-6, rtol=0, msg=f"step {step}")
    assert ours.total_rank() == 6 == sum(int((layer.lora_E != 0).sum()) for layer in layers.values())


# ---------------------------------------------------------------- AROMA


def aroma_layer(seed=0, **opts) -> AROMALinear:
    torch.manual_seed(seed)
    base = dict(rank=2, alpha=4, dropout=0.0, check_every=2, max_inner_steps=10, eps_in=0.1, eps_out=0.05)
    return AROMALinear(nn.Linear(16, 12), AROMAConfig(**{**base, **opts}))


def optimizer_for(layers: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for m in layers.values() for p in m.parameters() if p.requires_grad])


def set_live(layer: AROMALinear, b_std: float, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * b_std)


def test_aroma_inner_loop_stabilises_on_a_small_relative_change():
    layer = aroma_layer()
    set_live(layer, 0.1)
    assert [layer.inner_done() for _ in range(2)] == [False, False]  # step 2: first check, reference only
    with torch.no_grad():
        layer.lora_B.mul_(1.01)  # 1% change < eps_in
    assert layer.inner_done() is False  # step 3: not a check step
    assert layer.inner_done() is True and layer.stabilized
    assert layer.inner_done() is True  # sticky until the reset


def test_aroma_inner_loop_times_out_when_the_component_keeps_moving():
    layer = aroma_layer()
    set_live(layer, 0.1)
    done = []
    for _step in range(10):
        with torch.no_grad():
            layer.lora_B.mul_(2.0)  # 100% relative change at every check
        done.append(layer.inner_done())
    assert done == [False] * 9 + [True] and not layer.stabilized


def test_aroma_resets_only_when_every_module_is_done():
    layers = {"a": aroma_layer(0), "b": aroma_layer(1)}
    ctl = AROMAController(layers, layers["a"].cfg, total_steps=100)
    opt = optimizer_for(layers)
    set_live(layers["a"], 0.1)
    set_live(layers["b"], 0.1)
    for step in range(4):  # a is frozen: it stabilises at step 4; b moves every step
        with torch.no_grad():
            layers["b"].lora_B.mul_(1.5)
        ctl.after_optimizer_step(step, opt)
    assert layers["a"].stabilized and not ctl.resets
    for step in range(4, 10):
        with torch.no_grad():
            layers["b"].lora_B.mul_(1.5)
        ctl.after_optimizer_step(step, opt)
    assert [r["step"] for r in ctl.resets] == [9] and all(m.num_components == 1 for m in layers.values())
    assert not layers["a"].stabilized and layers["a"].inner_steps == 0  # the inner loop restarts


def test_aroma_outer_loop_accepts_first_then_discards_a_small_component_and_stops_the_module():
    layer = aroma_layer(check_first=False)
    set_live(layer, 1e-6)  # tiny, but the released code always accepts the first component
    first_b, first_a = 2.0 * layer.lora_B.detach().clone(), layer.lora_A.detach().clone()
    assert layer.merge_check_and_reinit() == "accepted" and layer.num_components == 1
    assert not layer.lora_B.detach().any()  # B re-zeroed, A re-drawn
    assert not torch.equal(layer.lora_A.detach(), first_a)
    set_live(layer, 1e-4)  # ||sBA|| / ||W0 + merged|| far below eps_out = 0.05
    assert layer.merge_check_and_reinit() == "converged"
    assert layer.converged and layer.num_components == 1 and not layer.lora_A.requires_grad
    x = torch.randn(5, 16)
    set_live(layer, 1.0)  # whatever the dead live pair holds, it no longer counts
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + x @ (first_b @ first_a).T, atol=1e-6, rtol=0)
    assert layer.merge_check_and_reinit() == "idle"


def test_aroma_judges_the_first_component_against_w0_as_the_paper_does():
    layer = aroma_layer()  # check_first (default): c_1 = ||s b_1 a_1|| / ||W0||
    set_live(layer, 1e-6)
    cand = 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    assert layer.merge_check_and_reinit() == "converged"
    assert layer.ratios == pytest.approx([float(cand.norm() / layer.weight.detach().norm())], rel=1e-5)
    assert layer.num_components == 0 and layer.held_rank() == 0 and layer.compile() is None
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x), atol=0, rtol=0)  # the module is back to W0
    big = aroma_layer()
    set_live(big, 0.5)  # ||s B A|| / ||W0|| well above eps_out = 0.05: accepted as before
    assert big.merge_check_and_reinit() == "accepted" and big.num_components == 1


def test_aroma_stacked_export_equals_the_sum_of_accepted_components():
    layer = aroma_layer(eps_out=1e-3)
    components = []
    for seed in (1, 2, 3):
        set_live(layer, 0.5, seed=seed)
        components.append(2.0 * layer.lora_B.detach() @ layer.lora_A.detach())
        assert layer.merge_check_and_reinit() == "accepted"
    set_live(layer, 0.5, seed=4)  # a live, unconverged component is exported too (as the repo saves it)
    live = 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    mw = layer.compile()
    assert mw.rank == 4 * 2 and layer.held_rank() == 8
    torch.testing.assert_close(mw.lora_b @ mw.lora_a, sum(components) + live, atol=1e-5, rtol=0)
    x = torch.randn(6, 16)
    with torch.no_grad():
        torch.testing.assert_close(module_forward(x, layer.weight, layer.bias, mw), layer(x), atol=1e-5, rtol=0)


def test_aroma_ratio_is_relative_to_the_merged_weight():
    layer = aroma_layer(eps_out=0.0)
    set_live(layer, 0.3, seed=1)
    layer.merge_check_and_reinit()
    set_live(layer, 0.3, seed=2)
    cand = 2.0 * layer.lora_B.detach() @ layer.lora_A.detach()
    merged = layer.weight.detach() + layer.acc_b @ layer.acc_a
    layer.merge_check_and_reinit()
    assert layer.ratios[-1] == pytest.approx(float(cand.norm() / merged.norm()), rel=1e-5)


def test_aroma_optimizer_reset_zeroes_almost_all_lora_moments_only():
    layer = aroma_layer()
    head = nn.Linear(12, 3)
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B, *head.parameters()], lr=1e-3)
    torch.manual_seed(0)
    for _ in range(2):
        (head(layer(torch.randn(64, 16)))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    head_before = opt.state[head.weight]["exp_avg"].clone()
    prune_moments(opt, [layer.lora_A, layer.lora_B], 0.999)
    for p in (layer.lora_A, layer.lora_B):
        for key in ("exp_avg", "exp_avg_sq"):
            assert float((opt.state[p][key] == 0).float().mean()) > 0.98
    assert torch.equal(opt.state[head.weight]["exp_avg"], head_before)


def test_aroma_stops_when_every_module_converged_for_patience_resets():
    layers = {"a": aroma_layer(0, max_inner_steps=2, patience=2), "b": aroma_layer(1, max_inner_steps=2, patience=2)}
    ctl = AROMAController(layers, layers["a"].cfg, total_steps=100)
    opt = optimizer_for(layers)
    step = 0
    while not ctl.should_stop() and step < 20:
        for m in layers.values():
            set_live(m, 1e-5 if m.num_components else 0.5, seed=step)
        ctl.after_optimizer_step(step, opt)
        step += 1
    assert ctl.should_stop()
    assert [r["converged"] for r in ctl.resets] == [0, 2, 2]  # accepted, converged, converged again
    assert all(m.num_components == 1 for m in layers.values())


def test_aroma_cosine_restarts_schedule():
    f = lambda s: cosine_restarts(s, total=400, first_warmup=100, restart_warmup=50, cycle=200, min_ratio=0.1)  # noqa: E731
    assert f(0) == 0 and f(50) == pytest.approx(0.5) and f(100) == pytest.approx(1.0)
    assert f(199) < f(150) < f(100)
    assert f(200) == 0  # a restart re-warms from zero on the fixed cadence
    assert 0 < f(225) < f(249)
    assert f(399) == pytest.approx(0.1, abs=1e-3)  # the cosine floor is min_lr_ratio


def test_aroma_warmup_longer_than_the_cycle_is_refused():
    layer = aroma_layer(max_inner_steps=10, first_warmup=20)
    with pytest.raises(ValueError, match="first_warmup"):
        AROMAController({"a": layer}, layer.cfg, total_steps=100)
