"""EoRA in its reference order: block i fitted on inputs through compensated blocks < i."""

from __future__ import annotations

import copy

import pytest
import torch
from compress_models import tiny_llama

from rankwise.calibrate import capture_input_stats
from rankwise.compress import compensate_, find_targets


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("base", ["int4", "2:4"])
def test_one_block_sequential_equals_parallel(calib_ids, base):
    par, seq = tiny_llama(layers=1), tiny_llama(layers=1)
    compensate_(par, base, 4, calibration=calib_ids, progress=False)
    report = compensate_(seq, base, 4, calibration=calib_ids, sequential=True, progress=False)
    assert report.options["sequential"] is True
    a, b = _weights(par), _weights(seq)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)


def test_later_blocks_are_fitted_on_compensated_inputs(calib_ids):
    dense = tiny_llama(layers=2)
    seq = copy.deepcopy(dense)
    compensate_(seq, "int4", 4, calibration=calib_ids, sequential=True, progress=False)
    # reference, built by hand: block 0 compensated (its inputs are the dense ones in both
    # orders), then block 1's Grams captured on that model, then block 1 compensated with them
    ref = copy.deepcopy(dense)
    compensate_(ref, "int4", 4, calibration=calib_ids, target_modules=["model.layers.0.*"], progress=False)
    block1 = {f: m for f, m in find_targets(ref).items() if f.startswith("model.layers.1.")}
    grams = capture_input_stats(ref, calib_ids, block1, share_inputs=True, progress=False)
    compensate_(ref, "int4", 4, stats=grams, target_modules=["model.layers.1.*"], progress=False)
    par = copy.deepcopy(dense)
    compensate_(par, "int4", 4, calibration=calib_ids, progress=False)
    got, want, parallel = _weights(seq), _weights(ref), _weights(par)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    lora = [k for k in got if k.startswith("model.layers.1.") and "lora_" in k]
    assert lora and any(not torch.allclose(got[k], parallel[k], rtol=1e-3, atol=1e-5) for k in lora)


def test_sequential_refuses_precomputed_stats(calib_ids):
    model = tiny_llama(layers=1)
    stats = capture_input_stats(model, calib_ids, find_targets(model), progress=False)
    with pytest.raises(ValueError, match="drop stats="):
        compensate_(model, "int4", 4, stats=stats, sequential=True)


def test_compress_with_sequential_compensation(calib_ids):
    """Inside the rank budget: same truncation, EoRA paths of block 0 equal, of block 1 refitted."""
    from rankwise.compress import compress_

    dense = tiny_llama(layers=2)
    par, seq = copy.deepcopy(dense), copy.deepcopy(dense)
    ra = compress_(par, "svd_llm", 0.3, compensation_rank=2, calibration=calib_ids, progress=False)
    rb = compress_(seq, "svd_llm", 0.3, compensation_rank=2, compensation_sequential=True,
                   calibration=calib_ids, progress=False)
    assert [r.rank for r in ra.layers] == [r.rank for r in rb.layers]
    a, b = _weights(par), _weights(seq)
    for k in a:
        if k.startswith("model.layers.0.") or "base_layer" in k:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    lora1 = [k for k in a if k.startswith("model.layers.1.") and "lora_" in k]
    assert lora1 and any(not torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in lora1)
