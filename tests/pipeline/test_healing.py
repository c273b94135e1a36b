"""Healing: each method lowers the loss it trains, keeps the factorised structure, obeys the budget."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from rankwise.layers.factorized import FactorizedLinear
from rankwise.pipeline import distill_loss, heal_

VOCAB = 96


@pytest.fixture
def small(make_llama):
    return make_llama(VOCAB)


@pytest.fixture
def compressed(small):
    from rankwise.compress import compress_

    compress_(small, "lord", 0.3, progress=False)
    return small


@pytest.fixture
def stream():
    """A learnable text: a fixed random 23-token phrase repeated, with some noise tokens."""
    g = torch.Generator().manual_seed(0)
    phrase = torch.randint(0, VOCAB, (23,), generator=g)
    s = phrase.repeat(200)
    noise = torch.rand(s.shape, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, s.shape, generator=g), s)


def _lm_loss(model, stream, seq_len=64):
    windows = stream[: (stream.numel() // seq_len) * seq_len].view(-1, seq_len)
    with torch.no_grad():
        return model(windows, labels=windows).loss.item()


def _shapes(model):
    return {n: (m.A.weight.shape, m.B.weight.shape) for n, m in model.named_modules()
            if isinstance(m, FactorizedLinear)}


@pytest.mark.parametrize("method", ["lowrank", "lora"])
def test_healing_lowers_the_training_loss_and_keeps_the_factors(compressed, stream, method):
    shapes, params = _shapes(compressed), sum(p.numel() for p in compressed.parameters())
    frozen = {n: p.detach().clone() for n, p in compressed.named_parameters() if ".A." not in n and ".B." not in n}
    before = _lm_loss(compressed, stream)
    res = heal_(compressed, stream, method=method, minutes=0, max_steps=25, lr=1e-2 if method == "lora" else 3e-3,
                batch_size=4, seq_len=64, lora_rank=4)
    assert res.steps == 25 and res.tokens == 25 * 4 * 64
    assert _lm_loss(compressed, stream) < before - 0.05
    assert _shapes(compressed) == shapes  # LoRA merged into A and B: same ranks, no adapter left
    assert sum(p.numel() for p in compressed.parameters()) == params
    assert not any(type(m).__name__ == "AdapterLayer" for m in compressed.modules())
    for n, p in compressed.named_parameters():  # only the factors moved
        if n in frozen:
            torch.testing.assert_close(p, frozen[n], rtol=0, atol=0)
    assert not any(p.requires_grad for p in compressed.parameters())


def test_distillation_moves_the_student_towards_the_teacher(compressed, stream, make_llama):
    teacher = make_llama(VOCAB, seed=1)
    ids = stream[:256].view(4, 64)

    def gap():
        with torch.no_grad():
            return distill_loss(compressed(ids, output_hidden_states=True),
                                teacher(ids, output_hidden_states=True), 1.0).item()

    before = gap()
    heal_(compressed, stream, method="distill", teacher=teacher, minutes=0, max_steps=25, lr=3e-3,
          batch_size=4, seq_len=64)
    assert gap() < 0.85 * before


def test_distill_loss_is_zero_for_identical_models_and_positive_otherwise(small, make_llama):
    ids = torch.randint(0, VOCAB, (2, 16))
    out = small(ids, output_hidden_states=True)
    assert abs(distill_loss(out, out, 1.0).item()) < 1e-6
    other = make_llama(VOCAB, seed=1)(ids, output_hidden_states=True)
    assert distill_loss(out, other, 0.0).item() > 0
    assert distill_loss(out, other, 1.0).item() > distill_loss(out, other, 0.0).item()


def test_the_time_budget_is_enforced(compressed, stream):
    budget_s = 1.5
    start = time.perf_counter()
    res = heal_(compressed, stream, method="lowrank", minutes=budget_s / 60, batch_size=4, seq_len=64)
    wall = time.perf_counter() - start
    step = res.seconds / max(res.steps, 1)
    assert res.steps >= 1
    assert res.seconds <= budget_s + 1.5 * step  # a step starts only if it should end in time
    assert wall < budget_s + 5


def test_the_budget_follows_the_given_clock(compressed, stream):
    """A budget counted by another clock (e.g. CPU seconds): a clock that advances 10 s per
    reading stops a 1-minute budget after a handful of steps, whatever the wall clock says."""
    ticks = iter(range(0, 10_000, 10))
    res = heal_(compressed, stream, method="lowrank", minutes=1.0, batch_size=4, seq_len=64,
                clock=lambda: float(next(ticks)))
    assert 1 <= res.steps <= 6
    assert res.seconds <= 90


def test_healing_input_errors(compressed, stream, make_llama):
    with pytest.raises(ValueError, match="needs the dense teacher"):
        heal_(compressed, stream, method="distill", max_steps=1)
    with pytest.raises(ValueError, match="time budget"):
        heal_(compressed, stream, method="lowrank", minutes=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        heal_(compressed, stream[:100], method="lowrank", max_steps=1, seq_len=64)
    with pytest.raises(ValueError, match="no factorised layers"):
        heal_(make_llama(VOCAB), stream, method="lowrank", max_steps=1)


def test_healing_registry_and_pluggable_loss(make_llama):
    from rankwise.compress import compress_
    from rankwise.pipeline import heal_
    from rankwise.pipeline.healing import lm_loss
    from rankwise.registry import registry

    assert registry("healing").names() == ["distill", "lora", "lowrank", "none"]
    stream = torch.randint(0, 96, (4096,), generator=torch.Generator().manual_seed(0))
    runs = []
    for loss_fn in (None, lambda m, ids: 2 * lm_loss(m, ids)):
        model = make_llama(96)
        compress_(model, "lord", 0.3, progress=False)
        runs.append(heal_(model, stream, method="lowrank", minutes=0, max_steps=2, batch_size=2,
                          seq_len=32, loss_fn=loss_fn))
    # same model, same first batch: the plugged-in loss is exactly twice the LM loss
    assert runs[1].curve[0][2] == pytest.approx(2 * runs[0].curve[0][2], rel=1e-6)
    with pytest.raises(ValueError, match="heal method must be one of"):
        heal_(model, stream, method="none", minutes=0, max_steps=1)


def test_healing_ctrl_c_leaves_the_structure_and_reraises(make_llama, monkeypatch):
    from rankwise.compress import compress_
    from rankwise.pipeline import healing

    model = make_llama(96)
    compress_(model, "lord", 0.3, progress=False)
    stream = torch.randint(0, 96, (4096,), generator=torch.Generator().manual_seed(0))

    def interrupt(step, seconds, loss):
        if step == 1:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        healing.heal_(model, stream, method="lora", minutes=0, max_steps=5, batch_size=2,
                      seq_len=32, lora_rank=2, on_step=interrupt)
    assert not any(type(m).__name__ == "AdapterLayer" for m in model.modules())  # merged
    assert not any(p.requires_grad for p in model.parameters())
