"""The ``sample="auto"`` screen: 0-d tensors, no structural blind spot, bounded localization."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gradwatch
from benchmarks.screen_miss_rate import PLACEMENTS, trial
from gradwatch.check import AUTO_LOCALIZE_EVALUATIONS
from gradwatch.engine.bisection import bisect, bisection_cost

F64Params = dict[str, npt.NDArray[np.float64]]


def scalars_next_to_a_large_tensor(
    error: float,
) -> tuple[F64Params, Callable[[], float], F64Params]:
    """Issue 12's repro: two scalars (a temperature used twice) and a 2,500-entry tensor."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(2500)
    params = {"a": np.array(1.3), "W": rng.standard_normal(2500), "b": np.array(-0.7)}

    def loss() -> float:
        t = np.tanh(params["W"] * x)
        return float(np.sum(t) * params["a"] + 3 * params["b"] ** 2 + params["a"] ** 2)

    t = np.tanh(params["W"] * x)
    grads = {
        "a": np.array((np.sum(t) + 2 * params["a"]) * (1 + error)),
        "W": params["a"] * (1 - t**2) * x,
        "b": np.array(6 * params["b"] * (1 + error)),
    }
    return params, loss, grads


def test_equal_errors_in_two_scalars_fail_under_auto_at_every_seed() -> None:
    """Both scalars 10% too large (the same sign) fail the default check, at 50 seeds."""
    params, loss, grads = scalars_next_to_a_large_tensor(0.1)
    for seed in range(50):
        result = gradwatch.check(loss, params, grads, sample="auto", seed=seed)
        assert result.status == "fail", (seed, result.notes)
        failing = {n for n, t in result.tensors.items() if t.status == "fail"}
        assert failing == {"a", "b"}
        assert result.loss_evals <= 40


def test_correct_scalars_next_to_a_large_tensor_are_ok() -> None:
    """The same model with the right gradient passes the screen in 6 evaluations."""
    params, loss, grads = scalars_next_to_a_large_tensor(0.0)
    result = gradwatch.check(loss, params, grads, sample="auto")
    assert (result.status, result.loss_evals) == ("ok", 6)


def test_zero_d_numpy_parameters_are_screened_and_localized() -> None:
    """A 0-d array goes through the screen, the per-tensor directions and localization."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(3000)
    params = {"s": np.array(0.7), "w": rng.standard_normal(3000)}

    def loss() -> float:
        return float(params["s"] * np.sum(np.sin(params["w"] * x)))

    right = np.array(np.sum(np.sin(params["w"] * x)))
    grads = {"s": right, "w": params["s"] * np.cos(params["w"] * x) * x}
    for sample in ("auto", "directional"):
        assert gradwatch.check(loss, params, grads, sample=sample).status == "ok"
    grads["s"] = np.array(1.01 * right)
    result = gradwatch.check(loss, params, grads, sample="auto")
    assert result.status == "fail"
    assert result.worst[0].name == "s"
    assert float(params["s"]) == 0.7  # restored


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), placement=st.sampled_from(PLACEMENTS))
def test_a_one_percent_error_is_never_missed(seed: int, placement: str) -> None:
    """Random layouts (0-d to 5,000 entries, 2-40 tensors), r = 1e-2 in one or two tensors."""
    r = 0.1 if placement == "two-scalars" else 1e-2
    assert not trial(seed, placement, r)


def test_bisection_finds_one_wrong_entry_in_log_evaluations() -> None:
    """One wrong entry among 4,096 is found in 2 + 2 * 12 evaluations, theta restored."""
    rng = np.random.default_rng(2)
    weights = rng.standard_normal(4096)
    theta = rng.standard_normal(4096)
    before = theta.copy()
    gradient = weights * np.cos(theta)
    gradient[1234] += 0.1
    evaluations = []

    def evaluate(where: str) -> float:
        evaluations.append(where)
        return float(np.sum(weights * np.sin(theta)))

    direction = rng.uniform(0.5, 1.5, 4096) * rng.choice([-1.0, 1.0], 4096)
    assert bisect(theta, gradient, direction, 1e-5, evaluate, "W") == 1234
    assert len(evaluations) == bisection_cost(4096) == 26
    assert np.array_equal(theta, before)


def test_a_failing_check_with_many_wrong_tensors_stays_within_its_bound() -> None:
    """60 wrong tensors: localization stops at its budget and names what it skipped."""
    rng = np.random.default_rng(3)
    params = {f"W{k}": rng.standard_normal(200) for k in range(60)}
    weights = {name: rng.standard_normal(200) for name in params}

    def loss() -> float:
        return float(sum(np.sum(weights[n] * np.sin(p)) for n, p in params.items()))

    grads = {n: 1.05 * weights[n] * np.cos(p) for n, p in params.items()}
    result = gradwatch.check(loss, params, grads, sample="auto", top_k=10)
    assert result.status == "fail"
    overhead = 2 + 4 + 2 * len(params) + 2 * 10  # probes, screen, directions, diagnosis
    assert result.loss_evals <= overhead + AUTO_LOCALIZE_EVALUATIONS
    assert any(note.startswith("not localized") for note in result.notes)
    assert result.worst and result.worst[0].diagnosis == "bug"


def test_the_verdict_names_the_rule_that_fired_with_its_number() -> None:
    """A wrong 1-entry bias beside a large correct weight: the per-tensor rule, its ratio."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(400)
    params = {"W": rng.standard_normal(400), "b": np.array([0.3])}

    def loss() -> float:
        return float(np.sum(np.sin(params["W"] * x)) + 0.01 * params["b"][0] ** 2)

    grads = {"W": np.cos(params["W"] * x) * x, "b": np.array([0.02 * 0.3 * 1.1])}
    result = gradwatch.check(loss, params, grads)
    assert result.status == "fail" and result.ratio < 1e-3
    assert result.verdict is not None
    bias_ratio = result.tensors["b"].ratio
    assert result.verdict.startswith(f"fail by the per-tensor rule: b (ratio {bias_ratio:.3g})")
    assert f"global ratio {result.ratio:.3g} is below it" in result.verdict
    grads["b"] = np.array([0.02 * 0.3])
    corrected = gradwatch.check(loss, params, grads).verdict
    assert corrected is not None
    assert corrected.startswith("ok: global ratio")


class _OneProcessSplit:
    """A `SplitObjective` whose theta is split over one process: every sum is itself."""

    def __init__(self, loss: object, sizes: dict[str, int]) -> None:
        self.loss, self.sizes, self.reductions = loss, sizes, 0

    def __call__(self) -> float:
        return float(self.loss())  # type: ignore[operator]

    def total(self, values: np.ndarray) -> np.ndarray:
        self.reductions += 1
        return values

    def largest(self, value: float) -> float:
        self.reductions += 1
        return value

    def full_sizes(self) -> dict[str, int]:
        return self.sizes


def test_a_split_theta_over_one_process_screens_exactly_as_the_plain_screen() -> None:
    """The joint screen's reductions (FSDP2) change nothing when there is one part; and a
    fired split screen is the whole check (its caller localizes), not a per-tensor pass."""
    rng = np.random.default_rng(3)
    w, v = rng.normal(size=(60, 50)), rng.normal(size=40)
    params = {"w": w, "v": v}

    def loss() -> float:
        return float(np.sum(np.tanh(w) ** 2) + np.sum(np.sin(v)))

    grads = {"w": 2 * np.tanh(w) * (1 - np.tanh(w) ** 2), "v": np.cos(v)}
    plain = gradwatch.check(loss, params, grads, sample="auto")
    split = _OneProcessSplit(loss, {"w": w.size, "v": v.size})
    joint = gradwatch.check(split, params, grads, sample="auto")
    assert split.reductions > 0
    assert (joint.status, joint.mode, joint.loss_evals) == (plain.status, "directional", 6)
    assert joint.ratio == plain.ratio
    wrong = {"w": grads["w"], "v": 1.5 * grads["v"]}
    fired = gradwatch.check(_OneProcessSplit(loss, split.sizes), params, wrong, sample="auto")
    assert (fired.status, fired.mode, fired.loss_evals) == ("fail", "directional", 6)


def test_a_split_theta_is_refused_outside_the_auto_screen() -> None:
    w = np.ones(3)
    split = _OneProcessSplit(lambda: float(np.sum(w**2)), {"w": 3})
    with pytest.raises(gradwatch.OptionError, match="'auto' screen only, received 2"):
        gradwatch.check(split, {"w": w}, {"w": 2 * w}, sample=2)


def test_a_clean_screen_gives_no_tensor_a_ratio_it_did_not_measure(tmp_path: Path) -> None:
    """A clean screen moves every tensor together: each tensor's ratio is null (not the
    global one) in the result and in checks.jsonl, and the report's series skip them."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(6000)
    params = {"W": rng.standard_normal(6000), "b": np.array(0.3)}

    def loss() -> float:
        return float(np.sum(np.tanh(params["W"] * x)) + params["b"] ** 2)

    grads = {"W": (1 - np.tanh(params["W"] * x) ** 2) * x, "b": np.array(2 * params["b"])}
    result = gradwatch.check(loss, params, grads, sample="auto")
    assert result.mode == "directional" and result.status == "ok"
    assert all(t.ratio is None and t.checked == 0 for t in result.tensors.values())
    with gradwatch.GradWatch(every=1, report_dir=tmp_path) as watch:
        watch.after_backward(0, loss=loss, params=params, grads=grads)
    line = json.loads((tmp_path / "checks.jsonl").read_text().splitlines()[-1])
    assert {t["ratio"] for t in line["tensors"].values()} == {None}
    assert gradwatch.load_report(tmp_path).checks[0].tensors["W"].ratio is None
