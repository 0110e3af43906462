"""Full-check cost against its floor (2n loss evaluations) and against the textbook loop.

    python -m benchmarks.check_speed

The lecture's 3-layer network, widened to about 5k and 20k parameters, on 32
synthetic examples. Every ratio is measured side by side in one run:

* floor ratio = gradwatch full-check time / (2n x one loss evaluation), where
  2n loss evaluations are timed as a plain loop right before and right after the
  check and averaged (so a busy machine slows both sides alike).
* textbook ratio = textbook loop time / gradwatch time, where the textbook loop
  copies theta per component, rebuilds the parameter dict, then evaluates J
  (the companion exercise's ``gradient_check_n``).
"""

from __future__ import annotations

import os

# One BLAS thread: both sides of each ratio then run alike, and the other core absorbs
# whatever else the machine does. Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

import gradwatch
from examples.lecture_net import Params, backward, cost, init_params

SIZES = {"5k": [64, 64, 16, 1], "20k": [128, 128, 24, 1]}
EXAMPLES = 32


def time_loss_calls(loss: Callable[[], float], calls: int) -> float:
    """Seconds for ``calls`` evaluations of J in a plain loop: the floor of a full check."""
    started = time.perf_counter()
    for _ in range(calls):
        loss()
    return time.perf_counter() - started


def textbook_check(
    params: Params, grads: Params, x: np.ndarray, y: np.ndarray, eps: float
) -> float:
    """The exercise's loop: a fresh copy of theta per component, rebuilt into a dict."""
    names = list(params)
    shapes = [params[n].shape for n in names]
    theta = np.concatenate([params[n].reshape(-1) for n in names])
    grad = np.concatenate([grads[n].reshape(-1) for n in names])

    def to_dict(vector: np.ndarray) -> Params:
        out, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = int(np.prod(shape))
            out[name] = vector[start : start + size].reshape(shape)
            start += size
        return out

    approx = np.zeros_like(theta)
    for i in range(theta.size):
        plus = np.copy(theta)
        plus[i] += eps
        j_plus = cost(to_dict(plus), x, y)
        minus = np.copy(theta)
        minus[i] -= eps
        j_minus = cost(to_dict(minus), x, y)
        approx[i] = (j_plus - j_minus) / (2 * eps)
    return float(np.linalg.norm(approx - grad) / (np.linalg.norm(approx) + np.linalg.norm(grad)))


def measure(label: str, layers: list[int], repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    params = init_params(layers, rng)
    x = rng.standard_normal((layers[0], EXAMPLES))
    y = (rng.random((1, EXAMPLES)) > 0.5).astype(np.float64)
    grads = backward(params, x, y)
    n = sum(p.size for p in params.values())

    def loss() -> float:
        return cost(params, x, y)

    floor_ratios, textbook_ratios = [], []
    for _ in range(repeats):
        before = time_loss_calls(loss, 2 * n)
        started = time.perf_counter()
        result = gradwatch.check(loss, params, grads, eps=1e-7)
        check_seconds = time.perf_counter() - started
        after = time_loss_calls(loss, 2 * n)
        floor_ratios.append(check_seconds / ((before + after) / 2))

        started = time.perf_counter()
        textbook_ratio = textbook_check(params, grads, x, y, 1e-7)
        textbook_ratios.append((time.perf_counter() - started) / check_seconds)
        assert abs(textbook_ratio - result.ratio) <= 1e-6 * max(result.ratio, 1e-12) + 1e-15

    row = {
        "n": float(n),
        "loss_us": (before + after) / (4 * n) * 1e6,
        "check_s": check_seconds,
        "floor_ratio": statistics.median(floor_ratios),
        "textbook_ratio": statistics.median(textbook_ratios),
        "check_ratio": result.ratio,
    }
    print(
        f"{label:>4}  n={n:6d}  loss={row['loss_us']:7.1f} us  check={check_seconds:6.2f} s  "
        f"floor ratio={row['floor_ratio']:.3f}  textbook/gradwatch={row['textbook_ratio']:.2f}  "
        f"(ratio {result.ratio:.2e}, {result.loss_evals} evals)"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per size; medians are shown")
    args = parser.parse_args()
    for label, layers in SIZES.items():
        measure(label, layers, args.repeats)


if __name__ == "__main__":
    main()
