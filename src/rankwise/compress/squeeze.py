"""LoRA-Squeeze: compress a trained LoRA adapter to a lower rank (LoRA-Squeeze: truncated SVD of the merged update B A, eq. 1 below).

The update of one adapted linear is `Delta W = s B A` (s = lora_alpha / r, B (m, r_src),
A (r_src, n)). Its best rank-r_t approximation (Eckart-Young) is found without forming the
(m, n) product: QR `B = Q_B R_B`, `A^T = Q_A R_A`, SVD of the small core
`K = R_B R_A^T = U_K S V_K^T` (r_src x r_src), and

    Delta W = s (Q_B U_K) S (Q_A V_K)^T,                                                (1)

cost O((m + n) r_src^2 + r_src^3) instead of O(m n r). The new factors fold the scale in,
`B' = Q_B U_K[:, :r_t] (s S_t)^1/2`, `A' = (s S_t)^1/2 V_K[:, :r_t]^T Q_A^T`, and are written
with `lora_alpha = r_t` (PEFT scale 1), so base + new adapter = `W x + Delta W_t x` exactly.

`squeeze_peft_adapter` applies this to a PEFT LoRA directory (adapter_config.json +
adapter_model.safetensors) and writes a new one; per-module ranks go in `rank_pattern`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["squeeze_lora", "squeeze_peft_adapter"]


def _core_svd(B: torch.Tensor, A: torch.Tensor):
    """(Q_B U_K (m, k), S (k,), (Q_A V_K)^T (k, n)) with `B A = Q_B U_K S V_K^T Q_A^T`."""
    from rankwise import linalg

    Q_B = linalg.orthonormalize(B)  # (m, r) orthonormal columns spanning col(B)
    Q_A = linalg.orthonormalize(A.T)  # (n, r)
    R_B = Q_B.T @ B  # (r, r); Q_B Q_B^T B = B
    R_A = Q_A.T @ A.T  # (r, r)
    U_K, S, Vh_K = linalg.svd(R_B @ R_A.T)
    return Q_B @ U_K, S, Vh_K @ Q_A.T


def squeeze_lora(
    B: torch.Tensor, A: torch.Tensor, rank: int, *, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """B' (m, rank), A' (rank, n) with `B' A'` = best rank-`rank` approximation of `scale B A`.

    Args:
        B: lora_B (m, r_src). A: lora_A (r_src, n).
        rank: target rank r_t (1 <= r_t <= r_src).
        scale: the adapter's scale lora_alpha / r_src (folded into the new factors).

    Returns factors in the dtype of B; apply them with scale 1 (lora_alpha = r_t).
    """
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"expected lora_B (m, r) and lora_A (r, n), got {tuple(B.shape)} and {tuple(A.shape)}")
    r_src = A.shape[0]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r_src:
        raise ValueError(f"target rank {rank!r} must be an int in [1, {r_src}] (the adapter's rank)")
    if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
        raise ValueError("adapter factors contain NaN or Inf: the adapter is corrupt")
    work = torch.float64
    U, S, Vh = _core_svd(B.detach().to(work), A.detach().to(work))
    root = (abs(scale) * S[:rank]).sqrt()
    sign = -1.0 if scale < 0 else 1.0
    B_new = sign * U[:, :rank] * root[None, :]
    A_new = root[:, None] * Vh[:rank]
    return B_new.to(B.dtype), A_new.to(A.dtype)


_PAIR = re.compile(r"^(?P<prefix>.+)\.lora_(?P<which>[AB])(?P<adapter>\.[^.]+)?\.weight$")


def squeeze_peft_adapter(
    src: str | os.PathLike[str], out: str | os.PathLike[str], rank: int
) -> dict[str, Any]:
    """Squeeze every LoRA pair of a PEFT adapter directory to `rank`; write a new adapter.

    Modules whose rank is already <= `rank` are copied (with the scale folded in). Returns a
    summary `{module: (r_src, r_new)}` plus parameter counts before/after.
    """
    from rankwise.io import (
        MANIFEST,
        check_output,
        digest_files,
        load_tensors,
        publish_dir,
        read_json,
        save_tensors,
        verify_manifest,
        write_json,
    )

    src, out = Path(src), Path(out)
    check_output(out, sources=[src])
    verify_manifest(src)
    config = read_json(src / "adapter_config.json")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{src} holds a {config.get('peft_type')} adapter: only LoRA can be squeezed")
    if config.get("use_dora"):
        raise ValueError(f"{src} is a DoRA adapter: its magnitude vector cannot be squeezed this way")
    tensors = load_tensors(src / "adapter_model.safetensors")
    pairs: dict[str, dict[str, str]] = {}
    for key in tensors:
        m = _PAIR.match(key)
        if m:
            pairs.setdefault(m["prefix"], {})[m["which"]] = key
    if not pairs:
        raise ValueError(f"{src}/adapter_model.safetensors has no lora_A/lora_B weights")
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora"))
    new: dict[str, torch.Tensor] = {k: v for k, v in tensors.items() if not _PAIR.match(k)}
    summary: dict[str, Any] = {"modules": {}, "params_before": 0, "params_after": 0}
    new_pattern: dict[str, int] = {}
    for prefix, keys in sorted(pairs.items()):
        if set(keys) != {"A", "B"}:
            raise ValueError(f"{prefix} has only lora_{next(iter(keys))}: the adapter is incomplete")
        A, B = tensors[keys["A"]], tensors[keys["B"]]
        r_src = A.shape[0]
        alpha = _pattern_value(prefix, alpha_pattern, alpha_default)
        scale = alpha / (math.sqrt(r_src) if use_rslora else r_src)
        r_new = min(rank, r_src)
        B2, A2 = squeeze_lora(B, A, r_new, scale=scale)
        new[keys["A"]], new[keys["B"]] = A2.contiguous(), B2.contiguous()
        summary["modules"][prefix] = (r_src, r_new)
        summary["params_before"] += A.numel() + B.numel()
        summary["params_after"] += A2.numel() + B2.numel()
        name = prefix.removeprefix("base_model.model.")
        new_pattern[name] = r_new
    ranks = set(new_pattern.values())
    config = dict(config)
    config["r"] = max(ranks)
    config["lora_alpha"] = max(ranks)
    config["use_rslora"] = False
    config["rank_pattern"] = {k: v for k, v in new_pattern.items() if v != config["r"]}
    config["alpha_pattern"] = dict(config["rank_pattern"])  # alpha = r everywhere: scale 1
    with publish_dir(out, sources=[src]) as tmp:  # atomic; never into its own input
        save_tensors(tmp / "adapter_model.safetensors", new, metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", config)
        write_json(tmp / MANIFEST, {"format": "rankwise-manifest", "files": digest_files(tmp)})
    return summary


def _pattern_value(prefix: str, pattern: dict[str, Any], default: float) -> float:
    """PEFT's rank/alpha_pattern lookup: a key matches when the module name ends with it."""
    name = prefix.removeprefix("base_model.model.")
    for key, value in pattern.items():
        if name == key or name.endswith("." + key) or re.fullmatch(key, name):
            return float(value)
    return default
