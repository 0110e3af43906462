"""``check(per_tensor=False)``: a fired screen confirmed along fresh directions is the verdict."""

from __future__ import annotations

from typing import Any

import pytest

import gradwatch
from gradwatch.engine import auto
from gradwatch.engine.directions import screen as real_screen
from gradwatch.engine.sampling import screen_directions
from gradwatch.errors import OptionError
from tests.engine.test_screen import scalars_next_to_a_large_tensor


def test_a_confirmed_screen_fails_at_every_seed_in_a_few_evaluations() -> None:
    """A 10% error fails without per-tensor directions: 2 probes + two screens, no tensor ratio."""
    params, loss, grads = scalars_next_to_a_large_tensor(0.1)
    directions = screen_directions(len(params))
    for seed in range(20):
        result = gradwatch.check(loss, params, grads, sample="auto", seed=seed, per_tensor=False)
        per_tensor = gradwatch.check(loss, params, grads, sample="auto", seed=seed)
        assert (result.status, per_tensor.status) == ("fail", "fail"), result.notes
        assert result.tensors == {}
        assert result.loss_evals == 2 + 2 * (2 * directions) < per_tensor.loss_evals
        assert any("confirmed it" in note for note in result.notes)


def test_a_correct_gradient_is_ok_after_one_screen_either_way() -> None:
    """per_tensor=False changes nothing on a correct gradient: ok in 6 evaluations."""
    params, loss, grads = scalars_next_to_a_large_tensor(0.0)
    result = gradwatch.check(loss, params, grads, sample="auto", per_tensor=False)
    assert (result.status, result.loss_evals) == ("ok", 6)
    assert set(result.tensors) == set(params)


def test_an_unconfirmed_screen_is_checked_per_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the second screen sees no error, each tensor is checked along its own direction."""

    def second_screen_clean(*args: Any, **kwargs: Any) -> tuple[float, tuple[float, float] | None]:
        ratio, below = real_screen(*args, **kwargs)
        return (0.0, None) if args[-1] == auto.CONFIRMING_SCREEN else (ratio, below)

    monkeypatch.setattr(auto, "screen", second_screen_clean)
    params, loss, grads = scalars_next_to_a_large_tensor(0.1)
    result = gradwatch.check(loss, params, grads, sample="auto", per_tensor=False)
    assert result.status == "fail"
    assert {n for n, t in result.tensors.items() if t.status == "fail"} == {"a", "b"}
    assert any("did not confirm it" in note for note in result.notes)


def test_per_tensor_must_be_a_bool() -> None:
    """A string for per_tensor is refused before J is evaluated, naming the option."""
    params, loss, grads = scalars_next_to_a_large_tensor(0.0)
    with pytest.raises(OptionError, match="per_tensor: expected True or False, received 'no'"):
        gradwatch.check(loss, params, grads, per_tensor="no")  # type: ignore[arg-type]
