"""Folding EoRA paths into factors, parameter accounting, settings validation and fingerprints."""

from __future__ import annotations

import pytest
import torch

from rankwise.pipeline import ShrinkConfig, fold_compensation
from rankwise.pipeline.structure import layer_table, target_params


def _compensated(m=24, n=40, r=6, k=3, bias=True):
    from rankwise.compress import CompensatedLinear
    from rankwise.layers.factorized import FactorizedLinear

    g = torch.Generator().manual_seed(0)
    base = FactorizedLinear.from_factors(torch.randn(m, r, generator=g), torch.randn(r, n, generator=g),
                                         torch.randn(m, generator=g) if bias else None)
    return CompensatedLinear.from_factors(base, torch.randn(m, k, generator=g), torch.randn(k, n, generator=g))


def test_fold_compensation_is_exact_and_keeps_the_parameter_count():
    from torch import nn

    from rankwise.layers.factorized import FactorizedLinear

    model = nn.Sequential(_compensated(), nn.ReLU(), _compensated(m=7, n=24, r=3, k=2, bias=False))
    x = torch.randn(5, 40)
    before = model(x)
    params = sum(p.numel() for p in model.parameters())
    assert fold_compensation(model) == 2
    assert all(isinstance(model[i], FactorizedLinear) for i in (0, 2))
    assert model[0].rank == 6 + 3 and model[2].rank == 3 + 2
    assert sum(p.numel() for p in model.parameters()) == params  # (r + k)(m + n) (+ bias)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_layer_table_and_target_params_count_each_tensor_once(make_llama):
    llama = make_llama(96)
    from rankwise.compress import compress_

    shapes = {n: (m.out_features, m.in_features) for n, m in llama.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    dense = target_params(llama, shapes)
    assert dense == sum(o * i for o, i in shapes.values())  # Llama projections have no bias
    compress_(llama, "lord", 0.3, progress=False)
    rows = layer_table(llama, shapes)
    assert sum(r["params"] for r in rows) == target_params(llama, shapes)
    for r in rows:
        if r["kind"] == "factorized":
            assert r["params"] == r["rank"] * (r["out"] + r["in"])
        else:
            assert r["params"] == r["out"] * r["in"]


@pytest.mark.parametrize("bad, match", [
    (dict(ratio=0.0), r"outside \(0, 1\)"), (dict(ratio=1.2), r"outside \(0, 1\)"),
    (dict(heal_method="magic"), "heal_method must be one of"), (dict(heal_minutes=-1), "heal_minutes"),
    (dict(method="eora"), "not a factorisation"), (dict(allocation="best"), "allocation must be one of"),
    (dict(compensation_ranks=(0,)), "compensation_ranks"), (dict(heal_seq_len=0), "heal_seq_len"),
])
def test_bad_settings_are_rejected_with_a_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        ShrinkConfig(**bad)


def test_stage_fingerprints_cover_their_own_and_earlier_settings_only():
    a = ShrinkConfig(model="m", heal_minutes=15)
    b = ShrinkConfig(model="m", heal_minutes=3)
    assert a.stage_fingerprint("compress") == b.stage_fingerprint("compress")
    assert a.stage_fingerprint("compensate") == b.stage_fingerprint("compensate")
    assert a.stage_fingerprint("heal") != b.stage_fingerprint("heal")
    assert b.changed_since("heal", a.to_dict()) == ["heal_minutes"]
    c = ShrinkConfig(model="m", ratio=0.3)
    assert all(a.stage_fingerprint(s) != c.stage_fingerprint(s) for s in ("compress", "heal", "export"))
