"""Property tests: smooth functions with known gradients pass; one corrupted component is found."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import gradwatch

Problem = tuple[dict[str, np.ndarray], Callable[[], float], Callable[[], dict[str, np.ndarray]]]


def quadratic(rng: np.random.Generator, n: int, scale: float) -> Problem:
    root = rng.standard_normal((n, n))
    a = root @ root.T / n + np.eye(n)
    b = rng.standard_normal(n)
    params = {"theta": scale * rng.standard_normal(n)}

    def loss() -> float:
        t = params["theta"]
        return float(0.5 * t @ a @ t + b @ t)

    return params, loss, lambda: {"theta": a @ params["theta"] + b}


def tanh_layer(rng: np.random.Generator, n: int, scale: float) -> Problem:
    x = rng.standard_normal((3, 5))
    v = rng.standard_normal((n, 1))
    params = {"W": scale * rng.standard_normal((n, 3)), "c": rng.standard_normal((n, 1))}

    def loss() -> float:
        return float(np.sum(v * np.tanh(params["W"] @ x + params["c"])))

    def grads() -> dict[str, np.ndarray]:
        upstream = v * (1 - np.tanh(params["W"] @ x + params["c"]) ** 2)
        return {"W": upstream @ x.T, "c": upstream.sum(axis=1, keepdims=True)}

    return params, loss, grads


def softmax_cross_entropy(rng: np.random.Generator, n: int, scale: float) -> Problem:
    classes, m = 4, 6
    x = rng.standard_normal((n, m))
    labels = rng.integers(0, classes, size=m)
    params = {
        "W": scale * rng.standard_normal((classes, n)),
        "b": rng.standard_normal((classes, 1)),
    }

    def probabilities() -> np.ndarray:
        logits = params["W"] @ x + params["b"]
        shifted = np.exp(logits - logits.max(axis=0))
        return shifted / shifted.sum(axis=0)

    def loss() -> float:
        return float(-np.mean(np.log(probabilities()[labels, np.arange(m)])))

    def grads() -> dict[str, np.ndarray]:
        delta = probabilities()
        delta[labels, np.arange(m)] -= 1
        delta /= m
        return {"W": delta @ x.T, "b": delta.sum(axis=1, keepdims=True)}

    return params, loss, grads


PROBLEMS = [quadratic, tanh_layer, softmax_cross_entropy]


@settings(max_examples=60, deadline=None)
@given(
    problem=st.sampled_from(PROBLEMS),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 8),
    scale=st.floats(0.1, 3.0),
)
def test_correct_gradients_pass(
    problem: Callable[..., Problem], seed: int, n: int, scale: float
) -> None:
    """A float64 check of a correct analytic gradient reports ok."""
    params, loss, grads = problem(np.random.default_rng(seed), n, scale)
    result = gradwatch.check(loss, params, grads())
    assert result.status == "ok", (result.ratio, result.worst[:2])


@settings(max_examples=60, deadline=None)
@given(
    problem=st.sampled_from(PROBLEMS),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 8),
    scale=st.floats(0.1, 3.0),
    pick=st.floats(0.0, 0.999),
    relative_error=st.floats(1e-3, 10.0),
)
def test_one_corrupted_component_is_the_worst(
    problem: Callable[..., Problem],
    seed: int,
    n: int,
    scale: float,
    pick: float,
    relative_error: float,
) -> None:
    """Corrupting one gradient component makes it the worst component, named by tensor and index."""
    params, loss, grads_of = problem(np.random.default_rng(seed), n, scale)
    grads = grads_of()
    names = list(grads)
    sizes = [grads[k].size for k in names]
    flat = int(pick * sum(sizes))
    tensor = next(k for k, end in zip(names, np.cumsum(sizes), strict=True) if flat < end)
    local = flat - sum(grads[k].size for k in names[: names.index(tensor)])
    index = np.unravel_index(local, grads[tensor].shape)
    scale_of_gradient = max(
        float(np.max(np.abs(np.concatenate([g.ravel() for g in grads.values()])))), 1e-3
    )
    grads[tensor][index] += relative_error * scale_of_gradient
    result = gradwatch.check(loss, params, grads)
    expected = f"{tensor}[{', '.join(str(int(i)) for i in index)}]"
    assert result.worst[0].name == expected
    assert result.worst[0].diagnosis == "bug"
