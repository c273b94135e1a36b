"""save_adapter / load_adapter: round trips with equal outputs; a wrong base is a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rankwise import adapt
from rankwise.adapt.serialization import CONFIG_NAME, WEIGHTS_NAME

ALL = ["emb", "fc1", "c1d", "conv"]


@pytest.mark.parametrize(
    ("method", "targets"),
    [("lora", ALL), ("rslora", ALL), ("dora", ["fc1", "c1d", "conv"]), ("pissa", ALL)],
)
def test_round_trip_gives_equal_outputs(tmp_path, toy, inputs, perturb, method, targets):
    fresh = {k: v.clone() for k, v in toy.state_dict().items()}
    adapt.adapt_(toy, method, rank=2, alpha=3.0, target_modules=targets)
    perturb(toy)
    expected = toy(*inputs)
    adapt.save_adapter(toy, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["layers"]["fc1"]["method"] == method
    assert cfg["layers"]["fc1"]["config"]["rank"] == 2

    other = type(toy)().eval()
    other.load_state_dict(fresh)  # the original base, untouched by PiSSA's residual
    adapt.load_adapter(other, tmp_path)
    for a, b in zip(expected, other(*inputs), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert adapt.trainable_parameter_count(other) == adapt.trainable_parameter_count(toy)
    with adapt.disable_adapter(other):  # still the original model underneath
        ref = type(toy)().eval()
        ref.load_state_dict(fresh)
        for a, b in zip(ref(*inputs), other(*inputs), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_saved_merged_model_round_trips(tmp_path, toy, inputs, perturb):
    fresh = {k: v.clone() for k, v in toy.state_dict().items()}
    adapt.adapt_(toy, "dora", rank=2, target_modules=["fc1"])
    perturb(toy)
    adapt.merge_(toy)
    expected = toy(*inputs)[0]
    adapt.save_adapter(toy, tmp_path)
    other = type(toy)().eval()
    other.load_state_dict(fresh)
    adapt.load_adapter(other, tmp_path, trainable=False)
    torch.testing.assert_close(other(*inputs)[0], expected, rtol=1e-5, atol=1e-6)
    assert adapt.trainable_parameter_count(other) == 0


def test_loading_onto_a_different_base_raises(tmp_path, toy):
    adapt.adapt_(toy, "lora", rank=2, target_modules=["fc1", "c1d"])
    adapt.save_adapter(toy, tmp_path)

    class Wider(nn.Module):
        def __init__(self):
            super().__init__()
            from transformers.pytorch_utils import Conv1D

            self.fc1 = nn.Linear(12, 18)
            self.c1d = Conv1D(10, 16)

    with pytest.raises(ValueError, match=r"different base model.*'fc1'.*\(16, 12\).*\(18, 12\)"):
        adapt.load_adapter(Wider(), tmp_path)

    renamed = nn.Sequential(nn.Linear(12, 16))
    with pytest.raises(ValueError, match=r"different base model: layer\(s\) \['c1d', 'fc1'\] are not in"):
        adapt.load_adapter(renamed, tmp_path)
    assert not adapt.adapter_layers(renamed)  # nothing installed on failure


def test_same_shapes_but_other_weights_warns(tmp_path, toy):
    adapt.adapt_(toy, "lora", rank=2, target_modules=["fc1"])
    adapt.save_adapter(toy, tmp_path)
    torch.manual_seed(99)
    with pytest.warns(UserWarning, match="different checkpoint"):
        adapt.load_adapter(type(toy)(), tmp_path)


def test_loading_twice_and_bad_dirs(tmp_path, toy):
    adapt.adapt_(toy, "lora", rank=2, target_modules=["fc1"])
    adapt.save_adapter(toy, tmp_path / "a")
    with pytest.raises(ValueError, match="already has an adapter"):
        adapt.load_adapter(toy, tmp_path / "a")
    with pytest.raises(ValueError, match="not a rankwise adapter"):
        adapt.load_adapter(toy, tmp_path)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="import_peft"):
        adapt.load_adapter(toy, tmp_path / "p")
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        adapt.load_adapter(type(toy)(), tmp_path / "a")
