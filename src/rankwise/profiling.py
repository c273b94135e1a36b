"""Timing and memory measurements for the benchmarks.

* `time_fn`: wall-clock statistics of a callable (``time.perf_counter``; CUDA is synchronised
  around each call when it is in use, so queued kernels are timed too).
* Byte counts of parameters, gradients and optimizer state. Quantised states count what they
  really store: an int8 tensor is 1 byte per element, and tensor subclasses that wrap several
  tensors (``__tensor_flatten__``, e.g. torchao's quantised tensors) are summed over their parts.
* `peak_rss_of`: the peak resident set size while a callable runs. On Linux it resets the
  kernel's high-water mark (writing "5" to ``/proc/self/clear_refs``, Linux >= 4.0) and reads
  ``VmHWM`` from ``/proc/self/status`` afterwards: exact, no sampling gaps. Where that reset is
  not permitted it falls back to a background thread reading the current RSS every ~1 ms,
  which can miss a spike shorter than that.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


# ----------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class TimingStats:
    """Seconds per call over `repeats` timed calls (after warm-up)."""

    median: float
    mean: float
    min: float
    stdev: float
    repeats: int
    times: tuple[float, ...] = ()


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeat: int = 5) -> TimingStats:
    """Call `fn` `warmup` times untimed, then `repeat` times timed; return the statistics."""
    if repeat < 1 or warmup < 0:
        raise ValueError(f"need repeat >= 1 and warmup >= 0, got repeat={repeat}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return TimingStats(
        median=statistics.median(times),
        mean=statistics.fmean(times),
        min=min(times),
        stdev=statistics.stdev(times) if len(times) > 1 else 0.0,
        repeats=repeat,
        times=tuple(times),
    )


# ----------------------------------------------------------------------------- bytes
def _tensor_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold a (possibly wrapper-subclass) tensor's data."""
    if (
        type(t) is not torch.Tensor
        and type(t) is not nn.Parameter
        and hasattr(t, "__tensor_flatten__")
    ):
        names, _ = t.__tensor_flatten__()
        parts: list[torch.Tensor] = []
        for name in names:
            parts.extend(_tensor_parts(getattr(t, name)))
        return parts
    return [t]


def _collect(obj: Any, out: list[torch.Tensor], depth: int = 0) -> None:
    if depth > 20:
        return
    if isinstance(obj, torch.Tensor):
        out.extend(_tensor_parts(obj))
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _collect(v, out, depth + 1)
    elif isinstance(obj, list | tuple | set):
        for v in obj:
            _collect(v, out, depth + 1)
    elif hasattr(obj, "state_dict") and callable(obj.state_dict):
        _collect(obj.state_dict(), out, depth + 1)  # e.g. a projector object kept in the state


def tensor_bytes(tensors: Any) -> int:
    """Bytes held by the tensors in `tensors` (a tensor, or nested dicts/lists of them).

    Each tensor counts ``numel * element_size`` once (the same tensor reached twice, or two
    views with the same address/shape/dtype, count once).
    """
    found: list[torch.Tensor] = []
    _collect(tensors, found)
    seen: set[tuple[Any, ...]] = set()
    total = 0
    for t in found:
        key = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if t.data_ptr() and key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied parameters once)."""
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the ``.grad`` tensors currently held by the model's parameters."""
    return tensor_bytes([p.grad for p in model.parameters() if p.grad is not None])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, quantised states, projectors)."""
    return tensor_bytes(list(optimizer.state.values()))


def memory_report(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, int]:
    """``{"parameters", "gradients", "optimizer_state", "total"}`` in bytes."""
    report = {
        "parameters": parameter_bytes(model),
        "gradients": gradient_bytes(model),
        "optimizer_state": optimizer_state_bytes(optimizer) if optimizer is not None else 0,
    }
    report["total"] = sum(report.values())
    return report


# ----------------------------------------------------------------------------- RSS
def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil
    except ImportError as exc:  # pragma: no cover - non-Linux without psutil
        raise RuntimeError("current_rss needs /proc (Linux) or `pip install psutil`") from exc
    return int(psutil.Process().memory_info().rss)  # pragma: no cover


def hwm_resettable() -> bool:
    """Whether `peak_rss_of` can use the exact high-water-mark method here (resets it)."""
    return _reset_hwm()


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    # after a reset the mark sits at the current RSS (allow for pages touched in between)
    return hwm is not None and rss is not None and hwm <= rss + 1024


def peak_rss_of(
    fn: Callable[[], Any],
    *,
    method: Literal["auto", "hwm", "sampling"] = "auto",
    interval: float = 1e-3,
) -> tuple[Any, int]:
    """Run `fn` and return ``(its result, peak RSS during the call - RSS before, in bytes)``.

    `method` "hwm" resets and reads the kernel's high-water mark, "sampling" polls the RSS every
    `interval` seconds in a thread, "auto" uses "hwm" when permitted (see the module docstring).
    """
    if method not in ("auto", "hwm", "sampling"):
        raise ValueError(f"method must be 'auto', 'hwm' or 'sampling', got {method!r}")
    use_hwm = method != "sampling" and _reset_hwm()
    if method == "hwm" and not use_hwm:
        raise RuntimeError("this kernel does not allow resetting VmHWM: use method='sampling'")
    before = current_rss()
    if use_hwm:
        result = fn()
        peak = (_status_kib("VmHWM") or 0) * 1024
        return result, max(peak - before, 0)

    peak_seen = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak_seen[0] = max(peak_seen[0], current_rss())
            stop.wait(interval)

    thread = threading.Thread(target=sample, name="rankwise-rss-sampler", daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        peak_seen[0] = max(peak_seen[0], current_rss())
        stop.set()
        thread.join()
    return result, max(peak_seen[0] - before, 0)


def format_bytes(n: float) -> str:
    """Human-readable bytes (binary units): ``format_bytes(3 * 2**20) == '3.00 MiB'``."""
    if n == 0 or not math.isfinite(n):
        return f"{n} B"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = min(int(math.log(abs(n), 1024)), len(units) - 1)
    return f"{n / 1024**i:.2f} {units[i]}"


def iter_bytes_by_dtype(tensors: Iterable[torch.Tensor]) -> dict[str, int]:
    """Bytes per dtype name, e.g. to show how much of a state is int8."""
    out: dict[str, int] = {}
    for t in tensors:
        for part in _tensor_parts(t):
            key = str(part.dtype).removeprefix("torch.")
            out[key] = out.get(key, 0) + part.numel() * part.element_size()
    return out
