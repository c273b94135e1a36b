"""The compressor contract: what every registered compression method must satisfy.

Parametrised over every registered name (`registered.compressors()`), on a 2-block tiny Llama
with 288 calibration tokens:

factorisation methods (`compress_`):
* the ratio is honoured: at least `ratio` of the targeted parameters are removed, and the
  report's counts equal the model's actual parameter counts (exceptions below);
* a larger ratio never fits the dense model better (output error grows with the ratio);
* reload is equal: `save_compressed` writes safetensors + json, and both `load_compressed` and
  `rankwise.load_model` give back a model with the same logits and parameter count;

compensation methods (`compensate_`):
* a rank-k correction adds exactly k (m + n) parameters per layer and lowers the output error
  of the base compression it corrects; reload is equal as above.
"""

from __future__ import annotations

import math

import pytest
import torch
from contract_toy import calibration_ids, tiny_llama
from registered import compressors

from rankwise.compress import compensate_, compress_, load_compressed, save_compressed
from rankwise.compress.presets import get_preset
from rankwise.surgery import count_parameters

METHODS = compressors()
FACTORIZE = [n for n in METHODS if get_preset(n).kind == "factorize"]
COMPENSATE = [n for n in METHODS if get_preset(n).kind == "compensate"]
RATIO = 0.4

#: THE table of methods whose parameter count goes beyond the factors, with the reason and the
#: exact extra count per targeted (out, in) layer: the ratio is honoured net of it.
EXTRA_PARAMETERS = {
    "afm": ("AFM (atomic feature mimicking, Yu & Wu, AAAI 2023): PCA of the layer's outputs, "
            "y ≈ U Uᵀ (W x + b − μ) + μ, so the mean μ becomes a bias of `out` entries per "
            "layer beyond the rank-r factors", lambda out, _in: out),
}

_CACHE: dict[tuple[str, float], tuple] = {}


def compressed(name: str, ratio: float = RATIO):
    """(model, report) of `name` at `ratio` (cached: several contracts read one compression)."""
    key = (name, ratio)
    if key not in _CACHE:
        model = tiny_llama()
        report = compress_(model, name, ratio, calibration=calibration_ids(), progress=False)
        _CACHE[key] = (model, report)
    return _CACHE[key]


def output_error(model) -> float:
    ids = calibration_ids()
    with torch.no_grad():
        ref = tiny_llama()(ids).logits
        return float((model(ids).logits - ref).square().mean())


def assert_reload_equal(model, report, path) -> None:
    import rankwise

    save_compressed(model, path, report=report)
    suffixes = {p.suffix for p in path.iterdir() if p.is_file()}
    assert suffixes <= {".json", ".safetensors"}, f"pickle-free directory expected, got {suffixes}"
    ids = calibration_ids()
    with torch.no_grad():
        want = model(ids).logits
        for loaded in (load_compressed(path), rankwise.load_model(path, dtype=torch.float32)):
            torch.testing.assert_close(loaded(ids).logits, want)
            assert count_parameters(loaded) == count_parameters(model)


def test_every_method_is_enumerated_with_a_kind():
    assert {"lord", "svd-llm", "eora"} <= {n.replace("_", "-") for n in METHODS}
    assert FACTORIZE and COMPENSATE and len(FACTORIZE) + len(COMPENSATE) == len(METHODS)
    assert set(EXTRA_PARAMETERS) <= set(METHODS)


@pytest.mark.parametrize("name", FACTORIZE)
def test_ratio_is_honoured_and_counted_exactly(name):
    before = count_parameters(tiny_llama())
    model, report = compressed(name)
    assert report.params_model_before == before
    assert report.params_model_after == count_parameters(model)
    assert before - report.params_model_after == (
        report.params_targets_before - report.params_targets_after)
    extra = 0
    if name in EXTRA_PARAMETERS:
        per_layer = EXTRA_PARAMETERS[name][1]
        extra = sum(per_layer(r.out_features, r.in_features) for r in report.layers if r.rank)
    removed = report.params_targets_before - report.params_targets_after + extra
    assert removed >= RATIO * report.params_targets_before, (
        f"{name} removed {removed} of {report.params_targets_before} targeted parameters "
        f"(< {RATIO:.0%})")
    assert report.n_factorized > 0


@pytest.mark.parametrize("name", FACTORIZE)
def test_a_larger_ratio_fits_the_dense_model_no_better(name):
    mild, _ = compressed(name, 0.15)
    strong, _ = compressed(name)
    e_mild, e_strong = output_error(mild), output_error(strong)
    assert math.isfinite(e_strong), f"{name}: non-finite outputs"
    assert e_mild <= e_strong, f"{name}: error {e_mild:.3e} at 15 % > {e_strong:.3e} at 40 %"


@pytest.mark.parametrize("name", FACTORIZE)
def test_reload_is_equal(name, tmp_path):
    model, report = compressed(name)
    assert_reload_equal(model, report, tmp_path / "out")


@pytest.mark.parametrize("name", COMPENSATE)
def test_compensation_adds_its_rank_and_lowers_the_error(name, tmp_path):
    ids, k = calibration_ids(), 4
    plain, corrected = tiny_llama(), tiny_llama()
    r0 = compensate_(plain, "int4", 0, compensation=name, calibration=ids, block_size=16,
                     progress=False)
    rk = compensate_(corrected, "int4", k, compensation=name, calibration=ids, block_size=16,
                     progress=False)
    added = sum(k * (r.out_features + r.in_features) for r in rk.layers)
    assert count_parameters(corrected) - count_parameters(plain) == added
    assert rk.params_model_after - r0.params_model_after == added
    assert output_error(corrected) < output_error(plain)
    assert_reload_equal(corrected, rk, tmp_path / "out")
