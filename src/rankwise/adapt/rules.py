"""Training-time rules (SoRA's proximal step, AdaLoRA's budget, IncreLoRA's growth, ...).

One mechanism, optimizer step hooks, never a special case in a training loop:

    opt = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    rules = rankwise.adapt.attach_rules(model, opt, total_steps=1000)
    for batch in data:                      # any loop: plain, Accelerate, Trainer
        model(**batch).loss.backward()
        opt.step()                          # rules run around every step
        opt.zero_grad()

With a transformers ``Trainer``: ``Trainer(..., callbacks=[rankwise.adapt.rules_callback()])``
attaches to the Trainer's optimizer at ``on_train_begin`` (total steps from ``max_steps``).

Around each ``optimizer.step()`` (``register_step_pre_hook`` / ``register_step_post_hook``):

1. before: each method's `regularizer()` (a loss term such as SoRA's λ₁·mean|g| or AdaLoRA's
   orthogonality penalty; a method class may instead define the classmethod
   ``group_regularizer(methods)`` for a model-wide term such as a mean over every layer) is
   differentiated and its gradient *added to .grad*, which equals
   adding it to the loss (∇(L + R) = ∇L + ∇R) without touching the loss code; then
   ``group_before_step`` (gradient rewrites). The regularizer gradient lands after any
   gradient clipping the loop did and once per optimizer step (not per micro-batch);
2. after: ``group_after_step`` with the gradients still present (AdaLoRA reads |θ·∇θ| there,
   then masks; SoRA soft-thresholds its gates).

Group hooks see every layer of one method class at once, so model-wide rules (a global rank
budget) are one classmethod. Rules that keep state between steps (AdaLoRA's importance EMAs)
expose it through ``rule_state()`` / ``load_rule_state(state)``; `AdapterRules.state_dict` and
`AdapterRules.load_state_dict` collect it with the step counter for an exact resume.

Silent degradation is impossible: a method with rules raises in
its first training forward if no rules are attached (PEFT's AdaLoRA silently becomes LoRA when
``update_and_allocate`` is forgotten), and merging or saving one that trained while its rule
never ran warns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankwise.adapt.api import adapter_layers
from rankwise.adapt.method import AdapterMethod

logger = logging.getLogger(__name__)


@dataclass
class RuleState:
    """What a rule sees at each step.

    Attributes:
        step: optimizer steps completed before this one (0 at the first step).
        total_steps: planned number of steps (None when unknown); schedules need it.
        optimizer: the optimizer being stepped (rules that grow parameters add groups to it).
    """

    step: int
    total_steps: int | None
    optimizer: torch.optim.Optimizer
    info: dict[str, Any] = field(default_factory=dict)


class AdapterRules:
    """Runs the training-time rules of every rule-bearing adapter of `model` (see module doc)."""

    def __init__(self, model: nn.Module, *, total_steps: int | None = None) -> None:
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1 or None, got {total_steps}")
        self.model = model
        self.total_steps = total_steps
        self.step = 0
        layers = {n: layer for n, layer in adapter_layers(model).items() if layer.adapter.has_rules}
        self.names = list(layers)
        self.methods = [layer.adapter for layer in layers.values()]
        self.optimizer: torch.optim.Optimizer | None = None
        self._handles: list[Any] = []

    def _groups(self) -> dict[type[AdapterMethod], list[AdapterMethod]]:
        groups: dict[type[AdapterMethod], list[AdapterMethod]] = {}
        for m in self.methods:
            groups.setdefault(type(m), []).append(m)
        return groups

    def attach(self, optimizer: torch.optim.Optimizer) -> AdapterRules:
        """Hook the rules onto `optimizer` (unwraps Accelerate's ``.optimizer``)."""
        if self._handles:
            raise ValueError("these rules are already attached: call detach() first")
        inner = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"attach_rules needs a torch optimizer, got {type(optimizer).__name__}")
        in_opt = {id(p) for g in inner.param_groups for p in g["params"]}
        for m in self.methods:
            missing = [n for n, p in m.named_parameters() if p.requires_grad and id(p) not in in_opt]
            if missing:
                raise ValueError(
                    f"the optimizer does not hold the {m.name!r} adapter's parameters "
                    f"{missing}: build it from the model's trainable parameters before attaching"
                )
        self.optimizer = inner
        self._handles = [
            inner.register_step_pre_hook(self._before),
            inner.register_step_post_hook(self._after),
        ]
        for m in self.methods:
            m.rules_attached = True
        logger.info("attached training rules of %d adapter layers", len(self.methods))
        return self

    def detach(self) -> None:
        """Remove the hooks; rule-bearing adapters then refuse to train again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self.methods:
            m.rules_attached = False

    def state(self) -> RuleState:
        assert self.optimizer is not None
        return RuleState(step=self.step, total_steps=self.total_steps, optimizer=self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint state: the step and, by layer name, each method's ``rule_state()`` (for
        methods that keep one, e.g. AdaLoRA's importance EMAs): tensors, numbers, nested dicts."""
        layers = {name: m.rule_state() for name, m in zip(self.names, self.methods, strict=True)
                  if hasattr(m, "rule_state")}
        return {"step": self.step, "layers": layers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (for an exact resume)."""
        saved = state.get("layers", {})
        expected = [n for n, m in zip(self.names, self.methods, strict=True)
                    if hasattr(m, "load_rule_state")]
        missing = sorted(set(expected) - set(saved))
        if missing:
            raise ValueError(f"the rules state lacks layers {missing[:5]}: it was saved for "
                             "another model or adapter; resume with the same settings")
        self.step = int(state["step"])
        for name, m in zip(self.names, self.methods, strict=True):
            m.rule_steps = self.step
            if name in expected:
                m.load_rule_state(saved[name])

    def regularizer(self) -> torch.Tensor:
        """Σ of the methods' regularizers (for logging; the hooks add its gradient)."""
        with torch.no_grad():
            terms = [r for ms in self._groups().values()
                     if (r := group_regularizer(ms)) is not None]
        return torch.stack([t.float() for t in terms]).sum() if terms else torch.zeros(())

    def _before(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for methods in self._groups().values():
            self._add_regularizer_grads(methods)
        state = self.state()
        for cls, methods in self._groups().items():
            cls.group_before_step(methods, state)

    def _after(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        state = self.state()
        for cls, methods in self._groups().items():
            cls.group_after_step(methods, state)
        for m in self.methods:
            m.rule_steps += 1
        self.step += 1

    @staticmethod
    def _add_regularizer_grads(methods: Sequence[AdapterMethod]) -> None:
        """Add ∇R to .grad for the regularizer R of one method class's layers."""
        with torch.enable_grad():
            reg = group_regularizer(methods)
            if reg is None or not reg.requires_grad:
                return
            params = [p for m in methods for p in m.parameters() if p.requires_grad]
            grads = torch.autograd.grad(reg, params, allow_unused=True)
            for p, g in zip(params, grads, strict=True):
                if g is None:
                    continue
                p.grad = g.detach() if p.grad is None else p.grad + g.detach()


def group_regularizer(methods: Sequence[AdapterMethod]) -> torch.Tensor | None:
    """The loss term of the layers `methods` (all of one class): the class's
    ``group_regularizer(methods)`` if it defines one, else Σ of each layer's `regularizer()`."""
    if not methods:
        return None
    hook = getattr(type(methods[0]), "group_regularizer", None)
    if hook is not None:
        return hook(methods)
    terms = [r for m in methods if (r := m.regularizer()) is not None]
    return sum(terms[1:], terms[0]) if terms else None


def attach_rules(
    model: nn.Module, optimizer: torch.optim.Optimizer, *, total_steps: int | None = None
) -> AdapterRules:
    """Attach the training rules of `model`'s adapters to `optimizer` (see the module doc).

    A model without rule-bearing adapters gets a no-op `AdapterRules`, so loops can call this
    unconditionally.
    """
    return AdapterRules(model, total_steps=total_steps).attach(optimizer)


def rules_callback(total_steps: int | None = None) -> Any:
    """A ``transformers.TrainerCallback`` that attaches the rules when training begins.

    Args:
        total_steps: overrides the Trainer's ``state.max_steps`` as the rules' horizon.
    """
    from transformers import TrainerCallback

    class AdapterRulesCallback(TrainerCallback):
        """Attach `AdapterRules` to the Trainer's optimizer; detach when training ends."""

        def __init__(self) -> None:
            self.rules: AdapterRules | None = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if model is None or optimizer is None:
                raise ValueError("the Trainer passed no model/optimizer to on_train_begin")
            steps = total_steps or (state.max_steps if state.max_steps > 0 else None)
            self.rules = attach_rules(model, optimizer, total_steps=steps)

        def on_train_end(self, args, state, control, **kwargs):
            if self.rules is not None:
                self.rules.detach()

    return AdapterRulesCallback()
