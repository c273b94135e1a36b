"""Block-by-block calibration (GPTQ / SVD-LLM style) without storing per-layer activations.

The model's repeated blocks (the `nn.ModuleList` holding most target layers: Llama's
`model.layers`, BERT's `encoder.layer`) are run one at a time on cached block inputs:

1. one forward of the model up to block 0 records, per micro-batch, block 0's input hidden
   states and its other arguments (masks, rotary embeddings), then stops;
2. for block i: forward hooks on block i's target layers accumulate Grams of their inputs
   (`sum x^T x`, and optionally the cross-Gram `sum x_ref^T x` against the inputs the *original*
   model sees), the caller compresses block i, and the compressed block is run once more to
   produce block i+1's inputs.

Only the hidden states at one block boundary are held (n_seq x seq_len x hidden; 19 MB for
32 x 256 tokens of SmolLM2), plus one micro-batch of a layer's inputs for the cross-Gram.
Granularity is the block: inside block i, o_proj's statistics are taken with block i's
original q/k/v (SVD-LLM's reference profiles sub-layers one by one; rankwise trades that for
one capture pass per block).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["BlockStats", "find_blocks", "run_blockwise"]


class _Stop(Exception):
    """Raised by the block-0 pre-hook to end the embedding forward early."""


@dataclass
class BlockStats:
    """Grams of one target layer's inputs within the current block.

    Attributes:
        gram: sum x^T x over the current (propagated) inputs, (n, n) fp64.
        cross: sum x_ref^T x, (n, n) fp64, with x_ref the original model's inputs (or None).
        n_tokens: tokens seen.
    """

    gram: torch.Tensor
    cross: torch.Tensor | None
    n_tokens: int


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


def run_blockwise(
    model: nn.Module,
    batches: list[Any],
    targets: Mapping[str, nn.Module],
    on_block: Callable[[int, dict[str, BlockStats]], None],
    *,
    cross: bool = False,
    progress: bool = True,
) -> None:
    """Run the blocks one at a time, calling `on_block(i, stats)` before propagating block i.

    Args:
        model: the model; targets inside its blocks are processed block by block.
        batches: micro-batches (input_ids tensors or dicts of model inputs).
        targets: `{fqn: module}` of the layers to collect Grams for.
        on_block: `on_block(i, {fqn: BlockStats})` may replace block i's modules (through the
            model); the (possibly modified) block then produces block i+1's inputs.
        cross: also collect `sum x_ref^T x` against the original model's inputs; the original
            block is run on the original hidden states first (its modules must be unmodified
            when `on_block` is called).
        progress: show a tqdm bar.
    """
    from tqdm.auto import tqdm

    prefix, blocks = find_blocks(model, targets)
    records = _capture_block_inputs(model, blocks[0], batches)
    hidden = [_hidden_of(a, k) for a, k in records]
    ref_hidden = [h.clone() for h in hidden] if cross else None
    for i in tqdm(range(len(blocks)), desc="blocks", disable=not progress, leave=False):
        block = blocks[i]
        block_prefix = f"{prefix}.{i}." if prefix else f"{i}."
        local = {f: m for f, m in targets.items() if f.startswith(block_prefix)}
        stats: dict[str, BlockStats] = {}
        ref_out: list[torch.Tensor] | None = None
        if local:
            stats, ref_out = _collect(block, local, records, hidden, ref_hidden)
        on_block(i, stats)
        with torch.no_grad():
            for b, (args, kwargs) in enumerate(records):
                a, k = _with_hidden(args, kwargs, hidden[b])
                hidden[b] = _first(block(*a, **k))
                if ref_hidden is not None:
                    if ref_out is not None:
                        ref_hidden[b] = ref_out[b]  # the original block's output, from _collect
                    else:  # no targets here: the block is unchanged, run it on the reference
                        a, k = _with_hidden(args, kwargs, ref_hidden[b])
                        ref_hidden[b] = _first(block(*a, **k))


def _collect(block, local, records, hidden, ref_hidden):
    """Grams (and cross-Grams) of the local targets' inputs over all micro-batches.

    Returns ({fqn: BlockStats}, the original block's outputs on the reference hidden states or
    None when `ref_hidden` is None).
    """
    names = list(local)
    grams: dict[str, torch.Tensor] = {}
    crosses: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)
    saved: dict[str, torch.Tensor] = {}
    mode = {"ref": False}
    ref_out: list[torch.Tensor] = []

    def hook(name: str, _mod: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        flat = x.reshape(-1, x.shape[-1]).float()
        if mode["ref"]:
            saved[name] = flat
            return
        if not torch.isfinite(flat).all():
            raise ValueError(f"non-finite input to {name!r} during block-wise calibration")
        g = (flat.T @ flat).double()
        grams[name] = grams[name] + g if name in grams else g
        counts[name] += flat.shape[0]
        if ref_hidden is not None:
            c = (saved.pop(name).T @ flat).double()
            crosses[name] = crosses[name] + c if name in crosses else c

    handles = [m.register_forward_pre_hook(lambda mod, a, _n=n: hook(_n, mod, a)) for n, m in local.items()]
    try:
        with torch.no_grad():
            for b, (args, kwargs) in enumerate(records):
                if ref_hidden is not None:
                    mode["ref"] = True
                    a, k = _with_hidden(args, kwargs, ref_hidden[b])
                    ref_out.append(_first(block(*a, **k)))
                    mode["ref"] = False
                a, k = _with_hidden(args, kwargs, hidden[b])
                block(*a, **k)
    finally:
        for h in handles:
            h.remove()
    stats = {n: BlockStats(grams[n], crosses.get(n), counts[n]) for n in names}
    return stats, (ref_out if ref_hidden is not None else None)
