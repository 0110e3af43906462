"""Miss rate of the ``sample="auto"`` screen: how often an error goes unseen.

    OMP_NUM_THREADS=1 python -m benchmarks.screen_miss_rate --trials 20000

Each trial draws a random layout of theta (2 to 40 tensors, sizes log-uniform from 1
(a 0-d scalar) to 5,000 entries, above ``AUTO_FULL_MAX_SIZE`` in total, per-tensor
gradient scales log-uniform over 1e-2..1e2) for the separable objective
J = sum_t sum_j c_tj sin(theta_tj), plants an error of relative size r in one or two
tensors (relative to max(||g_t||, NEAR_ZERO_FLOOR ||g||): a tensor whose gradient is
about 0 is judged against the whole gradient's scale, docs/design.md#near-zero), and runs
``gradwatch.check(..., sample="auto")`` with a fresh seed. A miss is a check whose
status is ``"ok"``. Placements of the error (``e_t``: the error of
tensor t's gradient g_t, ``||e_t|| = r ||g_t||``):

- ``scaled``: e_t = r g_t, a gradient off by a factor (the blind spot of issue 12 when
  two tensors err with the same sign);
- ``entry``: the whole error in one entry of the tensor;
- ``spread``: a random direction;
- ``two-scaled``: ``scaled`` in two tensors at once, same sign;
- ``two-scalars``: the issue's repro: two 0-d tensors 10% too large (r = 0.1) next to
  a 2,500-entry tensor (a fixed layout, only the seed varies).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

import gradwatch
from gradwatch.check import AUTO_FULL_MAX_SIZE, NEAR_ZERO_FLOOR

PLACEMENTS = ("scaled", "entry", "spread", "two-scaled", "two-scalars")

Problem = tuple[dict[str, np.ndarray], Callable[[], float], dict[str, np.ndarray]]


def layout(rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Random tensor shapes, at least one 0-d, more than 2,000 entries in all."""
    count = int(rng.integers(2, 41))
    shapes: list[tuple[int, ...]] = [()]
    for _ in range(count - 1):
        size = int(np.exp(rng.uniform(0, np.log(5000))))
        shapes.append(() if size == 1 else (size,))
    if sum(int(np.prod(s)) for s in shapes) <= AUTO_FULL_MAX_SIZE:
        shapes.append((2500,))
    return shapes


def problem(rng: np.random.Generator, shapes: list[tuple[int, ...]]) -> Problem:
    """J = sum c sin(theta) over the tensors, and its true gradient."""
    params = {f"t{k}": np.asarray(rng.standard_normal(shape)) for k, shape in enumerate(shapes)}
    weights = {
        name: 10 ** rng.uniform(-2, 2) * rng.standard_normal(p.shape) for name, p in params.items()
    }

    def loss() -> float:
        return float(sum(np.sum(weights[n] * np.sin(p)) for n, p in params.items()))

    grads = {name: np.asarray(weights[name] * np.cos(p)) for name, p in params.items()}
    return params, loss, grads


def plant(
    rng: np.random.Generator, grads: dict[str, np.ndarray], placement: str, r: float
) -> list[str]:
    """Add an error of relative size ``r`` to one or two tensors; returns their names."""
    names = list(grads)
    # Relative to the tensor's gradient, floored like every per-tensor verdict
    # (docs/design.md#near-zero): an error far below the whole gradient's scale is noise.
    whole = float(np.sqrt(sum(np.sum(g * g) for g in grads.values())))
    count = 2 if placement.startswith("two") else 1
    chosen = [names[k] for k in rng.choice(len(names), size=count, replace=False)]
    for name in chosen:
        g = grads[name]
        norm = max(float(np.linalg.norm(g)), NEAR_ZERO_FLOOR * whole)
        if placement in ("scaled", "two-scaled", "two-scalars"):
            error = r * g * norm / max(float(np.linalg.norm(g)), 1e-300)
        elif placement == "entry":
            error = np.zeros(g.shape)
            error.reshape(-1)[int(rng.integers(g.size))] = r * norm
        else:
            error = rng.standard_normal(g.shape)
            error *= r * norm / max(float(np.linalg.norm(error)), 1e-300)
        grads[name] = np.asarray(g + error)
    return chosen


def trial(seed: int, placement: str, r: float) -> bool:
    """True when the check misses the planted error (status ``"ok"``)."""
    rng = np.random.default_rng([seed, PLACEMENTS.index(placement)])
    if placement == "two-scalars":
        shapes: list[tuple[int, ...]] = [(), (2500,), ()]
        params, loss, grads = problem(rng, shapes)
        for name in ("t0", "t2"):
            grads[name] = np.asarray((1 + r) * grads[name])
    else:
        params, loss, grads = problem(rng, layout(rng))
        plant(rng, grads, placement, r)
    result = gradwatch.check(loss, params, grads, sample="auto", seed=seed, diagnose=False)
    return result.status == "ok"


def miss_rate(placement: str, r: float, trials: int, first_seed: int = 0) -> tuple[int, int]:
    """(misses, trials)."""
    misses = sum(trial(seed, placement, r) for seed in range(first_seed, first_seed + trials))
    return misses, trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--r", type=float, default=1e-2)
    args = parser.parse_args()
    for placement in PLACEMENTS:
        r = 0.1 if placement == "two-scalars" else args.r
        started = time.perf_counter()
        misses, trials = miss_rate(placement, r, args.trials)
        seconds = time.perf_counter() - started
        print(
            f"{placement:12s} r={r:g}: {misses}/{trials} missed "
            f"(rate {misses / trials:.2e}; 95% upper bound {max(misses, 3) / trials:.1e}*) "
            f"{seconds:.0f} s"
        )
    print("* with 0 misses the 95% upper bound is 3/trials (rule of three)")


if __name__ == "__main__":
    main()
