"""`LowRankOptimizer`: one torch.optim.Optimizer for the GaLore family, configured per group.

Every named method in `shared/methods/training.md` (cards 1-7) is a setting of a few axes,
each implemented once:

=============  ====================================================================
axis           group keys (defaults in `GROUP_DEFAULTS`)
=============  ====================================================================
projector      ``projector`` (None = plain AdamW group; "svd", "randomized", "dct",
               "random", "random_orthogonal", "identity"), ``rank`` or ``rank_fraction``,
               ``update_proj_gap`` T, ``proj_side``, ``proj_bits`` (8/4, Q-GaLore),
               ``proj_options`` (dict: oversample, power_iters, lazy_threshold, ...)
rule           ``rule``: "adam" | "adafactor" | "sgd" (momentum betas[0], no dampening,
               as torch.optim.SGD); ``adam_style`` "torch" | "galore"
               (functional.py says how they differ); ``state_bits`` 32 | 8
residual       ``residual``: "drop" (GaLore) | "fira" (Fira eq. 6 + limiter) |
               "sign" / "sgd" (FRUGAL's state-free update, lr x ``residual_scale``)
scaling        ``scaling``: None | "channel" | "tensor" (APOLLO: the raw gradient scaled
               by ||N||/||R||; ``limiter`` = Fira's norm-growth limiter)
subspace       ``moment_policy`` on refresh: "keep" (GaLore), "reproject", "reset"
change         (zero moments and restart bias correction, FRUGAL)
=============  ====================================================================

The update of a projected (m, n) weight at step t (0-based, before the step):

1. if t % T == 0 (or first call): refresh the projector from G; apply the moment policy;
2. R = down(G); Adam (or Adafactor) on R gives N (low-rank) and a step size eta;
3. delta = scale * up(N) [+ residual term] (or G * s for APOLLO scaling);
4. W -= eta * delta, with decoupled decay before (torch style) or after (galore style).

State is tensors only (``step``, ``moment_step``, moments, ``proj_*``, ``limiter_norm``), so
``state_dict()`` is weights_only-loadable and resume is exact. `layerwise.py` runs the same
per-parameter update from gradient hooks during backward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from rankwise.optim import distributed as dist_
from rankwise.optim import functional as F
from rankwise.optim import qstate, rules
from rankwise.optim.projector import PROJECTORS, Projector, check_matrix, make_projector

logger = logging.getLogger(__name__)

GROUP_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "adam_style": "torch",
    "projector": None,
    "rank": None,
    "rank_fraction": None,
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_side": "std",
    "proj_bits": None,
    "proj_group_size": 256,
    "proj_options": None,
    "rule": "adam",
    "state_bits": 32,
    "block_size": 256,
    "min_8bit_size": 4096,
    "residual": "drop",
    "residual_scale": 1.0,
    "scaling": None,
    "limiter": False,
    "limiter_gamma": 1.01,
    "scale_front": False,
    # Measured (benchmarks/results/optim.md, tiny Llama, val loss): for GaLore (SVD) resetting
    # the moments on a subspace change is best (4.94 vs keep 5.10, reproject 5.06); for DCT the
    # three are within 0.07 (reproject 5.40, keep 5.41, reset 5.47). Presets keep their papers'.
    "moment_policy": "reset",
    "adafactor_beta1": None,
    "decay_rate": -0.8,
    "clip_threshold": 1.0,
    "seed": 0,
    "nonfinite": "raise",
}

_CHOICES = {
    "adam_style": F.ADAM_STYLES,
    "rule": ("adam", "adafactor", "sgd"),
    "state_bits": (32, 8),
    "residual": ("drop", "fira", "sign", "sgd"),
    "scaling": (None, "channel", "tensor"),
    "moment_policy": ("keep", "reproject", "reset"),
    "nonfinite": ("raise", "skip"),
}


def resolve_rank(shape: tuple[int, ...], group: dict[str, Any]) -> int:
    """The integer rank of a parameter in a projected group (``rank`` or ``rank_fraction``)."""
    if group.get("rank") is not None:
        return group["rank"]
    return max(1, round(float(group["rank_fraction"]) * min(shape)))


class LowRankOptimizer(torch.optim.Optimizer):
    """Low-rank gradient projection optimizer over ordinary param groups.

    Args:
        params: parameters or param-group dicts (any key of `GROUP_DEFAULTS` per group;
            galore-torch's ``proj_type`` is accepted as ``proj_side``). A group with
            ``rank`` (or ``rank_fraction``) and no ``projector`` uses "svd", as galore-torch.
        **defaults: values for keys a group does not set.

    Example:
        >>> groups = rankwise.optim.param_groups(model, rank=128)  # attn/mlp vs the rest
        >>> opt = LowRankOptimizer(groups, lr=1e-2, projector="svd", scale=0.25)
    """

    def __init__(self, params: Iterable[Any], **defaults: Any) -> None:
        unknown = set(defaults) - set(GROUP_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown optimizer options {sorted(unknown)}: see GROUP_DEFAULTS")
        self._param_index: dict[int, int] = {}
        super().__init__(params, {**GROUP_DEFAULTS, **defaults})

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        if "proj_type" in group:  # galore-torch's name
            group["proj_side"] = group.pop("proj_type")
        unknown = set(group) - set(GROUP_DEFAULTS) - {"params", "name"}
        if unknown:
            raise TypeError(f"unknown param-group keys {sorted(unknown)}: see GROUP_DEFAULTS")
        has_rank = group.get("rank") is not None or group.get("rank_fraction") is not None
        if group.get("projector") is None and has_rank:
            group["projector"] = "svd"
        super().add_param_group(group)
        _validate_group(self.param_groups[-1], len(self.param_groups) - 1)
        self._param_index = {}

    def _seed(self, p: torch.Tensor, group: dict[str, Any]) -> int:
        if not self._param_index:
            params = (q for g in self.param_groups for q in g["params"])
            self._param_index = {id(q): i for i, q in enumerate(params)}
        return int(group["seed"]) * 1_000_003 + self._param_index[id(p)] + 1

    def projector_for(self, p: torch.Tensor) -> Projector:
        """The projector view over `p`'s state (for inspection and benchmarks)."""
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        return self._projector(p, group, self.state[p])

    def _projector(self, p: torch.Tensor, group: dict[str, Any], state: dict) -> Projector:
        opts = dict(group["proj_options"] or {})
        if group["proj_bits"] is not None:
            opts["bits"] = group["proj_bits"]
            opts.setdefault("group_size", group["proj_group_size"])
        shape = tuple(p.shape)
        return make_projector(
            group["projector"],
            shape,
            resolve_rank(shape, group),
            side=group["proj_side"],
            state=state,
            seed=self._seed(p, group),
            **opts,
        )

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, group)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Update one parameter from its gradient (also used by the layer-wise hooks)."""
        grad = p.grad
        if grad is None:
            return
        if grad.is_sparse:
            raise RuntimeError("LowRankOptimizer does not support sparse gradients")
        state = self.state[p]
        if group["projector"] is None:
            if not self._finite(dist_.local(grad), p, group):
                return
            _init_counters(state)
            self._plain_adamw(p, grad, group, state)
        else:
            self._lowrank(p, grad, group, state)

    @staticmethod
    def _finite(t: torch.Tensor, p: torch.Tensor, group: dict) -> bool:
        """False (skip) or FloatingPointError for a gradient holding NaN/inf.

        One reduction (the sum is non-finite iff an entry is, barring a float32 overflow of
        the sum itself) instead of a full-size boolean mask: measured at ~30 % of a GaLore
        step on SmolLM2 shapes. Projected steps check the small projected gradient, which a
        NaN/inf anywhere in G reaches (NaN * x = NaN, inf * 0 = NaN).
        """
        if bool(torch.isfinite(t.sum())):
            return True
        if group["nonfinite"] == "skip":
            logger.warning("non-finite gradient for a %s parameter: update skipped",
                           tuple(p.shape))
            return False
        raise FloatingPointError(
            f"gradient of a parameter of shape {tuple(p.shape)} holds NaN/inf (or overflows "
            "float32): fix the loss scale or learning rate, or pass nonfinite='skip' to skip "
            "such updates"
        )

    def _plain_adamw(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        w, g = dist_.local(p), dist_.local(grad)
        bits = group["state_bits"] if g.numel() >= group["min_8bit_size"] else 32
        if "exp_avg" not in state and not qstate.is_quantized(state, "exp_avg"):
            qstate.init(state, "exp_avg", g.shape, g.device, bits, group["block_size"], signed=True)
            qstate.init(state, "exp_avg_sq", g.shape, g.device, bits, group["block_size"],
                        signed=False)
        beta1, beta2 = group["betas"]
        lr, wd, style = group["lr"], group["weight_decay"], group["adam_style"]
        state["step"] += 1
        state["moment_step"] += 1
        k = int(state["moment_step"])
        m, v = qstate.read(state, "exp_avg"), qstate.read(state, "exp_avg_sq")
        if style == "torch":
            F.decoupled_decay_(w, lr, wd)
        F.adam_moments_(m, v, g.to(m.dtype), beta1, beta2)
        denom, step_size = F.adam_denom(v, k, lr=lr, beta1=beta1, beta2=beta2,
                                        eps=group["eps"], style=style)
        w.addcdiv_(m.to(w.dtype), denom.to(w.dtype), value=-step_size)
        qstate.write(state, "exp_avg", m)
        qstate.write(state, "exp_avg_sq", v)
        if style == "galore" and wd:
            w.add_(w, alpha=-lr * wd)

    def _lowrank(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict) -> None:
        g = dist_.full(grad).float()  # (m, n): projection needs every row
        proj = self._projector(p, group, state)
        t = int(state["step"]) if "step" in state else 0
        due = proj.due(t, group["update_proj_gap"])
        if due and not self._finite(g, p, group):  # before an SVD sees it
            return
        old = None
        if group["moment_policy"] == "reproject" and proj.initialized and due:
            old = proj.basis().float().clone()
        if proj.maybe_update(g, t, group["update_proj_gap"]):
            self._on_refresh(proj, group, state, old, g.device)
        low = proj.down(g)  # R: (m, r) right / (r, n) left
        if not due and not self._finite(low, p, group):
            return
        _init_counters(state)
        state["step"] += 1
        state["moment_step"] += 1
        k = int(state["moment_step"])
        lr, wd, scale = group["lr"], group["weight_decay"], group["scale"]
        # the update is W += alpha * full + up(low_term) (either may be None): the low-rank
        # part is added by one in-place GEMM (W.addmm_), never materialised at (m, n)
        full, alpha, mult = None, 1.0, None
        if group["rule"] == "adafactor":
            low_term = self._adafactor_low(low, group, state, k).mul_(-scale)
            decay_before = True
        elif group["rule"] == "sgd":  # linear, so any full-rank orthogonal P gives plain SGD
            buf = state["momentum_buffer"]
            buf.mul_(group["betas"][0]).add_(low)
            low_term, decay_before = buf.mul(-lr * scale), True
        else:
            full, alpha, mult, low_term = self._adam_delta(g, low, proj, group, state, k)
            decay_before = group["adam_style"] == "torch"
        w = dist_.local(p)
        if decay_before:
            F.decoupled_decay_(w, lr, wd)
        if full is not None and mult is not None and not dist_.is_dtensor(p):
            w.addcmul_(full.to(w.dtype), mult.to(w.dtype), value=alpha)  # one pass, no temp
        elif full is not None:
            full = full * mult if mult is not None else full
            w.add_(dist_.shard_like(full, p).to(w.dtype), alpha=alpha)
        if low_term is not None:
            if dist_.is_dtensor(p) or w.dtype != low_term.dtype:
                w.add_(dist_.shard_like(proj.up(low_term), p).to(w.dtype))
            else:
                proj.add_up_(w, low_term)
        if not decay_before and wd:
            w.add_(w, alpha=-lr * wd)

    def _adam_delta(
        self, g: torch.Tensor, low: torch.Tensor, proj: Projector, group: dict, state: dict, k: int
    ) -> tuple[torch.Tensor | None, float, torch.Tensor | None, torch.Tensor | None]:
        """Adam in the subspace; returns ``(full, alpha, mult, low_term)`` with the update
        ``W += alpha * full * mult + up(low_term)`` (None terms left out; `mult` broadcasts:
        a per-channel or 0-d scale, so that the product is never formed)."""
        beta1, beta2 = group["betas"]
        m, v = qstate.read(state, "exp_avg"), qstate.read(state, "exp_avg_sq")
        F.adam_moments_(m, v, low, beta1, beta2)
        denom, eta = F.adam_denom(v, k, lr=group["lr"], beta1=beta1, beta2=beta2,
                                  eps=group["eps"], style=group["adam_style"])
        qstate.write(state, "exp_avg", m)
        qstate.write(state, "exp_avg_sq", v)
        scale = group["scale"]
        if group["scaling"] is None and group["residual"] == "drop":
            # (-eta * M) / denom, then up: the same arithmetic as torch's addcdiv, so an
            # identity projector reproduces torch.optim.AdamW bit for bit.
            step = m.mul(-eta).div_(denom)
            return None, 1.0, None, (step.mul_(scale) if scale != 1.0 else step)
        n = m / denom
        if group["scaling"] is not None:  # APOLLO: scale the raw gradient, no back-projection
            return (g, -eta, rules.apollo_scale(g, low, n, proj, group, state), None)
        residual = group["residual"]
        if residual == "fira":
            return rules.fira(g, low, n, proj, group, state, eta)
        if residual in ("sign", "sgd"):  # FRUGAL: state-free rule on what the subspace misses
            res = proj.residual(g, low)  # G - up(R), one GEMM into a new buffer
            res = res.sign_() if residual == "sign" else res
            return res, -group["lr"] * group["residual_scale"], None, n.mul_(-eta * scale)
        return None, 1.0, None, n.mul_(-eta * scale)

    def _adafactor_low(self, low: torch.Tensor, group: dict, state: dict, k: int) -> torch.Tensor:
        return F.adafactor_update_(
            low,
            state["exp_avg_sq_row"],
            state["exp_avg_sq_col"],
            state.get("exp_avg"),
            k,
            lr=group["lr"],
            beta1=group["adafactor_beta1"],
            decay_rate=group["decay_rate"],
            clip_threshold=group["clip_threshold"],
        )

    def _on_refresh(
        self, proj: Projector, group: dict, state: dict, old: torch.Tensor | None, device
    ) -> None:
        """Create moments on the first refresh; apply the moment policy on later ones."""
        shape = proj.low_shape
        if group["rule"] == "adafactor":
            if "exp_avg_sq_row" not in state or group["moment_policy"] == "reset":
                state["exp_avg_sq_row"] = torch.zeros(shape[0], device=device)
                state["exp_avg_sq_col"] = torch.zeros(shape[1], device=device)
                if group["adafactor_beta1"] is not None:
                    state["exp_avg"] = torch.zeros(shape, device=device)
                state["moment_step"] = torch.tensor(0, dtype=torch.int64)
            return
        if group["rule"] == "sgd":
            if "momentum_buffer" not in state or group["moment_policy"] == "reset":
                state["momentum_buffer"] = torch.zeros(shape, device=device)
            elif old is not None:
                buf = state["momentum_buffer"]
                rot = F.rotation(old, proj.basis(), proj.side)
                buf.copy_(buf @ rot if proj.side == "right" else rot @ buf)
            return
        first = "exp_avg" not in state and not qstate.is_quantized(state, "exp_avg")
        if first or group["moment_policy"] == "reset":
            bits, block = group["state_bits"], group["block_size"]
            qstate.init(state, "exp_avg", shape, device, bits, block, signed=True)
            qstate.init(state, "exp_avg_sq", shape, device, bits, block, signed=False)
            state["moment_step"] = torch.tensor(0, dtype=torch.int64)
        elif old is not None:
            m, v = qstate.read(state, "exp_avg"), qstate.read(state, "exp_avg_sq")
            F.rotate_moments_(m, v, F.rotation(old, proj.basis(), proj.side), proj.side)
            qstate.write(state, "exp_avg", m)
            qstate.write(state, "exp_avg_sq", v)

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict without torch's cast of every state tensor to the parameter dtype
        (which would turn int8 codes, int32 indices and int64 seeds into floats)."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        by_id = dict(zip(ids, params, strict=True))
        for pid, st in saved.items():
            p = by_id[pid]
            self.state[p] = {
                key: (val.to(device=dist_.local(p).device, copy=True)
                      if isinstance(val, torch.Tensor) and key not in ("step", "moment_step")
                      else val.clone() if isinstance(val, torch.Tensor) else val)
                for key, val in st.items()
            }

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state: every tensor of every parameter's state."""
        return sum(
            v.numel() * v.element_size()
            for st in self.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        )


def _init_counters(state: dict[str, Any]) -> None:
    if "step" not in state:
        state["step"] = torch.tensor(0, dtype=torch.int64)
        state["moment_step"] = torch.tensor(0, dtype=torch.int64)


def _validate_group(group: dict[str, Any], index: int) -> None:
    for key, choices in _CHOICES.items():
        if group[key] not in choices:
            raise ValueError(f"group {index}: {key}={group[key]!r} is not one of {choices}")
    if group["lr"] < 0 or not all(0.0 <= b < 1.0 for b in group["betas"]):
        raise ValueError(f"group {index}: need lr >= 0 and betas in [0, 1), got "
                         f"lr={group['lr']}, betas={group['betas']}")
    kind = group["projector"]
    if kind is None:
        return
    if kind not in PROJECTORS:
        raise ValueError(f"group {index}: projector {kind!r} is unknown: choose one of "
                         f"{sorted(PROJECTORS)}")
    rank, frac = group["rank"], group["rank_fraction"]
    if (rank is None) == (frac is None):
        raise ValueError(f"group {index}: a projected group needs exactly one of rank (int) or "
                         f"rank_fraction (0 < f <= 1), got rank={rank}, rank_fraction={frac}")
    if frac is not None and not 0.0 < float(frac) <= 1.0:
        raise ValueError(f"group {index}: rank_fraction {frac} must be in (0, 1]")
    if int(group["update_proj_gap"]) < 1:
        raise ValueError(f"group {index}: update_proj_gap must be >= 1")
    if group["scaling"] is not None and group["residual"] != "drop":
        raise ValueError(f"group {index}: scaling={group['scaling']!r} (APOLLO) already updates "
                         "the whole gradient: use residual='drop'")
    if group["rule"] == "adafactor" and (
        group["residual"] != "drop" or group["scaling"] is not None or group["state_bits"] != 32
        or group["moment_policy"] == "reproject"
    ):
        raise ValueError(f"group {index}: rule='adafactor' supports residual='drop', no scaling, "
                         "32-bit state and moment_policy 'keep' or 'reset'")
    for i, p in enumerate(group["params"]):
        shape, what = tuple(p.shape), f"parameter {i} of group {index} (projector={kind!r})"
        check_matrix(shape, resolve_rank(shape, group) if len(shape) == 2 else 1, what=what)
