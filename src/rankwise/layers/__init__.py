"""Parameterised linear layers: low-rank replacements and sparse + low-rank training forms.

- `FactorizedLinear`: the replacement form `y = B (A x) + bias` used by rankwise.compress.
- Training parameterisations (issue 5): ReLoRA, SLTrain, LOST, SST, Maestro, TRP, Monarch,
  each convertible back to a dense `nn.Linear` (`to_dense_`) or a `FactorizedLinear`.
- Schedules: the one training-time mechanism (`LayerSchedule`) for merges, re-SVDs,
  projections and ordered dropout, usable from a plain loop or as an HF TrainerCallback.
"""

from rankwise.layers._base import (
    LAYER_METHODS,
    ParameterizedLinear,
    convert_,
    converted_layers,
    get_layer_class,
    method_of,
    to_dense_,
    to_factorized_,
)
from rankwise.layers.factorized import FactorizedLinear
from rankwise.layers.lost import LOSTLinear
from rankwise.layers.maestro import MaestroLinear
from rankwise.layers.monarch import MonarchLinear, project_monarch
from rankwise.layers.refactor import refactorize, refactorize_
from rankwise.layers.relora import ReLoRALinear
from rankwise.layers.schedules import (
    LayerSchedule,
    MaestroSchedule,
    RefactorSchedule,
    ReLoRASchedule,
    Schedules,
    SSTSchedule,
    TRPSchedule,
    jagged_cosine,
    reset_optimizer_state_,
    schedule_for,
)
from rankwise.layers.sltrain import SLTrainLinear
from rankwise.layers.sst import SSTLinear
from rankwise.layers.trp import TRPLinear

__all__ = [
    "LAYER_METHODS",
    "FactorizedLinear",
    "LOSTLinear",
    "LayerSchedule",
    "MaestroLinear",
    "MaestroSchedule",
    "MonarchLinear",
    "ParameterizedLinear",
    "ReLoRALinear",
    "ReLoRASchedule",
    "RefactorSchedule",
    "SLTrainLinear",
    "SSTLinear",
    "SSTSchedule",
    "Schedules",
    "TRPLinear",
    "TRPSchedule",
    "convert_",
    "converted_layers",
    "get_layer_class",
    "jagged_cosine",
    "method_of",
    "project_monarch",
    "refactorize",
    "refactorize_",
    "reset_optimizer_state_",
    "schedule_for",
    "to_dense_",
    "to_factorized_",
]
