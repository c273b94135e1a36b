"""Model surgery: find target modules by name, swap them, count parameters and FLOPs.

Matching follows PEFT's `target_modules` vocabulary so that a config written for PEFT selects
the same layers here (peft `tuners_utils.check_target_module_exists`):

* a **list** of names: a name matches a module whose fully qualified name (fqn) equals it or
  ends with it on a "." boundary (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``);
  list entries holding a glob character (``* ? [``) are shell globs matched against the whole
  fqn or any "."-suffix of it (``"*.mlp.*"``, ``"layers.1.*"``), an extension over PEFT;
* a **str** is a regular expression that must match the whole fqn (``re.fullmatch``);
* ``"all-linear"`` is every linear-like layer (``nn.Linear`` and Hugging Face ``Conv1D``)
  except the output head, as PEFT does: the module returned by ``get_output_embeddings()``,
  any linear whose weight is tied to an ``nn.Embedding`` and any module named ``lm_head``.

Weight layout is (out, in) everywhere in rankwise; GPT-2's ``Conv1D`` stores (in, out), which
`linear_shape` and `weight_as_matrix` hide.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
_GLOB_CHARS = frozenset("*?[")


@functools.cache
def _conv1d_type() -> type | None:
    """Hugging Face's ``Conv1D`` (GPT-2's transposed linear) if transformers is importable."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return None
    return Conv1D


def linear_types() -> tuple[type, ...]:
    """The linear-like module types: ``nn.Linear`` and, when available, HF ``Conv1D``."""
    conv1d = _conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def supported_types() -> tuple[type, ...]:
    """Every module type rankwise can treat as a weight matrix."""
    return (*linear_types(), nn.Embedding, nn.Conv2d)


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


# ----------------------------------------------------------------------------- matching
def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s) that "all-linear" leaves out (see the module docstring)."""
    names: set[str] = set()
    heads: list[nn.Module] = []
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        with contextlib.suppress(NotImplementedError, AttributeError):
            head = get_out()
            if isinstance(head, nn.Module):
                heads.append(head)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if any(module is h for h in heads) or name.rsplit(".", 1)[-1] == "lm_head":
            names.add(name)
        elif isinstance(module, linear_types()) and id(module.weight) in embedding_weights:
            names.add(name)  # tied to an input embedding: the LM head under another name
    return names


def _pattern_matches(pattern: str, fqn: str) -> bool:
    """One list entry: exact fqn or "."-suffix (PEFT), or a glob over the fqn or a suffix."""
    if _GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(fqn, pattern) or fnmatch.fnmatchcase(fqn, "*." + pattern)
    return fqn == pattern or fqn.endswith("." + pattern)


def _compile_regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(
            f"target_modules={pattern!r} is not a valid regular expression ({exc}): a str is a "
            f"full-match regex (PEFT's rule); for a glob or a name suffix pass a list, "
            f"e.g. [{pattern!r}]"
        ) from None


def _examples(names: Sequence[str], k: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (f", ... ({len(names)} in all)" if len(names) > k else "")


def find_modules(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    *,
    types: Sequence[type] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """Modules of `model` selected by PEFT-style `target_modules`, in ``named_modules`` order.

    Args:
        model: any ``nn.Module`` or Hugging Face model.
        target_modules: a list of names / globs, a full-match regex str, ``"all-linear"``, or
            None for every module of `types` except the output head.
        types: module types to select (default: ``nn.Linear`` and HF ``Conv1D``); may include
            ``nn.Embedding`` and ``nn.Conv2d``.
        exclude: names to drop, in the same vocabulary as `target_modules` (PEFT's
            ``exclude_modules``).

    Returns:
        ``{fqn: module}``.

    Raises:
        ValueError: a pattern (or the whole selection) matched nothing; the message names the
            pattern and shows module names of the right type.
        TypeError: a module named explicitly (exact name or suffix) is not of `types`, or a
            regex/glob matched only modules of other types.
    """
    types = tuple(types) if types is not None else linear_types()
    bad = [t for t in types if not issubclass(t, supported_types())]
    if bad:
        raise TypeError(
            f"unsupported module types {[t.__name__ for t in bad]}: choose among "
            f"{[t.__name__ for t in supported_types()]}"
        )
    named = [(n, m) for n, m in model.named_modules() if n]
    of_type = [n for n, m in named if isinstance(m, types)]
    type_names = "/".join(t.__name__ for t in types)

    if target_modules is None or (
        isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    ):
        wanted = types if target_modules is None else linear_types()
        heads = output_head_names(model)
        selected = {n for n, m in named if isinstance(m, wanted) and n not in heads}
        if not selected:
            raise ValueError(
                f"model {type(model).__name__} has no {type_names} layers besides its output head "
                f"{sorted(heads)}: pass types=... naming the layer types it has"
            )
    elif isinstance(target_modules, str):
        regex = _compile_regex(target_modules)
        hits = [(n, m) for n, m in named if regex.fullmatch(n)]
        selected = _keep_typed(target_modules, hits, types, of_type, type_names, explicit=False)
    else:
        if not target_modules:
            raise ValueError("target_modules is an empty list: name at least one module")
        selected = set()
        for pattern in target_modules:
            if not isinstance(pattern, str):
                raise TypeError(f"target_modules entries must be str, got {pattern!r}")
            hits = [(n, m) for n, m in named if _pattern_matches(pattern, n)]
            explicit = not (_GLOB_CHARS & set(pattern))
            selected |= _keep_typed(pattern, hits, types, of_type, type_names, explicit=explicit)

    if exclude is not None:
        if isinstance(exclude, str):
            regex = _compile_regex(exclude)
            selected = {n for n in selected if not regex.fullmatch(n)}
        else:
            selected = {n for n in selected if not any(_pattern_matches(p, n) for p in exclude)}
        if not selected:
            raise ValueError(f"exclude={exclude!r} removed every selected module: exclude fewer")
    return {n: m for n, m in named if n in selected}


def _keep_typed(
    pattern: str,
    hits: list[tuple[str, nn.Module]],
    types: tuple[type, ...],
    of_type: list[str],
    type_names: str,
    *,
    explicit: bool,
) -> set[str]:
    """Filter one pattern's hits to `types`, raising the errors `find_modules` documents."""
    if not hits:
        raise ValueError(
            f"target_modules pattern {pattern!r} matched no module: {type_names} modules in "
            f"this model include {_examples(of_type)}"
        )
    wrong = [(n, m) for n, m in hits if not isinstance(m, types)]
    good = {n for n, m in hits if isinstance(m, types)}
    # A bare name (PEFT's suffix rule) says "this module": it must be of a supported type.
    # A regex or glob sweeps, so modules of other types it passes over are simply skipped.
    if wrong and (explicit or not good):
        name, module = wrong[0]
        raise TypeError(
            f"target_modules pattern {pattern!r} matched {name!r}, a {type(module).__name__}, "
            f"which is not one of {type_names}: target its layers instead, e.g. "
            f"{_examples([n for n in of_type if n.startswith(name + '.')] or of_type, 3)}"
        )
    return good


# ----------------------------------------------------------------------------- swapping
def get_submodule(model: nn.Module, fqn: str) -> nn.Module:
    """``model.get_submodule(fqn)`` with an error that suggests near names."""
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        tail = fqn.rsplit(".", 1)[-1]
        near = [n for n, _ in model.named_modules() if n.endswith(tail)] or [
            n for n, _ in model.named_modules() if n
        ]
        raise ValueError(
            f"{type(model).__name__} has no submodule {fqn!r}: names include {_examples(near)}"
        ) from None


def replace_module(model: nn.Module, fqn: str, new_module: nn.Module) -> nn.Module:
    """Put `new_module` at `fqn` (works inside ModuleList/Sequential); return the old module."""
    if not fqn:
        raise ValueError("cannot replace the root module (fqn ''): replace the model itself")
    if not isinstance(new_module, nn.Module):
        raise TypeError(f"new_module for {fqn!r} must be an nn.Module, got {type(new_module)}")
    parent_name, _, child = fqn.rpartition(".")
    parent = get_submodule(model, parent_name) if parent_name else model
    old = get_submodule(model, fqn)
    setattr(parent, child, new_module)
    return old


def restore(model: nn.Module, originals: Mapping[str, nn.Module]) -> None:
    """Put back modules returned by `replace_module` (``{fqn: original}``)."""
    for fqn, module in originals.items():
        replace_module(model, fqn, module)


class ModuleSwap(contextlib.AbstractContextManager):
    """Swap modules for the duration of a ``with`` block; the originals come back on exit.

    >>> with ModuleSwap(model, {"layers.0.q_proj": low_rank}):
    ...     loss = evaluate(model)   # the originals are restored even if this raises
    """

    def __init__(self, model: nn.Module, replacements: Mapping[str, nn.Module]) -> None:
        self.model = model
        self.replacements = dict(replacements)
        self.originals: dict[str, nn.Module] = {}

    def __enter__(self) -> ModuleSwap:
        try:
            for fqn, new in self.replacements.items():
                self.originals[fqn] = replace_module(self.model, fqn, new)
        except BaseException:
            restore(self.model, self.originals)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        restore(self.model, self.originals)
        self.originals = {}


def replaced(model: nn.Module, replacements: Mapping[str, nn.Module]) -> ModuleSwap:
    """Context manager form of `replace_module` for several modules; see `ModuleSwap`."""
    return ModuleSwap(model, replacements)


# ----------------------------------------------------------------------------- shapes
def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of the module's weight viewed as a matrix (see `weight_as_matrix`)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if _is_conv1d(module):
        n_in, n_out = module.weight.shape  # Conv1D stores (in, out)
        return n_out, n_in
    if isinstance(module, nn.Embedding):
        return module.embedding_dim, module.num_embeddings
    if isinstance(module, nn.Conv2d):
        out, in_per_group, kh, kw = module.weight.shape
        return out, in_per_group * kh * kw
    raise TypeError(
        f"{type(module).__name__} is not a weight matrix: expected one of "
        f"{[t.__name__ for t in supported_types()]}"
    )


def weight_as_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) view sharing storage with the parameter.

    Linear: ``weight`` (out, in). Conv1D: ``weight.T`` (stored (in, out)). Embedding:
    ``weight.T`` (embedding_dim, num_embeddings), the matrix that maps a one-hot token to its
    vector (PEFT's LoRA embedding delta uses the same orientation). Conv2d: ``weight`` flattened
    to (out, in/groups * kh * kw), the matrix applied to unfolded patches.
    """
    linear_shape(module)  # type check
    weight = module.weight
    if isinstance(module, nn.Linear):
        return weight
    if _is_conv1d(module) or isinstance(module, nn.Embedding):
        return weight.T
    return weight.flatten(1)


# ----------------------------------------------------------------------------- counting
def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (each tied/shared parameter counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_report(model: nn.Module) -> dict[str, Any]:
    """Parameter counts: total, trainable, frozen and by the type of the module that owns them.

    Returns:
        ``{"total": int, "trainable": int, "frozen": int, "by_type": {type name: int}}``;
        a shared parameter is counted once, under the first module that owns it.
    """
    by_type: dict[str, int] = {}
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = type(module).__name__
            by_type[name] = by_type.get(name, 0) + p.numel()
    total = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    return {"total": total, "trainable": trainable, "frozen": total - trainable, "by_type": by_type}


def count_linear_flops(model: nn.Module, tokens: int) -> int:
    """Multiply-add FLOPs of every linear-like layer for `tokens` tokens: ``2 * m * n`` each.

    Walks ``nn.Linear`` and ``Conv1D`` modules (a factorised layer built from two Linears counts
    ``2r(m + n)``); a tied head runs, so it counts. Bias adds and attention products are left out.
    """
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    total = 0
    for module in model.modules():
        if isinstance(module, linear_types()):
            out, n_in = linear_shape(module)
            total += 2 * out * n_in
    return total * tokens


def forward_flops(model: nn.Module, *args: Any, by_operator: bool = False, **kwargs: Any) -> Any:
    """FLOPs of one ``model(*args, **kwargs)`` forward measured by ``FlopCounterMode``.

    A cross-check for `count_linear_flops`: PyTorch counts matmul-like ops (mm, addmm, bmm,
    convolutions, attention), 2 FLOPs per multiply-add.

    Returns:
        the total (int), or ``{operator name: flops}`` when `by_operator`.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*args, **kwargs)
    if not by_operator:
        return int(counter.get_total_flops())
    return {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


def iter_weight_matrices(
    modules: Mapping[str, nn.Module] | Iterable[tuple[str, nn.Module]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(fqn, (out, in) weight view)`` for each module from `find_modules`."""
    items = modules.items() if isinstance(modules, Mapping) else modules
    for name, module in items:
        yield name, weight_as_matrix(module)
