"""Views of a hostile report: 1e999 ratios and control characters in tensor names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gradwatch import GradWatch
from gradwatch.cli import main
from tests.reports import result_of_tensors

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def hostile_report(directory: Path) -> None:
    """Three checks of a tensor named with ESC and BEL; the second's ratio is 1e999."""
    with GradWatch(every=1, report_dir=directory) as watch:
        for step in range(3):
            watch.record(result_of_tensors({"W1\x1b[2J\x07": 1e-9, "b1": 2e-9}), step)
    lines = (directory / "checks.jsonl").read_text().splitlines()
    lines[1] = re.sub(r'"ratio":[^,]*', '"ratio":1e999', lines[1], count=1)
    (directory / "checks.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "argv",
    [
        ["show"],
        ["trend"],
        ["worst"],
        ["html", "-o", "page.html"],
        ["html", "--json", "-o", "p.html"],
    ],
)
def test_every_view_copes_with_1e999_and_passes_no_control_character(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """Each view exits 0 or 1 on a 1e999 ratio; no output, file included, holds ESC or BEL."""
    hostile_report(tmp_path / "report")
    command, *options = argv
    options = [str(tmp_path / option) if option.endswith(".html") else option for option in options]
    code = main([command, str(tmp_path / "report"), *options])
    captured = capsys.readouterr()
    assert code in (0, 1)
    assert not CONTROL.search(captured.out + captured.err)
    for page in tmp_path.glob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert not CONTROL.search(text)
        assert "W1\N{REPLACEMENT CHARACTER}[2J\N{REPLACEMENT CHARACTER}" in text


@pytest.mark.parametrize("step", [2**63, -1])
def test_a_step_outside_int64_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], step: int
) -> None:
    """A step no training reaches (found by the fuzzer: 2**63) is exit 2 naming the line."""
    hostile_report(tmp_path / "report")
    path = tmp_path / "report" / "checks.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = re.sub(r'"step":\d+', f'"step":{step}', lines[2])
    path.write_text("\n".join(lines) + "\n")
    for command in (["trend"], ["html", "-o", str(tmp_path / "p.html")]):
        assert main([command[0], str(tmp_path / "report"), *command[1:]]) == 2
        assert "line 3: expected a step from 0 to 2**63 - 1" in capsys.readouterr().err


def test_a_check_without_tensors_is_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failing check whose tensors were removed (found by the fuzzer) is shown, exit 1."""
    hostile_report(tmp_path / "report")
    path = tmp_path / "report" / "checks.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = re.sub(r'"ratio":[^,]*', '"ratio":1e-9', lines[1], count=1)  # not 1e999 here
    lines[2] = re.sub(r'"ratio":[^,]*', '"ratio":0.5', lines[2], count=1)
    lines[2] = re.sub(r'"status":"ok"', '"status":"fail"', lines[2], count=1)
    lines[2] = re.sub(r'"tensors":\{.*?\}\},', '"tensors":{},', lines[2], count=1)
    path.write_text("\n".join(lines) + "\n")
    assert main(["show", str(tmp_path / "report")]) == 1
    assert "tensors: none recorded in this check" in capsys.readouterr().out
