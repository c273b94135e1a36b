"""InitContext: what an init may ask for (activations, first gradient, SVD, shared tensors)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rankwise import adapt
from rankwise.adapt.methods import LoRA


class Probe(LoRA):
    """A LoRA that records what its context hands out (stand-in for EVA / LoRA-SB / VeRA)."""

    needs = frozenset({"activations", "gradient"})
    seen: dict[str, dict] = {}

    def initialize(self, ctx) -> None:
        super().initialize(ctx)
        Probe.seen[ctx.fqn] = {
            "gram": ctx.activations().gram.clone(),
            "grad": ctx.gradient().clone(),
            "svd": ctx.svd(),
            "weight": ctx.weight().clone(),
            "shared": ctx.shared("basis", lambda: torch.randn(3, generator=ctx.generator)),
            "shapes": dict(ctx.all_shapes),
        }


@pytest.fixture
def probe():
    adapt.register_method("probe", Probe)
    Probe.seen = {}
    yield Probe
    adapt.unregister_method("probe")


def loss_fn(model, batch):
    return model(batch).square().sum()


def test_context_hands_out_activations_gradients_svd_and_shared(probe):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    ref = copy.deepcopy(model)
    X = torch.randn(6, 5)
    adapt.adapt_(model, "probe", rank=2, target_modules=["0", "2"], data=X, loss_fn=loss_fn,
                 batch_size=4)
    seen = probe.seen
    # Gram of layer 0's input is XᵀX; of layer 2's, tanh(XW₀ᵀ+b)ᵀ(...)
    torch.testing.assert_close(seen["0"]["gram"], X.double().T @ X.double())
    H = torch.tanh(ref[0](X)).detach().double()
    torch.testing.assert_close(seen["2"]["gram"], H.T @ H)
    # Σ over micro-batches of ∂L/∂W = ∂(Σ L)/∂W (the loss is a sum over rows)
    loss_fn(ref, X).backward()
    torch.testing.assert_close(seen["0"]["grad"], ref[0].weight.grad)
    torch.testing.assert_close(seen["2"]["grad"], ref[2].weight.grad)
    # the weights were not left requiring grad or holding .grad by the pass
    assert model[0].base_layer.weight.grad is None
    assert not model[0].base_layer.weight.requires_grad
    U, S, Vh = seen["0"]["svd"]
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, seen["0"]["weight"], atol=1e-6, rtol=1e-5)
    assert seen["0"]["shared"] is seen["2"]["shared"]
    assert seen["0"]["shapes"] == {"0": (4, 5), "2": (3, 4)}


def test_precomputed_input_stats_skip_the_pass_but_gradient_needs_data(probe):
    model = nn.Sequential(nn.Linear(5, 4))
    with pytest.raises(ValueError, match="first gradient: pass data="):
        adapt.adapt_(model, "probe", rank=2, target_modules=["0"], input_stats={})
    assert not adapt.adapter_layers(model)


def test_activation_method_without_data_is_a_clear_error():
    class NeedsActs(LoRA):
        needs = frozenset({"activations"})

    adapt.register_method("needs_acts", NeedsActs)
    try:
        with pytest.raises(ValueError, match="input activations: pass data="):
            adapt.adapt_(nn.Sequential(nn.Linear(5, 4)), "needs_acts", rank=2,
                         target_modules=["0"])
    finally:
        adapt.unregister_method("needs_acts")


def test_nan_weights_are_refused():
    model = nn.Sequential(nn.Linear(5, 4))
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        adapt.adapt_(model, "lora", rank=2, target_modules=["0"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_adapters(dtype, perturb):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6)).to(dtype)
    W = model[0].weight.detach().clone()
    adapt.adapt_(model, "dora", rank=2, target_modules=["0"])
    assert model[0].adapter.A.dtype == torch.float32
    perturb(model)
    x = torch.randn(3, 8, dtype=dtype)
    y = model(x)
    assert y.dtype == dtype
    adapt.merge_(model)
    torch.testing.assert_close(model(x), y, rtol=2e-2, atol=2e-2)
    adapt.unmerge_(model)
    torch.testing.assert_close(model[0].base_layer.weight, W, rtol=1e-2, atol=1e-2)


def test_a_new_base_mutating_method_gets_the_core_for_free(tmp_path, perturb):
    """The SVFit sketch from method.py: only init/delta/offset written; the rest is the core."""
    from dataclasses import dataclass

    @dataclass(frozen=True, kw_only=True)
    class SVConfig(adapt.MethodConfig):
        pass

    class SV(adapt.AdapterMethod):
        config_cls = SVConfig
        mutates_base = True

        def __init__(self, config, geometry):
            super().__init__(config, geometry)
            self.check_rank(config.rank)
            r, (m, n) = config.rank, geometry.shape
            self.sigma = nn.Parameter(torch.zeros(r))
            self.register_buffer("U", torch.zeros(m, r))
            self.register_buffer("Vh", torch.zeros(r, n))
            self.register_buffer("sigma0", torch.zeros(r))

        def initialize(self, ctx):
            U, S, Vh = ctx.svd(self.config.rank)
            with torch.no_grad():
                self.U.copy_(U)
                self.Vh.copy_(Vh)
                self.sigma.copy_(S)
                self.sigma0.copy_(S)

        def delta_weight(self):
            return (self.U * self.sigma) @ self.Vh

        def offset_weight(self):
            return (self.U * self.sigma0) @ self.Vh

    adapt.register_method("sv_sketch", SV)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5))
        fresh = {k: v.clone() for k, v in model.state_dict().items()}
        x = torch.randn(3, 6)
        base = model(x)
        adapt.adapt_(model, "sv_sketch", rank=2, target_modules=["0"])
        torch.testing.assert_close(model(x), base, rtol=1e-5, atol=1e-6)  # no-op at init
        assert adapt.trainable_parameter_count(model) == 2
        perturb(model)
        y = model(x)
        with adapt.disable_adapter(model):
            torch.testing.assert_close(model(x), base, rtol=1e-5, atol=1e-6)
        adapt.merge_(model)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
        adapt.unmerge_(model)
        adapt.save_adapter(model, tmp_path)
        other = nn.Sequential(nn.Linear(6, 5))
        other.load_state_dict(fresh)
        adapt.load_adapter(other, tmp_path)
        torch.testing.assert_close(other(x), y, rtol=1e-5, atol=1e-6)
    finally:
        adapt.unregister_method("sv_sketch")
