"""Tests for rankwise.profiling: timing statistics, byte counts, peak RSS."""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch import nn

from rankwise import profiling


def test_time_fn_statistics_and_call_count() -> None:
    calls = []

    def fn() -> None:
        calls.append(1)
        time.sleep(0.01)

    t = profiling.time_fn(fn, warmup=2, repeat=4)
    assert len(calls) == 6 and t.repeats == 4 and len(t.times) == 4
    assert t.min >= 0.01 and t.min <= t.median <= max(t.times)
    assert t.median == statistics.median(t.times) and t.mean == pytest.approx(sum(t.times) / 4)
    assert t.stdev == pytest.approx(statistics.stdev(t.times))
    with pytest.raises(ValueError, match="repeat >= 1"):
        profiling.time_fn(fn, repeat=0)


def test_tensor_bytes_counts_dtypes_and_dedupes() -> None:
    a = torch.zeros(10, 10)  # 400 B
    q = torch.zeros(100, dtype=torch.int8)  # 100 B
    half = torch.zeros(8, dtype=torch.bfloat16)  # 16 B
    assert profiling.tensor_bytes({"a": a, "nested": [q, (half, a)]}) == 400 + 100 + 16
    assert profiling.tensor_bytes(a[:5]) == 200  # a view counts what it spans
    assert profiling.iter_bytes_by_dtype([a, q]) == {"float32": 400, "int8": 100}


def test_parameter_gradient_and_adamw_state_bytes() -> None:
    model = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 3, bias=False))
    model[1].weight = nn.Parameter(model[1].weight.detach())
    n_params = 10 * 5 + 5 + 5 * 3
    assert profiling.parameter_bytes(model) == 4 * n_params
    assert profiling.gradient_bytes(model) == 0
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 10)).sum().backward()
    assert profiling.gradient_bytes(model) == 4 * n_params
    opt.step()
    # two fp32 moments per parameter, plus a 0-d fp32 "step" tensor per parameter tensor
    expected_state = 2 * 4 * n_params + 3 * 4
    assert profiling.optimizer_state_bytes(opt) == expected_state
    report = profiling.memory_report(model, opt)
    assert report == {
        "parameters": 4 * n_params,
        "gradients": 4 * n_params,
        "optimizer_state": expected_state,
        "total": 8 * n_params + expected_state,
    }


class _Int8StateSGD(torch.optim.Optimizer):
    """Keeps an int8 momentum + fp32 block scales: what a quantised state really stores."""

    def __init__(self, params) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["q"] = torch.zeros(p.numel(), dtype=torch.int8)
                self.state[p]["scale"] = torch.ones(max(p.numel() // 4, 1))
                self.state[p]["meta"] = {"block": 4}


def test_quantised_optimizer_state_bytes() -> None:
    p = nn.Parameter(torch.zeros(64))
    opt = _Int8StateSGD([p])
    opt.step()
    assert profiling.optimizer_state_bytes(opt) == 64 * 1 + 16 * 4


_PEAK_RSS_PROBE = """
import json, sys, time
import torch
from rankwise import profiling

method, n_bytes = sys.argv[1], int(sys.argv[2])
def allocate():
    t = torch.ones(n_bytes // 4)  # ones touches every page, so all of it is resident
    time.sleep(0.5)  # the sampler polls every ~1 ms; on a loaded machine it needs time to run
    total = float(t[::4096].sum())
    del t
    return total

before = profiling.current_rss()
result, peak = profiling.peak_rss_of(allocate, method=method)
print(json.dumps({"result": result, "peak": peak, "before": before, "after": profiling.current_rss()}))
"""


@pytest.mark.parametrize("method", ["auto", "hwm", "sampling"])
def test_peak_rss_sees_a_200mb_tensor(method: str) -> None:
    """Measured in a fresh interpreter: inside the test process, memory that other tests left
    for the garbage collector can be freed during the call and hide part of the peak."""
    import json
    import subprocess
    import sys

    n_bytes = 200 * 2**20
    if method == "hwm" and not profiling.hwm_resettable():
        with pytest.raises(RuntimeError, match="method='sampling'"):
            profiling.peak_rss_of(lambda: None, method="hwm")
        return
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_PROBE, method, str(n_bytes)],
                         capture_output=True, text=True, check=True, timeout=120)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["result"] == float(n_bytes // 4 // 4096)
    assert 0.9 * n_bytes <= probe["peak"] <= 1.5 * n_bytes, profiling.format_bytes(probe["peak"])
    assert probe["after"] < probe["before"] + 0.5 * n_bytes  # freed again afterwards
    with pytest.raises(ValueError, match="method must be"):
        profiling.peak_rss_of(lambda: None, method="psutil")


def test_format_bytes() -> None:
    assert profiling.format_bytes(3 * 2**20) == "3.00 MiB"
    assert profiling.format_bytes(512) == "512.00 B"
