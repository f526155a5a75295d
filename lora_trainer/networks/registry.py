"""The network algorithm registry: which algorithms exist, by name, and which one a saved module is.

This module imports no torch, so the config can read the name tables (:data:`NETWORK_MODULES`,
:data:`ALGORITHM_MODULES`) without loading it. The algorithms themselves live one per module
(``lora_trainer/networks/lora.py`` ...); each calls :func:`register_algorithm` for its
:class:`~lora_trainer.networks.base.NetworkModule` subclass when imported, and
:func:`get_algorithm` imports a built-in algorithm's module on first use.

A saved kohya-style module is ``<module name>.<part>``; :func:`detect_algorithm` says which
registered algorithm a module's parts belong to, as LyCORIS and the WebUI's Lora extension
tell LoRA from LoHa from LoKr by the tensors a module carries; :func:`loadable_algorithm`
also refuses a module with parts its algorithm does not know.

A new algorithm is one new module (its ``NetworkModule`` subclass, ``register_algorithm``
at the end) plus its line in :data:`ALGORITHM_MODULES`, and its kohya ``network_module``
in :data:`NETWORK_MODULES` if the config should offer it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Collection
from typing import TYPE_CHECKING

from lora_trainer.errors import LoraFileError

if TYPE_CHECKING:
    from lora_trainer.networks.base import NetworkModule

LYCORIS_MODULE = "lycoris.kohya"
"""LyCORIS's kohya ``network_module``; its ``algo`` network argument picks the algorithm."""

NETWORK_MODULES: dict[str, str] = {"networks.lora": "lora", LYCORIS_MODULE: "lora"}
"""kohya ``network_module`` -> our algorithm name (for LyCORIS: its default ``algo``, lora)."""

LYCORIS_ALGOS: dict[str, str] = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}
"""LyCORIS ``algo`` values offered -> our algorithm name (``dora_wd=True`` with lora/locon is "dora")."""

ALGORITHM_MODULES: dict[str, str] = {
    "lora": "lora_trainer.networks.lora",
    "dora": "lora_trainer.networks.dora",
    "loha": "lora_trainer.networks.loha",
    "lokr": "lora_trainer.networks.lokr",
}
"""Built-in algorithm name -> the module that defines and registers it (imported on first use)."""

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_ALGORITHMS: dict[str, type[NetworkModule]] = {}


def register_algorithm(name: str, cls: type[NetworkModule]) -> type[NetworkModule]:
    """Register ``cls`` as algorithm ``name`` (lower case, unique) and return it.

    Sets ``cls.algorithm = name``. A module that is reloaded registers its class again under
    the same name: that replaces the old class. Raises ``ValueError`` for a bad or taken name, ``TypeError``
    for a class that is not a ``NetworkModule`` with ``weight_keys`` (or its own ``detect``).
    """
    from lora_trainer.networks.base import NetworkModule  # here, so importing the registry needs no torch

    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"algorithm name {name!r} must be lower case: a letter, then letters, digits or _")
    if name in _ALGORITHMS and not _same_definition(_ALGORITHMS[name], cls):
        raise ValueError(f"algorithm {name!r} is already registered ({_ALGORITHMS[name].__qualname__})")
    if not (isinstance(cls, type) and issubclass(cls, NetworkModule)):
        raise TypeError(f"algorithm {name!r}: {cls!r} is not a NetworkModule subclass")
    if not cls.weight_keys and cls.detect.__func__ is NetworkModule.detect.__func__:
        raise TypeError(f"algorithm {name!r}: {cls.__qualname__} declares no weight_keys")
    taken = next((n for n, c in _ALGORITHMS.items() if c is cls and n != name), None)
    if taken is not None:
        raise ValueError(f"{cls.__qualname__} is already registered as {taken!r}")
    cls.algorithm = name
    _ALGORITHMS[name] = cls
    return cls


def _same_definition(registered: type, cls: type) -> bool:
    """The same class statement run again (its module reloaded): it replaces the old class."""
    return (registered.__module__, registered.__qualname__) == (cls.__module__, cls.__qualname__)


def unregister_algorithm(name: str) -> None:
    """Forget algorithm ``name`` (for tests that register their own); unknown names are ignored."""
    _ALGORITHMS.pop(name, None)


def _load_builtins() -> None:
    for name, module in ALGORITHM_MODULES.items():
        if name not in _ALGORITHMS:
            importlib.import_module(module)


def algorithm_names() -> list[str]:
    """Every registered algorithm (the built-in ones included), in registration order."""
    _load_builtins()
    return list(_ALGORITHMS)


def get_algorithm(name: str) -> type[NetworkModule]:
    """The module class of algorithm ``name``; ``KeyError`` naming the known ones if there is none."""
    if name not in _ALGORITHMS and name in ALGORITHM_MODULES:
        importlib.import_module(ALGORITHM_MODULES[name])
    try:
        return _ALGORITHMS[name]
    except KeyError:
        raise KeyError(f"unknown network algorithm {name!r} (known: {', '.join(algorithm_names())})") from None


def detect_algorithm(parts: Collection[str]) -> str | None:
    """The algorithm one saved module's parts (``lora_down.weight``, ``alpha`` ...) belong to, or None.

    An algorithm matches when every one of its ``weight_keys`` is there; among matches, one that
    explains every part wins. A match may still leave parts unexplained: ask the class's
    ``unknown_parts`` before trusting it.
    """
    _load_builtins()
    matches = [name for name, cls in _ALGORITHMS.items() if cls.detect(parts)]
    for name in matches:
        if not _ALGORITHMS[name].unknown_parts(parts):
            return name
    return matches[0] if matches else None


def loadable_algorithm(parts: Collection[str]) -> str:
    """The registered algorithm that explains every part of one saved module.

    Raises ``LoraFileError`` saying why there is none: no algorithm has these parts, or the
    one that has them also carries parts it does not know (the module would load only in part).
    """
    algorithm = detect_algorithm(parts)
    if algorithm is None:
        raise LoraFileError(f"parts {', '.join(sorted(parts))} are of no known network algorithm")
    unknown = _ALGORITHMS[algorithm].unknown_parts(parts)
    if unknown:
        raise LoraFileError(f"{algorithm} module with parts no algorithm knows: {', '.join(unknown)}")
    return algorithm
