"""Block-by-block calibration (GPTQ / SVD-LLM style) without storing per-layer activations.

The model's repeated blocks (the `nn.ModuleList` holding most target layers: Llama's
`model.layers`, BERT's `encoder.layer`) are run one at a time on cached block inputs:

1. one forward of the model up to block 0 records, per micro-batch, block 0's input hidden
   states and its other arguments (masks, rotary embeddings), then stops;
2. for block i: rankwise.calibrate's hooks (`InputCollector`, the same fp64 accumulator as the
   whole-model pass) accumulate statistics of its target layers' inputs (`sum x^T x`, and
   optionally the cross-Gram `sum x_ref^T x` against the inputs the *original* model sees), the
   caller compresses block i, and block i produces block i+1's inputs: the compressed block
   (`propagate="compressed"`, GPTQ / SVD-LLM order) or the original one (`"original"`, which
   reproduces the whole-model pass one block at a time, what streaming compression needs).

A `BlockLoader` lets the blocks live on disk: the runner asks it to materialise block i before
running it and to release it after (rankwise.compress.streaming).

Only the hidden states at one block boundary are held (n_seq x seq_len x hidden; 19 MB for
32 x 256 tokens of SmolLM2), plus one micro-batch of a layer's inputs for the cross-Gram.
Granularity is the block: inside block i, o_proj's statistics are taken with block i's
original q/k/v (SVD-LLM's reference profiles sub-layers one by one; rankwise trades that for
one capture pass per block).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from rankwise.calibrate import InputCollector, LayerStats

logger = logging.getLogger(__name__)

__all__ = ["BlockLoader", "BlockStats", "find_blocks", "run_blockwise"]


class _Stop(Exception):
    """Raised by the block-0 pre-hook to end the embedding forward early."""


BlockStats = LayerStats  # the statistics handed to `on_block` (kept name)


def find_blocks(model: nn.Module, targets: Mapping[str, nn.Module]) -> tuple[str, nn.ModuleList]:
    """(fqn, ModuleList) of the repeated blocks holding the most target layers.

    Raises:
        ValueError: no ModuleList contains any target.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            prefix = name + "." if name else ""
            count = sum(1 for t in targets if t.startswith(prefix))
            if count and (best is None or count > best[0]):
                best = (count, name, module)
    if best is None:
        raise ValueError(
            "no nn.ModuleList of blocks holds the target layers: block-by-block calibration "
            "needs a model with repeated blocks (e.g. model.layers): use a one-shot method "
            "(method='svd-llm') or update='none'"
        )
    return best[1], best[2]


def _first(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list):
        return out[0]
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise TypeError(f"cannot find the hidden states in a block output of type {type(out).__name__}")
    return hidden


def _call_model(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch, use_cache=False) if _accepts_use_cache(model) else model(**batch)
    else:
        model(batch, use_cache=False) if _accepts_use_cache(model) else model(batch)


def _accepts_use_cache(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return bool(cfg is not None and hasattr(cfg, "use_cache"))


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[Any]):
    """[(args, kwargs)] of block 0 for each micro-batch."""
    records: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def pre_hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        records.append((args, dict(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    _call_model(model, batch)
                except _Stop:
                    pass
                else:  # pragma: no cover - the hook always fires for a block on the path
                    raise ValueError("block 0 never ran: is it on the model's forward path?")
    finally:
        handle.remove()
    return records


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor):
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = hidden
    return args, kwargs


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class BlockLoader(Protocol):
    """Where blocks live when the model is not resident (rankwise.compress.streaming).

    `load(i, block)` materialises block i's weights (on the runner's device), `release(i,
    block)` is called once block i's outputs are computed (write it out, free it), and
    `inputs_ready(model)` once block 0's inputs are recorded (free the embeddings).
    """

    def inputs_ready(self, model: nn.Module) -> None: ...

    def load(self, i: int, block: nn.Module) -> None: ...

    def release(self, i: int, block: nn.Module) -> None: ...


def run_blockwise(
    model: nn.Module,
    batches: list[Any],
    targets: Mapping[str, nn.Module],
    on_block: Callable[[int, dict[str, LayerStats]], None],
    *,
    cross: bool = False,
    progress: bool = True,
    stats: tuple[str, ...] = ("gram",),
    share_inputs: bool = False,
    propagate: str = "compressed",
    loader: BlockLoader | None = None,
    device: str | torch.device | None = None,
) -> None:
    """Run the blocks one at a time, calling `on_block(i, stats)` for each block.

    Args:
        model: the model; targets inside its blocks are processed block by block.
        batches: micro-batches (input_ids tensors or dicts of model inputs).
        targets: `{fqn: module}` of the layers to collect statistics for.
        on_block: `on_block(i, {fqn: LayerStats})` may replace block i's modules (through the
            model). With ``propagate="compressed"`` it runs before block i produces block i+1's
            inputs (GPTQ / SVD-LLM order: later blocks see the compressed earlier ones); with
            ``"original"`` after, from the original block's outputs (every block sees the dense
            model's activations, as a whole-model `capture_input_stats` pass does).
        cross: also collect `sum x_ref^T x` against the original model's inputs; the original
            block is run on the original hidden states first (its modules must be unmodified
            when `on_block` is called).
        progress: show a tqdm bar.
        stats: input statistics to collect (rankwise.calibrate names, "sq_grad" excluded).
        share_inputs: one accumulator for layers reading the same tensor (q/k/v, gate/up).
        propagate: "compressed" or "original" (see `on_block`).
        loader: a `BlockLoader` for models whose blocks are not resident (meta tensors).
        device: where hidden states and blocks run (default: where block 0's inputs are).
    """
    from tqdm.auto import tqdm

    if propagate not in ("compressed", "original"):
        raise ValueError(f"propagate must be 'compressed' or 'original', got {propagate!r}")
    if cross and propagate == "original":
        raise ValueError("cross=True compares against the original model: use propagate='compressed'")
    prefix, blocks = find_blocks(model, targets)
    records = _capture_block_inputs(model, blocks[0], batches)
    if device is not None:
        records = [_move(r, torch.device(device)) for r in records]
    if loader is not None:
        loader.inputs_ready(model)
    hidden = [_hidden_of(a, k) for a, k in records]
    ref_hidden = [h.clone() for h in hidden] if cross else None
    for i in tqdm(range(len(blocks)), desc="blocks", disable=not progress, leave=False):
        block = blocks[i]
        if loader is not None:
            loader.load(i, block)
        block_prefix = f"{prefix}.{i}." if prefix else f"{i}."
        local = {f: m for f, m in targets.items() if f.startswith(block_prefix)}
        collector = InputCollector(local, stats, device=hidden[0].device, share_inputs=share_inputs,
                                   cross=cross)
        outputs, ref_out = _collect(block, collector, records, hidden, ref_hidden)
        block_stats = collector.results() if local else {}
        del collector  # on_block may free each layer's statistics as it goes
        if propagate == "original":
            hidden = outputs
            on_block(i, block_stats)
        else:
            on_block(i, block_stats)
            with torch.no_grad():
                for b, (args, kwargs) in enumerate(records):
                    a, k = _with_hidden(args, kwargs, hidden[b])
                    hidden[b] = _first(block(*a, **k))
            if ref_hidden is not None:
                ref_hidden = ref_out
        block_stats = outputs = ref_out = None  # free this block's statistics before the next
        if loader is not None:
            loader.release(i, block)


def _collect(block, collector, records, hidden, ref_hidden):
    """Run `block` on every micro-batch with `collector`'s hooks attached.

    Returns (the block's outputs on `hidden`, its outputs on `ref_hidden` or None). With a
    reference, each micro-batch first runs on the reference hidden states (recording the
    layers' reference inputs), then on the current ones (adding Gram and cross-Gram).
    """
    outputs: list[torch.Tensor] = []
    ref_out: list[torch.Tensor] = []
    with collector, torch.no_grad():
        for b, (args, kwargs) in enumerate(records):
            collector.set_mask(None)
            if ref_hidden is not None:
                with collector.reference():
                    a, k = _with_hidden(args, kwargs, ref_hidden[b])
                    ref_out.append(_first(block(*a, **k)))
            a, k = _with_hidden(args, kwargs, hidden[b])
            outputs.append(_first(block(*a, **k)))
    return outputs, (ref_out if ref_hidden is not None else None)


def _move(obj: Any, device: torch.device) -> Any:
    """Tensors inside nested tuples / lists / dicts moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj
