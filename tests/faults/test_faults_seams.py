"""Every pair of stages (rankwise.stages): the documented behaviour, never a silently lost
update or a directory that cannot be reloaded."""

from __future__ import annotations

import pytest
import torch
from fault_harness import calib_ids, tiny_llama

from rankwise import adapt

IDS = calib_ids()


def _trained_lora(model, targets=("q_proj",), std=0.3):
    adapt.adapt_(model, "lora", rank=4, target_modules=list(targets))
    gen = torch.Generator().manual_seed(3)
    for layer in adapt.adapter_layers(model).values():
        for p in layer.adapter.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def _logits(model):
    with torch.no_grad():
        return model(IDS[:2]).logits


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    state = model.state_dict()
    return state.keys() == snap.keys() and all(torch.equal(state[k], snap[k]) for k in snap)


# ----------------------------------------------------------------------------- adapt -> compress
@pytest.mark.parametrize("verb", ["compress_", "compensate_"])
def test_adapt_then_compress_is_refused_before_any_change(verb):
    from rankwise import compress

    model = _trained_lora(tiny_llama())
    snap = _snapshot(model)
    call = (lambda: compress.compress_(model, "lord", 0.2, calibration=IDS, progress=False)) if verb == "compress_" \
        else (lambda: compress.compensate_(model, "int4", 4, calibration=IDS, progress=False))
    with pytest.raises(ValueError, match=r"adapters .*merge_and_unload"):
        call()
    assert _unchanged(model, snap)


def test_adapt_merge_then_compress_keeps_the_trained_update():
    """After merge_and_unload the compressed weight approximates the merged weight (update in),
    not the base weight (update dropped, the failure of the issue)."""
    from rankwise.compress import compress_

    model = _trained_lora(tiny_llama(), std=0.5)
    base = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach().clone()
    adapt.merge_and_unload(model)
    merged = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert (merged - base).norm() > 0.5 * base.norm()  # a large trained update
    compress_(model, "lord", 0.1, calibration=IDS, progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    approx = layer.B.weight @ layer.A.weight
    assert (approx - merged).norm() < 0.5 * (approx - base).norm()


# ----------------------------------------------------------------------------- adapt -> save
@pytest.mark.parametrize("verb", ["save_compressed", "export_peft"])
def test_adapt_then_save_compressed_is_refused_with_the_fix(tmp_path, verb):
    from rankwise import compress

    model = tiny_llama()
    compress.compensate_(model, "int4", 4, calibration=IDS, progress=False)
    adapt.adapt_(model, "lora", rank=2, target_modules="all-linear")
    fn = getattr(compress, verb)
    with pytest.raises(ValueError, match=r"still has adapters.*merge_and_unload"):
        fn(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapt_merge_then_save_compressed_round_trips(tmp_path):
    from rankwise.compress import load_compressed, save_compressed

    model = _trained_lora(tiny_llama())
    adapt.merge_and_unload(model)
    save_compressed(model, tmp_path / "out")
    assert torch.allclose(_logits(load_compressed(tmp_path / "out")), _logits(model), atol=1e-5)


# ----------------------------------------------------------------------------- compress -> adapt
def test_compress_then_adapt_merge_save_reload_equals_the_adapted_model(tmp_path):
    from rankwise.compress import compress_, load_compressed, save_compressed

    model = tiny_llama()
    compress_(model, "lord", 0.3, calibration=IDS, progress=False)
    save_compressed(model, tmp_path / "base")
    adapt.adapt_(model, "lora", rank=2, target_modules="all-linear")
    names = list(adapt.adapter_layers(model))
    assert any(n.endswith(".A") for n in names) and any(n.endswith(".B") for n in names)
    for layer in adapt.adapter_layers(model).values():
        for p in layer.adapter.parameters():
            torch.nn.init.normal_(p, std=0.1)
    adapted = _logits(model)
    adapt.save_adapter(model, tmp_path / "adapter")
    reloaded = adapt.load_adapter(load_compressed(tmp_path / "base"), tmp_path / "adapter")
    assert torch.allclose(_logits(reloaded), adapted, atol=1e-5)  # adapter over the compressed base
    adapt.merge_and_unload(model)
    save_compressed(model, tmp_path / "merged")
    assert torch.allclose(_logits(load_compressed(tmp_path / "merged")), adapted, atol=1e-4)


def test_compress_then_adapt_by_layer_name_names_the_factors():
    from rankwise.compress import compress_

    model = tiny_llama()
    compress_(model, "lord", 0.3, calibration=IDS, progress=False)
    with pytest.raises(TypeError, match=r"q_proj\.A'.*q_proj\.B'"):
        adapt.adapt_(model, "lora", rank=2, target_modules=["q_proj"])


# ----------------------------------------------------------------------------- compensate -> adapt
def test_compensate_then_adapt_merge_save_reload_equals_the_adapted_model(tmp_path):
    from rankwise.compress import compensate_, load_compressed, save_compressed

    model = tiny_llama()
    compensate_(model, "int4", 4, calibration=IDS, progress=False)
    adapt.adapt_(model, "lora", rank=2, target_modules="all-linear")
    assert any(n.endswith(".base_layer") for n in adapt.adapter_layers(model))
    for layer in adapt.adapter_layers(model).values():
        for p in layer.adapter.parameters():
            torch.nn.init.normal_(p, std=0.1)
    adapted = _logits(model)
    adapt.merge_and_unload(model)
    save_compressed(model, tmp_path / "out")
    assert torch.allclose(_logits(load_compressed(tmp_path / "out")), adapted, atol=1e-4)


# ----------------------------------------------------------------------------- layers -> compress / save
def test_layers_then_compress_is_refused_then_works_after_to_dense():
    from rankwise import layers
    from rankwise.compress import compress_

    model = tiny_llama()
    layers.convert_(model, "sltrain", target_modules=["q_proj"], rank=4)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"SLTrainLinear training layer.*to_dense_"):
        compress_(model, "lord", 0.2, calibration=IDS, progress=False)
    assert _unchanged(model, snap)
    layers.to_dense_(model)
    report = compress_(model, "lord", 0.2, calibration=IDS, progress=False)
    assert any(r.fqn.endswith("q_proj") for r in report.layers)


def test_layers_then_save_compressed_is_refused(tmp_path):
    from rankwise import layers
    from rankwise.compress import save_compressed

    model = tiny_llama()
    layers.convert_(model, "relora", target_modules=["q_proj"], rank=4)
    with pytest.raises(ValueError, match=r"training layer.*to_dense_"):
        save_compressed(model, tmp_path / "out")


# ----------------------------------------------------------------------------- compress -> compress
def test_compress_twice_never_enters_compressed_layers():
    from rankwise.compress import compress_
    from rankwise.layers import FactorizedLinear

    model = tiny_llama()
    compress_(model, "lord", 0.3, calibration=IDS, progress=False, target_modules=["q_proj"])
    q = model.model.layers[0].self_attn.q_proj
    report = compress_(model, "lord", 0.3, calibration=IDS, progress=False)
    assert model.model.layers[0].self_attn.q_proj is q  # left alone, not factorised again
    assert not any(r.fqn.endswith((".A", ".B")) for r in report.layers)
    assert isinstance(model.model.layers[0].mlp.up_proj, FactorizedLinear)
    with pytest.raises(ValueError, match="already compressed"):
        compress_(model, "lord", 0.3, calibration=IDS, progress=False)
    with pytest.raises(ValueError, match="inside an already compressed layer"):
        compress_(model, "lord", 0.3, calibration=IDS, progress=False, target_modules=["q_proj.A"])


# ----------------------------------------------------------------------------- validation before work
def test_nan_in_a_later_layer_is_refused_before_any_layer_changes():
    from rankwise.compress import compress_

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"down_proj.*NaN/inf"):
        compress_(model, "lord", 0.2, calibration=IDS, progress=False)
    assert all(torch.equal(v, snap[k]) or torch.isnan(v).any() for k, v in model.state_dict().items())
    assert model.state_dict().keys() == snap.keys()


@pytest.mark.parametrize("exc", [RuntimeError("SVD did not converge"), KeyboardInterrupt()])
def test_failure_half_way_rolls_every_layer_back(monkeypatch, exc):
    """A failure (or Ctrl-C) after some layers were replaced puts the originals back."""
    from rankwise import surgery
    from rankwise.compress import compress_

    model = tiny_llama()
    snap = _snapshot(model)
    real = surgery.replace_module
    calls = [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(surgery, "replace_module", flaky)
    with pytest.raises(type(exc)):
        compress_(model, "lord", 0.2, calibration=IDS, progress=False)
    assert calls[0] > 4  # three layers were replaced, then put back
    assert _unchanged(model, snap)
