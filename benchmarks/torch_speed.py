"""check_module's cost against its floor (2n forwards), batched, and against a textbook loop.

    python -m benchmarks.torch_speed [--sizes 1k 5k 20k 50k] [--repeats 3] [--threads 1]

A tanh MLP (32 inputs, two hidden layers of width h, 4 classes) on 16 synthetic
examples, with h chosen for about 1k, 5k, 20k and 50k parameters. Every ratio is
measured side by side in one run, repeats interleaved, medians shown:

* floor = 2n evaluations of J on the same float64 shadow, the straightforward
  way: ``float(loss_fn(shadow, batch))`` in a loop under ``torch.no_grad``, timed
  right before and right after each check (so a busy machine slows both alike).
* sequential ratio = ``check_module(..., batched=False)`` (full check: shadow copy,
  autograd pass, 2n + 2 evaluations, diagnosis of the 10 worst) / floor. Target <= 1.10.
  The check evaluates J under ``torch.inference_mode`` (cheaper per op than no_grad),
  so the ratio against a floor loop under ``inference_mode`` is shown too: that one
  is what the check adds to the evaluations themselves.
* batched speedup = floor / ``check_module(...)`` (the default: vmapped chunks).
* textbook ratio = a textbook loop written with torch (a copy of the flat float64
  theta per component, rebuilt into a parameter dict, ``functional_call``, the
  loss) / gradwatch, for the sequential and the batched check.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from gradwatch.integrations.torch import check_module
from torch import nn

HIDDEN = {"1k": 18, "2k": 30, "5k": 55, "10k": 83, "20k": 124, "50k": 205}
"""Hidden width h for about that many parameters (n = h^2 + 38h + 4)."""
FEATURES, CLASSES, EXAMPLES = 32, 4, 16
TEXTBOOK_SIZES = ("5k", "20k")
TEXTBOOK_RUNS = 3
"""The textbook loop is timed in the first runs only (it is the slowest part)."""
MIN_EVALUATIONS = 100_000
"""Small models repeat until their checks add up to this many evaluations (steadier medians)."""
FLOOR_CALLS_MAX = 20_000
"""The floor is timed on up to this many calls per side and scaled to 2n."""

Batch = tuple[torch.Tensor, torch.Tensor]

CLOCK: Callable[[], float] = time.process_time
"""CPU seconds of this process (one torch thread): other jobs on a shared machine
inflate wall time by tens of percent, CPU time much less. ``--clock wall`` switches."""


def cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def mlp(hidden: int, seed: int = 0) -> nn.Sequential:
    """A float32 tanh MLP with two hidden layers of width ``hidden``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(FEATURES, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, CLASSES),
    )


def make_batch(seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(EXAMPLES, FEATURES, generator=generator)
    return x, torch.randint(0, CLASSES, (EXAMPLES,), generator=generator)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def float64_shadow(model: nn.Module, batch: Batch) -> tuple[nn.Module, Batch]:
    """What check_module evaluates: a float64 copy, and the batch cast to float64."""
    x, y = batch
    return copy.deepcopy(model).to(torch.float64), (x.to(torch.float64), y)


def floor_seconds(
    model: nn.Module, batch: Batch, evaluations: int, inference: bool = False
) -> float:
    """Seconds for ``evaluations`` plain forward+loss calls on a float64 copy, under no_grad
    (or ``torch.inference_mode`` with ``inference``).

    Timed on up to FLOOR_CALLS_MAX calls and scaled, so a 50k model's floor does not
    take as long as its check.
    """
    shadow, batch64 = float64_shadow(model, batch)
    calls = min(evaluations, FLOOR_CALLS_MAX)
    with torch.inference_mode() if inference else torch.no_grad():
        started = CLOCK()
        for _ in range(calls):
            float(cross_entropy(shadow, batch64))
        seconds = CLOCK() - started
    return seconds * evaluations / calls


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """Seconds (on CLOCK) of ``fn(*args, **kwargs)``, and its value."""
    started = CLOCK()
    value = fn(*args, **kwargs)
    return CLOCK() - started, value


def textbook_check(model: nn.Module, batch: Batch, eps: float = 1e-7) -> float:
    """The exercise's loop in torch: a copy of theta per component, rebuilt, functional_call."""
    shadow, batch64 = float64_shadow(model, batch)
    names = [name for name, _ in shadow.named_parameters()]
    shapes = [p.shape for _, p in shadow.named_parameters()]
    sizes = [p.numel() for _, p in shadow.named_parameters()]
    cross_entropy(shadow, batch64).backward()  # type: ignore[no-untyped-call]
    theta = torch.cat([p.detach().reshape(-1) for p in shadow.parameters()])
    grad = torch.cat([p.grad.reshape(-1) for p in shadow.parameters() if p.grad is not None])

    def to_dict(vector: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(vector, sizes)
        return {n: v.view(s) for n, v, s in zip(names, parts, shapes, strict=True)}

    def cost(vector: torch.Tensor) -> float:
        x, y = batch64
        logits = torch.func.functional_call(shadow, to_dict(vector), (x,))
        return float(nn.functional.cross_entropy(logits, y))

    approx = torch.zeros_like(theta)
    with torch.no_grad():
        for i in range(theta.numel()):
            plus = theta.clone()
            plus[i] += eps
            minus = theta.clone()
            minus[i] -= eps
            approx[i] = (cost(plus) - cost(minus)) / (2 * eps)
    difference = torch.linalg.norm(approx - grad)
    return float(difference / (torch.linalg.norm(approx) + torch.linalg.norm(grad)))


def measure(label: str, repeats: int) -> dict[str, float]:
    model, batch = mlp(HIDDEN[label]), make_batch()
    n = parameter_count(model)
    check_module(model, cross_entropy, batch, sample=min(n, 200))  # warm up vmap and caches
    floors, inference_floors, sequentials, batcheds, textbooks = [], [], [], [], []
    for _ in range(max(repeats, -(-MIN_EVALUATIONS // (2 * n)))):
        before = floor_seconds(model, batch, 2 * n)
        inference_before = floor_seconds(model, batch, 2 * n, inference=True)
        sequential_s, sequential = timed(
            lambda: check_module(model, cross_entropy, batch, batched=False, eps=1e-7)
        )
        batched_s, batched = timed(lambda: check_module(model, cross_entropy, batch, eps=1e-7))
        inference_after = floor_seconds(model, batch, 2 * n, inference=True)
        after = floor_seconds(model, batch, 2 * n)
        floors.append((before + after) / 2)
        inference_floors.append((inference_before + inference_after) / 2)
        sequentials.append(sequential_s)
        batcheds.append(batched_s)
        assert sequential.status == batched.status == "ok", (sequential.notes, batched.notes)
        assert any("batched evaluation: torch.func.vmap" in note for note in batched.notes)
        if label in TEXTBOOK_SIZES and len(textbooks) < TEXTBOOK_RUNS:
            textbook_s, textbook_ratio = timed(lambda: textbook_check(model, batch))
            textbooks.append(textbook_s)
            assert abs(textbook_ratio - sequential.ratio) <= 1e-6 * sequential.ratio + 1e-12
    floor_ratios = [s / f for s, f in zip(sequentials, floors, strict=True)]
    inference_ratios = [s / f for s, f in zip(sequentials, inference_floors, strict=True)]
    row = {
        "inference_floor_ratio": statistics.median(inference_ratios),
        "n": float(n),
        "eval_us": statistics.median(floors) / (2 * n) * 1e6,
        "floor_ratio": statistics.median(floor_ratios),
        "floor_ratio_best": min(sequentials) / min(floors),
        "batched_speedup": statistics.median(
            [f / b for f, b in zip(floors, batcheds, strict=True)]
        ),
    }
    quartiles = statistics.quantiles(floor_ratios, n=4) if len(floor_ratios) > 1 else [0, 0, 0]
    line = (
        f"{label:>4}  n={n:6d}  eval={row['eval_us']:6.1f} us  runs={len(floors):2d}  "
        f"sequential/floor={row['floor_ratio']:.3f} (quartiles {quartiles[0]:.2f}-"
        f"{quartiles[2]:.2f}, best/best {row['floor_ratio_best']:.3f})  "
        f"sequential/inference-mode floor={row['inference_floor_ratio']:.3f}  "
        f"floor/batched={row['batched_speedup']:.2f}x"
    )
    if textbooks:
        row["textbook_sequential"] = statistics.median(
            [t / s for t, s in zip(textbooks, sequentials, strict=False)]
        )
        row["textbook_batched"] = statistics.median(
            [t / b for t, b in zip(textbooks, batcheds, strict=False)]
        )
        line += (
            f"  textbook/sequential={row['textbook_sequential']:.2f}"
            f"  textbook/batched={row['textbook_batched']:.2f}"
        )
    print(line, flush=True)
    return row


def configure(threads: int, clock: str) -> None:
    """Torch threads and the clock every benchmark of this family uses."""
    global CLOCK
    torch.set_num_threads(threads)
    CLOCK = time.process_time if clock == "cpu" else time.perf_counter


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1k", "5k", "20k", "50k"], choices=HIDDEN)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs; medians shown")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="what is timed")
    args = parser.parse_args()
    configure(args.threads, args.clock)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} time, "
        f"batch of {EXAMPLES}, float64"
    )
    for label in args.sizes:
        measure(label, args.repeats)


if __name__ == "__main__":
    main()
