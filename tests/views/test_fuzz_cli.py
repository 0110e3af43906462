"""Every CLI command over mutated reports: an exit code of 0, 1 or 2, never a traceback.

A real report (two runs, alerts, an error check, worst components, notes) is mutated
at random: a JSON value replaced by a hostile one (1e999, NaN, huge or negative ints,
control characters, long strings, wrong types), a key dropped, a line duplicated, cut
or replaced with bytes. Each mutation is read by show, trend, worst, plot and html (with
``--json`` where it exists). The budget is small here; ``GRADWATCH_FUZZ_CASES=N`` runs
N cases (BENCHMARKS.md, "CLI fuzz over mutated reports", has a long run's figures).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gradwatch import GradWatch
from gradwatch.cli import main
from tests.reports import result_of_tensors

CASES = int(os.environ.get("GRADWATCH_FUZZ_CASES", "24"))
SEED = int(os.environ.get("GRADWATCH_FUZZ_SEED", "0"))
HOSTILE: list[Any] = [
    1e999,
    -1e999,
    float("nan"),
    0,
    -1,
    2**63,
    -(2**70),
    1e-320,
    1.5,
    "",
    "\x1b[2J\x07name",
    "x" * 5000,
    "W[0, 0]\n alerts: none",
    None,
    True,
    [],
    {},
    [1, "a", None],
    {"ratio": "nan"},
]


def base_report(directory: Path) -> None:
    """Two runs: the first with alerts and an error check, the second clean."""
    with GradWatch(every=10, report_dir=directory) as buggy:
        buggy.note("gradient accumulation: the check covers every micro-batch of the step")
        for step in (0, 10, 20):
            buggy.record(result_of_tensors({"W1": 1e-9, "b1": 3e-2 * (step + 1)}), step)
        buggy.record(
            result_of_tensors({"W1": 1e-9}).model_copy(
                update={"status": "error", "error": "RuntimeError: boom", "ratio": float("nan")}
            ),
            30,
        )
    with GradWatch(every=10, report_dir=directory) as fixed:
        for step in (0, 10):
            fixed.record(result_of_tensors({"W1": 1e-9, "b1": 2e-9}), step)


def leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Paths of every value inside a JSON document (containers included)."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, (*path, index))


def replaced(document: Any, path: tuple[Any, ...], new: Any, drop: bool) -> Any:
    if not path:
        return new
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if drop:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return document


def mutate_json(text: str, rng: random.Random) -> str:
    try:
        document = json.loads(text)
    except ValueError:  # mutated already (cut, bytes): mutate the text instead
        return text[: len(text) // 2] + "\x1b" + text[len(text) // 2 :]
    for _ in range(rng.choice((1, 1, 2, 3))):
        paths = list(leaves(document))
        path = rng.choice(paths)
        drop = bool(path) and rng.random() < 0.2
        document = replaced(document, path, copy.deepcopy(rng.choice(HOSTILE)), drop)
    return json.dumps(document)


def mutate(directory: Path, rng: random.Random) -> str:
    """One random mutation of `directory`'s files; returns what was done."""
    name = rng.choice(("checks.jsonl", "checks.jsonl", "checks.jsonl", "report.json"))
    path = directory / name
    if name == "report.json":
        kind = rng.choice(("json", "json", "json", "bytes", "empty"))
        text = path.read_bytes().decode("utf-8", "surrogateescape")
        if kind == "json":
            path.write_bytes(mutate_json(text, rng).encode("utf-8", "surrogateescape"))
        elif kind == "bytes":
            data = bytearray(text.encode("utf-8", "surrogateescape")) or bytearray(b"{")
            data[rng.randrange(len(data))] = rng.randrange(256)
            path.write_bytes(bytes(data))
        else:
            path.write_text("")
        return f"{name}: {kind}"
    lines = path.read_bytes().decode("utf-8", "surrogateescape").splitlines() or ["{}"]
    at = rng.randrange(len(lines))
    kind = rng.choice(("json", "json", "json", "json", "duplicate", "cut", "bytes", "drop"))
    if kind == "json":
        lines[at] = mutate_json(lines[at], rng)
    elif kind == "duplicate":
        lines.insert(at, lines[at])
    elif kind == "cut":
        lines[at] = lines[at][: rng.randrange(len(lines[at]) + 1)]
    elif kind == "bytes":
        lines[at] = "\udcff\x00" + lines[at][1:]
    else:
        del lines[at]
    ending = "" if kind == "cut" and at == len(lines) - 1 else "\n"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape") + ending.encode())
    return f"{name} line {at + 1}: {kind}"


def commands(directory: Path, out: Path, with_plot: bool) -> list[list[str]]:
    d = str(directory)
    listed = [
        ["show", d],
        ["show", d, "--json"],
        ["show", d, "--run", "all"],
        ["trend", d],
        ["trend", d, "--json", "--run", "1"],
        ["worst", d],
        ["worst", d, "--json", "--run", "all"],
        ["worst", d, "--step", "10", "--run", "1"],
        ["html", d, "-o", str(out / "page.html")],
        ["html", d, "-o", str(out / "page.html"), "--json", "--run", "all"],
    ]
    if with_plot:
        listed.append(["plot", d, "-o", str(out / "plot.png"), "--run", "all"])
    return listed


def survives(argv: list[str]) -> int:
    """Run the CLI; an exception escaping `main` fails the caller."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        return main(argv)


def fuzz(root: Path, cases: int, seed: int, report: Callable[[str], None]) -> int:
    """Run `cases` mutated reports through every command; returns the commands run.

    Each command that raises, or exits with a code other than 0, 1 or 2, is passed to
    `report` (case, mutations, command, what happened).
    """
    pristine = root / "pristine"
    base_report(pristine)
    rng = random.Random(seed)
    ran = 0
    for case in range(cases):
        directory = root / "case"
        shutil.rmtree(directory, ignore_errors=True)
        shutil.copytree(pristine, directory)
        done = [mutate(directory, rng) for _ in range(rng.choice((1, 1, 2)))]
        for argv in commands(directory, root, with_plot=case % 6 == 0):
            where = f"case {case} ({'; '.join(done)}): {' '.join(argv[:1])}"
            try:
                code = survives(argv)
            except Exception as error:  # the finding is the point: keep fuzzing
                report(f"{where} raised {error!r}")
            else:
                if code not in (0, 1, 2):
                    report(f"{where} exited {code}")
            ran += 1
    return ran


def test_every_command_survives_mutated_reports(tmp_path: Path) -> None:
    """No mutation of a report makes any command raise or exit with another code."""
    failures: list[str] = []
    ran = fuzz(tmp_path, CASES, SEED, failures.append)
    assert failures == []
    assert ran >= CASES * 10


def test_the_fuzzer_finds_a_planted_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A view that raises on a hostile ratio is reported by the fuzzer (it can fail)."""
    import gradwatch.cli as cli

    real = cli._trend

    def fragile(report: Any, arguments: Any) -> int:
        if any(not 0 <= check.ratio <= 1 for check in report.checks):  # NaN, inf, 1e999
            raise OverflowError("planted")
        return int(real(report, arguments))

    monkeypatch.setattr(cli, "_trend", fragile)
    failures: list[str] = []
    fuzz(tmp_path, 30, 1, failures.append)
    assert any("trend raised OverflowError('planted')" in failure for failure in failures)
