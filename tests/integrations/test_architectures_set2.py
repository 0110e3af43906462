"""The second architecture sweep (`benchmarks.hf_setups`) at default options, in the suite.

Each row is trained twice by the real Trainer (plain, then with ``GradWatch(every=1,
trainer=trainer)``) as ``python -m benchmarks.architectures --set 2`` does: no check
fails or errs, and the watched run ends with the plain run's weights, bit for bit.
The quick rows run always; the rest are marked slow.
"""

from __future__ import annotations

import functools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks.architectures import sweep_one  # noqa: E402
from benchmarks.hf_setups import SETUPS  # noqa: E402

pytestmark = pytest.mark.torch

QUICK = [
    "convnext",  # drop path
    "wav2vec2-ctc",  # layerdrop
    "switch-transformers",  # router jitter
    "llama-checkpointing",
    "llama-label-smoothing",
    "llama-bf16",
]
SLOW = [name for name in SETUPS if name not in QUICK]
"""The rest (about 1 s each; ResNet and LoRA 5-30 s: the core's search is long on them)."""


def _sweep(name: str) -> None:
    if name == "llama-lora":
        pytest.importorskip("peft")
    setup = SETUPS[name]
    row = sweep_one(name, functools.partial(setup.build, 0), steps=2, every=1, seed=0, setup=setup)
    assert row.crash is None, row.crash
    assert row.statuses == ["ok", "ok"], row.note
    assert row.same_weights, "a check changed training"


@pytest.mark.parametrize("name", QUICK)
def test_second_sweep_quick_rows(name: str) -> None:
    """A replay-stressing setup trains with every check ok and bit-identical weights."""
    _sweep(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_second_sweep_other_rows(name: str) -> None:
    """The rest of the second sweep: every check ok, weights bit-identical."""
    _sweep(name)
