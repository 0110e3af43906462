"""A signal at every Python call of a check: is everything put back each time?

    OMP_NUM_THREADS=1 python -m benchmarks.interrupts            # every call
    OMP_NUM_THREADS=1 python -m benchmarks.interrupts --most 200 # evenly spaced
    OMP_NUM_THREADS=1 python -m benchmarks.interrupts --torch-most 1000
    OMP_NUM_THREADS=1 python -m benchmarks.interrupts --overhead # its cost, A/B

A first run of each scenario counts the Python ``call`` events of one check
(``sys.setprofile``); then, for each k, the check runs again and a real signal is
raised (``signal.raise_signal``) at the start of its k-th call: the handler in force
runs there, as it would for a Ctrl-C arriving at that bytecode. After each run the
parameters (and, for torch, ``.grad`` and buffers), the python / numpy / torch RNG
states, the torch settings a check restores and the signal handlers must be bit for
bit what they were, and the interrupt must have come out (KeyboardInterrupt for
SIGINT, SystemExit for a SIGTERM handler raising it). Scenarios: a numpy
component-wise check, the default ``"auto"`` screen over more than 2,000 parameters
(clean, and with a planted bug that bisection localizes), ``sample="directional"``
and torch ``check_module`` (SIGINT, and SIGTERM handled as SystemExit).
"""

from __future__ import annotations

import argparse
import pickle
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np
import numpy.typing as npt

import gradwatch

__all__ = [
    "Interrupted",
    "Scenario",
    "count_calls",
    "interrupt_at",
    "numpy_scenarios",
    "snapshot",
    "sweep",
    "torch_scenarios",
]

Run = Callable[[], object]


@dataclass(frozen=True)
class Scenario:
    """A check to interrupt, and what it must leave untouched."""

    name: str
    run: Run
    state: Callable[[], bytes]
    """Everything the check must put back, serialized (compared bit for bit)."""
    signum: int = signal.SIGINT
    expected: type[BaseException] = KeyboardInterrupt
    around: Callable[[], AbstractContextManager[None]] = nullcontext
    """What the whole sweep runs inside (the SIGTERM handler, installed once)."""


def count_calls(run: Run) -> int:
    """Python ``call`` events (functions entered, generators resumed) of one ``run()``."""
    calls = 0

    def profile(frame: FrameType, event: str, arg: object) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return calls


@dataclass(frozen=True)
class Interrupted:
    """What one run interrupted at its k-th call gave."""

    error: BaseException | None
    """What came out of ``run()``."""
    reached: bool
    """False when this run made fewer than k calls (counts vary a little between runs)."""
    lost: bool
    """The signal's exception was raised in a finalizer (a generator closed by the garbage
    collector), where CPython prints "Exception ignored" and drops it, as it would a real
    Ctrl-C there."""


def interrupt_at(run: Run, k: int, signum: int = signal.SIGINT) -> Interrupted:
    """Run with signal ``signum`` raised at the start of the k-th call."""
    seen = 0
    lost = False

    def profile(frame: FrameType, event: str, arg: object) -> None:
        nonlocal seen
        if event == "call":
            seen += 1
            if seen == k:
                sys.setprofile(None)
                signal.raise_signal(signum)  # the handler in force runs here

    def unraisable(info: Any) -> None:
        nonlocal lost
        lost = lost or isinstance(info.exc_value, (KeyboardInterrupt, SystemExit))

    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    sys.setprofile(profile)
    error: BaseException | None = None
    try:
        run()
    except BaseException as raised:  # the interrupt, which the caller checks
        error = raised
    finally:
        sys.setprofile(None)
        sys.unraisablehook = hook
    return Interrupted(error, seen >= k, lost)


def snapshot(*arrays: npt.NDArray[Any]) -> bytes:
    """The arrays' bits, the python and numpy RNG states and the signal handlers."""
    return pickle.dumps(
        (
            [(a.dtype.str, a.shape, a.tobytes()) for a in arrays],
            random.getstate(),
            np.random.get_state(),
            id(signal.getsignal(signal.SIGINT)),
            id(signal.getsignal(signal.SIGTERM)),
        )
    )


@dataclass
class Outcome:
    """What a sweep of one scenario found."""

    name: str
    calls: int
    tried: int
    restored: int
    raised: int
    """Runs the interrupt came out of."""
    lost: int
    """Runs where it was raised in a finalizer and dropped by CPython (not an error)."""
    seconds: float


def sweep(scenario: Scenario, most: int | None = None) -> Outcome:
    """Interrupt ``scenario`` at every call (or at ``most`` evenly spaced ones)."""
    with scenario.around():
        return _sweep(scenario, most)


def _sweep(scenario: Scenario, most: int | None) -> Outcome:
    scenario.run()  # warm caches, so the counted run and the interrupted ones agree
    calls = count_calls(scenario.run)
    points: Sequence[int] = range(1, calls + 1)
    if most is not None and calls > most:
        points = sorted(set(np.linspace(1, calls, most).round().astype(int).tolist()))
    before = scenario.state()
    tried = restored = raised = lost = 0
    started = time.perf_counter()
    for k in points:
        outcome = interrupt_at(scenario.run, k, scenario.signum)
        if not outcome.reached:
            continue
        tried += 1
        restored += scenario.state() == before
        raised += isinstance(outcome.error, scenario.expected)
        lost += outcome.lost and outcome.error is None
    return Outcome(
        scenario.name, calls, tried, restored, raised, lost, time.perf_counter() - started
    )


# --------------------------------------------------------------------------- numpy


def numpy_scenarios() -> list[Scenario]:
    """Component-wise, the "auto" screen (clean and localizing a bug), directional."""
    rng = np.random.default_rng(0)
    small = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}
    x = rng.normal(size=3)

    def small_loss() -> float:
        return float(np.sum(np.tanh(x @ small["w"] + small["b"]) ** 2))

    def small_grads() -> dict[str, npt.NDArray[np.float64]]:
        z = x @ small["w"] + small["b"]
        dz = 2 * np.tanh(z) * (1 - np.tanh(z) ** 2)
        return {"w": np.outer(x, dz), "b": dz}

    big = {"W": rng.normal(size=(50, 45)), "c": rng.normal(size=7), "s": np.array(0.3)}

    def big_loss() -> float:
        return float(np.sum(np.sin(big["W"])) + np.sum(big["c"] ** 2) + float(big["s"]) ** 3)

    def big_grads(bug: float = 0.0) -> dict[str, npt.NDArray[np.float64]]:
        grads = {"W": np.cos(big["W"]), "c": 2 * big["c"], "s": np.array(3 * big["s"] ** 2)}
        grads["W"][7, 11] += bug
        return grads

    def state() -> bytes:
        return snapshot(*small.values(), *big.values())

    return [
        Scenario(
            "numpy component-wise (8 parameters)",
            lambda: gradwatch.check(small_loss, small, small_grads()),
            state,
        ),
        Scenario(
            'numpy "auto" screen (2,257 parameters)',
            lambda: gradwatch.check(big_loss, big, big_grads(), sample="auto"),
            state,
        ),
        Scenario(
            'numpy "auto" screen fired, bisection (2,257 parameters, one wrong entry)',
            lambda: gradwatch.check(big_loss, big, big_grads(1.0), sample="auto"),
            state,
        ),
        Scenario(
            'numpy sample="directional" (2,257 parameters)',
            lambda: gradwatch.check(big_loss, big, big_grads(), sample="directional"),
            state,
        ),
    ]


# --------------------------------------------------------------------------- torch


@contextmanager
def sigterm_as_system_exit() -> Iterator[None]:
    """SIGTERM handled by raising SystemExit (what a training script often installs)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def torch_scenarios() -> list[Scenario]:
    """``check_module`` on a small model with dropout (RNG replayed) and a buffer."""
    import torch
    from gradwatch.integrations.torch import check_module

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6),
        torch.nn.BatchNorm1d(6),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(6, 1),
    ).eval()
    model[3].train()  # dropout draws: the check replays and restores torch's RNG
    x = torch.randn(5, 4)
    model(x).square().mean().backward()  # a .grad to keep

    def loss_fn(module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        value: torch.Tensor = module(batch).square().mean()
        return value

    def state() -> bytes:
        tensors = [t.detach().numpy() for t in model.state_dict().values()]
        grads = [p.grad.numpy() for p in model.parameters() if p.grad is not None]
        settings = (
            torch.get_num_threads(),
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.get_default_dtype(),
            torch._C._len_torch_function_stack(),
            [m.training for m in model.modules()],
        )
        return snapshot(*tensors, *grads) + pickle.dumps(
            (torch.get_rng_state().numpy().tobytes(), settings)
        )

    def run() -> object:
        return check_module(model, loss_fn, x)

    return [
        Scenario("torch check_module (31 parameters, dropout)", run, state),
        Scenario(
            "torch check_module, SIGTERM handled as SystemExit",
            run,
            state,
            signal.SIGTERM,
            SystemExit,
            sigterm_as_system_exit,
        ),
    ]


# --------------------------------------------------------------------------- overhead


def _median_seconds(run: Run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


@contextmanager
def _unguarded() -> Iterator[None]:
    """The restore sites with plain regions (restore on exit, no signal handling)."""
    from gradwatch.engine.uninterrupted import _Unguarded

    sites = [
        ("gradwatch.engine.directions", "restoring", _Unguarded),
        ("gradwatch.engine.bisection", "restoring", _Unguarded),
        ("gradwatch.check", "watching", nullcontext),
    ]
    kept = [(name, attr, getattr(sys.modules[name], attr)) for name, attr, _ in sites]
    for name, attribute, replacement in sites:
        setattr(sys.modules[name], attribute, replacement)
    try:
        yield
    finally:
        for name, attribute, value in kept:
            setattr(sys.modules[name], attribute, value)


def overhead(repeats: int = 301) -> None:
    """Seconds per check with the signal handling and without (A/B, one process)."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(16, 3)), rng.normal(size=16)
    mlp = {"W1": rng.normal(size=(3, 8)), "b1": np.zeros(8), "W2": rng.normal(size=8)}

    def mlp_loss() -> float:
        return float(np.mean((np.tanh(x @ mlp["W1"] + mlp["b1"]) @ mlp["W2"] - y) ** 2))

    def mlp_grads() -> dict[str, npt.NDArray[np.float64]]:
        hidden = np.tanh(x @ mlp["W1"] + mlp["b1"])
        residual = 2 * (hidden @ mlp["W2"] - y) / len(y)
        upstream = np.outer(residual, mlp["W2"]) * (1 - hidden**2)
        return {"W1": x.T @ upstream, "b1": upstream.sum(0), "W2": hidden.T @ residual}

    grads = mlp_grads()
    cases: list[tuple[str, Run]] = [
        ("numpy component-wise, 3-8-1 MLP (41 parameters)",
         lambda: gradwatch.check(mlp_loss, mlp, grads)),
    ]  # fmt: skip
    for scenario in numpy_scenarios()[1:]:
        cases.append((scenario.name, scenario.run))
    print("| check | with signal handling (ms) | without (ms) | overhead |")
    print("| --- | ---: | ---: | ---: |")
    for name, run in cases:
        run()
        guarded_times, plain_times = [], []
        for _ in range(repeats):  # interleaved, so a busy neighbour slows both alike
            guarded_times.append(_median_seconds(run, 1))
            with _unguarded():
                plain_times.append(_median_seconds(run, 1))
        # The fastest run of each: a busy machine's delays only ever add (bimodal here).
        guarded, plain = min(guarded_times), min(plain_times)
        print(
            f"| {name} | {1e3 * guarded:.2f} | {1e3 * plain:.2f} "
            f"| {100 * (guarded / plain - 1):+.1f}% |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--most", type=int, default=None, help="injection points per scenario")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--torch-most", type=int, default=None, help="--most for torch only")
    parser.add_argument("--overhead", action="store_true", help="time the signal handling")
    args = parser.parse_args()
    if args.overhead:
        overhead()
        return
    scenarios = [(s, args.most) for s in numpy_scenarios()]
    if not args.no_torch:
        scenarios += [(s, args.torch_most or args.most) for s in torch_scenarios()]
    print(
        "| scenario | calls | interrupted at | restored | interrupt came out "
        "| dropped in a finalizer | seconds |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for scenario, most in scenarios:
        o = sweep(scenario, most)
        print(
            f"| {o.name} | {o.calls:,} | {o.tried:,} | {o.restored:,} | {o.raised:,} "
            f"| {o.lost:,} | {o.seconds:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
