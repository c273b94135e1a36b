"""End to end on a tiny Llama: stage contracts, budget accounting, resume, export, CLI."""

from __future__ import annotations

import json

import pytest
import torch

import rankwise
from rankwise.pipeline import PipelineInterrupted, shrink


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer, docs, calib, make_llama, fast):
    out = tmp_path_factory.mktemp("shrink") / "out"
    dense = make_llama(len(tokenizer))
    result = shrink(dense, 0.25, out=out, tokenizer=tokenizer, text=docs, calibration=calib,
                    keep_stages=True, **fast)
    return dense, result


def _targets(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def test_every_stage_keeps_its_contract(run, fast):
    _, result = run
    s = result.stages
    assert list(s) == ["dense", "compress", "compensate", "heal", "export"]
    comp = s["compress"]
    best = min(comp["candidates"], key=lambda c: c["heldout_ppl"])  # chosen by measurement
    assert (comp["method"], comp["allocation"]) == (best["method"], best["allocation"])
    assert comp["heldout_ppl"] == pytest.approx(best["heldout_ppl"], rel=1e-6)
    assert s["compensate"]["heldout_ppl"] <= comp["heldout_ppl"]  # used only where it helps
    assert s["heal"]["training"]["steps"] == fast["heal_steps"]
    assert s["heal"]["heldout_ppl"] <= s["compensate"]["heldout_ppl"]  # kept only if it helps
    assert s["export"]["reload"]["max_abs_diff"] == 0.0
    assert s["export"]["reload"]["via"] == "rankwise.load_model"
    assert s["export"]["latency"]["latency_vs_dense"] > 0
    assert s["export"]["first_token_latency"]["tokens"] == s["export"]["latency"]["tokens"]
    dec = s["export"]["decode_latency"]
    assert dec["latency_vs_dense"] == pytest.approx(dec["ms_per_token"] / dec["dense_ms_per_token"])
    report = (result.out / "report.md").read_text()
    for needle in ("held-out ppl", "test ppl", "latency", "decode latency", "time to first token", "Per-layer ranks", "model.layers.1.mlp.down_proj"):
        assert needle in report
    assert json.loads((result.out / "pipeline.json").read_text())["stages"]["compress"]["method"] == comp["method"]


def test_parameter_budget_is_exact_and_compensation_counts_inside_it(run):
    from rankwise.compress import load_compressed
    from rankwise.pipeline.state import STATE_DIR
    from rankwise.pipeline.structure import target_params

    dense, result = run
    names = _targets(dense)
    before = target_params(dense, names)
    exported = rankwise.load_model(result.out)
    after = target_params(exported, names)
    assert result.stages["heal"]["ratio_targets"] == pytest.approx(1 - after / before, abs=0)
    assert abs((1 - after / before) - 0.25) < 0.03  # the allocation's rank rounding, nothing else
    root = result.out / STATE_DIR
    saved = [s for s in ("compress", "compensate", "heal") if (root / s).is_dir()]  # stages that changed weights
    assert saved[0] == "compress"
    per_layer = {s: [target_params(load_compressed(root / s), [n]) for n in names] for s in saved}
    per_layer["export"] = [target_params(exported, [n]) for n in names]
    assert all(v == per_layer["compress"] for v in per_layer.values())  # EoRA/healing inside each rank
    assert sum(p.numel() for p in exported.parameters()) == result.stages["export"]["params_model"]


def test_compensation_is_measured_per_layer_and_spends_rank_not_parameters(tmp_path, tokenizer, docs, calib,
                                                                          make_llama, fast):
    """Plain SVD (lord) leaves an error EoRA's eigenspace fit can reduce: layers that take it keep
    the parameter count, and every compensated layer has the lower held-out weighted error."""
    from rankwise.compress import CompensatedLinear, load_compressed
    from rankwise.pipeline.state import STATE_DIR
    from rankwise.pipeline.structure import target_params

    dense = make_llama(len(tokenizer), seed=2)
    r = shrink(dense, 0.3, out=tmp_path / "o", tokenizer=tokenizer, text=docs, calibration=calib, method="lord",
               allocation="uniform", heal_method="none", keep_stages=True, latency=False,
               **{k: v for k, v in fast.items() if k != "heal_minutes"} | {"compensation_ranks": (2, 4)})
    rec = r.stages["compensate"]
    assert {v["rank"] for v in rec["variants"]} == {2, 4}
    base = load_compressed(tmp_path / "o" / STATE_DIR / "compress")
    saved = tmp_path / "o" / STATE_DIR / "compensate"
    assert saved.is_dir() == bool(rec["used_rank"])  # saved only when it changed the model
    comp = load_compressed(saved) if saved.is_dir() else base
    names = _targets(dense)
    assert [target_params(comp, [n]) for n in names] == [target_params(base, [n]) for n in names]
    used = [n for n in names if isinstance(comp.get_submodule(n), CompensatedLinear)]
    assert len(used) == rec["layers_compensated"]
    if rec["used_rank"]:
        assert rec["heldout_ppl"] < r.stages["compress"]["heldout_ppl"]
        assert all(comp.get_submodule(n).rank == rec["used_rank"] for n in used)
    else:
        assert not used and rec["heldout_ppl"] == r.stages["compress"]["heldout_ppl"]


def test_a_killed_run_resumes_from_its_last_finished_stage(tmp_path, tokenizer, docs, calib, monkeypatch,
                                                           make_llama, fast):
    from rankwise.pipeline import stages

    kw = dict(out=tmp_path / "o", tokenizer=tokenizer, text=docs, calibration=calib, method="svd-llm",
              allocation="uniform", latency=False, **fast)
    with pytest.raises(PipelineInterrupted):
        shrink(make_llama(len(tokenizer)), 0.2, stop_after="compress", **kw)
    state = json.loads((tmp_path / "o" / ".rankwise-pipeline" / "state.json").read_text())
    assert list(state["stages"]) == ["compress"]
    assert not (tmp_path / "o" / "model.safetensors").exists()

    def never(*_a, **_k):
        raise AssertionError("stage 1 recomputed on resume")

    monkeypatch.setattr(stages, "compress_stage", never)
    result = shrink(make_llama(len(tokenizer)), 0.2, resume=True, keep_stages=True, **kw)
    assert result.reused == ["compress"]
    assert result.stages["compress"]["heldout_ppl"] == state["stages"]["compress"]["heldout_ppl"]
    assert rankwise.load_model(tmp_path / "o") is not None
    # a finished run resumed with another healing budget reruns healing and export only
    monkeypatch.setattr(stages, "compensate_stage", never)
    again = shrink(make_llama(len(tokenizer)), 0.2, resume=True, **(kw | {"heal_steps": 2}))
    assert again.reused == ["compress", "compensate"]
    assert again.stages["heal"]["training"]["steps"] == 2



def test_a_resume_whose_stage_models_are_gone_recomputes_every_stage(tmp_path, tokenizer, docs, calib,
                                                                      monkeypatch, make_llama, fast):
    from rankwise.pipeline import stages

    kw = dict(out=tmp_path / "o", tokenizer=tokenizer, text=docs, calibration=calib, method="svd-llm",
              allocation="uniform", latency=False, compensation=False, **fast)
    first = shrink(make_llama(len(tokenizer)), 0.2, **kw)  # stage models removed after export
    calls: list[str] = []
    real = stages.compress_stage
    monkeypatch.setattr(stages, "compress_stage", lambda ctx: calls.append("compress") or real(ctx))
    # healing changed: compress/compensate records are valid but their models are gone -> start over
    again = shrink(make_llama(len(tokenizer)), 0.2, resume=True, **(kw | {"heal_steps": 1}))
    assert calls == ["compress"] and again.reused == []
    assert again.stages["compress"]["heldout_ppl"] == first.stages["compress"]["heldout_ppl"]
    assert again.stages["heal"]["training"]["steps"] == 1

def test_exported_directory_reloads_with_equal_outputs_and_generates(run, tokenizer):
    from rankwise.layers.factorized import FactorizedLinear

    dense, result = run
    model = rankwise.load_model(result.out)
    kinds = {type(model.get_submodule(n)) for n in _targets(dense)}
    assert FactorizedLinear in kinds and kinds <= {FactorizedLinear, torch.nn.Linear}  # EoRA/LoRA folded in
    ids = tokenizer("def main():", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, result.model(ids).logits, rtol=0, atol=0)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 5
    assert rankwise.load_tokenizer(result.out) is not None


def test_cli_shrink_runs_and_prints_one_summary(tmp_path, tokenizer, docs, capsys, make_llama):
    import argparse

    from rankwise.cli import shrink as cli

    src = tmp_path / "tiny"
    make_llama(len(tokenizer)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(docs[:40]))
    parser = argparse.ArgumentParser(prog="rankwise")
    cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["shrink", str(src), "--ratio", "0.2", "--out", str(out), "--heal-minutes", "0",
                              "--heal-steps", "2", "--heal-method", "lora", "--no-compensation", "--method", "svd-llm",
                              "--calib-source", str(text), "--calib-samples", "4", "--calib-seq-len", "64",
                              "--text", str(text), "--eval-tokens", "512", "--no-progress"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("held-out ppl") == 1 and "+ healing" in printed and "report.md" in printed
    assert rankwise.load_model(out) is not None
    with pytest.raises(ValueError, match="outside"):
        args.ratio = 1.0
        args.func(args)


def test_a_shared_cache_reuses_calibration_across_ratios(tmp_path, tokenizer, docs, calib, monkeypatch,
                                                         make_llama, fast):
    import rankwise.calibrate

    dense = make_llama(len(tokenizer))
    kw = dict(tokenizer=tokenizer, text=docs, calibration=calib, heal_method="none", latency=False,
              **{k: v for k, v in fast.items() if k != "heal_minutes"})
    cache: dict = {}
    first = shrink(dense, 0.2, out=tmp_path / "a", cache=cache, **kw)
    assert "calib" in cache and not any(k.startswith("compressor:") for k in cache)  # SVDs freed

    def no_capture(*_a, **_k):
        raise AssertionError("calibration recaptured despite the shared cache")

    monkeypatch.setattr(rankwise.calibrate, "capture_input_stats", no_capture)
    second = shrink(dense, 0.3, out=tmp_path / "b", cache=cache, **kw)
    assert second.stages["compress"]["ratio_targets"] > first.stages["compress"]["ratio_targets"]
    assert second.stages["dense"] == first.stages["dense"]
