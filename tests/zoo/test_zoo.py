"""Detection quality on the bug zoo: every planted bug caught and localized, no false alarm."""

from __future__ import annotations

import numpy as np
import pytest

from tests.zoo import ENTRIES, NumpyProblem, Training, ZooEntry
from tests.zoo.harness import DEFAULT, blames, run_gradwatch

BUGS = [e for e in ENTRIES if e.kind == "bug"]
CORRECT = [e for e in ENTRIES if e.kind == "correct"]
LARGE = {"np_large_row0_25k", "np_large_25k", "pt_large_last_row_17k", "pt_large_17k"}

DEFAULT_MISSES: dict[str, str] = {}
"""Bugs the default check is known to miss, with the root cause (none at present)."""

FALSE_ALARMS: dict[str, str] = {}
"""Correct models the checks alarm on, with the root cause (none at present: float32
arrays get float32 thresholds since the engine scales them by dtype)."""


def _marks(entry: ZooEntry, *, heavy: bool = True) -> list[pytest.MarkDecorator]:
    marks = [pytest.mark.torch] if entry.framework == "torch" else []
    if heavy and entry.name in LARGE:
        marks.append(pytest.mark.slow)
    return marks


def _params(entries: list[ZooEntry], *, heavy: bool = True) -> list[object]:
    params: list[object] = []
    for e in entries:
        marks = _marks(e, heavy=heavy)
        if e.name in FALSE_ALARMS:
            marks.append(pytest.mark.xfail(strict=True, reason=FALSE_ALARMS[e.name]))
        params.append(pytest.param(e, id=e.name, marks=marks))
    return params


def _default_params() -> list[object]:
    params: list[object] = []
    for e in BUGS:
        marks = _marks(e, heavy=False)
        if e.name in DEFAULT_MISSES:
            marks.append(pytest.mark.xfail(strict=True, reason=DEFAULT_MISSES[e.name]))
        params.append(pytest.param(e, id=e.name, marks=marks))
    return params


def test_the_zoo_has_enough_entries() -> None:
    """At least 20 planted bugs and 10 correct models, each with a unique name."""
    names = [e.name for e in ENTRIES]
    assert len(set(names)) == len(names)
    assert len(BUGS) >= 20 or not any(e.framework == "torch" for e in ENTRIES)
    assert len(CORRECT) >= 10 or not any(e.framework == "torch" for e in ENTRIES)
    assert all(e.buggy for e in BUGS) and not any(e.buggy for e in CORRECT)


@pytest.mark.parametrize("entry", _params(BUGS))
def test_full_check_catches_and_localizes_the_bug(entry: ZooEntry) -> None:
    """The full check alerts, and its worst component lies in a tensor the bug made wrong."""
    outcome = run_gradwatch(entry, None)
    assert outcome.alert, outcome.note
    assert outcome.tensor in entry.buggy


@pytest.mark.parametrize("entry", _default_params())
def test_default_check_catches_and_localizes_the_bug(entry: ZooEntry) -> None:
    """GradWatch's default check (sample="auto") alerts and blames a buggy tensor (or, in
    torch, the module that owns it, named by the module-local search)."""
    outcome = run_gradwatch(entry, DEFAULT)
    assert outcome.alert, outcome.note
    assert blames(outcome.tensor, entry.buggy), outcome.tensor


@pytest.mark.parametrize("entry", _params(CORRECT, heavy=False))
def test_correct_model_stays_quiet_under_the_default_check(entry: ZooEntry) -> None:
    """No alert from GradWatch's default check on a correct model."""
    assert not run_gradwatch(entry, DEFAULT).alert


@pytest.mark.parametrize("entry", _params(CORRECT))
def test_correct_model_stays_quiet_under_the_full_check(entry: ZooEntry) -> None:
    """No alert from the full check on a correct model (float32, dropout, kinks...)."""
    assert not run_gradwatch(entry, None).alert


@pytest.mark.parametrize("entry", _params(BUGS))
def test_the_correct_twin_of_each_bug_is_quiet(entry: ZooEntry) -> None:
    """With the bug taken out the same model passes: the alert is the bug's, not noise."""
    sample = None if entry.name not in LARGE else DEFAULT
    assert not run_gradwatch(entry, sample, bug=False).alert


@pytest.mark.parametrize(
    "entry",
    [e for e in BUGS if e.framework == "numpy" and not isinstance(e.build(False), Training)],
)
def test_numpy_bug_changes_only_the_named_tensors(entry: ZooEntry) -> None:
    """The planted backward differs from its twin's in the listed tensors only, and really."""
    planted, twin = entry.build(True), entry.build(False)
    assert isinstance(planted, NumpyProblem) and isinstance(twin, NumpyProblem)
    changed = {
        name
        for name in twin.grads
        if not np.allclose(planted.grads[name], twin.grads[name], rtol=1e-12, atol=0)
    }
    assert changed and changed <= set(entry.buggy)


@pytest.mark.parametrize("entry", [e for e in BUGS if isinstance(e.build(False), Training)])
def test_late_bug_is_missed_at_step_zero_and_caught_later(entry: ZooEntry) -> None:
    """The weights-grow bug passes the step-0 check; the periodic check alerts later."""
    outcome = run_gradwatch(entry, DEFAULT)
    statuses = dict(item.split(":") for item in outcome.note.removeprefix("checks at ").split(", "))
    assert statuses["0"] != "fail"
    assert outcome.alert and outcome.tensor in entry.buggy
