"""Param-group options of `LowRankOptimizer`: defaults, allowed values, validation, dtypes.

Every named method is a setting of a few axes (see `rankwise.optim.lowrank`); this module
holds the keys of those axes, their defaults and the checks that refuse a bad group before
any step runs.
"""

from __future__ import annotations

from typing import Any

import torch

from rankwise.optim import functional as ofn
from rankwise.optim.projector import PROJECTORS, check_matrix

GROUP_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "adam_style": "torch",
    "projector": None,
    "rank": None,
    "rank_fraction": None,
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_side": "std",
    "proj_bits": None,
    "proj_group_size": 256,
    "proj_options": None,
    "rule": "adam",
    "state_bits": 32,
    # None: moments and basis in the parameter's dtype (galore-torch and torch.optim.AdamW do
    # the same: a bf16 model keeps bf16 state); "float32": fp32 state and fp32 arithmetic.
    "state_dtype": None,
    # bf16 parameters only: write W + update back by stochastic rounding (unbiased), so that
    # updates below half a bf16 ulp of W are not all lost (Zamirai et al. 2020, §3).
    "stochastic_rounding": False,
    "block_size": 256,
    "min_8bit_size": 4096,
    # FRUGAL block-wise (Zmushko et al. 2024, §4): every update_proj_gap steps a fraction
    # block_density of the group's matrices is chosen (in this order) for AdamW on the whole
    # matrix; the others take the state-free `residual` rule. None: off.
    "block_order": None,
    "block_density": 0.25,
    "residual": "drop",
    "residual_scale": 1.0,
    "scaling": None,
    "limiter": False,
    "limiter_gamma": 1.01,
    "scale_front": False,
    # Measured (benchmarks/results/optim.md, tiny Llama, val loss): for GaLore (SVD) resetting
    # the moments on a subspace change is best (4.94 vs keep 5.10, reproject 5.06); for DCT the
    # three are within 0.07 (reproject 5.40, keep 5.41, reset 5.47). Presets keep their papers'
    # ("keep" for GaLore: pass moment_policy="keep" to reproduce galore-torch).
    "moment_policy": "reset",
    "adafactor_beta1": None,
    "decay_rate": -0.8,
    "clip_threshold": 1.0,
    "seed": 0,
    "nonfinite": "raise",
}

CHOICES: dict[str, tuple[Any, ...]] = {
    "adam_style": ofn.ADAM_STYLES,
    "rule": ("adam", "adafactor", "sgd"),
    "state_bits": (32, 8),
    "state_dtype": (None, "float32", "bfloat16", "float16"),
    "stochastic_rounding": (False, True),
    "residual": ("drop", "fira", "sign", "sgd"),
    "block_order": (None, "random", "ascending", "descending", "mirror"),
    "scaling": (None, "channel", "tensor"),
    "moment_policy": ("keep", "reproject", "reset"),
    "nonfinite": ("raise", "skip"),
}


def resolve_rank(shape: tuple[int, ...], group: dict[str, Any]) -> int:
    """The integer rank of a parameter in a projected group (``rank`` or ``rank_fraction``)."""
    if group.get("rank") is not None:
        return group["rank"]
    return max(1, round(float(group["rank_fraction"]) * min(shape)))


def normalise(group: dict[str, Any]) -> dict[str, Any]:
    """Accept galore-torch's ``proj_type`` and torch dtypes for ``state_dtype`` (stored as a
    string, so that ``state_dict()`` stays plain data)."""
    group = dict(group)
    if "proj_type" in group:  # galore-torch's name
        group["proj_side"] = group.pop("proj_type")
    dt = group.get("state_dtype")
    if isinstance(dt, torch.dtype):
        group["state_dtype"] = str(dt).removeprefix("torch.")
    has_rank = group.get("rank") is not None or group.get("rank_fraction") is not None
    if group.get("projector") is None and has_rank and group.get("block_order") is None:
        group["projector"] = "svd"
    return group


def state_dtype(p: torch.Tensor, group: dict[str, Any]) -> torch.dtype:
    """The dtype of `p`'s moments (and of the arithmetic on them): the parameter's own dtype
    unless ``state_dtype`` says otherwise; fp32 whenever moments are 8-bit codes (they are
    decoded to fp32)."""
    if group["state_bits"] == 8 or not p.is_floating_point():
        return torch.float32
    name = group["state_dtype"]
    return p.dtype if name is None else getattr(torch, name)


def validate(group: dict[str, Any], index: int) -> None:
    """Raise a ValueError naming the fix for a group that cannot run."""
    for key, choices in CHOICES.items():
        if group[key] not in choices:
            raise ValueError(f"group {index}: {key}={group[key]!r} is not one of {choices}")
    if group["lr"] < 0 or not all(0.0 <= b < 1.0 for b in group["betas"]):
        raise ValueError(f"group {index}: need lr >= 0 and betas in [0, 1), got "
                         f"lr={group['lr']}, betas={group['betas']}")
    if group["stochastic_rounding"]:
        bad = [tuple(p.shape) for p in group["params"] if p.dtype == torch.float16]
        if bad:
            raise ValueError(f"group {index}: stochastic_rounding supports bf16 (and fp32, where "
                             f"it is a no-op) parameters, not fp16 ones {bad[:3]}")
    kind = group["projector"]
    if group["block_order"] is not None:
        if kind is not None or group["residual"] not in ("sign", "sgd", "drop"):
            raise ValueError(f"group {index}: block_order={group['block_order']!r} (FRUGAL "
                             "block-wise) selects whole matrices: use projector=None (no rank) "
                             "and residual 'sign', 'sgd' or 'drop'")
        if not 0.0 < float(group["block_density"]) <= 1.0:
            raise ValueError(f"group {index}: block_density {group['block_density']} must be in "
                             "(0, 1]")
    if kind is None:
        return
    if kind not in PROJECTORS:
        raise ValueError(f"group {index}: projector {kind!r} is unknown: choose one of "
                         f"{sorted(PROJECTORS)}")
    rank, frac = group["rank"], group["rank_fraction"]
    if (rank is None) == (frac is None):
        raise ValueError(f"group {index}: a projected group needs exactly one of rank (int) or "
                         f"rank_fraction (0 < f <= 1), got rank={rank}, rank_fraction={frac}")
    if frac is not None and not 0.0 < float(frac) <= 1.0:
        raise ValueError(f"group {index}: rank_fraction {frac} must be in (0, 1]")
    if int(group["update_proj_gap"]) < 1:
        raise ValueError(f"group {index}: update_proj_gap must be >= 1")
    if group["scaling"] is not None and group["residual"] != "drop":
        raise ValueError(f"group {index}: scaling={group['scaling']!r} (APOLLO) already updates "
                         "the whole gradient: use residual='drop'")
    if kind == "randk" and (group["scaling"] is not None or group["rule"] == "adafactor"
                            or group["moment_policy"] == "reproject"):
        raise ValueError(f"group {index}: projector='randk' (FRUGAL's per-entry RandK) keeps "
                         "K separate entries: use rule 'adam' or 'sgd', no scaling, and "
                         "moment_policy 'reset' or 'keep'")
    if group["rule"] == "adafactor" and (
        group["residual"] != "drop" or group["scaling"] is not None or group["state_bits"] != 32
        or group["moment_policy"] == "reproject"
    ):
        raise ValueError(f"group {index}: rule='adafactor' supports residual='drop', no scaling, "
                         "32-bit state and moment_policy 'keep' or 'reset'")
    for i, p in enumerate(group["params"]):
        shape, what = tuple(p.shape), f"parameter {i} of group {index} (projector={kind!r})"
        check_matrix(shape, resolve_rank(shape, group) if len(shape) == 2 else 1, what=what)
