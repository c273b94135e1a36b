"""Save and load adapters in rankwise's own format: one JSON file plus one safetensors file.

    DIR/rankwise_adapter.json          {"format": "rankwise-adapter", "version": 1, "layers": {
                                          fqn: {"method", "config", "kind", "shape": [out, in],
                                                "extra", "base_norm"}}}
    DIR/rankwise_adapter.safetensors   "<fqn>.<tensor>" for each adapter's state_dict
                                       (trainable tensors and persistent buffers)

Only adapter tensors are written, never the base model. A saved adapter loads onto the
*original* base model: base-mutating methods (PiSSA) rebuild their residual from their saved
initial factors. Loading checks every layer name, type and (out, in) shape and fails with the
mismatch named; ``base_norm`` (‖W‖_F of the original weight) catches a different checkpoint of
the same architecture with a warning (it may be deliberate, e.g. a quantised base).
For PEFT's format see `rankwise.adapt.peft_io`.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise import io
from rankwise.adapt.api import _freeze_non_adapter, adapter_layers
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.layer import AdapterLayer
from rankwise.adapt.method import AdapterMethod, get_method

FORMAT = "rankwise-adapter"
VERSION = 1
CONFIG_NAME = "rankwise_adapter.json"
WEIGHTS_NAME = "rankwise_adapter.safetensors"


def save_adapter(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write every adapter of `model` to directory `path` (created); returns the path."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no adapter layers; call adapt_ first")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: save_adapter writes a directory; choose another path")
    spec: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for fqn, layer in layers.items():
        layer._warn_if_rules_never_ran("saving")
        method = layer.adapter
        spec[fqn] = {
            "method": getattr(method, "preset", method.name),
            "config": method.config.to_dict(),
            "kind": layer.geometry.kind,
            "shape": list(layer.geometry.shape),
            "extra": method.extra_state(),
            "base_norm": float(torch.linalg.vector_norm(layer.original_weight())),
        }
        for key, value in method.state_dict().items():
            tensors[f"{fqn}.{key}"] = value.detach().clone()  # clone: no aliasing in safetensors
    with io.publish_dir(out) as tmp:  # built beside `out`, published by one rename
        io.save_tensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": FORMAT})
        io.write_json(tmp / CONFIG_NAME, {"format": FORMAT, "version": VERSION, "layers": spec,
                                          "files": io.digest_files(tmp)})  # last: marks it complete
    return out


def load_adapter(
    model: nn.Module, path: str | os.PathLike[str], *, trainable: bool = True
) -> nn.Module:
    """Load an adapter saved by `save_adapter` onto `model` (the original base), in place.

    Args:
        model: the base model the adapter was trained on (unadapted at those layers).
        path: the directory `save_adapter` wrote.
        trainable: leave adapter parameters requiring grad (False: inference only).

    Raises:
        ValueError: not a rankwise adapter directory (a PEFT one names `import_peft`), or the
            model lacks a layer / has another type or shape there (a different base model).
    """
    src = Path(path)
    io.recover(src)
    cfg_path = src / CONFIG_NAME
    if not cfg_path.is_file():
        if (src / "adapter_config.json").is_file():
            raise ValueError(
                f"{src} holds a PEFT adapter (adapter_config.json): load it with "
                "rankwise.adapt.import_peft(model, path)"
            )
        raise ValueError(f"{src} has no {CONFIG_NAME}: it is not a rankwise adapter directory")
    cfg = io.read_json(cfg_path)
    if cfg.get("format") != FORMAT or not isinstance(cfg.get("layers"), dict):
        raise ValueError(f"{cfg_path} is not a {FORMAT} config (format={cfg.get('format')!r})")
    if not isinstance(cfg.get("version", 0), int) or cfg.get("version", 0) > VERSION:
        raise ValueError(
            f"{cfg_path} has format version {cfg['version']!r}, not one this rankwise "
            f"reads ({VERSION}): upgrade rankwise"
        )
    if "files" in cfg:  # adapters saved before checksums were recorded have none
        io.verify_files(src, cfg["files"], marker=CONFIG_NAME)
    for fqn, spec in cfg["layers"].items():
        _check_spec(fqn, spec, cfg_path)
    tensors = io.load_tensors(src / WEIGHTS_NAME)
    built = build_layers(model, cfg["layers"], tensors, source=str(src))
    install_layers(model, built, trainable=trainable)
    return model


def build_layers(
    model: nn.Module,
    layers: dict[str, dict[str, Any]],
    tensors: dict[str, torch.Tensor],
    *,
    source: str,
) -> dict[str, tuple[nn.Module, AdapterMethod, Geometry]]:
    """Allocate and fill every saved method, checking the model matches; changes nothing."""
    modules = dict(model.named_modules())
    missing = [fqn for fqn in layers if fqn not in modules]
    if missing:
        raise ValueError(
            f"adapter {source} was saved for a different base model: layer(s) {missing[:5]} "
            f"are not in this {type(model).__name__}; load it onto the model it was trained on"
        )
    built: dict[str, tuple[nn.Module, AdapterMethod, Geometry]] = {}
    used: set[str] = set()
    norms: list[tuple[str, Geometry, float | None]] = []
    for fqn, spec in layers.items():
        module = modules[fqn]
        if isinstance(module, AdapterLayer):
            raise ValueError(
                f"layer {fqn!r} already has an adapter; call unload_ or merge_and_unload first"
            )
        try:
            geo = Geometry(module)
        except TypeError as exc:
            raise ValueError(f"adapter {source}: layer {fqn!r} cannot hold it ({exc})") from None
        if geo.kind != spec["kind"] or list(geo.shape) != list(spec["shape"]):
            raise ValueError(
                f"adapter {source} was saved for a different base model: layer {fqn!r} is a "
                f"{spec['kind']} of shape (out, in) = {tuple(spec['shape'])} there but a "
                f"{geo.kind} of shape {geo.shape} here; load it onto the model it was trained on"
            )
        try:
            cls, _ = get_method(spec["method"])
            config = cls.config_cls.from_dict(spec["config"])
            method = cls.from_saved(config, geo, spec.get("extra", {}))
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise ValueError(
                f"adapter {source}: the record of {fqn!r} does not build a {spec['method']!r} "
                f"adapter ({type(exc).__name__}: {exc}); the file is corrupt or edited: re-save it"
            ) from None
        method.preset = spec["method"]
        state = {}
        for key in method.state_dict():
            full = f"{fqn}.{key}"
            if full not in tensors:
                raise ValueError(f"adapter {source} lacks tensor {full!r}: the file is incomplete")
            state[key] = tensors[full]
            used.add(full)
        try:
            method.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"adapter {source}: tensors of {fqn!r} do not fit ({exc})") from None
        method.after_load(geo)
        built[fqn] = (module, method, geo)
        norms.append((fqn, geo, spec.get("base_norm")))
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"adapter {source} has tensors no layer claims: {extra[:5]}")
    for fqn, geo, saved in norms:  # only once everything else fits
        _check_base_norm(fqn, geo, saved, source)
    return built


def install_layers(
    model: nn.Module,
    built: dict[str, tuple[nn.Module, AdapterMethod, Geometry]],
    *,
    trainable: bool = True,
) -> None:
    """Wrap each layer with its loaded method (applying base offsets) and freeze the base."""
    from rankwise import surgery

    for fqn, (module, method, geo) in built.items():
        layer = AdapterLayer(module, method, geo)
        layer.apply_offset_()
        surgery.replace_module(model, fqn, layer)
        for p in method.parameters():
            p.requires_grad_(trainable)
    _freeze_non_adapter(model)
    if not trainable:
        for layer in adapter_layers(model).values():
            for p in layer.adapter.parameters():
                p.requires_grad_(False)


def _check_spec(fqn: Any, spec: Any, path: Path) -> None:
    """Types of one layer record, checked before anything is built (tampered files give a clear
    error, never a TypeError from deep inside a method)."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{path} is malformed ({fqn!r}: {what}): the file is corrupt or edited; re-save the adapter")

    if not isinstance(spec, dict):
        raise bad(f"a {type(spec).__name__}, not an object")
    if not isinstance(spec.get("method"), str) or not isinstance(spec.get("kind"), str):
        raise bad("'method' and 'kind' must be names")
    if not isinstance(spec.get("config"), dict) or not isinstance(spec.get("extra", {}), dict):
        raise bad("'config' and 'extra' must be objects")
    shape = spec.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise bad(f"'shape' is {shape!r}, not a list of positive ints")
    norm = spec.get("base_norm")
    if norm is not None and (not isinstance(norm, int | float) or isinstance(norm, bool)):
        raise bad("'base_norm' is not a number")
    rank = spec["config"].get("rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise bad(f"'rank' is {rank!r}, not a positive int")


def _check_base_norm(fqn: str, geo: Geometry, saved: float | None, source: str) -> None:
    if saved is None:
        return
    now = float(torch.linalg.vector_norm(geo.compute_weight()))
    if not math.isclose(now, saved, rel_tol=1e-3, abs_tol=1e-6):
        warnings.warn(
            f"adapter {source}: the weight of {fqn!r} has norm {now:.6g} here but {saved:.6g} "
            "in the base it was trained on: this is likely a different checkpoint",
            UserWarning,
            stacklevel=3,
        )
