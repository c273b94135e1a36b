"""Calibration statistics of each target layer's input, accumulated without storing activations.

The data-aware compressors and initialisers need, per linear layer with input x (n = in):

* ``gram``     Σ xᵀx (n, n), fp64 (SVD-LLM's whitening Gram, compression.md §4; a sum, not a
  mean, as the reference hooks accumulate it: whitening is scale-free);
* ``mean``     E[x] (n,) (centring: EVA's PCA of inputs, adapters.md §18, via `covariance`);
* ``abs_mean`` E|x_j| (n,) (ASVD's activation scale, compression.md §3; ASVD sums per-batch
  means, which differs from this token mean only by a constant factor that ASVD's SVD ignores);
* ``abs_max``  max |x_j| (n,) (ASVD's "abs_max" option);
* ``sq_grad``  Σ_batches (∂L/∂W)² (out, in) (the empirical Fisher of FWSVD, compression.md §2:
  squared per-batch gradients, the reference practice; divide by ``n_batches`` for the mean).

Forward hooks flatten (batch, seq, in) to (tokens, in), drop padded tokens (``attention_mask``
= 0) and add into running sums on the stats device (CPU by default). Only the statistics asked
for are allocated.

``share_inputs=True`` keeps one set of input statistics for modules that read the very same
tensor in a forward (q/k/v; gate/up): their `LayerStats` hold the same ``gram`` tensor object.
For a Llama block that is 4 Grams instead of 7; for SmolLM2-135M (hidden 576, intermediate 1536,
30 layers) the fp64 Grams take 0.80 GB instead of 1.04 GB, and each shared Gram is computed once.

Not here yet: a GPTQ/SVD-LLM-style *sequential* runner (compress layer i, then collect layer
i+1's inputs through the compressed model). It will reuse these hooks, one block at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from rankwise import surgery

logger = logging.getLogger(__name__)

STATS = ("gram", "mean", "abs_mean", "abs_max", "sq_grad")
_INPUT_STATS = ("gram", "mean", "abs_mean", "abs_max")


@dataclass
class LayerStats:
    """Input statistics of one layer (tensors only, so they save as safetensors).

    Attributes:
        n_tokens: 0-d int64, tokens seen (padding excluded).
        gram: (in, in) fp64, Σ xᵀx.
        mean: (in,) fp64, mean of x over tokens.
        abs_mean: (in,) fp64, mean of |x| over tokens.
        abs_max: (in,) fp64, max of |x| over tokens.
        sq_grad: (out, in) fp32, Σ over batches of the squared weight gradient.
        n_batches: 0-d int64, backward passes summed into ``sq_grad``.
    """

    n_tokens: torch.Tensor
    gram: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    abs_mean: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    sq_grad: torch.Tensor | None = None
    n_batches: torch.Tensor | None = None

    def covariance(self) -> torch.Tensor:
        """Centred covariance E[xxᵀ] − E[x]E[x]ᵀ (in, in) fp64; needs ``gram`` and ``mean``."""
        if self.gram is None or self.mean is None:
            raise ValueError('covariance needs the "gram" and "mean" statistics: collect both')
        n = int(self.n_tokens)
        return self.gram / n - torch.outer(self.mean, self.mean)

    def fisher(self) -> torch.Tensor:
        """Mean squared gradient (out, in): ``sq_grad / n_batches``."""
        if self.sq_grad is None or self.n_batches is None:
            raise ValueError(
                'fisher needs the "sq_grad" statistic: collect it with stats=("sq_grad",)'
            )
        return self.sq_grad / int(self.n_batches)

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat ``{prefix + field: tensor}`` for `rankwise.io.save_tensors` (None fields omitted)."""
        return {
            prefix + f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) is not None
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> LayerStats:
        """Inverse of `to_tensors`."""
        names = {f.name for f in fields(cls)}
        return cls(
            **{
                k[len(prefix) :]: v
                for k, v in tensors.items()
                if k.startswith(prefix) and k[len(prefix) :] in names
            }
        )


def shared_groups(stats: Mapping[str, LayerStats]) -> list[list[str]]:
    """Groups of fqns whose statistics share one Gram / mean tensor (from ``share_inputs``)."""
    groups: dict[int, list[str]] = {}
    for name, s in stats.items():
        key = s.gram if s.gram is not None else s.mean if s.mean is not None else s.abs_mean
        groups.setdefault(id(key) if key is not None else id(s), []).append(name)
    return list(groups.values())


class _Accumulator:
    """Running sums for one distinct layer input (one per layer, or per shared group)."""

    def __init__(self, n_in: int, stats: Sequence[str], device: torch.device) -> None:
        f64 = dict(dtype=torch.float64, device=device)
        self.n_tokens = 0
        self.gram = torch.zeros(n_in, n_in, **f64) if "gram" in stats else None
        self.x_sum = torch.zeros(n_in, **f64) if "mean" in stats else None
        self.abs_sum = torch.zeros(n_in, **f64) if "abs_mean" in stats else None
        self.abs_max = torch.zeros(n_in, **f64) if "abs_max" in stats else None

    def add(self, x: torch.Tensor) -> None:
        """x: (tokens, in) fp64 on the stats device."""
        self.n_tokens += x.shape[0]
        if self.gram is not None:
            self.gram.addmm_(x.T, x)
        if self.x_sum is not None:
            self.x_sum += x.sum(0)
        if self.abs_sum is not None or self.abs_max is not None:
            ax = x.abs()
            if self.abs_sum is not None:
                self.abs_sum += ax.sum(0)
            if self.abs_max is not None and x.shape[0]:
                torch.maximum(self.abs_max, ax.amax(0), out=self.abs_max)

    def finish(self) -> dict[str, torch.Tensor | None]:
        n = max(self.n_tokens, 1)
        return {
            "n_tokens": torch.tensor(self.n_tokens, dtype=torch.int64),
            "gram": self.gram,
            "mean": None if self.x_sum is None else self.x_sum / n,
            "abs_mean": None if self.abs_sum is None else self.abs_sum / n,
            "abs_max": self.abs_max,
        }


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
    stats_device = torch.device(stats_device)
    input_stats = [s for s in stats if s in _INPUT_STATS]
    want_grad = "sq_grad" in stats

    owner: dict[str, str] = {}  # fqn -> fqn of the accumulator it reads (itself unless shared)
    accs: dict[str, _Accumulator] = {}
    state: dict[str, Any] = {"mask": None, "last": None, "warned": set()}

    def hook(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["input"]
        if not torch.isfinite(x).all():
            raise ValueError(
                f"non-finite (NaN/inf) input to {name!r}: the model or calibration data "
                "produced NaN/inf; check the data and the model's dtype"
            )
        if share_inputs:
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x._version)
            last = state["last"]  # holding its tensor keeps its address from being reused
            same_as = last[2] if last is not None and last[0] == key else None
            if name not in owner:
                owner[name] = same_as or name
            elif owner[name] != name and owner[name] != same_as:
                raise ValueError(
                    f"share_inputs=True: {name!r} shared its input with {owner[name]!r} in an "
                    "earlier batch but not in this one; use share_inputs=False"
                )
            state["last"] = (key, x, owner[name])
            if owner[name] != name:
                return
        else:
            owner[name] = name
        flat = x.detach().reshape(-1, x.shape[-1])
        mask = state["mask"]
        if mask is not None:
            if mask.numel() == flat.shape[0]:
                flat = flat[mask.reshape(-1).to(flat.device) != 0]
            elif name not in state["warned"]:
                state["warned"].add(name)
                logger.warning(
                    "%s sees %d tokens but attention_mask has %d: padding kept",
                    name,
                    flat.shape[0],
                    mask.numel(),
                )
        if name not in accs:
            accs[name] = _Accumulator(flat.shape[-1], input_stats, stats_device)
        accs[name].add(flat.to(device=stats_device, dtype=torch.float64))

    handles = []
    was_training = model.training
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    saved_grads: dict[str, torch.Tensor | None] = {}
    sq_grads: dict[str, torch.Tensor] = {}
    n_batches = 0
    try:
        for name, module in targets.items():
            handles.append(
                module.register_forward_pre_hook(
                    lambda _mod, args, kwargs, _n=name: hook(_n, args, kwargs), with_kwargs=True
                )
            )
        model.eval()
        if want_grad:
            for p in model.parameters():
                p.requires_grad_(False)
            for name, module in targets.items():
                saved_grads[name] = module.weight.grad
                module.weight.grad = None
                module.weight.requires_grad_(True)
        from tqdm.auto import tqdm

        for batch in tqdm(
            micro, total=total, desc="calibration", disable=not progress, leave=False
        ):
            batch = _to(batch, device)
            state["mask"] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            state["last"] = None
            if want_grad:
                loss = (loss_fn or causal_lm_loss)(model, batch)
                loss.backward()
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
            else:
                with torch.no_grad():
                    model(**batch) if isinstance(batch, Mapping) else model(batch)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        state["last"] = state["mask"] = None
        model.train(was_training)
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        for name, g in saved_grads.items():
            targets[name].weight.grad = g

    if n_batches == 0:
        raise ValueError(_NO_DATA)
    missing = [n for n in targets if n not in owner]
    if missing:
        raise ValueError(
            f"target layers {missing[:5]} never ran during calibration: they are not on the "
            "forward path of these batches; leave them out of target_modules"
        )
    finished = {n: a.finish() for n, a in accs.items()}
    result: dict[str, LayerStats] = {}
    for name in targets:
        s = LayerStats(**finished[owner[name]])
        if want_grad:
            s.sq_grad = sq_grads[name]
            s.n_batches = torch.tensor(n_batches, dtype=torch.int64)
        result[name] = s
    logger.info("calibrated %d layers over %d batches", len(result), n_batches)
    return result
