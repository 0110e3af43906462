"""A gradient computed on demand (GradientSource) and an exact restore without a backup."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest

import gradwatch
from gradwatch.check import Sample
from gradwatch.params import GradientSource


def quadratic_model(bug: bool) -> tuple[dict[str, np.ndarray], Callable[[], float]]:
    """40 tensors of 100 (above AUTO_FULL_MAX_SIZE): J = sum of squares."""
    rng = np.random.default_rng(4)
    params = {f"t{i}": rng.standard_normal(100) for i in range(40)}

    def loss() -> float:
        return float(sum(np.sum(v**2) for v in params.values()))

    return params, loss


def true_gradient(params: dict[str, np.ndarray], name: str, bug: bool) -> np.ndarray:
    gradient = 2 * params[name]
    if bug and name == "t9":
        gradient[17] *= -1
    return gradient


class Recomputed:
    """A GradientSource: computes each tensor's gradient when visited, then spoils the array.

    Spoiling (NaN) after ``consume`` returns shows a check that kept a reference to an
    array it may only read during the call.
    """

    def __init__(self, params: dict[str, np.ndarray], bug: bool) -> None:
        self.params, self.bug = params, bug
        self.visits: list[list[str]] = []

    def visit(self, names: Sequence[str], consume: Callable[[str, np.ndarray], None]) -> None:
        self.visits.append(list(names))
        for name in names:
            gradient = true_gradient(self.params, name, self.bug)
            consume(name, gradient)
            gradient[...] = np.nan


@pytest.mark.parametrize("sample", [None, 300, "directional", "auto"])
@pytest.mark.parametrize("bug", [False, True])
def test_a_gradient_source_gives_the_same_result_as_the_arrays(sample: object, bug: bool) -> None:
    """Same ratio, statuses and worst components whether dtheta is held or recomputed."""
    params, loss = quadratic_model(bug)
    held = {name: true_gradient(params, name, bug) for name in params}
    expected = gradwatch.check(loss, params, held, sample=sample)  # type: ignore[arg-type]
    source = Recomputed(params, bug)
    assert isinstance(source, GradientSource)
    result = gradwatch.check(loss, params, source, sample=sample)  # type: ignore[arg-type]
    assert result.ratio == expected.ratio
    assert result.status == expected.status
    if sample != 300:  # 300 sampled components may miss the one wrong entry
        assert result.status == ("fail" if bug else "ok")
    assert [c.name for c in result.worst] == [c.name for c in expected.worst]
    assert {n: t.status for n, t in result.tensors.items()} == {
        n: t.status for n, t in expected.tensors.items()
    }
    if bug and sample != 300:
        assert result.worst[0].tensor == "t9"
    # auto on a clean float64 model: one visit gives the norms and both screen projections
    if sample == "auto" and not bug:
        assert len(source.visits) == 1


def test_a_source_with_a_wrong_shape_or_a_missing_tensor_is_a_clear_error() -> None:
    """ParameterError naming the tensor and what was expected; theta restored bit for bit."""
    params, loss = quadratic_model(False)
    before = {name: value.copy() for name, value in params.items()}

    class WrongShape(Recomputed):
        def visit(self, names: Sequence[str], consume: Callable[[str, np.ndarray], None]) -> None:
            for name in names:
                consume(name, np.zeros(3) if name == "t5" else 2 * self.params[name])

    class Missing(Recomputed):
        def visit(self, names: Sequence[str], consume: Callable[[str, np.ndarray], None]) -> None:
            for name in names:
                if name != "t7":
                    consume(name, 2 * self.params[name])

    with pytest.raises(gradwatch.ParameterError, match=r"grads\['t5'\]: expected shape \(100,\)"):
        gradwatch.check(loss, params, WrongShape(params, False), sample="auto")
    with pytest.raises(gradwatch.ParameterError, match=r"received none for \['t7'\]"):
        gradwatch.check(loss, params, Missing(params, False), sample=50)
    for name, value in before.items():
        assert np.array_equal(params[name], value)


class RestoringLoss:
    """J with ``restore_tensor``: the check writes the originals back through it, no backup."""

    def __init__(self, params: dict[str, np.ndarray], loss: Callable[[], float]) -> None:
        self.params, self.loss = params, loss
        self.originals = {name: value.copy() for name, value in params.items()}
        self.restored: list[str] = []

    def __call__(self) -> float:
        return self.loss()

    def restore_tensor(self, name: str) -> None:
        self.restored.append(name)
        self.params[name][...] = self.originals[name]


@pytest.mark.parametrize("sample", ["directional", "auto"])
def test_restore_tensor_puts_moved_tensors_back_exactly(sample: Sample) -> None:
    """The loss's restore_tensor is used for every moved tensor; the result is unchanged."""
    params, loss = quadratic_model(True)
    grads = {name: true_gradient(params, name, True) for name in params}
    expected = gradwatch.check(loss, params, grads, sample=sample)
    restoring = RestoringLoss(params, loss)
    result = gradwatch.check(restoring, params, grads, sample=sample)
    assert result.ratio == expected.ratio
    assert result.worst[0].name == expected.worst[0].name
    assert result.worst[0].tensor == "t9"
    assert set(restoring.restored) == set(params)
    for name, original in restoring.originals.items():
        assert np.array_equal(params[name], original)


def test_restore_tensor_runs_when_the_loss_raises_mid_direction() -> None:
    """A loss raising on a moved theta still leaves every tensor at its original value."""
    params, loss = quadratic_model(False)
    grads = {name: 2 * value for name, value in params.items()}
    calls = [0]

    def failing() -> float:
        calls[0] += 1
        if calls[0] == 3:  # the first evaluation along the first screen direction
            raise RuntimeError("boom")
        return loss()

    restoring = RestoringLoss(params, failing)
    with pytest.raises(RuntimeError, match="boom"):
        gradwatch.check(restoring, params, grads, sample="auto")
    for name, original in restoring.originals.items():
        assert np.array_equal(params[name], original)
