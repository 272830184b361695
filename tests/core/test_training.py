"""Training semantics: each sample trains only its own interval's scales."""

from __future__ import annotations

import torch
from torch import nn

from tests.core.helpers import perturbed_adapter
from tuneqdm_core import Adapter, AdapterConfig, QuantConfig, param_groups, quantize_, use_adapter


def _model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))
    quantize_(model, QuantConfig(bits=4))
    return model


def _step(
    model: nn.Module, adapter: Adapter, opt: torch.optim.Optimizer, timesteps: list[int]
) -> None:
    use_adapter(model, adapter, timesteps)
    x = torch.randn(len(timesteps), 4, 6, 6)
    loss = model(x).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def test_only_the_sampled_intervals_get_gradients() -> None:
    model = _model()
    adapter = Adapter.create(model, AdapterConfig(intervals=4))
    use_adapter(model, adapter, [10, 260, 270])  # intervals 0, 1, 1
    model(torch.randn(3, 4, 6, 6)).sum().backward()
    got = [p.grad is not None for p in adapter.s_out]
    assert got == [True, True, False, False]
    assert [p.grad is not None for p in adapter.s_in] == got


def test_adamw_step_leaves_unused_intervals_exactly_unchanged() -> None:
    model = _model()
    adapter = Adapter.create(model, AdapterConfig(intervals=2, init_sigma=0.01))
    # Weight decay on purpose: it must not reach an interval that had no sample either.
    groups = param_groups(adapter, lr_s_out=1e-3, lr_s_in=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(groups)
    _step(model, adapter, opt, [100, 900])  # both intervals now carry AdamW momentum
    before = [p.detach().clone() for p in adapter.parameters()]
    _step(model, adapter, opt, [100, 300])  # interval 0 only
    after = list(adapter.parameters())
    s_out0, s_out1, s_in0, s_in1 = range(4)
    assert torch.equal(before[s_out1], after[s_out1])
    assert torch.equal(before[s_in1], after[s_in1])
    assert not torch.equal(before[s_out0], after[s_out0])
    assert not torch.equal(before[s_in0], after[s_in0])


def test_param_groups_separate_learning_rates_and_no_decay_by_default() -> None:
    model = _model()
    groups = param_groups(Adapter.create(model, AdapterConfig(intervals=2)), 1e-3, 0.5)
    assert [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        ("s_out", 1e-3, 0.0, 2),
        ("s_in", 0.5, 0.0, 2),
    ]
    peqa = Adapter.create(model, AdapterConfig(method="peqa", intervals=1))
    assert [g["name"] for g in param_groups(peqa, 1e-3, 0.5)] == ["s_out"]
    assert not peqa.has_s_in


def test_loss_falls_when_fitting_a_reachable_target() -> None:
    model = _model()
    timesteps = [100, 400, 600, 900]
    teacher = perturbed_adapter(model, AdapterConfig(intervals=2), spread=0.3)
    x = torch.randn(4, 4, 6, 6)
    with torch.no_grad():
        use_adapter(model, teacher, timesteps)
        target = model(x)
    adapter = Adapter.create(model, AdapterConfig(intervals=2))
    opt = torch.optim.AdamW(param_groups(adapter, 3e-3, 3e-2))
    losses = []
    for _ in range(60):
        use_adapter(model, adapter, timesteps)
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]


def test_interval_boundaries_follow_the_paper() -> None:
    config = AdapterConfig(intervals=2)
    assert config.boundaries() == [(0, 500), (500, 1000)]
    assert [config.interval_of(t) for t in (0, 499, 499.9, 500, 999)] == [0, 0, 0, 1, 1]
    three = AdapterConfig(intervals=3)
    assert three.boundaries() == [(0, 334), (334, 667), (667, 1000)]
    assert [three.interval_of(t) for t in (333, 334, 666, 667)] == [0, 1, 1, 2]


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    from torch.utils.checkpoint import checkpoint

    model = _model()
    adapter = Adapter.create(model, AdapterConfig(intervals=2, init_sigma=0.1))
    x = torch.randn(2, 4, 6, 6)
    use_adapter(model, adapter, [100, 900])
    model(x).pow(2).sum().backward()
    plain = [p.grad.clone() for p in adapter.parameters() if p.grad is not None]
    adapter.zero_grad(set_to_none=True)
    checkpoint(model, x, use_reentrant=False).pow(2).sum().backward()
    checkpointed = [p.grad for p in adapter.parameters() if p.grad is not None]
    assert len(plain) == len(checkpointed) == 4
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
