"""``NetworkConfig``: the network settings group of ``TrainConfig`` (kept apart from the other groups
in :mod:`lora_trainer.config.groups` for size; the same kind of stdlib dataclass with field metadata).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_trainer.config.coerce import CoercedGroup
from lora_trainer.config.meta import LYCORIS_ALGOS, LYCORIS_MODULE, NETWORK_MODULES, setting
from lora_trainer.errors import ConfigError

__all__ = ["NetworkConfig", "check_network_type"]


@dataclass
class NetworkConfig(CoercedGroup):
    """The LoRA network: its shape, dropouts and which model parts it trains."""

    network_module: str = setting(
        "networks.lora",
        label="Network type",
        kohya="network_module",
        choices=tuple(NETWORK_MODULES),
        help="Network kind, by kohya's module name: 'networks.lora' = kohya's LoRA (LoCon when 'Conv rank' is "
        "set); 'lycoris.kohya' = LyCORIS, which adds LoHa, LoKr and DoRA ('Algorithm', 'DoRA').",
    )
    algo: str = setting(
        "lora",
        label="Algorithm (LyCORIS algo)",
        kohya="algo",
        network_arg=True,
        choices=tuple(LYCORIS_ALGOS),
        help="lora/locon: plain low rank, the safe default. loha: Hadamard product, reaches higher rank at the "
        "same file size; good for styles and several concepts in one small file (rank 8-16). lokr: Kronecker "
        "product, the smallest files ('LoKr factor'); needs a higher learning rate. Anything but lora needs "
        "'lycoris.kohya'.",
    )
    dora_wd: bool = setting(
        False,
        label="DoRA (weight decomposition)",
        kohya="dora_wd",
        network_arg=True,
        help="DoRA: trains each weight's magnitude apart from its direction; better quality at low rank, about "
        "1.5-2x slower per step. With 'lycoris.kohya' and algorithm lora/locon.",
    )
    factor: int = setting(
        -1,
        label="LoKr factor",
        kohya="factor",
        network_arg=True,
        ge=-1,
        le=1024,
        help="LoKr only (other algorithms ignore it, as LyCORIS does): split each weight so one Kronecker "
        "factor is this size; -1 = as square as possible. Larger = smaller file; 8 is common.",
    )
    decompose_both: bool = setting(
        False,
        label="LoKr: decompose both factors",
        kohya="decompose_both",
        network_arg=True,
        help="LoKr only: make the first Kronecker factor low rank too (when the rank is small enough).",
    )
    full_matrix: bool = setting(
        False,
        label="LoKr: full matrix",
        kohya="full_matrix",
        network_arg=True,
        help="LoKr only: keep both Kronecker factors full (the rank is then unused; files are bigger).",
    )
    use_tucker: bool = setting(
        False,
        label="Tucker decomposition (convs)",
        kohya="use_tucker",
        network_arg=True,
        help="LoHa/LoKr only: store 3x3 conv deltas in LyCORIS's Tucker form (smaller for convs).",
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
    loraplus_lr_ratio: float | None = setting(
        None,
        label="LoRA+ lr ratio",
        kohya="loraplus_lr_ratio",
        network_arg=True,
        gt=0.0,
        le=1024.0,
        help="LoRA+: the up (B) weights learn this many times faster than the rest; 16 is the paper's "
        "value, 4-16 usual. Empty = off. Applies to kohya's lora_up weights (LoRA, LoCon, DoRA), as in kohya and "
        "LyCORIS; LoHa and LoKr have none.",
    )
    loraplus_unet_lr_ratio: float | None = setting(
        None,
        label="LoRA+ ratio, UNet",
        kohya="loraplus_unet_lr_ratio",
        network_arg=True,
        gt=0.0,
        le=1024.0,
        help="LoRA+ ratio for the UNet only (overrides 'LoRA+ lr ratio' there).",
    )
    loraplus_text_encoder_lr_ratio: float | None = setting(
        None,
        label="LoRA+ ratio, text encoder",
        kohya="loraplus_text_encoder_lr_ratio",
        network_arg=True,
        gt=0.0,
        le=1024.0,
        help="LoRA+ ratio for the text encoder(s) only (overrides 'LoRA+ lr ratio' there).",
    )
    block_dims: str | None = setting(
        None,
        label="Block ranks",
        kohya="block_dims",
        network_arg=True,
        help="Rank of each UNet block, comma-separated: 25 values for SD1/SD2 (IN00-IN11, MID, OUT00-OUT11), 23 "
        "for SDXL (kohya's numbering); 0 = no modules in that block. Empty = 'Rank' everywhere.",
    )
    block_alphas: str | None = setting(
        None,
        label="Block alphas",
        kohya="block_alphas",
        network_arg=True,
        help="Alpha of each UNet block (same count as 'Block ranks'); empty = 'Alpha' everywhere.",
    )
    conv_block_dims: str | None = setting(
        None,
        label="Conv block ranks",
        kohya="conv_block_dims",
        network_arg=True,
        help="Rank of each block's 3x3 convolutions (LoCon; same count as 'Block ranks'); empty = 'Conv rank'.",
    )
    conv_block_alphas: str | None = setting(
        None,
        label="Conv block alphas",
        kohya="conv_block_alphas",
        network_arg=True,
        help="Alpha of each block's 3x3 convolutions; empty = 'Conv alpha'.",
    )
    down_lr_weight: str | None = setting(
        None,
        label="Down-block lr weights",
        kohya="down_lr_weight",
        network_arg=True,
        help="Learning-rate multiplier of each down (input) block: 12 numbers for SD1/SD2, 9 for SDXL, or a "
        "curve: sine, cosine, linear, reverse_linear, zeros ('+0.5' adds 0.5 to each). 0 = block not trained.",
    )
    mid_lr_weight: str | None = setting(
        None,
        label="Mid-block lr weight",
        kohya="mid_lr_weight",
        network_arg=True,
        help="Learning-rate multiplier of the mid block (1 number for SD1/SD2, 3 for SDXL).",
    )
    up_lr_weight: str | None = setting(
        None,
        label="Up-block lr weights",
        kohya="up_lr_weight",
        network_arg=True,
        help="Learning-rate multiplier of each up (output) block, deepest first; like 'Down-block lr weights'.",
    )
    block_lr_zero_threshold: float = setting(
        0.0,
        label="Block lr zero threshold",
        kohya="block_lr_zero_threshold",
        network_arg=True,
        ge=0.0,
        help="Block lr weights not above this count as 0 (that block is then not trained and gets no modules).",
    )

    @property
    def algorithm(self) -> str:
        """Our registered algorithm for ``network_module``, ``algo`` and ``dora_wd`` ("lora", "loha", "lokr", "dora")."""
        if self.network_module != LYCORIS_MODULE:
            return NETWORK_MODULES.get(self.network_module, self.network_module)
        if self.dora_wd:
            return "dora"
        return LYCORIS_ALGOS.get(self.algo, self.algo)

    @property
    def algorithm_args(self) -> dict[str, Any]:
        """The algorithm's own options, as ``LoRANetwork(algorithm_args=...)`` passes them to its modules."""
        if self.algorithm == "lokr":
            return {
                "factor": self.factor,
                "decompose_both": self.decompose_both,
                "full_matrix": self.full_matrix,
                "use_tucker": self.use_tucker,
            }
        if self.algorithm == "loha":
            return {"use_tucker": self.use_tucker}
        return {}

    @property
    def lycoris_args(self) -> dict[str, str]:
        """LyCORIS's own network arguments as a LyCORIS user writes them (``ss_network_args``: strings);
        empty for kohya's networks.lora. The conv and dropout arguments are kohya's and are not included."""
        if self.network_module != LYCORIS_MODULE:
            return {}
        args = {"algo": self.algo}
        if self.algorithm == "lokr":
            args["factor"] = str(self.factor)
            args |= {name: "True" for name in ("decompose_both", "full_matrix") if getattr(self, name)}
        if self.use_tucker:
            args["use_tucker"] = "True"
        if self.dora_wd:
            args["dora_wd"] = "True"
        return args


_LOKR_ONLY = ("network.decompose_both", "network.full_matrix")


def _lycoris_problems(v: dict[str, Any]) -> list[ConfigError]:
    algo, problems = v["network.algo"], []
    if v["network.dora_wd"] and LYCORIS_ALGOS.get(algo) != "lora":
        problems.append(
            ConfigError("network.dora_wd", f"DoRA works with algorithm 'lora' or 'locon' here, not {algo!r}")
        )
    if v.get("network.network_dropout"):
        problems.append(
            ConfigError(
                "network.network_dropout",
                "must be 0 with 'lycoris.kohya' (LyCORIS ignores kohya's network_dropout, and LoHa, LoKr and "
                "DoRA have none); use rank_dropout or module_dropout",
            )
        )
    if v["network.use_tucker"] and algo not in ("loha", "lokr"):
        problems.append(ConfigError("network.use_tucker", f"is for algorithm 'loha' or 'lokr', not {algo!r}"))
    return problems


def check_network_type(v: dict[str, Any]) -> list[ConfigError]:
    """The rules between ``network_module`` and the LyCORIS settings (``v``: valid values by dotted path)."""
    names = ("network.network_module", "network.algo", "network.dora_wd", "network.use_tucker")
    if not all(name in v for name in names):
        return []
    if v["network.network_module"] == LYCORIS_MODULE:
        return _lycoris_problems(v)
    changed = [
        name
        for name in (*names[1:], "network.factor", *_LOKR_ONLY)
        if name in v and v[name] != NetworkConfig.__dataclass_fields__[name.split(".")[1]].default
    ]
    return [
        ConfigError(name, f"needs network_module '{LYCORIS_MODULE}' (kohya's networks.lora has only plain LoRA)")
        for name in changed
    ]
