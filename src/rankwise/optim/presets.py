"""Named methods as presets of `LowRankOptimizer`, and the model -> param-groups split.

A preset is a small dict of group options (what makes the method that method) plus its
paper/official defaults; `create(name, model, rank=...)` builds the optimizer. Where a default
is a choice of ours rather than the method's, the preset's doc says so.

Which parameters are projected (GaLore, Zhao et al. 2024, §5: attention and MLP): 2-D weights of ``nn.Linear`` modules whose name
contains ``attn`` or ``mlp`` (LLaMA q,k,v,o,gate,up,down); everything else (embeddings,
lm_head, norms, biases) goes to a plain AdamW group with the same lr. ``target_modules``
takes PEFT's vocabulary instead (via `rankwise.surgery.find_modules`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rankwise.optim.lowrank import GROUP_DEFAULTS, LowRankOptimizer


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named method: options of its projected group and optimizer-wide defaults."""

    name: str
    projected: dict[str, Any]
    defaults: dict[str, Any]
    doc: str


def _registry() -> Any:
    from rankwise.registry import registry

    return registry("optimizer")


class _PresetView(Mapping[str, Preset]):
    """``PRESETS``: a read-only name -> Preset view of the shared optimizer registry."""

    def __getitem__(self, name: str) -> Preset:
        reg = _registry()
        if name not in reg:
            raise KeyError(name)
        return reg.get(name).load()

    def __iter__(self) -> Iterator[str]:
        return iter(_registry().names())

    def __len__(self) -> int:
        return len(_registry())


PRESETS: Mapping[str, Preset] = _PresetView()


def register_preset(preset: Preset, *, replace: bool = False) -> Preset:
    """Register a preset on ``rankwise.registry.registry("optimizer")`` (its name must be new
    and lower_snake_case; its options known group keys)."""
    bad = (set(preset.projected) | set(preset.defaults)) - set(GROUP_DEFAULTS)
    if bad:
        raise ValueError(f"preset {preset.name!r} sets unknown options {sorted(bad)}")
    reg = _registry()
    if preset.name in reg._entries and not replace:
        raise ValueError(f"preset {preset.name!r} is already registered")
    reg.register(preset.name, preset, summary=preset.doc, replace=replace,
                 **{**preset.projected, **preset.defaults})
    return preset


# "keep": moments are reused across refreshes in the official GaLore/Fira/APOLLO/DCT code (the
# optimizer's own default, "reset", is the measured one: see GROUP_DEFAULTS).
_GALORE = {"projector": "svd", "update_proj_gap": 200, "scale": 0.25, "moment_policy": "keep"}
_GALORE_ADAM = {"lr": 0.01, "eps": 1e-6, "adam_style": "galore"}

for _p in (
    Preset("galore_adamw", dict(_GALORE), dict(_GALORE_ADAM),
           "GaLore-AdamW (Zhao et al. 2024): SVD projector, T=200, scale 0.25, lr 0.01."),
    Preset("galore_adafactor", {**_GALORE, "rule": "adafactor"}, {"lr": 0.01},
           "GaLore-Adafactor: HF Adafactor (factored V, clip 1.0, no beta1) on the projected "
           "gradient; decay before the update."),
    Preset("galore_adamw8bit", dict(_GALORE), {**_GALORE_ADAM, "eps": 1e-8, "state_bits": 8},
           "GaLore with 8-bit blockwise moments (ours: rankwise.linalg.quant, block 256)."),
    Preset("q_galore_adamw8bit",
           {**_GALORE, "proj_bits": 4, "proj_group_size": 256,
            "proj_options": {"lazy_threshold": 0.4, "lazy_gamma": 2, "lazy_queue": 5}},
           {**_GALORE_ADAM, "eps": 1e-8, "state_bits": 8, "lr": 0.015},
           "Q-GaLore: int4 projector (group 256), lazy layer-adaptive refresh (cos 0.4, x2), "
           "8-bit moments. INT8 weights with stochastic rounding (its §3.4): call "
           "rankwise.optim.quantize_weights_(model) before create()."),
    Preset("fira", {**_GALORE, "residual": "fira", "limiter": True}, dict(_GALORE_ADAM),
           "Fira (Chen et al. 2024): GaLore + residual scaled per channel by ||N||/||R|| and the "
           "norm-growth limiter (gamma 1.01)."),
    Preset("frugal",
           {"projector": "svd", "update_proj_gap": 200, "scale": 1.0, "moment_policy": "reset",
            "residual": "sign", "residual_scale": 1.0},
           {"lr": 1e-3, "eps": 1e-8, "adam_style": "torch"},
           "FRUGAL (Zmushko et al. 2024, Algorithm 1): Adam in a subspace (reset on refresh), "
           "signSGD on the rest. Subspace: projector='svd' (default), 'random_orthogonal' "
           "(random), 'randperm' (random columns/rows: the coordinate variant), 'randk' (K random "
           "entries, FRUGAL's RandK; K = rank x max(m, n)), or "
           "block_order='random'|'ascending'|'descending'|'mirror' (block-wise: whole "
           "matrices, its main pretraining setting). Density rank_fraction / block_density 0.25; "
           "proj_lr_scale multiplies the lr of the projected part."),
    Preset("apollo",
           {"projector": "random", "update_proj_gap": 200, "scale": 1.0, "scaling": "channel",
            "limiter": True, "moment_policy": "keep"},
           dict(_GALORE_ADAM),
           "APOLLO (Zhu et al. 2025): seed-only Gaussian projector N(0, 1/r), the raw gradient "
           "scaled per channel by ||N||/||R||, norm-growth limiter."),
    Preset("apollo_mini",
           {"projector": "random", "rank": 1, "update_proj_gap": 200, "scale": 128.0,
            "scaling": "tensor", "limiter": True, "moment_policy": "keep"},
           dict(_GALORE_ADAM),
           "APOLLO-Mini: rank 1, tensor-wise scaling, scale 128 (enters as sqrt(128))."),
    Preset("gradnormlorp", dict(_GALORE), dict(_GALORE_ADAM),
           "GradNormLoRP (Huang et al. 2024): GaLore on the direction matrices of a weight-"
           "normalised model (call apply_weight_norm first, or use a PEFT DoRA model); "
           "magnitudes get AdamW."),
    Preset("dct_adamw",
           {"projector": "dct", "update_proj_gap": 200, "scale": 1.0, "moment_policy": "keep"},
           {"lr": 1e-3, "eps": 1e-8, "adam_style": "torch"},
           "SVD-free DCT-AdamW (Modoranu et al. 2025): r DCT columns chosen by l1 alignment, "
           "indices only. T=200 (ours, as GaLore; the official code refreshes every step)."),
):
    register_preset(_p)


# --------------------------------------------------------------------------- groups


def _default_targets(model: nn.Module) -> list[nn.Module]:
    from rankwise.optim.qweight import QuantizedWeightLinear

    return [
        m for name, m in model.named_modules()
        if isinstance(m, nn.Linear | QuantizedWeightLinear) and ("attn" in name or "mlp" in name)
    ]


def _targeted(model: nn.Module, target_modules: Sequence[str] | str) -> list[nn.Module]:
    """Modules named by `target_modules`, plus every Q-GaLore quantised linear (qweight.py:
    `find_modules` knows linear types only, and a quantised weight is always projected)."""
    from rankwise.optim.qweight import QuantizedWeightLinear
    from rankwise.surgery import find_modules

    quantised = [m for m in model.modules() if isinstance(m, QuantizedWeightLinear)]
    try:
        modules = list(find_modules(model, target_modules).values())
    except ValueError:
        if not quantised:
            raise
        modules = []
    return modules + quantised


def _matrix_of(module: nn.Module) -> list[torch.Tensor]:
    """The trainable 2-D matrix a target module contributes (the direction V when the weight
    is weight-normalised by torch's parametrization)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, "weight"):
        originals = module.parametrizations.weight
        cand = [getattr(originals, n) for n in ("original1", "original") if hasattr(originals, n)]
        return [p for p in cand if p.ndim == 2 and min(p.shape) > 1 and p.requires_grad]
    w = getattr(module, "weight", None)
    return [w] if isinstance(w, nn.Parameter) and w.ndim == 2 and w.requires_grad else []


def param_groups(
    model: nn.Module,
    *,
    target_modules: Sequence[str] | str | None = None,
    **projected: Any,
) -> list[dict[str, Any]]:
    """Split a model's trainable parameters into a projected group and a plain-AdamW group.

    Args:
        model: the model.
        target_modules: None for GaLore's rule (Linear modules named ``*attn*``/``*mlp*``),
            or PEFT-style names / regex resolved by `rankwise.surgery.find_modules`.
        **projected: options of the projected group (``rank``, ``projector``, ``scale``...).

    Returns:
        ``[{"name": "lowrank", "params": [...], **projected}, {"name": "plain", "params": [...]}]``
        (empty groups left out). Tied parameters appear once.
    """
    if target_modules is None:
        modules = _default_targets(model)
    else:
        modules = _targeted(model, target_modules)
    chosen: dict[int, torch.Tensor] = {}
    for module in modules:
        for p in _matrix_of(module):
            chosen[id(p)] = p
    rest, seen = [], set(chosen)
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            rest.append(p)
    groups = []
    if chosen:
        groups.append({"name": "lowrank", "params": list(chosen.values()), **projected})
    if rest:
        groups.append({"name": "plain", "params": rest})
    if not chosen:
        raise ValueError(
            "no parameter matched the projected targets (Linear modules named *attn*/*mlp* by "
            "default): pass target_modules=[...] naming the layers to project"
        )
    return groups


_PROJ_KEYS = {"rank", "rank_fraction", "projector", "update_proj_gap", "scale", "proj_side",
              "proj_bits", "proj_options", "block_order", "block_density"}


def create(
    name: str,
    model_or_params: nn.Module | Iterable[Any],
    *,
    target_modules: Sequence[str] | str | None = None,
    proj_lr_scale: float = 1.0,
    **options: Any,
) -> LowRankOptimizer:
    """Build the optimizer of preset `name` for a model, a parameter list or param groups.

    Args:
        name: a preset (``rankwise.optim.available()``; dashes allowed).
        model_or_params: a model (GaLore's rule picks the projected matrices, or
            `target_modules`); ``model.named_parameters()`` (the same rule on the names);
            ``model.parameters()`` or any list of tensors (every 2-D tensor larger than the
            rank is projected, the rest gets AdamW); or param-group dicts (a group with ``rank``/``rank_fraction``,
            or, when `options` give one, a group of 2-D tensors that does not set
            ``projector``, is projected).
        target_modules: PEFT-style names / regex of the modules to project (models only).
        proj_lr_scale: multiplies the lr of the projected groups (FRUGAL's
            ``proj_params_lr_scale``; 1 = the same lr everywhere).
        **options: keys of the projected group (rank, rank_fraction, projector,
            update_proj_gap, scale, ...) go to it; the rest (lr, betas, ...) are optimizer-wide.

    A preset whose options name no rank, or whose input leaves nothing to project, is refused
    with the fix: a low-rank method never silently runs as plain AdamW.

    Example:
        >>> opt = rankwise.optim.create("galore_adamw", model, rank=128, lr=0.01)
    """
    from rankwise.registry import canonical_name

    preset = _registry().get(name).load()
    name = canonical_name(name)
    proj_keys = set(preset.projected) | _PROJ_KEYS
    projected = {**preset.projected, **{k: v for k, v in options.items() if k in proj_keys}}
    defaults = {**preset.defaults, **{k: v for k, v in options.items() if k not in proj_keys}}
    if projected.get("block_order") is not None:  # FRUGAL block-wise: whole matrices
        projected.pop("projector", None)
        projected.setdefault("block_density", projected.pop("rank_fraction", 0.25) or 0.25)
        projected.pop("rank", None)
    elif name == "frugal" and projected.get("rank") is None:
        projected.setdefault("rank_fraction", 0.25)
    has_rank = (projected.get("rank") is not None or projected.get("rank_fraction") is not None
                or projected.get("block_order") is not None)
    items = None if isinstance(model_or_params, nn.Module) else list(model_or_params)
    if not has_rank and (items is None or not all(isinstance(x, dict) for x in items)):
        raise ValueError(f"preset {name!r} needs rank=... or rank_fraction=... (the projected "
                         "matrices' subspace size)")
    if items is None:
        groups = param_groups(model_or_params, target_modules=target_modules, **projected)
        if name == "gradnormlorp":
            _check_weight_norm(model_or_params)
    else:
        groups = _groups_from(items, projected, name, has_rank)
    if proj_lr_scale != 1.0:
        lr = defaults.get("lr", GROUP_DEFAULTS["lr"])
        for g in groups:
            if _is_projected(g):
                g.setdefault("lr", lr * float(proj_lr_scale))
    return LowRankOptimizer(groups, **defaults)


def _is_projected(group: dict[str, Any]) -> bool:
    return any(group.get(k) is not None for k in ("rank", "rank_fraction", "block_order")) or (
        group.get("projector") is not None)


def _groups_from(items: list[Any], projected: dict[str, Any], name: str,
                 has_rank: bool) -> list[dict[str, Any]]:
    """Param groups from what users pass instead of a model (see `create`)."""
    if items and all(isinstance(x, tuple) and len(x) == 2 for x in items):  # named_parameters
        chosen = [p for n, p in items if p.ndim == 2 and p.requires_grad
                  and ("attn" in n or "mlp" in n)]
        rest = [p for _, p in items if p.requires_grad and all(p is not q for q in chosen)]
        groups = _split(chosen, rest, projected)
    elif all(isinstance(x, torch.Tensor) for x in items):  # model.parameters(): 2-D ones
        rank = projected.get("rank") or 1  # a matrix no larger than the rank gains nothing
        mats = [p for p in items if p.ndim == 2 and p.requires_grad and min(p.shape) > rank]
        groups = _split(mats, [p for p in items if all(p is not q for q in mats)], projected)
    else:
        groups = []
        for g in items:
            g = dict(g) if isinstance(g, dict) else {"params": [g]}
            params = list(g["params"]) if not isinstance(g["params"], torch.Tensor) else [
                g["params"]]
            g["params"] = params
            takes = (g.get("rank") is not None or g.get("rank_fraction") is not None
                     or (has_rank and "projector" not in g and params
                         and all(p.ndim == 2 for p in params)))
            if takes:
                g = {**projected, **g}
                if g.get("rank") is not None:
                    g.pop("rank_fraction", None)
            groups.append(g)
    if not any(_is_projected(g) for g in groups):
        raise ValueError(
            f"preset {name!r}: none of the given parameters is projected (no 2-D tensor, or "
            "every group sets projector=None): pass the model itself, model.parameters() with "
            "its weight matrices, or a group {'params': [...], 'rank': r}")
    return groups


def _split(mats: list[torch.Tensor], rest: list[torch.Tensor],
           projected: dict[str, Any]) -> list[dict[str, Any]]:
    groups = []
    if mats:
        groups.append({"name": "lowrank", "params": mats, **projected})
    if rest:
        groups.append({"name": "plain", "params": rest})
    return groups


def _check_weight_norm(model: nn.Module) -> None:
    """GradNormLoRP projects the direction of a weight-normalised matrix (Huang et al. 2024,
    eq. 4); on a model without weight normalisation it is plain GaLore: say so."""
    from torch.nn.utils import parametrize

    normed = any(parametrize.is_parametrized(m, "weight") for m in model.modules())
    dora = any("magnitude" in n for n, _ in model.named_parameters())
    if not (normed or dora):
        warnings.warn(
            "gradnormlorp on a model without weight normalisation behaves exactly as "
            "galore_adamw: call rankwise.optim.apply_weight_norm(model) first (or use a DoRA "
            "model) to train directions and magnitudes separately", UserWarning, stacklevel=3)


# --------------------------------------------------------------------------- GradNormLoRP


def apply_weight_norm(
    model: nn.Module, *, target_modules: Sequence[str] | str | None = None
) -> list[str]:
    """Weight-normalise target linears in place: ``W = g * V / ||V||_row`` (GradNormLoRP).

    Uses torch's own parametrization (`torch.nn.utils.parametrizations.weight_norm`, dim 0:
    one magnitude per output row, as PEFT's DoRA). At init g = ||W||_row and V = W, so the
    model's outputs are unchanged. `param_groups` then projects V's gradient and gives g
    plain AdamW. Returns the names of the modules changed.
    """
    from torch.nn.utils.parametrizations import weight_norm

    if target_modules is None:
        named = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and ("attn" in n or "mlp" in n)]
    else:
        from rankwise.surgery import find_modules

        named = list(find_modules(model, target_modules).items())
    for _, module in named:
        weight_norm(module, name="weight", dim=0)
    return [n for n, _ in named]


def merge_weight_norm(model: nn.Module) -> None:
    """Materialise weight-normalised linears back into plain weights (no inference overhead)."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
