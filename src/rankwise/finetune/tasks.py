"""The two embedded fine-tuning tasks: data, model wrapper, loss and evaluation.

* ``fortunes``: topic classification of the fortunes set (8 topics, 1670 train / 463 test
  texts). The model is an encoder (MiniLM-L6) with sentence-transformers' pooling (the
  attention-mask-aware mean of the last hidden states) followed by a trainable ``nn.Linear``
  head: `TopicClassifier`. Metric: test accuracy.
* ``python-docs``: causal-LM domain adaptation (SmolLM2-135M) on the Python-docs train split,
  packed into rows of seq_len tokens (a prefix of `train_tokens`). Metric: perplexity on a
  fixed prefix (`eval_tokens`) of the validation split.

Batches are a function of the step alone (`rankwise.train.loop.batch_rows`: a seeded
permutation per epoch), so a resumed run reads exactly the rows the uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ClassificationData",
    "LMData",
    "TopicClassifier",
    "default_targets",
    "evaluate",
    "prepare_data",
    "task_batch",
    "task_loss",
]


@dataclass
class ClassificationData:
    """Tokenised classification data: ids/mask (N, L) int64, labels (N,) int64."""

    train_ids: torch.Tensor
    train_mask: torch.Tensor
    train_labels: torch.Tensor
    test_ids: torch.Tensor
    test_mask: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    @property
    def n_rows(self) -> int:
        return int(self.train_ids.shape[0])


@dataclass
class LMData:
    """Packed causal-LM data: train rows (N, L) int64, validation stream (M,) int64."""

    train: torch.Tensor
    val: torch.Tensor

    @property
    def n_rows(self) -> int:
        return int(self.train.shape[0])


TaskData = ClassificationData | LMData


class TopicClassifier(nn.Module):
    """Encoder + mean pooling + Linear head (the fortunes model).

    ``forward(input_ids, attention_mask, labels=None) -> {"logits": (B, C), "loss"}``.
    """

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        hidden = encoder.config.hidden_size
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        logits = self.head(pooled)
        result = {"logits": logits}
        if labels is not None:
            result["loss"] = F.cross_entropy(logits.float(), labels)
        return result


# ----------------------------------------------------------------------------- targets
_FAMILY_TARGETS = ((".q_proj", ["q_proj", "v_proj"]), (".query", ["query", "value"]),
                   (".c_attn", ["c_attn"]))


def default_targets(model: nn.Module) -> list[str]:
    """The attention query/value projections of the model family (LoRA paper's choice)."""
    names = [n for n, _ in model.named_modules()]
    for suffix, targets in _FAMILY_TARGETS:
        if any(n.endswith(suffix) for n in names):
            return targets
    raise ValueError(
        f"no default target modules for a {type(model).__name__}: pass --target-modules "
        "(e.g. all-linear, or layer names such as q_proj v_proj)"
    )


# ----------------------------------------------------------------------------- data
def _encode(tokenizer: Any, texts: list[str], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len,
                    return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def prepare_data(task: str, tokenizer: Any, *, seq_len: int, train_tokens: int,
                 eval_tokens: int, eval_samples: int | None = None) -> TaskData:
    """Tokenise the embedded data of `task` (see the module docstring)."""
    if task == "fortunes":
        from rankwise.data import load_topics

        texts, labels, names = load_topics("fortunes", "train")
        test_texts, test_labels, _ = load_topics("fortunes", "test")
        if eval_samples is not None:
            test_texts, test_labels = test_texts[:eval_samples], test_labels[:eval_samples]
        ids, mask = _encode(tokenizer, list(texts), seq_len)
        tids, tmask = _encode(tokenizer, list(test_texts), seq_len)
        return ClassificationData(ids, mask, torch.as_tensor(labels, dtype=torch.long),
                                  tids, tmask, torch.as_tensor(test_labels, dtype=torch.long),
                                  num_classes=len(names))
    if task == "python-docs":
        from rankwise.data import load_corpus, token_stream

        train = token_stream(load_corpus("python-docs", "train"), tokenizer,
                             max_tokens=train_tokens)
        val = token_stream(load_corpus("python-docs", "validation"), tokenizer,
                           max_tokens=eval_tokens)
        rows = train.numel() // seq_len
        if rows < 1:
            raise ValueError(f"train_tokens={train_tokens} gives no row of seq_len={seq_len}: "
                             "raise train_tokens or lower seq_len")
        return LMData(train[: rows * seq_len].view(rows, seq_len), val)
    raise ValueError(f"unknown task {task!r}: choose fortunes or python-docs")


def task_batch(data: TaskData, step: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """The training batch of optimizer step `step` (0-based)."""
    from rankwise.train.loop import batch_rows

    rows = batch_rows(step, batch_size, data.n_rows, seed)
    if isinstance(data, ClassificationData):
        return {"input_ids": data.train_ids[rows], "attention_mask": data.train_mask[rows],
                "labels": data.train_labels[rows]}
    x = data.train[rows]
    return {"input_ids": x, "labels": x}


def task_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss: cross-entropy of the head / the causal-LM loss (labels = inputs)."""
    out = model(**batch)
    return out["loss"] if isinstance(out, dict) else out.loss


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluate(model: nn.Module, data: TaskData, *, seq_len: int, batch_size: int) -> float:
    """Test accuracy (fortunes) or validation perplexity (python-docs) of `model`."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(data, LMData):
            from rankwise.eval import perplexity

            return perplexity(model, None, data.val, seq_len=seq_len, batch_size=batch_size,
                              progress=False)
        from rankwise.eval import accuracy

        device, preds = _device(model), []
        with torch.inference_mode():
            for i in range(0, data.test_ids.shape[0], 64):
                out = model(input_ids=data.test_ids[i:i + 64].to(device),
                            attention_mask=data.test_mask[i:i + 64].to(device))
                preds.append(out["logits"].argmax(-1).cpu())
        return accuracy(torch.cat(preds), data.test_labels)
    finally:
        model.train(was_training)
