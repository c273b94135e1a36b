"""Keeping a shrunk model general: domains, teacher text, mixtures, per-domain reports."""

from __future__ import annotations

import json

import pytest
import torch

from rankwise.pipeline import shrink


def test_domain_summary_marks_held_out_domains_and_leads_with_the_worst():
    from rankwise.pipeline.report import domain_summary, domain_table

    stages = {"dense": {"domains": {"python-docs": 10.0, "fortunes": 50.0, "devils-dictionary": 40.0}},
              "compress": {"domains": {"python-docs": 20.0, "fortunes": 150.0, "devils-dictionary": 200.0}},
              "heal": {"domains": {"python-docs": 11.0, "fortunes": 60.0, "devils-dictionary": 56.0}}}
    used = {"calibration": ["python-docs"], "healing": ["python-docs", "fortunes"]}
    rows = domain_summary(stages, used)
    assert list(rows) == ["devils-dictionary", "fortunes", "python-docs"]  # the only held-out one first
    assert rows["devils-dictionary"] | {} == {"healed_x_dense": 56 / 40, "training_free_x_dense": 5.0,
                                              "held_out": True, "dense_ppl": 40.0, "calibration": False,
                                              "healing": False}
    assert not rows["fortunes"]["held_out"] and rows["fortunes"]["healing"]
    assert domain_table(stages, used).startswith("worst held-out domain: devils-dictionary at 1.400x")
    # with nothing seen, every domain is held out and the worst (largest ratio) leads
    rows = domain_summary(stages, {"calibration": [], "healing": []})
    assert [d for d, r in rows.items()] == ["devils-dictionary", "fortunes", "python-docs"]
    assert all(r["held_out"] for r in rows.values())


def test_mixture_windows_take_equal_shares_of_each_domain(tokenizer):
    from rankwise.data.domains import domain_stream, mixture_windows

    w = mixture_windows(["fortunes", "devils-dictionary"], tokenizer, 6, 32, seed=1)
    assert w.shape == (6, 32)
    streams = {d: domain_stream(d, "train", tokenizer) for d in ("fortunes", "devils-dictionary")}

    def source(row):
        hits = [d for d, s in streams.items() if any(torch.equal(row, s[i:i + 32])
                                                     for i in range(0, s.numel() - 31, 32))]
        return hits[0] if hits else None

    assert [source(r) for r in w] == ["fortunes", "devils-dictionary"] * 3  # aligned windows, in turn


def test_teacher_sequences_follow_the_recipe_and_are_cached(tmp_path, monkeypatch, make_llama):
    from rankwise.data.teacher import teacher_cache_path, teacher_sequences

    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))
    model = make_llama(50)
    ids = teacher_sequences(model, 6, 10, seed=3, batch_size=4, greedy_tokens=2)
    assert ids.shape == (6, 10) and ids.dtype == torch.long
    with torch.no_grad():  # tokens 1..2 are the teacher's top-1 continuation of the random first token
        for row in ids:
            logits = model(row[None, :2]).logits[0]
            assert row[1] == logits[0].argmax() and row[2] == logits[1].argmax()
    files = list(tmp_path.glob("teacher/*.safetensors"))
    assert len(files) == 1
    # a second call reads the cache (sampling would fail now) and returns the same tensor
    monkeypatch.setattr("rankwise.data.teacher._sample_batch", lambda *a, **k: pytest.fail("sampled again"))
    assert torch.equal(teacher_sequences(model, 6, 10, seed=3, batch_size=4, greedy_tokens=2), ids)
    assert teacher_cache_path("m", 6, 10, 3) != teacher_cache_path("m", 6, 10, 4)


def test_distill_loss_fn_is_zero_against_itself_and_trains_towards_the_teacher(make_llama):
    from rankwise.pipeline.distill import distill_loss_fn, lm_loss_fn

    teacher, student = make_llama(50, seed=0), make_llama(50, seed=1)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    assert abs(distill_loss_fn(teacher)(teacher, ids).item()) < 1e-6
    assert distill_loss_fn(teacher)(student, ids).item() > 0.01
    assert lm_loss_fn()(student, ids).item() == pytest.approx(student(ids, labels=ids).loss.item())


def test_data_free_shrink_reports_every_domain_as_held_out(tmp_path, monkeypatch, tokenizer, docs, make_llama,
                                                          fast):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    r = shrink(make_llama(len(tokenizer)), 0.25, out=out, tokenizer=tokenizer, text=docs, calibration="teacher",
               n_samples=4, seq_len=64, heal_data="teacher", teacher_samples=8, heal_batch_size=2, method="svd-llm", allocation="uniform",
               compensation=False, latency=False, **fast)
    heal, exp = r.stages["heal"], r.stages["export"]
    assert heal["data"] == "teacher" and heal["training"]["steps"] == fast["heal_steps"]
    assert exp["domains_used"] == {"calibration": [], "healing": []}  # teacher text for both
    assert r.stages["compress"]["calibration"]["source"] == "teacher"
    record = json.loads((out / "pipeline.json").read_text())
    domains = record["domains"]
    assert set(domains) == {"python-docs", "fortunes", "devils-dictionary"}
    assert all(v["held_out"] for v in domains.values())
    worst = max(domains, key=lambda d: domains[d]["healed_x_dense"])  # (JSON keys are written sorted)
    dense = r.stages["dense"]["domains"]
    final = (heal if heal["kept"] else r.stages["compress"])["domains"]
    assert domains[worst]["healed_x_dense"] == pytest.approx(final[worst] / dense[worst])
    assert r.summary().startswith(f"worst held-out domain: {worst}")
    assert exp["generations"] and {"prompt", "dense", "shrunk"} <= set(exp["generations"][0])
    assert exp["fused_groups"] == 4  # q/k/v and gate/up in each of the two blocks
    report = (out / "report.md").read_text()
    assert "worst held-out domain" in report and "## Generations" in report


def test_default_healing_reads_the_mixture_unless_the_user_gives_text():
    """heal_data="auto" (the default): the user's text when given, else the python-docs +
    fortunes mixture, and the report marks what healing read accordingly."""
    from rankwise.pipeline.config import ShrinkConfig
    from rankwise.pipeline.distill import MIXTURE, domains_of

    default = ShrinkConfig()
    assert default.heal_data == "auto" and default.heal_method == "lowrank"
    assert default.healing_source == "mixture"
    assert sorted(domains_of(default.healing_source, None)) == sorted(MIXTURE)
    given = ShrinkConfig(text="notes.txt")
    assert given.healing_source == "text"
    assert ShrinkConfig(heal_data="teacher", text="notes.txt").healing_source == "teacher"
