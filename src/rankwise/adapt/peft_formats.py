"""PEFT's native VeRA and AdaLoRA formats (the LoRA family is `peft_io.py`).

Both hold the same math as ours, under other names (peft 0.21, ``save_pretrained``):

* **VeRA** (Kopiczko et al. 2024, eq. 1: ΔW = Λ_b B Λ_d A): ``adapter_config.json`` with
  ``peft_type "VERA"``, ``r``, ``projection_prng_key``, ``save_projection``, ``d_initial``,
  ``vera_dropout``; tensors ``base_model.model.<fqn>.vera_lambda_b`` (out,),
  ``...vera_lambda_d`` (r,) and, with ``save_projection``, the shared
  ``base_model.vera_A`` (r, in_max) and ``base_model.vera_B`` (out_max, r). Our shared bases
  are PEFT's draw for the same key and targets (methods/vera.py), so we write them
  (``save_projection=True``, PEFT's default) and check them on import.
* **AdaLoRA** (Zhang et al. 2023, eq. 3: ΔW = c P Λ Q with c = α / (r + 1e-5)):
  ``peft_type "ADALORA"`` with ``init_r``/``target_r``/schedule fields; tensors
  ``...lora_A`` (r, in), ``...lora_E`` (r, 1), ``...lora_B`` (out, r). We export the full
  init rank with masked triplets as zeros of E (``rank_pattern`` None: the same ΔW). A PEFT
  file saved after budgeting holds only the kept triplets plus ``rank_pattern`` (a boolean
  mask per layer over the init rank): on import they are put back at their positions, E = 0
  elsewhere, so c keeps PEFT's init rank.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankwise.adapt.geometry import Geometry
from rankwise.adapt.layer import AdapterLayer

PREFIX = "base_model.model."
Built = dict[str, tuple[nn.Module, Any, Geometry]]


# --------------------------------------------------------------------------- VeRA


def export_vera(layers: dict[str, AdapterLayer]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT VeRA config and tensors for layers all adapted with VeRA in one call."""
    from rankwise.adapt.methods._shared_bases import max_shape

    methods = {fqn: layer.adapter for fqn, layer in layers.items()}
    cfgs = {(m.config.rank, m.config.projection_prng_key, m.config.dropout, m.config.d_initial,
             tuple(m.basis_shape or ())) for m in methods.values()}
    if len(cfgs) > 1:
        raise ValueError("PEFT's VeRA config is global but these layers differ in rank, key, "
                         f"dropout, d_initial or shared-basis shape ({sorted(cfgs)}): adapt them "
                         "in one adapt_ call, or save with rankwise.adapt.save_adapter")
    rank, key, dropout, d_initial, basis_shape = cfgs.pop()
    if basis_shape != max_shape({f: lay.geometry.shape for f, lay in layers.items()}):
        raise ValueError(f"the shared VeRA bases {basis_shape} were sized for other targets than "
                         "these layers; PEFT sizes them by the adapted layers: save with "
                         "rankwise.adapt.save_adapter")
    tensors: dict[str, torch.Tensor] = {}
    for fqn, m in methods.items():
        tensors[f"{PREFIX}{fqn}.vera_lambda_b"] = m.lambda_b.detach().clone()
        tensors[f"{PREFIX}{fqn}.vera_lambda_d"] = m.lambda_d.detach().clone()
    from rankwise.adapt.methods.vera import vera_bases

    A, B = vera_bases(key, rank, *basis_shape)
    tensors["base_model.vera_A"], tensors["base_model.vera_B"] = A.clone(), B.clone()
    config = {"peft_type": "VERA", "r": rank, "projection_prng_key": key, "save_projection": True,
              "vera_dropout": dropout, "d_initial": d_initial, "target_modules": sorted(layers),
              "fan_in_fan_out": False, "bias": "none", "modules_to_save": None}
    return config, tensors


def import_vera(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                src: str) -> Built:
    """Our VeRA adapters for a PEFT VeRA directory (checking its shared bases are the key's)."""
    from rankwise.adapt.methods.vera import VeRA, VeRAConfig

    lambdas: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key in ("base_model.vera_A", "base_model.vera_B"):
            continue
        name = key.removeprefix(PREFIX)
        for suffix in (".vera_lambda_b", ".vera_lambda_d"):
            if name.endswith(suffix):
                lambdas.setdefault(name[: -len(suffix)], {})[suffix[-1]] = value
                break
        else:
            raise ValueError(f"{src}: tensor {key!r} is not a VeRA tensor")
    geos = _geometries(model, lambdas, src)
    config = VeRAConfig(rank=int(cfg["r"]), projection_prng_key=int(cfg.get("projection_prng_key", 0)),
                        d_initial=float(cfg.get("d_initial", 0.1)),
                        dropout=float(cfg.get("vera_dropout", 0.0)))
    out_max = max(g.out_features for g in geos.values())
    in_max = max(g.in_features for g in geos.values())
    built: Built = {}
    for fqn, parts in lambdas.items():
        geo = geos[fqn]
        adapter = VeRA(config, geo)
        adapter._attach_bases(out_max, in_max)
        if set(parts) != {"b", "d"}:
            raise ValueError(f"{src}: VeRA layer {fqn!r} lacks vera_lambda_b or vera_lambda_d")
        with torch.no_grad():
            adapter.lambda_b.copy_(parts["b"].reshape(-1))
            adapter.lambda_d.copy_(parts["d"].reshape(-1))
        adapter.preset = "vera"
        built[fqn] = (geo.module, adapter, geo)
    if "base_model.vera_A" in tensors:
        adapter = next(iter(built.values()))[1]
        full_a = tensors["base_model.vera_A"]
        if full_a.shape[1] < in_max or not torch.equal(
                full_a[:, : adapter.in_features].to(adapter.A), adapter.A):
            raise ValueError(f"{src}: its vera_A is not PEFT's draw for projection_prng_key="
                             f"{config.projection_prng_key} and these targets: it cannot be "
                             "rebuilt from the key")
    return built


# --------------------------------------------------------------------------- AdaLoRA


def export_adalora(layers: dict[str, AdapterLayer]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT AdaLoRA config and tensors (full init rank, masked triplets as E = 0)."""
    cfgs = {layer.adapter.config for layer in layers.values()}
    if len(cfgs) > 1:
        raise ValueError("PEFT's AdaLoRA config is global but these layers differ in their "
                         "options: export one kind at a time")
    c = cfgs.pop()
    tensors: dict[str, torch.Tensor] = {}
    for fqn, layer in layers.items():
        m = layer.adapter
        tensors[f"{PREFIX}{fqn}.lora_A"] = m.A.detach().clone()
        tensors[f"{PREFIX}{fqn}.lora_E"] = m.E.detach().clone().reshape(-1, 1)
        tensors[f"{PREFIX}{fqn}.lora_B"] = m.B.detach().clone()
    total = c.total_step if c.total_step is not None else c.tinit + c.tfinal + 1
    config = {"peft_type": "ADALORA", "r": c.rank, "init_r": c.rank, "target_r": c.target_rank,
              "lora_alpha": c.alpha, "lora_dropout": c.dropout, "tinit": c.tinit,
              "tfinal": c.tfinal, "deltaT": c.delta_t, "beta1": c.beta1, "beta2": c.beta2,
              "orth_reg_weight": c.orth_reg_weight, "total_step": total,
              "target_modules": sorted(layers), "rank_pattern": None, "fan_in_fan_out": False,
              "bias": "none", "modules_to_save": None, "init_lora_weights": True}
    return config, tensors


def import_adalora(model: nn.Module, cfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                   src: str) -> Built:
    """Our AdaLoRA adapters for a PEFT AdaLoRA directory (budgeted files padded back)."""
    from rankwise.adapt.methods.adalora import AdaLoRA, AdaLoRAConfig

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        for suffix in (".lora_A", ".lora_E", ".lora_B"):
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[suffix[-1]] = value
                break
        else:
            raise ValueError(f"{src}: tensor {key!r} is not an AdaLoRA tensor")
    geos = _geometries(model, parts, src)
    init_r = int(cfg.get("init_r") or cfg.get("r"))
    total = cfg.get("total_step")
    config = AdaLoRAConfig(rank=init_r, target_rank=min(int(cfg.get("target_r", init_r)), init_r),
                           alpha=float(cfg.get("lora_alpha", 8)),
                           dropout=float(cfg.get("lora_dropout", 0.0)),
                           tinit=int(cfg.get("tinit", 0)), tfinal=int(cfg.get("tfinal", 0)),
                           total_step=int(total) if total else None)
    masks = {k.rsplit(".lora_E", 1)[0]: torch.tensor(v, dtype=torch.bool)
             for k, v in (cfg.get("rank_pattern") or {}).items()}
    built: Built = {}
    for fqn, p in parts.items():
        if set(p) != {"A", "E", "B"}:
            raise ValueError(f"{src}: AdaLoRA layer {fqn!r} lacks lora_A, lora_E or lora_B")
        geo = geos[fqn]
        keep = masks.get(fqn, torch.ones(init_r, dtype=torch.bool))
        if keep.numel() != init_r or int(keep.sum()) != p["A"].shape[0]:
            raise ValueError(f"{src}: layer {fqn!r} holds {p['A'].shape[0]} triplets but its "
                             f"rank_pattern keeps {int(keep.sum())} of init_r={init_r}")
        if p["A"].shape[1] != geo.in_features or p["B"].shape[0] != geo.out_features:
            raise ValueError(f"PEFT adapter {src} was made for a different base model: layer "
                             f"{fqn!r} is {geo.shape} here, A {tuple(p['A'].shape)}, "
                             f"B {tuple(p['B'].shape)} there")
        adapter = AdaLoRA(config, geo)
        with torch.no_grad():
            adapter.A.zero_()
            adapter.B.zero_()
            adapter.E.zero_()
            adapter.A[keep] = p["A"].to(adapter.A)
            adapter.B[:, keep] = p["B"].to(adapter.B)
            adapter.E[keep] = p["E"].reshape(-1).to(adapter.E)
        adapter.preset = "adalora"
        built[fqn] = (geo.module, adapter, geo)
    return built


def _geometries(model: nn.Module, names: dict[str, Any], src: str) -> dict[str, Geometry]:
    modules = dict(model.named_modules())
    out = {}
    for fqn in names:
        module = modules.get(fqn)
        if module is None:
            raise ValueError(f"PEFT adapter {src} was made for a different base model: layer "
                             f"{fqn!r} is not in this {type(model).__name__}")
        if isinstance(module, AdapterLayer):
            raise ValueError(f"layer {fqn!r} already has an adapter; call unload_ or "
                             "merge_and_unload first")
        out[fqn] = Geometry(module)
    return out
