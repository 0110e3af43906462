"""Architecture sweep: GradWatch at default options on tiny `transformers` models.

    python -m benchmarks.architectures                       # every architecture
    python -m benchmarks.architectures --only gpt2,llama --steps 16 --every 5
    python -m benchmarks.architectures --bug                 # the planted bugs
    python -m benchmarks.architectures --json sweep.json
    python -m benchmarks.architectures --set 2              # the second sweep (setups)

Each architecture of `benchmarks.hf_models` (a tiny config built in code, synthetic
data, dropout at the config's defaults) is trained by the real ``transformers.Trainer``
twice on one thread, with the same seed:

* plain, with only a step timer: ``step s`` is the median wall time of its steps
  after the first (the first pays for lazy set-up);
* watched: ``trainer.add_callback(GradWatch(every=...))`` from
  ``gradwatch.integrations.transformers``, nothing else set (no ``loss_fn``).
  ``check s`` is the median, over checked steps, of the step's wall time minus ``step
  s`` (what a check adds to the step: the float64 copy, the checks' loss evaluations
  and the report), and ``cost`` is ``check s / step s`` in training steps.

``statuses`` lists each check's status in step order; ``ratio`` is the largest ratio
over the checks; ``evals`` the mean loss evaluations per check (``CheckResult.loss_evals``);
``same`` says whether the watched run ended with bit-identical weights to the plain run
(a check must not change training). An exception out of ``trainer.train()`` is a
``crash`` row; the sweep goes on. ``note``: the crash message, else the first failing
(or erroring) check's alert, else the first note a check added to the run's notes.

With ``--set 2`` the rows are `benchmarks.hf_setups.SETUPS` instead: models and training
setups chosen for what stresses a float64 replay (drop path, layerdrop, router jitter,
gradient checkpointing, label smoothing, bf16 autocast, LoRA, CTC, BatchNorm, Mamba),
each trained with its own `TrainingArguments` on top of these, ``GradWatch(every=1,
trainer=trainer)`` (the trainer passed so that label smoothing is checked as the
Trainer computes it), 4 steps by default.

With ``--bug`` each entry of `benchmarks.hf_bugs.BUGS` is swept instead: ``caught``
when the step-0 check fails, ``named`` is the tensor the step-0 alert names and
``local`` whether it lies under the module where the bug was planted.

Exit status 0 when every row is clean (no fail/error check, no crash; with ``--bug``:
every bug caught at step 0 and localized), else 1.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # tiny models: threads only add overhead

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from gradwatch.integrations.transformers import GradWatch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import (  # noqa: E402
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from benchmarks.hf_bugs import BUGS, PlantedBug, points_at  # noqa: E402
from benchmarks.hf_models import (  # noqa: E402
    ARCHITECTURES,
    Architecture,
    Examples,
    parameter_count,
)
from benchmarks.hf_setups import SETUPS, Setup  # noqa: E402
from gradwatch.result import CheckResult  # noqa: E402

ALERTING = ("fail", "error")
ROUTINE_NOTES = (
    "screened along",
    "directional:",
    "localized by sampling",
    "analytic gradient:",
    "live:",
    "penalties in J",
    "J = ",
    "float64 shadow of a float32 model",
    "optimizer ",
)
"""Notes every check of a clean run carries; the ``note`` column shows the others."""


class StepTimer(TrainerCallback):
    """Wall seconds of each optimizer step, from ``on_step_begin`` to ``on_step_end``."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self._started: tuple[int, float] | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._started = (state.global_step, time.perf_counter())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._started is not None:
            step, started = self._started
            self.seconds[step] = time.perf_counter() - started
            self._started = None


def training_arguments(output_dir: str, steps: int, seed: int) -> TrainingArguments:
    """A short CPU run: batch 4, lr 1e-3, no logging, no checkpoints, no reporters."""
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        seed=seed,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


@dataclass
class Run:
    """One ``trainer.train()``: its step timings, final weights and exception, if any."""

    timer: StepTimer
    weights: dict[str, torch.Tensor]
    crash: str | None
    steps_done: int
    """Optimizer updates completed (``state.global_step`` at the end)."""


def train(
    model: nn.Module,
    data: Examples,
    *,
    steps: int,
    seed: int,
    callback: TrainerCallback | Callable[[Trainer], TrainerCallback] | None = None,
    arguments: dict[str, Any] | None = None,
) -> Run:
    """Train with the real Trainer; an exception is caught and returned as ``crash``.

    ``callback`` may be a factory taking the Trainer; ``arguments`` are set on top of
    `training_arguments`.
    """
    timer = StepTimer()
    crash = None
    with tempfile.TemporaryDirectory() as output_dir:
        args = dataclasses.replace(training_arguments(output_dir, steps, seed), **(arguments or {}))
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.remove_callback(PrinterCallback)  # the table reports; no metric dicts
        trainer.add_callback(timer)
        if callback is not None:
            if not isinstance(callback, TrainerCallback):
                callback = callback(trainer)
            trainer.add_callback(callback)
        try:
            trainer.train()
        except Exception as error:  # a crash row, never the end of the sweep
            crash = f"{type(error).__name__}: {' '.join(str(error).split())}"
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Run(timer, weights, crash, trainer.state.global_step)


@dataclass
class Row:
    """One line of the table (and one object of the JSON output)."""

    name: str
    model_class: str
    task: str
    params: int
    statuses: list[str] = field(default_factory=list)
    steps_checked: list[int] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    step_ratios: list[float] = field(default_factory=list)
    """Each check's step-link ratio (checks without a step link left out)."""
    loss_evals: list[int] = field(default_factory=list)
    result_seconds: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Distinct notes the checks added to the run's notes, in order."""
    check_seconds: float | None = None
    step_seconds: float | None = None
    cost_steps: float | None = None
    same_weights: bool | None = None
    crash: str | None = None
    note: str = ""
    seconds: float = 0.0
    bug: str | None = None
    bug_module: str | None = None
    caught: bool | None = None
    named: str | None = None
    localized: bool | None = None

    @property
    def clean(self) -> bool:
        """No crash and no failing or erroring check."""
        return self.crash is None and not any(s in ALERTING for s in self.statuses)

    @property
    def max_ratio(self) -> float | None:
        finite = [r for r in self.ratios if r == r]
        return max(finite) if finite else None


def blamed_tensor(watch: GradWatch, result: CheckResult) -> str | None:
    """Where the check's alert points: the module it names (the module-local search's
    suspect), else its tensor, else the worst failing tensor, else the worst component."""
    for alert in watch.watch.alerts:
        if alert.step == result.step and (alert.module or alert.tensor) is not None:
            return str(alert.module or alert.tensor)
    failing = [
        (t.ratio, n)
        for n, t in result.tensors.items()
        if t.status in ALERTING and t.ratio is not None
    ]
    if failing:
        return max(failing)[1]
    return result.worst[0].tensor if result.worst else None


def check_notes(watch: GradWatch, result: CheckResult) -> list[str]:
    """The result's notes that are neither the run's own nor routine."""
    return [
        note
        for note in result.notes
        if note not in watch.notes and not note.startswith(ROUTINE_NOTES)
    ]


def note_for(row: Row, watch: GradWatch) -> str:
    """The crash, else the first alerting check's blame, else the first unusual note."""
    if row.crash is not None:
        return f"crash: {row.crash}"
    for result in watch.results:
        if result.status in ALERTING:
            tensor = blamed_tensor(watch, result)
            ratio = result.tensors[tensor].ratio if tensor in result.tensors else None
            blame = f"{tensor} (ratio {ratio:.2g})" if ratio is not None else str(tensor)
            extra = check_notes(watch, result)
            return f"step {result.step} {result.status}: {blame}" + (
                f"; {extra[0]}" if extra else ""
            )
    for result in watch.results:
        for note in check_notes(watch, result):
            return f"step {result.step}: {note}"
    return ""


def sweep_one(
    name: str,
    build: Callable[[], tuple[nn.Module, Examples]],
    *,
    steps: int,
    every: int,
    seed: int,
    bug: PlantedBug | None = None,
    setup: Setup | None = None,
    pass_trainer: bool = True,
) -> Row:
    """Train plain then watched; measure the checks against the plain steps.

    With a ``setup`` (the second sweep) its training arguments apply to both runs and
    the watch is given the trainer (unless ``pass_trainer`` is False: the one-line
    ``add_callback(GradWatch(every=...))`` a user writes first).
    """
    started = time.perf_counter()
    model, data = build()
    entry: Architecture | Setup = setup or ARCHITECTURES[bug.architecture if bug else name]
    row = Row(name, entry.model_class, entry.task, parameter_count(model))
    arguments = setup.arguments if setup is not None else None
    plain = train(model, data, steps=steps, seed=seed, arguments=arguments)
    model, data = build()
    watches: list[GradWatch] = []

    def watch_for(trainer: Trainer) -> GradWatch:
        given = trainer if setup is not None and pass_trainer else None
        watches.append(GradWatch(every=every, trainer=given))
        return watches[-1]

    watched = train(model, data, steps=steps, seed=seed, callback=watch_for, arguments=arguments)
    watch = watches[0]
    unchecked = [s for step, s in plain.timer.seconds.items() if step > 0] or list(
        plain.timer.seconds.values()
    )
    results = watch.results
    row.statuses = [r.status for r in results]
    row.steps_checked = [r.step if r.step is not None else -1 for r in results]
    row.ratios = [r.ratio for r in results]
    row.step_ratios = [r.step_link.ratio for r in results if r.step_link is not None]
    row.loss_evals = [r.loss_evals for r in results]
    row.result_seconds = [r.seconds for r in results]
    for result in results:
        row.notes += [n for n in result.notes if n not in watch.notes and n not in row.notes]
    row.crash = watched.crash
    if watched.crash is not None:
        row.statuses.append("crash")
    if unchecked:
        row.step_seconds = statistics.median(unchecked)
        checked = [
            watched.timer.seconds[s] for s in row.steps_checked if s in watched.timer.seconds
        ]
        if checked:
            row.check_seconds = statistics.median(checked) - row.step_seconds
            row.cost_steps = row.check_seconds / row.step_seconds
    if plain.crash is None and watched.crash is None:
        row.same_weights = all(torch.equal(a, watched.weights[k]) for k, a in plain.weights.items())
    row.note = note_for(row, watch)
    if plain.crash is not None:
        row.note = f"plain run crashed too: {plain.crash}; {row.note}"
    if bug is not None:
        first = results[0] if results and results[0].step == 0 else None
        row.bug, row.bug_module = bug.name, bug.module
        row.caught = first is not None and first.status == "fail"
        row.named = blamed_tensor(watch, first) if first is not None else None
        row.localized = bool(row.caught) and points_at(row.named, bug.module)
    row.seconds = time.perf_counter() - started
    return row


# -- output ------------------------------------------------------------------------------


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: Sequence[Row], bugs: bool) -> str:
    """A fixed-width text table, one row per architecture (or planted bug)."""
    header = ["architecture", "params", "statuses", "max ratio", "step link", "evals"]
    header += ["check s", "step ms"]
    header += ["cost", "same"]
    header += ["caught", "local", "named"] if bugs else []
    header += ["note"]
    if bugs:
        header[0] = "bug"
    lines = []
    for row in rows:
        cells = [
            row.name,
            str(row.params),
            ",".join(row.statuses) or "-",
            _number(row.max_ratio, ".1e"),
            _number(max(row.step_ratios) if row.step_ratios else None, ".1e"),
            _number(statistics.mean(row.loss_evals) if row.loss_evals else None, ".0f"),
            _number(row.check_seconds, ".2f"),
            _number(None if row.step_seconds is None else 1e3 * row.step_seconds, ".1f"),
            _number(row.cost_steps, ".0f"),
            {None: "-", True: "yes", False: "NO"}[row.same_weights],
        ]
        if bugs:
            cells += [
                "yes" if row.caught else "NO",
                "yes" if row.localized else "NO",
                row.named or "-",
            ]
        cells.append(row.note[:110])
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header[:-1])]
    right = {"params", "max ratio", "step link", "evals", "check s", "step ms", "cost"}

    def render(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if h in right else c.ljust(w)
            for c, w, h in zip(cells[:-1], widths, header, strict=False)
        ]
        return "  ".join([*parts, cells[-1]]).rstrip()

    rule = "  ".join("-" * w for w in widths) + "  ----"
    return "\n".join([render(header), rule, *(render(c) for c in lines)])


def summary(rows: Sequence[Row], bugs: bool, elapsed: float) -> str:
    crashes = sum(r.crash is not None for r in rows)
    alerted = sum(any(s in ALERTING for s in r.statuses) for r in rows)
    checks = sum(len(r.statuses) - (r.crash is not None) for r in rows)
    costs = [r.cost_steps for r in rows if r.cost_steps is not None and r.clean]
    text = (
        f"{len(rows)} rows, {checks} checks, {crashes} crashes, {alerted} with a fail/error check"
    )
    if bugs:
        caught = sum(bool(r.caught) for r in rows)
        localized = sum(bool(r.localized) for r in rows)
        text += f"; caught at step 0: {caught}/{len(rows)}, localized: {localized}/{len(rows)}"
    elif costs:
        text += f"; clean rows: worst check cost {max(costs):.0f} steps"
    return text + f"; {elapsed:.0f} s ({os.cpu_count()} cores, {torch.get_num_threads()} thread)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated architecture (or bug) names")
    parser.add_argument("--set", type=int, choices=(1, 2), default=1, help="which sweep")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (16; set 2: 4)")
    parser.add_argument("--every", type=int, help="GradWatch(every=...) (5; set 2: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-trainer", action="store_true", help="set 2: GradWatch(every=...) alone, no trainer="
    )
    parser.add_argument("--bug", action="store_true", help="sweep the planted bugs instead")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--verbose", action="store_true", help="keep gradwatch's log events")
    parser.add_argument("--list", action="store_true", help="list names and parameters, exit")
    options = parser.parse_args(argv)
    second = options.set == 2 and not options.bug
    if options.steps is None:
        options.steps = 4 if second else 16
    if options.every is None:
        options.every = 1 if second else 5
    torch.set_num_threads(options.threads)
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    warnings.filterwarnings("ignore")
    if not options.verbose:
        logging.getLogger("gradwatch").disabled = True  # the table says it all

    catalogue: dict[str, Any] = BUGS if options.bug else SETUPS if second else ARCHITECTURES
    names = list(catalogue)
    if options.only:
        wanted = {n.strip() for n in options.only.split(",") if n.strip()}
        unknown = wanted - set(names) - {b.architecture for b in BUGS.values()}
        if unknown:
            parser.error(f"--only: unknown {sorted(unknown)}; choose from {names}")
        names = [
            n for n in names if n in wanted or (options.bug and catalogue[n].architecture in wanted)
        ]
    if options.list:
        for name in names:
            model, _ = catalogue[name].build(options.seed)
            print(f"{name:26s} {parameter_count(model):>7d}  {type(model).__name__}")
        return 0

    rows = []
    started = time.perf_counter()
    for name in names:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        entry = catalogue[name]
        rows.append(
            sweep_one(
                name,
                functools.partial(entry.build, options.seed),
                steps=options.steps,
                every=options.every,
                seed=options.seed,
                bug=entry if options.bug else None,
                setup=entry if second else None,
                pass_trainer=not options.no_trainer,
            )
        )
        row = rows[-1]
        print(f"    {','.join(row.statuses)} in {row.seconds:.0f} s", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    print(table(rows, options.bug))
    print()
    print(summary(rows, options.bug, elapsed))
    if options.json:
        document = {
            "command": " ".join(["python -m benchmarks.architectures", *(argv or sys.argv[1:])]),
            "set": options.set,
            "steps": options.steps,
            "every": options.every,
            "seconds": elapsed,
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "cores": os.cpu_count(),
                "threads": torch.get_num_threads(),
            },
            "rows": [{**asdict(r), "clean": r.clean} for r in rows],
        }
        with open(options.json, "w") as handle:
            json.dump(document, handle, indent=2)
    if options.bug:
        return 0 if all(r.caught and r.localized for r in rows) else 1
    return 0 if all(r.clean for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
