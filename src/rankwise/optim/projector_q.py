"""Quantised projectors (Q-GaLore, Zhang et al. 2024, §3.2, eq. 2).

`QuantizedProjector` wraps any projector whose basis is a dense float matrix (svd,
randomized, random_orthogonal, identity): after each refresh the basis is quantised blockwise
(int8 or int4, asymmetric min-max per group of ``group_size`` elements as Q-GaLore, by
`rankwise.linalg.quantize_blockwise`; int4 packed two per byte) and
only the codes and per-group scales are kept; `down`/`up` dequantise on the fly. Q-GaLore's
lazy layer-adaptive refresh is the base class's ``lazy_threshold`` option (projector.py),
which this wrapper turns on by default in the ``q_galore_adamw8bit`` preset.

Bases that are not dense (DCT indices, seed-only random) are refused: quantising them saves
nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from rankwise.optim.projector import Projector


def quantize_to_state(
    state: dict[str, Any],
    prefix: str,
    x: torch.Tensor,
    bits: int,
    group_size: int,
    scheme: str = "absmax",
) -> None:
    """Quantise `x` blockwise and store its tensors flat under ``{prefix}*`` in `state`.

    The QuantizedTensor's ints (bits, block size) become 0-d int64 tensors so the state stays
    tensors-only.
    """
    from rankwise.linalg import quantize_blockwise

    q = quantize_blockwise(x, bits=bits, block_size=group_size, scheme=scheme)
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]
    for key, value in q.state_dict().items():
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(int(value), dtype=torch.int64)
        state[prefix + key] = value


def dequantize_from_state(state: dict[str, Any], prefix: str) -> torch.Tensor:
    """Rebuild (fp32) the tensor stored by `quantize_to_state`."""
    from rankwise.linalg import QuantizedTensor, dequantize_blockwise

    parts = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dequantize_blockwise(QuantizedTensor.from_state_dict(parts))


class QuantizedProjector(Projector):
    """Wrap projector class `inner` (a `Projector` subclass) with int8/int4 basis storage.

    Args:
        inner: the projector class computing the basis (e.g. `SVDProjector`).
        shape, rank: as `Projector`.
        bits: 8 or 4 (int4 codes are packed two per byte by rankwise.linalg.quant).
        group_size: elements per quantisation group (Q-GaLore: 256).
        **kwargs: passed to `inner` (side, state, seed, options...).
    """

    kind = "quantized"

    def __init__(
        self,
        inner: type[Projector],
        shape: tuple[int, ...],
        rank: int,
        *,
        bits: int = 4,
        group_size: int = 256,
        **kwargs: Any,
    ) -> None:
        if bits not in (4, 8):
            raise ValueError(f"projector bits must be 4 or 8, got {bits}")
        self.inner = inner(shape, rank, **kwargs)
        if not self.inner.dense:
            raise ValueError(
                f"the {inner.kind!r} projector stores no dense basis (indices or a seed): "
                "quantising it saves nothing; use proj_bits=None"
            )
        super().__init__(shape, rank, side=self.inner.side, state=self.inner.state,
                         **self.inner.options)
        self.bits = bits
        self.group_size = group_size
        self.kind = f"{inner.kind}_q{bits}"  # type: ignore[misc]

    def _compute(self, grad: torch.Tensor, step: int) -> None:
        self.inner._compute(grad, step)
        basis = self.state.pop("proj_basis").float()
        quantize_to_state(self.state, "proj_q_", basis, self.bits, self.group_size, "minmax")

    @property
    def orthonormal(self) -> bool:  # type: ignore[override]
        return False  # quantised codes are orthonormal only to within a code step

    def _dense_basis(self) -> torch.Tensor:
        return dequantize_from_state(self.state, "proj_q_").reshape(self.basis_shape)
