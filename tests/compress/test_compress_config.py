"""CompressConfig, the "compressor" registry and the generated `rankwise compress` flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from compress_models import tiny_llama

from rankwise.compress import CompressConfig, compress_
from rankwise.compress.presets import METHODS, MethodPreset, get_preset, method_names
from rankwise.config import from_args
from rankwise.registry import registry


def test_config_and_keywords_compress_identically(calib_ids):
    a, b = tiny_llama(), tiny_llama()
    cfg = CompressConfig(method="svd-llm", ratio=0.3, allocation="welore", progress=False)
    ra = compress_(a, config=cfg, calibration=calib_ids)
    rb = compress_(b, "svd_llm", 0.3, allocation="welore", progress=False, calibration=calib_ids)
    assert [r.rank for r in ra.layers] == [r.rank for r in rb.layers]
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), k
    assert cfg.method == "svd_llm"  # canonical spelling


def test_config_round_trip_and_bad_options():
    cfg = CompressConfig(method="asvd", ratio=0.1, target_modules=["q_proj"], n_samples=4)
    assert CompressConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.target_modules == ("q_proj",)
    with pytest.raises(TypeError, match="n_sample.*valid options"):
        compress_(tiny_llama(), "lord", 0.2, n_sample=4)
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        CompressConfig(ratio=1.5)
    with pytest.raises(ValueError, match="unknown method 'svd-lm'.*svd_llm"):
        CompressConfig(method="svd-lm")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ratio = 0.5  # type: ignore[misc]


def test_presets_are_registry_entries():
    reg = registry("compressor")
    assert sorted(METHODS) == reg.names()
    assert get_preset("svd-llm-update") is reg.get("svd_llm_update").load()
    assert method_names("compensate") == ["eora"]
    mine = MethodPreset(name="my_asvd", whitener="act-scale", alpha=0.25, description="test preset")
    reg.register("my_asvd", mine, summary=mine.description)
    try:
        assert "my-asvd" in METHODS and list(METHODS)[-1] == "my_asvd"
        report = compress_(tiny_llama(), "my-asvd", 0.3, calibration=torch.randint(0, 96, (8, 24)),
                           progress=False)
        assert report.method == "my_asvd" and report.n_factorized > 0
    finally:
        reg.unregister("my_asvd")


def _parse(*argv: str) -> argparse.Namespace:
    from rankwise.cli import compress as cli

    parser = argparse.ArgumentParser(prog="rankwise")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["compress", "m", "--out", "o", *argv])


def test_cli_flags_are_generated_from_the_config():
    default = from_args(CompressConfig, _parse())
    assert default == CompressConfig()  # every default declared once, in the config
    args = _parse("--method", "svd-llm-update", "--calib-samples", "4", "--seq-len", "64",
                  "--target-modules", "q_proj", "v_proj", "--no-progress")
    cfg = from_args(CompressConfig, args, progress=False)
    assert (cfg.method, cfg.n_samples, cfg.seq_len, cfg.target_modules) == (
        "svd_llm_update", 4, 64, ("q_proj", "v_proj"))
    assert _parse("--streaming", "--device", "cuda").streaming is True
    with pytest.raises(SystemExit):
        _parse("--method", "nope")
