"""Train the lecture's network in numpy with GradWatch checking the hand-written backward.

LINEAR -> RELU -> LINEAR -> RELU -> LINEAR -> SIGMOID on synthetic data, cross-entropy
plus an L2 penalty lambd/(2m) * sum ||W||^2 on the weights. The backward pass adds the
penalty's gradient; the cost closure returns the data loss only, so the check is told
about the penalty with ``gradwatch.L2(..., tensors=["W1", "W2", "W3"])``.

``--bug`` plants a bug that only matters once training has moved the weights: the backward
applies the L2 gradient to the bias b2 as well, although the penalty covers weights only.
Biases start at zero, so the first check passes; the error grows as b2 moves and a later
check raises an alert naming b2.

    python examples/numpy_mlp.py --bug
    gradwatch show runs/numpy_mlp/gradwatch
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import structlog

import gradwatch

Array = npt.NDArray[np.float64]


class TrainingCallback(Protocol):
    """What the trainer calls: after backward, before the update; and at the end."""

    def after_backward(
        self,
        step: int,
        *,
        loss: Callable[[], float],
        params: dict[str, Array],
        grads: dict[str, Array],
        regularization: Iterable[Any] = (),
    ) -> object: ...

    def close(self) -> None: ...


class NumpyMLP:
    """A tiny full-batch trainer for a ReLU network with a sigmoid output and L2 penalty."""

    def __init__(
        self,
        layer_sizes: list[int],
        *,
        learning_rate: float = 0.3,
        lambd: float = 0.7,
        seed: int = 0,
        bug: bool = False,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.layers = len(layer_sizes) - 1
        self.params: dict[str, Array] = {}
        for layer in range(1, self.layers + 1):
            fan_in, fan_out = layer_sizes[layer - 1], layer_sizes[layer]
            self.params[f"W{layer}"] = rng.standard_normal((fan_out, fan_in)) * np.sqrt(2 / fan_in)
            self.params[f"b{layer}"] = np.zeros((fan_out, 1))
        self.learning_rate = learning_rate
        self.lambd = lambd
        self.bug = bug
        self.callbacks: list[TrainingCallback] = []

    def add_callback(self, callback: TrainingCallback) -> None:
        """Register a callback (e.g. ``gradwatch.GradWatch``)."""
        self.callbacks.append(callback)

    def forward(self, x: Array) -> tuple[Array, list[tuple[Array, Array]]]:
        """Output probabilities and each layer's (input, pre-activation)."""
        caches = []
        activation = x
        for layer in range(1, self.layers + 1):
            z = self.params[f"W{layer}"] @ activation + self.params[f"b{layer}"]
            caches.append((activation, z))
            activation = 1 / (1 + np.exp(-z)) if layer == self.layers else np.maximum(z, 0)
        return activation, caches

    def data_cost(self, x: Array, y: Array) -> float:
        """Cross-entropy averaged over the m examples (no penalty: GradWatch adds L2)."""
        output, _ = self.forward(x)
        output = np.clip(output, 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(output) + (1 - y) * np.log(1 - output)))

    def penalty(self, m: int) -> float:
        """lambd / (2m) * sum ||W||^2 over the weights."""
        weights = sum(float(np.sum(self.params[f"W{k}"] ** 2)) for k in range(1, self.layers + 1))
        return self.lambd / (2 * m) * weights

    def backward(self, x: Array, y: Array) -> dict[str, Array]:
        """Gradient of data cost + L2 penalty, keyed like ``params``."""
        m = x.shape[1]
        output, caches = self.forward(x)
        grads: dict[str, Array] = {}
        dz = (output - y) / m  # sigmoid + cross-entropy
        for layer in range(self.layers, 0, -1):
            activation = caches[layer - 1][0]
            weight = self.params[f"W{layer}"]
            grads[f"W{layer}"] = dz @ activation.T + self.lambd / m * weight
            grads[f"b{layer}"] = np.sum(dz, axis=1, keepdims=True)
            if self.bug and layer == 2:
                # Planted bug: the L2 gradient applied to a bias the penalty does not cover.
                grads["b2"] = grads["b2"] + self.lambd / m * self.params["b2"]
            if layer > 1:
                previous_z = caches[layer - 2][1]
                dz = (weight.T @ dz) * (previous_z > 0)
        return {name: grads[name] for name in self.params}

    def fit(self, x: Array, y: Array, steps: int) -> None:
        """Full-batch gradient descent; callbacks see each step after backward."""
        m = x.shape[1]
        l2 = gradwatch.L2(self.lambd, m=m, tensors=[f"W{k}" for k in range(1, self.layers + 1)])
        try:
            for step in range(steps):
                grads = self.backward(x, y)
                for callback in self.callbacks:
                    callback.after_backward(
                        step,
                        loss=lambda: self.data_cost(x, y),
                        params=self.params,
                        grads=grads,
                        regularization=[l2],
                    )
                for name, grad in grads.items():
                    self.params[name] -= self.learning_rate * grad
                if step % 100 == 0 or step == steps - 1:
                    cost = self.data_cost(x, y) + self.penalty(m)
                    accuracy = float(np.mean((self.forward(x)[0] > 0.5) == y))
                    print(f"step {step:4d}  cost {cost:.4f}  accuracy {accuracy:.3f}")
        finally:
            for callback in self.callbacks:
                callback.close()


def synthetic_data(m: int, seed: int = 1) -> tuple[Array, Array]:
    """Five features, a nonlinear binary label (two interleaved half-rings, lifted)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, m))
    y = ((x[0] * x[1] + np.sin(2 * x[2]) - 0.5 * x[3] ** 2 + 0.3) > 0).astype(np.float64)
    return x, y.reshape(1, m)


def configure_logging() -> None:
    """Terse console output for this script; the gradwatch library itself configures nothing.

    One short line per check at INFO, the alert at ERROR instead of the failing check's
    own line; every field stays in the report (``gradwatch show --json``).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    structlog.configure(
        processors=[structlog.stdlib.add_log_level, _one_line_per_check],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
    )


def _one_line_per_check(logger: object, method: str, event: dict[str, Any]) -> str:
    """``gradwatch step 50: fail, ratio 2.35e-03, tensor b2`` (a failing check's alert only)."""
    name, step = event.get("event"), event.get("step")
    if name == "gradient_check" and event.get("status") == "fail":
        raise structlog.DropEvent  # the alert that follows says it, with the tensor
    if name == "gradient_check":
        return f"gradwatch step {step}: {event.get('status')}, ratio {event.get('ratio'):.2e}"
    if name == "gradient_alert":
        return (
            f"gradwatch step {step}: ALERT, ratio {event.get('ratio'):.2e}, "
            f"tensor {event.get('tensor')} ({event.get('tensor_ratio'):.2e})"
        )
    return f"gradwatch {event.get('level', method)}: {name} {event.get('detail', '')}".rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bug", action="store_true", help="plant the L2-on-b2 bug")
    parser.add_argument("--steps", type=int, default=600, help="gradient descent steps")
    parser.add_argument("--every", type=int, default=50, help="check every N steps")
    parser.add_argument("--report-dir", default="runs/numpy_mlp/gradwatch")
    arguments = parser.parse_args(argv)
    configure_logging()

    x, y = synthetic_data(m=256)
    model = NumpyMLP([5, 16, 8, 1], bug=arguments.bug)
    watch = gradwatch.GradWatch(every=arguments.every, report_dir=arguments.report_dir)
    watch.set_context(example="examples/numpy_mlp.py", planted_bug=arguments.bug)
    model.add_callback(watch)
    model.fit(x, y, steps=arguments.steps)

    if watch.alerts:
        first = watch.alerts[0]
        print(f"\n{len(watch.alerts)} alerts, the first at step {first.step}: {first.message}")
    else:
        print(f"\nno alerts in {len(watch.results)} checks")
    print(f"inspect the report: gradwatch show {arguments.report_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
