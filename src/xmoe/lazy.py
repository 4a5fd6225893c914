"""Package exports loaded on first use (PEP 562), for packages whose submodules differ in weight.

A package's ``__init__`` runs before any of its submodules, so an ``__init__`` that imports its
torch modules eagerly makes ``from xmoe.moe.config import MoEConfig`` import torch too. With
``lazy_exports``, ``from xmoe.moe import MoELayer`` still works everywhere and imports
xmoe.moe.layer at that moment, while the torch-free submodules (configs, counts) stay light:
``xmoe presets`` lists every model without importing torch.

This module imports nothing from xmoe, so every package may use it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(
    package: str, exports: dict[str, tuple[str, ...]]
) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """``(__all__, __getattr__, __dir__)`` for ``package``, exporting each name of
    ``exports[submodule]`` from ``package.submodule``, imported when the name is first read."""
    home = {name: submodule for submodule, names in exports.items() for name in names}
    assert len(home) == sum(map(len, exports.values())), f"{package} exports a name from two submodules"

    def __getattr__(name: str) -> object:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{home[name]}")
        value = getattr(module, name)
        setattr(importlib.import_module(package), name, value)  # read once; later reads skip this
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(home))

    return sorted(home), __getattr__, __dir__
