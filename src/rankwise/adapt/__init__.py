"""Adapters: one wrapper layer, a registry of methods, PEFT's format at the edge.

    from rankwise import adapt
    adapt.adapt_(model, "lora", rank=8, target_modules=["q_proj", "v_proj"])
    ... train ...
    adapt.save_adapter(model, "out/")            # rankwise format (safetensors + json)
    adapt.export_peft(model, "out_peft/")        # PEFT format: PeftModel.from_pretrained loads it
    model = adapt.merge_and_unload(model)

Pieces: `geometry` (how a method sees Linear / Conv1D / Embedding / Conv2d), `method` (the
AdapterMethod protocol and registry), `context` (what an init may ask for: SVD, activations,
gradient, seeded generator), `layer` (AdapterLayer: forward, merge, unmerge, disable), `api`
(model-level verbs), `serialization`, `peft_io`, `rules` (training-time rules via optimizer
hooks) and `methods/` (one file per method).
"""

from rankwise.adapt.api import (
    adapt_,
    adapter_layers,
    disable_adapter,
    merge_,
    merge_and_unload,
    trainable_parameter_count,
    unload_,
    unmerge_,
)
from rankwise.adapt.context import InitContext
from rankwise.adapt.geometry import Geometry
from rankwise.adapt.layer import AdapterLayer
from rankwise.adapt.method import (
    AdapterMethod,
    MethodConfig,
    build_config,
    get_method,
    list_methods,
    register_method,
    unregister_method,
)
from rankwise.adapt.peft_io import export_peft, import_peft
from rankwise.adapt.rules import AdapterRules, RuleState, attach_rules, rules_callback
from rankwise.adapt.serialization import load_adapter, save_adapter

__all__ = [
    "AdapterLayer",
    "AdapterMethod",
    "AdapterRules",
    "Geometry",
    "InitContext",
    "MethodConfig",
    "RuleState",
    "adapt_",
    "adapter_layers",
    "attach_rules",
    "build_config",
    "disable_adapter",
    "export_peft",
    "get_method",
    "import_peft",
    "list_methods",
    "load_adapter",
    "merge_",
    "merge_and_unload",
    "register_method",
    "rules_callback",
    "save_adapter",
    "trainable_parameter_count",
    "unload_",
    "unmerge_",
    "unregister_method",
]
