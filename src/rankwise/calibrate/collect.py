"""`InputCollector`: the forward pre-hooks every calibration pass uses (see rankwise.calibrate)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rankwise.calibrate.stats import _INPUT_STATS, GramAccumulator, LayerStats

logger = logging.getLogger(__name__)

__all__ = ["InputCollector"]


class InputCollector:
    """Forward pre-hooks on target layers feeding one `GramAccumulator` per distinct input.

    The same collector serves the whole-model pass (`capture_input_stats`) and the block runner
    (rankwise.compress.sequential, rankwise.compress.streaming): it checks inputs are finite,
    drops padded tokens (`set_mask`), shares one accumulator between layers that read the very
    same tensor (``share_inputs``) and, in `reference()` mode, records each layer's reference
    inputs so the next ordinary forward adds the cross-Gram ``Σ x_refᵀ x``.

    Use as a context manager (hooks removed on exit), then read `results()`.
    """

    def __init__(self, targets: Mapping[str, nn.Module], stats: Sequence[str] = ("gram",), *,
                 device: str | torch.device = "cpu", share_inputs: bool = False,
                 cross: bool = False) -> None:
        self.targets = dict(targets)
        self.stats = [s for s in stats if s in _INPUT_STATS]
        self.device = torch.device(device)
        self.share_inputs = share_inputs
        self.cross = cross
        self.owner: dict[str, str] = {}  # fqn -> fqn of the accumulator it reads
        self.accs: dict[str, GramAccumulator] = {}
        self._mask: torch.Tensor | None = None
        self._last: tuple[Any, torch.Tensor, str] | None = None
        self._warned: set[str] = set()
        self._ref_mode = False
        self._refs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> InputCollector:
        for name, module in self.targets.items():
            self._handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs, _n=name: self._hook(_n, args, kwargs), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = self._mask = None
        self._refs.clear()

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Start a new batch; `mask` (batch, seq) marks real tokens (None: all)."""
        self._mask = mask
        self._last = None

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Forwards inside record reference inputs (for the cross-Gram) instead of summing."""
        self._ref_mode, self._last = True, None
        try:
            yield
        finally:
            self._ref_mode, self._last = False, None

    def _hook(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["input"]
        if self._ref_mode:
            self._refs[name] = x.detach()
            return
        if not torch.isfinite(x).all():
            raise ValueError(
                f"non-finite (NaN/inf) input to {name!r}: the model or calibration data "
                "produced NaN/inf; check the data and the model's dtype"
            )
        if self.share_inputs and self._shared(name, x):
            return
        self.owner.setdefault(name, name)
        flat = self._unpadded(name, x.detach().reshape(-1, x.shape[-1]))
        ref = self._refs.pop(name, None)
        if ref is not None:
            ref = self._unpadded(name, ref.reshape(-1, ref.shape[-1]))
        if name not in self.accs:
            self.accs[name] = GramAccumulator(flat.shape[-1], self.stats, self.device,
                                              cross=self.cross)
        self.accs[name].add(flat, ref)

    def _shared(self, name: str, x: torch.Tensor) -> bool:
        """True when `name` reads the input its predecessor just read (nothing to add)."""
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version)
        last = self._last  # holding its tensor keeps its address from being reused
        same_as = last[2] if last is not None and last[0] == key else None
        if name not in self.owner:
            self.owner[name] = same_as or name
        elif self.owner[name] != name and self.owner[name] != same_as:
            raise ValueError(
                f"share_inputs=True: {name!r} shared its input with {self.owner[name]!r} in an "
                "earlier batch but not in this one; use share_inputs=False"
            )
        self._last = (key, x, self.owner[name])
        return self.owner[name] != name

    def _unpadded(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        mask = self._mask
        if mask is None:
            return flat
        if mask.numel() == flat.shape[0]:
            return flat[mask.reshape(-1).to(flat.device) != 0]
        if name not in self._warned:
            self._warned.add(name)
            logger.warning("%s sees %d tokens but attention_mask has %d: padding kept",
                           name, flat.shape[0], mask.numel())
        return flat

    def results(self) -> dict[str, LayerStats]:
        """``{fqn: LayerStats}`` in target order; shared layers hold the same tensors."""
        missing = [n for n in self.targets if n not in self.owner]
        if missing:
            raise ValueError(
                f"target layers {missing[:5]} never ran during calibration: they are not on the "
                "forward path of these batches; leave them out of target_modules"
            )
        finished = {n: a.finish() for n, a in self.accs.items()}
        return {name: LayerStats(**finished[self.owner[name]]) for name in self.targets}
