"""LoRA-Squeeze: exact at full rank, equals a dense SVD, Eckart-Young, scale folding, PEFT dirs."""

from __future__ import annotations

import json

import pytest
import torch

from rankwise.compress.squeeze import squeeze_lora, squeeze_peft_adapter


def _adapter(m=40, n=30, r=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)


def test_same_rank_reproduces_the_update():
    B, A = _adapter()
    B2, A2 = squeeze_lora(B, A, 8, scale=2.0)
    torch.testing.assert_close(B2 @ A2, 2.0 * B @ A, rtol=1e-10, atol=1e-10)


def test_qr_route_equals_dense_svd_and_eckart_young():
    B, A = _adapter()
    dW = 0.5 * B @ A
    S = torch.linalg.svdvals(dW)
    errs = []
    for r in range(1, 9):
        B2, A2 = squeeze_lora(B, A, r, scale=0.5)
        err = (dW - B2 @ A2).pow(2).sum()
        torch.testing.assert_close(err, S[r:].pow(2).sum(), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(torch.linalg.svdvals(B2 @ A2)[:r], S[:r], rtol=1e-8, atol=1e-10)
        errs.append(float(err))
    assert errs == sorted(errs, reverse=True)


def test_negative_scale_and_bad_rank():
    B, A = _adapter(r=4)
    B2, A2 = squeeze_lora(B, A, 4, scale=-1.5)
    torch.testing.assert_close(B2 @ A2, -1.5 * B @ A, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        squeeze_lora(B, A, 5)


def test_peft_directory_round_trip(tmp_path):
    from rankwise.io import load_tensors, save_tensors

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    pairs = {}
    tensors = {}
    for i, name in enumerate(["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"]):
        B, A = _adapter(r=8, seed=i)
        pairs[name] = (B.float(), A.float())
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.float()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.float()
    save_tensors(src / "adapter_model.safetensors", tensors)
    (src / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "up_proj"]}))
    summary = squeeze_peft_adapter(src, out, 3)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3
    new = load_tensors(out / "adapter_model.safetensors")
    for name, (B, A) in pairs.items():
        dW = (16 / 8) * B.double() @ A.double()
        got = new[f"base_model.model.{name}.lora_B.weight"].double() @ new[f"base_model.model.{name}.lora_A.weight"].double()
        S = torch.linalg.svdvals(dW)
        assert float((dW - got).pow(2).sum()) == pytest.approx(float(S[3:].pow(2).sum()), rel=1e-4)
    assert summary["params_after"] < summary["params_before"]
