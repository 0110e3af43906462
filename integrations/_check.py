"""``check_module``: one gradient check of J on a shadow of the model, and its reruns."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from gradwatch.integrations._local.search import localize_failure
from gradwatch.integrations._parallel.ranks import PeerCheckError, Ranks, unwrap_data_parallel
from gradwatch.integrations._parallel.sharded import check_sharded, is_sharded
from gradwatch.integrations._shadow.batched import VmappedLoss
from gradwatch.integrations._shadow.loss import (
    LossFn,
    Penalties,
    Penalty,
    ShadowGradients,
    ShadowLoss,
    largest_entry,
    penalty_items,
    untouched_model,
)
from gradwatch.integrations._shadow.mode import ShadowMode, without_checkpointing
from gradwatch.integrations._shadow.model import (
    GENERATORS,
    NATIVE_DTYPES,
    Precision,
    RngState,
    Shadow,
    check_precision,
    dtype_name,
    floating_dtype,
    module_gradients,
    trainable_parameters,
    untouched_globals,
)
from torch import nn

import gradwatch
from gradwatch.engine.finish import finish
from gradwatch.errors import (
    GradwatchError,
    LossError,
    OptionError,
    ParameterError,
    ProcessGroupError,
)
from gradwatch.result import CheckResult

__all__ = ["Analytic", "check_module", "weight_decay_notes"]

Analytic = Literal["recompute", "live"]


def weight_decay_notes(optimizer: Any) -> list[str]:
    """What the optimizer's weight decay means for the check, one note per kind found.

    Coupled decay (``SGD``/``Adam``/... ``weight_decay``) adds λθ inside
    ``optimizer.step()``: it is not in ``.grad`` and not in J. Decoupled decay
    (``AdamW``) shrinks θ in the update and is not part of any gradient. Wrappers
    (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``) are
    looked through.
    """
    inner = optimizer
    for _ in range(4):
        wrapped = getattr(inner, "optimizer", None)
        if wrapped is None or wrapped is inner:
            break
        inner = wrapped
    groups = getattr(inner, "param_groups", None)
    if not groups:
        return []
    decays = sorted({float(g.get("weight_decay", 0.0) or 0.0) for g in groups} - {0.0})
    kind = type(inner).__name__
    if not decays:
        return [f"optimizer {kind}: no weight decay"]
    values = ", ".join(f"{d:g}" for d in decays)
    if isinstance(inner, torch.optim.AdamW) or any(g.get("decoupled_weight_decay") for g in groups):
        return [
            f"optimizer {kind}: decoupled weight decay ({values}) is applied in the update, "
            "not part of the gradient; it is not in J"
        ]
    return [
        f"optimizer {kind}: coupled weight decay ({values}) is added to the gradient inside "
        "optimizer.step(), not in .grad; it is not in J (pass a regularization penalty to "
        "check it)"
    ]


def check_module(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    regularization: Penalties = (),
    optimizer: Any = None,
    precision: Precision = "float64",
    analytic: Analytic = "recompute",
    batched: bool = True,
    notes: Sequence[str] = (),
    **check_options: Any,
) -> CheckResult:
    """Check the gradient of ``loss_fn(model, batch)`` + penalties for ``model``'s parameters.

    Args:
        model: the module; never modified (parameters, ``.grad``, buffers, modes).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the data part of J.
        batch: whatever ``loss_fn`` takes (floating tensors cast to the shadow's dtype).
        regularization: penalties ``(model) -> scalar tensor`` (a sequence, or a
            mapping name -> penalty), part of J on both sides: in the autograd pass
            and in every numeric evaluation. Recorded in the result by name and value.
        optimizer: when given, the notes say whether its weight decay is coupled or
            decoupled (neither is in J).
        precision: ``"float64"`` (default) runs on a float64 copy; ``"native"`` keeps
            the model's dtype (float32/float16): the core picks the step from the
            dtype and multiplies ``warn`` and ``threshold`` by
            ``gradwatch.check.TOLERANCE_SCALE[dtype]``, and the notes say so.
        analytic: ``"recompute"`` (default) compares the numeric gradient with autograd
            on the shadow; ``"live"`` compares it with the model's own ``.grad`` as it
            is now (finds missing ``zero_grad``, wrong accumulation scaling; a
            parameter whose ``.grad`` is None is compared as zeros and noted).
        batched: evaluate the perturbations of each tensor in chunks with
            ``torch.func.vmap`` (the same numbers, several times faster on small
            models). Where J cannot be vmapped (dropout or BatchNorm in train mode,
            randomness in J, vmap raising) the check runs one by one and the notes
            say why. False always runs one by one.
        notes: extra lines for the result's notes (e.g. from a framework callback).
        **check_options: passed to `gradwatch.check` (``eps``, ``sample``, ``seed``,
            ``top_k``, ``warn``, ``threshold``, ``diagnose``, ``per_tensor``: False when
            the module search follows a float64 check, unless given).

    Returns:
        The `CheckResult`; its ``regularization`` holds the penalties' values and its
        ``notes`` the precision, missing gradients, weight decay and ``notes``.

    Example:
        >>> import torch
        >>> from gradwatch.integrations.torch import check_module
        >>> net, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
        >>> result = check_module(net, lambda m, x: m(x).square().mean(), x)
        >>> result.status, result.size
        ('ok', 8)
    """
    penalties = _validated_penalties(model, loss_fn, precision, analytic, batched, regularization)
    model = unwrap_data_parallel(model)
    if is_sharded(model):
        if analytic != "recompute":
            raise OptionError(
                "analytic: expected 'recompute' for an FSDP2 model (its .grad is a shard of "
                f"the training's gradient), received {analytic!r}"
            )
        result = check_sharded(model, loss_fn, batch, penalties, dict(check_options))
        extra = [*notes, *(weight_decay_notes(optimizer) if optimizer is not None else [])]
        return finish(result, notes=extra)
    ranks = Ranks.current()
    with _across(ranks), untouched_globals(model) as rng:
        run = _ShadowCheck(
            model, loss_fn, batch, penalties, rng, analytic, batched, dict(check_options), ranks
        )
        result = run.in_trusted_precision(precision)
        result = localize_failure(result, run)  # where the bug is, when backprop failed
    if optimizer is not None:
        run.notes.extend(weight_decay_notes(optimizer))
    penalty_values = run.penalty_values
    if penalties:
        run.notes.append("penalties in J (both sides): " + ", ".join(penalty_values))
    else:
        run.notes.append("penalties in J: none")
    return finish(result, notes=[*notes, *run.notes], regularization=penalty_values)


def _across(ranks: Ranks | None) -> contextlib.AbstractContextManager[None]:
    """`Ranks.together` in a distributed job, else nothing."""
    return contextlib.nullcontext() if ranks is None else ranks.together()


def _validated_penalties(
    model: object,
    loss_fn: object,
    precision: object,
    analytic: object,
    batched: object,
    regularization: Penalties,
) -> list[tuple[str, Penalty]]:
    """The penalties by name, once every argument of `check_module` is what it expects."""
    if not isinstance(model, nn.Module):
        raise OptionError(f"model: expected a torch.nn.Module, received {type(model).__name__}")
    if not callable(loss_fn):
        raise OptionError(
            f"loss_fn: expected a callable (model, batch) -> scalar tensor, "
            f"received {type(loss_fn).__name__}"
        )
    check_precision(precision)
    if analytic not in ("recompute", "live"):
        raise OptionError(f"analytic: expected 'recompute' or 'live', received {analytic!r}")
    if not isinstance(batched, bool):
        raise OptionError(f"batched: expected True or False, received {batched!r}")
    penalties = penalty_items(regularization)
    if not trainable_parameters(model):
        raise ParameterError(
            f"model: expected at least one parameter with requires_grad=True, "
            f"received {type(model).__name__} with none"
        )
    return penalties


class _ShadowCheck:
    """One check of J on a shadow of ``model`` in a given precision, and what it found.

    After a float64 check, `coarse_reason` says whether J really came out in float64:
    where an op the `ShadowMode` could not answer turned float64 into float32, or J's
    value is exact in float32, the float64 check judged the gradient on a J rounded
    to float32, and ``check_module`` checks again in the model's own precision.

    In a distributed job (``ranks``) J and its gradient are the means over the ranks,
    each decision that rests on this rank's own numbers is rank 0's, and the
    perturbations run one by one (vmap would batch a collective in the forward).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        penalties: list[tuple[str, Penalty]],
        rng: RngState,
        analytic: Analytic,
        batched: bool,
        options: dict[str, Any],
        ranks: Ranks | None = None,
    ) -> None:
        self.model, self.loss_fn, self.batch, self.penalties = model, loss_fn, batch, penalties
        self.rng, self.analytic, self.options = rng, analytic, options
        self.batched = batched and ranks is None
        self.ranks = ranks
        self.notes: list[str] = []
        self.penalty_values: dict[str, float] = {}

    def can_fall_back(self, precision: Precision) -> bool:
        """True when a float64 check of a float32/float16 model could run natively instead."""
        native = floating_dtype(self.model)
        return precision == "float64" and native != torch.float64 and native in NATIVE_DTYPES

    def in_trusted_precision(self, precision: Precision) -> CheckResult:
        """Check in ``precision``; where a float64 check cannot be trusted, in the model's own.

        A float64 check of a float32/float16 model is run again natively when J came out
        coarser than float64 (`coarse_reason`) or raised on the float64 copy (a kernel
        without float64); the first note says why.
        """
        failure: Exception | None = None
        try:
            result = self.check(precision)
            fallback = self.coarse_reason() if precision == "float64" else None
        except ProcessGroupError:
            raise  # the group is broken: no further collective, not even to agree
        except Exception as error:
            failure = error
            if isinstance(error, GradwatchError | PeerCheckError) or not self.can_fall_back(
                precision
            ):
                # Misuse (no loss, a bad shape) is the same in any precision; a peer's
                # failure is the peer's to judge (its rank 0 verdict is agreed below).
                fallback = None
            else:
                fallback = (
                    f"J on the float64 copy raised {type(error).__name__}: {_first_line(error)}"
                )
        if self.ranks is not None:
            fallback = self.ranks.agree(fallback)  # the failed rank's peers hold no reason
        if failure is not None and fallback is None:
            raise failure
        if fallback is None:
            return result
        self.rng.restore()
        try:
            result = self.check("native")
        except Exception as error:
            error.add_note(f"gradwatch checked on a float64 copy first: {fallback}")
            raise
        self.notes.insert(
            0,
            f"{fallback}; checked in the model's own {dtype_name(self.shadow.dtype)} "
            "instead, with that dtype's step and thresholds",
        )
        return result

    def check(self, precision: Precision) -> CheckResult:
        """One check on a new shadow in ``precision``; `notes` says what it found."""
        self.shadow = shadow = Shadow(self.model, precision)
        without_checkpointing(shadow.module)
        self.mode = ShadowMode(shadow.dtype, shadow.held_padding_rows(), shadow.native_dtype)
        objective = ShadowLoss(
            shadow, self.loss_fn, self.batch, self.penalties, self.rng, self.ranks
        )
        notes: list[str] = []
        if self.ranks is not None:
            notes.append(
                f"distributed: J is the mean of {self.ranks.size} ranks' losses (each on its "
                "own batch) and its gradient the mean of theirs; every rank checked the same "
                "components and reached this verdict"
            )
        grads: ShadowGradients | dict[str, npt.NDArray[np.floating]]
        if self.analytic == "recompute":
            grads = ShadowGradients(objective)
            largest: Mapping[str, int] = grads.largest
        else:
            grads, grad_notes = module_gradients(self.model, shadow.arrays_dtype())
            largest = {name: largest_entry(g) for name, g in grads.items()}
            notes.append(
                "live: analytic gradient is the model's .grad (after accumulation and any "
                "clipping done before this point), numeric gradient is of J on this batch"
            )
            notes.extend(grad_notes)
        notes.extend(_precision_notes(shadow))
        loss = VmappedLoss(objective, largest) if self.batched else objective
        with untouched_model(self.model), self.mode, torch.inference_mode():
            result, grads = self._check_until_trusted(objective, loss, grads, notes)
            if isinstance(grads, ShadowGradients):
                _refuse_a_flat_objective(grads, result)
            self.penalty_values = objective.penalty_values()
        notes.extend(_mode_notes(self.mode, shadow))
        if isinstance(grads, ShadowGradients):
            notes.extend(grads.notes)
            kept = (
                "the whole gradient held until each pass ends"
                if grads.hold
                else "each tensor's gradient read as it arrives and dropped (never held whole)"
            )
            notes.append(
                f"analytic gradient: autograd on the shadow, {grads.visits} backward pass(es), "
                f"{kept}"
            )
        self.notes = notes
        self.loss = result.loss
        return result

    def _check_until_trusted(
        self,
        objective: ShadowLoss,
        loss: ShadowLoss | VmappedLoss,
        grads: ShadowGradients | dict[str, npt.NDArray[np.floating]],
        notes: list[str],
    ) -> tuple[CheckResult, ShadowGradients | dict[str, npt.NDArray[np.floating]]]:
        """Run ``gradwatch.check`` again while the last run cannot be trusted, and say why.

        Two findings make a run untrustworthy; each changes how J or its gradient is
        computed, so each reruns the check at most once:

        - a gradient arrived in parts (a parameter used in two reentrant checkpoint
          segments is accumulated once per segment): streamed, the check saw only the
          first part, so it runs again holding every gradient until the backward ends;
        - J drew from a generator at some evaluations only (`ShadowLoss.stray_draws`):
          the replay missed it, so it runs again replaying every generator at every
          evaluation, one by one (vmap cannot replay draws).
        """
        while True:
            result = gradwatch.check(loss, self.shadow.arrays, grads, **self._options())
            parts = grads.arrived_in_parts if isinstance(grads, ShadowGradients) else None
            if parts is not None and isinstance(grads, ShadowGradients):
                grads = ShadowGradients(objective, hold=True, largest=grads.largest)
                notes.append(
                    f"the gradient of {parts} arrived in parts (reentrant checkpointing?): "
                    "checked again holding the whole gradient until each backward pass ends"
                )
                continue
            stray = objective.stray_draws()
            if self.ranks is not None:
                stray = self.ranks.agree(stray)
            if stray:
                objective.replay = frozenset(GENERATORS)
                loss = objective
                notes.append(
                    f"J drew from the {', '.join(sorted(stray))} RNG at some evaluations "
                    "only; checked again replaying every generator at every evaluation"
                )
                continue
            if isinstance(loss, VmappedLoss):
                notes.extend(loss.notes())
            return result, grads

    def _options(self) -> dict[str, Any]:
        """The core's options; a fired screen confirmed is the verdict when the module
        search will localize it (`localize_failure`: float64, one process, recomputed dθ),
        rather than two evaluations of J per tensor (BENCHMARKS.md, issue 24's cost)."""
        searched = (
            self.analytic == "recompute"
            and self.ranks is None
            and self.shadow.dtype == torch.float64
        )
        return {"per_tensor": not searched, **self.options}

    def coarse_reason(self) -> str | None:
        """Why J of the last check was coarser than its shadow, or None."""
        native = floating_dtype(self.model)
        if not self.can_fall_back("float64") or self.shadow.dtype != torch.float64:
            return None
        if self.mode.coarse_ops:
            return (
                "J came out coarser than float64 (float32 made by "
                + ", ".join(self.mode.coarse_ops)
                + ": a cast gradwatch cannot answer, or a kernel without float64), so a "
                "float64 check would read its rounding as a bug"
            )
        if _rounded_to(self.loss, native):
            name = dtype_name(native)
            return (
                f"J came out rounded to {name} (its value is exact in {name}: computed "
                "outside torch, or by a kernel gradwatch cannot see into), so a float64 check "
                "would read its rounding as a bug"
            )
        return None


def _refuse_a_flat_objective(grads: ShadowGradients, result: CheckResult) -> None:
    """Zeros against zeros check nothing: J that does not move as the parameters move,
    with a gradient exactly zero, is an error, never ``ok``."""
    flat = not grads.nonzero and not any(c.numeric for c in result.worst)
    if grads.first_visit_complete and flat:
        raise LossError(
            "loss_fn(model, batch): expected a J that moves with the parameters of the model "
            "it is given, received one that does not move and whose gradient is exactly zero "
            "(a loss_fn using another model than its argument?): nothing was checked"
        )


def _rounded_to(value: float, dtype: torch.dtype) -> bool:
    """True when a float64 J is exactly a ``dtype`` number: by chance about once in 2^29
    for float32, so J was rounded to ``dtype`` on its way out."""
    if value == 0.0 or not math.isfinite(value):
        return False
    return float(torch.tensor(value, dtype=torch.float64).to(dtype).double()) == value


def _mode_notes(mode: ShadowMode, shadow: Shadow) -> list[str]:
    notes = []
    if shadow.held_ranges:
        notes.append(
            "padding_idx rows held constant inside the embedding lookup only (torch gives the "
            "lookup no gradient there; a tied head still trains them): "
            + ", ".join(
                f"{name}[{start // (stop - start)}]"
                for name, (start, stop) in shadow.held_ranges.items()
            )
        )
    if mode.replaced_ops:
        notes.append(
            f"no {dtype_name(shadow.dtype)} kernel for {', '.join(mode.replaced_ops)}: "
            f"ran as gradwatch's reference implementation in {dtype_name(shadow.dtype)}"
        )
    if mode.fallback_ops:
        notes.append(
            f"no {dtype_name(shadow.dtype)} kernel for {', '.join(mode.fallback_ops)}: "
            "ran in float32"
        )
    if mode.coarse_ops:
        notes.append(
            f"J is partly coarser than {dtype_name(shadow.dtype)} (made by "
            f"{', '.join(mode.coarse_ops)}): its roundoff limits the resolution of the check"
        )
    return notes


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def _precision_notes(shadow: Shadow) -> list[str]:
    """Say which precision J was evaluated in (the core scales warn/threshold by dtype)."""
    if shadow.dtype == torch.float64:
        if shadow.native_dtype != torch.float64:
            return [f"float64 shadow of a {dtype_name(shadow.native_dtype)} model"]
        return []
    return [f"native precision {dtype_name(shadow.dtype)}: step and thresholds from the dtype"]
