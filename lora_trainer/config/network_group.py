"""``NetworkConfig``: the network settings group of ``TrainConfig`` (kept apart from the other groups
in :mod:`lora_trainer.config.groups` for size; the same kind of stdlib dataclass with field metadata).
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_trainer.config.coerce import CoercedGroup
from lora_trainer.config.meta import NETWORK_MODULES, setting

__all__ = ["NetworkConfig"]


@dataclass
class NetworkConfig(CoercedGroup):
    """The LoRA network: its shape, dropouts and which model parts it trains."""

    network_module: str = setting(
        "networks.lora",
        label="Network type",
        kohya="network_module",
        choices=tuple(NETWORK_MODULES),
        help="Network kind, by kohya's module name: 'networks.lora' = LoRA, plus LoCon when 'Conv rank' is set "
        "(algorithm 'lora' in lora_trainer.networks).",
    )
    network_dim: int = setting(
        16,
        label="Rank (network_dim)",
        kohya="network_dim",
        kohya_default=4,
        ge=1,
        le=1024,
        help="LoRA rank: 16 suits most characters and styles, 32-64 for complex subjects (bigger file). Our "
        "default is 16; kohya's is 4.",
    )
    network_alpha: float = setting(
        8.0,
        label="Alpha (network_alpha)",
        kohya="network_alpha",
        kohya_default=1.0,
        gt=0.0,
        le=1024.0,
        help="Scales the LoRA's output by alpha/rank; half the rank is usual. Our default is 8; kohya's is 1.",
    )
    conv_dim: int = setting(
        0,
        label="Conv rank (LoCon)",
        kohya="conv_dim",
        network_arg=True,
        ge=0,
        le=1024,
        help="Rank for the UNet's 3x3 convolutions (LoCon); 0 = off (plain LoRA).",
    )
    conv_alpha: float = setting(
        1.0,
        label="Conv alpha",
        kohya="conv_alpha",
        network_arg=True,
        gt=0.0,
        le=1024.0,
        help="Alpha for the 3x3 convolutions; used only when 'Conv rank' is set (kohya's default is 1).",
    )
    network_dropout: float = setting(
        0.0,
        label="Dropout",
        kohya="network_dropout",
        ge=0.0,
        lt=1.0,
        help="Dropout on the LoRA's hidden activations (0 = off; 0.1 is typical).",
    )
    rank_dropout: float = setting(
        0.0,
        label="Rank dropout",
        kohya="rank_dropout",
        network_arg=True,
        ge=0.0,
        lt=1.0,
        help="Chance of dropping each rank of the LoRA per step (0 = off).",
    )
    module_dropout: float = setting(
        0.0,
        label="Module dropout",
        kohya="module_dropout",
        network_arg=True,
        ge=0.0,
        lt=1.0,
        help="Chance of skipping a whole LoRA module per step (0 = off).",
    )
    train_unet: bool = setting(
        True,
        label="Train the UNet",
        kohya="network_train_text_encoder_only",
        inverted=True,
        help="Put LoRA on the UNet (kohya: off = network_train_text_encoder_only).",
    )
    train_text_encoder: bool = setting(
        True,
        label="Train the text encoder(s)",
        kohya="network_train_unet_only",
        inverted=True,
        help="Put LoRA on the text encoder(s) too (kohya: off = network_train_unet_only; usually off for SDXL).",
    )

    @property
    def algorithm(self) -> str:
        """Our algorithm name for ``network_module`` ("lora")."""
        return NETWORK_MODULES.get(self.network_module, self.network_module)
