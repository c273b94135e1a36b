"""A small pretraining loop: a tiny Llama from scratch with any memory-efficient method.

    from rankwise.train import loop
    result = loop.pretrain(loop.PretrainConfig(method="sltrain", steps=2000, out="runs/sl"))
    result.val_perplexity, result.tokens_per_s, result.memory

One step (the protocol of rankwise.layers.schedules; Maestro adds its truncated forward):

    lr <- peak * jagged_cosine(step)      warmup, cosine to min_lr_ratio; ReLoRA re-warms from 0
    loss = CE(model(x), x)                 [+ CE(model_truncated(x), softmax(model(x)))  Maestro]
    backward; clip_grad_norm; schedules.before_step(); optimizer.step(); schedules(step + 1)

The method (config.METHODS) is applied to the attention and MLP projections (q, k, v, o, gate,
up, down): layer methods through `rankwise.layers.convert_` + `schedule_for`, LoRA through
`rankwise.adapt.adapt_` (the base weights stay frozen at their random init; embeddings and
norms train, as in ReLoRA), GaLore/Fira through `rankwise.optim.create` (AdamW on the rest).
Every other method trains its trainable tensors with torch AdamW.

Data: the corpus's train split tokenised up to the token budget and packed into rows; row
order is a seeded permutation per epoch computed from the step alone, so the data position is
the step and a resumed run reads exactly the rows the uninterrupted run would. Validation
perplexity is scored on a fixed prefix (`eval_tokens`) of the validation split.

Checkpoints (rankwise.train.checkpoint) every `save_every` steps and at the end hold the model,
optimizer, schedules, RNG states and history, so `pretrain(config, resume=True)` continues
bit-exactly: N steps + resume + M steps equals N + M steps uninterrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.train.config import METHODS, PretrainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "TARGET_MODULES",
    "PretrainConfig",
    "PretrainData",
    "PretrainResult",
    "batch_rows",
    "lr_multiplier",
    "parameter_counts",
    "prepare_data",
    "pretrain",
    "setup_method",
]

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_LAYER_METHODS = {"relora", "sltrain", "lost", "sst", "maestro", "trp"}
_SCHEDULED = {"relora", "sst", "maestro", "trp"}


# ----------------------------------------------------------------------------- data
@dataclass
class PretrainData:
    """Token ids of a run: train rows (n, seq_len) int64, validation stream (m,) int64.

    `vocab_map[i]` is the tokenizer id of model id i when the vocabulary was limited (the last
    model id stands for every other token); None for the full vocabulary.
    """

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    vocab_map: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.train.ndim != 2 or self.train.dtype != torch.long or self.train.shape[0] < 1:
            raise ValueError(f"train must be a non-empty (n, seq_len) int64 tensor, got "
                             f"{tuple(self.train.shape)} {self.train.dtype}")
        if self.val.ndim != 1 or self.val.dtype != torch.long or self.val.numel() < 2:
            raise ValueError("val must be a (m,) int64 tensor with at least 2 tokens")
        top = int(max(self.train.max(), self.val.max()))
        if top >= self.vocab_size or int(min(self.train.min(), self.val.min())) < 0:
            raise ValueError(f"token ids must lie in [0, vocab_size={self.vocab_size}), found "
                             f"{top}: raise vocab_size or remap the ids")


def load_tokenizer(name_or_path: str) -> Any:
    """A bundled model's tokenizer, or a directory holding only tokenizer files."""
    path = Path(name_or_path)
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    from rankwise.models import load_tokenizer as load

    return load(name_or_path)


def prepare_data(config: PretrainConfig, tokenizer: Any | None = None) -> tuple[PretrainData, Any]:
    """Tokenise the corpus for `config` (train up to the token budget, validation prefix).

    Returns:
        (data, tokenizer); the tokenizer is loaded from `config.tokenizer` when not given.
    """
    from rankwise.data import load_corpus, token_stream

    if tokenizer is None:
        tokenizer = load_tokenizer(config.tokenizer)
    train = token_stream(load_corpus(config.corpus, "train"), tokenizer,
                         max_tokens=config.tokens)
    val = token_stream(load_corpus(config.corpus, "validation"), tokenizer,
                       max_tokens=config.eval_tokens)
    rows = train.numel() // config.seq_len
    if rows < 1:
        raise ValueError(f"the {config.corpus} train split gives fewer than seq_len="
                         f"{config.seq_len} tokens: lower seq_len")
    train = train[: rows * config.seq_len].view(rows, config.seq_len)
    vocab, vocab_map = len(tokenizer), None
    if config.vocab_limit is not None and config.vocab_limit < vocab:
        counts = torch.bincount(train.reshape(-1), minlength=vocab)
        order = torch.argsort(-counts, stable=True)  # most frequent first, ties by id
        vocab_map = order[: config.vocab_limit - 1].clone()
        lookup = torch.full((vocab,), config.vocab_limit - 1, dtype=torch.long)
        lookup[vocab_map] = torch.arange(config.vocab_limit - 1)
        train, val, vocab = lookup[train], lookup[val], config.vocab_limit
    return PretrainData(train, val, vocab, vocab_map), tokenizer


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def batch_rows(step: int, batch_size: int, n_rows: int, seed: int) -> torch.Tensor:
    """Row indices of update `step` (0-based): sample s = step * B + j is row
    perm_epoch[s mod n] with epoch = s // n, a fresh seeded permutation per epoch."""
    samples = range(step * batch_size, (step + 1) * batch_size)
    return torch.stack([_epoch_order(n_rows, seed, s // n_rows)[s % n_rows] for s in samples])


# ----------------------------------------------------------------------------- model + method
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


def setup_method(config: PretrainConfig, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    """Apply `config.method` to `model` in place; return (optimizer, schedules).

    `schedules` is a rankwise.layers.Schedules (empty for methods without periodic actions).
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
    if method in ("galore", "fira"):
        import rankwise.optim as ro

        preset = "galore_adamw" if method == "galore" else "fira"
        opt = ro.create(preset, model, target_modules=TARGET_MODULES, rank=rank,
                        update_proj_gap=config.resolved_period, **adamw,
                        **config.optimizer_options)
        return opt, schedule_for(model, opt, seed=config.seed)
    if method == "lora":
        from rankwise.adapt import adapt_

        adapt_(model, "lora", target_modules=TARGET_MODULES, seed=config.seed, **layer_kw)
        _unfreeze_all_but_lora_bases(model)
    elif method in _LAYER_METHODS:
        convert_(model, method, TARGET_MODULES, seed=config.seed, **layer_kw)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, **adamw, **config.optimizer_options)
    options: dict[str, Any] = {}
    if method in _SCHEDULED:
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


# ----------------------------------------------------------------------------- result
@dataclass
class PretrainResult:
    """What a run measured. Lists are per update from step 1 (losses: the LM loss only;
    step_seconds: wall time of each update, evaluation and checkpoints excluded)."""

    config: dict[str, Any]
    steps: int
    tokens: int
    completed: bool
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)
    val_perplexity: float = math.nan
    train_seconds: float = 0.0
    tokens_per_s: float = 0.0
    parameters: dict[str, int] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    schedule_runs: dict[str, list[int]] = field(default_factory=dict)
    resumed_from: int | None = None
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- the loop
def _evaluate(model: nn.Module, data: PretrainData, config: PretrainConfig) -> float:
    from rankwise.eval import perplexity

    was_training = model.training
    model.eval()
    try:
        return perplexity(model, None, data.val, seq_len=config.seq_len,
                          batch_size=config.batch_size, progress=False)
    finally:
        model.train(was_training)


def _train_step(model, x, optimizer, schedules, params, config) -> float:
    out = model(input_ids=x, labels=x)
    loss = out.loss
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(f"the training loss became {float(loss)}: lower the learning "
                                 f"rate (now {config.resolved_lr}) or raise warmup_steps")
    total = loss
    if schedules.truncates:  # Maestro: ordered-dropout forward distilled from the full one
        from rankwise.layers import MaestroSchedule

        with schedules.truncated():
            partial = model(input_ids=x).logits
        total = loss + MaestroSchedule.distillation_loss(out.logits, partial)
    total.backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    schedules.before_step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def pretrain(
    config: PretrainConfig,
    *,
    data: PretrainData | None = None,
    tokenizer: Any | None = None,
    resume: bool = False,
) -> PretrainResult:
    """Train `config`'s model with its method; see the module docstring.

    Args:
        config: the run.
        data: ready token ids (skips tokenisation; benchmarks share one PretrainData).
        tokenizer: used to tokenise the corpus when `data` is None, and saved with the export.
        resume: continue from the newest checkpoint in `config.out` (a checkpoint of another
            method or configuration raises ValueError).
    """
    # torch's global RNG (dropout) is seeded from the config inside a fork, so runs are
    # reproducible and the caller's RNG state is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _run(config, data, tokenizer, resume)


def _run(
    config: PretrainConfig, data: PretrainData | None, tokenizer: Any | None, resume: bool
) -> PretrainResult:
    from tqdm.auto import tqdm

    from rankwise import profiling
    from rankwise.io import write_json
    from rankwise.train import checkpoint as ckpt

    out = Path(config.out) if config.out is not None else None
    found = ckpt.checkpoint_to_resume(out, resume, out_flag="config.out")
    if found is not None:
        ckpt.check_compatible(ckpt.read_checkpoint_meta(found), config, found)
    if data is None:
        data, tokenizer = prepare_data(config, tokenizer)
    model = build_model(config, data.vocab_size, tokenizer if data.vocab_map is None else None)
    model.train()
    optimizer, schedules = setup_method(config, model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    result = PretrainResult(config=config.to_dict(), steps=0, tokens=0, completed=False)
    start = 0
    if found is not None:
        loaded = ckpt.load_checkpoint(found, model=model, optimizer=optimizer,
                                      schedules=schedules, config=config)
        start = loaded["step"]
        rows = loaded["extra"]["data"]["rows"]
        if rows != data.train.shape[0]:
            raise ValueError(f"{found} was trained on {rows} rows of tokens, this run has "
                             f"{data.train.shape[0]}: resume with the same data and tokenizer")
        history = loaded["extra"]["history"]
        result.losses, result.lrs, result.val = history["losses"], history["lrs"], history["val"]
        result.step_seconds = history["step_seconds"]
        result.train_seconds = sum(result.step_seconds)
        result.resumed_from = start
        logger.info("resumed %s at step %d from %s", config.method, start, found)
    n_rows = data.train.shape[0]
    stop = config.steps if config.stop_after is None else min(config.steps, config.stop_after)
    every_eval, last_saved = config.resolved_eval_every, None

    def save(step: int) -> None:
        nonlocal last_saved
        history = {"losses": result.losses, "lrs": result.lrs, "val": result.val,
                   "step_seconds": result.step_seconds}
        extra = {"history": history, "data": {"rows": n_rows, "samples": step * config.batch_size}}
        last_saved = ckpt.save_checkpoint(out, step=step, model=model, optimizer=optimizer,
                                          schedules=schedules, config=config, extra=extra,
                                          keep=config.keep_checkpoints)

    bar = tqdm(total=config.steps, initial=start, desc=f"pretrain {config.method}",
               unit="step", disable=not config.progress, leave=False)
    with bar:
        for step in range(start, stop):
            mult = lr_multiplier(config, step)
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * mult
            x = data.train[batch_rows(step, config.batch_size, n_rows, config.seed)]
            t0 = time.perf_counter()
            loss = _train_step(model, x, optimizer, schedules, params, config)
            schedules(step + 1)
            result.step_seconds.append(time.perf_counter() - t0)
            result.train_seconds += result.step_seconds[-1]
            result.losses.append(loss)
            result.lrs.append(base_lrs[0] * mult)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{base_lrs[0] * mult:.2e}", refresh=False)
            done = step + 1
            if done % every_eval == 0 or done == config.steps:
                result.val.append({"step": done, "perplexity": _evaluate(model, data, config)})
            if out is not None and config.save_every and done % config.save_every == 0:
                save(done)
    done = max(start, stop)
    result.steps = done
    result.tokens = done * config.batch_size * config.seq_len
    result.completed = done == config.steps
    if result.val and result.val[-1]["step"] == done:
        result.val_perplexity = result.val[-1]["perplexity"]
    else:  # an interrupted run reports it but keeps it out of the (resumable) history
        result.val_perplexity = _evaluate(model, data, config)
        if result.completed:
            result.val.append({"step": done, "perplexity": result.val_perplexity})
    result.tokens_per_s = result.tokens / result.train_seconds if result.train_seconds else 0.0
    result.parameters = parameter_counts(model)
    result.memory = {"weights": profiling.parameter_bytes(model),
                     "optimizer": profiling.optimizer_state_bytes(optimizer)}
    result.memory["total"] = result.memory["weights"] + result.memory["optimizer"]
    result.schedule_runs = schedules.runs
    if out is not None:
        if last_saved is None or not last_saved.name.endswith(f"{done:06d}"):
            save(done)
        result.checkpoint = str(last_saved)
        write_json(out / "result.json", result.to_dict())
        if result.completed and config.export:
            ckpt.export_dense(model, out / "final", tokenizer=tokenizer,
                              vocab_map=data.vocab_map)
    return result
