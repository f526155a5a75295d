"""kohya's per-block and LoRA+ settings applied to a run: per-block ranks and the optimizer's groups.

``block_plan_for`` reads the per-block settings of ``NetworkConfig`` (``networks.blocks``);
``rank_alpha_for`` gives ``LoRANetwork`` each UNet target's (rank, alpha) from it; ``network_groups``
builds the optimizer's param groups with the per-block lr weights and the LoRA+ ratios.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lora_trainer.config.network_group import NetworkConfig
from lora_trainer.log import logger
from lora_trainer.naming import Target
from lora_trainer.networks.blocks import BlockPlan, BlockSettings, block_index, block_plan
from lora_trainer.networks.network import LoRANetwork
from lora_trainer.train.optim import param_groups_for

__all__ = ["block_network_args", "block_plan_for", "network_groups", "rank_alpha_for"]

TE_GROUPS = ("te", "te1", "te2")


def block_plan_for(net: NetworkConfig, family: str) -> BlockPlan | None:
    """The per-block plan of ``net`` for a ``family`` model, or None when no per-block setting is set."""
    settings = BlockSettings(
        net.block_dims,
        net.block_alphas,
        net.conv_block_dims,
        net.conv_block_alphas,
        net.down_lr_weight,
        net.mid_lr_weight,
        net.up_lr_weight,
        net.block_lr_zero_threshold,
    )
    return block_plan(
        family,
        settings,
        rank=net.network_dim,
        alpha=net.network_alpha,
        conv_rank=net.conv_dim,
        conv_alpha=net.conv_alpha,
    )


def rank_alpha_for(plan: BlockPlan | None) -> Callable[[Target], tuple[int, float | None] | None] | None:
    """``LoRANetwork``'s ``rank_alpha``: the plan's (rank, alpha) for UNet targets (kohya: UNet only)."""
    if plan is None:
        return None
    return lambda t: plan.rank_alpha(t.key, t.uses_conv_dim) if t.group == "unet" else None


def network_groups(
    network: LoRANetwork,
    net: NetworkConfig,
    plan: BlockPlan | None,
    unet_lr: float | None,
    te_lr: float | None,
    default_lr: float | None,
) -> list[dict[str, Any]]:
    """The optimizer's param groups for ``network`` with ``net``'s LoRA+ ratios and ``plan``'s lr weights."""
    unet_ratio = net.loraplus_unet_lr_ratio or net.loraplus_lr_ratio
    te_ratio = net.loraplus_text_encoder_lr_ratio or net.loraplus_lr_ratio
    plus = [p for name, p in network.named_parameters() if "lora_up" in name]
    if (unet_ratio or te_ratio) and not plus:
        # kohya and LyCORIS give the ratio to lora_up weights only; LoHa and LoKr have none.
        logger.warning(f"LoRA+ has no effect on {', '.join(sorted(network.algorithms()))}: no lora_up weights")
    blocks = None
    if plan is not None and plan.lr_weights is not None:
        by_index: dict[int, list] = {}
        for module in network.loras("unet"):
            by_index.setdefault(block_index(module.key, plan.family), []).extend(module.parameters())
        blocks = [(i, plan.lr_weight_at(i), params) for i, params in sorted(by_index.items())]
    return param_groups_for(
        network.parameters_of(("unet",)),
        network.parameters_of(TE_GROUPS),
        unet_lr,
        te_lr,
        default_lr=default_lr,
        plus=plus,
        unet_plus_ratio=unet_ratio,
        te_plus_ratio=te_ratio,
        unet_blocks=blocks,
    )


_BLOCK_ARGS = (
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
)


def block_network_args(net: NetworkConfig) -> dict[str, str]:
    """The LoRA+ and per-block settings that are set, as kohya's ``ss_network_args`` holds them (strings)."""
    args = {name: str(getattr(net, name)) for name in _BLOCK_ARGS if getattr(net, name) is not None}
    if args and net.block_lr_zero_threshold:
        args["block_lr_zero_threshold"] = str(net.block_lr_zero_threshold)
    return args
