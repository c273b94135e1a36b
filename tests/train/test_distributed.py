"""Training on 2 gloo processes (torchrun): rank 0 alone writes, every rank resumes, the loss
curve equals the 1-process run at the same global batch, Ctrl-C on one rank saves once.

Each launch runs several scenarios of dist_worker.py (one interpreter start per rank); the
1-process references run the same scenarios in this process.
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
import dist_worker  # noqa: E402

pytestmark = [pytest.mark.xdist_group("distributed"), pytest.mark.slow]
SRC = str(Path(__file__).resolve().parents[2] / "src")
TOL = 2e-6  # float rounding: the 2-process gradient is (g0 + g1) / 2, not the 1-process sum


def _torchrun(out: Path, *scenarios: str) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("dist_worker.py")), str(out), *scenarios]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {s: json.loads((out / f"{s}.json").read_text()) for s in scenarios}


def _one_process(out: Path, name: str) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return dist_worker.scenario(name, out)
    finally:
        torch.set_num_threads(threads)


def _close(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def pretrain_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    runs = _torchrun(out, "pretrain_full", "pretrain_resume", "pretrain_fsdp",
                     "pretrain_fsdp_resume", "pretrain_fsdp_full_resume", "pretrain_fsdp_stop")
    runs["root"] = out
    return runs


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory):
    return _torchrun(tmp_path_factory.mktemp("two"), "finetune", "heal", "interrupt",
                     "finetune_full", "finetune_full_resume")


def test_pretrain_two_processes_equal_one(pretrain_runs, tmp_path):
    two = pretrain_runs["pretrain_full"]
    one = _one_process(tmp_path, "pretrain_full")
    assert two["processes"] == 2 and two["rank_results"] == [6, 6]
    assert _close(one["losses"], two["losses"]) < TOL
    assert [v["step"] for v in two["val"]] == [3, 6]
    assert _close([v["perplexity"] for v in one["val"]], [v["perplexity"] for v in two["val"]]) \
        < 1e-4


def test_pretrain_resume_on_two_processes_is_exact(pretrain_runs):
    """Rank 0 wrote step-000002 (no crash at the first checkpoint); both ranks resumed from it
    and the curve is the uninterrupted 2-process one, bit for bit."""
    resumed = pretrain_runs["pretrain_resume"]
    assert resumed["resumed_from"] == 2
    assert resumed["losses"] == pretrain_runs["pretrain_full"]["losses"]


def test_fsdp2_galore_equals_one_process_and_resumes_exactly(pretrain_runs, tmp_path):
    """FSDP2-sharded GaLore (gradients all-gathered through the projector) follows the
    1-process curve, and resumes bit-exactly from its full-tensor checkpoint (the shards of the
    elementwise moments gathered, the replicated low-rank moments and projector kept whole)."""
    one = _one_process(tmp_path, "pretrain_fsdp")
    assert _close(one["losses"], pretrain_runs["pretrain_fsdp"]["losses"]) < TOL
    resumed = pretrain_runs["pretrain_fsdp_resume"]
    assert resumed["resumed_from"] == 2
    assert resumed["losses"] == pretrain_runs["pretrain_fsdp"]["losses"]
    full = pretrain_runs["pretrain_fsdp_full_resume"]  # torch AdamW's DTensor state
    assert full["resumed_from"] == 2
    assert _close(full["losses"], pretrain_runs["pretrain_full"]["losses"]) < TOL


def test_a_sharded_checkpoint_resumes_in_one_process(pretrain_runs, tmp_path):
    """The FSDP2 checkpoint has the unsharded layout: one process continues it on the
    1-process curve."""
    from rankwise.train.loop import pretrain

    out = pretrain_runs["root"] / "pretrain_fsdp_stop"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = pretrain(dist_worker.pretrain_config(out, method="galore"),
                           data=dist_worker.pretrain_data(), resume=True)
    finally:
        torch.set_num_threads(threads)
    one = _one_process(tmp_path, "pretrain_fsdp")
    assert resumed.resumed_from == 2 and resumed.processes == 1
    assert _close(one["losses"], resumed.losses) < TOL


def test_finetune_and_healing_two_processes_equal_one(task_runs, tmp_path):
    for name in ("finetune", "heal"):
        one, two = _one_process(tmp_path, name), task_runs[name]
        assert two["rank_results"] == [4, 4], name
        assert _close(one["losses"], two["losses"]) < TOL, name


def test_full_finetuning_with_galore_under_fsdp2(task_runs, tmp_path):
    """Full fine-tuning (every weight) with the GaLore preset, FSDP2-sharded on 2 processes:
    the 1-process curve, a bit-exact resume from the gathered checkpoint, the model exported."""
    one = _one_process(tmp_path, "finetune_full")
    two, resumed = task_runs["finetune_full"], task_runs["finetune_full_resume"]
    assert _close(one["losses"], two["losses"]) < TOL
    assert resumed["resumed_from"] == 2 and resumed["losses"] == two["losses"]
    assert "model.safetensors" in two["files"] and "adapter" not in two["files"]


def test_ctrl_c_on_one_rank_stops_all_and_saves_once(task_runs):
    record = task_runs["interrupt"]
    assert record["interrupted"] and record["rank_results"] == [3, 3]
    assert record["checkpoints"] == ["step-000003"]
