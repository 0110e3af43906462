"""The Hugging Face tests' Trainer: the example's tiny BERT on synthetic tokens, on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer

from examples import hf_trainer


def bert_trainer(
    output_dir: Path | str,
    *,
    bug: bool = False,
    trainer_class: type[Trainer] = Trainer,
    **args: Any,
) -> Trainer:
    """A Trainer of `examples/hf_trainer.py`'s model (`bug`: its planted head bug) writing to
    `output_dir`; `args` override its short-run training arguments (max_steps=4 by default)."""
    return trainer_class(
        model=hf_trainer.build_model(bug=bug),
        args=hf_trainer.training_arguments(str(output_dir), **args),
        train_dataset=hf_trainer.SyntheticTokens(),
    )
