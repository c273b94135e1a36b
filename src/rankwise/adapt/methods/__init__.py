"""Built-in adapter methods; importing this package registers them.

Each module holds one method (or a family of presets over one class): lora (``lora``,
``rslora``), dora, pissa. `rankwise.adapt.list_methods()` lists what is registered.
"""

from rankwise.adapt.methods.allora import ALLoRA, ALLoRAConfig
from rankwise.adapt.methods.dora import DoRA
from rankwise.adapt.methods.dylora import DyLoRA, DyLoRAConfig
from rankwise.adapt.methods.loldu import LoLDU, LoLDUConfig
from rankwise.adapt.methods.lora import LoRA, LoRABase, LoRAConfig
from rankwise.adapt.methods.lora_sb import LoRASB, LoRASBConfig
from rankwise.adapt.methods.lora_xs import LoRAXS, LoRAXSConfig
from rankwise.adapt.methods.nola import NOLA, NOLAConfig
from rankwise.adapt.methods.pissa import PiSSA, PiSSAConfig
from rankwise.adapt.methods.randlora import RandLoRA, RandLoRAConfig
from rankwise.adapt.methods.salt import SALT, SALTConfig
from rankwise.adapt.methods.sora import SoRA, SoRAConfig
from rankwise.adapt.methods.svfit import SVFit, SVFitConfig
from rankwise.adapt.methods.vera import VeRA, VeRAConfig

__all__ = ["DoRA", "LoRA", "LoRABase", "LoRAConfig", "PiSSA", "PiSSAConfig"]
__all__ += ["VeRA", "VeRAConfig", "NOLA", "NOLAConfig", "RandLoRA", "RandLoRAConfig"]
__all__ += ["LoRAXS", "LoRAXSConfig", "LoRASB", "LoRASBConfig", "SVFit", "SVFitConfig"]
__all__ += ["SALT", "SALTConfig", "LoLDU", "LoLDUConfig"]
__all__ += ["SoRA", "SoRAConfig", "ALLoRA", "ALLoRAConfig", "DyLoRA", "DyLoRAConfig"]
from rankwise.adapt.methods.adalora import AdaLoRA, AdaLoRAConfig  # noqa: E402
from rankwise.adapt.methods.increlora import IncreLoRA, IncreLoRAConfig  # noqa: E402
from rankwise.adapt.methods.lora_ggpo import LoRAGGPO, LoRAGGPOConfig  # noqa: E402
from rankwise.adapt.methods.lora_pro import LoRAPro, LoRAProConfig  # noqa: E402

__all__ += ["AdaLoRA", "AdaLoRAConfig", "IncreLoRA", "IncreLoRAConfig"]
__all__ += ["LoRAGGPO", "LoRAGGPOConfig", "LoRAPro", "LoRAProConfig"]
from rankwise.adapt.methods.block_lora import BlockLoRA, BlockLoRAConfig  # noqa: E402
from rankwise.adapt.methods.eva import EVA, EVAConfig  # noqa: E402
from rankwise.adapt.methods.flora import FLoRA, FLoRAConfig  # noqa: E402
from rankwise.adapt.methods.mos import MoS, MoSConfig  # noqa: E402
from rankwise.adapt.methods.sara import SaRA, SaRAConfig  # noqa: E402

__all__ += ["BlockLoRA", "BlockLoRAConfig", "EVA", "EVAConfig", "FLoRA", "FLoRAConfig"]
__all__ += ["MoS", "MoSConfig", "SaRA", "SaRAConfig"]
