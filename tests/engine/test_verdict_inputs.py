"""The verdict decided in one place: the core's measurement, then the step link, via `finish`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import gradwatch
from gradwatch.engine.finish import finish
from gradwatch.result import CheckResult, StepLink
from gradwatch.store.alerts import alert_for, only_the_step_failed

ROOT = Path(__file__).resolve().parents[2]


def _core(bug: float = 1.0) -> CheckResult:
    """A real check of J = sum(w**2) whose gradient is 2w times ``bug``."""
    w = np.array([1.0, -2.0, 0.5])
    return gradwatch.check(lambda: float(np.sum(w**2)), {"w": w}, {"w": 2 * w * bug})


def _link(ratio: float, status: str, worst: float | None = None) -> StepLink:
    return StepLink(
        ratio=ratio,
        status=status,
        warn=1e-4,
        threshold=1e-2,
        scale=2.0,
        tensors={"w": ratio if worst is None else worst},
        worst_tensor="w",
        micro_batches=2,
        explanation="the optimizer's gradient is 2x the gradient of the step's loss",
    )


def test_a_failing_link_fails_a_passing_backprop_by_the_step_rule() -> None:
    """Backprop ok, the step link failing: fail by rule "step", backprop's sentence kept."""
    core = _core()
    assert core.status == "ok" and core.rule == "none"
    finished = finish(core, step_link=_link(0.2, "fail", worst=0.3))
    assert finished.status == "fail" and finished.rule == "step"
    assert finished.rule_ratio == 0.3  # the larger of the link's global and worst tensor ratio
    assert finished.verdict == core.verdict  # backprop's: the link's numbers are its own
    assert finished.notes[-1].startswith("step link: ") and "ratio 0.2 (fail)" in finished.notes[-1]
    assert core.status == "ok" and core.step_link is None  # the core's result is not changed


def test_a_warning_link_warns_a_passing_backprop() -> None:
    """A link between its warn and threshold makes an ok check "warn" (step rule, no alert)."""
    finished = finish(_core(), step_link=_link(1e-3, "warn"))
    assert (finished.status, finished.rule) == ("warn", "step")
    assert alert_for(finished) is None


def test_backprop_failing_keeps_its_rule_when_the_link_fails_too() -> None:
    """When backprop failed, its rule stands and the alert names backprop, not the step."""
    core = _core(bug=1.5)
    assert core.status == "fail"
    finished = finish(core, step_link=_link(0.2, "fail"))
    assert (finished.status, finished.rule, finished.verdict) == ("fail", core.rule, core.verdict)
    assert only_the_step_failed(finished) is None
    alert = alert_for(finished)
    assert alert is not None and alert.rule == core.rule


def test_a_nondeterministic_check_is_not_failed_by_the_link() -> None:
    """No verdict (J differs between two evaluations) stays no verdict: the link cannot fail it."""
    core = _core().model_copy(
        update={"status": "nondeterministic", "rule": "none", "verdict": "nondeterministic"}
    )
    finished = finish(core, step_link=_link(0.2, "fail"))
    assert finished.status == "nondeterministic" and finished.step_link is not None


def test_the_step_alert_follows_the_rule_and_reads_old_reports() -> None:
    """The step alert follows ``rule == "step"``; an older report (rule "none") still gets it."""
    finished = finish(_core(), step_link=_link(0.2, "fail"))
    alert = alert_for(finished)
    assert alert is not None and alert.rule == "step" and alert.tensor == "w"
    old = finished.model_copy(update={"rule": "none", "verdict": "ok: global ratio 0"})
    assert only_the_step_failed(old) is not None
    older = finished.model_copy(update={"rule": None, "verdict": None})
    assert only_the_step_failed(older) is not None
    bug = finish(_core(bug=1.5), step_link=_link(0.2, "fail")).model_copy(update={"rule": None})
    assert only_the_step_failed(bug) is None


def test_finish_adds_notes_regularization_and_step_in_order() -> None:
    """Notes are appended in order after the core's, penalties merged, the step stamped."""
    core = _core()
    finished = finish(core, notes=["a", "b"], regularization={"l2": 0.5}, step=7)
    assert finished.notes == [*core.notes, "a", "b"]
    assert finished.regularization == {**core.regularization, "l2": 0.5}
    assert finished.step == 7 and finished.status == core.status
    assert finish(core) is core


@pytest.mark.parametrize("folder", ["gradwatch", "integrations"])
def test_no_layer_sets_a_check_status_after_the_verdict(folder: str) -> None:
    """Outside the engine no code writes a status into a copy of a result (modules' aside)."""
    allowed = {"gradwatch/engine/finish.py", "integrations/_local/adjoint.py"}
    writes = re.compile(r"model_copy\(\s*update=\{[^}]*\"status\"", re.S)
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / folder).rglob("*.py")
        if str(path.relative_to(ROOT)) not in allowed and writes.search(path.read_text())
    ]
    assert offenders == []


def test_show_names_the_step_link_and_backprops_own_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gradwatch show` on a step-only failure: the link's rule, then backprop's "ok" verdict."""
    from gradwatch.cli import main as cli

    with gradwatch.GradWatch(every=1, report_dir=tmp_path) as watch:
        watch.record(finish(_core(), step_link=_link(0.2, "fail")), 0)
    capsys.readouterr()
    assert cli(["show", str(tmp_path)]) == 1
    shown = " ".join(capsys.readouterr().out.split())
    assert "rule: fail by the step link" in shown
    assert "backprop: ok:" in shown and "backprop: fail" not in shown


def test_the_module_search_and_the_whole_time_join_without_touching_the_verdict() -> None:
    """finish adds where the bug is and the whole check's seconds; status and rule stay."""
    from gradwatch.result import Localization, ModuleSuspect

    core = _core(bug=1.5)
    found = Localization(
        suspects=[
            ModuleSuspect(module="act", class_name="GELU", kind="leaf", ratio=0.4, side="input")
        ],
        modules=[],
        evaluations=12,
        checks=3,
        seconds=0.5,
        threshold=1e-4,
        notes=[],
    )
    finished = finish(core, localization=found, seconds=7.25)
    assert (finished.status, finished.rule, finished.verdict) == (
        core.status,
        core.rule,
        core.verdict,
    )
    assert finished.localization == found and finished.seconds == 7.25
    assert core.localization is None and core.seconds != 7.25  # the core's result unchanged
