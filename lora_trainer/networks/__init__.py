"""LoRA networks: modules (``lora.py``) and their attachment to a model (``network.py``)."""

from .lora import LoRAModule
from .network import LoRANetwork, network_from_weights

__all__ = ["LoRAModule", "LoRANetwork", "network_from_weights"]
