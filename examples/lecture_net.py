"""The lecture's 3-layer network in numpy, with a hand-written backward pass.

LINEAR -> RELU -> LINEAR -> RELU -> LINEAR -> SIGMOID, cross-entropy averaged
over the m examples, optional L2 penalty lambd/(2m) * sum ||W||^2 on the weights.
``bugs=True`` plants the companion exercise's two bugs (dW2 doubled, db1 with 4/m).
"""

from __future__ import annotations

import itertools

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]
Params = dict[str, Array]
WEIGHTS = ("W1", "W2", "W3")


def exercise_setup() -> tuple[Array, Array, Params]:
    """X, Y and parameters drawn exactly as the exercise does (np.random.seed(1))."""
    np.random.seed(1)
    x = np.random.randn(4, 3)
    y = np.array([1, 1, 0])
    params = {
        "W1": np.random.randn(5, 4),
        "b1": np.random.randn(5, 1),
        "W2": np.random.randn(3, 5),
        "b2": np.random.randn(3, 1),
        "W3": np.random.randn(1, 3),
        "b3": np.random.randn(1, 1),
    }
    return x, y, params


def init_params(layer_sizes: list[int], rng: np.random.Generator) -> Params:
    """He-initialized parameters for layer sizes [n_x, n_1, ..., 1]."""
    params: Params = {}
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(layer_sizes), 1):
        params[f"W{layer}"] = rng.standard_normal((fan_out, fan_in)) * np.sqrt(2.0 / fan_in)
        params[f"b{layer}"] = 0.1 * rng.standard_normal((fan_out, 1))
    return params


def cost(params: Params, x: Array, y: Array, lambd: float = 0.0) -> float:
    """Cross-entropy averaged over the m examples (+ the L2 penalty when lambd > 0)."""
    return forward(params, x, y, lambd)[0]


def forward(
    params: Params, x: Array, y: Array, lambd: float = 0.0
) -> tuple[float, tuple[Array, ...]]:
    m = x.shape[1]
    z1 = params["W1"] @ x + params["b1"]
    a1 = np.maximum(0, z1)
    z2 = params["W2"] @ a1 + params["b2"]
    a2 = np.maximum(0, z2)
    z3 = params["W3"] @ a2 + params["b3"]
    a3 = 1 / (1 + np.exp(-z3))
    log_probs = np.multiply(-np.log(a3), y) + np.multiply(-np.log(1 - a3), 1 - y)
    loss = 1.0 / m * np.sum(log_probs)
    if lambd:
        loss += lambd / (2 * m) * sum(np.sum(np.square(params[w])) for w in WEIGHTS)
    return float(loss), (z1, a1, z2, a2, a3)


def backward(params: Params, x: Array, y: Array, lambd: float = 0.0, bugs: bool = False) -> Params:
    """Hand-written gradients of ``cost``; ``bugs`` plants the exercise's two bugs."""
    m = x.shape[1]
    _, (_z1, a1, _z2, a2, a3) = forward(params, x, y)
    dz3 = a3 - y
    dw3 = 1.0 / m * dz3 @ a2.T
    db3 = 1.0 / m * np.sum(dz3, axis=1, keepdims=True)
    da2 = params["W3"].T @ dz3
    dz2 = da2 * (a2 > 0)
    dw2 = 1.0 / m * dz2 @ a1.T * (2 if bugs else 1)
    db2 = 1.0 / m * np.sum(dz2, axis=1, keepdims=True)
    da1 = params["W2"].T @ dz2
    dz1 = da1 * (a1 > 0)
    dw1 = 1.0 / m * dz1 @ x.T
    db1 = (4.0 if bugs else 1.0) / m * np.sum(dz1, axis=1, keepdims=True)
    grads = {"W1": dw1, "b1": db1, "W2": dw2, "b2": db2, "W3": dw3, "b3": db3}
    if lambd:
        for w in WEIGHTS:
            grads[w] = grads[w] + lambd / m * params[w]
    return grads
