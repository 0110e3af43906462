"""The bug zoo: planted gradient bugs and correct models that must stay quiet.

``ENTRIES`` is the registry (numpy entries always, torch entries where torch is
installed); `tests.zoo.harness` runs an entry under gradwatch or gradcheck;
``python -m benchmarks.zoo`` prints the detection-quality table.
"""

from __future__ import annotations

from tests.zoo.numpy_zoo import NUMPY_ENTRIES
from tests.zoo.registry import NumpyProblem, TorchProblem, Training, ZooEntry

__all__ = ["ENTRIES", "NumpyProblem", "TorchProblem", "Training", "ZooEntry", "entry"]


def _entries() -> list[ZooEntry]:
    entries = list(NUMPY_ENTRIES)
    try:
        from tests.zoo.torch_zoo import TORCH_ENTRIES
    except ImportError:  # torch not installed: the numpy half of the zoo still runs
        return entries
    return entries + TORCH_ENTRIES


ENTRIES: list[ZooEntry] = _entries()


def entry(name: str) -> ZooEntry:
    """The entry called ``name``."""
    for candidate in ENTRIES:
        if candidate.name == name:
            return candidate
    raise KeyError(f"no zoo entry named {name!r}")
