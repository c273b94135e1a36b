"""Save and reload compressed models: HF config + safetensors + rankwise_compression.json.

Layout of a directory written by `save_compressed`:

    config.json                 the model's Hugging Face config (architectures set)
    generation_config.json      when the model has one
    model.safetensors           the state dict; factorised layers as {fqn}.A.weight,
                                {fqn}.B.weight (+ {fqn}.B.bias), EoRA paths as
                                {fqn}.base_layer.*, {fqn}.lora_A.weight, {fqn}.lora_B.weight;
                                tied weights stored once
    tokenizer files             when a tokenizer is given
    rankwise_compression.json   format, architecture, per-layer structure and ranks, the
                                CompressionReport; written last, so its presence marks a
                                complete directory

`load_compressed(dir)` builds the architecture from config.json with stock transformers classes
(no pickles, no `trust_remote_code`), swaps in FactorizedLinear / CompensatedLinear at the
recorded ranks and loads the tensors. `rankwise.load_model(dir)` calls it when the JSON is there.
`export_peft` writes EoRA paths as a PEFT LoRA adapter (lora_alpha = r: scale 1).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.compress import hf_guard
from rankwise.layers.factorized import FactorizedLinear

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "MARKER", "export_peft", "is_compressed_dir", "load_compressed", "save_compressed"]

FORMAT = 1
MARKER = "rankwise_compression.json"
WEIGHTS = "model.safetensors"


def is_compressed_dir(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a directory written by `save_compressed`."""
    return (Path(path) / MARKER).is_file()


def _layer_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    from rankwise.compress.eora import CompensatedLinear

    specs: dict[str, dict[str, Any]] = {}
    inside: set[str] = set()
    for fqn, module in model.named_modules():
        if any(fqn.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, CompensatedLinear):
            base = module.base_layer
            if isinstance(base, FactorizedLinear):
                base_spec = {"type": "factorized", "rank": base.rank, "bias": base.bias is not None}
            elif isinstance(base, nn.Linear):
                base_spec = {"type": "dense", "bias": base.bias is not None}
            else:
                raise TypeError(f"cannot save {fqn!r}: its base is a {type(base).__name__}")
            specs[fqn] = {"type": "compensated", "in": module.in_features, "out": module.out_features,
                          "rank": module.rank, "base": base_spec}
            inside.add(fqn)
        elif isinstance(module, FactorizedLinear):
            specs[fqn] = {"type": "factorized", "in": module.in_features, "out": module.out_features,
                          "rank": module.rank, "bias": module.bias is not None}
    return specs


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier key (tied weights): ({kept}, {dropped: kept})."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    kept, tied = {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
            kept[key] = t
    return kept, tied


def save_compressed(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    report: Any = None,
) -> Path:
    """Write `model` (compressed in place by rankwise.compress) to `directory`; return the path.

    Args:
        model: a transformers `PreTrainedModel` (its config says how to rebuild it).
        directory: created if missing; existing files of the same names are replaced atomically.
        tokenizer: saved alongside when given (so `rankwise eval DIR` finds it).
        report: the CompressionReport (or its dict) to record.
    """
    from rankwise import __version__
    from rankwise.io import save_tensors, write_json, write_text

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise TypeError(
            f"save_compressed needs a Hugging Face model with a .config, got {type(model).__name__}: "
            "save a plain module's state_dict with rankwise.io.save_tensors instead"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / MARKER
    if marker.exists():
        marker.unlink()  # the directory is incomplete until the marker is rewritten
    specs = _layer_specs(model)
    cfg = json.loads(config.to_json_string(use_diff=True))
    cfg["architectures"] = [type(model).__name__]
    cfg = hf_guard.guard_config(cfg, specs)  # plain transformers refuses it (names rankwise.load_model)
    write_text(directory / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "to_json_string"):
        write_text(directory / "generation_config.json", gen.to_json_string(use_diff=True))
    state, tied = _dedupe(model.state_dict())
    save_tensors(directory / WEIGHTS, state, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    if report is not None and hasattr(report, "to_dict"):
        report = report.to_dict()
    dtype = next(model.parameters()).dtype
    write_json(marker, {
        "format": FORMAT, "rankwise_version": __version__, "architecture": type(model).__name__,
        "dtype": str(dtype).removeprefix("torch."), "layers": specs, "tied": tied, "report": report,
    })
    logger.info("saved %d compressed layers to %s", len(specs), directory)
    return directory


def _architecture(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(
            f"architecture {name!r} is not a transformers model class: rankwise only rebuilds stock "
            "architectures (no trust_remote_code); upgrade transformers or re-save the model"
        )
    return cls


def _empty_layer(spec: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    from rankwise.compress.eora import CompensatedLinear

    n, m = int(spec["in"]), int(spec["out"])
    if spec["type"] == "factorized":
        return FactorizedLinear(n, m, int(spec["rank"]), bias=bool(spec["bias"]), dtype=dtype)
    if spec["type"] == "compensated":
        b = spec["base"]
        if b["type"] == "factorized":
            base: nn.Module = FactorizedLinear(n, m, int(b["rank"]), bias=bool(b["bias"]), dtype=dtype)
        else:
            base = nn.Linear(n, m, bias=bool(b["bias"]), dtype=dtype)
        return CompensatedLinear(base, n, m, int(spec["rank"]), dtype=dtype)
    raise ValueError(f"unknown layer type {spec['type']!r} in {MARKER}: the file is from a newer rankwise")


def load_compressed(directory: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a model saved by `save_compressed` (eval mode, CPU).

    Raises:
        FileNotFoundError: not a compressed directory (no rankwise_compression.json).
        ValueError: unknown format or architecture, or weights that do not match the structure.
    """
    from rankwise import surgery
    from rankwise.io import load_tensors, read_json

    directory = Path(directory)
    if not is_compressed_dir(directory):
        raise FileNotFoundError(
            f"{directory} has no {MARKER}: it was not written by save_compressed (load it with "
            "rankwise.load_model, or compress a model first)"
        )
    meta = read_json(directory / MARKER)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / MARKER} has format {meta.get('format')!r}; this rankwise reads {FORMAT}")
    saved_dtype = getattr(torch, meta.get("dtype", "float32"))
    cls = _architecture(meta["architecture"])
    config = hf_guard.read_config(directory)
    model = _instantiate(cls, config, saved_dtype)
    for fqn, spec in meta["layers"].items():
        surgery.replace_module(model, fqn, _empty_layer(spec, saved_dtype))
    tensors = load_tensors(directory / WEIGHTS)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shape mismatch between the JSON structure and the tensors
        raise ValueError(
            f"{directory / WEIGHTS} does not match the ranks in {MARKER} ({str(exc).splitlines()[-1].strip()}): "
            "the directory is corrupt or mixed; re-save it"
        ) from None
    tied = set(meta.get("tied", {}))
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS} does not match the recorded structure (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): the directory is corrupt or mixed; re-save it"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # re-share tied parameters (the file stores them once)
    state = model.state_dict()
    for dropped, kept in meta.get("tied", {}).items():
        if state[dropped].data_ptr() != state[kept].data_ptr():
            with torch.no_grad():
                state[dropped].copy_(tensors[kept])
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(directory), local_files_only=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _instantiate(cls: type, config: Any, dtype: torch.dtype) -> nn.Module:
    """cls(config) without spending time on random initialisation when transformers allows it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        return cls(config).to(dtype)
    with no_init_weights():
        model = cls(config)
    return model.to(dtype)


def export_peft(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    base_directory: str | os.PathLike[str] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write the model's EoRA paths as a PEFT LoRA adapter (lora_alpha = r, scale 1).

    Args:
        model: a model holding CompensatedLinear layers whose bases are nn.Linear (quantised or
            pruned weights; PEFT's LoRA wraps nn.Linear only).
        directory: adapter output (adapter_config.json + adapter_model.safetensors).
        base_directory: also write the compressed base model (the layers without their EoRA
            paths) there, loadable by stock `from_pretrained`; the adapter then points to it.
        tokenizer: saved with the base model.
    """
    from rankwise import surgery
    from rankwise.compress.eora import CompensatedLinear
    from rankwise.io import save_tensors, write_json

    comps = {f: m for f, m in model.named_modules() if isinstance(m, CompensatedLinear)}
    if not comps:
        raise ValueError("the model has no EoRA paths to export: run compensate_ first")
    factorised = [f for f, m in comps.items() if not isinstance(m.base_layer, nn.Linear)]
    if factorised:
        raise ValueError(
            f"{factorised[0]!r} compensates a factorised layer, which PEFT's LoRA cannot wrap: "
            "save it with save_compressed instead (it keeps the EoRA path natively)"
        )
    if _layer_specs(model).keys() - comps.keys():
        raise ValueError("the model also has factorised layers that stock transformers cannot load: "
                         "use save_compressed")
    tensors: dict[str, torch.Tensor] = {}
    ranks = {}
    for fqn, m in comps.items():
        tensors[f"base_model.model.{fqn}.lora_A.weight"] = m.lora_A.weight.detach()
        tensors[f"base_model.model.{fqn}.lora_B.weight"] = m.lora_B.weight.detach()
        ranks[fqn] = m.rank
    r = max(ranks.values())
    pattern = {f: k for f, k in ranks.items() if k != r}
    base_name = str(base_directory) if base_directory is not None else getattr(
        getattr(model, "config", None), "_name_or_path", None)
    is_causal = type(model).__name__.endswith("ForCausalLM")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if is_causal else "FEATURE_EXTRACTION",
        "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(comps), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "base_model_name_or_path": base_name,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    write_json(directory / "adapter_config.json", config)
    if base_directory is not None:
        with surgery.replaced(model, {f: m.base_layer for f, m in comps.items()}):
            save_compressed(model, base_directory, tokenizer=tokenizer)
    return directory
