"""Export and import LoRA, rsLoRA, DoRA, PiSSA, EVA, VeRA and AdaLoRA adapters in PEFT's format.

PEFT's format (peft ``PeftModel.save_pretrained``; read in peft 0.21): a directory with

    adapter_config.json        LoraConfig fields: peft_type "LORA", r, lora_alpha, use_rslora,
                               use_dora, init_lora_weights, target_modules, rank_pattern, ...
    adapter_model.safetensors  "base_model.model.<fqn>.lora_A.weight" (r, in),
                               "...lora_B.weight" (out, r), DoRA "...lora_magnitude_vector"
                               (out,); embeddings "...lora_embedding_A" (r, num_embeddings) and
                               "...lora_embedding_B" (dim, r); Conv2d A (r, C_in, kh, kw),
                               B (out, r, 1, 1), magnitude (1, out, 1, 1)

These are our (out, in)-layout factors under other names, so LoRA/rsLoRA/DoRA convert exactly.
We write ``target_modules`` as the exact layer names, and ``rank_pattern`` / ``alpha_pattern``
only when layers differ. EVA (Paischer et al. 2024) is a LoRA with data-chosen per-layer ranks:
it is written as PEFT writes it, ``init_lora_weights="eva"`` with ``rank_pattern`` and
``alpha_pattern`` (alpha_l = scale_l * rank_l; layers given rank 0 are left out, PEFT has no
empty LoRA), and read back as per-layer LoRA adapters (the same ΔW). VeRA and AdaLoRA have
their own PEFT formats (`peft_formats.py`).

PiSSA (Meng et al. 2024: PEFT mutates the base weight to W_res = W − U_r S_r V_rᵀ). Both directions work from the
*original* base weights:

* ``pissa_as="lora"`` (default): the PiSSA adapter becomes a plain rank-2r LoRA on the original
  W, exactly as PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``:
  A' = [A; A₀], B' = [B, −B₀], α' = 2α (√2·α with rsLoRA), so s'·B'A' = s(BA − B₀A₀) and
  W + s'·B'A' = W_res + s·BA. Loads anywhere, combines with other adapters.
* ``pissa_as="pissa"``: native, ``init_lora_weights="pissa"`` with the trained A, B. Given the
  original base, ``PeftModel.from_pretrained`` re-runs its SVD to rebuild W_res and then loads
  A, B; we do the same on import. Exact SVD only (a ``pissa_niter_K`` init is randomized and
  cannot be rebuilt: convert it to LoRA instead). Our ``niter=K`` is not PEFT's
  ``pissa_niter_K`` either: we oversample the randomized SVD (rankwise.linalg), so it is closer
  to the exact SVD than PEFT's, but not equal to it.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise import io
from rankwise.adapt.api import adapter_layers
from rankwise.adapt.context import InitContext, ModelData
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.layer import AdapterLayer
from rankwise.adapt.method import AdapterMethod
from rankwise.adapt.methods.dora import DoRA
from rankwise.adapt.methods.eva import EVA
from rankwise.adapt.methods.lora import LoRA, LoRAConfig
from rankwise.adapt.methods.pissa import PiSSA, PiSSAConfig
from rankwise.adapt.serialization import install_layers

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_BASE_FREE_INITS = (True, False, "gaussian", "eva", "true", "false")


def _peft_tensors(fqn: str, method: AdapterMethod, geo: Geometry, A: torch.Tensor,
                  B: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT's keys and shapes for one layer's factors (and DoRA magnitude)."""
    key = PREFIX + fqn
    if geo.kind == "embedding":
        return {f"{key}.lora_embedding_A": A, f"{key}.lora_embedding_B": B}
    if geo.kind == "conv2d":
        A = A.reshape(A.shape[0], *geo.module.weight.shape[1:])
        B = B[:, :, None, None]
    out = {f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B}
    if isinstance(method, DoRA):
        mag = method.magnitude.detach()
        out[f"{key}.lora_magnitude_vector"] = mag.view(1, -1, 1, 1) if geo.kind == "conv2d" else mag
    return out


def export_peft(model: nn.Module, path: str | os.PathLike[str], *, pissa_as: str = "lora") -> Path:
    """Write `model`'s adapters as a PEFT adapter directory; returns the path.

    Args:
        model: a model adapted with lora, rslora, dora, pissa, eva, vera or adalora (one kind
            for all layers).
        path: output directory.
        pissa_as: "lora" (rank-2r LoRA on the original base) or "pissa" (native; see module doc).
    """
    if pissa_as not in ("lora", "pissa"):
        raise ValueError(f"pissa_as must be 'lora' or 'pissa', got {pissa_as!r}")
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("export_peft: the model has no adapter layers; call adapt_ first")
    native = _export_native(model, layers)
    if native is not None:
        return _write(path, *native)
    kinds = set()
    for fqn, layer in layers.items():
        m = layer.adapter
        if type(m) not in (LoRA, DoRA, PiSSA, EVA):
            raise ValueError(
                f"layer {fqn!r} uses method {m.name!r}, which PEFT's formats cannot hold "
                "(they hold lora, rslora, dora, pissa, eva, vera, adalora): use "
                "rankwise.adapt.save_adapter"
            )
        kinds.add((type(m), getattr(m.config, "use_rslora", False), m.config.dropout))
    if len(kinds) > 1:
        raise ValueError(
            "PEFT's config is global but these layers differ in method, use_rslora or dropout "
            f"({sorted((k[0].__name__, k[1], k[2]) for k in kinds)}): export one kind at a time"
        )
    cls, use_rslora, dropout = kinds.pop()
    if cls is PiSSA and pissa_as == "pissa":
        if any(layer.adapter.config.niter is not None for layer in layers.values()):
            raise ValueError(
                "a PiSSA adapter built with a randomized SVD (niter) cannot be re-derived by "
                "PEFT from the base: export it with pissa_as='lora'"
            )
    convert = cls is PiSSA and pissa_as == "lora"
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    if cls is EVA:  # rank-0 layers: PEFT has no empty LoRA (they change nothing)
        layers = {f: lay for f, lay in layers.items() if lay.adapter.eva_rank > 0}
    for fqn, layer in layers.items():
        m = layer.adapter
        A, B = m.A.detach(), m.B.detach()
        rank, alpha = m.config.rank, float(m.config.alpha)
        if cls is EVA:
            rank, alpha = m.eva_rank, float(m.scale) * m.eva_rank
        if convert:
            A = torch.cat([A, m.A_init], dim=0)  # (2r, in)
            B = torch.cat([B, -m.B_init], dim=1)  # (out, 2r)
            rank, alpha = 2 * rank, alpha * (math.sqrt(2) if use_rslora else 2.0)
        tensors.update(_peft_tensors(fqn, m, layer.geometry, A.clone(), B.clone()))
        ranks[fqn], alphas[fqn] = rank, alpha
    config = _lora_config(model, layers, cls, convert, use_rslora, dropout, ranks, alphas)
    return _write(path, config, tensors)


def _lora_config(model: nn.Module, layers: dict[str, AdapterLayer], cls: type, convert: bool,
                 use_rslora: bool, dropout: float, ranks: dict[str, int],
                 alphas: dict[str, float]) -> dict[str, Any]:
    """PEFT's LoraConfig fields for the exported layers (patterns only where layers differ)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    a = Counter(alphas.values()).most_common(1)[0][0]
    kinds_present = {layer.geometry.kind for layer in layers.values()}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)
        or None,
        "r": r,
        "lora_alpha": a,
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        "use_dora": cls is DoRA,
        "init_lora_weights": ("pissa" if (cls is PiSSA and not convert)
                              else "eva" if cls is EVA else True),
        "target_modules": sorted(layers),
        "rank_pattern": {re.escape(k): v for k, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(k): v for k, v in alphas.items() if v != a},
        "fan_in_fan_out": "conv1d" in kinds_present,
        "bias": "none",
        "lora_bias": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    if cls is EVA:
        c = next(iter(layers.values())).adapter.config
        config["eva_config"] = {"rho": c.rho, "whiten": c.whiten,
                                "adjust_scaling_factors": c.adjust_scaling_factors}
    return config


def _export_native(model: nn.Module, layers: dict[str, AdapterLayer]) -> tuple | None:
    """(config, tensors) in PEFT's VeRA or AdaLoRA format, or None for the LoRA family."""
    from rankwise.adapt import peft_formats
    from rankwise.adapt.methods.adalora import AdaLoRA
    from rankwise.adapt.methods.vera import VeRA

    kinds = {type(layer.adapter) for layer in layers.values()}
    for cls, export in ((VeRA, peft_formats.export_vera), (AdaLoRA, peft_formats.export_adalora)):
        if cls in kinds:
            if len(kinds) > 1:
                raise ValueError(f"PEFT's {cls.__name__} format holds one method, but the model "
                                 f"mixes {sorted(k.__name__ for k in kinds)}: export one kind at "
                                 "a time")
            config, tensors = export(layers)
            name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
            return {"task_type": None, "base_model_name_or_path": name,
                    "inference_mode": True, **config}, tensors
    return None


def _write(path: str | os.PathLike[str], config: dict[str, Any],
           tensors: dict[str, torch.Tensor]) -> Path:
    """Publish the directory atomically (temp sibling + rename)."""
    out = Path(path)
    with io.publish_dir(out) as tmp:  # atomic; rankwise_manifest.json: checksums (PEFT ignores it)
        io.save_tensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        io.write_json(tmp / CONFIG_NAME, config)
        io.write_json(tmp / io.MANIFEST, {"format": "rankwise-manifest", "files": io.digest_files(tmp)})
    return out


def _pattern_value(patterns: dict[str, Any], fqn: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key k with re.match(rf"(.*\\.)?({k})$", fqn)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", fqn):
            return value
    return default


def _group_tensors(tensors: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, Any]]:
    """{fqn: {"A": ..., "B": ..., "magnitude": ...}} from PEFT's keys."""
    suffixes = {
        ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A",
        ".lora_embedding_B": "B", ".lora_magnitude_vector": "magnitude",
        ".lora_magnitude_vector.weight": "magnitude",
    }
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        for suffix, slot in suffixes.items():
            if name.endswith(suffix):
                grouped.setdefault(name[: -len(suffix)], {})[slot] = value
                if suffix.startswith(".lora_embedding"):
                    grouped[name[: -len(suffix)]]["embedding"] = True
                break
        else:
            raise ValueError(
                f"{source}: tensor {key!r} is not a LoRA/DoRA tensor (lora bias, "
                "modules_to_save and other PEFT extras are not supported)"
            )
    return grouped


def _check_config(cfg: dict[str, Any], source: str) -> str:
    """Validate a PEFT config and return the rankwise method name it maps to."""
    if cfg.get("peft_type") in ("VERA", "ADALORA"):
        return cfg["peft_type"].lower()
    if cfg.get("peft_type") != "LORA":
        raise ValueError(
            f"{source} is a PEFT {cfg.get('peft_type')!r} adapter: import_peft reads LORA "
            "(LoRA, rsLoRA, DoRA, PiSSA, EVA), VERA and ADALORA adapters"
        )
    for field_, ok in (("bias", "none"), ("lora_bias", False), ("modules_to_save", None)):
        if cfg.get(field_, ok) not in (ok, [], {}):
            raise ValueError(f"{source}: {field_}={cfg[field_]!r} is not supported (needs {ok!r})")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith("pissa"):
        if init != "pissa":
            raise ValueError(
                f"{source} uses init_lora_weights={init!r}, a randomized SVD whose residual "
                "base cannot be rebuilt exactly: save it in PEFT with "
                "path_initial_model_for_weight_conversion (a plain LoRA) and import that"
            )
        if cfg.get("use_dora"):
            raise ValueError(f"{source}: PiSSA with DoRA is not supported")
        return "pissa"
    if init not in _BASE_FREE_INITS:
        raise ValueError(
            f"{source} uses init_lora_weights={init!r}, which changes the base weights: convert "
            "it in PEFT with path_initial_model_for_weight_conversion and import the result"
        )
    if cfg.get("use_dora"):
        return "dora"
    return "rslora" if cfg.get("use_rslora") else "lora"


def import_peft(
    model: nn.Module, path: str | os.PathLike[str], *, trainable: bool = True
) -> nn.Module:
    """Load a PEFT LoRA/rsLoRA/DoRA/PiSSA/EVA, VeRA or AdaLoRA adapter directory onto `model`
    (the original base). EVA comes back as per-layer LoRA adapters (the same ΔW).

    Raises:
        ValueError: not a supported PEFT adapter, or the model lacks a layer or has another
            shape there (a different base model).
    """
    src = Path(path)
    io.verify_manifest(src)  # exports written by rankwise carry checksums
    cfg = io.read_json(src / CONFIG_NAME)
    method = _check_config(cfg, str(src))
    if method in ("vera", "adalora"):
        from rankwise.adapt import peft_formats

        read = peft_formats.import_vera if method == "vera" else peft_formats.import_adalora
        built = read(model, cfg, io.load_tensors(src / WEIGHTS_NAME), str(src))
        if not built:
            raise ValueError(f"{src}: {WEIGHTS_NAME} holds no {method} tensors")
        install_layers(model, built, trainable=trainable)
        return model
    grouped = _group_tensors(io.load_tensors(src / WEIGHTS_NAME), str(src))
    if not grouped:
        raise ValueError(f"{src}: {WEIGHTS_NAME} holds no LoRA tensors")
    modules = dict(model.named_modules())
    built: dict[str, tuple[nn.Module, AdapterMethod, Geometry]] = {}
    for fqn, parts in grouped.items():
        if "A" not in parts or "B" not in parts:
            raise ValueError(f"{src}: layer {fqn!r} lacks lora_A or lora_B: the file is incomplete")
        module = modules.get(fqn)
        if module is None:
            raise ValueError(
                f"PEFT adapter {src} was made for a different base model: layer {fqn!r} is not "
                f"in this {type(model).__name__}"
            )
        if isinstance(module, AdapterLayer):
            raise ValueError(
                f"layer {fqn!r} already has an adapter; call unload_ or merge_and_unload first"
            )
        geo = Geometry(module)
        A = parts["A"].reshape(parts["A"].shape[0], -1)  # (r, in)
        B = parts["B"].reshape(parts["B"].shape[0], -1)  # (out, r)
        rank = A.shape[0]
        if A.shape[1] != geo.in_features or B.shape != (geo.out_features, rank):
            raise ValueError(
                f"PEFT adapter {src} was made for a different base model: layer {fqn!r} has "
                f"(out, in) = {geo.shape} here but the adapter's factors are A {tuple(A.shape)}, "
                f"B {tuple(B.shape)}"
            )
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, fqn, cfg.get("lora_alpha", 8)))
        options = dict(rank=rank, alpha=alpha, dropout=float(cfg.get("lora_dropout", 0.0)),
                       use_rslora=bool(cfg.get("use_rslora", False)))
        adapter: AdapterMethod
        if method == "pissa":
            adapter = PiSSA(PiSSAConfig(**options), geo)
            # rebuild W_res from the original base exactly as PEFT does on load: a fresh SVD
            data = ModelData(all_shapes={fqn: geo.shape})
            adapter.initialize(InitContext(fqn, geo, data))
        else:
            cls = DoRA if method == "dora" else LoRA
            adapter = cls(LoRAConfig(**options), geo)
            if method == "dora":
                if "magnitude" not in parts:
                    raise ValueError(f"{src}: DoRA layer {fqn!r} lacks lora_magnitude_vector")
                with torch.no_grad():
                    adapter.magnitude.copy_(parts["magnitude"].reshape(-1))
        with torch.no_grad():
            adapter.A.copy_(A)
            adapter.B.copy_(B)
        adapter.preset = method
        built[fqn] = (module, adapter, geo)
    install_layers(model, built, trainable=trainable)
    return model
