"""Detection quality on the bug zoo: recall, false alarms, localization, cost.

    python -m benchmarks.zoo                 # the whole zoo, markdown table on stdout
    python -m benchmarks.zoo --no-gradcheck  # gradwatch columns only
    python -m benchmarks.zoo --only np_sign_db2 pt_dropout

Every entry of ``tests/zoo`` (planted bugs and correct models) is checked by:

* gradwatch full (``sample=None``), default (what ``GradWatch()`` uses, ``"auto"``:
  full up to 2000 components, else per-tensor random-direction detection plus sampled
  localization in flagged tensors) and plain sampled (``sample=0.1``);
* ``torch.autograd.gradcheck`` at its default tolerances in float64 and float32
  (numpy entries through an autograd.Function whose backward is the numpy one).

A bug is *caught* when the checker alerts (gradwatch: status "fail"; gradcheck: it
raises) and *localized* when the tensor it blames (gradwatch: the worst component's;
gradcheck: the input index of its Jacobian mismatch, mapped back to the parameter) is
one whose gradient the bug makes wrong. A correct model that alerts is a false alarm.
Entries marked "train" run a short training with ``GradWatch(every=...)`` attached
(gradcheck at the same steps); the cost columns then sum over the run's checks.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # tiny models: threads only add overhead

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from tests.zoo import ENTRIES, Training, ZooEntry  # noqa: E402
from tests.zoo.harness import DEFAULT, Outcome, run_gradcheck, run_gradwatch  # noqa: E402

GRADWATCH_COLUMNS: dict[str, object] = {"full": None, "default": DEFAULT, "sampled 0.1": 0.1}
GRADCHECK_COLUMNS = {"gradcheck f64": "float64", "gradcheck f32": "float32"}


@dataclass
class Row:
    entry: ZooEntry
    size: str
    outcomes: dict[str, Outcome] = field(default_factory=dict)


def evaluate(entries: Sequence[ZooEntry], gradcheck: bool) -> list[Row]:
    rows = []
    for entry in entries:
        print(f"  {entry.name} ...", file=sys.stderr, flush=True)
        row = Row(entry, _size(entry))
        for column, sample in GRADWATCH_COLUMNS.items():
            row.outcomes[column] = run_gradwatch(entry, sample)
        if gradcheck:
            for column, dtype in GRADCHECK_COLUMNS.items():
                row.outcomes[column] = run_gradcheck(entry, dtype)
        rows.append(row)
    return rows


def _size(entry: ZooEntry) -> str:
    problem = entry.problem()
    if isinstance(problem, Training):
        return f"train {problem.steps}"
    if hasattr(problem, "params"):
        return str(sum(p.size for p in problem.params.values()))
    return str(sum(p.numel() for p in problem.model.parameters() if p.requires_grad))


def verdict(entry: ZooEntry, outcome: Outcome) -> str:
    if entry.kind == "correct":
        return "**FALSE ALARM**" if outcome.alert else "quiet"
    if not outcome.alert:
        return "**missed**"
    if outcome.localized(entry):
        return f"caught `{outcome.tensor}`"
    return f"caught, **blames `{outcome.tensor}`**"


def cost(outcome: Outcome) -> str:
    return f"{outcome.evals} / {outcome.seconds:.2f}s"


def table(rows: list[Row]) -> str:
    columns = list(rows[0].outcomes)
    header = ["entry", "kind", "params", "planted in"]
    for column in columns:
        header.append(column)
        if column in GRADWATCH_COLUMNS:
            header.append("evals / s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        entry = row.entry
        cells = [f"`{entry.name}`", f"{entry.kind} ({entry.framework})", row.size]
        cells.append(f"`{entry.buggy[0]}`" if entry.buggy else "—")
        for column in columns:
            cells.append(verdict(entry, row.outcomes[column]))
            if column in GRADWATCH_COLUMNS:
                cells.append(cost(row.outcomes[column]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def totals(rows: list[Row]) -> str:
    bugs = [r for r in rows if r.entry.kind == "bug"]
    correct = [r for r in rows if r.entry.kind == "correct"]
    lines = [
        "| checker | recall | false alarms | localized | loss evals | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for column in rows[0].outcomes:
        caught = sum(r.outcomes[column].alert for r in bugs)
        localized = sum(r.outcomes[column].localized(r.entry) for r in bugs)
        alarms = sum(r.outcomes[column].alert for r in correct)
        evals = sum(r.outcomes[column].evals for r in rows)
        seconds = sum(r.outcomes[column].seconds for r in rows)
        lines.append(
            f"| {column} | {caught}/{len(bugs)} ({caught / max(len(bugs), 1):.0%}) "
            f"| {alarms}/{len(correct)} | {localized}/{len(bugs)} "
            f"({localized / max(len(bugs), 1):.0%}) | {evals} | {seconds:.1f} |"
        )
    return "\n".join(lines)


def notes(rows: list[Row]) -> str:
    lines = []
    for row in rows:
        entry = row.entry
        lines.append(
            f"- `{entry.name}`: {entry.description}." + (f" {entry.note}" if entry.note else "")
        )
        if isinstance(entry.problem(), Training):
            for column, outcome in row.outcomes.items():
                lines.append(f"  - {column}: {outcome.note}")
        for column, outcome in row.outcomes.items():
            wrong = outcome.alert if entry.kind == "correct" else not outcome.localized(entry)
            if wrong and not isinstance(entry.problem(), Training):
                lines.append(f"  - {column}: {outcome.note}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these entries only")
    parser.add_argument("--no-gradcheck", action="store_true", help="skip the gradcheck columns")
    args = parser.parse_args(argv)
    logging.getLogger("gradwatch").disabled = True  # alerts are the point here, not noise
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    entries = [e for e in ENTRIES if not args.only or e.name in args.only]
    started = time.perf_counter()
    rows = evaluate(entries, gradcheck=not args.no_gradcheck)
    elapsed = time.perf_counter() - started
    print(table(rows))
    print()
    print(totals(rows))
    print()
    print(notes(rows))
    print()
    print(f"{len(rows)} entries in {elapsed:.0f} s ({os.cpu_count()} cores, one thread).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
