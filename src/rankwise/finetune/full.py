"""Full fine-tuning (method ``full``) and the optimizer choice of a fine-tuning run.

Method ``full`` trains every weight of the task model (no adapter). Its optimizer is torch
AdamW or any rankwise.optim preset (``--optimizer galore_adamw``: the attention/MLP gradients
are projected to `rank`), and under a launcher ``--fsdp`` shards the model with FSDP2 (each
decoder layer, then the whole model; rankwise.train.fsdp), so gradients reach the projector as
DTensors and every rank keeps its rows of the update. Checkpoints hold the full weights in
``trainable.safetensors`` (gathered from the shards by every rank, written by rank 0); the
finished run writes OUT/model.safetensors (the task model's state dict).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.finetune.config import FinetuneConfig

__all__ = ["build_optimizer", "export_full", "initialise", "make_trainable", "shard"]


def make_trainable(model: nn.Module) -> None:
    """Method full: every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)


def shard(model: nn.Module) -> None:
    """FSDP2 over the task model: the decoder/encoder layers, then the root."""
    from torch.distributed.fsdp import fully_shard

    inner = getattr(model, "encoder", model)  # TopicClassifier wraps the encoder
    for path in ("model.layers", "encoder.layer", "layers"):
        layers = inner
        for attr in path.split("."):
            layers = getattr(layers, attr, None)
        if isinstance(layers, nn.ModuleList):
            for layer in layers:
                fully_shard(layer)
            break
    fully_shard(model)


def initialise(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Run FSDP2's lazy initialisation with one no-grad forward in eval mode (no RNG drawn):
    were its first forward the evaluation under ``torch.inference_mode``, the gathered
    parameters would be inference tensors that the training step cannot update."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        model.train(was_training)


def build_optimizer(config: FinetuneConfig, model: nn.Module,
                    groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """torch AdamW over `groups`, or the rankwise.optim preset `config.optimizer` (its projected
    group at rank `config.rank` for the Linear weights, AdamW for the rest)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    import rankwise.optim as ro

    return ro.create(config.optimizer, model, rank=config.rank, lr=config.resolved_lr,
                     weight_decay=config.weight_decay)


def full_state(model: nn.Module, collected: Any) -> dict[str, torch.Tensor]:
    """The model's full trainable tensors: gathered ones (sharded) or the parameters."""
    if collected is not None and collected.model_state is not None:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        return {k: v for k, v in collected.model_state.items() if k in trainable}
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def export_full(model: nn.Module, out: Path, collected: Any) -> None:
    """OUT/model.safetensors: the fine-tuned task model's full state dict."""
    from rankwise.io import save_tensors

    if collected is not None and collected.model_state is not None:
        state = collected.model_state
    else:
        state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    save_tensors(out / "model.safetensors", state)
