"""compress_ on a tiny Llama: exact ratio accounting, allocations, bad input, save/load/generate
(what every method must satisfy is tests/contracts/test_compressor_contract.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from compress_models import tiny_llama

from rankwise.compress import compensate_, compress_, load_compressed, save_compressed
from rankwise.compress.eora import CompensatedLinear
from rankwise.layers import FactorizedLinear
from rankwise.surgery import count_parameters


def _loss(model, ids):
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def test_ratio_accounting_is_exact(llama, calib_ids):
    before = count_parameters(llama)
    shapes = {n: (m.out_features, m.in_features) for n, m in llama.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    report = compress_(llama, "svd-llm", 0.3, calibration=calib_ids, progress=False)
    after = count_parameters(llama)
    assert report.params_model_before == before and report.params_model_after == after
    dense_targets = sum(m * n for m, n in shapes.values())
    new_targets = sum(llama.get_submodule(f).num_parameters() if isinstance(llama.get_submodule(f), FactorizedLinear)
                      else m * n for f, (m, n) in shapes.items())
    assert report.params_targets_before == dense_targets
    assert report.params_targets_after == new_targets
    assert report.ratio_targets == pytest.approx(1 - new_targets / dense_targets, abs=0)
    assert report.ratio_model == pytest.approx(1 - after / before, abs=0)
    assert report.ratio_targets >= 0.3 and before - after == dense_targets - new_targets
    for rec in report.layers:  # uniform: r = floor(0.7 m n / (m + n)), never a non-saving rank
        m, n = rec.out_features, rec.in_features
        assert rec.rank == int(0.7 * m * n / (m + n))
        assert rec.rank * (m + n) < m * n
    assert "targeted layers" in report.summary() and "whole model" in report.summary()


@pytest.mark.parametrize("method,allocation", [("svd-llm", "budget"), ("svd-llm-seq", "energy")])
def test_other_allocations_compress_and_run(method, allocation, calib_ids):
    """Each method at its default allocation is in tests/contracts/test_compressor_contract.py;
    here the allocations that combine with any method."""
    model = tiny_llama()
    report = compress_(model, method, 0.25, allocation=allocation, calibration=calib_ids, progress=False)
    assert report.params_model_after < report.params_model_before
    assert report.ratio_targets >= 0.25 - 1e-9 or method == "afm"  # afm adds a bias per layer
    assert report.n_factorized > 0
    assert any(isinstance(m, FactorizedLinear) for m in model.modules())
    assert torch.isfinite(torch.tensor(_loss(model, calib_ids)))


def test_svd_llm_tracks_the_dense_model_better_than_plain_svd(calib_ids):
    dense = tiny_llama()
    with torch.no_grad():
        ref = dense(calib_ids).logits
    errs = {}
    for method in ("lord", "svd-llm", "svd-llm-seq"):
        model = tiny_llama()
        compress_(model, method, 0.3, calibration=calib_ids, progress=False)
        with torch.no_grad():
            errs[method] = float((model(calib_ids).logits - ref).pow(2).mean())
    assert errs["svd-llm"] < errs["lord"]
    assert errs["svd-llm-seq"] < errs["lord"]


def test_scope_model_and_compensation_rank(calib_ids):
    model = tiny_llama()
    report = compress_(model, "svd-llm", 0.2, scope="model", calibration=calib_ids, progress=False)
    assert report.ratio_model >= 0.2 - 1e-9 and report.ratio_targets > report.ratio_model
    model = tiny_llama()
    plain = tiny_llama()
    r1 = compress_(model, "lord", 0.3, compensation_rank=4, calibration=calib_ids, progress=False)
    r2 = compress_(plain, "lord", 0.3, calibration=calib_ids, progress=False)
    assert r1.params_model_after == r2.params_model_after  # EoRA spent inside the same budget
    assert any(isinstance(m, CompensatedLinear) for m in model.modules())


@pytest.mark.parametrize("ratio", [1.0, -0.2, 1.7])
def test_ratio_outside_unit_interval_is_explained(llama, calib_ids, ratio):
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        compress_(llama, "svd-llm", ratio, calibration=calib_ids, progress=False)


def test_bad_inputs_are_explained(llama, calib_ids):
    with pytest.raises(ValueError, match="matched no module"):
        compress_(llama, "svd-llm", 0.2, target_modules=["conv_proj"], calibration=calib_ids, progress=False)
    with pytest.raises(ValueError, match="at least 128"):
        compress_(llama, "svd-llm", 0.2, calibration=calib_ids[:2, :8], progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        compress_(llama, "svd-lm", 0.2, calibration=calib_ids, progress=False)
    with pytest.raises(ValueError, match="lower the ratio"):
        compress_(llama, "lord", 0.9, scope="model", calibration=calib_ids, progress=False)


def test_singular_covariance_falls_back_to_damping(caplog):
    """Fewer tokens than a Gram's width: the run logs the fallback and computes exactly what an
    explicit damping=1e-4 computes (the documented fallback), with finite outputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=200,
                                            num_hidden_layers=1, num_attention_heads=4,
                                            num_key_value_heads=2)).eval()

    ids = torch.randint(0, 96, (6, 24), generator=torch.Generator().manual_seed(3))
    fallback, explicit = model(), model()  # 144 tokens < 200 inputs of down_proj
    with caplog.at_level(logging.WARNING, logger="rankwise.compress.api"):
        compress_(fallback, "svd-llm", 0.2, calibration=ids, progress=False)
    assert "singular" in caplog.text and "damping 1e-4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rankwise.compress.api"):
        compress_(explicit, "svd-llm", 0.2, calibration=ids, damping=1e-4, progress=False)
    assert "singular" not in caplog.text  # asked for: nothing to fall back from
    got, want = fallback.state_dict(), explicit.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert torch.isfinite(torch.tensor(_loss(fallback, ids)))


def test_save_load_generate_round_trip(tmp_path, llama, calib_ids):
    report = compress_(llama, "svd-llm", 0.3, calibration=calib_ids, compensation_rank=2, progress=False)
    save_compressed(llama, tmp_path, report=report)
    assert {"config.json", "model.safetensors", "rankwise_compression.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = load_compressed(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib_ids).logits, llama(calib_ids).logits)
    import rankwise

    again = rankwise.load_model(tmp_path, dtype=torch.float64)  # one call for a compressed directory
    assert all(p.dtype == torch.float64 for p in again.parameters())
    with torch.no_grad():
        torch.testing.assert_close(again(calib_ids).logits.float(), llama(calib_ids).logits, rtol=1e-4, atol=1e-5)
    assert count_parameters(loaded) == report.params_model_after
    prompt = calib_ids[:1, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(loaded.generate(prompt, **kwargs), llama.generate(prompt, **kwargs))


def test_load_refuses_non_compressed_and_corrupt_dirs(tmp_path, llama, calib_ids):
    with pytest.raises(FileNotFoundError, match="rankwise_compression.json"):
        load_compressed(tmp_path)
    compress_(llama, "lord", 0.3, calibration=calib_ids, progress=False)
    save_compressed(llama, tmp_path)
    import json

    meta = json.loads((tmp_path / "rankwise_compression.json").read_text())
    first = next(iter(meta["layers"]))
    meta["layers"][first]["rank"] += 1
    (tmp_path / "rankwise_compression.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match the ranks"):
        load_compressed(tmp_path)


@pytest.mark.slow
def test_compensate_quantised_model_and_peft_export(tmp_path, calib_ids):
    peft = pytest.importorskip("peft")  # an optional peer: the adapter format check needs it
    dense = tiny_llama()
    with torch.no_grad():
        ref = dense(calib_ids).logits
    errs = {}
    for comp, rank in (("eora", 0), ("svd", 8), ("eora", 8)):
        model = tiny_llama()
        compensate_(model, "int4", rank, compensation=comp, calibration=calib_ids, block_size=16, progress=False)
        with torch.no_grad():
            errs[(comp, rank)] = float((model(calib_ids).logits - ref).pow(2).mean())
    assert errs[("eora", 8)] < errs[("eora", 0)]
    assert errs[("eora", 8)] < errs[("svd", 8)]

    from rankwise.compress import export_peft

    export_peft(model, tmp_path / "adapter", base_directory=tmp_path / "base")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", local_files_only=True).eval()
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(calib_ids).logits, model(calib_ids).logits, rtol=1e-4, atol=1e-4)
