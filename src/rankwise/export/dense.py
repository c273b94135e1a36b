"""Merge factorised layers back into dense weights: a standard Hugging Face checkpoint.

A `FactorizedLinear` computes y = B (A x) + b, i.e. the dense layer W = B A; an EoRA
`CompensatedLinear` adds a low-rank path, W = W_c + B' A' (EoRA, Liu et al. 2024, eq. 1). Both
become one `nn.Linear` holding that product, so the model is again the stock architecture and
`save_pretrained` writes a checkpoint any runtime that reads Hugging Face weights can load.
The merge keeps the compressed model's outputs (up to float rounding) but none of its speed or
size: the dense checkpoint is as large and as slow as the original model.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.export.publish import check_target, published_dir

logger = logging.getLogger(__name__)

__all__ = ["export_dense", "merge_factors_"]

# Largest |logit| difference between the merged and the factorised model that the check
# accepts, relative to the logits' scale (float32 products in another order: ~1e-6 observed).
_TOLERANCE = 1e-4
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")


def _dense_of(module: nn.Module) -> nn.Linear | None:
    """The nn.Linear equal to a factorised / compensated layer, or None for any other module."""
    from rankwise.compress.eora import CompensatedLinear
    from rankwise.layers.factorized import FactorizedLinear

    if isinstance(module, FactorizedLinear):
        return module.to_dense()
    if isinstance(module, CompensatedLinear):
        base = module.base_layer
        dense = _dense_of(base) if isinstance(base, FactorizedLinear) else base
        if not isinstance(dense, nn.Linear):
            raise TypeError(f"cannot merge an EoRA path over a {type(base).__name__}")
        merged = nn.Linear(module.in_features, module.out_features, bias=dense.bias is not None,
                           device=dense.weight.device, dtype=dense.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(dense.weight + module.lora_B.weight @ module.lora_A.weight)
            if dense.bias is not None:
                merged.bias.copy_(dense.bias)
        return merged
    return None


def merge_factors_(model: nn.Module) -> int:
    """Replace every factorised / compensated layer of `model` by its dense nn.Linear, in place.

    Returns the number of layers merged (0 leaves the model untouched).
    """
    from rankwise import surgery

    merges: dict[str, nn.Linear] = {}
    inside: list[str] = []
    for fqn, module in model.named_modules():
        if any(fqn.startswith(p + ".") for p in inside):
            continue  # the base of a compensated layer is merged with it
        dense = _dense_of(module)
        if dense is not None:
            merges[fqn] = dense
            inside.append(fqn)
    for fqn, dense in merges.items():
        surgery.replace_module(model, fqn, dense.requires_grad_(False))
    return len(merges)


def _load(src: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None) from a path / bundled name, or (src, None) for a module."""
    if isinstance(src, nn.Module):
        return src, None
    from rankwise.models import load_model

    return load_model(src), _load_tokenizer(src)


def _load_tokenizer(src: str | os.PathLike[str]) -> Any:
    """The tokenizer saved with `src`, or None (with a warning) when there is none."""
    from rankwise.models import load_tokenizer

    path = Path(src)
    if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        logger.warning("%s has no tokenizer files: exporting the model only", src)
        return None
    return load_tokenizer(src)


def export_dense(
    src: str | os.PathLike[str] | nn.Module,
    out: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    check: bool = True,
) -> dict[str, Any]:
    """Write `src` with its factors merged as a standard Hugging Face checkpoint at `out`.

    Args:
        src: a compressed directory (or anything `rankwise.load_model` takes), or a model.
        out: the checkpoint directory (published atomically; refused if non-empty unless
            `overwrite`).
        tokenizer: saved alongside (default: the one found with `src`).
        check: reload `out` with plain `transformers.AutoModel*.from_pretrained` and compare
            its logits with the factorised model's on a few tokens; ValueError beyond 1e-4
            relative.

    Returns:
        A summary: merged layer count, parameters before and after, the check's max difference.
    """
    from rankwise.models import model_kind

    out = check_target(out, overwrite=overwrite)
    model, found_tokenizer = _load(src)
    tokenizer = tokenizer if tokenizer is not None else found_tokenizer
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"export_dense needs a Hugging Face model, got {type(model).__name__}")
    ids = _probe_ids(model)
    reference = _outputs(model, ids) if check else None
    before = _unique_parameters(model)
    # a model passed in by the caller stays factorised: merge a copy of it
    dense_model = copy.deepcopy(model) if isinstance(src, nn.Module) else model
    count = merge_factors_(dense_model)
    with published_dir(out) as tmp:
        dense_model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    summary: dict[str, Any] = {
        "format": "dense", "out": str(out), "merged_layers": count,
        "parameters_factorised": before, "parameters_dense": _unique_parameters(dense_model),
    }
    if check:
        summary["max_abs_logit_diff"] = _check(out, model_kind(dense_model), ids, reference)
    return summary


def _probe_ids(model: nn.Module) -> torch.Tensor:
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 100)
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def _outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _check(out: Path, kind: str, ids: torch.Tensor, reference: torch.Tensor) -> float:
    """Reload `out` with plain transformers (no rankwise code) and compare outputs."""
    import transformers

    auto = {"causal-lm": transformers.AutoModelForCausalLM,
            "sequence-classification": transformers.AutoModelForSequenceClassification}.get(
        kind, transformers.AutoModel)
    plain = auto.from_pretrained(str(out), local_files_only=True).eval()
    diff = float((_outputs(plain, ids) - reference).abs().max())
    scale = float(reference.abs().max()) or 1.0
    if diff > _TOLERANCE * scale:
        raise ValueError(f"the dense checkpoint at {out} differs from the factorised model by "
                         f"{diff:.3g} (logits up to {scale:.3g}): please report this")
    return diff


def _unique_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
