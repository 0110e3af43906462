"""What every trainer callback shares: batch capture, the due check, metrics, notes."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from gradwatch.integrations._check import check_module
from gradwatch.integrations._local.blocks import (
    CheckMode,
    checked_mode,
    resolve_mode,
    run_local,
    timed,
)
from gradwatch.integrations._parallel.ranks import Ranks
from gradwatch.integrations._parallel.sharded import is_sharded
from gradwatch.integrations._shadow.loss import LossFn, Penalties, penalty_items
from gradwatch.integrations._shadow.model import (
    Precision,
    RngState,
    check_precision,
    trainable_parameters,
)
from gradwatch.integrations._step import MicroBatch, compare_step
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradwatch.engine.finish import finish
from gradwatch.errors import OptionError
from gradwatch.options import WatchOptions
from gradwatch.result import CheckResult

if TYPE_CHECKING:
    from gradwatch.callback import GradWatch
    from gradwatch.watch.due import DueCheck

__all__ = [
    "STATUS_CODES",
    "BatchCapture",
    "TrainingWatch",
    "check_due",
    "check_step_notes",
    "join_ranks",
    "result_metrics",
]


class BatchCapture:
    """Holds the last inputs of ``model.forward``, seen by a forward pre-hook.

    Trainer callbacks never receive the batch; this hook does (``with_kwargs=True``,
    so ``model(**inputs)`` is captured too). It keeps references only, and only
    while ``armed`` (the framework arms it for due steps), and ignores eval-mode
    forwards and the check's own shadow.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._armed = False
        self._norm_handles: list[RemovableHandle] = []
        self.args: tuple[Any, ...] | None = None
        self.kwargs: dict[str, Any] | None = None
        self.forwards: list[tuple[tuple[Any, ...], dict[str, Any], RngState]] = []
        """Every training forward of the armed step: its inputs and the RNG state it began
        from (so the step check can replay each micro-batch's dropout draws)."""
        self.autocast: torch.dtype | None = None
        """The autocast dtype a training forward of the armed step ran under, if any."""
        self.squared_norms: dict[str, float] = {}
        """Each parameter's ||.grad||^2 after its last accumulation: before any clipping."""
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._make_hook(), with_kwargs=True)
        ]
        # Autocast is read inside the forward: accelerate enters it in the wrapped
        # forward, after the model's own pre-hook ran.
        children = list(model.children())
        self._handles += [
            child.register_forward_pre_hook(self._make_autocast_hook(children))
            for child in children
        ]

    @property
    def armed(self) -> bool:
        """True during a due step: forwards are captured, gradient norms recorded."""
        return self._armed

    @armed.setter
    def armed(self, value: bool) -> None:
        # The gradient-norm hooks live only while armed: other steps pay nothing for them.
        if value and not self._norm_handles:
            self._norm_handles = [
                parameter.register_post_accumulate_grad_hook(self._make_norm_hook(name))  # type: ignore[no-untyped-call]
                for name, parameter in trainable_parameters(self.model).items()
            ]
        elif not value:
            for handle in self._norm_handles:
                handle.remove()
            self._norm_handles = []
        self._armed = value

    def _make_hook(
        self,
    ) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        # A closure, not a bound method: copy.deepcopy of the model (the shadow)
        # copies the hook table, and must not copy this object along with it.
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.armed and module.training and module is self.model:
                self.args, self.kwargs = args, dict(kwargs)
                self.forwards.append((args, dict(kwargs), RngState.capture()))
                self.autocast = self.autocast or _autocast_dtype(module)

        return hook

    def _make_autocast_hook(
        self, children: list[nn.Module]
    ) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self.armed and module.training and any(module is c for c in children):
                self.autocast = self.autocast or _autocast_dtype(module)

        return hook

    def _make_norm_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(parameter: torch.Tensor) -> None:
            if parameter.grad is not None:
                self.squared_norms[name] = float(parameter.grad.detach().double().square().sum())

        return hook

    @property
    def captured(self) -> bool:
        return self.kwargs is not None

    def clip_factor(self, max_norm: float) -> float | None:
        """The factor a norm clip to ``max_norm`` applied to ``.grad`` since backward.

        1 when the gradient's norm is below ``max_norm`` (no clip), else the ratio of
        the norm now to the norm the hooks saw right after backward. None when clipped
        in a distributed job: the hooks saw this rank's gradient, not the ranks' mean
        (`compare_step` then measures the factor).
        """
        now = math.sqrt(
            sum(
                float(p.grad.detach().double().square().sum())
                for p in trainable_parameters(self.model).values()
                if p.grad is not None
            )
        )
        before = math.sqrt(sum(self.squared_norms.values()))
        if max_norm <= 0 or before <= 0 or now < max_norm * (1 - 1e-4):
            return 1.0
        if Ranks.current() is not None:
            return None
        return now / before

    def clear(self) -> None:
        self.args = self.kwargs = None
        self.autocast = None
        self.forwards = []
        self.squared_norms = {}

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        self.armed = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()


def _autocast_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype autocast runs ``module``'s device in right now, or None when it is off."""
    parameter = next(module.parameters(), None)
    device = "cpu" if parameter is None else parameter.device.type
    if not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def check_due(
    watch: GradWatch,
    due: DueCheck | int,
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    step_batches: Sequence[MicroBatch] | None = None,
    step_loss_fn: LossFn | None = None,
    clip_factor: float | None = 1.0,
    mode: CheckMode = "auto",
    **module_options: Any,
) -> CheckResult:
    """Run `check_module` with the plan's options and record it (report, logs, alert).

    ``due`` is the plan `GradWatch.due` returned (a bare step: the watch's configured
    options). ``module_options`` are `check_module`'s own (``optimizer``,
    ``regularization``, ``precision``, ``analytic``, ``notes``); the plan gives the
    core's options.

    With ``step_batches`` the check also compares the model's ``.grad`` (divided by
    ``clip_factor``) with the float64 gradient of J = sum_i w_i step_loss_fn(model, b_i)
    over those micro-batches (`gradwatch.integrations._step.compare_step`): the result's
    ``step_link``, whose failure fails the check.

    ``mode`` picks the whole-model float64 check or the module-local one ("auto": by
    size, `gradwatch.integrations._local.blocks.resolve_mode`); the result's ``seconds``
    are the whole check's (copies, step link and module search included).

    An exception inside the check is recorded as a check with status ``error`` and
    training goes on (``GradWatch(on_error="raise")`` raises it after recording).

    Raises:
        GradientCheckError: the check failed and the watch has ``on_alert="raise"``.
    """

    options = due.options if not isinstance(due, int) else watch.check_options()

    def compute() -> CheckResult:
        precision = module_options.get("precision", "float64")
        analytic = module_options.get("analytic", "recompute")
        penalties = bool(module_options.get("regularization"))
        if (
            resolve_mode(model, mode, precision=precision, analytic=analytic, penalties=penalties)
            == "local"
        ):
            result, link = run_local(
                watch,
                due,
                model,
                loss_fn,
                batch,
                step_batches=step_batches,
                step_loss_fn=step_loss_fn,
                clip_factor=clip_factor,
                notes=module_options.get("notes", ()),
            )
            return result if link is None else finish(result, step_link=link)
        result = check_module(model, loss_fn, batch, **module_options, **options)
        if step_batches and is_sharded(model):
            note = "step link: not run on an FSDP2 model (it would need the full float64 gradient)"
            return finish(result, notes=[note])
        if step_batches:
            link = compare_step(
                model, step_loss_fn or loss_fn, step_batches, clip_factor=clip_factor
            )
            return finish(result, step_link=link)
        return result

    return watch.run_check(
        due,
        timed(compute),
        source="gradwatch.integrations.torch.check_module (J on gradwatch's copy of the model)",
    )


def join_ranks(watch: GradWatch) -> None:
    """In a distributed job, tell ``watch`` its rank and how the ranks agree (`GradWatch.join`)."""
    ranks = Ranks.current()
    if ranks is not None:
        watch.join(ranks.rank, ranks.agree)


STATUS_CODES: dict[str, int] = {
    "ok": 0,
    "warn": 1,
    "fail": 2,
    "nondeterministic": 3,
    "error": 4,
}
"""``gradwatch/status`` as a number, for metric loggers that only take scalars."""


def result_metrics(result: CheckResult) -> dict[str, float]:
    """The scalars a trainer logs after a check (TensorBoard, W&B, CSV...).

    Besides the global ratio: the local ratio of each module the module-local search
    names (``gradwatch/module/<path>``), each failing tensor's own ratio where it was
    measured (``gradwatch/tensor/<name>``), and the step link's ratio and failing tensors
    (``gradwatch/step_ratio``, ``gradwatch/step_tensor/<name>``), so a dashboard shows
    where, not only that.
    """
    metrics = {
        "gradwatch/ratio": float(result.ratio),
        "gradwatch/status": float(STATUS_CODES[result.status]),
        "gradwatch/alert": float(result.failed),
        "gradwatch/checked": float(result.checked),
        "gradwatch/seconds": float(result.seconds),
    }
    if result.localization is not None:
        for suspect in result.localization.suspects:
            metrics[f"gradwatch/module/{suspect.module or 'loss_fn'}"] = float(suspect.ratio)
    for name, tensor in result.tensors.items():
        if tensor.status == "fail" and tensor.ratio is not None:
            metrics[f"gradwatch/tensor/{name}"] = float(tensor.ratio)
    link = result.step_link
    if link is not None:
        metrics["gradwatch/step_ratio"] = float(link.ratio)
        for name, ratio in link.tensors.items():
            if not ratio < link.threshold:
                metrics[f"gradwatch/step_tensor/{name}"] = float(ratio)
    return metrics


def check_step_notes(accumulation_steps: int) -> list[str]:
    """Notes every framework check carries about which batch J is on."""
    if accumulation_steps > 1:
        return [
            f"gradient accumulation over {accumulation_steps} micro-batches: the finite-"
            "difference check covers the step's last micro-batch, the step link all of them"
        ]
    return []


class TrainingWatch:
    """The base of the framework callbacks (Trainer and Lightning): their options and torch side.

    Holds the core `GradWatch` (``watch``: schedule, report, alerts) and what J is
    (``loss_fn``, ``regularization``, ``precision``); a framework callback subclasses
    it and only says when (`start`, `due`, `check`, `finish`) and on which batch.

    Its own options say what J is and where the report goes; every other keyword
    argument is a watch option (`gradwatch.options.WatchOptions`: ``sample``, ``eps``,
    ``threshold``, ``warn``, ``top_k``, ``seed``, ``on_alert``, ``on_error``,
    ``budget``), as for the core `gradwatch.GradWatch`.

    Attributes:
        watch: the core `gradwatch.GradWatch` (``watch.results``, ``watch.alerts``,
            ``watch.report_dir``).

    Raises:
        OptionError: an option is out of range (at construction).
        GradientCheckError: a failed check with ``on_alert="raise"``.
    """

    framework: ClassVar[str]
    """The framework's name, as in ``gradwatch.integrations.<framework>``."""

    def __init__(
        self,
        every: int = 500,
        *,
        loss_fn: LossFn | None = None,
        regularization: Penalties = (),
        precision: Precision = "float64",
        report_dir: str | os.PathLike[str] | None = None,
        mode: CheckMode = "auto",
        **options: Any,
    ) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise OptionError(
                f"loss_fn: expected None or a callable (model, batch) -> scalar tensor, "
                f"received {type(loss_fn).__name__}"
            )
        check_precision(precision)
        penalty_items(regularization)
        self.loss_fn = loss_fn
        self.regularization = regularization
        self.precision: Precision = precision
        self.mode: CheckMode = checked_mode(mode)
        self.report_dir = None if report_dir is None else Path(report_dir)
        self.options = WatchOptions(every, **options)  # validated now, not at train begin
        """The watch's options (``sample``, ``eps``, ... `gradwatch.options.WatchOptions`)."""
        self.watch = self._new_watch()
        self.notes: list[str] = []
        self._finished = False

    @property
    def results(self) -> list[CheckResult]:
        """The checks recorded in the current (or last) run."""
        return self.watch.results

    def __repr__(self) -> str:
        return f"{self.framework}.{self.watch!r}"

    def _new_watch(self) -> GradWatch:
        from gradwatch.callback import GradWatch

        return GradWatch(report_dir=None, **self.options.as_dict())

    def start(
        self,
        default_dir: str | os.PathLike[str],
        *,
        writer: bool,
        model: nn.Module,
        own_loss: str,
        settings: Mapping[str, Any],
        notes: Sequence[str],
        resumed_at: int = 0,
        resumed_by: str = "",
    ) -> None:
        """Open the report (``report_dir`` or ``default_dir``); a second fit starts a new watch.

        Args:
            default_dir: the report's directory unless ``report_dir`` was given.
            writer: False on processes other than the main one (nothing written).
            model: the trained module, named in the report's context.
            own_loss: what J is without a user ``loss_fn``, for the context.
            settings: the framework's settings that matter to a check, for the context.
            notes: notes every check of the run carries.
            resumed_at: the step a resumed run restarts from (0: a fresh run).
            resumed_by: what resumed it (``lightning ckpt_path``, ...).
        """
        if self._finished:
            self.watch = self._new_watch()
            self._finished = False
        directory = self.report_dir if self.report_dir is not None else Path(default_dir)
        self.watch.open(directory, write=writer)
        self.watch.set_context(
            precision=self.precision,
            framework=self.framework,
            integration=f"gradwatch.integrations.{self.framework}.GradWatch",
            model=type(model).__name__,
            loss="user loss_fn" if self.loss_fn else own_loss,
            **settings,
        )
        self.notes = list(notes)
        for note in self.notes:
            self.watch.note(note)
        if resumed_at > 0:
            self.watch.resume(resumed_at, resumed_by)

    def due(self, step: int) -> DueCheck | None:
        """The check due at ``step`` (`GradWatch.due`), every rank agreeing; None if none."""
        join_ranks(self.watch)
        return self.watch.due(step)

    def check(
        self,
        due: DueCheck,
        model: nn.Module,
        default_loss_fn: LossFn,
        batch: Any,
        *,
        optimizer: Any = None,
        step_batches: Sequence[MicroBatch] | None = None,
        step_loss_fn: LossFn | None = None,
        clip_factor: float | None = 1.0,
    ) -> CheckResult:
        """Check and record (raises `GradientCheckError` with ``on_alert="raise"``).

        ``step_batches``: the step's micro-batches for the step link, J on each being
        ``step_loss_fn`` (default: ``default_loss_fn``; see `check_due`).
        """
        return check_due(
            self.watch,
            due,
            model,
            self.loss_fn if self.loss_fn is not None else default_loss_fn,
            batch,
            optimizer=optimizer,
            regularization=self.regularization,
            precision=self.precision,
            notes=self.notes,
            step_batches=step_batches,
            step_loss_fn=step_loss_fn or default_loss_fn,
            clip_factor=clip_factor,
            mode=self.mode,
        )

    def finish(self) -> None:
        """Close the report."""
        if not self._finished:
            self.watch.close()
            self._finished = True
