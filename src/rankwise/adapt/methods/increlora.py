"""IncreLoRA: AdaLoRA's SVD-form adapter whose rank *grows* during training, by importance
(Zhang et al. 2023, arXiv 2308.12043).

    ΔW = [B_1 … B_m B_res] · ([A_1; …; A_m; A_res] ⊙ [E_1; …; E_m; E_res]) · α / (N + 1e-5)

Block 1 has rank ``rank`` (official ``lora_r``, default 1), every later block ``add_rank``
ranks; N (``ranknum``) is the active rank Σ_k rank(block k). A, B ~ N(0, 0.02²), E = 0: a
no-op, except for the *reserve* block (A_res, B_res, E_res): with ``advance_learn`` (default)
its A/B are trainable from the start and E_res is fixed at 1e-5 (not trainable) so its directions
pre-train before activation; without it the reserve is frozen and E_res = 0. Only E_res, and
A_res/B_res without advance learning, are buffers (stored, never trainable).

Training rules (`rankwise.adapt.attach_rules`; training without them raises):

* while growing, the forward forms ΔW densely and a gradient hook on it records the module score
  ``s = Σ|ΔW ⊙ ∂L/∂ΔW| / √numel(ΔW)`` (summed over a step's micro-batches; official: the last
  backward); after every step ``Ī ← β1 Ī + (1 − β1) s``, ``Ū ← β2 Ū + (1 − β2)|s − Ī|``;
* after step t (0-based) with t > init_warmup and t % incre_interval == 0: the h modules of
  largest Ī·Ū grow, h = min(top_h, ⌊remaining / add_rank⌋), remaining = target_rank·#modules −
  Σ N: each activates its reserve (N += add_rank, E_res becomes a trainable parameter, the same
  A_res/B_res objects keep their optimizer state) and draws a new reserve; the new tensors are
  appended to the optimizer param group that holds the layer's first A (same lr, weight decay,
  betas; their state starts fresh at their first step);
* when no further growth fits (remaining < add_rank): dense scoring stops and every E_res ← 0,
  so the model is exactly the active blocks;
* loss term ``orth_reg_weight · mean over every A/B parameter of ‖AAᵀ − I‖_F / ‖BᵀB − I‖_F``
  where, as in the official per-rank-1 ``ParameterList``, block 1 is one matrix and each later
  (and reserve) rank is its own 1-row term.

Choices: the official code adds a *new* param group per growth; here the tensors join the
layer's existing group instead (identical hyper-parameters), because a new group breaks every
LR scheduler (torch's schedulers zip their per-group base lrs with the groups, strictly in
torch ≥ 2.13) and would miss the schedule. The official h = min(top_h, remaining) counts *ranks* and can overshoot the target
when add_rank > 1; here growth never exceeds it (the last ``remaining mod add_rank`` ranks stay
unallocated), and a module whose rank would pass min(out, in) is no longer eligible. The official rescales every active rank by N_old/N_new at a growth (ΔW divides by
N); ``keep_output=True`` instead multiplies the active E's by N_new/N_old so a growth leaves the
output unchanged (exactly, with advance_learn False). Defaults: the MRPC script (target_rank 8,
rank 1, init_warmup 100, incre_interval 100, top_h 10, β 0.85, α 32, dropout 0.3,
orth_reg_weight 0.1, advance_learn True); add_rank from {2: 1, 4: 2, 6: 3, 8: 4}[target_rank].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rankwise.adapt.context import InitContext, layer_seed
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.method import (
    AdapterMethod,
    MethodConfig,
    dropout_option,
    register_method,
)
from rankwise.adapt.methods.adalora import _check_beta
from rankwise.config import option
from rankwise.linalg import make_generator

if TYPE_CHECKING:  # pragma: no cover
    from rankwise.adapt.rules import RuleState

ADD_RANK = {2: 1, 4: 2, 6: 3, 8: 4}
RESERVE_E = 1e-5


@dataclass(frozen=True, kw_only=True)
class IncreLoRAConfig(MethodConfig):
    """IncreLoRA options (official names in parentheses)."""

    rank: int = option(1, "initial rank of every module (``lora_r``)")
    target_rank: int = option(8, "average final rank (``target_rank``); total = target_rank · "
                              "#modules")
    add_rank: int | None = option(None, "ranks added per growth (``incre_rank_num``); None: "
                                  "ADD_RANK[target_rank]")
    init_warmup: int = option(100, "no growth up to this step (growth at steps t > init_warmup, "
                              "t % incre_interval == 0)")
    incre_interval: int = option(100, "steps between growths (at t % incre_interval == 0, after "
                                 "init_warmup)")
    top_h: int = option(10, "modules grown per event")
    beta1: float = option(0.85, "EMA factor of the score")
    beta2: float = option(0.85, "EMA factor of the score's uncertainty")
    alpha: float = option(32.0, "α of the scale α/(N + 1e-5)")
    dropout: float = dropout_option(0.3)
    orth_reg_weight: float = option(0.1, "weight of the orthogonality penalty (``reg_orth_coef``)")
    advance_learn: bool = option(True, "pre-train the reserve (A_res, B_res trainable, E_res = "
                                 "1e-5)")
    keep_output: bool = option(False, "rescale E at a growth so the output does not jump (not "
                               "official)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.target_rank, int) or self.target_rank < self.rank:
            raise ValueError(f"target_rank must be an integer >= rank={self.rank}, "
                             f"got {self.target_rank!r}")
        if self.add_rank is None and self.target_rank not in ADD_RANK:
            raise ValueError(f"add_rank has no default for target_rank={self.target_rank} "
                             f"(defaults exist for {sorted(ADD_RANK)}): set add_rank")
        if self.add_rank is not None and (not isinstance(self.add_rank, int) or self.add_rank < 1):
            raise ValueError(f"add_rank must be an integer >= 1, got {self.add_rank!r}")
        for name in ("init_warmup", "incre_interval", "top_h"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "init_warmup" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        _check_beta("beta1", self.beta1)
        _check_beta("beta2", self.beta2)
        if not isinstance(self.alpha, int | float) or not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")

    @property
    def step_rank(self) -> int:
        """Ranks added per growth event."""
        return self.add_rank if self.add_rank is not None else ADD_RANK[self.target_rank]


@register_method(
    "increlora", summary="IncreLoRA (Zhang et al. 2023): SVD-form LoRA whose rank grows by importance"
)
class IncreLoRA(AdapterMethod):
    """SVD-form adapter stored as blocks that grow by `add_rank` ranks at importance events."""

    config_cls = IncreLoRAConfig
    config: IncreLoRAConfig
    has_rules = True

    def __init__(self, config: IncreLoRAConfig, geometry: Geometry,
                 blocks: Sequence[int] | None = None) -> None:
        super().__init__(config, geometry)
        self.check_rank(config.target_rank)
        self._init = (self.param_dtype(geometry), geometry.module.weight.device)
        blocks = list(blocks) if blocks is not None else [config.rank]
        self.A = nn.ParameterList([self._new(k, self.in_features) for k in blocks])
        self.B = nn.ParameterList([self._new(self.out_features, k) for k in blocks])
        self.E = nn.ParameterList([self._new(k) for k in blocks])
        n = config.step_rank
        if config.advance_learn:
            self.A_res = self._new(n, self.in_features)
            self.B_res = self._new(self.out_features, n)
        else:
            self.register_buffer("A_res", self._zeros(n, self.in_features))
            self.register_buffer("B_res", self._zeros(self.out_features, n))
        self.register_buffer("E_res", self._zeros(n))
        self.dropout = self.input_dropout(config.dropout)
        self.seed = 0
        self.growths = 0
        self.finished = False  # growth over: no dense scoring, E_res = 0
        self.score = 0.0
        self.ipt = 0.0
        self.unc = 0.0

    def _zeros(self, *shape: int) -> torch.Tensor:
        """Zeros in the adapter's current dtype/device (it may have moved since __init__)."""
        A = self._modules.get("A")
        if A is not None and len(A):
            return A[0].new_zeros(shape)
        return torch.zeros(*shape, dtype=self._init[0], device=self._init[1])

    def _new(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(self._zeros(*shape))

    @property
    def ranknum(self) -> int:
        """N: the active rank."""
        return sum(e.numel() for e in self.E)

    @property
    def scale(self) -> float:
        return self.config.alpha / (self.ranknum + 1e-5)

    def _draw_reserve(self, gen: torch.Generator) -> None:
        with torch.no_grad():
            self.A_res.copy_(0.02 * torch.randn(self.A_res.shape, generator=gen))
            self.B_res.copy_(0.02 * torch.randn(self.B_res.shape, generator=gen))
            self.E_res.fill_(RESERVE_E if self.config.advance_learn else 0.0)

    def initialize(self, ctx: InitContext) -> None:
        """A, B ~ N(0, 0.02²), E = 0; the reserve drawn the same way (E_res 1e-5 or 0)."""
        gen = ctx.generator
        with torch.no_grad():
            self.A[0].copy_(0.02 * torch.randn(self.A[0].shape, generator=gen))
            self.B[0].copy_(0.02 * torch.randn(self.B[0].shape, generator=gen))
            self.E[0].zero_()
        self._draw_reserve(gen)
        self.seed = layer_seed(ctx.seed, ctx.fqn + "/increlora")

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A (R, in), E (R,), B (out, R)) over all blocks and the reserve."""
        A = torch.cat([*self.A, self.A_res])
        E = torch.cat([*self.E, self.E_res])
        B = torch.cat([*self.B, self.B_res], dim=1)
        return A, E, B

    def delta_weight(self) -> torch.Tensor:
        A, E, B = self.factors()
        return self.scale * ((B * E) @ A)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, geo: Geometry) -> torch.Tensor:
        x = self.dropout(x.to(self.A[0].dtype))
        if self.training and torch.is_grad_enabled() and not self.finished:
            delta = self.delta_weight()
            if delta.requires_grad:
                delta.register_hook(self._record_score(delta.detach()))
            return base_out + geo.apply_in(x, delta).to(base_out.dtype)
        A, E, B = self.factors()
        h = geo.apply_in(x, A) * E
        return base_out + (self.scale * geo.apply_features(h, B)).to(base_out.dtype)

    def _record_score(self, delta: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            self.score += float((delta * grad).abs().sum()) / math.sqrt(delta.numel())
        return hook

    # ------------------------------------------------------------------ rules
    def update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        self.ipt = b1 * self.ipt + (1 - b1) * self.score
        self.unc = b2 * self.unc + (1 - b2) * abs(self.score - self.ipt)
        self.score = 0.0

    def grow(self) -> list[nn.Parameter]:
        """Activate the reserve (N += add_rank), draw a new one; returns the new trainables."""
        cfg, old_n = self.config, self.ranknum
        with torch.no_grad():
            e_new = nn.Parameter(self.E_res.detach().clone())
            if cfg.advance_learn:
                a_new, b_new = self.A_res, self.B_res  # same objects: optimizer state kept
            else:
                a_new = nn.Parameter(self.A_res.detach().clone())
                b_new = nn.Parameter(self.B_res.detach().clone())
            self.A.append(a_new)
            self.B.append(b_new)
            self.E.append(e_new)
            if cfg.keep_output:
                ratio = (self.ranknum + 1e-5) / (old_n + 1e-5)
                for e in self.E:
                    e.mul_(ratio)
            self.growths += 1
            gen = make_generator((self.seed * 1_000_003 + self.growths) % 2**62)
            if cfg.advance_learn:
                self.A_res = self._new(*self.A_res.shape)
                self.B_res = self._new(*self.B_res.shape)
            self._draw_reserve(gen)
        new = [e_new] + ([self.A_res, self.B_res] if cfg.advance_learn else [a_new, b_new])
        return new

    def finish(self) -> None:
        """Growth over: stop dense scoring, zero the reserve's E (exactly the active blocks)."""
        self.finished = True
        self.E_res.zero_()

    def orth_terms(self) -> list[torch.Tensor]:
        """‖A₁A₁ᵀ − I‖_F, ‖B₁ᵀB₁ − I‖_F, then |‖a‖² − 1| per later (and reserve) rank."""
        eye = torch.eye(self.A[0].shape[0], dtype=self.A[0].dtype, device=self.A[0].device)
        terms = [torch.linalg.matrix_norm(self.A[0] @ self.A[0].T - eye),
                 torch.linalg.matrix_norm(self.B[0].T @ self.B[0] - eye)]
        rest_A = torch.cat([*self.A[1:], self.A_res])
        rest_B = torch.cat([*self.B[1:], self.B_res], dim=1)
        terms += list((rest_A.square().sum(dim=1) - 1).abs())
        terms += list((rest_B.square().sum(dim=0) - 1).abs())
        return terms

    @classmethod
    def group_regularizer(cls, methods: Sequence[AdapterMethod]) -> torch.Tensor | None:
        terms = [m.config.orth_reg_weight * t  # type: ignore[attr-defined]
                 for m in methods for t in m.orth_terms()]  # type: ignore[attr-defined]
        return torch.stack([t.to(terms[0].dtype) for t in terms]).mean() if terms else None

    @classmethod
    def group_after_step(cls, methods: Sequence[AdapterMethod], state: RuleState) -> None:
        """Importance EMA; at growth steps grow the top modules and extend the optimizer."""
        ms: list[IncreLoRA] = list(methods)  # type: ignore[arg-type]
        live = [m for m in ms if not m.finished]
        if not live:
            return
        cfg = ms[0].config
        target = cfg.target_rank * len(ms)
        for m in live:
            m.update_importance()
        t = state.step
        if t > cfg.init_warmup and t % cfg.incre_interval == 0:
            room = [m.ranknum + cfg.step_rank <= min(m.out_features, m.in_features) for m in ms]
            h = min(cfg.top_h, (target - sum(m.ranknum for m in ms)) // cfg.step_rank, sum(room))
            if h > 0:
                scores = torch.tensor([m.ipt * m.unc if ok else -math.inf
                                       for m, ok in zip(ms, room, strict=True)],
                                      dtype=torch.float64)
                chosen = torch.topk(scores, h).indices.tolist()
                _add_to_optimizer(state.optimizer, [(ms[i], ms[i].grow()) for i in chosen])
        full = all(m.ranknum + cfg.step_rank > min(m.out_features, m.in_features) for m in ms)
        if target - sum(m.ranknum for m in ms) < cfg.step_rank or full:
            for m in live:
                m.finish()

    def rule_state(self) -> dict[str, Any]:
        """Score EMAs, for `AdapterRules.state_dict` (exact resume)."""
        return {"score": self.score, "ipt": self.ipt, "unc": self.unc}

    def load_rule_state(self, state: dict[str, Any]) -> None:
        self.score, self.ipt, self.unc = (float(state[k]) for k in ("score", "ipt", "unc"))

    # ------------------------------------------------------------------ save / load
    def extra_state(self) -> dict[str, Any]:
        return {"blocks": [e.numel() for e in self.E], "finished": self.finished,
                "growths": self.growths, "seed": self.seed}

    @classmethod
    def from_saved(cls, config: IncreLoRAConfig, geometry: Geometry, extra: dict[str, Any]
                   ) -> IncreLoRA:
        method = cls(config, geometry, blocks=extra.get("blocks"))
        method.finished = bool(extra.get("finished", False))
        method.growths = int(extra.get("growths", 0))
        method.seed = int(extra.get("seed", 0))
        return method


def _add_to_optimizer(optimizer: torch.optim.Optimizer,
                      grown: list[tuple[IncreLoRA, list[nn.Parameter]]]) -> None:
    """Add each layer's new tensors to the param group holding its first A, keeping the
    group's order equal to ``model.parameters()`` order (the layer's block is replaced by its
    trainable parameters in module order), so an optimizer rebuilt from the model after loading
    the grown adapter matches a saved optimizer state_dict index for index."""
    owner = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for method, params in grown:
        group = owner.get(id(method.A[0]))
        if group is None:
            raise ValueError("IncreLoRA: the optimizer does not hold the adapter's parameters; "
                             "build it from the model's trainable parameters")
        mine = {id(p) for p in method.parameters()}
        held = group["params"]
        keep = {id(p) for p in held} | {id(p) for p in params}
        first = next(i for i, p in enumerate(held) if id(p) in mine)
        before = [p for p in held[:first] if id(p) not in mine]
        after = [p for p in held[first:] if id(p) not in mine]
        block = [p for p in method.parameters() if id(p) in keep]
        group["params"] = before + block + after
