"""LoRA networks: modules (``lora.py``) and their attachment to a model (``network.py``)."""

from .lora import LoRAModule
from .network import LoRANetwork

__all__ = ["LoRAModule", "LoRANetwork"]
