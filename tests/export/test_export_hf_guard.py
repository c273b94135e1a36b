"""A compressed directory never loads as a broken dense model in plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import compressed, logits, tiny_llama
from transformers import AutoConfig, AutoModelForCausalLM

import rankwise
from rankwise.compress import hf_guard, save_compressed


def test_plain_transformers_refuses_and_names_rankwise_load_model(compressed_dir):
    directory, model = compressed_dir
    for load in (
        lambda: AutoModelForCausalLM.from_pretrained(directory),
        lambda: AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True),
        lambda: AutoConfig.from_pretrained(directory),
    ):
        with pytest.raises(ValueError, match=r"rankwise\.load_model\(DIR\)"):
            load()
    # ... while rankwise loads it exactly, with and without an explicit task
    reloaded = rankwise.load_model(directory)
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)
    assert type(rankwise.load_model(directory, task="causal-lm")) is type(model)


def test_the_guard_keeps_the_real_model_type_beside_it(compressed_dir):
    directory, model = compressed_dir
    raw = json.loads((directory / "config.json").read_text())
    assert raw["model_type"] == hf_guard.REFUSAL and raw[hf_guard.ORIGINAL_KEY] == "llama"
    config = hf_guard.read_config(directory)
    assert type(config) is type(model.config)
    assert config.to_diff_dict() == model.config.to_diff_dict() | {"architectures": ["LlamaForCausalLM"]}


def test_a_directory_from_before_the_guard_still_loads(compressed_dir, tmp_path):
    import shutil

    directory, model = compressed_dir
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    raw = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps(hf_guard.unguard_config(raw)))
    marker = json.loads((old / "rankwise_compression.json").read_text())
    del marker["files"]  # directories from before the guard had no checksums either
    (old / "rankwise_compression.json").write_text(json.dumps(marker))
    torch.testing.assert_close(logits(rankwise.load_model(old)), logits(model), rtol=0, atol=0)


def test_compensated_layers_are_guarded_too(tmp_path):
    model = compressed(compensation_rank=2)
    save_compressed(model, tmp_path / "c")
    with pytest.raises(ValueError, match=r"rankwise\.load_model\(DIR\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    torch.testing.assert_close(logits(rankwise.load_model(tmp_path / "c")), logits(model),
                               rtol=0, atol=0)


def test_a_dense_directory_stays_a_standard_checkpoint(tmp_path):
    """Nothing factorised (e.g. export_peft's base): plain transformers loads it correctly."""
    model = tiny_llama(seed=1)
    save_compressed(model, tmp_path / "d")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    torch.testing.assert_close(logits(plain), logits(model), rtol=0, atol=0)
