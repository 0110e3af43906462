"""J under the HF Trainer: the model's own loss, and the Trainer's where it is not the model's.

`model_loss` is J as the Trainer's default ``compute_loss`` takes it (the model's ``loss``
output); `projected_logits` stands in where the model computes none and the Trainer's
loss is out of reach; `label_count` counts the step's tokens as the Trainer does.

With ``label_smoothing_factor > 0`` the Trainer pops ``labels`` before the forward (the
model computes no loss) and optimizes its ``label_smoother`` on the model's logits and
those labels, divided by the step's token count (``num_items_in_batch``) where the
Trainer has one. `SmoothedLoss` is that J, on the inputs ``compute_loss`` received
(labels included), so both the finite-difference check and the step link check the
loss the Trainer optimizes.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from gradwatch.errors import LossError

__all__ = [
    "COUNT",
    "PROJECTION_NOTE",
    "SmoothedLoss",
    "model_loss",
    "projected_logits",
    "smoothing_applies",
]

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


def model_loss(model: nn.Module, inputs: Any) -> torch.Tensor:
    """J as the Trainer's default ``compute_loss`` takes it: the model's ``loss`` output.

    ``inputs`` is the dict of keyword arguments the Trainer passed to ``model.forward``
    (or ``(args, kwargs)`` when positional arguments were captured too).
    """
    return loss_output(hf_forward(model, inputs))


def hf_forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], Mapping):
        return model(*inputs[0], **inputs[1])
    return model(**inputs)


def loss_output(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
        if loss is None:
            raise LossError(
                f"model output: expected a `loss` (the model computes its loss when the "
                f"inputs hold labels), received only {list(outputs.keys())}; pass "
                f"GradWatch(loss_fn=...) to say what J is"
            )
        return loss  # type: ignore[no-any-return]
    if isinstance(outputs, (tuple, list)) and outputs:
        return outputs[0]  # type: ignore[no-any-return]
    raise LossError(
        f"model output: expected a ModelOutput with `loss` or a tuple whose first item is "
        f"the loss, received {type(outputs).__name__}; pass GradWatch(loss_fn=...)"
    )


PROJECTION_NOTE = (
    "where the model computes no loss (the Trainer popped the labels for its own loss), J is "
    "a fixed projection of the model's logits: every parameter that reaches them is checked, "
    "the Trainer's loss function is not"
)


def projected_logits(outputs: Any) -> torch.Tensor | None:
    """J when the model computes no loss and the Trainer's own loss is out of reach:
    the mean of the logits weighted by a fixed, well spread vector (cosines of multiples
    of the golden angle; no random number generator, so nothing to replay or restore).
    J is smooth and deterministic in theta, so backprop through the whole model is
    checked against it exactly as against a loss. None when no floating output exists."""
    if isinstance(outputs, Mapping):
        values = [outputs["logits"]] if "logits" in outputs else list(outputs.values())
    elif isinstance(outputs, (tuple, list)):
        values = list(outputs)
    else:
        values = [outputs]
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            index = torch.arange(value.numel(), device=value.device, dtype=value.dtype)
            weights = torch.cos(index * 2.399963229728653).reshape(value.shape)
            return (value * weights).mean()
    return None


def takes_loss_kwargs(model: nn.Module) -> bool:
    """True when ``model.forward`` passes extra keyword arguments on to its loss."""
    if getattr(model, "accepts_loss_kwargs", None) is False:
        return False
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)


def label_count(model: nn.Module, inputs: list[dict[str, Any]]) -> torch.Tensor | None:
    """The step's predicted tokens, counted as the Trainer counts ``num_items_in_batch``."""
    labels = [kwargs.get("labels") for kwargs in inputs]
    tensors = [label for label in labels if isinstance(label, torch.Tensor)]
    if len(tensors) != len(labels):
        return None
    loss_type = str(getattr(model, "loss_type", None))
    config = getattr(model, "config", None)
    shifts = LOSS_MAPPING.get(loss_type) is ForCausalLMLoss and not getattr(
        config, "is_encoder_decoder", False
    )
    counts = [(label[..., 1:] if shifts else label).ne(-100).sum() for label in tensors]
    return torch.stack(counts).sum()
