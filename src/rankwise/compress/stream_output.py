"""The output directory of streaming compression (the `save_compressed` format, written piece
by piece): per-block safetensors files while blocks stream, then one model.safetensors
assembled tensor by tensor, config / tokenizer files and the marker written last.

The directory is published by rankwise.io.publish_dir, the one publisher of the codebase, held
open for the whole stream: its temporary sibling is where the blocks land, and leaving it
publishes (verify the marker's files, rename an old copy away, rename the new one in, delete
the old one) or, on `abort`, deletes the temporary. A writer killed at any point leaves the old
directory or the new one; one killed between the two renames is restored by the next publish,
load (`rankwise.io.recover`) or stream into the same directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.compress.stream_io import ModelFiles, write_safetensors

__all__ = ["Output"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
                    "added_tokens.json")


class _Aborted(Exception):
    """Thrown into the open publish_dir by `Output.abort`: publish nothing, delete the temporary."""


class Output:
    """A compressed-model directory built in a temporary sibling and published by rename."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        from rankwise.compress.saving import is_compressed_dir
        from rankwise.io import publish_dir

        self.out = Path(out)
        if self.out.exists() and not (self.out.is_dir() and (is_compressed_dir(self.out)
                                                             or not any(self.out.iterdir()))):
            raise FileExistsError(f"{self.out} exists and is not a compressed model directory: "
                                  "choose a new output directory")
        # merge=False: a new stream replaces the whole directory, as it always did
        self._publish = publish_dir(self.out, merge=False, verify=_verify)
        self.tmp: Path = self._publish.__enter__()
        self._open = True
        self.blocks = self.tmp / ".blocks"
        self.blocks.mkdir()
        self.specs: dict[str, dict[str, Any]] = {}

    def add_block(self, prefix: str, block: nn.Module) -> None:
        from rankwise.compress.saving import _layer_specs
        from rankwise.io import save_tensors

        state = {prefix + k: v for k, v in block.state_dict().items()}
        save_tensors(self.blocks / f"{prefix.rstrip('.')}.safetensors", state)
        self.specs.update({prefix + f: s for f, s in _layer_specs(block).items()})

    def finish(self, model: nn.Module, files: ModelFiles, prefix: str, dtype: torch.dtype,
               report: Any, tokenizer: Any, tied: Mapping[str, str]) -> Path:
        """Assemble model.safetensors, write config / tokenizer / marker, publish atomically."""
        import json

        from rankwise import __version__
        from rankwise.compress import hf_guard
        from rankwise.compress.saving import FORMAT, MARKER, WEIGHTS
        from rankwise.io import digest_files, write_json, write_text

        pieces = ModelFiles(self.blocks)
        entries: dict[str, Any] = {}
        for key, t in model.state_dict(keep_vars=True).items():
            if key in tied:
                continue
            if key.startswith(prefix + "."):
                entries[key] = (_dtype_of(pieces, key), tuple(t.shape), lambda k=key: pieces.read([k])[k])
            else:
                want = dtype if t.is_floating_point() else t.dtype
                entries[key] = (want, tuple(t.shape), lambda k=key: files.read([k], dtype=dtype)[k])
        write_safetensors(self.tmp / WEIGHTS, entries, metadata={"format": "pt"})
        shutil.rmtree(self.blocks)
        cfg = json.loads(model.config.to_json_string(use_diff=True))
        cfg["architectures"] = [type(model).__name__]
        cfg = hf_guard.guard_config(cfg, self.specs)  # plain transformers refuses it, naming rankwise.load_model
        write_text(self.tmp / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for name in ("generation_config.json", *_TOKENIZER_FILES):
            if (files.directory / name).is_file() and (tokenizer is None or name == "generation_config.json"):
                shutil.copyfile(files.directory / name, self.tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.tmp))
        write_json(self.tmp / MARKER, {
            "format": FORMAT, "rankwise_version": __version__, "architecture": type(model).__name__,
            "dtype": str(dtype).removeprefix("torch."), "layers": self.specs, "tied": dict(tied),
            "report": report.to_dict() if hasattr(report, "to_dict") else report,
            "files": digest_files(self.tmp),  # checksums, verified on load as for save_compressed
        })
        self._open = False
        self._publish.__exit__(None, None, None)  # verify, rename old away, new in, delete old
        return self.out

    def abort(self) -> None:
        """Publish nothing: the temporary is deleted, an existing directory stays as it was."""
        if self._open:
            self._open = False
            error = _Aborted()
            self._publish.__exit__(_Aborted, error, None)


def _verify(tmp: Path) -> None:
    """Every file the marker vouches for is there with its recorded size (as save_compressed)."""
    from rankwise.compress.saving import MARKER
    from rankwise.io import read_json, verify_files

    verify_files(tmp, read_json(tmp / MARKER)["files"], marker=MARKER, full=False)


def _dtype_of(files: ModelFiles, key: str) -> torch.dtype:
    from safetensors import safe_open

    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    with safe_open(str(files.where[key]), framework="pt") as handle:
        return names[handle.get_slice(key).get_dtype()]
