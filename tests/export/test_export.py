"""`rankwise export`: a dense HF checkpoint plain transformers loads, a factorised ONNX graph."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import compressed, logits, tiny_llama
from transformers import AutoModelForCausalLM

import rankwise
from rankwise.export import export_dense, export_onnx
from rankwise.layers.factorized import FactorizedLinear


def _parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_dense_export_loads_in_plain_transformers_with_rankwise_logits(compressed_dir, tmp_path):
    directory, model = compressed_dir
    summary = export_dense(directory, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")  # no rankwise code involved
    torch.testing.assert_close(logits(plain), logits(rankwise.load_model(directory)),
                               rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "dense" / "rankwise_compression.json").exists()
    assert summary["parameters_dense"] == _parameters(plain) == _parameters(tiny_llama())
    assert summary["merged_layers"] == sum(isinstance(m, FactorizedLinear) for m in model.modules())
    factorised = model.model.layers[0].mlp.up_proj
    torch.testing.assert_close(plain.model.layers[0].mlp.up_proj.weight,
                               factorised.B.weight @ factorised.A.weight, rtol=0, atol=0)


def test_dense_export_merges_eora_paths_and_leaves_the_model_factorised(tmp_path):
    model = compressed(compensation_rank=2)
    before = logits(model)
    export_dense(model, tmp_path / "dense")
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())  # a copy was merged
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    torch.testing.assert_close(logits(plain), before, rtol=1e-5, atol=1e-5)


def test_onnx_export_runs_in_onnxruntime_with_pytorch_logits_and_keeps_the_factors(
        compressed_dir, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnx/onnxruntime are the `export` extra")
    import onnx

    from rankwise.export.onnx import onnx_session

    directory, model = compressed_dir
    summary = export_onnx(directory, tmp_path / "onnx")
    assert summary["max_abs_logit_diff"] < 1e-4
    # dynamic shapes and padding: another batch size and length than the traced one
    ids = torch.randint(0, 96, (3, 30), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, 25:] = 0
    got = onnx_session(tmp_path / "onnx" / "model.onnx").run(
        ["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(torch.from_numpy(got)[keep], want[keep], rtol=1e-4, atol=1e-4)
    # the graph stores the factors A (r, in) and B (out, r), not their dense product
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    shapes = {tuple(t.dims) for t in graph.graph.initializer}
    up = model.model.layers[0].mlp.up_proj
    assert {tuple(up.A.weight.shape), tuple(up.B.weight.shape)} <= shapes or \
        {tuple(up.A.weight.T.shape), tuple(up.B.weight.T.shape)} <= shapes
    stored = sum(int(torch.tensor(t.dims).prod()) for t in graph.graph.initializer if t.dims)
    assert stored < _parameters(tiny_llama())
    meta = json.loads((tmp_path / "onnx" / "rankwise_export.json").read_text())
    assert meta["format"] == "onnx" and meta["opset"] == 18


def test_cli_export_writes_both_formats_and_refuses_bad_requests(compressed_dir, tmp_path, capsys):
    from rankwise.cli import main

    directory, _ = compressed_dir
    out = tmp_path / "d"
    assert main(["export", str(directory), "--format", "dense", "--out", str(out)]) == 0
    assert "checked: max |logit difference|" in capsys.readouterr().out
    assert main(["export", str(directory), "--format", "dense", "--out", str(out)]) == 1
    assert "already exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(directory), "--format", "dense", "--latency"]) == 1
    assert "--latency times the ONNX export" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(directory), "--format", "gguf"])


def test_latency_comparison_reports_ratios_to_the_dense_onnx_model(compressed_dir, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnx/onnxruntime are the `export` extra")
    from rankwise.export.timing import compare_latency, latency_vs_dense

    directory, model = compressed_dir
    export_onnx(model, tmp_path / "onnx", check=False)
    lat = latency_vs_dense(model, tmp_path / "onnx" / "model.onnx", seq_len=8, rounds=2)
    assert set(lat["ratio_to_onnx_dense"]) == {"pytorch_factorised", "onnx_factorised", "onnx_dense"}
    assert lat["ratio_to_onnx_dense"]["onnx_dense"] == 1.0
    for name, ratio in lat["ratio_to_onnx_dense"].items():
        assert ratio == pytest.approx(lat["median_seconds"][name] / lat["median_seconds"]["onnx_dense"])
    calls = []
    compare_latency({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2,
                    warmup=0)
    assert calls == ["a", "b", "b", "a"]  # interleaved, rotating order
