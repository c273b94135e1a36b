"""benchmarks/reproduce.py: the figure-by-figure comparison of a re-run with the committed results
(rows matched by their keys, quality figures within tolerance, timings judged against a band)."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"


@pytest.fixture(scope="module")
def rep():
    spec = importlib.util.spec_from_file_location("rankwise_bench_reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results() -> dict:
    return {
        "settings": {"steps": 64, "threads": 1},
        "environment": {"loadavg": [3.0, 2.0, 1.0]},
        "runs": {"lora": {"val_perplexity": 599.57, "parameters": {"trainable": 1651360},
                          "losses": [8.31, 7.9, 7.5], "tokens_per_s": 1500.0}},
        "grid": [
            {"method": "svd-llm", "ratio": 0.2, "perplexity": 56.19, "compress_s": 300.0},
            {"method": "lord", "ratio": 0.2, "perplexity": 80.5, "compress_s": 20.0},
        ],
        "lora_vs_peft": {"step_time_ratio": 1.01, "median_step_seconds": {"peft": 0.57, "rankwise": 0.58}},
    }


def _diff_paths(report: dict) -> set[str]:
    return {d["path"] for d in report["differences"]}


def test_equal_results_agree(rep):
    a = _results()
    r = rep.compare(a, copy.deepcopy(a))
    assert r["differences"] == [] and r["one_side_only"] == [] and r["settings_differ"] == {}
    q = r["counts"]["quality"]
    # perplexity x2, val_perplexity, trainable, 3 losses
    assert q == {"compared": 7, "agree": 7, "differ": 0} and r["quality_bitwise_equal"] == 7
    assert r["counts"]["timing_ratio"]["compared"] == 1  # step_time_ratio
    assert r["counts"]["timing"]["compared"] == 5  # 2 compress_s, tokens_per_s, 2 step seconds
    assert r["rows_compared"] == r["rows_committed"] == 5


def test_a_changed_perplexity_is_flagged_and_float_noise_is_not(rep):
    a, b = _results(), _results()
    b["grid"][0]["perplexity"] *= 1.01  # 1 %: a behaviour change
    b["runs"]["lora"]["val_perplexity"] *= 1 + 1e-6  # reduction-order noise
    r = rep.compare(a, b)
    assert _diff_paths(r) == {"grid/[method=svd-llm,ratio=0.2]/perplexity"}
    d = r["differences"][0]
    assert d["kind"] == "quality" and d["committed"] == 56.19 and d["rerun"] == pytest.approx(56.19 * 1.01)
    assert d["rel_diff"] == pytest.approx(0.01 / 1.01)
    assert r["counts"]["quality"]["differ"] == 1


def test_counts_must_be_exact(rep):
    a, b = _results(), _results()
    b["runs"]["lora"]["parameters"]["trainable"] += 1  # within rel 1e-3, but a count
    assert _diff_paths(rep.compare(a, b)) == {"runs/lora/parameters/trainable"}


def test_timings_inside_the_band_pass_and_outside_are_reported(rep):
    a, b = _results(), _results()
    b["lora_vs_peft"]["step_time_ratio"] = 1.01 * 1.3  # interleaved ratio within 0.67-1.5
    b["runs"]["lora"]["tokens_per_s"] = 1500.0 / 2.5  # absolute: a 2.5x slower machine, within 1/3-3
    b["grid"][1]["compress_s"] = 20.0 * 4  # absolute, outside the band
    r = rep.compare(a, b)
    assert r["counts"]["quality"]["differ"] == 0
    assert _diff_paths(r) == {"grid/[method=lord,ratio=0.2]/compress_s"}
    assert r["differences"][0]["kind"] == "timing"
    assert r["differences"][0]["rerun_over_committed"] == pytest.approx(4.0)
    b["lora_vs_peft"]["step_time_ratio"] = 1.01 * 1.6
    assert "lora_vs_peft/step_time_ratio" in _diff_paths(rep.compare(a, b))


def test_rows_are_matched_by_key_not_position(rep):
    a = _results()
    b = copy.deepcopy(a)
    b["grid"].reverse()  # a re-run in another order
    assert rep.compare(a, b)["differences"] == []
    c = copy.deepcopy(a)
    c["grid"] = [c["grid"][1]]  # a subset re-run: svd-llm not re-run
    r = rep.compare(a, c)
    assert r["differences"] == [] and r["one_side_only"] == []
    assert r["rows_not_rerun"] == ["grid/[method=svd-llm,ratio=0.2]"]
    assert r["rows_compared"] == r["rows_committed"] - 1
    # by position, lord's perplexity would be compared with svd-llm's and differ
    swapped = copy.deepcopy(a)
    swapped["grid"][0]["method"], swapped["grid"][1]["method"] = "lord", "svd-llm"
    assert len(rep.compare(a, swapped)["differences"]) == 4  # both perplexities and both times


def test_metadata_is_skipped_and_settings_listed(rep):
    a, b = _results(), _results()
    b["environment"]["loadavg"] = [9.0, 9.0, 9.0]
    b["settings"]["steps"] = 10
    r = rep.compare(a, b)
    assert r["differences"] == [] and r["settings_differ"] == {"steps": [64, 10]}


def test_classify_uses_leaf_then_named_parent_never_a_table(rep):
    assert rep.classify(("lora_vs_peft", "median_step_seconds", "peft"), 0.5) == "timing"
    assert rep.classify(("lora_vs_peft", "metric", "peft"), 0.7) == "quality"
    assert rep.classify(("latency", "[config=uniform,ratio=0.1]", "ratio_model"), 0.08) == "quality"
    assert rep.classify(("latency", "[config=uniform,ratio=0.1]", "latency_vs_dense"), 0.99) == "timing_ratio"
    assert rep.classify(("scaling", "sweep_seconds_vs_k", "exact", "[2]"), 0.1) == "timing"
    assert rep.classify(("timing", "[n=512]", "exact", "peak_bytes"), 2**20) == "timing"  # peak RSS
    assert rep.classify(("memory", "optimizer_state"), 2**20) == "quality"  # counted bytes
    assert rep.classify(("cells", "[m=4]", "goal_met"), True) == "other"


def test_main_writes_json_and_markdown_against_a_folder(rep, tmp_path):
    committed, rerun, out = tmp_path / "committed", tmp_path / "rerun", tmp_path / "out"
    committed.mkdir()
    rerun.mkdir()
    a = _results()
    (committed / "toy.json").write_text(json.dumps(a))
    a["grid"][1]["perplexity"] = 90.0
    (rerun / "toy.json").write_text(json.dumps(a))
    assert rep.main([str(rerun), "--committed", str(committed), "--out", str(out)]) == 0
    report = json.loads((out / "reproduce.json").read_text())
    assert _diff_paths(report["benchmarks"]["toy"]) == {"grid/[method=lord,ratio=0.2]/perplexity"}
    md = (out / "reproduce.md").read_text()
    assert "benchmarks/reproduce.py" in md and "| `grid/[method=lord,ratio=0.2]/perplexity` | 80.5 | 90 |" in md


def test_committed_results_come_from_git(rep):
    root = SCRIPT.parents[1]
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    assert "cells" in rep.load_committed("linalg", "HEAD")  # benchmarks/results/linalg.json at HEAD
    assert rep.load_committed("no-such-benchmark", "HEAD") is None
