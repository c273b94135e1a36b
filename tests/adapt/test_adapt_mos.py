"""MoS (Wang et al., ICLR 2025, arXiv 2410.00938): all-private MoS = LoRA, shards sit where the
index says, shared pools counted once (pools + private), save/load keeps the sharing.

Shared invariants: tests/contracts/test_adapter_contract.py."""

from __future__ import annotations

import pytest
import torch
from adapt_checks import (
    assert_save_load_equal,
    inputs_for,
    layers_model,
    run,
)

from rankwise import adapt

SHAPES = {"a": (12, 8), "b": (12, 8), "c": (6, 8)}


def adapted(shapes=SHAPES, **kw):
    model = layers_model(shapes)
    opts = dict(rank=4, budget_rank=2, private_rank=1, num_chunks=2, dropout=0.0)
    adapt.adapt_(model, "mos", target_modules=list(shapes), **{**opts, **kw})
    return model


def test_all_private_mos_is_lora_exactly(perturb):
    shapes = {"a": (12, 8), "c": (6, 8)}
    mos = adapted(shapes, rank=3, budget_rank=3, private_rank=3, alpha=5.0)
    lora = layers_model(shapes)
    adapt.adapt_(lora, "lora", rank=3, alpha=5.0, target_modules=list(shapes))
    xs = inputs_for(mos)
    for name in shapes:  # same seeded generator, same draws: the inits coincide bit for bit
        torch.testing.assert_close(mos[name].adapter.A_private, lora[name].adapter.A, rtol=0, atol=0)
    perturb(mos)
    with torch.no_grad():
        for name in shapes:
            lora[name].adapter.A.copy_(mos[name].adapter.A_private)
            lora[name].adapter.B.copy_(mos[name].adapter.B_private)
        for name, out in run(mos, xs).items():
            torch.testing.assert_close(out, lora[name](xs[name]), rtol=1e-12, atol=1e-12)


def test_shards_appear_where_the_index_says(perturb):
    model = adapted(rank=4, private_rank=1, num_chunks=2)
    perturb(model)
    for name, (o, i) in SHAPES.items():
        m = model[name].adapter
        A, B = m.factors()
        assert A.shape == (4, i) and B.shape == (o, 4)
        torch.testing.assert_close(A[:1], m.A_private, rtol=0, atol=0)
        torch.testing.assert_close(B[:, :1], m.B_private, rtol=0, atol=0)
        pa, pb = m.pool("A"), m.pool("B")
        for j in range(3):  # shared rank vectors j (rows 1.. of A, columns 1.. of B)
            for c in range(2):
                torch.testing.assert_close(A[1 + j, c * (i // 2):(c + 1) * (i // 2)],
                                           pa[m.A_index[j, c]], rtol=0, atol=0)
                torch.testing.assert_close(B[c * (o // 2):(c + 1) * (o // 2), 1 + j],
                                           pb[m.B_index[j, c]], rtol=0, atol=0)
        # subset selection without replacement while the pool is large enough
        assert len(set(m.A_index.flatten().tolist())) == 6
        # pair dissociation: A and B indices are drawn independently
        assert not torch.equal(m.A_index, m.B_index)


def test_pools_are_shared_and_counted_once():
    model = adapted(rank=4, budget_rank=2, private_rank=1, num_chunks=2)
    a, b, c = (model[n].adapter for n in "abc")
    assert a.pool("A") is b.pool("A") is c.pool("A")  # in = 8 for all three
    assert a.pool("B") is b.pool("B") and c.pool("B") is not a.pool("B")  # out 12 vs 6
    # pools: (budget − p) equivalent ranks per layer of that size; private: p (in + out)
    pools = (2 - 1) * 8 * 3 + (2 - 1) * 12 * 2 + (2 - 1) * 6 * 1
    private = sum(1 * (o + i) for o, i in SHAPES.values())
    assert adapt.trainable_parameter_count(model) == pools + private
    # without private ranks the stored parameters are exactly the pools, whatever r is
    for r in (2, 6):
        m = adapted(rank=r, budget_rank=2, private_rank=0)
        assert adapt.trainable_parameter_count(m) == 2 * 8 * 3 + 2 * 12 * 2 + 2 * 6
    # the pools belong to the first layer by name; a layer that does not own them trains them
    assert "pool_A" in a._parameters and "pool_B" in a._parameters and "pool_B" in c._parameters
    assert "pool_A" not in b._parameters and "pool_A" not in c._parameters
    with torch.no_grad():
        c.pool("B").fill_(0.1)  # nonzero B shards, so the A shards get a gradient too
    xs = inputs_for(model)
    (model["b"](xs["b"]).sum() + model["c"](xs["c"]).sum()).backward()
    assert a.pool_B.grad.abs().sum() > 0 and a.pool_A.grad.abs().sum() > 0


def test_save_load_stores_each_pool_once_and_relinks(tmp_path, perturb):
    model = adapted()
    perturb(model)
    xs = inputs_for(model)
    adapt.save_adapter(model, tmp_path / "s")
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "s" / "rankwise_adapter.safetensors"))
    assert sum(k.endswith("pool_A") for k in keys) == 1
    assert sum(k.endswith("pool_B") for k in keys) == 2
    one = assert_save_load_equal(model, layers_model(SHAPES), xs, tmp_path / "t")
    two = adapt.load_adapter(layers_model(SHAPES), tmp_path / "s")
    assert one["a"].adapter.pool("A") is one["c"].adapter.pool("A")
    assert two["a"].adapter.pool("A") is two["c"].adapter.pool("A")
    assert one["a"].adapter.pool("A") is not two["a"].adapter.pool("A")  # separate models


def test_bad_options():
    with pytest.raises(ValueError, match="num_chunks 3 does not divide"):
        adapted(num_chunks=3)
    with pytest.raises(ValueError, match="private_rank 5 exceeds"):
        adapted(private_rank=5)
    with pytest.raises(ValueError, match="empty shared pool"):
        adapted(budget_rank=1, private_rank=1)
