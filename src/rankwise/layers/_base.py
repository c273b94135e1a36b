"""The shared shell of every trainable parameterisation of a linear layer, and model-level swaps.

Each method (SLTrain, LOST, SST, Maestro, TRP, ReLoRA, Monarch; each module's docstring cites its
paper and the update it implements) is a subclass of `ParameterizedLinear` that stores its own factors
and promises the same small protocol:

    dense_weight() -> (out, in)        the weight the layer currently represents
    forward(x)                          == F.linear(x, dense_weight(), bias), computed its own way
    to_dense() -> nn.Linear             exact conversion back for inference
    to_factorized(rank=None)            -> FactorizedLinear, where the method has a natural rank
    from_linear(linear, **kw)           build from an nn.Linear (its weight, or only its shape)
    trainable_names()                   names of the parameters the optimizer should hold

Model level (rankwise.surgery does the matching, with PEFT's `target_modules` vocabulary):

    layers = convert_(model, "sltrain", rank=32, density=0.03)  # {fqn: SLTrainLinear}
    ... train, with the method's LayerSchedule (rankwise.layers.schedules) ...
    to_dense_(model)                                            # every converted layer -> nn.Linear

Frozen tensors that are weights (ReLoRA's W, SST's singular vectors) are `nn.Parameter`s with
`requires_grad=False`, so they are saved, moved and counted like weights but get no gradient and
no optimizer state; index sets (SLTrain's support, SST's sampled columns) are buffers.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.linalg import compute_dtype, kaiming_uniform, make_generator, validate_rank
from rankwise.registry import canonical_name, registry

# The shared helpers live in rankwise.linalg; these names are kept for the layer modules:
# check_rank(rank, m, n) checks 1 <= rank <= min(m, n); cpu_generator(seed) is a CPU generator
# (None: the global RNG); work_dtype is the compute dtype (fp64 stays fp64, else fp32).
check_rank = validate_rank
cpu_generator = make_generator
work_dtype = compute_dtype

logger = logging.getLogger(__name__)

__all__ = [
    "LAYER_METHODS",
    "ParameterizedLinear",
    "check_fraction",
    "check_rank",
    "cpu_generator",
    "kaiming_uniform",
    "work_dtype",
    "convert_",
    "converted_layers",
    "get_layer_class",
    "method_of",
    "to_dense_",
    "to_factorized_",
]

# The built-in layer methods, registered lazily (imported on first use, so importing this file
# stays cheap) in the one `rankwise.registry` under kind "layer".
_BUILTIN = (
    ("factorized", "rankwise.layers.factorized:FactorizedLinear",
     "dense linear replaced by two matmuls y = B (A x) + b (the form compression produces)"),
    ("relora", "rankwise.layers.relora:ReLoRALinear",
     "ReLoRA: frozen W plus a low-rank update merged and restarted periodically"),
    ("sltrain", "rankwise.layers.sltrain:SLTrainLinear",
     "SLTrain: sparse (fixed random support) plus low-rank weight"),
    ("lost", "rankwise.layers.lost:LOSTLinear",
     "LOST: dominant SVD part plus a channel-wise sparse part"),
    ("sst", "rankwise.layers.sst:SSTLinear",
     "Sparse Spectral Training: all singular values, a sampled few singular vectors trained"),
    ("maestro", "rankwise.layers.maestro:MaestroLinear",
     "Maestro: low-rank factors ordered by ordered dropout, truncatable after training"),
    ("trp", "rankwise.layers.trp:TRPLinear",
     "Trained Rank Pruning: dense weight projected to low rank during training"),
    ("monarch", "rankwise.layers.monarch:MonarchLinear",
     "Monarch: product of two block-diagonal factors with a fixed permutation"),
)
for _name, _target, _summary in _BUILTIN:
    registry("layer").register(_name, _target, summary=_summary)


class _LayerMethods(Mapping[str, Any]):
    """Read-only ``{name: target}`` view of ``registry("layer")`` (the former LAYER_METHODS
    dict of ``"module:Class"`` strings; targets registered as classes appear as classes)."""

    def __getitem__(self, name: str) -> Any:
        if name not in registry("layer"):
            raise KeyError(name)
        return registry("layer").get(name).target

    def __iter__(self) -> Iterator[str]:
        return iter(registry("layer").names())

    def __len__(self) -> int:
        return len(registry("layer"))

    def __repr__(self) -> str:
        return f"LAYER_METHODS({dict(self)!r})"


LAYER_METHODS: Mapping[str, Any] = _LayerMethods()


# ----------------------------------------------------------------------------- validation
def check_fraction(value: object, name: str, what: str) -> float:
    """A fraction strictly inside (0, 1); `what` says what it is the fraction of."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in (0, 1), got {type(value).__name__} ({value!r})")
    value = float(value)
    if not 0.0 < value < 1.0:  # also rejects NaN
        raise ValueError(
            f"{name} must lie strictly between 0 and 1 (the fraction of {what}), got {value}: "
            f"choose e.g. {name}=0.03"
        )
    return value


def check_features(in_features: object, out_features: object) -> None:
    """Raise ValueError unless both layer sizes are positive ints (bools rejected)."""
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def linear_weight(linear: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear, with a clear error for anything else."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(
            f"expected an nn.Linear, got {type(linear).__name__}: convert only nn.Linear layers "
            "(pass target_modules naming them)"
        )
    weight = linear.weight
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(
            "the linear weight contains NaN or Inf: check the checkpoint / a diverged step"
        )
    return weight


def linear_bias(linear: nn.Linear) -> torch.Tensor | None:
    """The bias of `linear`, detached (None when it has none): what `from_linear` hands on."""
    return linear.bias.detach() if linear.bias is not None else None


# ----------------------------------------------------------------------------- base class
class ParameterizedLinear(nn.Module):
    """Base of the trainable linear parameterisations (see the module docstring).

    Subclasses set `method`, create their factors, and implement `dense_weight` and
    `from_linear`; they override `forward` when it can avoid forming the dense weight.

    Args:
        in_features: n.
        out_features: m.
        bias: whether the layer has a bias (m,).
        device, dtype: of the bias (subclasses use the same for their factors).
    """

    method: str = ""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_features(in_features, out_features)
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ protocol
    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight this layer represents (differentiable)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> ParameterizedLinear:
        raise NotImplementedError

    def trainable_names(self) -> tuple[str, ...]:
        """Names (relative to this layer) of the parameters that receive gradients."""
        return tuple(name for name, p in self.named_parameters() if p.requires_grad)

    def num_parameters(self, *, trainable_only: bool = False) -> int:
        """Stored parameters (frozen ones included unless trainable_only); buffers not counted."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def to_dense(self) -> nn.Linear:
        """An nn.Linear with weight `dense_weight()` (computed in fp32) and the same bias."""
        ref = next(self.parameters())
        with torch.no_grad():
            weight = self._dense_weight_fp32()
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(weight)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def to_factorized(self, rank: int | None = None) -> nn.Module:
        """A FactorizedLinear; this generic form is the truncated SVD of `dense_weight()`.

        Exact only when `rank` >= the rank of the weight. Subclasses with a natural rank
        (Maestro, TRP, SST) override it so that `rank=None` means that rank.
        """
        from rankwise import linalg
        from rankwise.layers.factorized import FactorizedLinear

        if rank is None:
            raise ValueError(
                f"{type(self).__name__} has no natural rank: pass to_factorized(rank=...) "
                "or use to_dense()"
            )
        rank = validate_rank(rank, self.out_features, self.in_features)
        ref = next(self.parameters())
        with torch.no_grad():
            U, S, Vh = linalg.truncated_svd(self._dense_weight_fp32(), rank)
            B, A = linalg.split_factors(U, S, Vh)
            bias = self.bias.detach() if self.bias is not None else None
            return FactorizedLinear.from_factors(B.to(ref.dtype), A.to(ref.dtype), bias)

    # ------------------------------------------------------------------ helpers
    def _dense_weight_fp32(self) -> torch.Tensor:
        return self.dense_weight().to(compute_dtype(next(self.parameters()).dtype))

    def _set_bias_(self, bias: torch.Tensor | None) -> None:
        """Copy `bias` (if given) into this layer's bias without recording a gradient."""
        if bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias)

    def _init_bias_(self, generator: torch.Generator | None) -> None:
        """A fresh bias (if the layer has one): kaiming-uniform with fan-in = out_features, drawn
        from `generator` (nothing is drawn for a layer without bias)."""
        if self.bias is not None:
            with torch.no_grad():
                m = self.out_features
                self.bias.copy_(kaiming_uniform((m,), m, generator))

    def _copy_bias_(self, linear: nn.Linear) -> None:
        if self.bias is not None and linear.bias is not None:
            with torch.no_grad():
                self.bias.copy_(linear.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


# ----------------------------------------------------------------------------- model level
def get_layer_class(method: str) -> type[nn.Module]:
    """The layer class of a method name registered in ``registry("layer")`` (dashes allowed)."""
    if not isinstance(method, str):
        raise ValueError(f"unknown layer method {method!r}: choose one of {sorted(LAYER_METHODS)}")
    return registry("layer").get(method).load()


def _is_converted(module: nn.Module) -> bool:
    from rankwise.layers.factorized import FactorizedLinear

    return isinstance(module, ParameterizedLinear | FactorizedLinear)


def converted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{fqn: layer} for every ParameterizedLinear / FactorizedLinear in `model`."""
    return {name: m for name, m in model.named_modules() if name and _is_converted(m)}


def method_of(model: nn.Module) -> set[str]:
    """The layer methods present in `model` ("factorized", "sltrain", ...); empty if none.

    A resumed run can compare this with the method it was asked for and refuse a mismatch.
    """
    from rankwise.layers.factorized import FactorizedLinear

    found = set()
    for layer in converted_layers(model).values():
        found.add("factorized" if isinstance(layer, FactorizedLinear) else layer.method)
    return found


def _build(
    cls: type[nn.Module], method: str, linear: nn.Linear, kwargs: dict[str, Any]
) -> nn.Module:
    if method == "factorized":
        kwargs = dict(kwargs)
        kwargs.pop("generator", None)  # deterministic (SVD of the weight)
        if "rank" not in kwargs:
            raise TypeError("convert_(model, 'factorized') needs rank=...")
        return cls.from_dense(linear, **kwargs)  # type: ignore[attr-defined]
    return cls.from_linear(linear, **kwargs)  # type: ignore[attr-defined]


def convert_(
    model: nn.Module,
    method: str,
    target_modules: str | list[str] | None = None,
    *,
    exclude: str | list[str] | None = None,
    seed: int | None = 0,
    **kwargs: Any,
) -> dict[str, nn.Module]:
    """Replace the matched nn.Linear layers of `model` by `method`'s layer, in place.

    Args:
        model: any module; Hugging Face models keep working (the output head is left alone
            by the default selection).
        method: one of LAYER_METHODS ("factorized", "relora", "sltrain", "lost", "sst",
            "maestro", "trp", "monarch").
        target_modules: PEFT-style selection (rankwise.surgery.find_modules); None = every
            nn.Linear except the output head (for a Llama: all attention and MLP projections).
        exclude: names to leave dense.
        seed: seeds the random parts (SLTrain's support, fresh factors), one CPU generator
            shared by the layers in model order; None uses torch's global RNG.
        **kwargs: passed to the layer's `from_linear` (rank=..., density=..., ...).

    Returns:
        {fqn: new layer}.
    """
    from rankwise.surgery import find_modules, replace_module

    cls = get_layer_class(method)
    method = canonical_name(method)
    done = converted_layers(model)
    inside = tuple(name + "." for name in done)
    already = (
        f"no plain nn.Linear left to convert to {method!r}: the model is already converted "
        f"({sorted(method_of(model))}); call to_dense_(model) first"
    )
    try:
        found = find_modules(model, target_modules, types=(nn.Linear,), exclude=exclude)
    except ValueError:
        if done and target_modules is None:
            raise ValueError(already) from None
        raise
    targets = {n: m for n, m in found.items() if not n.startswith(inside)}
    if not targets:
        raise ValueError(already)
    generator = make_generator(seed)
    new: dict[str, nn.Module] = {}
    for fqn, linear in targets.items():
        layer = _build(cls, method, linear, {**kwargs, "generator": generator})
        layer.train(linear.training)
        replace_module(model, fqn, layer)
        new[fqn] = layer
    logger.info("converted %d linear layers to %s", len(new), method)
    return new


def to_dense_(model: nn.Module) -> dict[str, nn.Linear]:
    """Replace every converted layer of `model` by its exact nn.Linear (for inference/export)."""
    from rankwise.surgery import replace_module

    out = {}
    for fqn, layer in converted_layers(model).items():
        if any(fqn.startswith(done + ".") for done in out):
            continue
        dense = layer.to_dense()
        dense.train(layer.training)
        replace_module(model, fqn, dense)
        out[fqn] = dense
    return out


def to_factorized_(model: nn.Module, rank: int | None = None) -> dict[str, nn.Module]:
    """Replace every ParameterizedLinear by `to_factorized(rank)` (Maestro/TRP/SST: natural rank)."""
    from rankwise.surgery import replace_module

    out = {}
    for fqn, layer in converted_layers(model).items():
        if isinstance(layer, ParameterizedLinear):
            fact = layer.to_factorized(rank)
            fact.train(layer.training)
            replace_module(model, fqn, fact)
            out[fqn] = fact
    return out
