"""The ``sample="auto"`` check of a large theta: screen, then look closer only if it fires.

`screened`: a few random directions that move every tensor at once (a clean screen is
the whole check). When it fires, either `tensor_by_tensor` (each tensor along its own
direction, bisection inside the failing ones) or, for callers that localize by module,
a second screen along fresh directions that confirms it (`per_tensor=False`).
"""

from __future__ import annotations

from gradwatch.engine.comparison import status_for
from gradwatch.engine.directions import per_tensor_directions, screen
from gradwatch.engine.run import CheckRun, Measured, components
from gradwatch.engine.sampling import localization_plan, screen_directions
from gradwatch.result import Component, Status, TensorResult

__all__ = ["CONFIRMING_SCREEN", "FIRST_SCREEN", "screened", "tensor_by_tensor"]


def screened(run: CheckRun, per_tensor: bool) -> Measured | None:
    """The joint random-direction screen of ``"auto"``; None when it fires and each tensor
    is to be checked (look closer)."""
    directions = screen_directions(len(run.tensors.names))
    ratio, below = _screen_along(run, directions, FIRST_SCREEN)
    run.note(
        f"screened along {directions} random directions over all tensors, each "
        f"tensor weighted to count equally: ratio {ratio:.3g}"
    )
    # A clean screen is the whole check, and so is a screen of a nondeterministic J:
    # checking each tensor on noise would only spend evaluations. A split theta's screen
    # is the whole check either way (its caller localizes otherwise).
    fired = ratio >= run.warn and not run.nondeterministic
    if fired and run.objective.split is None:
        return None if per_tensor else _confirmed(run, ratio, directions)
    screened: Status = "nondeterministic" if run.nondeterministic else "ok"
    if fired:
        screened = status_for(ratio, run.warn, run.threshold)
    together = {
        name: TensorResult(
            ratio=None,  # screened together: no ratio of its own was measured
            checked=0,
            size=run.tensors.params[name].size,
            max_abs_error=0.0,
            status=screened,
        )
        for name in run.tensors.names
    }
    return Measured(ratio, directions, "directional", [], together, below)


FIRST_SCREEN, CONFIRMING_SCREEN = 2, 5
"""Random streams of the screen's directions and of the second screen's that confirms it."""


def _screen_along(
    run: CheckRun, directions: int, stream: int
) -> tuple[float, tuple[float, float] | None]:
    loss_over_warn = abs(run.loss0) / run.warn
    return screen(
        run.objective, run.tensors, run.base_step, run.seed, loss_over_warn, directions, stream
    )


def _confirmed(run: CheckRun, first: float, directions: int) -> Measured | None:
    """A fired screen confirmed along fresh directions, as the verdict; None if unconfirmed.

    The smaller of the two ratios is the check's: both screens saw at least that much
    error. No tensor has a ratio of its own (``tensors`` is empty): the caller localizes.
    """
    ratio, below = _screen_along(run, directions, CONFIRMING_SCREEN)
    if ratio < run.warn:
        run.note(
            f"a second screen along {directions} fresh directions did not confirm it "
            f"(ratio {ratio:.3g}): each tensor checked along its own direction"
        )
        return None
    run.note(
        f"a second screen along {directions} fresh directions confirmed it (ratio "
        f"{ratio:.3g}); per-tensor ratios not measured: the failure is localized by module"
    )
    return Measured(min(ratio, first), 2 * directions, "directional", [], {}, below)


def tensor_by_tensor(run: CheckRun, auto: bool, localize_evaluations: int) -> Measured:
    """One random direction per tensor; under ``"auto"``, then localize in failing tensors."""
    loss_over_warn = abs(run.loss0) / run.warn
    comparison = per_tensor_directions(
        run.objective, run.tensors, run.base_step, run.seed, loss_over_warn
    )
    per_tensor = comparison.per_tensor(run.tensors, run.warn, run.threshold)
    run.note("directional: one random unit direction per tensor, 2 evaluations each")
    redrawn = 0
    if auto and all(v.status == "ok" for v in per_tensor.values()):
        # The screen saw an error no tensor's direction confirms: each direction may
        # be nearly orthogonal to its tensor's error (probability ~ its ratio over
        # warn). A second draw squares that chance; if it confirms, it is the verdict.
        again = per_tensor_directions(
            run.objective, run.tensors, run.base_step, run.seed, loss_over_warn, 4
        )
        per_tensor_again = again.per_tensor(run.tensors, run.warn, run.threshold)
        confirmed = any(v.status != "ok" for v in per_tensor_again.values())
        run.note(
            "no tensor's direction confirmed the screen; a second direction per tensor "
            + ("did" if confirmed else "did not either")
        )
        redrawn = comparison.checked
        if confirmed:
            comparison, per_tensor = again, per_tensor_again
    checked = comparison.checked + redrawn
    worst, _ = comparison.worst_components(run.tensors, run.top_k)
    failing = [name for name, verdict in per_tensor.items() if verdict.status == "fail"]
    if auto and failing:
        # Most suspicious first: the worst per-tensor ratio is localized first.
        failing.sort(key=lambda name: -(per_tensor[name].ratio or 0.0))  # all measured here
        localized, worst = _localize(run, failing, localize_evaluations)
        checked += localized
    return Measured(
        ratio=comparison.ratio(),
        checked=checked,
        mode=comparison.mode,
        worst=worst,
        per_tensor=per_tensor,
        below=comparison.below_resolution(),
    )


def _localize(run: CheckRun, failing: list[str], budget: int) -> tuple[int, list[Component]]:
    """Bisect inside the failing tensors, then check the entries found component-wise."""
    plan, skipped = localization_plan(
        run.objective, run.tensors, failing, run.base_step, run.seed, budget
    )
    localized, worst = components(run, plan)
    done = [name for name in failing if name not in skipped]
    run.note(
        "localized by bisection along a random direction, then the bisected entry "
        "and the largest analytic entry checked component-wise, in " + ", ".join(done)
    )
    if skipped:
        run.note(
            f"not localized (the localization budget of {budget} evaluations was spent; "
            "their per-tensor verdicts stand): " + ", ".join(skipped)
        )
    return localized.checked, worst
