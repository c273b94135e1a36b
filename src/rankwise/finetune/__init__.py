"""Fine-tune a model with a `rankwise.adapt` method on the embedded tasks (`rankwise finetune`).

    from rankwise.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(model="smollm2-135m", task="python-docs", method="lora",
                                     rank=8, steps=100, out="runs/docs-lora"))

Pieces: `config` (the validated run settings), `tasks` (fortunes classification and
python-docs language modelling: data, model wrapper, loss, metric), `state` (atomic safetensors
+ JSON checkpoints) and `loop` (the training loop with bit-exact resume).
"""

from rankwise.finetune.config import TASKS, FinetuneConfig
from rankwise.finetune.loop import FinetuneResult, build_model, finetune
from rankwise.finetune.tasks import (
    ClassificationData,
    LMData,
    TopicClassifier,
    default_targets,
    evaluate,
    prepare_data,
    task_batch,
    task_loss,
)

__all__ = [
    "TASKS",
    "ClassificationData",
    "FinetuneConfig",
    "FinetuneResult",
    "LMData",
    "TopicClassifier",
    "build_model",
    "default_targets",
    "evaluate",
    "finetune",
    "prepare_data",
    "task_batch",
    "task_loss",
]
