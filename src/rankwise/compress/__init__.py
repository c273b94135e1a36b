"""rankwise.compress: post-training low-rank compression of linear layers.

    import rankwise
    from rankwise.compress import compress_, save_compressed, load_compressed
    model = rankwise.load_model("smollm2-135m"); tok = rankwise.load_tokenizer("smollm2-135m")
    report = compress_(model, method="svd-llm", ratio=0.2, tokenizer=tok)
    print(report.summary())
    save_compressed(model, "out/", tokenizer=tok, report=report)
    model = load_compressed("out/")            # or rankwise.load_model("out/")

Methods are presets over (whitener x allocation x update), entries of the "compressor"
registry (`rankwise.registry`; `presets.METHODS` is a view): lord, fwsvd, asvd, svd_llm,
svd_llm_update, svd_llm_seq, welore, drank, afm, and the compensation eora (`compensate_`);
dashes are accepted (svd-llm). Options are one frozen `CompressConfig`. Models that do not fit
in memory compress block by block from their files (`compress_streaming`). Every
factorisation goes through rankwise.linalg.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "compress_": "rankwise.compress.api",
    "compensate_": "rankwise.compress.compensate",
    "find_targets": "rankwise.compress.calibration",
    "calibration_ids": "rankwise.compress.calibration",
    "CompressConfig": "rankwise.compress.config",
    "CompensateConfig": "rankwise.compress.config",
    "compress_streaming": "rankwise.compress.streaming",
    "compensate_streaming": "rankwise.compress.streaming",
    "build_compressor": "rankwise.compress.api",
    "CompressionReport": "rankwise.compress.report",
    "LayerRecord": "rankwise.compress.report",
    "save_compressed": "rankwise.compress.saving",
    "load_compressed": "rankwise.compress.saving",
    "is_compressed_dir": "rankwise.compress.saving",
    "export_peft": "rankwise.compress.saving",
    "Compressor": "rankwise.compress.base",
    "InputStats": "rankwise.compress.base",
    "WhitenedSVD": "rankwise.compress.svd",
    "SVDConfig": "rankwise.compress.svd",
    "FeatureCompressor": "rankwise.compress.features",
    "CompensatedLinear": "rankwise.compress.eora",
    "eora_factors": "rankwise.compress.eora",
    "squeeze_lora": "rankwise.compress.squeeze",
    "squeeze_peft_adapter": "rankwise.compress.squeeze",
    "allocate_ranks": "rankwise.compress.allocate",
    "ALLOCATIONS": "rankwise.compress.allocate",
    "METHODS": "rankwise.compress.presets",
    "get_preset": "rankwise.compress.presets",
    "method_names": "rankwise.compress.presets",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'rankwise.compress' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
