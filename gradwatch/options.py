"""Every option of `gradwatch.check` and `gradwatch.GradWatch`, validated in one place.

`WatchOptions` is the one list of a watch's options: `gradwatch.GradWatch`, every
framework callback and the report's configuration read it. Each mistake has one message
(argument, expected, received), whoever is called with it: `GradWatch` validates at
construction what `check` validates again per call (only the check knows theta's size,
so only it can say that ``sample=k`` exceeds it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

from gradwatch.errors import OptionError
from gradwatch.params import NamedTensors
from gradwatch.regularization import RegularizationTerm, ValidatedTerm
from gradwatch.result import CheckResult

__all__ = [
    "CHECK_OPTIONS",
    "OnAlert",
    "OnError",
    "Sample",
    "WatchOptions",
    "checked_step",
    "validate_check_options",
    "validate_sample",
    "validate_seed",
    "validate_step",
    "validate_terms",
    "validate_watch_options",
]

Sample = int | float | Literal["auto", "directional"] | None
"""None (every component), an int k, a fraction in (0, 1], "auto" or "directional"."""
OnAlert = Literal["log", "raise"] | Callable[[CheckResult], object]
OnError = Literal["record", "raise"]

CHECK_OPTIONS = ("eps", "sample", "seed", "top_k", "warn", "threshold")
"""The watch options a check function takes (`WatchOptions.check_options`)."""


@dataclass(frozen=True)
class WatchOptions:
    """Every option of a watch, validated at construction: the one list.

    `gradwatch.GradWatch` and the framework callbacks take these as keyword arguments,
    the report's configuration records them (`recorded`) and a check function gets its
    share (`check_options`). Adding an option is a field here and its check in
    `__post_init__`; see `gradwatch.GradWatch` for what each one does.

    Raises:
        OptionError: an option is out of range, naming it, the expected and the received.
    """

    every: int = 500
    sample: Sample = "auto"
    eps: float | None = None
    threshold: float = 1e-3
    warn: float = 1e-5
    top_k: int = 10
    seed: int = 0
    on_alert: OnAlert = "log"
    on_error: OnError = "record"
    budget: float | None = None

    def __post_init__(self) -> None:
        # numpy integers (from a config or an array) are the ints they are.
        for name in ("every", "seed", "top_k", "sample"):
            object.__setattr__(self, name, plain_int(getattr(self, name)))
        validate_sample(self.sample)
        validate_check_options(
            eps=self.eps, top_k=self.top_k, warn=self.warn, threshold=self.threshold
        )
        validate_watch_options(
            every=self.every,
            seed=self.seed,
            on_alert=self.on_alert,
            on_error=self.on_error,
            budget=self.budget,
        )
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "warn", float(self.warn))
        if self.budget is not None:
            object.__setattr__(self, "budget", float(self.budget))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The options, in order."""
        return tuple(field.name for field in dataclasses.fields(cls))

    def as_dict(self) -> dict[str, Any]:
        """Every option by name (keyword arguments of `gradwatch.GradWatch`)."""
        return {name: getattr(self, name) for name in self.names()}

    def check_options(self) -> dict[str, Any]:
        """The options a check function takes (`CHECK_OPTIONS`)."""
        return {name: getattr(self, name) for name in CHECK_OPTIONS}

    def recorded(self) -> dict[str, Any]:
        """The options as the report's configuration holds them (a callable named)."""
        options = self.as_dict()
        if not isinstance(self.on_alert, str):
            on_alert = self.on_alert
            options["on_alert"] = (
                f"callable {getattr(on_alert, '__qualname__', type(on_alert).__name__)}"
            )
        return options


_SAMPLE_EXPECTED = (
    'sample: expected None, "auto", "directional", an int >= 1 or a fraction in (0, 1]'
)


def validate_check_options(
    *,
    eps: object,
    top_k: object,
    warn: object,
    threshold: object,
    localize_evaluations: object = 0,
    seed: object = 0,
    diagnose: object = True,
    per_tensor: object = True,
) -> None:
    """The options a check takes, ``sample`` aside (`validate_sample`: it needs theta's size).

    Raises:
        OptionError: naming the first option out of range.
    """
    if eps is not None and not _positive_number(eps):
        raise OptionError(f"eps: expected None or a finite float > 0, received {eps!r}")
    validate_seed(seed)
    if not isinstance(diagnose, bool | np.bool_):
        raise OptionError(f"diagnose: expected True or False, received {diagnose!r}")
    if not isinstance(per_tensor, bool | np.bool_):
        raise OptionError(f"per_tensor: expected True or False, received {per_tensor!r}")
    if not _whole_number(top_k):
        raise OptionError(f"top_k: expected an int >= 0, received {top_k!r}")
    for name, value in (("warn", warn), ("threshold", threshold)):
        if isinstance(value, float) and value == math.inf:
            raise OptionError(f"{name}: expected a finite float, received {value!r}")
        if not _positive_number(value):
            raise OptionError(f"{name}: expected a float > 0, received {value!r}")
    if warn > threshold:  # type: ignore[operator]
        raise OptionError(
            f"warn: expected warn <= threshold ({threshold!r}), received warn={warn!r}"
        )
    if not _whole_number(localize_evaluations):
        raise OptionError(
            f"localize_evaluations: expected an int >= 0, received {localize_evaluations!r}"
        )


def validate_sample(sample: object, size: int | None = None) -> None:
    """``sample`` is a `Sample`; with theta's ``size`` known, an int k is at most that."""
    if sample is None or sample in ("auto", "directional"):
        return
    if isinstance(sample, float):
        if not 0 < sample <= 1:
            raise OptionError(f"sample: expected a fraction in (0, 1], received {sample!r}")
        return
    if isinstance(sample, bool) or not isinstance(sample, int):
        raise OptionError(f"{_SAMPLE_EXPECTED}, received {sample!r}")
    if size is not None and not 1 <= sample <= size:
        raise OptionError(
            f"sample: expected an int between 1 and the {size} components of theta, "
            f"received {sample!r}"
        )
    if sample < 1:
        raise OptionError(f"sample: expected an int >= 1, received {sample!r}")


def validate_watch_options(
    *, every: object, seed: object, on_alert: object, on_error: object, budget: object
) -> None:
    """The options only `GradWatch` takes (the check's are `validate_check_options`).

    Raises:
        OptionError: naming the first option out of range.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise OptionError(f"every: expected an int >= 1 (optimizer updates), received {every!r}")
    validate_seed(seed)
    if not (on_alert in ("log", "raise") or callable(on_alert)):
        raise OptionError(
            f'on_alert: expected "log", "raise" or a callable taking the CheckResult, '
            f"received {on_alert!r}"
        )
    if on_error not in ("record", "raise"):
        raise OptionError(f'on_error: expected "record" or "raise", received {on_error!r}')
    if budget is not None and not (_positive_number(budget) and budget <= 1):  # type: ignore[operator]
        raise OptionError(
            f"budget: expected None or a share of training time in (0, 1], received {budget!r}"
        )


def validate_seed(seed: object) -> None:
    """A seed numpy's generators take: an int >= 0 (a numpy integer is one)."""
    if not _whole_number(plain_int(seed)):
        raise OptionError(f"seed: expected an int >= 0, received {seed!r}")


def validate_step(eps: float | None, tensors: NamedTensors, diagnose: bool) -> None:
    """A given ``eps`` must move every entry of theta in its dtype, half of it too when
    the diagnosis steps by eps/2: theta +- eps rounding to theta is a zero difference
    (a false alarm, or a division by a zero step).

    The entry of largest magnitude has the coarsest spacing: if it moves, all do.
    """
    if eps is None:
        return
    smallest = eps / 2 if diagnose else eps
    for name in tensors.names:
        array = tensors.params[name]
        if array.size == 0:
            continue
        dtype = array.dtype.type
        largest = dtype(max(abs(float(array.max())), abs(float(array.min()))))
        up, down = dtype(largest + dtype(smallest)), dtype(largest - dtype(smallest))
        if up != largest and down != largest and dtype(smallest) != 0:
            continue
        needed = 2 * float(np.spacing(largest)) * (2 if diagnose else 1)
        raise OptionError(
            f"eps: expected a step that moves every entry of {name!r} in {array.dtype} "
            f"(at least {needed:.3g} for |theta| up to {float(largest):.3g}"
            + (", the diagnosis stepping by eps/2" if diagnose else "")
            + f"), received {eps!r}: theta +- {smallest:.3g} rounds to theta; "
            "eps=None picks a step for the dtype"
        )


def validate_terms(
    regularization: Iterable[RegularizationTerm] | RegularizationTerm, tensors: NamedTensors
) -> list[RegularizationTerm]:
    """The regularization terms as a list, each validated against the named tensors."""
    if isinstance(regularization, RegularizationTerm):
        regularization = [regularization]
    terms = list(regularization)
    for term in terms:
        if not isinstance(term, RegularizationTerm):
            raise OptionError(
                "regularization: expected terms such as gradwatch.L2(...) or "
                f"gradwatch.Penalty(fn), received {type(term).__name__}"
            )
        if isinstance(term, ValidatedTerm):
            term.validate(tensors.params)
    return terms


def checked_step(step: object) -> int:
    """A step count (optimizer updates completed before this one) as an int."""
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise OptionError(f"step: expected an int >= 0, received {step!r}")
    return int(step)


def _whole_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


def _positive_number(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value > 0
    )


T = TypeVar("T")


def plain_int(value: T) -> T | int:
    """``value`` as a Python int when it is a numpy integer (``np.int64(500)`` from a config
    or an array), else unchanged: options accept numpy integers as the ints they are."""
    if isinstance(value, np.integer) and not isinstance(value, np.bool_):
        return int(value)
    return value
