"""What a method's `initialize` may ask for, each computed on first request.

* ``ctx.weight()``: the original base weight (out, in) as an fp32 copy;
* ``ctx.svd(rank, niter=None)``: its truncated SVD (U (out, r), S (r,), Vh (r, in)) through
  ``rankwise.linalg`` (exact, or randomized with `niter` power iterations); ``rank=None`` gives
  the thin SVD (for bottom-r inits); cached per request;
* ``ctx.activations()``: the layer's input statistics (`rankwise.calibrate.LayerStats`: gram,
  mean, n_tokens), collected by `adapt_` in one pass before any layer is wrapped;
* ``ctx.gradient()``: Σ over the calibration batches of ∂L/∂W (out, in) fp32, also collected
  before wrapping (LoRA-SB's first-step estimate, Ponkshe et al. 2024);
* ``ctx.generator``: a CPU ``torch.Generator`` seeded from (seed, layer name), so inits are
  reproducible and never touch the global RNG;
* ``ctx.shared(key, factory)``: one object shared by every layer of this `adapt_` call (VeRA's
  and RandLoRA's random bases, sized with ``ctx.all_shapes``; MoS's shard pools; EVA's
  model-wide rank allocation);
* ``ctx.all_activations()``: the input statistics of *every* adapted layer, by fqn, for
  model-wide decisions such as EVA's rank redistribution.

Activations and gradients need a model-wide pass, so `adapt_` runs it up front when a method
declares them in ``needs`` (`collect_model_data`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from rankwise.adapt.geometry import Geometry
from rankwise.calibrate import causal_lm_loss
from rankwise.calibrate.capture import target_weight_grads
from rankwise.linalg import make_generator


def layer_seed(seed: int, fqn: str) -> int:
    """A per-layer seed: stable across runs and machines (crc32 of the name, not hash())."""
    return (int(seed) * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63 - 1)


class ModelData:
    """Model-wide inputs of an `adapt_` call, shared by every layer's `InitContext`."""

    def __init__(
        self,
        *,
        all_shapes: Mapping[str, tuple[int, int]],
        activations: Mapping[str, Any] | None = None,
        gradients: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.all_shapes = dict(all_shapes)
        self.activations = activations
        self.gradients = gradients
        self.shared: dict[str, Any] = {}


class InitContext:
    """Per-layer view of what an init may use (see the module docstring)."""

    def __init__(self, fqn: str, geometry: Geometry, data: ModelData, *, seed: int = 0) -> None:
        self.fqn = fqn
        self.geometry = geometry
        self.seed = seed
        self._data = data
        self.generator = make_generator(layer_seed(seed, fqn))
        self._weight: torch.Tensor | None = None
        self._svd: dict[tuple[int | None, int | None], tuple[torch.Tensor, ...]] = {}

    @property
    def all_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every layer adapted by this call, by fqn."""
        return self._data.all_shapes

    def weight(self) -> torch.Tensor:
        """The original base weight (out, in) in the compute dtype (fp32; fp64 stays fp64), a
        copy (safe to modify)."""
        if self._weight is None:
            w = self.geometry.compute_weight().clone()
            if not torch.isfinite(w).all():
                raise ValueError(
                    f"the weight of {self.fqn!r} holds NaN/inf: the base model is corrupt; "
                    "reload it before adapting"
                )
            self._weight = w
        return self._weight

    def svd(
        self, rank: int | None = None, *, niter: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SVD of the weight in the compute dtype: U (out, k), S (k,), Vh (k, in), S descending.

        Args:
            rank: k, the number of leading triplets; None for the thin SVD (k = min(out, in)).
            niter: None for an exact SVD; an int for a randomized SVD with that many power
                iterations (PEFT's ``pissa_niter_K``), seeded from this layer's seed.
        """
        key = (rank, niter)
        if key not in self._svd:
            from rankwise import linalg

            w = self.weight()
            if rank is None:
                U, S, Vh = linalg.svd(w)
            elif niter is None:
                U, S, Vh = linalg.truncated_svd(w, rank)
            else:
                U, S, Vh = linalg.randomized_svd(
                    w, rank, power_iters=niter, seed=layer_seed(self.seed, self.fqn)
                )
            self._svd[key] = (U, S, Vh)
        return self._svd[key]  # type: ignore[return-value]

    def activations(self) -> Any:
        """Input statistics of this layer (`rankwise.calibrate.LayerStats`)."""
        acts = self._data.activations
        if acts is None or self.fqn not in acts:
            raise ValueError(
                f"no input activations for {self.fqn!r}: this method needs data; pass "
                "data=<batches> (or input_stats=<capture_input_stats output>) to adapt_"
            )
        return acts[self.fqn]

    def all_activations(self) -> dict[str, Any]:
        """Input statistics of every layer adapted by this call, by fqn (model-wide inits)."""
        acts = self._data.activations
        missing = [n for n in self.all_shapes if acts is None or n not in acts]
        if missing:
            raise ValueError(
                f"no input activations for {missing[:5]}: this method needs data for every "
                "target; pass data=<batches> (or input_stats=<capture_input_stats output "
                "covering all targets>) to adapt_"
            )
        return {n: acts[n] for n in self.all_shapes}

    def gradient(self) -> torch.Tensor:
        """Σ over the calibration batches of ∂L/∂W (out, in), fp32."""
        grads = self._data.gradients
        if grads is None or self.fqn not in grads:
            raise ValueError(
                f"no gradient for {self.fqn!r}: this method needs a first gradient; pass "
                "data=<batches> (and loss_fn=... unless the model returns .loss) to adapt_"
            )
        return grads[self.fqn]

    def shared(self, key: str, factory: Callable[[], Any]) -> Any:
        """The object stored under `key` for this adapt_ call, made by `factory` on first use
        (a tensor, or any value a model-wide init computes once)."""
        store = self._data.shared
        if key not in store:
            store[key] = factory()
        return store[key]


def _batches(batches: Any, batch_size: int) -> list[Any]:
    """A (n, ...) tensor splits into micro-batches; a dict is one batch; else an iterable."""
    if isinstance(batches, torch.Tensor):
        out = list(batches.split(batch_size)) if batches.ndim and batches.shape[0] else []
    elif isinstance(batches, Mapping):
        out = [batches]
    else:
        out = list(batches)
    if not out:
        raise ValueError("no calibration data: pass at least one batch")
    return out


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def weight_gradients(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    batches: Any,
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Σ over batches of ∂L/∂W for each target, as (out, in) fp32 on CPU.

    Only the target weights get gradients during the pass (all other parameters are frozen and
    restored afterwards); the model runs in eval mode (no dropout), as calibration does.
    (``rankwise.calibrate`` sums *squared* gradients; this is the signed sum LoRA-SB needs.)
    """
    micro = _batches(batches, batch_size)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    loss_fn = loss_fn or causal_lm_loss
    was_training = model.training
    sums: dict[str, torch.Tensor] = {}
    try:
        model.eval()
        with target_weight_grads(model, targets):
            for batch in micro:
                loss = loss_fn(model, _to(batch, device))
                if not torch.isfinite(loss):
                    raise ValueError(f"the loss is {loss.item()} on a calibration batch: check the data")
                loss.backward()
                for name, m in targets.items():
                    if m.weight.grad is None:
                        raise ValueError(f"{name!r} got no gradient: it does not affect the loss")
                    grad = surgery_matrix(Geometry(m), m.weight.grad.detach()).float().cpu()
                    sums[name] = grad if name not in sums else sums[name] + grad
                    m.weight.grad = None
    finally:
        model.train(was_training)
    return sums


def surgery_matrix(geometry: Geometry, tensor: torch.Tensor) -> torch.Tensor:
    """View a tensor shaped like the base weight as (out, in), as `Geometry.weight` does."""
    if geometry.kind in ("conv1d", "embedding"):
        return tensor.T
    if geometry.kind == "conv2d":
        return tensor.flatten(1)
    return tensor


def collect_model_data(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    needs: set[str],
    *,
    data: Any = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    input_stats: Mapping[str, Any] | None = None,
    batch_size: int = 8,
) -> ModelData:
    """Run the model-wide passes the chosen method needs, before any layer is wrapped."""
    shapes = {name: Geometry(m).shape for name, m in targets.items()}
    activations = dict(input_stats) if input_stats is not None else None
    gradients = None
    if "activations" in needs and activations is None:
        if data is None:
            raise ValueError(
                "this method initialises from input activations: pass data=<batches> "
                "(a LongTensor (n, seq) of input_ids or an iterable of dicts) to adapt_"
            )
        from rankwise import calibrate

        activations = calibrate.capture_input_stats(
            model, data, dict(targets), stats=("gram", "mean"), batch_size=batch_size,
            progress=False,
        )
    if "gradient" in needs:
        if data is None:
            raise ValueError(
                "this method initialises from a first gradient: pass data=<batches> "
                "(and loss_fn=lambda model, batch: loss unless the model returns .loss) to adapt_"
            )
        gradients = weight_gradients(model, targets, data, loss_fn=loss_fn, batch_size=batch_size)
    return ModelData(all_shapes=shapes, activations=activations, gradients=gradients)
