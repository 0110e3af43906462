"""Check cost and peak memory of the HF Trainer callback from a 1M to a 774M GPT-2 (issue 25).

    OMP_NUM_THREADS=1 python -m benchmarks.scaling                       # 1M..124M, ~15 min
    OMP_NUM_THREADS=1 python -m benchmarks.scaling --sizes 774M --modes none,auto --steps 4
    OMP_NUM_THREADS=1 python -m benchmarks.scaling --failing 124M     # a failing local check

Each (size, mode) runs in a subprocess of its own (peak RSS is a process's): the real
`transformers.Trainer` trains a GPT-2 built from a config (dropout 0.1 as GPT-2 has it;
batch 4 x 128 random tokens; AdamW; CPU, one torch thread) for ``--steps`` steps, without
a callback (``none``) or with ``GradWatch(every=--every, mode=...)`` at otherwise default
options (``auto``: the mode the size picks). A step's CPU time runs from ``on_step_begin``
to ``on_step_end`` (``time.process_time``); a step with a check minus the median step
without one is the check's cost, in training steps. Peak RSS is ``ru_maxrss`` at the end.
Step 0 (the first step: the optimizer's state is allocated there) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

SIZES: dict[str, dict[str, int]] = {
    "1M": {"vocab_size": 2048, "n_embd": 128, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "10M": {"vocab_size": 8192, "n_embd": 256, "n_layer": 10, "n_head": 4, "n_positions": 128},
    "40M": {"vocab_size": 32768, "n_embd": 512, "n_layer": 8, "n_head": 8, "n_positions": 128},
    "124M": {"vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12},
    "355M": {"vocab_size": 50257, "n_embd": 1024, "n_layer": 24, "n_head": 16},
    "774M": {"vocab_size": 50257, "n_embd": 1280, "n_layer": 36, "n_head": 20},
}
"""GPT-2 configurations by (rounded) parameter count; 124M/355M/774M are GPT-2 small,
medium and large."""

BATCH, SEQUENCE = 4, 128


def child(size: str, mode: str, steps: int, every: int, threads: int) -> dict[str, Any]:
    """One training run; returns its measurements (printed as JSON by ``--child``)."""
    import torch
    import transformers
    from gradwatch.integrations.transformers import GradWatch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from benchmarks.hf_models import Examples

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**SIZES[size]))
    params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    shape = (BATCH * steps, SEQUENCE)
    ids = torch.randint(0, SIZES[size]["vocab_size"], shape, generator=generator)
    data = Examples({"input_ids": ids, "labels": ids.clone()})

    class Timer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.cpu: dict[int, float] = {}
            self._started = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._started = time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.cpu[state.global_step - 1] = time.process_time() - self._started

    timer = Timer()
    watch = None if mode == "none" else GradWatch(every=every, mode=mode)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=BATCH,
            learning_rate=1e-4,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.add_callback(timer)
        if watch is not None:
            trainer.add_callback(watch)
        trainer.train()
    checks = [
        {
            "step": r.step,
            "status": r.status,
            "mode": r.mode,
            "seconds": r.seconds,
            "loss_evals": r.loss_evals,
            "modules": r.coverage.modules if r.coverage is not None else None,
            "step_link": r.step_link.ratio if r.step_link is not None else None,
        }
        for r in (watch.results if watch is not None else [])
    ]
    return {
        "size": size,
        "mode": mode,
        "params": params,
        "cpu": timer.cpu,
        "checks": checks,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def failing(size: str, threads: int) -> None:
    """A failing module-local check: layer 4's GELU backward wrong (the last layer's in a
    smaller model; it drops the product rule), checked with `check_blocks` after a
    training step over one rotation; prints each check's cost in training steps."""
    import torch
    from gradwatch.integrations._local.blocks import check_blocks
    from gradwatch.integrations._step import MicroBatch
    from gradwatch.integrations.torch import RngState
    from transformers import GPT2Config, GPT2LMHeadModel

    from benchmarks.hf_bugs import BuggyTanhGELU

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**SIZES[size])).train()
    layer = min(4, SIZES[size]["n_layer"] - 1)
    model.transformer.h[layer].mlp.act = BuggyTanhGELU()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, SIZES[size]["vocab_size"], (BATCH, SEQUENCE))
    batch = {"input_ids": ids, "labels": ids}

    def loss_fn(m: Any, b: Any) -> Any:
        return m(**b).loss

    seconds = []
    for _ in range(4):
        started = time.process_time()
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
        seconds.append(time.process_time() - started)
    step = statistics.median(seconds[1:])
    optimizer.zero_grad()
    rng = RngState.capture()
    loss_fn(model, batch).backward()
    for done in range(4):
        started = time.process_time()
        result, _ = check_blocks(
            model, loss_fn, batch, done=done, step_batches=[MicroBatch(batch, 1.0, rng)]
        )
        cpu = time.process_time() - started
        assert result.coverage is not None and result.localization is not None
        print(
            f"blocks {', '.join(result.coverage.modules)}: {result.status}, suspects "
            f"{[s.module for s in result.localization.suspects]}, {result.localization.checks} "
            f"calls, {result.loss_evals} module evaluations, {cpu:.1f} s CPU = "
            f"{cpu / step:.1f} steps (a step: {step:.2f} s)"
        )


def run(size: str, mode: str, steps: int, every: int, threads: int) -> dict[str, Any]:
    """`child` in a fresh interpreter (its own peak RSS)."""
    command = [sys.executable, "-m", "benchmarks.scaling", "--child", size, mode]
    command += ["--steps", str(steps), "--every", str(every), "--threads", str(threads)]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if done.returncode != 0:
        return {"size": size, "mode": mode, "crash": done.stderr.strip().splitlines()[-1:]}
    measured: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return measured


def row(measured: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    """One line of the table."""
    if "crash" in measured:
        return f"| {measured['size']} | {measured['mode']} | crashed: {measured['crash']} |"
    cpu = {int(step): seconds for step, seconds in measured["cpu"].items()}
    checked = {c["step"] for c in measured["checks"]}
    plain = [s for step, s in cpu.items() if step > 0 and step not in checked]
    step = statistics.median(plain) if plain else float("nan")
    later = [cpu[s] - step for s in sorted(checked) if s > 0 and s in cpu]
    first = cpu.get(0, float("nan")) - step if 0 in checked else None
    cost = statistics.median(later) if later else None
    modes = sorted({c["mode"] for c in measured["checks"]}) or ["-"]
    statuses = ",".join(c["status"] for c in measured["checks"]) or "-"
    rss = measured["peak_rss_mb"]
    ratio = ""
    if baseline is not None and "crash" not in baseline:
        ratio = f"{rss / baseline['peak_rss_mb']:.2f}x"
    return (
        f"| {measured['size']} | {measured['params'] / 1e6:.1f}M | {measured['mode']} "
        f"({'/'.join(modes)}) | {step:.2f} | "
        + ("-" if cost is None else f"{cost:.2f} s = {cost / step:.1f}")
        + " | "
        + ("-" if first is None else f"{first / step:.1f}")
        + f" | {statuses} | {rss:.0f} MB | {ratio} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,10M,40M,124M", help=f"of {', '.join(SIZES)}")
    parser.add_argument("--modes", default="none,auto,whole", help="none, auto, whole, local")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", metavar="PATH", help="also write the measurements")
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--failing", metavar="SIZE", help="a failing local check's cost instead")
    options = parser.parse_args(argv)
    if options.failing:
        failing(options.failing, options.threads)
        return 0
    if options.child:
        size, mode = options.child
        print(json.dumps(child(size, mode, options.steps, options.every, options.threads)))
        return 0
    print(
        "| size | parameters | mode (ran) | step CPU s | a later check: CPU s = steps | "
        "first check (step 0), steps | statuses | peak RSS | vs none |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    everything = []
    for size in options.sizes.split(","):
        baseline = None
        for mode in options.modes.split(","):
            measured = run(size, mode, options.steps, options.every, options.threads)
            everything.append(measured)
            baseline = measured if mode == "none" else baseline
            print(row(measured, None if mode == "none" else baseline), flush=True)
    if options.json:
        with open(options.json, "w") as file:
            json.dump(everything, file, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
