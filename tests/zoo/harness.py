"""Run one zoo entry under one checker and say what happened.

Checkers: gradwatch at a given ``sample`` (``"default"`` = whatever ``GradWatch``
uses by default) and ``torch.autograd.gradcheck`` in float64 or float32. Numpy
entries reach gradcheck through `NumpyBackward`, an ``autograd.Function`` whose
backward returns the hand-written numpy gradient.
"""

from __future__ import annotations

import copy
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import gradwatch
from gradwatch.result import CheckResult
from tests.zoo.registry import NumpyProblem, Problem, TorchProblem, Training, ZooEntry

DEFAULT = "default"
GRADCHECK_SLOW_MAX_SIZE = 2000
"""Above this many parameters gradcheck runs with ``fast_mode=True`` (a random projection
of the Jacobian, torch's advice for large inputs): its default mode builds the whole
Jacobian element by element at ~3 ms per element here (25k params: about 3 minutes)."""


@dataclass
class Outcome:
    """What one checker said about one entry.

    ``alert``: the checker raised an alarm (gradwatch: a check with status "fail";
    gradcheck: it raised). ``tensor``: what it blames (gradwatch: the worst component's
    tensor, else the module its module-local search names; gradcheck: the input its
    Jacobian mismatch names), None if none.
    """

    alert: bool
    tensor: str | None
    evals: int
    seconds: float
    note: str = ""

    def localized(self, entry: ZooEntry) -> bool:
        return self.alert and blames(self.tensor, entry.buggy)


def default_sample() -> object:
    """The ``sample`` a ``GradWatch`` uses when none is given."""
    return gradwatch.GradWatch(report_dir=None).check_options()["sample"]


# --------------------------------------------------------------------------- gradwatch


def check_problem(problem: NumpyProblem | TorchProblem, sample: object) -> CheckResult:
    """One gradwatch check of ``problem`` with GradWatch's default options but ``sample``."""
    options = gradwatch.GradWatch(report_dir=None).check_options()
    if sample != DEFAULT:
        options["sample"] = sample
    if isinstance(problem, NumpyProblem):
        return gradwatch.check(
            problem.loss,
            problem.params,
            problem.grads,
            regularization=problem.regularization,
            **options,
        )
    from gradwatch.integrations.torch import check_module

    return check_module(
        problem.model,
        problem.loss_fn,
        problem.batch,
        regularization=dict(problem.regularization),
        **options,
    )


def run_gradwatch(entry: ZooEntry, sample: object, *, bug: bool | None = None) -> Outcome:
    """Check ``entry`` (its twin with ``bug=False``) with gradwatch at ``sample``."""
    problem = entry.build(entry.kind == "bug" if bug is None else bug)
    if isinstance(problem, Training):
        return _watch_training(problem, sample)
    started = time.perf_counter()
    result = check_problem(problem, sample)
    seconds = time.perf_counter() - started
    tensor = result.worst[0].tensor if result.worst else None
    if tensor is None and result.localization is not None and result.localization.suspects:
        tensor = result.localization.suspects[0].module  # no tensor measured: the module
    return Outcome(result.failed, tensor, result.loss_evals, seconds, result.mode)


def _watch_training(training: Training, sample: object) -> Outcome:
    """Attach a GradWatch(every=training.every) to the run; alert when any check fails."""
    options: dict[str, Any] = {} if sample == DEFAULT else {"sample": sample}
    watch = gradwatch.GradWatch(training.every, report_dir=None, **options)
    if training.framework == "numpy":

        def hook(step: int, problem: Problem) -> None:
            assert isinstance(problem, NumpyProblem)
            watch.after_backward(
                step,
                loss=problem.loss,
                params=problem.params,
                grads=problem.grads,
                regularization=problem.regularization,
            )

    else:
        from gradwatch.integrations.torch import after_backward

        def hook(step: int, problem: Problem) -> None:
            assert isinstance(problem, TorchProblem)
            after_backward(
                watch,
                step,
                problem.model,
                problem.loss_fn,
                problem.batch,
                regularization=dict(problem.regularization),
            )

    training.run(hook)
    watch.close()
    results = watch.results
    failing = [r for r in results if r.failed]
    first = failing[0] if failing else None
    tensor = first.worst[0].tensor if first is not None and first.worst else None
    steps = ", ".join(f"{r.step}:{r.status}" for r in results)
    return Outcome(
        bool(failing),
        tensor,
        sum(r.loss_evals for r in results),
        sum(r.seconds for r in results),
        f"checks at {steps}",
    )


# --------------------------------------------------------------------------- gradcheck


def run_gradcheck(entry: ZooEntry, dtype: str) -> Outcome:
    """``torch.autograd.gradcheck`` (default tolerances) on ``entry`` in ``dtype``.

    Training entries are gradchecked at the steps GradWatch would check.
    """
    import torch

    problem = entry.problem()
    torch_dtype = {"float64": torch.float64, "float32": torch.float32}[dtype]
    if not isinstance(problem, Training):
        return _gradcheck(problem, torch_dtype)
    outcomes: list[tuple[int, Outcome]] = []

    def hook(step: int, state: Problem) -> None:
        if step % problem.every == 0:
            assert not isinstance(state, Training)
            outcomes.append((step, _gradcheck(state, torch_dtype)))

    problem.run(hook)
    failing = [(step, o) for step, o in outcomes if o.alert]
    steps = ", ".join(f"{step}:{'raise' if o.alert else 'pass'}" for step, o in outcomes)
    return Outcome(
        bool(failing),
        failing[0][1].tensor if failing else None,
        sum(o.evals for _, o in outcomes),
        sum(o.seconds for _, o in outcomes),
        f"gradcheck at {steps}",
    )


def _gradcheck(problem: NumpyProblem | TorchProblem, dtype: Any) -> Outcome:
    import torch
    from torch.autograd.gradcheck import GradcheckError

    function, inputs, names = _as_torch_function(problem, dtype)
    calls = 0

    def counted(*tensors: Any) -> Any:
        nonlocal calls
        calls += 1
        return function(*tensors)

    fast = sum(t.numel() for t in inputs) > GRADCHECK_SLOW_MAX_SIZE
    started = time.perf_counter()
    alert, tensor, note = False, None, "passed" + (" (fast_mode)" if fast else "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gradcheck warns about non-double inputs
        try:
            torch.autograd.gradcheck(counted, inputs, fast_mode=fast)
        except GradcheckError as error:
            alert = True
            match = re.search(r"with respect to input (\d+)", str(error))
            if match:
                tensor = names[int(match.group(1))]
                note = f"Jacobian mismatch, input {match.group(1)}" + (
                    " (fast_mode)" if fast else ""
                )
            else:
                note = str(error).splitlines()[0][:60]
    return Outcome(alert, tensor, calls, time.perf_counter() - started, note)


def _as_torch_function(
    problem: NumpyProblem | TorchProblem, dtype: Any
) -> tuple[Callable[..., Any], tuple[Any, ...], list[str]]:
    """J as a function of one tensor per parameter, and those tensors (requires_grad)."""
    import torch

    if isinstance(problem, NumpyProblem):
        names = list(problem.params)
        inputs = tuple(
            torch.tensor(problem.params[n].copy(), dtype=dtype, requires_grad=True) for n in names
        )
        numpy_backward = _numpy_backward_function()

        def numpy_function(*tensors: Any) -> Any:
            return numpy_backward.apply(problem, names, *tensors)

        return numpy_function, inputs, names

    from torch.func import functional_call

    wrapper = _Objective(copy.deepcopy(problem.model).to(dtype), problem)
    trainable = [(n, p) for n, p in wrapper.model.named_parameters() if p.requires_grad]
    names = [n for n, _ in trainable]
    inputs = tuple(p.detach().clone().requires_grad_(True) for _, p in trainable)
    batch = _cast_batch(problem.batch, dtype)

    def torch_function(*tensors: Any) -> Any:
        parameters = {f"model.{n}": t for n, t in zip(names, tensors, strict=True)}
        return functional_call(wrapper, parameters, (batch,))

    return torch_function, inputs, names


def _numpy_backward_function() -> Any:
    import torch

    class NumpyBackward(torch.autograd.Function):
        """J from the numpy cost; its backward is the hand-written numpy gradient."""

        @staticmethod
        def forward(ctx: Any, problem: NumpyProblem, names: list[str], *tensors: Any) -> Any:
            params = {n: t.detach().numpy() for n, t in zip(names, tensors, strict=True)}
            ctx.problem, ctx.names = problem, names
            ctx.params = {n: array.copy() for n, array in params.items()}
            return torch.tensor(problem.objective(params), dtype=tensors[0].dtype)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, ...]:
            grads = ctx.problem.backward(ctx.params)
            return (
                None,
                None,
                *(grad * torch.from_numpy(np.asarray(grads[n])).to(grad.dtype) for n in ctx.names),
            )

    return NumpyBackward


def _cast_batch(batch: Any, dtype: Any) -> Any:
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, tuple | list):
        return type(batch)(_cast_batch(item, dtype) for item in batch)
    return batch


def _objective_module() -> Any:
    from torch import nn

    class Objective(nn.Module):
        """J = loss_fn(model, batch) + penalties, as a module for ``functional_call``."""

        def __init__(self, model: nn.Module, problem: TorchProblem) -> None:
            super().__init__()
            self.model = model
            self.loss_fn = problem.loss_fn
            self.penalties = list(problem.regularization.values())

        def forward(self, batch: Any) -> Any:
            total = self.loss_fn(self.model, batch)
            for penalty in self.penalties:
                total = total + penalty(self.model)
            return total

    return Objective


def _Objective(model: Any, problem: TorchProblem) -> Any:
    return _objective_module()(model, problem)


def blames(pointer: str | None, buggy: tuple[str, ...]) -> bool:
    """True when ``pointer`` is a buggy tensor or the module that owns one."""
    return pointer is not None and any(
        pointer in (tensor, tensor.rpartition(".")[0]) for tensor in buggy
    )
