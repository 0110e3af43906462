"""Check time against n (full checks) and against k (sampled checks of a fixed model).

    python -m benchmarks.check_scaling [--repeats 1] [--threads 1] [--clock cpu]

The tanh MLPs of `benchmarks.torch_speed` (16 examples, float64 shadow), both the
sequential and the batched (default) path of ``check_module``:

* full checks for n = 1k, 2k, 5k, 10k, 20k, 50k: seconds, seconds/n, and
  seconds / (2n x one evaluation). A full check is 2n evaluations of J, and one
  evaluation itself grows with n (a forward over more weights), so seconds grow
  faster than n; what must be linear is the number of evaluations: the fitted
  log-log slope of seconds / (one evaluation) against n should be close to 1.
* sampled checks of the 50k model for k = 100 ... 5000: one evaluation costs the
  same for every k, so seconds themselves should grow like k (slope close to 1;
  a little below at small k, where the fixed part shows: the shadow copy, the
  autograd pass, two evaluations of J(theta) and the diagnosis of the worst 10).
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from gradwatch.integrations.torch import check_module

from benchmarks import torch_speed
from benchmarks.torch_speed import (
    HIDDEN,
    cross_entropy,
    floor_seconds,
    make_batch,
    mlp,
    parameter_count,
    timed,
)

FULL_SIZES = ("1k", "2k", "5k", "10k", "20k", "50k")
SAMPLED_MODEL = "50k"
SAMPLED_COUNTS = (100, 200, 500, 1000, 2000, 5000)
EVALUATION_CALLS = 2000
"""Calls timed to know one evaluation's cost at each size."""


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    covariance = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
    return covariance / sum((a - mx) ** 2 for a in lx)


def affine_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope of y = a + b x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - slope * mx, slope


def full_sweep(repeats: int) -> None:
    print("full checks: n, seconds, seconds/n, seconds/(2n x one evaluation)")
    ns: list[float] = []
    per_path: dict[bool, list[float]] = {False: [], True: []}
    evaluation_costs: list[float] = []
    for label in FULL_SIZES:
        model, batch = mlp(HIDDEN[label]), make_batch()
        n = parameter_count(model)
        check_module(model, cross_entropy, batch, sample=min(n, 200))  # warm up
        seconds: dict[bool, list[float]] = {False: [], True: []}
        evaluations = []
        for _ in range(repeats):
            evaluations.append(floor_seconds(model, batch, EVALUATION_CALLS) / EVALUATION_CALLS)
            for batched in (False, True):
                elapsed, result = timed(check_module, model, cross_entropy, batch, batched=batched)
                assert result.status == "ok" and result.checked == n
                seconds[batched].append(elapsed)
            evaluations.append(floor_seconds(model, batch, EVALUATION_CALLS) / EVALUATION_CALLS)
        evaluation = statistics.median(evaluations)
        ns.append(n)
        evaluation_costs.append(evaluation)
        cells = []
        for batched in (False, True):
            median = statistics.median(seconds[batched])
            per_path[batched].append(median)
            name = "batched" if batched else "sequential"
            cells.append(
                f"{name} {median:7.2f} s  {median / n * 1e6:6.1f} us/n  "
                f"{median / (2 * n * evaluation):5.2f} x floor"
            )
        print(f"  n={n:6d}  eval={evaluation * 1e6:6.1f} us  " + "   ".join(cells), flush=True)
    for batched in (False, True):
        name = "batched" if batched else "sequential"
        raw = loglog_slope(ns, per_path[batched])
        in_evaluations = loglog_slope(
            ns, [s / e for s, e in zip(per_path[batched], evaluation_costs, strict=True)]
        )
        print(
            f"  {name}: log-log slope of seconds vs n = {raw:.2f}; "
            f"of seconds/(one evaluation) vs n = {in_evaluations:.2f}"
        )
    print(f"  (one evaluation itself: slope {loglog_slope(ns, evaluation_costs):.2f} vs n)")


def sampled_sweep(repeats: int) -> None:
    model, batch = mlp(HIDDEN[SAMPLED_MODEL]), make_batch()
    n = parameter_count(model)
    print(f"\nsampled checks of the n={n} model: k, seconds, seconds/k")
    check_module(model, cross_entropy, batch, sample=200)  # warm up
    per_path: dict[bool, list[float]] = {False: [], True: []}
    for k in SAMPLED_COUNTS:
        cells = []
        for batched in (False, True):
            times = []
            for _ in range(repeats):
                elapsed, result = timed(
                    check_module, model, cross_entropy, batch, sample=k, batched=batched
                )
                assert result.status == "ok" and result.checked == k
                times.append(elapsed)
            median = statistics.median(times)
            per_path[batched].append(median)
            name = "batched" if batched else "sequential"
            cells.append(f"{name} {median:6.2f} s  {median / k * 1e3:6.2f} ms/k")
        print(f"  k={k:5d}  " + "   ".join(cells), flush=True)
    for batched in (False, True):
        name = "batched" if batched else "sequential"
        ks = [float(k) for k in SAMPLED_COUNTS]
        slope = loglog_slope(ks, per_path[batched])
        large = [i for i, k in enumerate(SAMPLED_COUNTS) if k >= 500]
        slope_large = loglog_slope([ks[i] for i in large], [per_path[batched][i] for i in large])
        fixed, per_component = affine_fit(ks, per_path[batched])
        print(
            f"  {name}: log-log slope of seconds vs k = {slope:.2f} (k >= 500: "
            f"{slope_large:.2f}); affine fit {fixed:.3f} s + {per_component * 1e3:.3f} ms x k"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per point; medians shown")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="what is timed")
    args = parser.parse_args()
    torch_speed.configure(args.threads, args.clock)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} time")
    full_sweep(args.repeats)
    sampled_sweep(args.repeats)


if __name__ == "__main__":
    main()
