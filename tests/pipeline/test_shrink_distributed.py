"""`rankwise shrink` under ``torchrun --nproc_per_node 2`` (gloo): rank 0 alone writes, the
output equals a 1-process run's (the same files, the healed weights to float rounding), and a
run interrupted by Ctrl-C on one rank resumes from rank 0's files on both ranks.

One torchrun launch runs the three scenarios of shrink_worker.py; the 1-process reference runs
the same command in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import shrink_worker  # noqa: E402

from rankwise.io import load_tensors  # noqa: E402

pytestmark = [pytest.mark.xdist_group("distributed"), pytest.mark.slow]
SRC = str(Path(__file__).resolve().parents[2] / "src")
TOL = 1e-6  # float rounding: the 2-process healing gradient is (g0 + g1) / 2 (measured: 3e-8)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer, docs, make_llama):
    root = tmp_path_factory.mktemp("shrink-dist")
    make_llama(len(tokenizer)).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    (root / "text.txt").write_text("\n\n".join(docs[:40]))
    return root, str(root / "tiny"), str(root / "text.txt")


@pytest.fixture(scope="module")
def two(inputs):
    root, model, text = inputs
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("shrink_worker.py")), str(root / "two"), model, text]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "two", {(s, r): json.loads((root / "two" / f"{s}-rank{r}.json").read_text())
                          for s in ("full", "interrupted", "resumed") for r in (0, 1)}


@pytest.fixture(scope="module")
def one(inputs):
    from rankwise.cli import main

    root, model, text = inputs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(shrink_worker.shrink_args(model, text, root / "one")) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "one"


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def _record(directory: Path) -> dict:
    return json.loads((directory / "pipeline.json").read_text())["stages"]


def test_rank0_alone_writes_and_the_output_is_the_one_process_output(two, one):
    root, runs = two
    assert runs["full", 0]["code"] == runs["full", 1]["code"] == 0
    assert runs["full", 0]["writes"], "rank 0 wrote nothing"
    assert runs["full", 1]["writes"] == []  # no second writer: no rename, replace or mkdir at all
    assert _files(root / "full") == _files(one)  # no temporary left, no file missing or extra
    a, b = _record(one), _record(root / "full")
    for stage in ("compress", "compensate", "heal"):
        assert b[stage].get("changed", True) == a[stage].get("changed", True), stage
    assert b["heal"]["kept"] and b["heal"]["training"]["steps"] == 4  # the weights below are healed
    assert b["compress"]["heldout_ppl"] == pytest.approx(a["compress"]["heldout_ppl"], rel=1e-6)
    ta, tb = load_tensors(one / "model.safetensors"), load_tensors(root / "full" / "model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=TOL, msg=k)


def test_ctrl_c_on_one_rank_stops_both_and_both_resume_from_rank0s_files(two):
    root, runs = two
    for r in (0, 1):
        stopped = runs["interrupted", r]
        assert stopped["code"] == 130  # every rank stopped after the same healing step
        assert stopped["stages_on_disk"] == ["compensate", "compress"]  # sorted
        assert "model.safetensors" not in stopped["files"]  # nothing half-exported
        resumed = runs["resumed", r]
        assert resumed["code"] == 0 and resumed["recomputed"] == []  # rank 0's stages reused
    assert runs["interrupted", 1]["writes"] == runs["resumed", 1]["writes"] == []
    assert _files(root / "resume") == _files(root / "full")
    ta, tb = (load_tensors(root / d / "model.safetensors") for d in ("full", "resume"))
    assert ta.keys() == tb.keys()  # healing restarted from rank 0's compensate model, which every
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # rank also held uninterrupted: bit-exact


def test_a_healing_batch_that_does_not_split_is_refused_before_loading(monkeypatch, tmp_path):
    """On 3 processes a global healing batch of 4 cannot be sharded: refused before the model
    is even loaded (a missing model directory would otherwise be the error)."""
    from rankwise.pipeline import shrink
    from rankwise.train import dist

    monkeypatch.setattr(dist, "init", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="heal_batch_size=4 does not split evenly over 3 processes"):
        shrink(str(tmp_path / "absent"), 0.2, out=tmp_path / "o", heal_batch_size=4, heal_steps=2)
    shrink_ok = dict(heal_batch_size=4, heal_method="none")  # no healing: nothing to split
    with pytest.raises((FileNotFoundError, ValueError, OSError), match="absent"):
        shrink(str(tmp_path / "absent"), 0.2, out=tmp_path / "o", **shrink_ok)
