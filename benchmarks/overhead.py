"""Training overhead of the HF Trainer callback: wall time and peak memory, side by side.

    python -m benchmarks.overhead                      # 1,000 steps, 3 rounds
    python -m benchmarks.overhead --steps 200 --rounds 1
    python -m benchmarks.overhead --memory-only        # the larger config only

Each run is a fresh subprocess (so ``ru_maxrss`` is that run's peak) training
examples/hf_trainer.py's model with the Trainer on one thread. Variants run interleaved
(baseline, default, budget, baseline, ...) so a busy machine slows them alike; the
report gives medians and the spread over rounds.

* ``baseline``: no callback.
* ``default``: ``GradWatch(every=500)``, all defaults.
* ``budget``: ``GradWatch(every=500, budget=0.01)``.

Time is ``trainer.train()``'s wall time; overhead = median(variant) / median(baseline) - 1,
plus the checks' own seconds as the report records them. Memory: the tiny model's
float64 copy (8 bytes x ~18k parameters = 0.15 MB) is far below run-to-run RSS noise,
so the peak-memory difference is also measured on a larger config (hidden 256, 4
layers, ~3.3M parameters, a few steps with a check) where one float64 copy (~25 MB) is
visible. It is measured twice: with glibc's default allocator (freed memory may stay in
the process) and with ``MALLOC_MMAP_THRESHOLD_=131072`` (every block above 128 KiB is
returned when freed, so RSS follows live memory). The second run also measures the
float64 activations of one forward + backward of the batch (what the check's analytic
pass holds besides the shadow; it grows with the batch, not with the parameters).
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
from typing import Any

VARIANTS = ("baseline", "default", "budget")
MEMORY_VARIANTS = ("baseline", "default", "native")
"""``native``: ``GradWatch(every=5, precision="native")``, the shadow in the model's dtype."""


def child(variant: str, steps: int, every: int, large: bool) -> dict[str, Any]:
    """One training run in this process; returns wall time, peak RSS and the checks."""
    import logging

    import torch
    from gradwatch.integrations.transformers import GradWatch
    from transformers import BertConfig, BertForSequenceClassification, Trainer

    from examples.hf_trainer import CustomHead, SyntheticTokens, build_model, training_arguments

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    if large:
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=100,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=12,
            type_vocab_size=1,
            num_labels=3,
        )
        model = BertForSequenceClassification(config)
        model.classifier = CustomHead(config.hidden_size, config.num_labels)
    else:
        model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as output_dir:
        args = training_arguments(output_dir, max_steps=steps, logging_steps=10**9)
        trainer = Trainer(model=model, args=args, train_dataset=SyntheticTokens(size=256))
        watch = None
        if variant == "default":
            watch = GradWatch(every=every)
        elif variant == "native":
            watch = GradWatch(every=every, precision="native")
        elif variant == "budget":
            watch = GradWatch(every=every, budget=0.01)
        if watch is not None:
            trainer.add_callback(watch)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.train()
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        checks = [] if watch is None else watch.results
        plans = [] if watch is None else watch.watch.plans
        activations_mb = float64_activations_mb(model, trainer) if large else 0.0
    return {
        "activations_mb": activations_mb,
        "variant": variant,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_mb": peak_kb / 1024,
        "rss_before_train_mb": rss_before / 1024,
        "n_params": n_params,
        "check_seconds": sum(c.seconds for c in checks),
        "checks": [(c.step, c.mode, c.loss_evals, round(c.seconds, 3)) for c in checks],
        "plans": [(p.step, str(p.sample), p.action) for p in plans],
    }


def float64_activations_mb(model: Any, trainer: Any) -> float:
    """Peak RSS above the start of one float64 forward + backward of a training batch.

    Gradients are dropped as they arrive (as the check's analytic pass does), so what
    remains is the activations autograd saves, in float64.
    """
    import copy
    import threading

    import torch

    shadow = copy.deepcopy(model).to(torch.float64)
    for p in shadow.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    batch = next(iter(trainer.get_train_dataloader()))
    peak, start, done = [0], current_rss(), threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], current_rss())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    shadow(**batch).loss.backward()
    done.set()
    sampler.join()
    return (peak[0] - start) / 2**20


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(
    variant: str, steps: int, every: int, large: bool, returning: bool = False
) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.overhead", "--child", variant]
    command += ["--steps", str(steps), "--every", str(every)]
    if large:
        command.append("--large")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if returning:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    line = done.stdout.strip().splitlines()[-1]
    return json.loads(line)  # type: ignore[no-any-return]


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    return f" (min {min(values):.2f}, max {max(values):.2f})"


def time_overhead(steps: int, every: int, rounds: int) -> None:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for round_ in range(rounds):
        for variant in VARIANTS:
            result = run_child(variant, steps, every, large=False)
            runs[variant].append(result)
            print(
                f"round {round_} {variant:8} train {result['seconds']:6.2f} s "
                f"(cpu {result['cpu_seconds']:6.2f} s)  "
                f"checks {result['check_seconds']:5.2f} s  peak {result['peak_mb']:6.1f} MB  "
                f"{result['checks']}  {result['plans']}",
                flush=True,
            )
    n_params = runs["baseline"][0]["n_params"]
    print(f"\n{steps} steps, every={every}, {n_params} parameters, {rounds} rounds (medians)")
    for clock in ("seconds", "cpu_seconds"):
        base = [r[clock] for r in runs["baseline"]]
        base_median = statistics.median(base)
        print(f"{clock}: baseline {base_median:6.2f} s{spread(base)}")
        for variant in VARIANTS[1:]:
            values = [r[clock] for r in runs[variant]]
            paired = [v / b - 1 for v, b in zip(values, base, strict=True)]
            checks = statistics.median(r["check_seconds"] for r in runs[variant])
            print(
                f"  {variant:8} {statistics.median(values):6.2f} s{spread(values)}  overhead "
                f"{statistics.median(values) / base_median - 1:+.1%} (paired per round: "
                + ", ".join(f"{p:+.1%}" for p in paired)
                + f")  checks' recorded time {checks:.2f} s = {checks / base_median:.1%} of "
                "baseline"
            )
    print("peak RSS (median): " + memory_line(runs, n_params))


def memory_line(runs: dict[str, list[dict[str, Any]]], n_params: int) -> str:
    base = statistics.median(r["peak_mb"] for r in runs["baseline"])
    copy_mb = 8 * n_params / 2**20
    parts = [f"baseline {base:.1f} MB"]
    for variant in [v for v in runs if v != "baseline"]:
        if runs.get(variant):
            peak = statistics.median(r["peak_mb"] for r in runs[variant])
            parts.append(
                f"{variant} {peak - base:+.1f} MB = {(peak - base) / copy_mb:.2f} x one float64 "
                f"copy ({copy_mb:.2f} MB)"
            )
    return "; ".join(parts)


def memory_overhead(rounds: int) -> None:
    for returning in (False, True):
        allocator = "MALLOC_MMAP_THRESHOLD_=131072" if returning else "default allocator"
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in MEMORY_VARIANTS}
        for _ in range(rounds):
            for variant in runs:
                # 6 steps, a check at steps 0 and 5: the peak includes a check
                result = run_child(variant, 6, 5, large=True, returning=returning)
                runs[variant].append(result)
                print(
                    f"large {variant:8} ({allocator}) peak {result['peak_mb']:7.1f} MB  "
                    f"(before train {result['rss_before_train_mb']:.1f} MB)  "
                    f"checks {result['checks']}",
                    flush=True,
                )
        n_params = runs["baseline"][0]["n_params"]
        print(
            f"\nlarger config, {n_params} parameters, {rounds} rounds, {allocator}: "
            + memory_line(runs, n_params)
        )
        if returning:
            activations = statistics.median(r["activations_mb"] for r in runs["baseline"])
            print(
                f"float64 activations of one forward + backward of the batch: "
                f"{activations:.1f} MB = {activations / (8 * n_params / 2**20):.2f} x one "
                "float64 copy"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--child", choices=sorted({*VARIANTS, *MEMORY_VARIANTS}), help=argparse.SUPPRESS
    )
    parser.add_argument("--large", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--time-only", action="store_true")
    options = parser.parse_args()
    if options.child:
        print(json.dumps(child(options.child, options.steps, options.every, options.large)))
        return
    if not options.memory_only:
        time_overhead(options.steps, options.every, options.rounds)
    if not options.time_only:
        memory_overhead(options.rounds)


if __name__ == "__main__":
    main()
