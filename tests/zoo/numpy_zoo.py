"""Hand-written numpy backprop: planted bugs and correct models.

Column convention of the lecture: ``W`` is (fan_out, fan_in), ``b`` is (fan_out, 1),
``x`` is (features, m). Every model is a ``build(bug)`` factory returning a fresh
`NumpyProblem`; ``bug=False`` is the correct twin.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from gradwatch.regularization import L2
from tests.zoo.registry import Array, Hook, NumpyProblem, Params, Training, ZooEntry


def _sigmoid(z: Array) -> Array:
    return 1.0 / (1.0 + np.exp(-z))


def _binary_cross_entropy(output: Array, y: Array) -> float:
    m = y.shape[1]
    return float(-np.sum(y * np.log(output) + (1 - y) * np.log1p(-output)) / m)


def _init(sizes: list[int], rng: np.random.Generator, dtype: type = np.float64) -> Params:
    params: Params = {}
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes), 1):
        weight = rng.standard_normal((fan_out, fan_in)) * np.sqrt(2.0 / fan_in)
        params[f"W{layer}"] = weight.astype(dtype)
        params[f"b{layer}"] = (0.1 * rng.standard_normal((fan_out, 1))).astype(dtype)
    return params


# --------------------------------------------------------------------------- ReLU MLP


def mlp(
    bug: str | None,
    *,
    sizes: tuple[int, ...] = (8, 16, 16, 1),
    m: int = 16,
    lambd: float = 0.7,
    dtype: type = np.float64,
    seed: int = 0,
) -> NumpyProblem:
    """LINEAR -> RELU -> ... -> SIGMOID with cross-entropy and L2 on the weights.

    ``bug`` names the planted bug (see ``MLP_BUGS``); None is the correct model.
    """
    rng = np.random.default_rng(seed)
    params = _init(list(sizes), rng, dtype)
    x: Array = rng.standard_normal((sizes[0], m)).astype(dtype)
    y: Array = (rng.random((1, m)) > 0.5).astype(dtype)
    layers = len(sizes) - 1
    weights = [f"W{layer}" for layer in range(1, layers + 1)]

    def forward(p: Params) -> tuple[Array, list[tuple[Array, Array]]]:
        activation: Array = x
        caches: list[tuple[Array, Array]] = []
        for layer in range(1, layers + 1):
            z = p[f"W{layer}"] @ activation + p[f"b{layer}"]
            caches.append((activation, z))
            activation = _sigmoid(z) if layer == layers else np.maximum(z, 0)
        return activation, caches

    def cost(p: Params) -> float:
        return _binary_cross_entropy(forward(p)[0], y)

    def backward(p: Params) -> Params:
        output, caches = forward(p)
        grads: Params = {}
        dz = output - y
        for layer in range(layers, 0, -1):
            a_prev, z = caches[layer - 1]
            weight = p[f"W{layer}"]
            d_weight = dz @ a_prev.T / m
            d_bias = np.sum(dz, axis=1, keepdims=True) / m
            if bug == "missing_m" and layer == 1:
                d_weight = dz @ a_prev.T  # forgot the 1/m
            if bug == "transposed" and layer == 2:
                d_weight = a_prev @ dz.T / m  # (fan_in, fan_out): square, so it fits
            if bug == "bias_axis" and layer == 1:
                d_bias = np.sum(dz, axis=0, keepdims=True).T / m  # summed over units
            if bug == "sign" and layer == 2:
                d_bias = -d_bias
            if bug == "row0" and layer == 1:
                d_weight[0] = 0.0  # off-by-one loop over output units skips row 0
            penalty = lambd / m * weight
            if bug == "missing_l2":
                penalty = np.zeros_like(weight)
            if bug == "half_l2":
                penalty = lambd / (2 * m) * weight
            grads[f"W{layer}"] = d_weight + penalty
            grads[f"b{layer}"] = d_bias
            if layer > 1:
                mask = caches[layer - 2][1] > 0
                if bug == "relu_mask" and layer == 2:
                    mask = z > 0  # the mask of this layer's pre-activation, one layer too low
                dz = (weight.T @ dz) * mask
        return {name: grads[name] for name in p}

    return NumpyProblem(cost, backward, params, (L2(lambd, m, tensors=weights),))


def _mlp_entry(bug: str | None, planted: bool, **options: object) -> NumpyProblem:
    return mlp(bug if planted else None, **options)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- softmax / LSE


def softmax_mse(bug: bool, *, seed: int = 1) -> NumpyProblem:
    """tanh hidden layer, softmax output, squared error to a one-hot target.

    The softmax backward is the Jacobian-vector product ``p * (g - sum(p * g))``; the
    bug drops ``p`` from the sum.
    """
    rng = np.random.default_rng(seed)
    features, hidden, classes, m = 6, 12, 5, 16
    params: Params = {
        "W1": rng.standard_normal((hidden, features)) * 0.5,
        "b1": 0.1 * rng.standard_normal((hidden, 1)),
        "W2": rng.standard_normal((classes, hidden)) * 0.5,
        "b2": 0.1 * rng.standard_normal((classes, 1)),
    }
    x = rng.standard_normal((features, m))
    target = np.eye(classes)[:, rng.integers(0, classes, m)]

    def forward(p: Params) -> tuple[Array, Array]:
        hidden_out = np.tanh(p["W1"] @ x + p["b1"])
        logits = p["W2"] @ hidden_out + p["b2"]
        shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
        return hidden_out, shifted / shifted.sum(axis=0, keepdims=True)

    def cost(p: Params) -> float:
        return float(0.5 * np.sum((forward(p)[1] - target) ** 2) / m)

    def backward(p: Params) -> Params:
        hidden_out, probs = forward(p)
        upstream = (probs - target) / m
        if bug:
            d_logits = probs * (upstream - upstream.sum(axis=0, keepdims=True))
        else:
            d_logits = probs * (upstream - (probs * upstream).sum(axis=0, keepdims=True))
        d_hidden = (p["W2"].T @ d_logits) * (1 - hidden_out**2)
        return {
            "W1": d_hidden @ x.T,
            "b1": d_hidden.sum(axis=1, keepdims=True),
            "W2": d_logits @ hidden_out.T,
            "b2": d_logits.sum(axis=1, keepdims=True),
        }

    return NumpyProblem(cost, backward, params)


def logsumexp_cross_entropy(bug: bool, *, seed: int = 2) -> NumpyProblem:
    """ReLU net, cross-entropy written as logsumexp(z) - z_y.

    The backward's stable softmax subtracts the max in the numerator only:
    ``exp(z - max) / sum(exp(z))``, off by a factor exp(-max) per example.
    """
    rng = np.random.default_rng(seed)
    features, hidden, classes, m = 6, 10, 4, 16
    params: Params = {
        "W1": rng.standard_normal((hidden, features)) * 0.6,
        "b1": 0.1 * rng.standard_normal((hidden, 1)),
        "W2": rng.standard_normal((classes, hidden)) * 0.6,
        "b2": 0.5 + 0.1 * rng.standard_normal((classes, 1)),
    }
    x = rng.standard_normal((features, m))
    labels = rng.integers(0, classes, m)
    onehot = np.eye(classes)[:, labels]

    def forward(p: Params) -> tuple[Array, Array, Array]:
        z1 = p["W1"] @ x + p["b1"]
        hidden_out = np.maximum(z1, 0)
        return z1, hidden_out, p["W2"] @ hidden_out + p["b2"]

    def cost(p: Params) -> float:
        logits = forward(p)[2]
        top = logits.max(axis=0)
        lse = top + np.log(np.exp(logits - top).sum(axis=0))
        return float(np.mean(lse - logits[labels, np.arange(m)]))

    def backward(p: Params) -> Params:
        z1, hidden_out, logits = forward(p)
        shifted = np.exp(logits - logits.max(axis=0, keepdims=True))
        denominator = np.exp(logits).sum(axis=0) if bug else shifted.sum(axis=0)
        d_logits = (shifted / denominator - onehot) / m
        d_hidden = (p["W2"].T @ d_logits) * (z1 > 0)
        return {
            "W1": d_hidden @ x.T,
            "b1": d_hidden.sum(axis=1, keepdims=True),
            "W2": d_logits @ hidden_out.T,
            "b2": d_logits.sum(axis=1, keepdims=True),
        }

    return NumpyProblem(cost, backward, params)


# --------------------------------------------------------------------------- layer norm


def layer_norm_net(bug: bool, *, seed: int = 3) -> NumpyProblem:
    """LINEAR -> LAYERNORM (over units) -> TANH -> LINEAR -> SIGMOID, cross-entropy.

    The layer-norm input gradient is
    ``inv_std / N * (N * dxhat - sum(dxhat) - xhat * sum(dxhat * xhat))``; the bug drops
    the last term (the variance's dependence on the input).
    """
    rng = np.random.default_rng(seed)
    features, units, m, tiny = 6, 16, 12, 1e-5
    params: Params = {
        "W1": rng.standard_normal((units, features)) * 0.5,
        "b1": 0.3 * rng.standard_normal((units, 1)),
        "gamma": 1 + 0.2 * rng.standard_normal((units, 1)),
        "beta": 0.1 * rng.standard_normal((units, 1)),
        "W2": rng.standard_normal((1, units)) * 0.5,
        "b2": np.zeros((1, 1)),
    }
    x = rng.standard_normal((features, m))
    y = (rng.random((1, m)) > 0.5).astype(np.float64)

    def forward(p: Params) -> tuple[Array, Array, Array, Array]:
        h = p["W1"] @ x + p["b1"]
        centered = h - h.mean(axis=0, keepdims=True)
        inv_std = 1.0 / np.sqrt((centered**2).mean(axis=0, keepdims=True) + tiny)
        xhat = centered * inv_std
        activation = np.tanh(p["gamma"] * xhat + p["beta"])
        return xhat, inv_std, activation, _sigmoid(p["W2"] @ activation + p["b2"])

    def cost(p: Params) -> float:
        return _binary_cross_entropy(forward(p)[3], y)

    def backward(p: Params) -> Params:
        xhat, inv_std, activation, output = forward(p)
        dz2 = (output - y) / m
        d_pre = (p["W2"].T @ dz2) * (1 - activation**2)
        d_xhat = d_pre * p["gamma"]
        total = d_xhat.sum(axis=0, keepdims=True)
        projection = (d_xhat * xhat).sum(axis=0, keepdims=True)
        correction = 0.0 if bug else xhat * projection
        dh = inv_std / units * (units * d_xhat - total - correction)
        return {
            "W1": dh @ x.T,
            "b1": dh.sum(axis=1, keepdims=True),
            "gamma": (d_pre * xhat).sum(axis=1, keepdims=True),
            "beta": d_pre.sum(axis=1, keepdims=True),
            "W2": dz2 @ activation.T,
            "b2": dz2.sum(axis=1, keepdims=True),
        }

    return NumpyProblem(cost, backward, params)


# --------------------------------------------------------------------------- embedding


def embedding_bag(bug: bool, *, seed: int = 4) -> NumpyProblem:
    """Mean of token embeddings -> LINEAR -> SIGMOID; tokens repeat within the batch.

    The embedding gradient must accumulate over repeated indices (``np.add.at``); the
    bug writes ``dE[idx] += ...``, a buffered fancy assignment that counts each row once.
    """
    rng = np.random.default_rng(seed)
    vocab, dim, m, length = 20, 8, 16, 4
    params: Params = {
        "E": rng.standard_normal((vocab, dim)) * 0.5,
        "w": rng.standard_normal((dim, 1)) * 0.5,
        "c": np.zeros((1, 1)),
    }
    tokens = rng.integers(0, vocab, (m, length))
    y = (rng.random((m, 1)) > 0.5).astype(np.float64)

    def forward(p: Params) -> tuple[Array, Array]:
        pooled = p["E"][tokens].mean(axis=1)
        return pooled, _sigmoid(pooled @ p["w"] + p["c"])

    def cost(p: Params) -> float:
        return _binary_cross_entropy(forward(p)[1].T, y.T)

    def backward(p: Params) -> Params:
        pooled, output = forward(p)
        dz = (output - y) / m
        d_pooled = dz @ p["w"].T
        d_embedding = np.zeros_like(p["E"])
        per_token = np.repeat(d_pooled[:, None, :] / length, length, axis=1)
        if bug:
            d_embedding[tokens] += per_token  # buffered: a repeated row is written once
        else:
            np.add.at(d_embedding, tokens, per_token)
        return {"E": d_embedding, "w": pooled.T @ dz, "c": dz.sum(axis=0, keepdims=True)}

    return NumpyProblem(cost, backward, params)


# --------------------------------------------------------------------------- a late bug


def tanh_training(bug: bool, *, steps: int = 120, every: int = 20, seed: int = 5) -> Training:
    """A tanh net trained from a small init; the backward uses max(0, 1 - z^2) for tanh'(z).

    ``1 - z**2`` (z the pre-activation) agrees with ``1 - tanh(z)**2`` to O(z^4): at a
    small init the check passes; once training has grown the weights it does not.
    """

    def run(hook: Hook) -> None:
        rng = np.random.default_rng(seed)
        features, hidden, m = 4, 24, 64
        params: Params = {
            "W1": 0.02 * rng.standard_normal((hidden, features)),
            "b1": np.zeros((hidden, 1)),
            "W2": 0.02 * rng.standard_normal((1, hidden)),
            "b2": np.zeros((1, 1)),
        }
        x = rng.standard_normal((features, m))
        y = ((x[0] * x[1] + 0.5 * x[2]) > 0).astype(np.float64)[None, :]

        def forward(p: Params) -> tuple[Array, Array, Array]:
            z1 = p["W1"] @ x + p["b1"]
            hidden_out = np.tanh(z1)
            return z1, hidden_out, _sigmoid(p["W2"] @ hidden_out + p["b2"])

        def cost(p: Params) -> float:
            return _binary_cross_entropy(forward(p)[2], y)

        def backward(p: Params) -> Params:
            z1, hidden_out, output = forward(p)
            dz2 = (output - y) / m
            slope = np.maximum(1 - z1**2, 0.0) if bug else 1 - hidden_out**2
            dz1 = (p["W2"].T @ dz2) * slope
            return {
                "W1": dz1 @ x.T,
                "b1": dz1.sum(axis=1, keepdims=True),
                "W2": dz2 @ hidden_out.T,
                "b2": dz2.sum(axis=1, keepdims=True),
            }

        for step in range(steps):
            problem = NumpyProblem(cost, backward, params)
            hook(step, problem)
            for name, grad in problem.grads.items():
                params[name] -= 1.0 * grad

    return Training(framework="numpy", run=run, every=every, steps=steps)


# --------------------------------------------------------------------------- the entries

LARGE: dict[str, Any] = {"sizes": (64, 128, 128, 1), "m": 32}
"""About 25k parameters: above the 2000 of a full ``sample="auto"`` check."""


def _bug(name: str, description: str, build: Callable[[bool], object], *buggy: str) -> ZooEntry:
    return ZooEntry(
        name=name,
        kind="bug",
        framework="numpy",
        description=description,
        build=build,  # type: ignore[arg-type]
        buggy=buggy,
    )


def _correct(name: str, description: str, build: Callable[[bool], object]) -> ZooEntry:
    return ZooEntry(
        name=name,
        kind="correct",
        framework="numpy",
        description=description,
        build=build,  # type: ignore[arg-type]
    )


NUMPY_ENTRIES: list[ZooEntry] = [
    _bug("np_sign_db2", "wrong sign of db2", partial(_mlp_entry, "sign"), "b2"),
    _bug("np_missing_1_over_m", "dW1 without the 1/m", partial(_mlp_entry, "missing_m"), "W1"),
    _bug(
        "np_transposed_dW2",
        "dW2 transposed (square W2, so the shape fits)",
        partial(_mlp_entry, "transposed"),
        "W2",
    ),
    _bug(
        "np_bias_wrong_axis",
        "db1 summed over units instead of examples (m = units = 16)",
        partial(_mlp_entry, "bias_axis"),
        "b1",
    ),
    _bug(
        "np_relu_mask_wrong_tensor",
        "ReLU mask of layer 1 taken from layer 2's pre-activation",
        partial(_mlp_entry, "relu_mask"),
        "W1",
        "b1",
    ),
    _bug(
        "np_missing_l2_gradient",
        "L2 penalty in J, its gradient lambd/m*W missing from the backward",
        partial(_mlp_entry, "missing_l2"),
        "W1",
        "W2",
        "W3",
    ),
    _bug(
        "np_l2_half",
        "penalty gradient lambd/(2m)*W instead of lambd/m*W",
        partial(_mlp_entry, "half_l2"),
        "W1",
        "W2",
        "W3",
    ),
    _bug(
        "np_softmax_backward",
        "softmax JVP p*(g - sum(g)) instead of p*(g - sum(p*g))",
        softmax_mse,
        "W2",
        "b2",
        "W1",
        "b1",
    ),
    _bug(
        "np_logsumexp_backward",
        "stable softmax shifts the numerator only: exp(z-max)/sum(exp(z))",
        logsumexp_cross_entropy,
        "W2",
        "b2",
        "W1",
        "b1",
    ),
    _bug(
        "np_layernorm_missing_term",
        "layer-norm backward without the xhat*sum(dxhat*xhat) term",
        layer_norm_net,
        "W1",
        "b1",
    ),
    _bug(
        "np_embedding_repeated_indices",
        "dE[idx] += g: repeated token rows counted once",
        embedding_bag,
        "E",
    ),
    _bug(
        "np_large_row0_25k",
        "25k params: off-by-one loop leaves row 0 of dW1 at zero (64 of 24.9k entries)",
        partial(_mlp_entry, "row0", **LARGE),
        "W1",
    ),
    _bug(
        "np_late_tanh_slope",
        "tanh' written as max(0, 1 - z^2) (pre-activation): exact to O(z^4) at a small init; "
        "GradWatch(every=20) over 120 steps",
        tanh_training,
        "W1",
        "b1",
    ),
    _correct("np_mlp_l2", "lecture ReLU net with L2 on the weights", partial(_mlp_entry, None)),
    _correct(
        "np_mlp_float32",
        "the same net in float32 arrays (the check's step follows the dtype)",
        partial(_mlp_entry, None, dtype=np.float32),
    ),
    _correct(
        "np_large_25k",
        "25k-param ReLU net: sample='auto' detects per tensor by random directions",
        partial(_mlp_entry, None, **LARGE),
    ),
]
