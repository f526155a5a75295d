"""A network over a model's targets, of any registered algorithm, attached without touching any base tensor.

``LoRANetwork`` is an ``nn.Module`` whose children are named by kohya key, so its
``state_dict()`` is exactly what kohya saves. It builds each child with the algorithm
the registry names (``lora_trainer.networks.registry``), so it knows no algorithm
itself; ``network.applied()`` attaches it (``hooks.py``) and always detaches it on
exit. Base weights are never written, so removal leaves every base tensor bit-identical.

:func:`network_from_weights` builds one from a saved file's state dict, detecting each
module's algorithm from its parts.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import torch
from torch import nn

from lora_trainer.errors import LoraFileError
from lora_trainer.log import logger
from lora_trainer.naming import Target, find_targets
from lora_trainer.networks.base import NetworkModule
from lora_trainer.networks.hooks import contiguous_input_hook, delta_hook, mha_forward, target_device
from lora_trainer.networks.registry import get_algorithm, loadable_algorithm


class LoRANetwork(nn.Module):
    """Modules of one algorithm (``algorithm``, default kohya's LoRA/LoCon) on ``targets``.

    Targets that ``uses_conv_dim`` (3x3 convs) get ``conv_rank``/``conv_alpha``, the rest
    ``rank``/``alpha``; a rank of 0 leaves the target out. ``rank_alpha``, when given, returns a
    target's own (rank, alpha), or None for the above (per-block ranks, ``networks.blocks``).
    ``algorithm_args`` are passed to the algorithm's module class as keyword arguments.
    """

    def __init__(
        self,
        targets: list[Target],
        *,
        rank: int,
        alpha: float | None,
        conv_rank: int = 0,
        conv_alpha: float | None = None,
        dropout: float = 0.0,
        rank_dropout: float = 0.0,
        module_dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        algorithm: str = "lora",
        algorithm_args: Mapping[str, Any] | None = None,
        rank_alpha: Callable[[Target], tuple[int, float | None] | None] | None = None,
    ):
        super().__init__()
        self.targets: dict[str, Target] = {}
        self._handles: list = []
        self._mha_forwards: dict[nn.MultiheadAttention, Any] = {}  # the instance's own forward before, if any
        cls = get_algorithm(algorithm)
        for t in targets:
            r, a = (conv_rank, conv_alpha) if t.uses_conv_dim else (rank, alpha)
            if rank_alpha is not None:
                r, a = rank_alpha(t) or (r, a)
            if r <= 0:
                continue
            module = cls(
                t,
                r,
                a,
                dropout=dropout,
                rank_dropout=rank_dropout,
                module_dropout=module_dropout,
                device=target_device(t),
                dtype=dtype,
                **(algorithm_args or {}),
            )
            self.add(t, module)

    def add(self, target: Target, module: NetworkModule) -> None:
        """Put ``module`` on ``target`` (named by the target's kohya key)."""
        if self.is_applied:
            raise RuntimeError("cannot add a module while the network is applied")
        self.add_module(target.key, module)
        self.targets[target.key] = target

    def loras(self, group: str | None = None) -> Iterator[NetworkModule]:
        """The network's modules, optionally of one group ("unet", "te", "te1", "te2")."""
        for key, module in self.named_children():
            if group is None or self.targets[key].group == group:
                assert isinstance(module, NetworkModule)
                yield module

    def algorithms(self) -> set[str]:
        """The algorithms of the network's modules."""
        return {m.algorithm for m in self.loras()}

    def parameters_of(self, groups: tuple[str, ...]) -> list[nn.Parameter]:
        return [p for m in self.loras() if self.targets[m.key].group in groups for p in m.parameters()]

    def set_multiplier(self, multiplier: float) -> None:
        for m in self.loras():
            m.multiplier = multiplier

    @property
    def is_applied(self) -> bool:
        return bool(self._handles or self._mha_forwards)

    def apply_to_model(self) -> None:
        if self.is_applied:
            raise RuntimeError("LoRA network is already applied")
        mha_parts: dict[nn.MultiheadAttention, dict[str, NetworkModule]] = defaultdict(dict)
        try:
            for module in self.loras():
                target = self.targets[module.key]
                if target.kind.startswith("mha_"):
                    mha_parts[cast(nn.MultiheadAttention, target.module)][target.kind[-1]] = module
                else:
                    if module.is_conv:
                        self._handles.append(target.module.register_forward_pre_hook(contiguous_input_hook))
                    self._handles.append(target.module.register_forward_hook(delta_hook(module)))
            for mha, parts in mha_parts.items():
                self._mha_forwards[mha] = mha.__dict__.get("forward")
                mha.forward = mha_forward(mha, parts)
        except BaseException:
            self.remove_from_model()
            raise

    def remove_from_model(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for mha, previous in self._mha_forwards.items():
            if previous is None:
                mha.__dict__.pop("forward", None)
            else:
                mha.forward = previous
        self._mha_forwards.clear()

    @contextlib.contextmanager
    def applied(self):
        """Attach for the duration of the block; detached again whatever happens."""
        self.apply_to_model()
        try:
            yield self
        finally:
            self.remove_from_model()


def split_modules(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A kohya-style state dict by module: ``{"<module>": {"<part>": tensor}}`` (a key splits at its first dot)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name, _, part = key.partition(".")
        modules.setdefault(name, {})[part] = value
    return modules


def network_from_weights(
    state_dict: Mapping[str, torch.Tensor],
    family: str,
    unet: nn.Module | None,
    text_encoders: dict[str, nn.Module] | None,
) -> tuple[LoRANetwork, list[str]]:
    """A network for the modules a kohya-style file names, loaded with its weights (fp32).

    Each module's algorithm is detected from its parts; rank and alpha are read per module,
    as kohya's ``create_network_from_weights`` does. Returns the network and, sorted, the
    file's modules it could not place: no layer of the model has that name, or no
    registered algorithm explains all of the module's parts (these are left out, not
    loaded in part).
    """
    targets = {t.key: t for t in find_targets(family, unet, text_encoders, conv=True)}
    network = LoRANetwork([], rank=1, alpha=None)
    unplaced = []
    for name, parts in split_modules(state_dict).items():
        target = targets.get(name)
        try:
            if target is None:
                raise LoraFileError(f"the model has no layer {name!r}")
            cls = get_algorithm(loadable_algorithm(parts))
        except LoraFileError as e:
            logger.debug("not placing %s: %s", name, e)
            unplaced.append(name)
            continue
        network.add(target, cls.from_weights(target, parts, device=target_device(target)))
    return network, sorted(unplaced)
