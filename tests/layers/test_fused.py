"""Horizontal fusion (rankwise.layers.fused): the same outputs, fewer matmuls."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rankwise.layers.factorized import FactorizedLinear
from rankwise.layers.fused import find_sibling_groups, fuse_siblings_, fused_groups, unfuse_


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _factorize(model: nn.Module, keep_dense: tuple[str, ...] = ()) -> nn.Module:
    """Every block linear but those named in keep_dense replaced by a rank-8 FactorizedLinear."""
    from rankwise import surgery

    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and ".layers." in name and not name.endswith(keep_dense):
            surgery.replace_module(model, name, FactorizedLinear.from_dense(m, 8))
    return model


def test_siblings_are_found_by_shared_input_qkv_and_gate_up():
    model = _factorize(_tiny_llama())
    groups = find_sibling_groups(model)
    as_sets = sorted(sorted(n.split(".")[-1] for n in g) for g in groups)
    assert as_sets == [["gate_proj", "up_proj"]] * 2 + [["k_proj", "q_proj", "v_proj"]] * 2
    assert not find_sibling_groups(_tiny_llama())  # nothing factorised: nothing to fuse


def _with_biased_dense_v(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    layer = model.model.layers[0].self_attn  # a dense sibling with a bias joins the fused matmul
    layer.v_proj = nn.Linear(32, layer.v_proj.out_features, bias=True, dtype=dtype)
    return model


def test_fused_members_equal_unfused_exactly_in_exact_arithmetic():
    """Integer-valued weights and inputs in float64: every product and sum is exact, so any
    difference (a wrong slice, order or bias) shows, whatever order the matmuls sum in."""
    model = _with_biased_dense_v(_factorize(_tiny_llama(), keep_dense=("v_proj",)).double(), torch.float64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-4, 5, p.shape, generator=gen).double())
    attn = model.model.layers[0].self_attn
    ref = copy.deepcopy(attn)
    fuse_siblings_(model)
    for shape in ((1, 1, 32), (2, 7, 32)):
        x = torch.randint(-4, 5, shape, generator=gen).double()
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj"):
                assert torch.equal(getattr(attn, name)(x), getattr(ref, name)(x)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_model_matches_unfused_and_generates_the_same_tokens(dtype):
    model = _with_biased_dense_v(_factorize(_tiny_llama(), keep_dense=("v_proj",)).to(dtype), dtype)
    ref = copy.deepcopy(model)
    groups = fuse_siblings_(model)
    assert len(groups) == 4 and fused_groups(model) == groups
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # one wider matmul may sum in another blocked order than three narrow ones: equal up to
        # the last bits of the dtype (exact equality in exact arithmetic: the test above)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=tol)
        a = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
        b = ref.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
    # the state dict is untouched (the fused weight is a separate, non-persistent copy)
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert unfuse_(model) == sum(map(len, groups)) and not fused_groups(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_fused_group_runs_one_matmul_for_the_first_factors(monkeypatch):
    import rankwise.layers.fused as fused

    model = _factorize(_tiny_llama())
    fuse_siblings_(model)
    inner_a = {id(m.A.weight) for m in model.modules() if isinstance(m, FactorizedLinear)}
    calls = []
    real = fused.F.linear
    monkeypatch.setattr(fused.F, "linear", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 5)))
    # per block one fused matmul for q/k/v (24 = 3 x rank 8) and one for gate/up (16 rows) ...
    fused_shapes = [tuple(w.shape) for w in calls if w.shape[0] in (16, 24) and w.shape[1] == 32]
    assert fused_shapes == [(24, 32), (16, 32)] * 2
    # ... and no member's own A runs any more: only o_proj's and down_proj's (inputs not shared)
    own_a = [w for w in calls if id(w) in inner_a]
    assert len(own_a) == 4
