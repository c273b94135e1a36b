"""Tests for rankwise.calibrate: statistics equal those of explicitly stored activations."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankwise import calibrate, io

D, FF, VOCAB = 12, 20, 40


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D) for _ in range(4))
        self.gate_proj, self.up_proj, self.down_proj = (
            nn.Linear(D, FF),
            nn.Linear(D, FF),
            nn.Linear(FF, D),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        att = (q @ k.transpose(-1, -2) / D**0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + self.o_proj(att @ v)
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class ToyLM(nn.Module):
    """Causal toy LM: with right padding, real tokens never see the padding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.lm_head = nn.Linear(D, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, input_ids, labels=None, attention_mask=None):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return types.SimpleNamespace(logits=logits, loss=loss)


def _stored_inputs(model: nn.Module, batches: list, names: list[str]) -> dict[str, torch.Tensor]:
    """The honest reference: keep every input of every layer, (tokens, in) fp64."""
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, inp, out, n=n: kept[n].append(
                inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            )
        )
        for n in names
    ]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in kept.items()}


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_gram_and_means_equal_stored_activations() -> None:
    model = ToyLM().eval()
    ids = torch.randint(0, VOCAB, (5, 6))
    stats = calibrate.capture_input_stats(
        model, ids, stats=("gram", "mean", "abs_mean", "abs_max"), batch_size=2, progress=False
    )
    names = [
        f"blocks.{i}.{p}"
        for i in range(2)
        for p in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ]
    assert list(stats) == names  # lm_head (tied) is left out by default
    ref = _stored_inputs(model, list(ids.split(2)), names)
    for name in names:
        x, s = ref[name], stats[name]
        assert int(s.n_tokens) == 30 and s.gram.dtype == torch.float64
        torch.testing.assert_close(s.gram, x.T @ x, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s.mean, x.mean(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s.abs_mean, x.abs().mean(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s.abs_max, x.abs().amax(0), rtol=0, atol=0)
        torch.testing.assert_close(
            s.covariance(), torch.cov(x.T, correction=0), rtol=1e-8, atol=1e-10
        )
    assert stats[names[0]].gram is not stats[names[1]].gram  # not shared unless asked
    assert _no_hooks(model) and not model.training


def test_only_requested_stats_are_allocated_and_round_trip(tmp_path) -> None:
    model = ToyLM()
    stats = calibrate.capture_input_stats(
        model,
        torch.randint(0, VOCAB, (2, 4)),
        ["blocks.0.down_proj"],
        stats=("abs_mean",),
        progress=False,
    )
    (s,) = stats.values()
    assert s.gram is None and s.mean is None and s.sq_grad is None and s.abs_mean.shape == (FF,)
    assert model.training  # mode restored
    io.save_tensors(tmp_path / "s.safetensors", s.to_tensors("blocks.0.down_proj."))
    back = calibrate.LayerStats.from_tensors(
        io.load_tensors(tmp_path / "s.safetensors"), "blocks.0.down_proj."
    )
    assert torch.equal(back.abs_mean, s.abs_mean) and int(back.n_tokens) == 8 and back.gram is None


def test_attention_mask_excludes_padding() -> None:
    model = ToyLM().double().eval()  # fp64 so that batch shape does not change the rounding
    a, b = torch.randint(1, VOCAB, (1, 6)), torch.randint(1, VOCAB, (1, 4))
    padded = torch.cat([a, F.pad(b, (0, 2))])  # right padding with token 0
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    masked = calibrate.capture_input_stats(
        model,
        [{"input_ids": padded, "attention_mask": mask}],
        stats=("gram", "mean"),
        progress=False,
    )
    # causal model + right padding: the real tokens' activations are those of the unpadded runs
    alone = calibrate.capture_input_stats(
        model, (t for t in [a, b]), stats=("gram", "mean"), progress=False
    )
    unmasked = calibrate.capture_input_stats(model, padded, stats=("gram",), progress=False)
    for name, s in masked.items():
        assert int(s.n_tokens) == 10 and int(unmasked[name].n_tokens) == 12
        torch.testing.assert_close(s.gram, alone[name].gram, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s.mean, alone[name].mean, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(s.gram, unmasked[name].gram)


def test_shared_inputs_share_one_gram() -> None:
    model = ToyLM().eval()
    ids = torch.randint(0, VOCAB, (4, 5))
    shared = calibrate.capture_input_stats(
        model, ids, stats=("gram", "mean"), batch_size=2, share_inputs=True, progress=False
    )
    separate = calibrate.capture_input_stats(
        model, ids, stats=("gram", "mean"), batch_size=2, progress=False
    )
    groups = calibrate.shared_groups(shared)
    assert groups == [
        [f"blocks.{i}.{p}" for p in g]
        for i in range(2)
        for g in (
            ["q_proj", "k_proj", "v_proj"],
            ["o_proj"],
            ["gate_proj", "up_proj"],
            ["down_proj"],
        )
    ]
    assert shared["blocks.0.q_proj"].gram is shared["blocks.0.v_proj"].gram
    assert shared["blocks.0.q_proj"].gram is not shared["blocks.1.q_proj"].gram
    for name in shared:
        torch.testing.assert_close(shared[name].gram, separate[name].gram, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(shared[name].mean, separate[name].mean, rtol=1e-12, atol=1e-12)
        assert int(shared[name].n_tokens) == 20


def test_sq_grad_equals_explicit_per_batch_backward() -> None:
    model = ToyLM()
    model.blocks[0].norm1.weight.requires_grad_(False)
    ids = torch.randint(0, VOCAB, (5, 6))
    names = ["blocks.0.q_proj", "blocks.1.down_proj", "lm_head"]
    targets = {n: model.get_submodule(n) for n in names}
    sentinel = torch.full_like(model.lm_head.weight, 7.0)
    model.lm_head.weight.grad = sentinel
    stats = calibrate.capture_input_stats(
        model, ids, targets, stats=("sq_grad", "gram"), batch_size=2, progress=False
    )
    # restored: requires_grad flags, the pre-existing .grad, train mode
    assert not model.blocks[0].norm1.weight.requires_grad and model.embed.weight.requires_grad
    assert model.lm_head.weight.grad is sentinel and model.training

    model.lm_head.weight.grad = None
    model.eval()
    expected = {n: torch.zeros_like(m.weight) for n, m in targets.items()}
    for batch in ids.split(2):
        model.zero_grad(set_to_none=True)
        model(batch, labels=batch).loss.backward()
        for n, m in targets.items():
            expected[n] += m.weight.grad**2
    for n in names:
        assert int(stats[n].n_batches) == 3
        torch.testing.assert_close(stats[n].sq_grad, expected[n], rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(stats[n].fisher(), expected[n] / 3, rtol=1e-5, atol=1e-10)
    x = _stored_inputs(model, list(ids.split(2)), ["lm_head"])["lm_head"]
    torch.testing.assert_close(stats["lm_head"].gram, x.T @ x, rtol=1e-9, atol=1e-9)


def test_hooks_removed_and_errors_are_clear() -> None:
    model = ToyLM()
    with pytest.raises(IndexError):  # token id out of range: the forward itself fails
        calibrate.capture_input_stats(model, torch.full((2, 3), VOCAB + 5), progress=False)
    assert _no_hooks(model) and model.training

    def failing_loss(model, batch):
        raise RuntimeError("loss exploded")

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="loss exploded"):
        calibrate.capture_input_stats(
            model,
            torch.zeros(2, 3, dtype=torch.long),
            stats=("sq_grad",),
            loss_fn=failing_loss,
            progress=False,
        )
    assert _no_hooks(model) and flags == {n: p.requires_grad for n, p in model.named_parameters()}

    with torch.no_grad():
        model.embed.weight[3] = float("nan")
    with pytest.raises(ValueError, match="NaN.*'blocks.0.q_proj'"):
        calibrate.capture_input_stats(model, torch.full((1, 4), 3), progress=False)
    assert _no_hooks(model)

    with pytest.raises(ValueError, match="no calibration data: pass at least one batch"):
        calibrate.capture_input_stats(model, [], progress=False)
    with pytest.raises(ValueError, match="no calibration data"):
        calibrate.capture_input_stats(model, torch.zeros(0, 4, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="no calibration data"):
        calibrate.capture_input_stats(model, iter([]), progress=False)
    with pytest.raises(ValueError, match="unknown stats.*'grams'"):
        calibrate.capture_input_stats(model, torch.zeros(1, 4, dtype=torch.long), stats=("grams",))
    with pytest.raises(TypeError, match="Embedding"):
        calibrate.capture_input_stats(
            model, torch.zeros(1, 4, dtype=torch.long), {"embed": model.embed}
        )


def test_tiny_gpt2_conv1d_gram_and_fisher() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=8, vocab_size=32)
    )
    ids = torch.randint(0, 32, (3, 8))
    stats = calibrate.capture_input_stats(
        model, ids, ["c_attn", "c_proj"], stats=("gram", "sq_grad"), batch_size=3, progress=False
    )
    x = _stored_inputs(model.eval(), [ids], ["transformer.h.0.attn.c_attn"])[
        "transformer.h.0.attn.c_attn"
    ]
    s = stats["transformer.h.0.attn.c_attn"]
    torch.testing.assert_close(s.gram, x.T @ x, rtol=1e-9, atol=1e-9)
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    w = model.transformer.h[0].attn.c_attn.weight  # Conv1D: (in, out); sq_grad is (out, in)
    assert s.sq_grad.shape == (48, 16)
    torch.testing.assert_close(s.sq_grad, (w.grad**2).T, rtol=1e-5, atol=1e-12)


def test_one_accumulator_one_numeric_policy():
    """Every Gram in rankwise is Σ xᵀx of the fp64-cast inputs: the whole-model pass, the
    block runner and a compressor's own observe give the very same numbers."""
    from rankwise.compress.base import InputStats
    from rankwise.compress.sequential import run_blockwise

    torch.manual_seed(0)
    model = ToyLM().eval()
    ids = torch.randint(0, VOCAB, (6, 9))
    names = [f"blocks.{i}.{n}" for i in range(2) for n in ("q_proj", "o_proj", "down_proj")]
    targets = {n: model.get_submodule(n) for n in names}
    whole = calibrate.capture_input_stats(model, ids, targets, batch_size=3, progress=False)
    stored = _stored_inputs(model, list(ids.split(3)), names)
    blockwise = {}
    run_blockwise(model, list(ids.split(3)), targets,
                  lambda i, stats: blockwise.update(stats), progress=False)
    for n in names:
        X = stored[n]
        torch.testing.assert_close(whole[n].gram, X.T @ X, rtol=1e-12, atol=1e-12)
        assert whole[n].gram.dtype == torch.float64
        assert torch.equal(blockwise[n].gram, whole[n].gram), n  # same hooks, same accumulator
        own = InputStats()
        for part in X.split(9 * 3):
            own.update(part.float())
        assert torch.equal(own.gram, whole[n].gram), n


def test_accumulator_cross_gram_and_fp32_inputs():
    g = torch.Generator().manual_seed(1)
    x, ref = torch.randn(50, 7, generator=g), torch.randn(50, 7, generator=g)
    acc = calibrate.GramAccumulator(7, ("gram", "mean"), cross=True)
    acc.add(x[:20], ref[:20])
    acc.add(x[20:], ref[20:])
    xd, rd = x.double(), ref.double()
    torch.testing.assert_close(acc.gram, xd.T @ xd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.cross, rd.T @ xd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.finish()["mean"], xd.mean(0), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="pass ref="):
        acc.add(x)
