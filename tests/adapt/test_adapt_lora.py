"""LoRA (Hu et al. 2021, eq. 3: h = W x + (α/r) B A x) and rsLoRA (Kalajdzievski 2023: α/√r)
on every layer geometry: the count r(m + n), the per-kind forward, Kaiming/zero init, seeding,
dropout, scales and bad input. The model-level invariants every method shares (no-op at init,
merge/unmerge, disable, unload, save/load) are tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rankwise import adapt

ALL = ["emb", "fc1", "c1d", "conv"]


def shapes(model):
    return {n: layer.geometry.shape for n, layer in adapt.adapter_layers(model).items()}


def test_trainable_count_is_r_times_m_plus_n(toy):
    adapt.adapt_(toy, "lora", rank=3, target_modules=ALL)
    expected = sum(3 * (m + n) for m, n in shapes(toy).values())
    assert adapt.trainable_parameter_count(toy) == expected
    # (out, in) views: Embedding (dim, vocab), Conv1D (out, in), Conv2d (out, C_in*kh*kw)
    assert shapes(toy) == {"emb": (12, 20), "fc1": (16, 12), "c1d": (10, 16), "conv": (6, 27)}
    frozen = [n for n, p in toy.named_parameters() if p.requires_grad and ".adapter." not in n]
    assert frozen == []


@pytest.mark.parametrize("method", ["lora", "rslora"])
def test_forward_on_each_layer_kind_is_w_plus_scaled_ba(toy, inputs, perturb, method):
    originals = {n: m.weight.detach().clone() for n, m in toy.named_children() if n in ALL}
    adapt.adapt_(toy, method, rank=2, alpha=4.0, target_modules=ALL)
    perturb(toy)
    # reference: each layer's own functional form with (out, in) weight W + s·B A
    s = 4.0 / (math.sqrt(2) if method == "rslora" else 2)
    deltas = {n: (s * layer.adapter.B @ layer.adapter.A).detach()
              for n, layer in adapt.adapter_layers(toy).items()}
    ids, img = inputs
    W = originals
    h = nn.functional.embedding(ids, (W["emb"].T + deltas["emb"]).T)
    torch.testing.assert_close(toy.emb(ids), h, rtol=1e-6, atol=1e-6)
    h = torch.randn(2, 5, 16)
    ref = h @ (W["c1d"] + deltas["c1d"].T) + toy.c1d.base_layer.bias  # Conv1D: x @ (in, out)
    torch.testing.assert_close(toy.c1d(h), ref, rtol=1e-5, atol=1e-6)
    conv_w = W["conv"] + deltas["conv"].reshape(W["conv"].shape)
    ref = nn.functional.conv2d(img, conv_w, toy.conv.base_layer.bias, padding=1)
    torch.testing.assert_close(toy.conv(img), ref, rtol=1e-5, atol=1e-6)


def test_rslora_output_is_sqrt_r_times_lora_output():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6, bias=False))
    x = torch.randn(4, 8)
    outs = {}
    for method in ("lora", "rslora"):
        model = nn.Sequential(nn.Linear(8, 6, bias=False))
        model.load_state_dict(base.state_dict())
        adapt.adapt_(model, method, rank=4, alpha=2.0, target_modules=["0"])
        layer = adapt.adapter_layers(model)["0"]
        with torch.no_grad():
            layer.adapter.B.copy_(torch.arange(24.0).reshape(6, 4) / 10)
        outs[method] = model(x) - base(x)
    # α/√r over α/r = √r = 2 (exactly representable)
    torch.testing.assert_close(outs["rslora"], 2 * outs["lora"], rtol=1e-6, atol=1e-7)


def test_kaiming_init_bound_and_first_gradients():
    model = nn.Sequential(nn.Linear(400, 50))
    adapt.adapt_(model, "lora", rank=8, target_modules=["0"])
    m = adapt.adapter_layers(model)["0"].adapter
    assert m.A.abs().max() <= 1 / math.sqrt(400)
    assert abs(m.A.std().item() - 1 / math.sqrt(3 * 400)) < 0.05 / math.sqrt(400)
    assert torch.count_nonzero(m.B) == 0
    model.train()
    model(torch.randn(3, 400)).square().sum().backward()
    assert torch.count_nonzero(m.A.grad) == 0  # ∂L/∂A = s Bᵀ(...) = 0 while B = 0
    assert torch.count_nonzero(m.B.grad) > 0
    assert model[0].base_layer.weight.grad is None  # base frozen


def test_init_is_seeded_and_leaves_the_global_rng_alone():
    def build(seed):
        torch.manual_seed(123)
        model = nn.Sequential(nn.Linear(8, 6))
        state = torch.random.get_rng_state()
        adapt.adapt_(model, "lora", rank=2, target_modules=["0"], seed=seed)
        assert torch.equal(torch.random.get_rng_state(), state)
        return adapt.adapter_layers(model)["0"].adapter.A.detach()

    assert torch.equal(build(0), build(0))
    assert not torch.equal(build(0), build(1))


def test_dropout_only_acts_in_training(toy, inputs, perturb):
    adapt.adapt_(toy, "lora", rank=2, dropout=0.5, target_modules=["fc1"])
    perturb(toy)
    ref = toy(*inputs)[0]
    torch.testing.assert_close(toy(*inputs)[0], ref)  # eval: deterministic
    toy.train()
    assert not torch.allclose(toy(*inputs)[0], ref)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(rank=0, target_modules=["fc1"]), ValueError, "rank must be an integer >= 1"),
        (dict(rank=13, target_modules=["fc1"]), ValueError, r"rank 13 exceeds min\(m, n\) = 12"),
        (dict(rank=2, target_modules=["nope"]), ValueError, "'nope' matched no module"),
        (dict(rank=2, target_modules=["norm"]), TypeError, "LayerNorm"),
        (dict(rank=2, target_modules=["fc1"], alpah=3), TypeError, "no option.*alpah"),
        (dict(rank=2, target_modules=["fc1"], dropout=1.5), ValueError, "dropout"),
    ],
)
def test_bad_input_is_a_clear_error(toy, kwargs, error, match):
    with pytest.raises(error, match=match):
        adapt.adapt_(toy, "lora", **kwargs)
    assert not adapt.adapter_layers(toy)  # nothing half-done


def test_unknown_method_names_the_known_ones(toy):
    with pytest.raises(ValueError, match="unknown adapter method 'lroa'.*lora"):
        adapt.adapt_(toy, "lroa", target_modules=["fc1"])


def test_one_adapter_per_layer(toy):
    adapt.adapt_(toy, "lora", rank=2, target_modules=["fc1"])
    with pytest.raises(ValueError, match="already have an adapter"):
        adapt.adapt_(toy, "lora", rank=2, target_modules=["fc1"])
    with pytest.raises(ValueError, match="already have an adapter"):
        adapt.adapt_(toy, "lora", rank=2, target_modules=r"fc1.*")
    adapt.adapt_(toy, "lora", rank=2, target_modules=["c1d"])  # another layer is fine
    assert set(adapt.adapter_layers(toy)) == {"fc1", "c1d"}
    # adapter parameters of the first call stay trainable
    assert toy.fc1.adapter.A.requires_grad


def test_all_linear_skips_the_head(make_llama):
    model = make_llama()
    adapt.adapt_(model, "lora", rank=2, target_modules="all-linear")
    names = set(adapt.adapter_layers(model))
    assert "lm_head" not in names and len(names) == 2 * 7
