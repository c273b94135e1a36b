"""`capture_input_stats`: the whole-model calibration pass (see rankwise.calibrate)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rankwise import surgery
from rankwise.calibrate.collect import InputCollector
from rankwise.calibrate.stats import STATS, LayerStats

logger = logging.getLogger(__name__)

__all__ = ["capture_input_stats", "causal_lm_loss"]


def _resolve_targets(
    model: nn.Module, target_modules: str | Sequence[str] | Mapping[str, nn.Module] | None
) -> dict[str, nn.Module]:
    if isinstance(target_modules, Mapping):
        targets = dict(target_modules)
    else:
        targets = surgery.find_modules(model, target_modules)
    for name, module in targets.items():
        if not isinstance(module, surgery.linear_types()):
            raise TypeError(
                f"capture_input_stats reads inputs of nn.Linear / Conv1D layers; {name!r} is a "
                f"{type(module).__name__}: leave it out of target_modules"
            )
    if not targets:
        raise ValueError("target_modules selected no layer: name at least one linear layer")
    return targets


_NO_DATA = (
    "no calibration data: pass at least one batch (a LongTensor (n, seq) of input_ids "
    "or an iterable of dicts with input_ids)"
)


def _iter_batches(batches: Any, batch_size: int) -> tuple[Iterable[Any], int | None]:
    """(batches, count or None): a (n, ...) tensor is split into micro-batches of `batch_size`;
    a dict is one batch; any other iterable (a DataLoader) is consumed lazily, one at a time."""
    if isinstance(batches, torch.Tensor):
        if batches.ndim == 0 or batches.shape[0] == 0:
            raise ValueError(_NO_DATA)
        parts = batches.split(batch_size)
        return parts, len(parts)
    if isinstance(batches, Mapping):
        return [batches], 1
    return batches, len(batches) if hasattr(batches, "__len__") else None


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    raise TypeError(
        f"a calibration batch must be a Tensor or a dict of tensors, got {type(batch).__name__}"
    )


def causal_lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Causal-LM loss with labels = input_ids (padding set to -100), read from ``output.loss``;
    the default `loss_fn` wherever rankwise needs gradients of a calibration batch."""
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        if "labels" not in kwargs:
            labels = kwargs["input_ids"].clone()
            if "attention_mask" in kwargs:
                labels[kwargs["attention_mask"] == 0] = -100
            kwargs["labels"] = labels
        out = model(**kwargs)
    else:
        out = model(batch, labels=batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            f"{type(model).__name__} returned no .loss when given labels: pass "
            "loss_fn=lambda model, batch: <scalar loss>"
        )
    return loss


def capture_input_stats(
    model: nn.Module,
    batches: Any,
    target_modules: str | Sequence[str] | Mapping[str, nn.Module] | None = None,
    *,
    stats: Sequence[str] = ("gram",),
    batch_size: int = 8,
    device: str | torch.device | None = None,
    stats_device: str | torch.device = "cpu",
    share_inputs: bool = False,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[str, LayerStats]:
    """Run `model` over calibration `batches` and return per-layer input statistics.

    Args:
        model: the model; it is run in eval mode (its mode is restored after).
        batches: a tensor (n, seq) of input_ids (or (n, ...) inputs), split into micro-batches
            of `batch_size` and passed positionally; or an iterable of dicts (``model(**batch)``;
            an ``attention_mask`` key excludes padded tokens) or of tensors.
        target_modules: `surgery.find_modules` vocabulary (default: every linear layer except
            the output head), or a ``{fqn: module}`` dict.
        stats: which of ``"gram", "mean", "abs_mean", "abs_max", "sq_grad"`` to collect.
        device: where batches go (default: the device of the model's first parameter).
        stats_device: where the fp64 running sums live (CPU keeps accelerator memory free).
        share_inputs: one set of input statistics for layers reading the same tensor (see the
            module docstring); ``sq_grad`` is always per layer.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for ``sq_grad``; default: the causal-LM
            ``.loss`` with labels = input_ids.
        progress: show a tqdm bar.

    Returns:
        ``{fqn: LayerStats}`` in model order.
    """
    unknown = sorted(set(stats) - set(STATS))
    if unknown or not stats:
        raise ValueError(f"unknown stats {unknown or list(stats)}: choose among {list(STATS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    targets = _resolve_targets(model, target_modules)
    micro, total = _iter_batches(batches, batch_size)
    device = torch.device(device) if device is not None else _model_device(model)
    from tqdm.auto import tqdm

    micro = tqdm(micro, total=total, desc="calibration", disable=not progress, leave=False)
    collector = InputCollector(targets, stats, device=stats_device, share_inputs=share_inputs)
    was_training = model.training
    model.eval()
    try:
        if "sq_grad" in stats:
            with collector:
                sq_grads, n_batches = _gradient_pass(model, targets, micro, device, collector,
                                                     loss_fn or causal_lm_loss, stats_device)
        else:
            sq_grads, n_batches = {}, 0
            with collector, torch.no_grad():
                for batch in micro:
                    batch = _to(batch, device)
                    collector.set_mask(_mask_of(batch))
                    model(**batch) if isinstance(batch, Mapping) else model(batch)
                    n_batches += 1
    finally:
        model.train(was_training)
    if n_batches == 0:
        raise ValueError(_NO_DATA)
    result = collector.results()
    for name, s in result.items():
        if name in sq_grads:
            s.sq_grad = sq_grads[name]
            s.n_batches = torch.tensor(n_batches, dtype=torch.int64)
    logger.info("calibrated %d layers over %d batches", len(result), n_batches)
    return result


def _mask_of(batch: Any) -> torch.Tensor | None:
    return batch.get("attention_mask") if isinstance(batch, Mapping) else None


def _gradient_pass(model: nn.Module, targets: Mapping[str, nn.Module], micro: Iterable[Any],
                   device: torch.device, collector: InputCollector,
                   loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                   stats_device: str | torch.device) -> tuple[dict[str, torch.Tensor], int]:
    """Forward + backward per batch: input statistics through `collector` and Σ (∂L/∂W)² per
    target (out, in) fp32 (FWSVD's empirical Fisher); gradient flags and ``.grad`` restored."""
    sq_grads: dict[str, torch.Tensor] = {}
    n_batches = 0
    with target_weight_grads(model, targets):
        for batch in micro:
            batch = _to(batch, device)
            collector.set_mask(_mask_of(batch))
            loss_fn(model, batch).backward()
            for name, module in targets.items():
                g = module.weight.grad
                if g is None:
                    raise ValueError(f"{name!r} got no gradient: it does not affect the loss")
                g = g.detach().float()
                g = (g.T if surgery._is_conv1d(module) else g).to(stats_device)  # (out, in)
                if name in sq_grads:
                    sq_grads[name].addcmul_(g, g)
                else:
                    sq_grads[name] = g * g
                module.weight.grad = None
            n_batches += 1
    return sq_grads, n_batches


@contextlib.contextmanager
def target_weight_grads(model: nn.Module, targets: Mapping[str, nn.Module]) -> Iterator[None]:
    """Inside: every parameter of `model` frozen but the targets' weights, whose ``.grad`` starts
    empty; on exit every ``requires_grad`` flag and the targets' previous ``.grad`` come back."""
    flags = {p: p.requires_grad for p in model.parameters()}
    saved = {name: module.weight.grad for name, module in targets.items()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for module in targets.values():
            module.weight.grad = None
            module.weight.requires_grad_(True)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for name, g in saved.items():
            targets[name].weight.grad = g
