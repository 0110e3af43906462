"""Gradient checks inside a Hugging Face `transformers.Trainer` run.

One line::

    from gradwatch.integrations.transformers import GradWatch

    trainer.add_callback(GradWatch(every=500))     # or add_callback(GradWatch)
    trainer.train()
    # $ gradwatch show <output_dir>/gradwatch

How it works. Trainer callbacks never receive the batch, so at train begin a
forward pre-hook (``with_kwargs=True``) goes on the model; on a due step it keeps a
reference to the inputs of the model's training forward. In
``on_pre_optimizer_step`` (after backward and clipping, before the update; there
``state.global_step`` is still the number of updates completed before this one)
the check recomputes J on those inputs on a float64 copy of the model, as
`gradwatch.integrations.torch.check_module` does, and records it: the report goes
to ``<args.output_dir>/gradwatch`` and ``gradwatch/ratio``, ``gradwatch/status``, ...
reach the Trainer's logs (and so TensorBoard, W&B, ...). The hook is removed at train
end. Training is not changed: a run with the callback ends with bit-identical weights
and losses.

Distributed (``torchrun`` or ``accelerate launch``, the Trainer wrapping the model in
DDP): a check is collective (`gradwatch.integrations._parallel.ranks`), so every rank
checks at the same due steps, J being the mean of the ranks' losses, and every rank
reaches the same verdict; only the world process zero writes the report.

Callbacks receive no reference to the Trainer, and gradwatch does not go looking for
one: pass it, ``GradWatch(every=500, trainer=trainer)``, for what only the Trainer
object gives (metrics through ``trainer.log``, an overridden ``compute_loss`` or a
``compute_loss_func`` named in the report, a user ``loss_fn`` on the inputs
``compute_loss`` received). Without it the metrics are appended to
``state.log_history`` (the report holds them either way).

What J is: the model's own ``loss`` output on the captured inputs. Under label
smoothing (``label_smoothing_factor > 0``) with the ``trainer`` passed, J is the
Trainer's own ``label_smoother`` on the inputs ``compute_loss`` received, labels
included, step link too. Without the trainer the labels never reach the model: J is
then a fixed projection of the model's logits (`projected_logits`), which checks the
backprop of every parameter that reaches them but not the loss function, the step link
is not judged, and the notes say so. Where the Trainer computes its training loss
otherwise (``compute_loss_func``, an overridden ``compute_loss``) the report says so;
pass ``loss_fn(model, inputs)`` to check that loss instead. With gradient accumulation
the finite-difference check covers the step's last micro-batch (the report says so);
the step link (``result.step_link``) compares the optimizer's ``.grad`` with the
float64 gradient of J over every micro-batch of the step, J being the model's loss
with the step's ``num_items_in_batch`` (see `gradwatch.integrations._step`). Under DDP
with ``average_tokens_across_devices`` (the default) that count is summed over the
ranks and the Trainer multiplies each rank's loss by the world size before DDP
averages the gradients; the step link's J does the same, so J is the token mean over
every rank's batch (a model whose loss ignores ``num_items_in_batch``, a sequence
classifier, is trained on the world size times its mean loss, and J is that too).
"""

from __future__ import annotations

try:  # without its framework, say which extra installs it (not a bare ModuleNotFoundError)
    import torch
    import transformers  # noqa: F401
except ImportError as missing:
    raise ImportError(
        f"gradwatch.integrations.transformers needs {missing.name or 'transformers'}: "
        'pip install "gradwatch[transformers]"'
    ) from missing

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from gradwatch.integrations._hf_loss import (
    COUNT,
    PROJECTION_NOTE,
    SmoothedLoss,
    hf_forward,
    label_count,
    loss_output,
    model_loss,
    projected_logits,
    smoothing_applies,
    takes_loss_kwargs,
)
from gradwatch.integrations._shadow.model import RngState
from gradwatch.integrations._step import MicroBatch
from gradwatch.integrations._training import (
    BatchCapture,
    TrainingWatch,
    check_step_notes,
    result_metrics,
)
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.utils import logging as transformers_logging

from gradwatch.callback import WatchState
from gradwatch.errors import LossError, MissingBatchError, OptionError
from gradwatch.result import CheckResult
from gradwatch.watch.due import DueCheck

_logger = transformers_logging.get_logger("transformers.integrations.gradwatch")
"""Under the ``transformers`` logger: the Trainer's ``log_level`` decides what shows."""

__all__ = ["GradWatch", "TrainerGradWatch", "model_loss"]


class TrainerGradWatch(TrainingWatch, TrainerCallback, ExportableState):
    """A `TrainerCallback` that checks the backprop gradient every `every` optimizer updates.

    Args:
        every: check when ``state.global_step % every == 0`` (0-based, so the first
            update is checked).
        trainer: the `Trainer` this callback is added to (Trainer callbacks are never
            given it): ``trainer.add_callback(GradWatch(every=500, trainer=trainer))``.
            With it the metrics go through ``trainer.log`` (TensorBoard, W&B, ...), the
            report names a ``compute_loss_func`` or an overridden ``compute_loss``, and a
            user ``loss_fn`` gets the inputs ``trainer.compute_loss`` received (gradwatch
            wraps that method on this instance for the run; removed at train end).
            None: metrics appended to ``state.log_history``, label smoothing detected
            from ``args`` only.
        loss_fn: ``loss_fn(model, inputs) -> scalar tensor``, J on the captured inputs:
            with ``trainer``, the dict ``Trainer.compute_loss`` received (labels
            included); without, the keyword arguments of ``model.forward`` (the Trainer
            pops ``labels`` before the forward when it computes the loss itself).
            None: the model's own ``loss`` output (`model_loss`).
        regularization: penalties ``(model) -> scalar tensor`` that are part of J on
            both sides (see `gradwatch.integrations.torch.check_module`).
        precision: ``"float64"`` (default, a float64 copy of the model) or
            ``"native"`` (the model's dtype; thresholds scaled and noted).
        report_dir: where the report goes; None: ``<args.output_dir>/gradwatch``.
        sample, eps, threshold, warn, top_k, seed, on_alert, on_error, budget: as for the core
            `gradwatch.GradWatch`.

    The ``watch`` attribute and the errors of every callback: see `TrainingWatch`; and

    Raises:
        MissingBatchError: a due step whose training forward the hook did not see.
    """

    framework = "transformers"
    _capture: BatchCapture | None = None
    _trainer: Trainer | None = None
    _loss_scale = 1.0
    """The factor the Trainer multiplies a loss given ``num_items_in_batch`` by (the world
    size under ``average_tokens_across_devices``)."""
    _loss_inputs: dict[str, Any] | None = None
    """What ``trainer.compute_loss`` received on the due step (labels included)."""
    _differences: Sequence[str] = ()
    _smoothed: SmoothedLoss | None = None
    """J under label smoothing with the ``trainer`` passed: the Trainer's own loss."""
    _loss_calls: list[tuple[dict[str, Any], RngState]]
    """Each ``compute_loss`` call of the due step: its inputs (labels, count) and RNG state."""
    _saved_state: dict[str, Any] | None = None
    _unsaved_options: Sequence[str] = ()
    _due: DueCheck | None = None
    """The check due at the current step (`TrainingWatch.due`), from step begin to its run."""

    def __init__(self, every: int = 500, *, trainer: Trainer | None = None, **options: Any):
        if trainer is not None and not isinstance(trainer, Trainer):
            raise OptionError(
                f"trainer: expected None or the transformers.Trainer this callback is added "
                f"to, received {type(trainer).__name__}"
            )
        super().__init__(every, **options)
        self._trainer = trainer
        self._loss_calls = []

    # -- checkpoints: a resumed train() continues the same report -----------------------

    def state(self) -> dict[str, Any]:
        """Saved in each checkpoint's ``trainer_state.json`` (a stateful callback).

        ``attributes`` hold `gradwatch.GradWatch.state_dict` (the report directory, the
        checks so far), read back on ``train(resume_from_checkpoint=...)``. ``args`` hold
        the options JSON can carry, for ``restore_callback_states_from_checkpoint=True``
        (which rebuilds the callback from them); a callable ``loss_fn``,
        ``regularization`` or ``on_alert`` cannot be saved, and a callback rebuilt
        without them refuses to start rather than check another J.
        """
        options = {
            **self.options.as_dict(),
            "mode": self.mode,
            "precision": self.precision,
            "report_dir": None if self.report_dir is None else str(self.report_dir),
        }
        saved = {key: value for key, value in options.items() if not callable(value)}
        unsaved = [key for key, value in options.items() if callable(value)]
        unsaved += [name for name in ("loss_fn", "regularization") if getattr(self, name)]
        return {
            "args": saved,
            "attributes": {"_saved_state": self.watch.state_dict(), "_unsaved_options": unsaved},
        }

    def _resumed_state(self, state: TrainerState) -> WatchState | None:
        """The state saved with the checkpoint this train() resumed from, if any."""
        if state.global_step == 0:
            return None  # a fresh run: stateful_callbacks holds this run's own state
        saved = self._saved_state
        if saved is None:
            stored_states: object = state.stateful_callbacks  # a dict once loaded from JSON
            stored = None
            if isinstance(stored_states, Mapping):
                # Checkpoints written before the class had its own name keep "GradWatch".
                names = (type(self).__name__, "GradWatch")
                stored = next((stored_states[n] for n in names if n in stored_states), None)
            attributes = stored.get("attributes") if isinstance(stored, Mapping) else None
            if isinstance(attributes, Mapping):
                saved = attributes.get("_saved_state")
        return None if saved is None else WatchState.read(saved)

    # -- Trainer events ---------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise MissingBatchError(
                "on_train_begin: expected the Trainer to pass `model` to its callbacks, "
                "received none; cannot hook the model's forward to capture batches"
            )
        if self._unsaved_options:
            raise OptionError(
                "restore_callback_states_from_checkpoint: GradWatch was rebuilt from the "
                f"checkpoint without {', '.join(self._unsaved_options)} (a callable cannot be "
                "saved as JSON); expected restore_callback_states_from_checkpoint=False (GradWatch "
                "reads its report state from the checkpoint either way)"
            )
        self._loss_scale = float(args.world_size) if args.average_tokens_across_devices else 1.0
        resumed = self._resumed_state(state)
        notes = [
            *self._loss_notes(args),
            *check_step_notes(args.gradient_accumulation_steps),
        ]
        self.start(
            Path(resumed.report_dir)
            if resumed is not None and resumed.report_dir
            else Path(args.output_dir or ".") / "gradwatch",
            writer=bool(state.is_world_process_zero),  # every rank checks, one writes
            model=model,
            own_loss="model output `loss`",
            settings={
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "max_grad_norm": args.max_grad_norm,
            },
            notes=notes,
            resumed_at=state.global_step,  # TrainerState was loaded from the checkpoint
            resumed_by="transformers resume_from_checkpoint",
        )
        if self._capture is not None:
            self._capture.remove()
        self._capture = BatchCapture(model)
        self._observe_compute_loss()
        _logger.info(self.watch.begin_line())  # shown at the Trainer's log_level

    def _observe_compute_loss(self) -> None:
        """With the ``trainer`` the user passed and a user ``loss_fn``, also keep what
        ``trainer.compute_loss`` receives on a due step: it still holds the labels, which
        the Trainer pops before the forward when it computes the loss itself."""
        trainer, capture = self._trainer, self._capture
        if trainer is None or capture is None or (self.loss_fn is None and not self._smoothed):
            return
        original = trainer.compute_loss

        def compute_loss(model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            if capture.armed:
                self._loss_inputs = dict(inputs)
                count = kwargs.get(COUNT, args[1] if len(args) > 1 else None)
                self._loss_calls.append(({**inputs, COUNT: count}, RngState.capture()))
            return original(model, inputs, *args, **kwargs)

        compute_loss.__gradwatch_wrapped__ = original  # type: ignore[attr-defined]
        trainer.compute_loss = compute_loss  # type: ignore[method-assign]

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._capture is None:
            return
        self._capture.clear()
        self._loss_inputs = None
        self._loss_calls = []
        self._due = self.due(state.global_step)  # on every rank: a check is collective
        self._capture.armed = self._due is not None

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        capture, due = self._capture, self._due
        if capture is None or due is None or not capture.armed:
            return
        capture.armed, self._due = False, None
        step = due.step
        if not capture.captured or model is None:
            raise MissingBatchError(
                f"step {step}: expected the inputs of this step's training forward, captured "
                f"by a forward pre-hook on {type(capture.model).__name__}, received none "
                "(was the forward called on another module, or in eval mode?)"
            )
        args_, kwargs_ = capture.args or (), capture.kwargs or {}
        batch: Any = (args_, kwargs_) if args_ else kwargs_
        if self._loss_inputs is not None:
            batch, self._loss_inputs = self._loss_inputs, None
        default_loss: Any = self._model_loss
        step_batches = self._step_batches(model, capture)
        smoothed = self._smoothed
        if smoothed is not None and self._loss_calls:
            # J is the Trainer's label-smoothed loss on what compute_loss received.
            default_loss, batch = smoothed, self._loss_calls[-1][0]
            step_batches = self._smoothed_batches(smoothed, capture)
        clip_factor = capture.clip_factor(args.max_grad_norm or 0.0)
        capture.clear()
        result = self.check(
            due,
            model,
            default_loss,
            batch,
            optimizer=optimizer,
            step_batches=step_batches,
            clip_factor=clip_factor,
        )
        self._log_metrics(result, state)

    def _step_batches(self, model: nn.Module, capture: BatchCapture) -> list[MicroBatch] | None:
        """The step's micro-batches for the step link, J as the Trainer defines it since
        the accumulation fix: the model's loss of each with the step's token count
        (``num_items_in_batch``), so J is the step's token mean, times the world size where
        the Trainer gave that count summed over the ranks; a model that takes no loss
        keyword arguments: the mean of the micro-batches' losses.

        None (no step link) where J is not the model's own loss (a user ``loss_fn``, label
        smoothing, ``compute_loss_func``, labels kept from the forward), or the inputs
        were positional.
        """
        forwards = capture.forwards
        if self.loss_fn is not None or not forwards or any(args for args, _, _ in forwards):
            return None  # J is the user's loss on compute_loss inputs, or inputs positional
        if not all("labels" in kwargs for _, kwargs, _ in forwards):
            return None  # the model computes no loss of its own (labels popped before forward)
        if any(d.startswith(("label smoothing", "compute_loss_func")) for d in self._differences):
            return None
        inputs = [kwargs for _, kwargs, _ in forwards]
        if "num_items_in_batch" not in inputs[0] and takes_loss_kwargs(model):
            count = label_count(model, inputs)
            if count is not None:
                inputs = [{**kwargs, "num_items_in_batch": count} for kwargs in inputs]
        if "num_items_in_batch" in forwards[0][1]:
            weight = self._loss_scale  # the Trainer's count, summed over the ranks
        else:
            weight = 1.0 if "num_items_in_batch" in inputs[0] else 1.0 / len(inputs)
        return [
            MicroBatch(kwargs, weight, rng, capture.autocast)
            for kwargs, (_, _, rng) in zip(inputs, forwards, strict=True)
        ]

    def _smoothed_batches(self, loss: SmoothedLoss, capture: BatchCapture) -> list[MicroBatch]:
        """The step's micro-batches as compute_loss received them, each weighted as
        ``training_step`` weights its label-smoothed loss."""
        assert self._trainer is not None
        calls, self._loss_calls = self._loss_calls, []
        return [
            MicroBatch(
                inputs,
                loss.weight(self._trainer, inputs[COUNT], self._loss_scale),
                rng,
                capture.autocast,
            )
            for inputs, rng in calls
        ]

    def _model_loss(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """`model_loss`; where the Trainer computes its loss otherwise and the model gives
        none (labels popped), the `projected_logits` J, which still checks the model's
        backprop."""
        outputs = hf_forward(model, inputs)
        try:
            return loss_output(outputs)
        except LossError as error:
            if not self._differences:
                raise
            projection = projected_logits(outputs)
            if projection is not None:
                return projection
            raise LossError(
                f"{error} (the Trainer computes its training loss otherwise: "
                f"{', '.join(self._differences)}; pass GradWatch(trainer=trainer) to check the "
                "Trainer's label-smoothed loss, or GradWatch(loss_fn=...))"
            ) from error

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        if self._trainer is not None and hasattr(
            vars(self._trainer).get("compute_loss"), "__gradwatch_wrapped__"
        ):
            del self._trainer.compute_loss
        self.finish()
        _logger.info(self.watch.end_line())

    # -- helpers ----------------------------------------------------------------------

    def _log_metrics(self, result: CheckResult, state: TrainerState) -> None:
        metrics = result_metrics(result)
        if self._trainer is not None:
            self._trainer.log(dict(metrics))  # reaches TensorBoard, W&B, ... via on_log
        else:
            state.log_history.append({**metrics, "step": state.global_step})

    def _loss_notes(self, args: TrainingArguments) -> list[str]:
        user = self.loss_fn is not None
        notes = [
            "J = user loss_fn(model, inputs) on the captured inputs"
            if user
            else "J = the model's own `loss` output on the captured inputs"
        ]
        trainer = self._trainer
        differences: list[str] = []
        self._smoothed = (
            SmoothedLoss(trainer) if trainer and smoothing_applies(trainer, user) else None
        )
        if self._smoothed is not None:
            notes[0] = (
                f"J = the Trainer's label-smoothed loss (label_smoother, epsilon "
                f"{args.label_smoothing_factor:g}) on the inputs compute_loss received"
            )
        elif args.label_smoothing_factor > 0:  # the Trainer's label_smoother
            differences.append(f"label smoothing {args.label_smoothing_factor:g}")
        if trainer is None:
            notes.append(
                "the Trainer was not passed (GradWatch(trainer=trainer)): an overridden "
                "compute_loss or a compute_loss_func could not be inspected"
            )
        else:
            if trainer.compute_loss_func is not None:
                differences.append("compute_loss_func")
            if type(trainer).compute_loss is not Trainer.compute_loss:
                differences.append(f"{type(trainer).__name__}.compute_loss overridden")
        self._differences = differences
        if differences:
            notes.append(
                "the Trainer computes its training loss otherwise ("
                + ", ".join(differences)
                + (
                    "): J is the user loss_fn"
                    if user
                    else "): J is the model's own loss, not "
                    "the Trainer's; pass loss_fn to check the Trainer's loss"
                )
            )
            if not user:
                notes.append(PROJECTION_NOTE)
        return notes


GradWatch = TrainerGradWatch
"""The documented import path: ``from gradwatch.integrations.transformers import GradWatch``
(the core's `gradwatch.GradWatch` is another class)."""
