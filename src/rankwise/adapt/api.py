"""Model-level verbs: adapt_, merge_, unmerge_, merge_and_unload, unload_, disable_adapter.

    model = rankwise.adapt.adapt_(model, "lora", rank=8, target_modules=["q_proj", "v_proj"])
    ... train (only adapter parameters require grad) ...
    with rankwise.adapt.disable_adapter(model):
        base_logits = model(ids).logits          # the original model
    rankwise.adapt.merge_(model)                 # fold in place; unmerge_ undoes it
    model = rankwise.adapt.merge_and_unload(model)   # plain modules again

`target_modules` uses PEFT's vocabulary through `rankwise.surgery.find_modules` (a list of
names or "."-suffixes, a full-match regex str, or "all-linear"); a pattern that matches nothing
is an error. One adapter per layer: adapting an adapted layer is an error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rankwise import surgery
from rankwise.adapt.context import InitContext, collect_model_data
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.layer import AdapterLayer
from rankwise.adapt.method import AdapterMethod, build_config, get_method


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every `AdapterLayer` in `model`, by fqn, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def _select_targets(
    model: nn.Module,
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None,
) -> dict[str, nn.Module]:
    existing = adapter_layers(model)
    try:
        found = surgery.find_modules(
            model, target_modules, types=surgery.supported_types(), exclude=exclude_modules
        )
    except TypeError as exc:
        if existing and "AdapterLayer" in str(exc):
            raise ValueError(
                f"target_modules={target_modules!r} names layers that already have an adapter "
                f"(e.g. {next(iter(existing))!r}); one adapter per layer: call merge_and_unload "
                "or unload_ first"
            ) from None
        raise
    # never descend into an existing adapter (its base_layer / internals)
    inside = tuple(name + "." for name in existing)
    targets = {n: m for n, m in found.items() if not n.startswith(inside)}
    if not targets:
        raise ValueError(
            f"target_modules={target_modules!r} selects only layers that already have an "
            "adapter; one adapter per layer: call merge_and_unload or unload_ first"
        )
    return targets


def adapt_(
    model: nn.Module,
    method: str = "lora",
    *,
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None = None,
    seed: int = 0,
    data: Any = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    input_stats: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    **options: Any,
) -> nn.Module:
    """Wrap the target layers of `model` with adapter `method`, in place; return `model`.

    Args:
        model: any ``nn.Module`` (a Hugging Face model included).
        method: a registered method name (`list_methods()`), e.g. "lora", "rslora", "dora",
            "pissa".
        target_modules: PEFT vocabulary: list of names/suffixes/globs, full-match regex str,
            or "all-linear". Matching nothing raises ValueError.
        exclude_modules: names to leave out (same vocabulary).
        seed: seeds every random init (per layer: seed and layer name); the global RNG is
            left untouched.
        data: calibration batches for methods that need activations or a first gradient.
        loss_fn: ``loss_fn(model, batch) -> loss`` for gradient-based inits (default: the
            causal-LM ``.loss`` with labels = input_ids).
        input_stats: precomputed `rankwise.calibrate.capture_input_stats` output (instead of
            `data`) for activation-based inits.
        batch_size: micro-batch size of the calibration passes.
        **options: the method's config fields (``rank``, ``alpha``, ``dropout``, ...).

    Returns:
        `model`, with only adapter parameters requiring grad.

    Raises:
        ValueError: unknown method or option value, a rank outside [1, min(out, in)], a
            pattern that matches nothing, a layer that already has an adapter.
        TypeError: an unknown option, or a layer type the method cannot adapt.
    """
    cls, _ = get_method(method)
    config = build_config(method, **options)
    targets = _select_targets(model, target_modules, exclude_modules)
    geometries = {name: Geometry(module) for name, module in targets.items()}
    bad = [name for name, geo in geometries.items() if not torch.isfinite(geo.weight()).all()]
    if bad:
        raise ValueError(
            f"the weights of {bad[:5]} hold NaN/inf: the base model is corrupt; reload it "
            "before adapting"
        )
    # allocate every method first: all shape/rank/type errors surface before the model changes
    methods: dict[str, AdapterMethod] = {}
    for name, geo in geometries.items():
        try:
            methods[name] = cls(config, geo)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
        methods[name].preset = method
    data_ = collect_model_data(
        model, targets, set(cls.needs), data=data, loss_fn=loss_fn, input_stats=input_stats,
        batch_size=batch_size,
    )
    for name in targets:  # initialise all before changing anything (an init may fail)
        methods[name].initialize(InitContext(name, geometries[name], data_, seed=seed))
    for name, module in targets.items():
        layer = AdapterLayer(module, methods[name], geometries[name])
        layer.apply_offset_()
        surgery.replace_module(model, name, layer)
    _freeze_non_adapter(model)
    return model


def _freeze_non_adapter(model: nn.Module) -> None:
    """Only adapter parameters stay trainable (PEFT's ``get_peft_model`` does the same)."""
    keep = {id(p) for layer in adapter_layers(model).values() for p in layer.adapter.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def merge_(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (forward then costs nothing extra)."""
    for layer in adapter_layers(model).values():
        layer.merge_()
    return model


def unmerge_(model: nn.Module) -> nn.Module:
    """Undo `merge_` (exact to float rounding)."""
    for layer in adapter_layers(model).values():
        layer.unmerge_()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain base modules back; returns `model`."""
    for name, layer in adapter_layers(model).items():
        surgery.replace_module(model, name, layer.merged_base_())
    return model


def unload_(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging: the original model comes back (PiSSA's residual
    base is restored to W as well)."""
    for name, layer in adapter_layers(model).items():
        surgery.replace_module(model, name, layer.restore_base_())
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the model computes the original (unadapted) outputs.

    Merged layers are unmerged on entry and merged again on exit.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("disable_adapter: the model has no adapter layers; call adapt_ first")
    state = {name: (layer.disabled, layer.merged) for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.unmerge_()
            layer.disabled = True
        yield model
    finally:
        for name, layer in layers.items():
            disabled, merged = state[name]
            layer.disabled = disabled
            if merged:
                layer.merge_()


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameters that require grad."""
    return surgery.count_parameters(model, trainable_only=True)
