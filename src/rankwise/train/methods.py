"""Pretraining methods applied to a freshly built tiny Llama, and the LR schedule.

The method (`rankwise.train.config.methods()`) is applied to the attention and MLP projections
(q, k, v, o, gate, up, down): layer methods through `rankwise.layers.convert_` +
`schedule_for`, LoRA through `rankwise.adapt.adapt_` (the base weights stay frozen at their
random init; embeddings and norms train, as in ReLoRA), GaLore/Fira through
`rankwise.optim.create` (AdamW on the rest). Every other method trains its trainable tensors
with torch AdamW.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from rankwise.train.config import OPTIMIZER_METHODS, PretrainConfig

__all__ = ["TARGET_MODULES", "build_model", "lr_multiplier", "parameter_counts", "setup_method"]

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(config: PretrainConfig, vocab_size: int, tokenizer: Any | None = None) -> nn.Module:
    """The configured Llama, freshly initialised (seeded), with `vocab_size` tokens.

    The tokenizer's bos/eos/pad ids go into the model config (pass None for remapped ids).
    """
    from rankwise.train.llama import build_llama, llama_config

    overrides: dict[str, Any] = {}
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None and value < vocab_size:
                overrides[key] = value
    overrides.update(config.model_overrides)
    overrides.setdefault("vocab_size", vocab_size)
    if overrides["vocab_size"] < vocab_size:
        raise ValueError(f"model_overrides vocab_size {overrides['vocab_size']} is below the "
                         f"data's {vocab_size} token ids: raise it or drop the override")
    overrides.setdefault("max_position_embeddings", max(1024, config.seq_len))
    return build_llama(llama_config(config.size, **overrides), seed=config.seed)


def _unfreeze_all_but_lora_bases(model: nn.Module) -> None:
    from rankwise.adapt import adapter_layers

    frozen = {id(p) for layer in adapter_layers(model).values()
              for p in layer.base_layer.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)


def setup_method(config: PretrainConfig, model: nn.Module,
                 shard: Callable[[nn.Module], None] | None = None,
                 ) -> tuple[torch.optim.Optimizer, Any]:
    """Apply `config.method` to `model` in place; return (optimizer, schedules).

    `schedules` is a rankwise.layers.Schedules (empty for methods without periodic actions).
    `shard(model)` (FSDP2's fully_shard) runs after the method changed the layers and before
    the optimizer sees the parameters.
    """
    from rankwise.layers import convert_, schedule_for

    method, rank, lr = config.method, config.resolved_rank, config.resolved_lr
    layer_kw: dict[str, Any] = {"rank": rank} if rank is not None else {}
    if config.density is not None:
        layer_kw["density"] = config.density
    if method in ("lora", "relora", "sltrain"):
        layer_kw["alpha"] = 32.0 if config.alpha is None else float(config.alpha)
    layer_kw.update(config.layer_options)
    adamw = {"lr": lr, "betas": config.betas, "weight_decay": config.weight_decay}
    if method in OPTIMIZER_METHODS:
        import rankwise.optim as ro

        if shard is not None:
            shard(model)
        opt = ro.create(OPTIMIZER_METHODS[method], model, target_modules=TARGET_MODULES, rank=rank,
                        update_proj_gap=config.resolved_period, **adamw,
                        **config.optimizer_options)
        return opt, schedule_for(model, opt, seed=config.seed)
    if method == "lora":
        from rankwise.adapt import adapt_

        adapt_(model, "lora", target_modules=TARGET_MODULES, seed=config.seed, **layer_kw)
        _unfreeze_all_but_lora_bases(model)
    elif method != "full":  # a layer method of rankwise.layers
        convert_(model, method, TARGET_MODULES, seed=config.seed, **layer_kw)
    if shard is not None:
        shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, **adamw, **config.optimizer_options)
    options: dict[str, Any] = {}
    if config.resolved_period is not None:  # a layer method with a periodic action
        period = config.resolved_period
        sched_kw: dict[str, Any] = {"every": period}
        if method == "sst":
            sched_kw["svd_every"] = 5 * period  # the layer's default ratio (100 / 500)
        sched_kw.update(config.schedule_options)
        options[method] = sched_kw
    elif config.schedule_options:
        raise ValueError(f"method {method!r} has no schedule: drop schedule_options")
    return opt, schedule_for(model, opt, seed=config.seed, **options)


def lr_multiplier(config: PretrainConfig, step: int) -> float:
    """LR / peak LR at update `step` (0-based): warmup + cosine; ReLoRA's jagged restarts."""
    from rankwise.layers import jagged_cosine

    restart = {}
    if config.method == "relora":
        period = config.resolved_period
        restart = {"restart_every": period, "restart_warmup_steps": max(1, period // 10)}
    return jagged_cosine(step, total_steps=config.steps, warmup_steps=config.resolved_warmup,
                         min_ratio=config.min_lr_ratio, **restart)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Unique parameters: total / trainable, those inside the attention + MLP projections
    (the part the methods change), and the (tied) embedding."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    inside: dict[int, nn.Parameter] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGET_MODULES:
            inside.update({id(p): p for p in module.parameters()})
    embed = model.get_input_embeddings().weight
    return {
        "total": sum(p.numel() for p in seen.values()),
        "trainable": sum(p.numel() for p in seen.values() if p.requires_grad),
        "attn_mlp": sum(p.numel() for p in inside.values()),
        "attn_mlp_trainable": sum(p.numel() for p in inside.values() if p.requires_grad),
        "embedding": embed.numel(),
    }

