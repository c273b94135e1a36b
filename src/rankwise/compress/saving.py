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
                                CompressionReport, and "files": the SHA-256 and size of every
                                other file (checked on load); written last

The directory is built beside its destination and published by one rename
(rankwise.io.publish_dir): a save killed at any point leaves the previous directory or the new
one. The marker is validated field by field before any layer is allocated.

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
        directory: created if missing. The directory is built beside it and published by one
            rename (rankwise.io.publish_dir): a crash leaves the old copy or the new one; other
            files already in it are kept.
        tokenizer: saved alongside when given (so `rankwise eval DIR` finds it).
        report: the CompressionReport (or its dict) to record.
    """
    from rankwise import __version__
    from rankwise.io import (
        digest_files,
        publish_dir,
        read_json,
        save_tensors,
        verify_files,
        write_json,
        write_text,
    )
    from rankwise.stages import check_savable

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        raise TypeError(
            f"save_compressed needs a Hugging Face model with a .config, got {type(model).__name__}: "
            "save a plain module's state_dict with rankwise.io.save_tensors instead"
        )
    check_savable(model)
    directory = Path(directory)
    specs = _layer_specs(model)
    if report is not None and hasattr(report, "to_dict"):
        report = report.to_dict()
    dtype = next(model.parameters()).dtype

    def verify(tmp: Path) -> None:
        verify_files(tmp, read_json(tmp / MARKER)["files"], marker=MARKER, full=False)

    with publish_dir(directory, verify=verify) as tmp:
        cfg = json.loads(config.to_json_string(use_diff=True))
        cfg["architectures"] = [type(model).__name__]
        cfg = hf_guard.guard_config(cfg, specs)  # plain transformers refuses it, naming rankwise.load_model
        write_text(tmp / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "to_json_string"):
            write_text(tmp / "generation_config.json", gen.to_json_string(use_diff=True))
        state, tied = _dedupe(model.state_dict())
        save_tensors(tmp / WEIGHTS, state, metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_json(tmp / MARKER, {  # written last, with the checksum of every other file
            "format": FORMAT, "rankwise_version": __version__, "architecture": type(model).__name__,
            "dtype": str(dtype).removeprefix("torch."), "layers": specs, "tied": tied, "report": report,
            "files": digest_files(tmp),
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
    from rankwise.io import load_tensors, read_json, recover, verify_files

    directory = Path(directory)
    recover(directory)  # a save killed between its two renames: put the old copy back
    if not is_compressed_dir(directory):
        raise FileNotFoundError(
            f"{directory} has no {MARKER}: it was not written by save_compressed (load it with "
            "rankwise.load_model, or compress a model first)"
        )
    meta = _check_marker(read_json(directory / MARKER), directory / MARKER)
    if "files" in meta:  # the files this load reads (tokenizer files may be edited freely)
        verify_files(directory, meta["files"], marker=MARKER,
                     only=lambda name: name in _CHECKED or name.endswith(".safetensors"))
    saved_dtype = getattr(torch, meta["dtype"])
    cls = _architecture(meta["architecture"])
    config = hf_guard.read_config(directory)
    model = _instantiate(cls, config, saved_dtype)
    for fqn, spec in meta["layers"].items():
        _check_slot(model, fqn, spec, directory / MARKER)
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
    tied = set(meta["tied"])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS} does not match the recorded structure (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): the directory is corrupt or mixed; re-save it"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # re-share tied parameters (the file stores them once)
    state = model.state_dict()
    for dropped, kept in meta["tied"].items():
        if dropped not in state or kept not in tensors:
            raise ValueError(f"{directory / MARKER} ties {dropped!r} to {kept!r}, which the model or the "
                             "weights lack: the directory is corrupt; re-save it")
        if state[dropped].data_ptr() != state[kept].data_ptr():
            with torch.no_grad():
                state[dropped].copy_(tensors[kept])
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(directory), local_files_only=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


_DTYPES = ("float32", "float16", "bfloat16", "float64")
_CHECKED = ("config.json", "generation_config.json")


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"{path} is malformed ({what}): the file is corrupt or was edited; re-save the model")


def _check_marker(meta: Any, path: Path) -> dict[str, Any]:
    """Types and ranges of every field of the marker, before anything is allocated."""
    if not isinstance(meta, dict):
        raise _bad(path, f"a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; this rankwise reads {FORMAT}")
    meta.setdefault("dtype", "float32")
    meta.setdefault("tied", {})
    if not isinstance(meta.get("architecture"), str):
        raise _bad(path, "'architecture' is not a class name")
    if meta["dtype"] not in _DTYPES:
        raise _bad(path, f"'dtype' {meta['dtype']!r} is not one of {list(_DTYPES)}")
    tied = meta["tied"]
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise _bad(path, "'tied' is not an object of names")
    layers = meta.get("layers")
    if not isinstance(layers, dict):
        raise _bad(path, "'layers' is not an object")
    for fqn, spec in layers.items():
        _check_spec(fqn, spec, path)
    return meta


def _int(spec: dict[str, Any], key: str, fqn: str, path: Path, hi: int | None = None) -> int:
    v = spec.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1 or (hi is not None and v > hi):
        bound = f" in [1, {hi}]" if hi is not None else " >= 1"
        raise _bad(path, f"{fqn!r}: {key!r} is {v!r}, not an int{bound}")
    return v


def _check_spec(fqn: str, spec: Any, path: Path) -> None:
    if not isinstance(spec, dict) or spec.get("type") not in ("factorized", "compensated"):
        raise _bad(path, f"{fqn!r}: not a factorized/compensated layer record")
    n, m = _int(spec, "in", fqn, path), _int(spec, "out", fqn, path)
    _int(spec, "rank", fqn, path, min(n, m))
    if spec["type"] == "factorized":
        if not isinstance(spec.get("bias"), bool):
            raise _bad(path, f"{fqn!r}: 'bias' is not true/false")
        return
    base = spec.get("base")
    if not isinstance(base, dict) or base.get("type") not in ("factorized", "dense") \
            or not isinstance(base.get("bias"), bool):
        raise _bad(path, f"{fqn!r}: 'base' is not a factorized/dense layer record")
    if base["type"] == "factorized":
        _int(base, "rank", fqn, path, min(n, m))


def _check_slot(model: nn.Module, fqn: str, spec: dict[str, Any], path: Path) -> None:
    """The recorded layer must replace an nn.Linear of the same shape in the rebuilt model."""
    try:
        module = model.get_submodule(fqn)
    except AttributeError:
        raise _bad(path, f"the model has no layer {fqn!r}") from None
    if not isinstance(module, nn.Linear) or (module.in_features, module.out_features) != (spec["in"], spec["out"]):
        raise _bad(path, f"{fqn!r} is recorded as {spec['out']}x{spec['in']} but the model's layer there is "
                         f"{type(module).__name__} {getattr(module, 'out_features', '?')}x"
                         f"{getattr(module, 'in_features', '?')}")


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
            Both directories are published atomically (rankwise.io.publish_dir); the adapter
            also gets rankwise_manifest.json (checksums; PEFT ignores the file).
        tokenizer: saved with the base model.
    """
    from rankwise import io, surgery
    from rankwise.compress.eora import CompensatedLinear
    from rankwise.stages import check_savable

    check_savable(model, "export_peft")
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
    if base_directory is not None:
        io.check_output(base_directory, sources=[directory], flag="the base directory")
    with io.publish_dir(directory) as tmp:
        io.save_tensors(tmp / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
        io.write_json(tmp / "adapter_config.json", config)
        io.write_json(tmp / io.MANIFEST, {"format": "rankwise-manifest", "files": io.digest_files(tmp)})
    if base_directory is not None:
        with surgery.replaced(model, {f: m.base_layer for f, m in comps.items()}):
            save_compressed(model, base_directory, tokenizer=tokenizer)
    return directory
