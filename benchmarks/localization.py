"""Where the bug is: the cost of the module-local search, and its false suspects.

    OMP_NUM_THREADS=1 python -m benchmarks.localization            # all three parts
    python -m benchmarks.localization --part cost --layers 10       # the 10M GPT-2 only
    python -m benchmarks.localization --part sweep                  # 0 false suspects?

``cost``: a GPT-2 of about 10M parameters (vocabulary 8192, width 256, 10 layers, 4
heads, batch 4 x 128 tokens, float32, one thread) whose layer-4 GELU backward forgets
the product rule (`benchmarks.hf_bugs.BuggyTanhGELU`). One training step (forward,
backward, AdamW) is timed plainly (median of 5, CPU time); then, in training steps of
CPU time:

* ``search``: the module-local search alone (`check_modules`: a float64 copy, one
  captured forward+backward, the adjoint tests of the calls on the failing path);
* ``check (default)``: ``check_module(..., sample="auto")`` as a callback's failing
  check runs it: the core's screen, a second screen that confirms it, then the search;
* ``check, per_tensor=True`` (skipped by ``--no-full``): the core measures each tensor along its own
  direction before the search (2 evaluations per tensor; the cost before issue 24's fix).

``sweep``: every module call of every model of the first architecture sweep
(`benchmarks.hf_models.ARCHITECTURES`, train mode, 4 examples) checked locally
(``scope="all"``): a call that does not pass is a false suspect (must be 0).

``bugs``: each planted bug of `benchmarks.local_bugs` through ``check_module``: named
when the suspects are exactly the expected module.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from gradwatch.integrations.torch import check_module, check_modules  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.hf_bugs import BuggyTanhGELU  # noqa: E402
from benchmarks.hf_models import ARCHITECTURES  # noqa: E402
from benchmarks.hf_setups import SETUPS  # noqa: E402
from benchmarks.local_bugs import LOCAL_BUGS, batch_of, model_loss  # noqa: E402

BUG_LAYER = 4


def gpt2(layers: int, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The ~10M GPT-2 (at 10 layers) with layer 4's GELU backward wrong, and a batch."""
    config = transformers.GPT2Config(
        vocab_size=8192, n_embd=256, n_layer=layers, n_head=4, n_positions=128
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    model.transformer.h[min(BUG_LAYER, layers - 1)].mlp.act = BuggyTanhGELU()
    ids = torch.randint(0, 8192, (4, 128), generator=torch.Generator().manual_seed(seed))
    return model.train(), {"input_ids": ids, "labels": ids}


def step_seconds(model: nn.Module, batch: dict[str, torch.Tensor], steps: int = 5) -> float:
    """Median CPU time of a training step (forward, backward, AdamW) on a copy."""
    import copy

    trained = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        started = time.process_time()
        optimizer.zero_grad()
        model_loss(trained, batch).backward()
        optimizer.step()
        times.append(time.process_time() - started)
    return statistics.median(times[1:])


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    """CPU seconds of ``run()`` (one thread: steady on a shared machine), and its value."""
    started = time.process_time()
    value = run()
    return time.process_time() - started, value


def cost(layers: int, full: bool) -> None:
    model, batch = gpt2(layers)
    params = sum(p.numel() for p in model.parameters())
    step = step_seconds(model, batch)
    print(f"GPT-2 {params / 1e6:.1f}M parameters, bug in transformer.h.{BUG_LAYER}.mlp.act")
    print(f"training step: {step:.3f} s")
    seconds, found = timed(lambda: check_modules(model, model_loss, batch))
    suspects = [s.module for s in found.suspects]
    print(
        f"search alone: {seconds:.2f} s = {seconds / step:.1f} steps; {found.checks} module "
        f"calls checked, {found.evaluations} module evaluations; suspects {suspects}"
    )
    runs: list[tuple[str, dict[str, Any]]] = [("check (default)", {})]
    if full:  # before issue 24's fix: the core measured each tensor before the search
        runs.append(("check, per_tensor=True", {"per_tensor": True, "localize_evaluations": 0}))
    for label, options in runs:
        seconds, result = timed(
            lambda options=options: check_module(model, model_loss, batch, sample="auto", **options)
        )
        local = result.localization
        named = [s.module for s in local.suspects] if local else None
        search = (
            f"the search {local.seconds:.2f} s wall, {local.checks} calls, "
            f"{local.evaluations} module evaluations"
            if local
            else "no search"
        )
        print(
            f"{label}: {result.status}, {seconds:.1f} s = {seconds / step:.0f} steps, "
            f"{result.loss_evals} loss evaluations, {search}; suspects {named}"
        )


def sweep(second: bool = False) -> None:
    """Every module call of every model of the first (or, ``second``, the second) sweep."""
    false_suspects = 0
    calls = 0
    catalogue: dict[str, Any] = dict(SETUPS if second else ARCHITECTURES)
    for name, architecture in catalogue.items():
        model, data = architecture.build()
        found = check_modules(model.train(), model_loss, batch_of(data), scope="all")
        bad = [v for v in found.modules if v.status not in ("ok", "unreached")]
        worst = max(
            (max(v.input_ratio or 0.0, v.parameter_ratio or 0.0) for v in found.modules),
            default=0.0,
        )
        calls += len(found.modules)
        false_suspects += len(bad)
        print(
            f"{name:16s} {len(found.modules):3d} calls  largest local ratio {worst:.1e}  "
            f"not ok: {[(v.module, v.status, v.note) for v in bad] or 0}"
        )
    print(f"sweep: {calls} module calls in {len(catalogue)} models, {false_suspects} not ok")


def bugs() -> None:
    named = 0
    for name, bug in LOCAL_BUGS.items():
        model, batch = bug.build()
        seconds, result = timed(
            lambda model=model, batch=batch: check_module(model, model_loss, batch, sample="auto")
        )
        local = result.localization
        suspects = [s.module for s in local.suspects] if local else []
        ok = suspects == [bug.expected]
        named += ok
        print(
            f"{name:26s} {result.status:4s} {'named' if ok else 'NOT NAMED'}  "
            f"{suspects}  search {local.seconds if local else float('nan'):.2f} s of "
            f"{seconds:.1f} s"
        )
    print(f"bugs: {named}/{len(LOCAL_BUGS)} named at the planted module")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["cost", "sweep", "bugs", "all"], default="all")
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--set", type=int, choices=(1, 2), default=1, help="sweep: which one")
    parser.add_argument(
        "--no-full",
        action="store_true",
        help="skip the per_tensor=True check (the cost before issue 24)",
    )
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    warnings.filterwarnings("ignore")
    logging.getLogger("gradwatch").disabled = True
    if options.part in ("sweep", "all"):
        sweep(second=options.set == 2)
    if options.part in ("bugs", "all"):
        bugs()
    if options.part in ("cost", "all"):
        cost(options.layers, not options.no_full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
