"""A signal at any moment of a check: parameters and RNG states come back bit for bit (issue 27).

The sweep raises a real SIGINT at the start of evenly spaced Python calls of a check
(``benchmarks.interrupts``; ``python -m benchmarks.interrupts`` runs every call).
"""

from __future__ import annotations

import contextlib
import signal
import threading

import numpy as np
import pytest

import gradwatch
from benchmarks.interrupts import Scenario, numpy_scenarios, snapshot, sweep
from gradwatch.engine.uninterrupted import restoring

POINTS = 120
"""Injection points per scenario here (evenly spaced; the benchmark tries all of them)."""

SCENARIOS = numpy_scenarios()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_an_interrupt_at_any_call_restores_everything(scenario: Scenario) -> None:
    """Each injected SIGINT leaves theta and the RNGs as they were and comes out."""
    outcome = sweep(scenario, POINTS)
    assert outcome.tried >= POINTS * 0.9
    assert outcome.restored == outcome.tried
    # CPython drops an exception raised in a finalizer (a generator closed by the GC):
    # those runs end normally; every other one raises.
    assert outcome.raised + outcome.lost == outcome.tried


def test_a_signal_while_theta_is_moved_waits_for_the_restore() -> None:
    """A SIGINT arriving while theta is perturbed is raised only once theta is back."""
    theta = np.zeros(4)
    seen: list[float] = []

    def put_back() -> None:
        theta.fill(0.0)

    with pytest.raises(KeyboardInterrupt), restoring(put_back):
        theta[2] = 1e-3
        signal.raise_signal(signal.SIGINT)  # held: nothing raised here
        seen.append(float(theta.sum()))
    assert seen == [1e-3]
    assert not theta.any()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_that_does_not_raise_runs_after_the_restore() -> None:
    """A SIGTERM handler that only sets a flag (a trainer's) runs once theta is back."""
    theta = np.array([1.0, 2.0])
    calls: list[float] = []

    def handler(signum: int, frame: object) -> None:
        calls.append(float(theta.sum()))

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with restoring(lambda: theta.__setitem__(slice(None), [1.0, 2.0])):
            theta[0] = 5.0
            signal.raise_signal(signal.SIGTERM)
            assert calls == []
        assert calls == [3.0]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_interrupt_the_loss_swallows_still_ends_the_check() -> None:
    """A KeyboardInterrupt caught inside J still ends the check, with theta restored."""
    rng = np.random.default_rng(3)
    params = {"W": rng.normal(size=(60, 40))}
    original = params["W"].copy()
    calls = 0

    def loss() -> float:
        nonlocal calls
        calls += 1
        if calls == 3:  # the first evaluation along the direction (two probes before)
            with contextlib.suppress(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        return float(np.sum(np.sin(params["W"])))

    with pytest.raises(KeyboardInterrupt):
        gradwatch.check(loss, params, {"W": np.cos(params["W"])}, sample="directional")
    assert params["W"].tobytes() == original.tobytes()


def test_off_the_main_thread_a_check_restores_and_leaves_signals_alone() -> None:
    """In a worker thread (where no handler runs) the screen restores theta, installs nothing."""
    _, scenario, *_ = SCENARIOS
    before = scenario.state()
    handlers: list[object] = []

    def work() -> None:
        scenario.run()
        handlers.append(signal.getsignal(signal.SIGINT))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert scenario.state() == before
    assert handlers == [signal.default_int_handler]


def test_snapshot_sees_a_single_bit() -> None:
    """The sweep's oracle tells apart arrays that differ in one bit (so the sweep can fail)."""
    a = np.array([1.0, 2.0])
    b = a.copy()
    b.view(np.int64)[1] ^= 1
    assert snapshot(a) != snapshot(b)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_at_every_call_of_a_region_leaves_no_handler_behind(signum: int) -> None:
    """Installing and removing the handler (Python code in the signal module) can be interrupted
    anywhere: theta comes back and the handlers are the ones from before, every time."""
    theta = np.zeros(3)

    def move_and_evaluate() -> None:
        with restoring(lambda: theta.fill(0.0)) as region:
            theta[0] = 1.0
            region.run(float, theta.sum())

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        before = snapshot(theta)
        outcome = sweep(Scenario("region", move_and_evaluate, lambda: snapshot(theta), signum))
        assert outcome.tried > 20
        assert outcome.restored == outcome.tried
        assert snapshot(theta) == before
    finally:
        signal.signal(signal.SIGTERM, previous)
