"""The Trainer's own loss where it is not the model's: label smoothing.

With ``label_smoothing_factor > 0`` the Trainer pops ``labels`` before the forward (the
model computes no loss) and optimizes its ``label_smoother`` on the model's logits and
those labels, divided by the step's token count (``num_items_in_batch``) where the
Trainer has one. `SmoothedLoss` is that J, on the inputs ``compute_loss`` received
(labels included), so both the finite-difference check and the step link check the
loss the Trainer optimizes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

__all__ = ["COUNT", "SmoothedLoss", "smoothing_applies"]

COUNT = "num_items_in_batch"
"""The key under which a captured micro-batch carries the Trainer's token count."""


class SmoothedLoss:
    """``loss_fn(model, inputs)``: the Trainer's ``label_smoother`` as ``compute_loss`` calls it.

    ``inputs`` are what ``compute_loss`` received (``labels`` included) plus, under
    `COUNT`, the ``num_items_in_batch`` it was given (None: the micro-batch's own mean).
    """

    def __init__(self, trainer: Trainer) -> None:
        self.smoother = trainer.label_smoother
        self.takes_count = bool(trainer.model_accepts_loss_kwargs)
        self.epsilon = float(trainer.args.label_smoothing_factor)

    def __call__(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        count = inputs.pop(COUNT, None)
        if self.takes_count and count is not None:
            inputs[COUNT] = count
        outputs = model(**inputs)
        assert self.smoother is not None
        loss: torch.Tensor = self.smoother(
            outputs, labels, shift_labels=_shifts_labels(model), num_items_in_batch=count
        )
        return loss

    def weight(self, trainer: Trainer, count: Any, world_scale: float) -> float:
        """The factor ``training_step`` puts on this micro-batch's loss (see its code):
        the world size where the count is summed over the ranks, and 1 / accumulation
        steps where the loss is not normalized by the step's count."""
        weight = 1.0
        counted = self.takes_count and count is not None
        if counted and trainer.args.average_tokens_across_devices:
            weight *= world_scale
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if not (counted if scaled is None else scaled):
            weight /= trainer.current_gradient_accumulation_steps
        return weight


def _shifts_labels(model: nn.Module) -> bool:
    """A causal LM: the Trainer shifts its labels (as ``compute_loss`` decides, by class name)."""
    inner: Any = model
    if type(model).__module__.startswith("peft"):
        base: Any = model.base_model  # peft: the Trainer looks at the wrapped model
        inner = base.model
    return type(inner).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def smoothing_applies(trainer: Trainer | None, user_loss: bool) -> bool:
    """True when J should be the Trainer's label-smoothed loss (`SmoothedLoss`)."""
    return (
        trainer is not None
        and not user_loss
        and trainer.label_smoother is not None
        and trainer.compute_loss_func is None
        and type(trainer).compute_loss is Trainer.compute_loss
    )
