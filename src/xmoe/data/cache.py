"""Token arrays cached on disk as ``.npy`` files and memory-mapped on load.

An entry is a folder ``<cache_dir>/<key>/`` holding one ``<name>.npy`` per array, where the key
hashes everything the tokens depend on. An entry is built in a hidden temporary folder beside it
and published with one ``os.replace``, so an interrupted run leaves no entry or a whole one (and
at worst a hidden ``.<key>.*.tmp`` folder, safe to delete); two runs racing on one key both
build, the first rename wins and the other uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .files import temporary_name

# Bump when the layout or the meaning of cached tokens changes, so old entries are not reused.
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/xmoe/tokens``, or ``~/.cache/xmoe/tokens`` when that is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xmoe" / "tokens"


def cache_key(**inputs: str | float | int | None) -> str:
    """A short hex key for the given inputs (order of the keywords does not matter)."""
    payload = json.dumps({"format": CACHE_FORMAT, **inputs}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def cached_arrays(
    cache_dir: Path,
    key: str,
    names: tuple[str, ...],
    build: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """The arrays ``names`` of entry ``key``, read-only memory maps; ``build()`` them on a miss."""
    entry = cache_dir / key
    if not entry.is_dir():
        arrays = build()
        assert set(arrays) == set(names), f"build returned {sorted(arrays)}, expected {names}"
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_dir / temporary_name(key)
        tmp.mkdir()
        try:
            for name, array in arrays.items():
                with open(tmp / f"{name}.npy", "wb") as f:
                    np.save(f, np.ascontiguousarray(array))
                    f.flush()
                    os.fsync(f.fileno())
            try:
                os.replace(tmp, entry)
            except OSError:
                if not entry.is_dir():  # not a lost race: a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in names}
