"""Compression that streams: a model that is not resident, one decoder block at a time.

    from rankwise.compress import compress_streaming
    report = compress_streaming("path/to/llama-7b", "out/", "svd_llm", 0.2, tokenizer=tok)
    model = rankwise.load_model("out/")       # the same directory format as save_compressed

The model is built on the meta device (no weights); the embeddings are read from its
safetensors files to record block 0's inputs on the calibration tokens, then freed. Each block
i is then read (memory-mapped, `safetensors.safe_open`), placed on `device`, calibrated on the
propagated hidden states by the block runner (rankwise.compress.sequential, with
rankwise.calibrate's fp64 accumulator), compressed, written to a per-block file and freed. At
the end one model.safetensors is assembled tensor by tensor. Peak memory is one block, its
statistics and factorisations, the hidden states of the calibration tokens, and the largest
single tensor (the embedding) at the start and the end.

The result equals `compress_` on the loaded model (tests/compress/test_compress_streaming.py):
one-shot methods see the *dense* model's activations, so block i+1's inputs come from the
original block i (`propagate="original"`); SVD-LLM's sequential update (svd_llm_seq) propagates
through the compressed blocks, as in memory. Allocations that compare layers (welore, dynamic,
budget) need every spectrum before any rank is known: a first streaming pass computes the
spectra (block by block, nothing written), the second compresses.

Not streamed (they raise, naming the alternative): FWSVD (its Fisher needs a backward pass
through the whole model) and SVD-LLM's lstsq update (its right factor comes from the dense
model's activations while the left one needs the compressed model's).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rankwise.compress.stream_io import ModelFiles, empty_model, resolve_source
from rankwise.compress.stream_output import Output

logger = logging.getLogger(__name__)

__all__ = ["compensate_streaming", "compress_streaming"]

class _Loader:
    """`BlockLoader` reading blocks from `files` onto `device`; releases write them to `out`."""

    def __init__(self, files: ModelFiles, prefix: str, device: torch.device, dtype: torch.dtype,
                 out: Output | None, targets: Mapping[str, nn.Module]) -> None:
        self.files, self.prefix, self.device, self.dtype, self.out = files, prefix, device, dtype, out
        self.targets = targets
        self.block_seconds: list[float] = []
        self._start = 0.0

    def inputs_ready(self, model: nn.Module) -> None:
        _to_meta(model, exclude=self.prefix)  # the embeddings are not needed any more

    def load(self, i: int, block: nn.Module) -> None:
        self._start = time.perf_counter()
        prefix = f"{self.prefix}.{i}."
        keys = [k for k in self.files.where if k.startswith(prefix)]
        tensors = self.files.read(keys, dtype=self.dtype, device=self.device)
        block.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()}, strict=True, assign=True)

    def release(self, i: int, block: nn.Module) -> None:
        if self.out is not None:
            self.out.add_block(f"{self.prefix}.{i}.", block)
        block.to("meta")
        for f, m in self.targets.items():  # replaced originals too (callers may still hold them)
            if f.startswith(f"{self.prefix}.{i}."):
                m.to("meta")
        _return_free_memory()
        self.block_seconds.append(time.perf_counter() - self._start)


def _return_free_memory() -> None:
    """Hand freed heap memory back to the OS between blocks (glibc keeps freed chunks below its
    mmap threshold in its arenas, so a long stream of block-sized allocations fragments and
    grows the resident set); a no-op where `malloc_trim` does not exist."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _to_meta(model: nn.Module, exclude: str) -> None:
    """Parameters outside the `exclude` subtree back to meta (memory freed)."""
    for name, module in model.named_modules():
        if name == exclude or name.startswith(exclude + "."):
            continue
        for pname, p in list(module._parameters.items()):
            if p is not None and p.device.type != "meta":
                module._parameters[pname] = nn.Parameter(p.to("meta"), requires_grad=False)


def _load_outside(model: nn.Module, files: ModelFiles, prefix: str, dtype: torch.dtype,
                  tied: Mapping[str, str]) -> None:
    """Read every parameter outside the blocks (embeddings, final norm, head) onto the CPU."""
    for name, module in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            key = f"{name}.{pname}" if name else pname
            src = key if key in files.where else tied.get(key, key)
            t = files.read([src], dtype=dtype)[src]
            module._parameters[pname] = nn.Parameter(t, requires_grad=False)


def _tied(model: nn.Module) -> dict[str, str]:
    """{dropped key: kept key} for state-dict entries that are one tensor (tied weights)."""
    seen: dict[int, str] = {}
    tied = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            tied[key] = seen[id(t)]
        else:
            seen[id(t)] = key
    return tied


class _Session:
    """What both streaming entry points share: the meta model, its files, the calibration
    batches, the block runner with a loader, and the output directory."""

    def __init__(self, source: Any, cfg: Any, calibration: Any, tokenizer: Any,
                 device: str | torch.device, dtype: torch.dtype) -> None:
        from rankwise.compress.calibration import find_targets
        from rankwise.compress.sequential import find_blocks
        from rankwise.surgery import count_parameters

        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.device, self.dtype, self.cfg = torch.device(device), dtype, cfg
        self.directory = resolve_source(source)
        self.files = ModelFiles(self.directory)
        self.model = empty_model(self.directory)
        self.tied = _tied(self.model)  # before loading anything (loading unties)
        self.targets = find_targets(self.model, cfg.target_modules)
        self.prefix, self.blocks = find_blocks(self.model, self.targets)
        outside = [f for f in self.targets if not f.startswith(self.prefix + ".")]
        if outside:
            raise ValueError(f"streaming compresses layers inside {self.prefix!r} only; {outside[:3]} "
                             "are outside: leave them out of target_modules")
        if tokenizer is None and calibration is None and (self.directory / "tokenizer_config.json").is_file():
            from rankwise.models import load_tokenizer

            tokenizer = load_tokenizer(self.directory)
        self.tokenizer = tokenizer
        self.calibration, self.calib_info = calibration, {}
        self.batches: list[torch.Tensor] | None = None
        self.params_before = count_parameters(self.model)

    def calibrate(self) -> list[torch.Tensor]:
        if self.batches is None:
            from rankwise.compress.calibration import calibration_ids

            source = self.calibration if self.calibration is not None else self.cfg.calibration
            ids, self.calib_info = calibration_ids(self.model, source, self.tokenizer,
                                                   n_samples=self.cfg.n_samples, seq_len=self.cfg.seq_len,
                                                   seed=self.cfg.seed)
            self.batches = list(ids.split(self.cfg.batch_size))
        return self.batches

    def run(self, on_block: Any, *, stats: tuple[str, ...], propagate: str, cross: bool = False,
            out: Output | None = None) -> list[float]:
        """One pass over the blocks (calibrated when `stats` or propagation need it)."""
        from rankwise.compress.sequential import run_blockwise

        loader = _Loader(self.files, self.prefix, self.device, self.dtype, out, self.targets)
        if not stats and propagate == "original":  # data-free: no forward at all
            for i, block in enumerate(self.blocks):
                loader.load(i, block)
                on_block(i, {})
                loader.release(i, block)
            return loader.block_seconds
        batches = self.calibrate()
        _load_outside(self.model, self.files, self.prefix, self.dtype, self.tied)
        try:
            run_blockwise(self.model, batches, self.targets, on_block, cross=cross, stats=stats,
                          share_inputs=not cross, propagate=propagate, loader=loader, device=self.device,
                          progress=self.cfg.progress)
        finally:
            _to_meta(self.model, exclude=self.prefix)
        return loader.block_seconds

    def write(self, out: str | os.PathLike[str], work: Any, streaming: dict[str, Any]) -> Any:
        """Run ``work(output) -> (report, block seconds)`` into a fresh `Output` at `out`, then
        publish the model with the report (its whole-model size after, the `streaming` facts
        and the seconds per block added); on any error the output is abandoned."""
        output = Output(out)
        try:
            report, seconds = work(output)
            report.params_model_after = self.params_before - sum(
                r.params_before - r.params_after for r in report.layers)
            report.options["streaming"] = {"device": str(self.device), **streaming,
                                           "block_seconds": seconds}
            output.finish(self.model, self.files, self.prefix, self.dtype, report, self.tokenizer,
                          self.tied)
        except BaseException:
            output.abort()
            raise
        return report


def _config(cls: type, config: Any, values: dict[str, Any], calibration: Any) -> tuple[Any, Any]:
    """(config, in-memory calibration source) of a streaming call: a calibration named by a
    string is a config field, anything else is passed to the session as it is."""
    from rankwise.compress.config import config_from

    if isinstance(calibration, str):
        values, calibration = {**values, "calibration": calibration}, None
    return config_from(cls, config, values), calibration


def compress_streaming(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    method: str | None = None,
    ratio: float | None = None,
    *,
    config: Any = None,
    calibration: Any = None,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> Any:
    """`compress_` on the model in `source` (a bundled name or a safetensors directory) without
    loading it, writing the compressed model to `out` (the `save_compressed` format).

    Args:
        source, out: input model and output directory (replaced if it is a compressed model).
        method, ratio, config, **options: as for `compress_` (a `CompressConfig`).
        calibration, tokenizer: as for `compress_` (default tokenizer: the one in `source`).
        device: where each block is calibrated and compressed ("cuda" on a GPU machine); the
            rest of the model stays on disk, the hidden states on `device`.
        dtype: dtype of the computation and of the saved weights (the in-memory default fp32).

    Returns:
        The CompressionReport; ``report.options["streaming"]`` holds the seconds per block.
    """
    from rankwise.compress.allocate import allocate_ranks
    from rankwise.compress.api import (
        _scoped_ratio,
        build_compressor,
        finish_ranks,
        layer_specs,
        make_report,
        resolve_preset,
    )
    from rankwise.compress.config import CompressConfig

    start = time.perf_counter()
    cfg, calibration = _config(CompressConfig, config, {"method": method, "ratio": ratio, **options},
                               calibration)
    preset = resolve_preset(cfg)
    _check_streamable(preset, cfg)
    s = _Session(source, cfg, calibration, tokenizer, device, dtype)
    inner = _scoped_ratio(cfg.ratio, cfg.scope, s.model, s.targets)
    compressor = build_compressor(preset.name, damping=preset.damping)
    if preset.update == "none" and hasattr(compressor, "release_grams"):
        compressor.release_grams = True  # one block's Grams die with their whitening
    needs = tuple(compressor.needs) + (("gram",) if cfg.compensation_rank and "gram" not in compressor.needs else ())
    if preset.allocation == "uniform":
        specs = layer_specs(compressor, s.targets, "uniform")
    else:
        specs = {}
        s.run(_spectra_on_block(compressor, s.targets, specs), stats=needs, propagate="original")
        specs = {f: specs[f] for f in s.targets}
    ranks = finish_ranks(allocate_ranks(specs, inner, preset.allocation), cfg.compensation_rank)

    def work(output: Output) -> tuple[Any, list[float]]:
        if preset.update == "none":
            on_block = _oneshot_on_block(s.model, compressor, s.targets, ranks, cfg.compensation_rank)
            seconds = s.run(on_block, stats=needs, propagate="original", out=output)
        else:
            from rankwise.compress.api import update_on_block

            on_block = update_on_block(s.model, preset, compressor, s.targets, ranks, cfg.compensation_rank, set())
            seconds = s.run(on_block, stats=("gram",), propagate="compressed",
                            cross=preset.update_target == "original", out=output)
        return make_report(preset, cfg, s.targets, ranks, compressor, s.params_before, 0,
                           s.calib_info, time.perf_counter() - start), seconds

    return s.write(out, work, {"dtype": str(dtype).removeprefix("torch.")})


def _check_streamable(preset: Any, cfg: Any) -> None:
    """Refuse, before any work, what one pass over the blocks cannot reproduce."""
    if preset.whitener == "fisher" or preset.update == "lstsq":
        why = ("its Fisher needs a backward pass through the whole model" if preset.whitener == "fisher"
               else "its update mixes dense and compressed activations")
        raise ValueError(f"method {preset.name!r} cannot stream ({why}): use svd_llm, asvd, svd_llm_seq, "
                         "drank, welore, lord or afm, or compress_ in memory")
    if cfg.compensation_rank and cfg.compensation_sequential and preset.update == "none":
        raise ValueError("compensation_sequential needs the dense and the compensated activations of "
                         "each block at once, which streaming does not keep: use compress_ in memory")


def _spectra_on_block(compressor: Any, targets: Mapping[str, nn.Linear], specs: dict[str, Any]):
    """First pass: each target's spectrum in the compressor's metric (kept; statistics freed)."""
    from rankwise.compress.allocate import LayerSpec

    def on_block(_i: int, stats: dict[str, Any]) -> None:
        local = [f for f in targets if f in stats] or [f for f in targets if targets[f].weight.device.type != "meta"]
        for f in local:
            if f in stats:
                compressor.observe_stats(f, stats[f])
            m = targets[f]
            specs[f] = LayerSpec(m.out_features, m.in_features, compressor.spectrum(f, m).cpu())
        _forget(compressor, local)

    return on_block


def _oneshot_on_block(model: nn.Module, compressor: Any, targets: Mapping[str, nn.Linear],
                      ranks: Mapping[str, int | None], comp_rank: int):
    """Replace each target of the loaded block by its compressed form (statistics of the dense
    model's activations, as `compress_` gathers them in one whole-model pass)."""
    from rankwise import surgery
    from rankwise.compress.api import build_layer
    from rankwise.compress.calibration import check_tokens

    def on_block(_i: int, stats: dict[str, Any]) -> None:
        local = {f: m for f, m in targets.items() if m.weight.device.type != "meta"}
        if stats:
            check_tokens(stats, local, compressor)
            for f in local:
                compressor.observe_stats(f, stats[f])
        for f, m in local.items():
            st = stats.pop(f, None)  # the compressor holds what it needs; freed layer by layer
            gram = st.gram if comp_rank and st is not None else None
            del st
            if ranks[f] is not None:
                surgery.replace_module(model, f, build_layer(compressor, f, m, ranks[f], comp_rank, gram))
                m.to("meta")  # the original weight is not needed any more
            _forget(compressor, [f])

    return on_block


def _forget(compressor: Any, fqns: list[str]) -> None:
    """Drop a finished block's statistics and cached SVDs (memory stays one block's worth)."""
    for f in fqns:
        if hasattr(compressor, "release"):
            compressor.release(f)
        else:
            getattr(compressor, "stats_", {}).pop(f, None)


def compensate_streaming(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    base: str | None = None,
    rank: int | None = None,
    *,
    config: Any = None,
    calibration: Any = None,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> Any:
    """`compensate_` (base compression + EoRA / SVD correction) streamed block by block from
    `source` to `out`; parallel or sequential form as `CompensateConfig.sequential` says."""
    from rankwise import surgery
    from rankwise.compress.compensate import compensate_group, compensation_report
    from rankwise.compress.config import CompensateConfig

    start = time.perf_counter()
    cfg, calibration = _config(CompensateConfig, config, {"base": base, "rank": rank, **options},
                               calibration)
    s = _Session(source, cfg, calibration, tokenizer, device, dtype)

    def on_block(_i: int, stats: dict[str, Any]) -> None:
        local = {f: s.targets[f] for f in stats}
        for f, new in compensate_group(stats, local, cfg).items():
            surgery.replace_module(s.model, f, new)
            local[f].to("meta")  # the original weight is not needed any more

    def work(output: Output) -> tuple[Any, list[float]]:
        seconds = s.run(on_block, stats=("gram",), out=output,
                        propagate="compressed" if cfg.sequential else "original")
        return compensation_report(cfg, s.targets, s.params_before, 0, s.calib_info,
                                   time.perf_counter() - start), seconds

    return s.write(out, work, {})
