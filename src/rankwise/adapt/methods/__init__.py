"""Built-in adapter methods; importing this package registers them.

Each module holds one method (or a family of presets over one class, e.g. lora: ``lora``,
``rslora``). `rankwise.adapt.list_methods()` lists what is registered.
"""

from rankwise.adapt.methods.adalora import AdaLoRA, AdaLoRAConfig
from rankwise.adapt.methods.allora import ALLoRA, ALLoRAConfig
from rankwise.adapt.methods.block_lora import BlockLoRA, BlockLoRAConfig
from rankwise.adapt.methods.dora import DoRA
from rankwise.adapt.methods.dylora import DyLoRA, DyLoRAConfig
from rankwise.adapt.methods.eva import EVA, EVAConfig
from rankwise.adapt.methods.flora import FLoRA, FLoRAConfig
from rankwise.adapt.methods.increlora import IncreLoRA, IncreLoRAConfig
from rankwise.adapt.methods.loldu import LoLDU, LoLDUConfig
from rankwise.adapt.methods.lora import LoRA, LoRABase, LoRAConfig
from rankwise.adapt.methods.lora_ggpo import LoRAGGPO, LoRAGGPOConfig
from rankwise.adapt.methods.lora_pro import LoRAPro, LoRAProConfig
from rankwise.adapt.methods.lora_sb import LoRASB, LoRASBConfig
from rankwise.adapt.methods.lora_xs import LoRAXS, LoRAXSConfig
from rankwise.adapt.methods.mos import MoS, MoSConfig
from rankwise.adapt.methods.nola import NOLA, NOLAConfig
from rankwise.adapt.methods.pissa import PiSSA, PiSSAConfig
from rankwise.adapt.methods.randlora import RandLoRA, RandLoRAConfig
from rankwise.adapt.methods.salt import SALT, SALTConfig
from rankwise.adapt.methods.sara import SaRA, SaRAConfig
from rankwise.adapt.methods.sora import SoRA, SoRAConfig
from rankwise.adapt.methods.svfit import SVFit, SVFitConfig
from rankwise.adapt.methods.vera import VeRA, VeRAConfig

__all__ = [
    "ALLoRA",
    "ALLoRAConfig",
    "AdaLoRA",
    "AdaLoRAConfig",
    "BlockLoRA",
    "BlockLoRAConfig",
    "DoRA",
    "DyLoRA",
    "DyLoRAConfig",
    "EVA",
    "EVAConfig",
    "FLoRA",
    "FLoRAConfig",
    "IncreLoRA",
    "IncreLoRAConfig",
    "LoLDU",
    "LoLDUConfig",
    "LoRA",
    "LoRABase",
    "LoRAConfig",
    "LoRAGGPO",
    "LoRAGGPOConfig",
    "LoRAPro",
    "LoRAProConfig",
    "LoRASB",
    "LoRASBConfig",
    "LoRAXS",
    "LoRAXSConfig",
    "MoS",
    "MoSConfig",
    "NOLA",
    "NOLAConfig",
    "PiSSA",
    "PiSSAConfig",
    "RandLoRA",
    "RandLoRAConfig",
    "SALT",
    "SALTConfig",
    "SVFit",
    "SVFitConfig",
    "SaRA",
    "SaRAConfig",
    "SoRA",
    "SoRAConfig",
    "VeRA",
    "VeRAConfig",
]
