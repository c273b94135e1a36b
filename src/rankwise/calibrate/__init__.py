"""Calibration statistics of each target layer's input, accumulated without storing activations.

This is rankwise's one calibration pass: compression (`compress_`, `compensate_`, the block
runner and the streaming path), adapter initialisations (EVA, PiSSA-style data inits) and the
shrink pipeline all read their activation statistics from here, through one fp64 accumulator
(`GramAccumulator`) fed by one set of hooks (`InputCollector`). Per linear layer with input x
(n = in):

* ``gram``     Σ xᵀx (n, n), fp64 (the whitening Gram of SVD-LLM, Wang et al. 2025: a
  sum, not a mean, as the reference hooks accumulate it; whitening is scale-free);
* ``mean``     E[x] (n,) (centring: EVA's PCA of inputs, Paischer et al. 2024, via `covariance`);
* ``abs_mean`` E|x_j| (n,) (ASVD's activation scale S_ii, Yuan et al. 2023; ASVD sums
  per-batch means, which differs from this token mean only by a constant factor that ASVD's
  SVD ignores);
* ``abs_max``  max |x_j| (n,) (ASVD's "abs_max" option);
* ``sq_grad``  Σ_batches (∂L/∂W)² (out, in) (the empirical Fisher of FWSVD, Hsu et al. 2022:
  squared per-batch gradients, the reference practice; divide by ``n_batches``);
* ``cross``    Σ x_refᵀ x (n, n), block runner only: the cross-Gram of SVD-LLM's update
  towards the original model's activations.

Forward pre-hooks flatten (batch, seq, in) to (tokens, in), drop padded tokens
(``attention_mask`` = 0), cast to fp64 on the stats device (CPU by default) and add into running
sums. Only the statistics asked for are allocated.

``share_inputs=True`` keeps one set of input statistics for modules that read the very same
tensor in a forward (q/k/v; gate/up): their `LayerStats` hold the same ``gram`` tensor object.
For a Llama block that is 4 Grams instead of 7; for SmolLM2-135M (hidden 576, intermediate 1536,
30 layers) the fp64 Grams take 0.80 GB instead of 1.04 GB, and each shared Gram is computed once.
"""

from __future__ import annotations

from rankwise.calibrate.capture import capture_input_stats, causal_lm_loss
from rankwise.calibrate.collect import InputCollector
from rankwise.calibrate.stats import STATS, GramAccumulator, LayerStats, shared_groups

__all__ = [
    "STATS",
    "GramAccumulator",
    "InputCollector",
    "LayerStats",
    "capture_input_stats",
    "causal_lm_loss",
    "shared_groups",
]
