"""How rankwise's stages compose: what each verb does to a model another verb already changed.

One policy module so that every seam is decided once, documented once (docs/reliability.md,
"Stage seams") and tested once (tests/faults/test_faults_seams.py):

=====================  =======================================================================
first -> then          behaviour
=====================  =======================================================================
adapt -> compress      refused before any work: compressing would drop the trained update
                       (the default targets would reach ``...base_layer`` inside the adapter).
                       Fix: ``merge_and_unload`` (compress the merged weight) or ``unload_``.
adapt -> save          ``save_compressed`` / ``export_peft`` refuse an adapted model (its
                       directory could not be reloaded). Fix: ``merge_and_unload`` first, or
                       ``save_adapter`` the adapter and ``unload_``.
compress -> adapt      allowed: adapters wrap the factors' ``nn.Linear`` (``...q_proj.A`` /
                       ``.B``, ``target_modules="all-linear"``); ``merge_and_unload`` folds them
                       into the factors, which then save and reload as a compressed model.
compensate -> adapt    allowed likewise: adapters wrap ``base_layer`` / ``lora_A`` / ``lora_B``
                       of the EoRA layer; merging folds into them.
compress -> compress   already factorised / compensated layers are left alone: default targets
                       never enter them; naming a layer inside one is refused.
layers -> compress     refused when training parameterisations (ReLoRA, SLTrain, ...) are
                       present. Fix: ``rankwise.layers.to_dense_`` first. FactorizedLinear from
                       ``to_factorized_`` counts as compressed (above).
layers -> save         refused likewise (their structure is not recorded).
=====================  =======================================================================

`compress_` and `compensate_` are wrapped by `guarded`: every check (the seams above, NaN/inf
weights, calibration ids outside the vocabulary) runs before the model changes, and a failure
half-way (an SVD that does not converge, Ctrl-C) puts the original layers back.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from rankwise.linalg import all_finite

__all__ = ["check_compressible", "check_savable", "compress_targets", "guarded"]

F = TypeVar("F", bound=Callable[..., Any])


def _adapters(model: nn.Module) -> list[str]:
    from rankwise.adapt.layer import AdapterLayer

    return [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def _training_layers(model: nn.Module) -> list[str]:
    from rankwise.layers import ParameterizedLinear

    return [n for n, m in model.named_modules() if isinstance(m, ParameterizedLinear)]


def _compressed(model: nn.Module) -> list[str]:
    from rankwise.compress.eora import CompensatedLinear
    from rankwise.layers.factorized import FactorizedLinear

    return [n for n, m in model.named_modules() if n and isinstance(m, FactorizedLinear | CompensatedLinear)]


def check_compressible(model: nn.Module, verb: str = "compress_") -> None:
    """Refuse a model whose adapters or training layers `verb` would silently lose."""
    adapters = _adapters(model)
    if adapters:
        raise ValueError(
            f"{verb}: the model has adapters (e.g. {adapters[0]!r}); compressing would drop their "
            "trained update: call rankwise.adapt.merge_and_unload(model) first to compress the merged "
            "weights (or unload_(model) to compress the base without them)"
        )
    training = _training_layers(model)
    if training:
        raise ValueError(
            f"{verb}: {training[0]!r} is a {type(model.get_submodule(training[0])).__name__} training "
            "layer; call rankwise.layers.to_dense_(model) first (it folds every training layer into "
            "nn.Linear), then compress"
        )


def check_savable(model: nn.Module, verb: str = "save_compressed") -> None:
    """Refuse a model whose directory `verb` would write but never reload."""
    adapters = _adapters(model)
    if adapters:
        raise ValueError(
            f"{verb}: the model still has adapters (e.g. {adapters[0]!r}), which a compressed "
            "directory cannot hold: call rankwise.adapt.merge_and_unload(model) first to save the "
            "merged weights, or save them with rankwise.adapt.save_adapter and unload_(model)"
        )
    training = _training_layers(model)
    if training:
        raise ValueError(
            f"{verb}: {training[0]!r} is a training layer that a compressed directory cannot hold: "
            "call rankwise.layers.to_dense_(model) or to_factorized_(model) first"
        )


def compress_targets(model: nn.Module, target_modules: str | Sequence[str] | None) -> str | Sequence[str] | None:
    """The `target_modules` to hand to compress_: unchanged for a plain model; with already
    compressed layers, the selected linears outside them (a selection inside one is refused)."""
    from rankwise import surgery

    compressed = _compressed(model)
    if not compressed:
        return target_modules
    inside = tuple(c + "." for c in compressed)
    found = surgery.find_modules(model, target_modules)
    chosen = [n for n in found if not n.startswith(inside)]
    entered = [n for n in found if n.startswith(inside)]
    if entered and target_modules is not None and str(target_modules).lower() != "all-linear":
        raise ValueError(
            f"target_modules selects {entered[0]!r}, inside an already compressed layer: leave the "
            "compressed layers out (reload the original model to compress it differently)"
        )
    if not chosen:
        raise ValueError(
            f"every selected layer is already compressed (e.g. {compressed[0]!r}): nothing left to "
            "compress; reload the original model to compress it differently"
        )
    return chosen


def check_finite(targets: dict[str, nn.Module]) -> None:
    """Refuse NaN/inf in any target weight before any layer is replaced."""
    bad = [n for n, m in targets.items() if not all_finite(m.weight)]
    if bad:
        raise ValueError(f"the weights of {bad[:5]} hold NaN/inf: the model is corrupt; reload it before compressing")


def check_calibration_ids(model: nn.Module, calibration: Any) -> None:
    """Refuse calibration token ids outside the model's vocabulary (before any forward pass)."""
    if not isinstance(calibration, torch.Tensor) or calibration.numel() == 0:
        return
    if calibration.dtype.is_floating_point or calibration.dtype == torch.bool:
        return  # compress_'s own check names the dtype problem
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    lo, hi = int(calibration.min()), int(calibration.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(
            f"calibration token ids span [{lo}, {hi}] but the model's vocabulary is [0, {vocab}): "
            "the ids come from another tokenizer; tokenize the calibration text with the model's own"
        )


def _resolve_targets(bound: inspect.BoundArguments, sig: inspect.Signature, model: nn.Module) -> Any:
    """The targets a compress_/compensate_ call will act on (from its keyword options or its
    config), narrowed by `compress_targets` and written back where the call reads them."""
    args = bound.arguments
    options = dict(args.get("options") or {})
    requested = options.get("target_modules", getattr(args.get("config"), "target_modules", None))
    if "target_modules" in sig.parameters:
        requested = args.get("target_modules", requested)
    chosen = compress_targets(model, requested)
    if chosen is not requested:
        chosen = tuple(chosen) if isinstance(chosen, list) else chosen
        if "target_modules" in sig.parameters:
            args["target_modules"] = chosen
        else:
            options["target_modules"] = chosen
            args["options"] = options
    return chosen


def guarded(fn: F) -> F:
    """Wrap compress_ / compensate_: validate everything first, roll back on any failure."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rankwise import surgery
        from rankwise.compress.api import find_targets

        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        model = bound.arguments["model"]
        check_compressible(model, fn.__name__)
        targets = find_targets(model, _resolve_targets(bound, sig, model))
        check_finite(targets)
        check_calibration_ids(model, bound.arguments.get("calibration"))
        try:
            return fn(*bound.args, **bound.kwargs)
        except BaseException as exc:
            for fqn, original in targets.items():  # put every original layer back
                if model.get_submodule(fqn) is not original:
                    surgery.replace_module(model, fqn, original)
            if isinstance(exc, IndexError) and "out of range" in str(exc):
                raise ValueError(
                    f"{fn.__name__}: a calibration token id is outside the model's vocabulary ({exc}): "
                    "the tokenizer does not match the model; pass the model's own tokenizer"
                ) from None
            raise

    return wrapper  # type: ignore[return-value]
