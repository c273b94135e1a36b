"""The adapter-method protocol and the registry of named methods.

A method is a small ``nn.Module`` that lives inside an `AdapterLayer` beside the frozen base
layer. It declares:

* its **config**: a frozen kw-only dataclass (subclass of `MethodConfig`), validated on
  construction and saved as JSON;
* its **tensors**: trainable ones are ``nn.Parameter``; frozen ones are persistent buffers
  (saved); regenerable ones (random bases rebuilt from a seed) are non-persistent buffers
  refilled by `after_load`;
* its **initialisation** `initialize(ctx)`: `InitContext` gives the weight, its SVD (through
  ``rankwise.linalg``), input activations, a first gradient, a seeded generator and model-wide
  shared tensors, each computed on first request;
* its **delta weight** `delta_weight()` (out, in) and its **forward** `forward(x, base_out, geo)`
  (default: ``base_out + apply_in(x, delta_weight())``; methods override with a cheaper path);
* optionally a **base offset** (`mutates_base`): methods like PiSSA store W_res = W − offset as
  the base, so the layer can restore W exactly;
* optionally **training-time rules** (`has_rules`): `before_step` / `after_step` / `regularizer`,
  run by `rankwise.adapt.rules.AdapterRules` from optimizer hooks, never from a custom loop.

Presets: one class can be registered under several names with different defaults
(``"lora"`` and ``"rslora"`` are the same class; rsLoRA sets ``use_rslora=True``).

Adding a method (a sketch of SVFit, Sun et al. 2024: W = U diag(σ) Vᵀ, train the top-r σ and
keep W_res = W − U_r diag(σ_r) V_rᵀ frozen)::

    @dataclass(frozen=True, kw_only=True)
    class SVFitConfig(MethodConfig):
        pass

    @register_method("svfit")
    class SVFit(AdapterMethod):
        config_cls = SVFitConfig
        mutates_base = True                      # base holds W_res = W − U_r Σ_r V_rᵀ

        def __init__(self, config, geometry):
            super().__init__(config, geometry)
            self.check_rank(config.rank)
            r, (m, n) = config.rank, geometry.shape
            self.sigma = nn.Parameter(torch.zeros(r))        # trainable
            self.register_buffer("U", torch.zeros(m, r))     # frozen, saved
            self.register_buffer("Vh", torch.zeros(r, n))
            self.register_buffer("sigma0", torch.zeros(r))

        def initialize(self, ctx):
            U, S, Vh = ctx.svd(self.config.rank)             # via rankwise.linalg
            ...copy into U, Vh, sigma, sigma0...

        def delta_weight(self):                  # over the stored residual base
            return (self.U * self.sigma) @ self.Vh

        def offset_weight(self):                 # W − W_res
            return (self.U * self.sigma0) @ self.Vh

Forward, merge, unmerge, disable, save/load and `unload_` then work unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from rankwise.adapt.geometry import Geometry
from rankwise.config import Config, document_fields, option
from rankwise.linalg import compute_dtype, validate_rank
from rankwise.registry import Registry, registry

if TYPE_CHECKING:  # pragma: no cover
    from rankwise.adapt.context import InitContext
    from rankwise.adapt.rules import RuleState


@dataclass(frozen=True, kw_only=True)
class MethodConfig(Config):
    """Fields every method has (a `rankwise.config.Config`: frozen, keyword-only, help per field).

    Subclasses declare each field with ``option(default, "help")`` (the built-in methods all do;
    a field a user's method declares plainly still takes its help from the docstring's
    ``Attributes:`` section, see `Config.help_text`), redeclaring an inherited field to change
    its default or help. They validate in ``__post_init__`` after ``super().__post_init__()``.
    """

    rank: int = option(8, "adapter rank r (>= 1, and <= min(out, in) of each adapted layer)")

    def validate(self) -> None:
        """Reject a rank that is not an integer >= 1."""
        super().validate()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}: choose e.g. rank=8")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready field values (as saved in adapter_config.json)."""
        return dataclasses.asdict(self)


def check_fields(config_cls: type[MethodConfig], values: dict[str, Any], method: str = "") -> None:
    """Raise TypeError naming any key of `values` that `config_cls` has no field for."""
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        who = f"method {method!r}" if method else config_cls.__name__
        raise TypeError(f"{who} has no option(s) {unknown}: valid options are {sorted(valid)}")


def check_alpha(value: float, name: str = "alpha") -> None:
    """Raise ValueError unless `value` is a finite nonzero number (LoRA-style scale numerators)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value == 0:
        raise ValueError(f"{name} must be a finite nonzero number, got {value!r}")


def check_integer(name: str, value: object, minimum: int | None = None) -> None:
    """Raise ValueError unless `value` is an int (bools rejected) and >= `minimum` if given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}" if minimum is None else
                         f"{name} must be an integer >= {minimum}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_probability(name: str, value: float) -> None:
    """Raise ValueError unless 0 <= value < 1 (dropout-like fields)."""
    if not (isinstance(value, int | float) and 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def dropout_option(default: float = 0.0) -> Any:
    """A method config's ``dropout`` field: its help, and `check_probability` run on validation."""
    return option(default, "dropout probability on the adapter input (training only)",
                  check=check_probability)


class AdapterMethod(nn.Module):
    """Base class of every adapter method (see the module docstring for the protocol).

    Subclasses set the class attributes and implement `__init__` (allocate tensors of the
    right shapes; values are filled by `initialize` or by loading), `initialize` and
    `delta_weight`; they override `forward` when a cheaper path than the dense delta exists.
    """

    #: registry name of the class (presets may add more names)
    name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    #: geometry kinds this method can wrap
    layer_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "conv1d"})
    #: model-wide data `initialize` needs: "activations" and/or "gradient"
    needs: ClassVar[frozenset[str]] = frozenset()
    #: True when the base weight is stored as W − offset_weight() (PiSSA-style)
    mutates_base: ClassVar[bool] = False
    #: True when the method has training-time rules that must run every optimizer step
    has_rules: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, geometry: Geometry) -> None:
        super().__init__()
        if geometry.kind not in self.layer_kinds:
            raise TypeError(
                f"method {self.name!r} cannot adapt a {geometry.kind} layer "
                f"({type(geometry.module).__name__}): it supports {sorted(self.layer_kinds)}; "
                "leave that layer out of target_modules"
            )
        self.config = config
        self.out_features, self.in_features = geometry.shape
        # bookkeeping for training-time rules (see rules.py)
        self.rules_attached = False
        self.rule_steps = 0
        self.train_forwards = 0

    # ------------------------------------------------------------------ helpers for subclasses
    def check_rank(self, rank: int, *, limit: int | None = None) -> int:
        """Raise unless 1 <= rank <= min(out, in) of this layer, or <= `limit` where the method's
        own bound is tighter (`rankwise.linalg.validate_rank`); returns the rank."""
        if limit is None:
            return validate_rank(rank, self.out_features, self.in_features)
        rank = validate_rank(rank, self.out_features, self.in_features)
        if rank > limit:
            raise ValueError(f"rank {rank} exceeds min(m, n) = {limit} of the factors this method "
                             f"builds for a ({self.out_features}, {self.in_features}) layer: "
                             f"choose rank <= {limit}")
        return rank

    @staticmethod
    def param_dtype(geometry: Geometry) -> torch.dtype:
        """Adapter tensors are fp32 over a half-precision base (as PEFT's autocast), fp64 over fp64:
        the compute dtype (`rankwise.linalg.compute_dtype`)."""
        return compute_dtype(geometry.module.weight.dtype)

    @staticmethod
    def input_dropout(p: float) -> nn.Module:
        """The adapter's input dropout: ``nn.Dropout(p)``, or ``nn.Identity()`` when p = 0."""
        return nn.Dropout(p) if p > 0 else nn.Identity()

    @staticmethod
    def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
        """s = α/r (LoRA) or α/√r (rsLoRA, Kalajdzievski 2023)."""
        return alpha / math.sqrt(rank) if use_rslora else alpha / rank

    # ------------------------------------------------------------------ the protocol
    def initialize(self, ctx: InitContext) -> None:
        """Fill the tensors for a fresh adapter (not called when loading a saved one)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The update ΔW (out, in) the adapter adds to the stored base weight."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        """Adapted output given the base layer's output (default: dense ΔW applied to x)."""
        delta = self.delta_weight()
        return base_out + geo.apply_in(x.to(delta.dtype) if not geo.takes_indices else x,
                                       delta).to(base_out.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The (out, in) weight that reproduces the adapted layer: W + ΔW (in W's dtype, which
        is the compute dtype: fp32 or fp64)."""
        return weight + self.delta_weight().detach().to(weight.dtype)

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """Invert `merged_weight`: W' − ΔW."""
        return merged - self.delta_weight().detach().to(merged.dtype)

    def offset_weight(self) -> torch.Tensor | None:
        """For `mutates_base` methods: original W − stored base W (out, in); else None."""
        return None

    def after_load(self, geometry: Geometry) -> None:
        """Rebuild regenerable tensors after a saved state was loaded (default: nothing)."""

    def extra_state(self) -> dict[str, Any]:
        """JSON-able values beyond the config that a saved adapter needs (e.g. a data-chosen
        rank); passed back to `from_saved`."""
        return {}

    @classmethod
    def from_saved(cls, config: MethodConfig, geometry: Geometry, extra: dict[str, Any]
                   ) -> AdapterMethod:
        """Allocate an instance to load a saved state into (default: the constructor)."""
        return cls(config, geometry)

    # ------------------------------------------------------------------ training-time rules
    def before_step(self, state: RuleState) -> None:
        """Runs before each optimizer step, gradients present (e.g. rewrite gradients)."""

    def after_step(self, state: RuleState) -> None:
        """Runs after each optimizer step, gradients still present (prox steps, masking)."""

    def regularizer(self) -> torch.Tensor | None:
        """A loss term whose gradient `AdapterRules` adds before each step (or None)."""
        return None

    @classmethod
    def group_before_step(cls, methods: Sequence[AdapterMethod], state: RuleState) -> None:
        """Model-wide rule over all layers of this class (default: per layer)."""
        for method in methods:
            method.before_step(state)

    @classmethod
    def group_after_step(cls, methods: Sequence[AdapterMethod], state: RuleState) -> None:
        """Model-wide rule over all layers of this class (e.g. a global rank budget)."""
        for method in methods:
            method.after_step(state)


# ---------------------------------------------------------------------------- registry
# Adapters live in the one `rankwise.registry` (kind "adapter"); the functions below are the
# adapter-specific views of it that the rest of rankwise.adapt (and user code) calls.
def _registry() -> Registry:
    return registry("adapter")


def register_method(
    name: str, cls: type[AdapterMethod] | None = None, /, *, summary: str = "", **preset: Any
) -> Any:
    """Register `cls` under `name` with `preset` defaults; usable as a class decorator.

    `summary` is the one line ``rankwise list`` prints (default: the class docstring's first
    line). Names follow the registry's rule (lower_snake_case).

    >>> @register_method("lora")
    ... class LoRA(AdapterMethod): ...
    >>> register_method("rslora", LoRA, summary="LoRA scaled by α/√r", use_rslora=True)
    """

    def add(klass: type[AdapterMethod]) -> type[AdapterMethod]:
        if not (isinstance(klass, type) and issubclass(klass, AdapterMethod)):
            raise TypeError(f"{klass!r} is not an AdapterMethod subclass")
        check_fields(klass.config_cls, preset, name)
        document_fields(klass.config_cls)  # docstring help into each field's metadata
        _registry().register(name, klass, summary=summary, **preset)
        if "name" not in vars(klass) or not klass.name:
            klass.name = name  # a subclass registers under its own name, not its parent's
        return klass

    return add if cls is None else add(cls)


def unregister_method(name: str) -> None:
    """Remove `name` (tests register toy methods)."""
    _registry().unregister(name)


def get_method(name: str) -> tuple[type[AdapterMethod], dict[str, Any]]:
    """(class, preset defaults) for a registered name; unknown names list the known ones."""
    entry = _registry().get(name)
    return entry.load(), dict(entry.defaults)


def list_methods() -> list[str]:
    """Sorted names of every registered method and preset."""
    return _registry().names()


def build_config(name: str, **options: Any) -> MethodConfig:
    """The config of method `name`: preset defaults overridden by `options` (validated)."""
    cls, preset = get_method(name)
    check_fields(cls.config_cls, options, name)
    return cls.config_cls(**{**preset, **options})
