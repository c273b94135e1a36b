"""Training glue: tiny Llama configs, the pretraining loop, checkpoints with exact resume.

    from rankwise.train import PretrainConfig, pretrain
    result = pretrain(PretrainConfig(method="sltrain", size="llama-10m", steps=200))
"""

from rankwise.train.config import PretrainConfig
from rankwise.train.loop import PretrainResult, pretrain

__all__ = ["PretrainConfig", "PretrainResult", "pretrain"]
