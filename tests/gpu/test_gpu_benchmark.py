"""benchmarks/gpu.py is importable everywhere, skips cleanly without CUDA (nothing written), and
its measuring code runs on a CPU (memory columns empty there)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from gpu_devices import CUDA

pytestmark = pytest.mark.gpu
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("rankwise_bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(CUDA, reason="a CUDA device is present: `make test-gpu` runs the benchmark")
def test_without_cuda_it_measures_and_writes_nothing(tmp_path, capsys):
    bench = load_script()
    assert bench.main(["--out", str(tmp_path / "results")]) == 0
    assert not (tmp_path / "results").exists()
    assert "no CUDA device" in capsys.readouterr().out


def test_one_optimizer_measurement_runs_on_cpu():
    bench = load_script()
    row = bench.one_optimizer(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), "quick",
                              "cpu", steps=2)
    assert row["state_bytes"] is None and row["peak_step_bytes"] is None  # CUDA-only columns
    assert row["first_step_s"] > 0 and row["median_step_s"] > 0
    assert math.isfinite(row["last_loss"])
