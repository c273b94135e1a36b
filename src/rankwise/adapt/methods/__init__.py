"""Built-in adapter methods; importing this package registers them.

Each module holds one method (or a family of presets over one class): lora (``lora``,
``rslora``), dora, pissa. `rankwise.adapt.list_methods()` lists what is registered.
"""

from rankwise.adapt.methods.dora import DoRA
from rankwise.adapt.methods.lora import LoRA, LoRABase, LoRAConfig
from rankwise.adapt.methods.pissa import PiSSA, PiSSAConfig

__all__ = ["DoRA", "LoRA", "LoRABase", "LoRAConfig", "PiSSA", "PiSSAConfig"]
