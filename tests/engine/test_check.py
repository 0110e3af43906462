"""The check engine against the lecture's printed numbers and independent formulas."""

from __future__ import annotations

import numpy as np
import pytest

import gradwatch
from examples.lecture_net import backward, cost, exercise_setup


def lecture_check(bugs: bool, **options: object) -> gradwatch.CheckResult:
    x, y, params = exercise_setup()
    grads = backward(params, x, y, bugs=bugs)
    return gradwatch.check(lambda: cost(params, x, y), params, grads, **options)  # type: ignore[arg-type]


def test_one_dimensional_example_matches_the_lecture() -> None:
    """J = theta * x with x = 2, theta = 4, eps = 1e-7 gives a difference of about 2.9e-10."""
    theta = np.array(4.0)
    result = gradwatch.check(lambda: float(theta * 2.0), theta, np.array(2.0), eps=1e-7)
    assert result.ratio == pytest.approx(2.9e-10, rel=0.01)
    assert result.worst[0].name == "theta"
    assert result.status == "ok"


def test_exercise_network_cost_matches_the_exercise() -> None:
    """The hand-written network reproduces the exercise's printed cost."""
    x, y, params = exercise_setup()
    assert cost(params, x, y) == pytest.approx(2.407833389834357, rel=1e-15)


def test_buggy_exercise_network_gives_the_printed_difference() -> None:
    """With the exercise's two bugs, eps=1e-7 gives 0.2850931567761624 and fails in W2 and b1."""
    result = lecture_check(bugs=True, eps=1e-7)
    assert result.ratio == pytest.approx(0.2850931567761624, rel=1e-12)
    assert result.status == "fail"
    assert {c.tensor for c in result.worst[:8]} == {"W2", "b1"}
    assert result.tensors["W2"].status == "fail"
    assert result.tensors["b1"].status == "fail"
    assert result.tensors["W3"].status == "ok"
    assert result.worst[0].diagnosis == "bug"
    assert result.checked == result.size == 47
    assert result.loss == pytest.approx(2.407833389834357, rel=1e-15)


def test_fixed_exercise_network_gives_the_printed_difference() -> None:
    """Without the bugs the difference is about 1.1890913e-07 and the check does not fail."""
    result = lecture_check(bugs=False, eps=1e-7)
    assert result.ratio == pytest.approx(1.1890913e-07, rel=1e-6)
    assert result.status != "fail"
    assert all(c.diagnosis != "bug" for c in result.worst)


def test_default_step_is_scale_aware_and_more_accurate_than_the_lecture_step() -> None:
    """The default step (cbrt(eps) * max(1, |theta|)) beats eps=1e-7 on the fixed network."""
    default = lecture_check(bugs=False)
    assert default.eps == pytest.approx(np.cbrt(np.finfo(np.float64).eps))
    assert default.status == "ok"
    assert default.ratio < lecture_check(bugs=False, eps=1e-7).ratio


def test_given_eps_is_used_as_given() -> None:
    """An explicit eps is the step: the numeric derivative of x^3 shows its h^2 truncation."""
    theta = np.array([2.0])
    h = 1e-2
    result = gradwatch.check(lambda: float(theta[0] ** 3), theta, 3 * theta**2, eps=h)
    # (x+h)^3 - (x-h)^3 over 2h = 3x^2 + h^2 exactly.
    assert result.worst[0].numeric == pytest.approx(12.0 + h**2, rel=1e-10)
    assert result.eps == h and result.eps_policy == "given"


def test_loss_evaluations_are_two_per_component_plus_probe_and_diagnosis() -> None:
    """A full check costs 2n evaluations, plus 2 for the probe and 2 per diagnosed component."""
    calls = 0
    w = np.linspace(-1.0, 1.0, 30)

    def loss() -> float:
        nonlocal calls
        calls += 1
        return float(np.sum(np.sin(w)))

    result = gradwatch.check(loss, {"w": w}, {"w": np.cos(w)}, top_k=3)
    assert calls == result.loss_evals == 2 * 30 + 2 + 2 * 3
    result = gradwatch.check(loss, {"w": w}, {"w": np.cos(w)}, top_k=3, diagnose=False)
    assert result.loss_evals == 2 * 30 + 2


def test_params_are_restored_bit_for_bit() -> None:
    """After a check every parameter holds exactly its old bits, -0.0 and tiny values included."""
    w = np.array([[0.1, -0.0, 1e-300], [3.0, np.pi, -7e12]])
    before = w.copy()
    gradwatch.check(lambda: float(np.sum(np.tanh(w))), {"w": w}, {"w": 1 - np.tanh(w) ** 2})
    assert w.tobytes() == before.tobytes()


def test_sampled_check_is_seeded_and_stratified() -> None:
    """A sample of k components is reproducible per seed and covers every tensor."""
    params = {"big": np.ones(1000), "small": np.ones(3), "tiny": np.ones(1)}
    grads = {k: 2 * v for k, v in params.items()}

    def loss() -> float:
        return float(sum(np.sum(v**2) for v in params.values()))

    first = gradwatch.check(loss, params, grads, sample=20, seed=1)
    again = gradwatch.check(loss, params, grads, sample=20, seed=1)
    other = gradwatch.check(loss, params, grads, sample=20, seed=2)
    assert first.checked == 20 and first.mode == "sampled"
    assert all(first.tensors[t].checked >= 1 for t in params)
    assert first.tensors["big"].checked == 18
    assert first.tensors["small"].checked == first.tensors["tiny"].checked == 1
    names = [c.name for c in first.worst]
    assert names == [c.name for c in again.worst]
    assert names != [c.name for c in other.worst]
    fraction = gradwatch.check(loss, params, grads, sample=0.5)
    assert fraction.checked == round(0.5 * 1004)


def test_sampled_check_finds_a_bug_and_reports_only_checked_components() -> None:
    """A planted error in a sampled tensor fails the check; checked counts the sample."""
    w = np.linspace(0.1, 1.0, 50)
    v = np.linspace(0.2, 1.0, 7)
    grads = {"w": 2 * w, "v": 3 * v**2}
    grads["v"] = grads["v"] * 1.5
    result = gradwatch.check(
        lambda: float(np.sum(w**2) + np.sum(v**3)), {"w": w, "v": v}, grads, sample=10
    )
    assert result.status == "fail"
    assert result.tensors["v"].status == "fail"
    assert result.tensors["w"].status == "ok"
    assert result.worst[0].tensor == "v"


def test_l2_regularization_is_part_of_j() -> None:
    """With the penalty's gradient in dtheta, the check passes only when L2 is in J."""
    x, y, params = exercise_setup()
    lambd = 0.7
    grads = backward(params, x, y, lambd=lambd)
    l2 = gradwatch.L2(lambd, m=3, tensors=["W1", "W2", "W3"])
    with_term = gradwatch.check(lambda: cost(params, x, y), params, grads, regularization=[l2])
    without = gradwatch.check(lambda: cost(params, x, y), params, grads)
    assert with_term.status == "ok"
    assert without.status == "fail"
    assert {c.tensor for c in without.worst} <= {"W1", "W2", "W3"}
    penalty = lambd / 6 * sum(np.sum(params[w] ** 2) for w in ("W1", "W2", "W3"))
    assert with_term.regularization == {l2.name: pytest.approx(penalty)}
    assert with_term.loss == pytest.approx(cost(params, x, y, lambd=lambd))


def test_generic_penalty_from_a_callable_is_part_of_j() -> None:
    """A Penalty built from a callable is re-evaluated at every perturbation."""
    w = np.array([0.5, -1.5, 2.0])
    smooth_l1 = gradwatch.Penalty(lambda p: float(np.sum(np.log(np.cosh(p["w"])))), name="logcosh")
    grads = {"w": 2 * w + np.tanh(w)}
    result = gradwatch.check(
        lambda: float(np.sum(w**2)), {"w": w}, grads, regularization=[smooth_l1]
    )
    assert result.status == "ok"
    assert "logcosh" in result.regularization


def test_nondeterministic_loss_is_flagged_not_failed() -> None:
    """A loss that changes between identical calls gives status nondeterministic, labelled so."""
    rng = np.random.default_rng(0)
    w = np.ones(4)
    result = gradwatch.check(
        lambda: float(np.sum(w**2) + 1e-3 * rng.standard_normal()), {"w": w}, {"w": 2 * w}
    )
    assert result.status == "nondeterministic"
    assert not result.failed
    assert any("nondeterministic" in note for note in result.notes)
    assert all(c.diagnosis == "nondeterministic" for c in result.worst)


def test_kink_is_diagnosed_and_left_out_of_the_ratio() -> None:
    """|w| evaluated within a step of 0 is labelled a kink, not reported as a bug."""
    w = np.array([1e-9, 0.5, -2.0])
    result = gradwatch.check(lambda: float(np.sum(np.abs(w))), {"w": w}, {"w": np.sign(w)})
    assert result.worst[0].name == "w[0]"
    assert result.worst[0].diagnosis == "kink"
    assert result.status == "ok"


def test_truncation_is_diagnosed_with_a_large_step() -> None:
    """With a coarse step the error of exp shrinks like h^2 at h/2: truncation."""
    w = np.array([1.0, 2.0])
    result = gradwatch.check(lambda: float(np.sum(np.exp(w))), {"w": w}, {"w": np.exp(w)}, eps=0.1)
    assert result.worst[0].diagnosis == "truncation"


def test_roundoff_is_diagnosed_with_a_tiny_step() -> None:
    """With a step near machine precision the error grows as h shrinks: roundoff."""
    w = np.array([1.0, 2.0])
    result = gradwatch.check(
        lambda: float(np.sum(np.exp(w))), {"w": w}, {"w": np.exp(w)}, eps=1e-12
    )
    assert result.worst[0].diagnosis == "roundoff"


def test_status_tiers_follow_warn_and_threshold() -> None:
    """A relative gradient error between warn and threshold is warn; the tiers are configurable."""
    w = np.array([1.0, 2.0, 3.0])
    grads = {"w": 2 * w * (1 + 1e-4)}

    def loss() -> float:
        return float(np.sum(w**2))

    assert gradwatch.check(loss, {"w": w}, grads).status == "warn"
    assert gradwatch.check(loss, {"w": w}, grads, threshold=1e-5, warn=1e-6).status == "fail"
    assert gradwatch.check(loss, {"w": w}, grads, warn=1e-3, threshold=1e-2).status == "ok"


def test_near_zero_tensor_is_judged_against_the_whole_gradient() -> None:
    """A tensor whose true gradient is ~0 is not failed on noise (docs/design.md#near-zero)."""
    w = np.linspace(0.5, 2.0, 20)
    unused = np.array([0.3, -0.2])  # J does not depend on it: its gradient is exactly 0

    def loss() -> float:
        return float(np.sum(w**3) + 1e-13 * np.sum(unused))

    result = gradwatch.check(
        loss, {"w": w, "unused": unused}, {"w": 3 * w**2, "unused": np.zeros(2)}
    )
    assert result.tensors["unused"].status == "ok"
    assert result.status == "ok"


def test_ratio_is_zero_when_both_gradients_vanish() -> None:
    """A constant J with a zero gradient has ratio 0 and passes."""
    w = np.ones(3)
    result = gradwatch.check(lambda: 1.0, {"w": w}, {"w": np.zeros(3)})
    assert result.ratio == 0.0 and result.status == "ok"


def test_float32_parameters_get_a_float32_step_and_scaled_thresholds() -> None:
    """float32 params get cbrt(float32 eps) as step and thresholds x100, and the result says so."""
    w = np.linspace(-1, 1, 10).astype(np.float32)
    result = gradwatch.check(
        lambda: float(np.sum(w.astype(np.float64) ** 2)), {"w": w}, {"w": 2 * w}
    )
    assert result.eps == pytest.approx(float(np.cbrt(np.finfo(np.float32).eps)))
    assert result.dtype == "float32"
    assert (result.warn, result.threshold) == (pytest.approx(1e-3), pytest.approx(0.1))  # type: ignore[comparison-overlap]
    assert any("scaled x100" in note for note in result.notes)
    assert result.status == "ok"


def test_float32_relu_network_is_quiet_and_its_bug_is_caught() -> None:
    """A correct float32 ReLU net passes (no float32 false alarm); the exercise's bugs fail."""
    x, y, params = exercise_setup()
    # float32 arrays where lecture_net is annotated float64: the point of the test.
    params32: dict[str, np.ndarray] = {k: v.astype(np.float32) for k, v in params.items()}
    x32: np.ndarray = x.astype(np.float32)

    def loss() -> float:
        return cost(params32, x32, y)

    def grads(bugs: bool) -> dict[str, np.ndarray]:
        return {k: v.astype(np.float32) for k, v in backward(params32, x32, y, bugs=bugs).items()}

    assert gradwatch.check(loss, params32, grads(False)).status != "fail"
    buggy = gradwatch.check(loss, params32, grads(True))
    assert buggy.status == "fail"
    assert buggy.worst[0].tensor in {"W2", "b1"}


def test_directional_check_names_the_wrong_tensor_with_two_evaluations_per_tensor() -> None:
    """Directional mode costs 2 evaluations per tensor and flags the tensor with the error."""
    rng = np.random.default_rng(3)
    params = {f"t{i}": rng.standard_normal(50) for i in range(120)}
    grads = {name: 2 * value for name, value in params.items()}
    grads["t77"] = grads["t77"].copy()
    grads["t77"][5] += 0.5

    def loss() -> float:
        return float(sum(np.sum(v**2) for v in params.values()))

    result = gradwatch.check(loss, params, grads, sample="directional")
    assert result.loss_evals == 2 * 120 + 2
    assert result.mode == "directional"
    assert [t for t, v in result.tensors.items() if v.status == "fail"] == ["t77"]
    assert result.worst[0].tensor == "t77"


def test_auto_localizes_the_wrong_entry_inside_the_flagged_tensor() -> None:
    """Above the full-check size, auto detects per tensor then samples inside the flagged one."""
    rng = np.random.default_rng(4)
    params = {f"t{i}": rng.standard_normal(100) for i in range(40)}
    grads = {name: 2 * value for name, value in params.items()}
    grads["t9"] = grads["t9"].copy()
    grads["t9"][17] *= -1

    def loss() -> float:
        return float(sum(np.sum(v**2) for v in params.values()))

    result = gradwatch.check(loss, params, grads, sample="auto")
    assert result.size == 4000 > gradwatch.check.__globals__["AUTO_FULL_MAX_SIZE"]
    assert result.status == "fail"
    assert result.worst[0].name == "t9[17]"
    assert result.worst[0].diagnosis == "bug"
    assert result.loss_evals < 2 * 4000 / 10


class BatchedCost:
    """The exercise's cost with an ``evaluate_batch`` that copies theta per perturbation."""

    def __init__(self, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> None:
        self.params, self.x, self.y = params, x, y
        self.batches = 0

    def __call__(self) -> float:
        return cost(self.params, self.x, self.y)

    def evaluate_batch(self, tensor: str, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        self.batches += 1
        out = []
        for index, value in zip(indices, values, strict=True):
            moved = {k: v.copy() for k, v in self.params.items()}
            moved[tensor].reshape(-1)[index] = value
            out.append(cost(moved, self.x, self.y))
        return np.array(out)


def test_batched_evaluation_gives_the_same_numbers_as_one_by_one() -> None:
    """A loss with evaluate_batch is called once per tensor and reproduces the sequential check."""
    x, y, params = exercise_setup()
    grads = backward(params, x, y, bugs=True)
    batched_loss = BatchedCost(params, x, y)
    batched = gradwatch.check(batched_loss, params, grads, eps=1e-7, sample=30)
    sequential = gradwatch.check(lambda: cost(params, x, y), params, grads, eps=1e-7, sample=30)
    assert batched_loss.batches == len(params)
    assert batched.ratio == sequential.ratio
    assert [c.name for c in batched.worst] == [c.name for c in sequential.worst]
    assert batched.loss_evals == sequential.loss_evals


def test_batched_evaluation_with_a_wrong_count_is_an_error() -> None:
    """evaluate_batch returning the wrong number of values raises LossError saying so."""

    class Short(BatchedCost):
        def evaluate_batch(
            self, tensor: str, indices: np.ndarray, values: np.ndarray
        ) -> np.ndarray:
            return np.zeros(3)

    x, y, params = exercise_setup()
    with pytest.raises(gradwatch.LossError, match="expected 40 values, one per perturbation"):
        gradwatch.check(Short(params, x, y), params, backward(params, x, y))


def test_auto_screens_a_clean_large_model_in_six_evaluations() -> None:
    """Above the full-check size a correct model costs the probe plus two joint directions."""
    rng = np.random.default_rng(5)
    params = {f"t{i}": rng.standard_normal(100) for i in range(40)}
    params["unused"] = rng.standard_normal(50)  # true gradient exactly 0 (docs/design.md#near-zero)
    grads = {name: 2 * value for name, value in params.items()}
    grads["unused"] = np.zeros(50)

    def loss() -> float:
        return float(sum(np.sum(v**2) for name, v in params.items() if name != "unused"))

    result = gradwatch.check(loss, params, grads, sample="auto")
    assert result.status == "ok"
    assert result.loss_evals == 2 + 2 * 2
    assert result.ratio < 1e-6
    assert all(t.checked == 0 for t in result.tensors.values())
    assert any("screened along 2 random directions" in note for note in result.notes)


def test_kink_crossed_only_by_the_larger_step_is_a_kink_not_truncation() -> None:
    """|w - c| with the kink between h/2 and h from w: the error vanishes at h/2, a kink."""
    h = float(np.cbrt(np.finfo(np.float64).eps))
    w = np.array([0.3, 0.7])
    kink = 0.3 + 0.75 * h

    def loss() -> float:
        return float(abs(w[0] - kink) + np.sum(w**2))

    result = gradwatch.check(loss, {"w": w}, {"w": np.array([-1.0 + 0.6, 1.4])})
    assert result.worst[0].name == "w[0]"
    assert result.worst[0].diagnosis == "kink"
    assert result.status == "ok"


def test_auto_stops_after_the_screen_when_j_is_nondeterministic() -> None:
    """A large model whose J is noisy costs the screen only and is flagged, not failed."""
    rng = np.random.default_rng(6)
    noise = np.random.default_rng(7)
    params = {f"t{i}": rng.standard_normal(100) for i in range(30)}
    grads = {name: 2 * value for name, value in params.items()}

    def loss() -> float:
        return float(sum(np.sum(v**2) for v in params.values()) + 1e-3 * noise.standard_normal())

    result = gradwatch.check(loss, params, grads, sample="auto")
    assert result.status == "nondeterministic"
    assert result.loss_evals == 2 + 2 * 2
    assert {t.status for t in result.tensors.values()} == {"nondeterministic"}
