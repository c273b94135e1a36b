"""The GGUF conversion and its content-keyed cache of float32 safetensors directories.

Transformers dequantises a GGUF checkpoint to float32 (this needs the ``gguf`` extra: gguf +
accelerate), which takes ~20 s for SmolLM2, so the first load converts it once and caches a plain
float32 safetensors Hugging Face directory; later loads take seconds.

Cache: ``$RANKWISE_CACHE``, else ``$XDG_CACHE_HOME/rankwise``, else ``~/.cache/rankwise``;
converted models live in ``models/NAME-HASH`` where HASH covers the GGUF file's content (its
SHA-256) and, for a bundled model, the package version. The directory is built beside its target
and moved into place with one ``os.replace``, so it is either complete or absent; a cache that
fails the cheap integrity check is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from rankwise._filehash import file_sha256
from rankwise.models.catalogue import ModelInfo

# One logger for the whole rankwise.models package, so its records keep their name.
logger = logging.getLogger("rankwise.models")

# Bump when the layout of a cached model directory changes: old caches are then ignored.
_CACHE_FORMAT = 1


def cache_root() -> Path:
    """Root of rankwise's cache: $RANKWISE_CACHE, $XDG_CACHE_HOME/rankwise or ~/.cache/rankwise."""
    if os.environ.get("RANKWISE_CACHE"):
        return Path(os.environ["RANKWISE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "rankwise"
    return Path.home() / ".cache" / "rankwise"


def _cache_dir_for(
    source: Path | str, gguf: str, bundled: ModelInfo | None, cache_dir: Any
) -> Path:
    """models/NAME-HASH, HASH over the GGUF file's content and (bundled) the package version.

    No path and no modification time enter the key: two venvs, or two copies of one file, share
    one converted model (the file lock in `_cached_conversion` serialises their first use).
    """
    source = Path(source)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    if bundled is not None:
        try:
            version = importlib.metadata.version(bundled.pip_name)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        stem = bundled.name
    else:
        stem = re.sub(r"[^\w.-]+", "-", Path(gguf).stem).lower()
        version = ""
    content = file_sha256(source / gguf, memo_dir=root / "models" / ".sha256")
    key = f"{_CACHE_FORMAT}|{content}|{version}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    same = sorted(p for p in (root / "models").glob(f"*-{digest}") if p.is_dir())
    return same[0] if same else root / "models" / f"{stem}-{digest}"  # a renamed copy reuses it


def _looks_complete(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def _cached_conversion(
    source: Path | str,
    gguf: str,
    bundled: ModelInfo | None,
    cache_dir: Any,
    *,
    rebuild: bool = False,
) -> Path:
    """Return a float safetensors copy of `source/gguf`, converting it on first use."""
    from filelock import FileLock

    from rankwise.io import remove_dir

    target = _cache_dir_for(source, gguf, bundled, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time (e.g. two pytest-xdist workers): the second waits, then reuses.
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if target.exists():
            if not rebuild and _cache_is_loadable(target):
                return target
            if not rebuild:
                logger.warning("cached model %s is corrupt or incomplete: rebuilding it", target)
            remove_dir(target)
        _convert_gguf(Path(source), gguf, target)
    return target


def _cache_is_loadable(directory: Path) -> bool:
    """Cheap integrity check: config parses and every safetensors file opens and reads."""
    from safetensors import safe_open

    if not _looks_complete(directory):
        return False
    try:
        import json

        json.loads((directory / "config.json").read_text(encoding="utf-8"))
        for file in directory.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as fh:
                keys = list(fh.keys())
                if not keys:
                    return False
                fh.get_tensor(keys[-1])  # the last tensor sits at the end of the file
    except Exception as exc:  # noqa: BLE001 - any failure means "rebuild"
        logger.debug("cache check of %s failed: %s", directory, exc)
        return False
    return True


def _convert_gguf(source: Path, gguf: str, target: Path) -> None:
    """Dequantise `source/gguf` to float32 and save it (model + tokenizer) at `target` atomically."""
    logger.warning(
        "converting %s to float32 safetensors (one time, ~20-40 s) into %s", gguf, target
    )
    model, tokenizer = _dequantize_gguf(source, gguf)
    _strip_quantization(model)
    # Build beside the target, then one rename: the cache dir is complete or absent.
    from rankwise.io import publish_dir

    with publish_dir(target, merge=False) as tmp:  # also removes what a killed conversion left
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


def _dequantize_gguf(source: Path, gguf: str) -> tuple[Any, Any]:
    """Load `source/gguf` with transformers as a dense float32 causal LM, plus its tokenizer."""
    from rankwise._optional import require

    require("gguf", purpose=f"dequantising {gguf}")
    require("accelerate", purpose=f"dequantising {gguf}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:  # ask for dense weights up front where transformers supports it
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantise
        pass
    model = AutoModelForCausalLM.from_pretrained(
        str(source), gguf_file=gguf, dtype=torch.float32, local_files_only=True, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=gguf, local_files_only=True)
    return model, tokenizer


def _strip_quantization(model: Any) -> None:
    """Turn a dequantised GGUF model into a plain float model that save_pretrained accepts.

    Depending on the transformers version, a GGUF model keeps its quantizer, the
    `config.quantization_config` and `is_quantized` flags even after dequantising, and then
    save_pretrained refuses to serialise it. The weights themselves are dense float tensors
    (checked here) so the markers are dropped; the saved config then reloads as a plain model.
    """
    for name, param in model.named_parameters():
        if not param.dtype.is_floating_point:
            raise ValueError(
                f"{name} is still quantised ({param.dtype}) after loading the GGUF file: "
                "upgrade transformers, or install the `gguf` extra and retry"
            )
    if "hf_quantizer" in vars(model):
        del model.hf_quantizer
    for attr in ("quantization_method", "is_quantized"):
        if attr in vars(model):
            delattr(model, attr)
    for module in model.modules():
        config = getattr(module, "config", None)
        for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
            if cfg is None:
                continue
            for attr in ("quantization_config", "_is_quantized"):
                if attr in vars(cfg):
                    delattr(cfg, attr)
