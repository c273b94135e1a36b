"""Files for streaming compression: read a model's safetensors a few tensors at a time, build it
on the meta device, and write one safetensors file from per-block pieces without holding it.

* `ModelFiles` indexes the tensors of a Hugging Face directory (one file or shards) and reads a
  given set of them through `safetensors.safe_open` (memory-mapped; the file is opened per
  read and closed after, so pages of blocks already done leave the process);
* `empty_model` builds the architecture with every *parameter* on the meta device (no memory)
  and every buffer real (rotary frequencies are computed, not stored);
* `write_safetensors` writes the safetensors format (8-byte header length, JSON header with
  dtype / shape / data offsets, then raw little-endian data) tensor by tensor from loaders, so
  the largest thing in memory is one tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ModelFiles", "empty_model", "resolve_source", "write_safetensors"]

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
           torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
           torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def resolve_source(name_or_path: str | os.PathLike[str]) -> Path:
    """The safetensors directory of a bundled model name or a local Hugging Face directory."""
    from rankwise import models

    directory, gguf = models._resolve(name_or_path)
    if gguf is not None:  # a bundled GGUF: its float32 safetensors conversion (made once)
        directory = models._cached_conversion(directory, gguf, models._BUNDLED.get(str(name_or_path)), None)
    directory = Path(directory)
    if not directory.is_dir() or not any(directory.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{name_or_path} has no *.safetensors files: streaming reads safetensors only "
            "(re-save the model with save_pretrained(safe_serialization=True))")
    return directory


class ModelFiles:
    """Where each tensor of a model directory lives, and reads of a few of them at a time."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        self.where: dict[str, Path] = {}
        for file in sorted(self.directory.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    self.where[key] = file

    def read(self, keys: list[str], *, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """`{key: tensor}` (floating tensors cast to `dtype`); missing keys raise, naming them."""
        from safetensors import safe_open

        missing = [k for k in keys if k not in self.where]
        if missing:
            raise KeyError(f"{self.directory} has no tensors {missing[:3]}: the files do not match "
                           "config.json (a partial or different checkpoint)")
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.where[k], []).append(k)
        out = {}
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for k in names:
                    t = handle.get_tensor(k)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[k] = t.to(device)
        return out


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every nn.Parameter registered inside is moved to the meta device (buffers stay real)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":  # a tied parameter stays shared
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(directory: str | os.PathLike[str]) -> nn.Module:
    """The architecture of `directory`'s config.json with parameters on meta (eval mode)."""
    from transformers import AutoConfig

    from rankwise.compress.saving import _architecture

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    names = getattr(config, "architectures", None) or []
    if not names:
        raise ValueError(f"{directory}/config.json names no architectures: streaming needs the "
                         "model class (re-save the model with save_pretrained)")
    cls = _architecture(names[0])
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext  # type: ignore[assignment]
    with _parameters_on_meta(), no_init_weights():
        model = cls(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # share tied parameters as a loaded model does
    return model.eval()


def write_safetensors(path: str | os.PathLike[str],
                      entries: Mapping[str, tuple[torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file from ``{name: (dtype, shape, load)}``; `load()` is called once
    per tensor, in order, and its result written and dropped (memory: one tensor)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape, _) in entries.items():
        if dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {dtype} cannot be written as safetensors")
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, (dtype, shape, load) in entries.items():
            t = load().detach().to("cpu").contiguous()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: got {t.dtype} {tuple(t.shape)}, declared {dtype} {tuple(shape)}")
            if t.numel():
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
        fh.flush()
        os.fsync(fh.fileno())
