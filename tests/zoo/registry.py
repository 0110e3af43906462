"""What a zoo entry is: a named model with (or without) one planted gradient bug.

Each entry's ``build(bug)`` returns a fresh problem: the planted version with
``bug=True``, its correct twin with ``bug=False`` (a correct-only entry ignores the
flag). Three problem shapes cover the zoo:

* `NumpyProblem`: hand-written numpy backprop, checked with ``gradwatch.check``.
* `TorchProblem`: a module, a ``loss_fn(model, batch)`` and penalties, checked with
  ``gradwatch.integrations.torch.check_module``.
* `Training`: a short training run whose bug only shows once the weights have moved;
  checked by a ``GradWatch`` attached to the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from gradwatch.regularization import RegularizationTerm

Array = npt.NDArray[np.floating]
Params = dict[str, Array]
Kind = Literal["bug", "correct"]
Framework = Literal["numpy", "torch"]


@dataclass
class NumpyProblem:
    """J = cost(params) + regularization, with the hand-written gradient ``backward(params)``.

    ``params`` are the live arrays the check perturbs; ``grads`` is ``backward(params)``
    at their current values.
    """

    cost: Callable[[Params], float]
    backward: Callable[[Params], Params]
    params: Params
    regularization: tuple[RegularizationTerm, ...] = ()
    grads: Params = field(init=False)

    def __post_init__(self) -> None:
        self.grads = self.backward(self.params)

    def loss(self) -> float:
        """The data loss at the current (possibly perturbed) ``params``: the check's closure."""
        return self.cost(self.params)

    def objective(self, params: Params) -> float:
        """The whole J (data loss plus every penalty term) at ``params``."""
        return self.cost(params) + sum(term.value(params) for term in self.regularization)


@dataclass
class TorchProblem:
    """J = loss_fn(model, batch) + sum of penalties(model), the gradient from autograd."""

    model: Any
    loss_fn: Callable[[Any, Any], Any]
    batch: Any
    regularization: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)


Hook = Callable[[int, "NumpyProblem | TorchProblem"], None]


@dataclass
class Training:
    """A short training run: ``run(hook)`` calls ``hook(step, problem)`` after each backward.

    ``every`` is the check period the zoo uses for it (``GradWatch(every=...)``).
    """

    framework: Framework
    run: Callable[[Hook], None]
    every: int
    steps: int


Problem = NumpyProblem | TorchProblem | Training


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo.

    Attributes:
        name: short unique id, used as the pytest id and the table row.
        kind: "bug" (a planted bug the checks must catch) or "correct" (must stay quiet).
        framework: "numpy" (hand-written backprop) or "torch" (autograd, custom Functions).
        description: what is planted, or what makes the correct model tricky.
        buggy: for bugs, the tensors whose gradient the bug makes wrong; the first is
            the one the bug is written in. Localization succeeds when the worst component
            of a check lies in one of them.
        build: ``build(bug) -> Problem``; ``bug=False`` gives the correct twin.
        note: a caveat printed in the table notes.
    """

    name: str
    kind: Kind
    framework: Framework
    description: str
    build: Callable[[bool], Problem]
    buggy: tuple[str, ...] = ()
    note: str = ""

    def problem(self) -> Problem:
        """The problem as planted (the bug in for bugs, the model for correct entries)."""
        return self.build(self.kind == "bug")
