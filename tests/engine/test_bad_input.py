"""Bad input gets a GradwatchError naming what was expected and received; params stay intact."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import gradwatch
from gradwatch import LossError, OptionError, ParameterError
from gradwatch.check import Sample


def quadratic() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Callable[[], float]]:
    params = {"W": np.array([[1.0, -2.0], [0.5, 3.0]]), "b": np.array([0.25, -0.75])}
    grads = {name: 2 * value for name, value in params.items()}
    return params, grads, lambda: float(sum(np.sum(v**2) for v in params.values()))


@pytest.mark.parametrize(
    ("mutate", "error", "fragments"),
    [
        (lambda p, g: g.pop("b"), ParameterError, ["expected the same keys", "missing ['b']"]),
        (
            lambda p, g: g.__setitem__("c", np.zeros(1)),
            ParameterError,
            ["expected the same keys", "unexpected ['c']"],
        ),
        (
            lambda p, g: g.__setitem__("W", np.zeros((2, 3))),
            ParameterError,
            ["expected shape (2, 2)", "received (2, 3)"],
        ),
        (
            lambda p, g: p.__setitem__("b", np.array([1, 2])),
            ParameterError,
            ["expected a float array", "received dtype int64"],
        ),
        (
            lambda p, g: p["W"].setflags(write=False),
            ParameterError,
            ["expected a writable array", "read-only"],
        ),
        (
            lambda p, g: p.__setitem__("W", np.ones((4, 4))[::2, ::2]),
            ParameterError,
            ["expected a C-contiguous array", "strided view"],
        ),
        (
            lambda p, g: g["W"].__setitem__((1, 0), np.nan),
            ParameterError,
            ["grads['W']: expected finite values", "received nan at index [1, 0]"],
        ),
        (
            lambda p, g: p["b"].__setitem__(1, np.inf),
            ParameterError,
            ["params['b']: expected finite values", "received inf at index [1]"],
        ),
        (
            lambda p, g: g.__setitem__("W", [[1.0, 2.0], [3.0, 4.0]]),
            ParameterError,
            ["expected a float np.ndarray", "received list"],
        ),
    ],
)
def test_bad_params_and_grads(
    mutate: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], object],
    error: type[Exception],
    fragments: list[str],
) -> None:
    """Each mismatch raises its error type with a message naming expected and received."""
    params, grads, loss = quadratic()
    mutate(params, grads)
    with pytest.raises(error) as raised:
        gradwatch.check(loss, params, grads)
    for fragment in fragments:
        assert fragment in str(raised.value)
    assert isinstance(raised.value, gradwatch.GradwatchError)


def test_params_of_the_wrong_type() -> None:
    """A list instead of a mapping or array is named in the error."""
    with pytest.raises(ParameterError, match=r"expected a Mapping.*received list"):
        gradwatch.check(lambda: 0.0, [1.0, 2.0], [1.0, 2.0])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"eps": 0.0}, "eps: expected None or a finite float > 0, received 0.0"),
        ({"eps": -1e-7}, "eps: expected None or a finite float > 0, received -1e-07"),
        ({"eps": float("nan")}, "eps: expected None or a finite float > 0, received nan"),
        ({"sample": 0}, "sample: expected an int between 1 and the 6 components"),
        ({"sample": 1.5}, "sample: expected a fraction in (0, 1], received 1.5"),
        ({"sample": 0.0}, "received 0.0"),
        ({"sample": True}, "received True"),
        ({"sample": "some"}, "received 'some'"),
        ({"top_k": -1}, "top_k: expected an int >= 0, received -1"),
        ({"threshold": 0}, "threshold: expected a float > 0, received 0"),
        ({"warn": 1e-2, "threshold": 1e-3}, "warn: expected warn <= threshold"),
        ({"regularization": [object()]}, "regularization: expected terms such as gradwatch.L2"),
        (
            {"regularization": [gradwatch.L2(0.1, tensors=["W9"])]},
            "expected names among ['W', 'b'], received unknown ['W9']",
        ),
    ],
)
def test_bad_options(options: dict[str, object], fragment: str) -> None:
    """Out-of-range options raise OptionError naming the option, expected and received."""
    params, grads, loss = quadratic()
    with pytest.raises(OptionError) as raised:
        gradwatch.check(loss, params, grads, **options)  # type: ignore[arg-type]
    assert fragment in str(raised.value)


@pytest.mark.parametrize(
    ("make_l2", "fragment"),
    [
        (lambda: gradwatch.L2(-1.0), "L2 lambd: expected a finite number >= 0, received -1.0"),
        (lambda: gradwatch.L2(0.1, m=0), "L2 m: expected an integer >= 1, received 0"),
        (lambda: gradwatch.L2(0.1, tensors="W1"), "received the string 'W1'"),
    ],
)
def test_bad_regularization_terms(make_l2: Callable[[], object], fragment: str) -> None:
    """A malformed L2 term is refused at construction."""
    with pytest.raises(OptionError) as raised:
        make_l2()
    assert fragment in str(raised.value)


@pytest.mark.parametrize(
    ("returned", "fragment"),
    [
        (
            np.array([1.0, 2.0]),
            "expected a scalar (float or 0-d array), received an array of shape (2,)",
        ),
        (float("nan"), "expected a finite scalar, received nan"),
        (float("inf"), "expected a finite scalar, received inf"),
        ("loss", "expected a float or 0-d array, received str"),
        ({"loss": 1.0}, "expected a float or 0-d array, received dict"),
        (None, "expected a float or 0-d array, received NoneType"),
    ],
)
def test_bad_loss_values(returned: object, fragment: str) -> None:
    """A loss that is not a finite scalar raises LossError saying where and what it returned."""
    params, grads, _ = quadratic()
    with pytest.raises(LossError) as raised:
        gradwatch.check(lambda: returned, params, grads)
    assert fragment in str(raised.value)
    assert "J(theta)" in str(raised.value)


def test_loss_that_is_not_callable() -> None:
    """Passing a number as loss names the expected callable."""
    params, grads, _ = quadratic()
    with pytest.raises(LossError, match=r"expected a zero-argument callable.*received float"):
        gradwatch.check(1.0, params, grads)  # type: ignore[arg-type]


def test_size_one_arrays_are_accepted_as_scalars() -> None:
    """A (1, 1) cost, as np.dot returns, counts as a scalar."""
    params, grads, loss = quadratic()
    result = gradwatch.check(lambda: np.array([[loss()]]), params, grads)
    assert result.status == "ok"


@pytest.mark.parametrize("failing_call", [1, 2, 3, 7, 8, 11])
def test_params_restored_bit_for_bit_when_loss_raises_halfway(failing_call: int) -> None:
    """A loss that raises mid-check leaves every parameter with its exact original bits."""
    params, grads, loss = quadratic()
    before = {k: v.copy() for k, v in params.items()}
    calls = 0

    def flaky() -> float:
        nonlocal calls
        calls += 1
        if calls == failing_call:
            raise RuntimeError("out of memory")
        return loss()

    with pytest.raises(RuntimeError, match="out of memory"):
        gradwatch.check(flaky, params, grads)
    for name, value in params.items():
        assert value.tobytes() == before[name].tobytes()


def test_params_restored_when_loss_turns_non_finite_at_a_perturbation() -> None:
    """A loss that overflows at theta + h raises LossError naming the component; params intact."""
    w = np.array([1.0, 709.78])
    before = w.copy()
    with np.errstate(over="ignore"), pytest.raises(LossError, match=r"w flat index 1 \+ h.*inf"):
        gradwatch.check(lambda: float(np.sum(np.exp(w))), {"w": w}, {"w": np.exp(w)})
    assert w.tobytes() == before.tobytes()


def test_params_restored_in_directional_mode_when_loss_raises() -> None:
    """The directional check restores a whole tensor bit for bit when loss raises."""
    params, grads, loss = quadratic()
    before = {k: v.copy() for k, v in params.items()}
    calls = 0

    def flaky() -> float:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt
        return loss()

    with pytest.raises(KeyboardInterrupt):
        gradwatch.check(flaky, params, grads, sample="directional")
    for name, value in params.items():
        assert value.tobytes() == before[name].tobytes()


@pytest.mark.parametrize("sample", ["directional", "auto"])
def test_directional_restore_is_bit_exact_for_float32_valued_float64(sample: Sample) -> None:
    """Values a float32 holds (saved narrow) and values it doesn't come back bit for bit."""
    rng = np.random.default_rng(0)
    params = {
        "narrow": rng.standard_normal(3000).astype(np.float32).astype(np.float64),
        "wide": rng.standard_normal(50),
    }
    params["narrow"][:2] = [-0.0, 3.0e38]
    before = {k: v.copy() for k, v in params.items()}
    grads = {k: 2 * v for k, v in params.items()}
    result = gradwatch.check(
        lambda: float(sum(np.sum(v**2) for v in params.values())), params, grads, sample=sample
    )
    assert result.status == "ok"
    for name, value in params.items():
        assert value.tobytes() == before[name].tobytes()
