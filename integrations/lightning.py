"""Gradient checks inside a Lightning ``Trainer`` run.

One line::

    from gradwatch.integrations.lightning import GradWatch

    trainer = lightning.Trainer(callbacks=[GradWatch(every=500)])

How it works. ``on_train_batch_start`` keeps a reference to the batch on due steps;
``on_before_optimizer_step`` (after backward, before Lightning clips and steps;
``trainer.global_step`` is the number of updates completed before this one)
recomputes J on that batch on a float64 copy of the LightningModule, as
`gradwatch.integrations.torch.check_module` does, and records it. J is the copy's
``training_step(batch, batch_idx)`` loss (its ``self.log`` calls are dropped, so
they never reach the trainer's metrics), or ``loss_fn(module, batch)``. The report
goes to ``<trainer.log_dir or default_root_dir>/gradwatch``; the metrics
``gradwatch/ratio``, ``gradwatch/status``, ... go through ``pl_module.log``. With
``accumulate_grad_batches > 1`` the check covers the step's last micro-batch, and the
report says so. Training is not changed: a run with the callback ends with
bit-identical weights and losses.

Under ``strategy="ddp"`` (launched by Lightning or by ``torchrun``) a check is
collective (`gradwatch.integrations._parallel.ranks`): every rank checks at every due
step, on its own batch, with J the mean over the ranks of their ``training_step``
losses, so every rank reaches the same verdict and names the same tensors; only global
rank zero writes the report. The check runs on the LightningModule, not on
Lightning's ``DistributedDataParallel`` wrapper, and calls no collective of DDP. The
step link compares ``.grad`` (DDP's mean of the ranks' gradients, before Lightning
clips it) with the gradient of that mean. Strategies that shard the parameters
(FSDP, DeepSpeed) are not supported.

Manual optimization (``automatic_optimization = False``): ``training_step`` steps
the optimizer itself, so pass ``loss_fn``.
"""

from __future__ import annotations

try:  # without its framework, say which extra installs it (not a bare ModuleNotFoundError)
    import lightning  # noqa: F401
    import torch
except ImportError as missing:
    raise ImportError(
        f"gradwatch.integrations.lightning needs {missing.name or 'lightning'}: "
        'pip install "gradwatch[lightning]"'
    ) from missing

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from gradwatch.integrations._shadow.loss import LossFn
from gradwatch.integrations._shadow.model import RngState
from gradwatch.integrations._step import MicroBatch
from gradwatch.integrations._training import TrainingWatch, check_step_notes, result_metrics
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from gradwatch.callback import WatchState
from gradwatch.errors import LossError, MissingBatchError
from gradwatch.watch.due import DueCheck

__all__ = ["GradWatch", "LightningGradWatch", "training_step_loss"]


_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
"""The autocast dtype of ``Trainer(precision=...)``'s mixed modes: the step link's tolerances."""


def _ignore_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``self.log`` / ``self.log_dict`` on the check's copy of the module."""


def training_step_loss(batch_idx: int, trainer: pl.Trainer | None = None) -> LossFn:
    """J as Lightning takes it: the loss ``training_step(batch, batch_idx)`` returns.

    The module passed in is the check's copy (a deep copy drops the trainer): it is
    attached to ``trainer`` through the public ``LightningModule.trainer`` setter, for
    reading (``self.trainer.global_step`` works), and its ``log``/``log_dict`` are
    no-ops, so nothing it logs reaches the trainer.
    """

    def loss(module: nn.Module, batch: Any) -> torch.Tensor:
        for submodule in module.modules():
            if isinstance(submodule, pl.LightningModule):
                submodule.trainer = trainer
                # The copy's own instance attributes shadow its methods (plain Python, no
                # Lightning internals): its logging never reaches the trainer's metrics.
                vars(submodule).update(log=_ignore_log, log_dict=_ignore_log)
        output = module.training_step(batch, batch_idx)  # type: ignore[operator]
        if isinstance(output, Mapping):
            output = output.get("loss")
        if not isinstance(output, torch.Tensor):
            raise LossError(
                f"training_step: expected a loss tensor or a dict with 'loss', received "
                f"{type(output).__name__}; pass GradWatch(loss_fn=...) to say what J is"
            )
        return output

    return loss


def _window_loss(trainer: pl.Trainer) -> LossFn:
    """J of one micro-batch of the step link: ``(batch, batch_idx)`` -> its training_step loss."""

    def loss(module: nn.Module, item: tuple[Any, int]) -> torch.Tensor:
        batch, batch_idx = item
        return training_step_loss(batch_idx, trainer)(module, batch)

    return loss


class LightningGradWatch(TrainingWatch, Callback):
    """A Lightning `Callback` that checks the backprop gradient every `every` optimizer updates.

    Args:
        every: check when ``trainer.global_step % every == 0`` (0-based, so the first
            update is checked).
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``, J on the captured batch.
            None: the loss of the module's own ``training_step``.
        regularization: penalties ``(module) -> scalar tensor`` that are part of J on
            both sides (see `gradwatch.integrations.torch.check_module`).
        precision: ``"float64"`` (default, a float64 copy of the module) or
            ``"native"`` (the module's dtype; thresholds scaled and noted).
        report_dir: where the report goes; None:
            ``<trainer.log_dir or trainer.default_root_dir>/gradwatch``.
        sample, eps, threshold, warn, top_k, seed, on_alert, on_error, budget: as for the core
            `gradwatch.GradWatch`.

    The ``watch`` attribute and the errors of every callback: see `TrainingWatch`; and

    Raises:
        MissingBatchError: a due step whose batch ``on_train_batch_start`` did not see.
    """

    framework = "lightning"
    _batch: Any = None
    _batch_idx: int | None = None
    _window: list[tuple[Any, int, RngState]]
    """The due step's micro-batches, their indices and the RNG state each began from."""
    _due: DueCheck | None = None
    """The check due at the current step, from its first micro-batch to its run."""
    _saved: WatchState | None = None

    # -- checkpoints: a resumed fit (``ckpt_path``) continues the same report ------------

    @property
    def state_key(self) -> str:
        """The key of its state in a checkpoint: "GradWatch", as before the class had its
        own name, so older checkpoints resume their report."""
        return "GradWatch"

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the report directory and the checks so far."""
        return WatchState.read(self.watch.state_dict()).model_dump()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Read back from ``ckpt_path`` before ``on_train_start``: a resumed fit writes to the
        report the checkpointed run wrote (not to a new logger version's directory)."""
        self._saved = WatchState.read(state_dict)

    # -- Lightning hooks --------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        root = trainer.log_dir or trainer.default_root_dir
        notes = [
            "J = user loss_fn(module, batch) on the captured batch"
            if self.loss_fn is not None
            else "J = the loss of training_step(batch, batch_idx) on a copy of the module "
            "(its self.log calls dropped)",
            *check_step_notes(trainer.accumulate_grad_batches),
        ]
        if trainer.accumulate_grad_batches > 1 and pl_module.automatic_optimization:
            notes.append(
                f"Lightning optimizes the sum over {trainer.accumulate_grad_batches} micro-"
                "batches of training_step's loss / accumulate_grad_batches: with a per-micro-"
                "batch mean loss and micro-batches of different token counts that is not the "
                "step's token mean; the step link checks .grad against what Lightning optimizes"
            )
        if not pl_module.automatic_optimization and self.loss_fn is None:
            notes.append("manual optimization: training_step steps the optimizer; pass loss_fn")
        saved = self._saved.report_dir if self._saved is not None else None
        self.start(
            Path(saved) if saved else Path(root) / "gradwatch",
            writer=bool(trainer.is_global_zero),
            model=pl_module,
            own_loss="training_step loss",
            settings={
                "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "gradient_clip_val": trainer.gradient_clip_val,
            },
            notes=notes,
            resumed_at=trainer.global_step,  # restored from ckpt_path before on_train_start
            resumed_by="lightning ckpt_path",
        )
        rank_zero_info(self.watch.begin_line())

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._due is None:
            self._due = self.due(trainer.global_step)
            self._window = []
        if self._due is not None:
            self._batch, self._batch_idx = batch, batch_idx
            self._window.append((batch, batch_idx, RngState.capture()))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        due, self._due = self._due, None
        if due is None:
            return
        step = due.step
        batch, batch_idx = self._batch, self._batch_idx
        self._batch = self._batch_idx = None
        if batch_idx is None:
            raise MissingBatchError(
                f"step {step}: expected the batch of this step from on_train_batch_start, "
                "received none"
            )
        window, self._window = self._window, []
        step_batches = None
        if self.loss_fn is None and pl_module.automatic_optimization:
            # What Lightning optimizes: each training_step loss divided by
            # accumulate_grad_batches, summed over the window (.grad is not clipped yet).
            weight = 1.0 / trainer.accumulate_grad_batches
            autocast = _AUTOCAST.get(str(trainer.precision))
            step_batches = [MicroBatch((b, i), weight, rng, autocast) for b, i, rng in window]
        result = self.check(
            due,
            pl_module,
            training_step_loss(batch_idx, trainer),
            batch,
            optimizer=optimizer,
            step_batches=step_batches,
            step_loss_fn=_window_loss(trainer),
        )
        for name, value in result_metrics(result).items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch = self._batch_idx = None
        self._due = None
        self.finish()
        rank_zero_info(self.watch.end_line())


GradWatch = LightningGradWatch
"""The documented import path: ``from gradwatch.integrations.lightning import GradWatch``
(the core's `gradwatch.GradWatch` is another class)."""
