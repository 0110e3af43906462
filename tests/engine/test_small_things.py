"""Small things users hit (issue 13, item 6): numpy integers, one array twice, NaN ratios."""

from __future__ import annotations

import numpy as np
import pytest

import gradwatch
from gradwatch.errors import ParameterError


def test_numpy_integers_are_accepted_as_options() -> None:
    """every, sample, seed and top_k given as np.int64 (from a config array) work like ints.

    The options are annotated int, so each np.int64 below is a deliberate arg-type error."""
    w = np.linspace(-1.0, 1.0, 6)
    watch = gradwatch.GradWatch(
        every=np.int64(2),  # type: ignore[arg-type]
        sample=np.int64(3),  # type: ignore[arg-type]
        seed=np.int64(1),  # type: ignore[arg-type]
        top_k=np.int64(2),  # type: ignore[arg-type]
        report_dir=None,
    )
    results = [
        watch.after_backward(
            step, loss=lambda: float(np.sum(w**2)), params={"w": w}, grads={"w": 2 * w}
        )
        for step in range(3)
    ]
    assert [r is not None for r in results] == [True, False, True]
    assert results[0] is not None and results[0].checked == 3 and len(results[0].worst) == 2
    direct = gradwatch.check(
        lambda: float(np.sum(w**2)),
        {"w": w},
        {"w": 2 * w},
        sample=np.int64(4),  # type: ignore[arg-type]
        seed=np.int64(0),  # type: ignore[arg-type]
    )
    assert direct.checked == 4 and direct.status == "ok"


def test_one_array_under_two_names_is_a_clear_error() -> None:
    """The same array given as 'a' and 'b' would be moved twice per component (a false fail):
    refused with a message naming both."""
    w = np.array([1.0, -2.0, 0.5])
    with pytest.raises(ParameterError, match=r"params\['b'\].*same array as params\['a'\]"):
        gradwatch.check(
            lambda: float(np.sum(w**2) + np.sum(w**2)), {"a": w, "b": w}, {"a": 2 * w, "b": 2 * w}
        )


def test_a_nan_ratio_is_never_ok() -> None:
    """A gradient so large that the ratio overflows to NaN fails instead of passing as ok."""
    from gradwatch.engine.comparison import status_for

    assert status_for(float("nan"), 1e-5, 1e-3) == "fail"
    assert status_for(1e-9, 1e-5, 1e-3) == "ok"


def test_a_sample_larger_than_theta_checks_everything_with_a_note() -> None:
    """GradWatch(sample=10**9) on a 6-component model checks all 6 and says so, instead of
    failing at every due step of training (issue 13); check(sample=7) likewise."""
    w = np.linspace(-1.0, 1.0, 6)
    watch = gradwatch.GradWatch(every=1, sample=10**9, report_dir=None)
    result = watch.after_backward(
        0, loss=lambda: float(np.sum(w**2)), params={"w": w}, grads={"w": 2 * w}
    )
    assert result is not None and result.status == "ok" and result.checked == 6
    assert any("sample=1000000000 is more than the 6 components" in n for n in result.notes)
    direct = gradwatch.check(lambda: float(np.sum(w**2)), {"w": w}, {"w": 2 * w}, sample=7)
    assert direct.checked == 6 and direct.mode == "full"
