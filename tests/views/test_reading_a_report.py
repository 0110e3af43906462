"""Reading a large model's report: show fits 80x40, html is self-contained, plot stays readable."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from gradwatch import CheckResult, Component, GradWatch, TensorResult, load_report
from gradwatch.views.reading import suspect
from gradwatch.views.show import HEIGHT, WIDTH
from tests.reports import run_cli

TENSORS = 400
BUGGY = "model.layers.57.mlp.down_proj.weight"
NOTES = [
    "screened along 3 random directions over all tensors, each tensor weighted to count "
    "equally: ratio 0.02",
    "gradient accumulation over 4 micro-batches: the check covers the step's last micro-batch",
    "optimizer AdamW: decoupled weight decay (0.01) is applied in the update, not part of the "
    "gradient; it is not in J",
    "J is partly coarser than float64 (made by softmax): its roundoff limits the resolution; "
    "checked in the model's own float32 instead, with that dtype's step and thresholds",
    "padding_idx rows held constant inside the embedding lookup only: model.embed.weight[0]",
]


def names() -> list[str]:
    """400 tensor names in parameter order, long like a real transformer's."""
    kinds = ["self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight"]
    kinds.append("mlp.down_proj.weight")
    return [f"model.layers.{i // 4}.{kinds[i % 4]}" for i in range(TENSORS)]


def large_result(*, failing: bool, screened: bool = False) -> CheckResult:
    """A 400-tensor check; when failing, every tensor up to BUGGY fails (errors flow back)."""
    order = names()
    bug_at = order.index(BUGGY)
    tensors = {}
    for position, name in enumerate(order):
        ratio = 0.05 + position * 1e-4 if failing and position <= bug_at else 1e-8
        tensors[name] = TensorResult(
            ratio=ratio,
            checked=0 if screened else 4,
            size=4096,
            max_abs_error=ratio,
            status="fail" if ratio >= 1e-3 else "ok",
        )
    worst = [
        Component(
            tensor=BUGGY,
            index=[3, 1022],
            name=f"{BUGGY}[3, 1022]",
            analytic=0.012,
            numeric=0.009,
            abs_error=0.003,
            rel_error=0.25,
            diagnosis="bug",
        )
    ]
    ratio = 0.02 if failing else 1e-8
    status = "fail" if failing else "ok"
    return CheckResult(
        ratio=ratio,
        status=status,
        tensors=tensors,
        worst=worst if failing else [],
        eps=1e-6,
        eps_policy="given",
        checked=3 if screened else 4 * TENSORS,
        size=4096 * TENSORS,
        loss=2.3,
        loss_evals=900,
        seconds=1.5,
        regularization={},
        mode="directional",
        notes=NOTES,
        verdict=f"{status} by the global rule: ratio {ratio:g} >= threshold 0.001"
        if failing
        else "ok: global ratio 1e-08 and every tensor's ratio below warn 1e-05",
    )


def error_result() -> CheckResult:
    """A check that could not run."""
    return large_result(failing=False).model_copy(
        update={
            "status": "error",
            "ratio": float("nan"),
            "tensors": {},
            "error": "RuntimeError: CUDA out of memory " + "x" * 200,
            "error_source": "gradwatch.integrations.torch",
        }
    )


@pytest.fixture
def large_report(tmp_path: Path) -> Path:
    """30 checks of a 400-tensor model: clean, then an error, then failing from step 1000."""
    with GradWatch(every=100, report_dir=tmp_path) as watch:
        for check in range(30):
            step = 100 * check
            if step == 500:
                result = error_result()
            else:
                result = large_result(failing=step >= 1000, screened=step < 1000)
            watch.record(result, step)
    return tmp_path


def test_show_fits_80_by_40_on_a_400_tensor_report(
    large_report: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """show of 400 tensors, 30 checks, alerts and an error fits 80x40 and keeps what matters."""
    code, out, _ = run_cli(capsys, "show", str(large_report))
    lines = out.splitlines()
    assert code == 1
    assert len(lines) <= HEIGHT, out
    assert max(len(line) for line in lines) <= WIDTH, out
    assert "rule: fail by the global rule" in out
    assert "tensors: 400 (232 fail, 168 ok); worst first" in out
    assert "... and 394 more" in out
    assert "errors: 1 check could not run, first at step 500" in out
    for note in ("gradient accumulation", "decoupled weight decay", "model's own float32"):
        assert note in out
    assert "padding_idx rows" in out or "more notes (--json)" in out
    assert "screened along" not in out  # routine: folded, counted
    advice = next(i for i, line in enumerate(lines) if line.startswith("next: "))
    assert all(line.startswith("    ") for line in lines[advice + 1 :])  # the last thing
    assert f"produces {BUGGY}'s gradient" in " ".join(out.split())


def test_show_says_when_only_the_screen_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clean screen lists no tensor ratios it never measured, and ends without next steps."""
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        watch.record(large_result(failing=False, screened=True), 0)
    code, out, _ = run_cli(capsys, "show", str(tmp_path))
    assert code == 0
    assert "tensors: 400, none checked on its own" in " ".join(out.split())
    assert "model.layers.0" not in out
    assert "next:" not in out


def test_suspect_is_the_last_failing_tensor_in_parameter_order() -> None:
    """A wrong backward spoils every tensor before it: the last failing one is named."""
    found = suspect(large_result(failing=True))
    assert found is not None
    assert found.tensor == BUGGY
    assert found.after == "model.layers.58.self_attn.q_proj.weight"


class _Balance(HTMLParser):
    """Checks that every non-void tag is closed in order; records resource attributes."""

    VOID = frozenset(
        {
            "meta",
            "input",
            "br",
            "img",
            "link",
            "hr",
            "circle",
            "line",
            "rect",
            "polyline",
            "polygon",
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.resources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.resources += [value or "" for key, value in attrs if key in ("src", "href")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.resources += [value or "" for key, value in attrs if key in ("src", "href")]

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()


def test_html_is_one_well_formed_file_with_no_network(
    large_report: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """html writes a balanced page holding the alert, the filter, SVG charts, no URL at all."""
    output = tmp_path / "report.html"
    code, out, _ = run_cli(capsys, "html", str(large_report), "-o", str(output))
    page = output.read_text(encoding="utf-8")
    checker = _Balance()
    checker.feed(page)
    checker.close()
    assert code == 0 and str(output) in out
    assert checker.errors == [] and checker.stack == []
    assert checker.resources == []
    assert not re.search(r"https?://|//cdn|@import|url\(", page)
    assert "gradient check failed at step 1000" in page
    assert f"data-tensor='{BUGGY}'" in page
    assert page.count("<svg") == 1 and "id='filter'" in page
    assert "CUDA out of memory" in page
    assert "gradient accumulation over 4 micro-batches" in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs chromium (apt-get install chromium)")
def test_html_loads_in_headless_chromium_without_console_errors(
    large_report: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Chromium renders the page with no console error, shows the alert, and filters rows."""
    output = tmp_path / "report.html"
    assert run_cli(capsys, "html", str(large_report), "-o", str(output))[0] == 0
    browser = _chromium()
    assert browser is not None
    completed = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            output.as_uri() + "#filter=layers.57.mlp",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    console = [line for line in completed.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    dom = completed.stdout
    assert 'data-filter-ready="yes"' in dom  # the script ran to its end
    assert "gradient check failed at step 1000" in dom
    heat_rows = re.findall(
        r"<tr data-tensor=\"([^\"]+)\"( style=\"display: none;\")?><td class=\"n\"", dom
    )
    assert len(heat_rows) == TENSORS
    shown = [name for name, hidden in heat_rows if not hidden]
    assert shown == ["model.layers.57.mlp.up_proj.weight", BUGGY]


def test_plot_of_400_tensors_keeps_its_axes(large_report: Path) -> None:
    """A 400-tensor plot keeps a wide, tall axes (legend below it), integer steps, few entries."""
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from gradwatch.views.plot import HIGHLIGHTED, plot_figure

    figure = plot_figure(load_report(large_report))
    FigureCanvasAgg(figure).draw()
    axes = figure.axes[0]
    box = axes.get_window_extent()
    width, height = figure.bbox.width, figure.bbox.height
    assert box.width > 0.7 * width and box.height > 0.5 * height
    ticks = [tick for tick in axes.get_xticks() if axes.get_xlim()[0] <= tick <= axes.get_xlim()[1]]
    assert ticks and all(float(tick).is_integer() for tick in ticks)
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert len(labels) <= HIGHLIGHTED + 7
    assert any(label.startswith("other 395 tensors") for label in labels)
    assert any(label.startswith("alert") for label in labels)
    assert any(label.startswith("threshold") for label in labels)


def test_plot_of_one_check_of_one_tensor_has_integer_steps(tmp_path: Path) -> None:
    """One check of one tensor: the x axis shows whole steps around it, not 0.5 steps."""
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from gradwatch.views.plot import plot_figure

    result = large_result(failing=False)
    result = result.model_copy(update={"tensors": {BUGGY: result.tensors[BUGGY]}})
    with GradWatch(every=1, report_dir=tmp_path) as watch:
        watch.record(result, 7)
    figure = plot_figure(load_report(tmp_path))
    FigureCanvasAgg(figure).draw()
    ticks = figure.axes[0].get_xticks()
    assert 7 in ticks and all(float(tick).is_integer() for tick in ticks)
