"""Where the bug is: the search of the module tree with module-local checks.

The search (`search`) starts at the module calls J made at the top and descends only
into calls that fail, checking each of their children: a failing call whose children
all pass is the suspect, a leaf (its own backward, often a custom ``autograd.Function``)
or a parent whose own forward's glue code is wrong. Its cost is the failing path's calls
and their siblings, a few module evaluations each: far less than whole-model
evaluations of J per component. `localize_failure` runs it on the shadow of a failed
check; `check_modules` and `check_local` are the on-demand checks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

import torch
from gradwatch.integrations._local.adjoint import LOCAL_THRESHOLD, LocalChecker, custom_functions
from gradwatch.integrations._local.capture import (
    ModuleCall,
    capture_calls,
    fresh_arguments,
    tensor_leaves,
)
from gradwatch.integrations._shadow.loss import (
    LossFn,
    Penalties,
    Penalty,
    ShadowLoss,
    penalty_items,
)
from gradwatch.integrations._shadow.mode import ShadowMode
from gradwatch.integrations._shadow.model import RngState, Shadow, untouched_globals
from torch import nn

from gradwatch.engine.finish import finish
from gradwatch.errors import OptionError
from gradwatch.result import CheckResult, Localization, ModuleSuspect, ModuleVerdict, SuspectKind

__all__ = ["MAX_CHECKS", "check_local", "check_modules", "localize_failure", "search"]

MAX_CHECKS = 400
"""Module calls one search checks at most (a bound on its cost); the rest are noted."""

Scope = Literal["search", "all"]


class FailedRun(Protocol):
    """What `localize_failure` needs of ``check_module``'s run: its shadow and its J."""

    @property
    def shadow(self) -> Shadow: ...
    @property
    def loss_fn(self) -> LossFn: ...
    @property
    def batch(self) -> Any: ...
    @property
    def penalties(self) -> list[tuple[str, Penalty]]: ...
    @property
    def rng(self) -> RngState: ...
    @property
    def ranks(self) -> object | None: ...


def localize_failure(result: CheckResult, run: FailedRun) -> CheckResult:
    """``result`` with its `Localization` when backprop failed, else ``result`` as it is.

    Runs on the check's own float64 shadow (unperturbed after the check) with J's random
    draws replayed; never raises: a search that cannot run is a note.
    """
    if result.status != "fail" or result.non_finite is not None:
        return result
    if result.step_link is not None and result.step_link.status == "fail":
        return result  # the step link's own alert; backprop may be right
    if run.ranks is not None or run.shadow.dtype != torch.float64:
        why = "a distributed check" if run.ranks is not None else "not a float64 check"
        return finish(result, notes=[f"module-local search not run: {why}"])
    try:
        objective = ShadowLoss(run.shadow, run.loss_fn, run.batch, run.penalties, run.rng)
        found = _localize(run.shadow, objective, "search", 0, LOCAL_THRESHOLD, failing=True)
    except Exception as error:
        note = f"module-local search could not run: {type(error).__name__}: {error}"
        return finish(result, notes=[note[:300]])
    return finish(result, localization=found)


def check_modules(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    regularization: Penalties = (),
    scope: Scope = "search",
    threshold: float = LOCAL_THRESHOLD,
    seed: int = 0,
) -> Localization:
    """The module-local checks of ``model`` at ``batch``'s activations, on a float64 copy.

    Args:
        model: never modified (parameters, ``.grad``, buffers, modes, RNGs restored).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, as for ``check_module``.
        scope: ``"search"`` descends into failing calls only (what a failing check
            runs); ``"all"`` checks every module call.
        threshold: a side fails at or above this local ratio in both trials.
        seed: seed of the random directions.

    Returns:
        The `Localization`: the suspects (empty when every call passes) and the verdict
        of every module call checked.
    """
    if scope not in ("search", "all"):
        raise OptionError(f"scope: expected 'search' or 'all', received {scope!r}")
    if not isinstance(model, nn.Module):
        raise OptionError(f"model: expected a torch.nn.Module, received {type(model).__name__}")
    penalties = penalty_items(regularization)
    with untouched_globals(model) as rng:
        shadow = Shadow(model, "float64")
        objective = ShadowLoss(shadow, loss_fn, batch, penalties, rng)
        return _localize(shadow, objective, scope, seed, threshold)


def check_local(
    module: nn.Module,
    *args: Any,
    cotangent: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    threshold: float = LOCAL_THRESHOLD,
    seed: int = 0,
    **kwargs: Any,
) -> ModuleVerdict:
    """The local check of one module called on ``args``/``kwargs``, in float64.

    ``cotangent`` is the gradient arriving at the outputs (one tensor per output tensor;
    None: a random one). Floating inputs take part in the input side when they
    require grad (or all of them, when none does).

    Example:
        >>> import torch
        >>> from gradwatch.integrations.torch import check_local
        >>> check_local(torch.nn.Linear(3, 2), torch.randn(4, 3)).status
        'ok'
    """
    if not isinstance(module, nn.Module):
        raise OptionError(f"module: expected a torch.nn.Module, received {type(module).__name__}")
    with untouched_globals(module):
        shadow = Shadow(module, "float64")
        args, kwargs = _float64((args, kwargs))
        mode = ShadowMode(torch.float64, shadow.held_padding_rows())
        generator = torch.Generator().manual_seed(seed)

        def backward() -> None:
            with torch.enable_grad():
                with mode:
                    output = shadow.module(*args, **kwargs)
                leaves = [
                    t for t in tensor_leaves(output) if t.is_floating_point() and t.requires_grad
                ]
                given = _cotangents(cotangent, leaves, generator)
                torch.autograd.backward(leaves, given)

        with torch.inference_mode(False):
            tops = capture_calls(shadow.module, backward)
            return LocalChecker(mode, threshold, seed).verdict(tops[0])


def _float64(value: Any) -> Any:
    """Floating tensors as float64 leaves requiring grad (all of them when none did)."""
    wanted = any(t.requires_grad for t in tensor_leaves(value) if t.is_floating_point())

    def convert(position: int, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            return tensor.clone()
        copied = tensor.detach().to(torch.float64)
        return copied.requires_grad_(tensor.requires_grad or not wanted)

    return fresh_arguments(value, convert)


def _cotangents(
    given: torch.Tensor | Sequence[torch.Tensor | None] | None,
    leaves: list[torch.Tensor],
    generator: torch.Generator,
) -> list[torch.Tensor]:
    if given is None:
        return [
            torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device)
            for t in leaves
        ]
    items = [given] if isinstance(given, torch.Tensor) else list(given)
    if len(items) != len(leaves):
        raise OptionError(
            f"cotangent: expected {len(leaves)} tensors (one per output tensor that "
            f"requires grad), received {len(items)}"
        )
    return [
        torch.zeros_like(t) if g is None else g.detach().to(t.dtype)
        for g, t in zip(items, leaves, strict=True)
    ]


def _localize(
    shadow: Shadow,
    objective: ShadowLoss,
    scope: Scope,
    seed: int,
    threshold: float,
    failing: bool = False,
) -> Localization:
    """Capture J's module calls on ``shadow``, then search (or check all of) them."""
    started = time.perf_counter()
    mode = ShadowMode(shadow.dtype, shadow.held_padding_rows())

    def backward() -> None:
        shadow.sync()
        with torch.enable_grad():
            with mode:  # forwards only: an autograd error must be raised, not answered
                total = objective.total()
            if total.requires_grad:
                total.backward()  # type: ignore[no-untyped-call]

    checker = LocalChecker(mode, threshold, seed)
    tops, suspects, verdicts, notes = captured_and_searched(
        shadow.module,
        backward,
        mode,
        checker,
        MAX_CHECKS,
        every=scope == "all",
        failing=failing,
    )
    top_paths = {top.path for top in tops}
    top_verdicts = [v for v in verdicts if v.module in top_paths]
    if (
        not suspects
        and scope == "search"
        and top_verdicts
        and all(v.status == "ok" for v in top_verdicts)
    ):
        suspects = [
            ModuleSuspect(module="", class_name="loss_fn", kind="outside", ratio=0.0, side="input")
        ]
    return Localization(
        suspects=suspects,
        modules=verdicts,
        evaluations=checker.evaluations[0],
        checks=checker.checked,
        seconds=time.perf_counter() - started,
        threshold=threshold,
        notes=notes,
    )


def captured_and_searched(
    module: nn.Module,
    backward: Callable[[], None],
    mode: AbstractContextManager[Any],
    checker: LocalChecker,
    max_checks: int,
    *,
    every: bool = False,
    failing: bool = False,
) -> tuple[list[ModuleCall], list[ModuleSuspect], list[ModuleVerdict], list[str]]:
    """The module calls of ``backward``'s pass over ``module`` (its parameters' ``.grad``
    dropped after), searched with ``checker`` (`search`): the top calls, the suspects
    described, every verdict, and the notes."""
    with torch.inference_mode(False):
        try:
            tops = capture_calls(module, backward)
        finally:
            for p in module.parameters():
                p.grad = None
        found, verdicts, notes = search(tops, checker, max_checks, every=every, failing=failing)
        suspects = [suspect_of(call, verdict, mode) for call, verdict in found]
    return tops, suspects, verdicts, notes


def search(
    tops: list[ModuleCall],
    checker: LocalChecker,
    max_checks: int = MAX_CHECKS,
    *,
    every: bool = False,
    failing: bool = False,
) -> tuple[list[tuple[ModuleCall, ModuleVerdict]], list[ModuleVerdict], list[str]]:
    """Descend from ``tops`` into failing calls only (``every``: into all calls); the
    suspects are failing calls whose children all pass. Returns the suspects, every
    verdict in the order checked, and notes.

    ``failing``: J's gradient is known to be wrong (the whole-model check failed), so a
    single top call (the model) is not checked first, only when none of its children
    fails: its own check costs as much as J's. Below a call known or presumed to fail,
    the child holding most of its calls (a language model's backbone beside its head)
    is presumed to fail too, checked last and only when none of its own children fails:
    a presumption changes what is checked, never a verdict (a suspect is always a call
    that failed its own check while its children passed)."""
    verdicts: list[ModuleVerdict] = []
    suspects: list[tuple[ModuleCall, ModuleVerdict]] = []
    notes: list[str] = []

    def check(call: ModuleCall) -> ModuleVerdict | None:
        if checker.checked >= max_checks:
            if not notes:
                notes.append(f"module search stopped after {max_checks} module calls")
            return None
        verdict = checker.verdict(call)
        verdicts.append(verdict)
        return verdict

    def visit(call: ModuleCall, known: bool = False) -> bool:
        verdict = None if known else check(call)
        if verdict is None and not known:
            return False
        if verdict is not None and verdict.status in ("ok", "unreached") and not every:
            return False  # an unchecked call's children may still be checked on their own
        dominant = _dominant_child(call) if known else None
        children: list[bool] = []
        for child in sorted(call.children, key=lambda c: c is dominant):  # dominant last
            children.append(visit(child, known=child is dominant and not any(children)))
        if any(children):
            return True  # the bug is below (a known call's own check is never needed)
        if known:
            verdict = check(call)  # no child fails: the call's own code, or outside it
        if verdict is None or verdict.status != "fail":
            return False
        suspects.append((call, verdict))
        return True

    for top in tops:
        visit(top, known=failing and len(tops) == 1)
    return suspects, verdicts, notes


def _dominant_child(call: ModuleCall) -> ModuleCall | None:
    """The child holding more than half of ``call``'s descendant calls, if one does."""

    def size(c: ModuleCall) -> int:
        return 1 + sum(size(child) for child in c.children)

    sizes = [(size(child), index) for index, child in enumerate(call.children)]
    if not sizes:
        return None
    largest, index = max(sizes)
    return call.children[index] if 2 * largest > sum(n for n, _ in sizes) else None


def suspect_of(
    call: ModuleCall, verdict: ModuleVerdict, mode: AbstractContextManager[Any]
) -> ModuleSuspect:
    functions = custom_functions(call, mode) if not call.children else []
    kind: SuspectKind = "leaf" if not call.children else "glue"
    if functions:
        kind = "custom autograd.Function"
    input_failed, parameter_failed = verdict.input_failed, verdict.parameter_failed
    side: Literal["input", "parameter", "both"] = (
        "both" if input_failed and parameter_failed else "input" if input_failed else "parameter"
    )
    failing = [
        ratio
        for ratio, failed in (
            (verdict.input_ratio, input_failed),
            (verdict.parameter_ratio, parameter_failed),
        )
        if failed and ratio is not None
    ]
    return ModuleSuspect(
        module=call.path,
        class_name=verdict.class_name,
        kind=kind,
        functions=functions,
        ratio=max(failing) if failing else 0.0,
        side=side,
        input_ratio=verdict.input_ratio,
        parameter_ratio=verdict.parameter_ratio,
        call=call.number,
        calls=call.calls,
    )
