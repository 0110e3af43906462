"""Per-rank time and memory of one check: one process, DDP and FSDP2 on 2 CPU ranks.

    python -m benchmarks.distributed                  # width 1024, 4 blocks (~4.2M params)
    python -m benchmarks.distributed --width 512 --json

The same MLP (``blocks`` residual tanh blocks of ``width`` x ``width``) and batch on every
rank, checked with ``check_module(..., sample="auto")`` (what ``GradWatch`` runs by default):

* ``one process``: no process group; the float64 shadow check every single-device run gets.
* ``DDP, 2 ranks``: ``DistributedDataParallel``; each rank checks a float64 shadow of the
  whole model (a replica), J the mean of the ranks' losses.
* ``FSDP2, 2 ranks``: ``fully_shard`` per block and at the root; checked in place in
  float32, each rank's shards in turn, nothing gathered outside FSDP's own forward.

Memory is the peak resident set during the check minus the resident set just before it,
sampled every millisecond by a thread, with ``MALLOC_MMAP_THRESHOLD_=131072`` so freed
blocks leave the process and RSS follows live memory. Each configuration is a fresh
process (``torchrun --standalone`` for the 2-rank ones), one torch thread per rank.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

PAGE = os.sysconf("SC_PAGE_SIZE")


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.linear(h))


def make_model(width: int, blocks: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(Block(width) for _ in range(blocks)))


def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(batch).square().mean()


def _local(parameter: torch.Tensor) -> torch.Tensor:
    """A parameter's part on this rank (an FSDP2 DTensor's shard, else itself)."""
    to_local = getattr(parameter, "to_local", None)
    return parameter if to_local is None else to_local()


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakRss:
    """The largest RSS seen while inside, sampled every millisecond."""

    def __enter__(self) -> PeakRss:
        self.start = _rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def measure(mode: str, width: int, blocks: int, batch_rows: int) -> dict[str, Any]:
    """Build the model in ``mode``, take one training backward, check it; the figures."""
    from gradwatch.integrations.torch import check_module

    model: nn.Module = make_model(width, blocks)
    rank = 0
    if mode != "one":
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
        rank = dist.get_rank()
        if mode == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for block in model:
                fully_shard(block)
            fully_shard(model)
    generator = torch.Generator().manual_seed(1 + rank)
    batch = torch.randn(batch_rows, width, generator=generator)
    loss_fn(model, batch).backward()
    parameters = sum(_local(p).numel() for p in model.parameters())
    started = time.perf_counter()
    with PeakRss() as rss:
        result = check_module(model, loss_fn, batch, sample="auto")  # GradWatch's default
    seconds = time.perf_counter() - started
    return {
        "mode": mode,
        "rank": rank,
        "status": result.status,
        "ratio": result.ratio,
        "dtype": result.dtype,
        "loss_evals": result.loss_evals,
        "seconds": seconds,
        "peak_mb": (rss.peak - rss.start) / 2**20,
        "local_parameters": parameters,
    }


def _worker(args: argparse.Namespace) -> None:
    figures = measure(args.worker, args.width, args.blocks, args.batch)
    print("RESULT " + json.dumps(figures), flush=True)
    sys.stdout.flush()
    os._exit(0)  # see examples/ddp.py (pytorch/pytorch#190489)


def _launch(mode: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    sizes = ["--width", str(args.width), "--blocks", str(args.blocks), "--batch", str(args.batch)]
    script = [str(Path(__file__).resolve()), "--worker", mode, *sizes]
    if mode == "one":
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node=2", *script]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    ranks_output = done.stdout.replace("RESULT ", "\nRESULT ")  # two ranks may share a line
    lines = [line for line in ranks_output.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return sorted((json.loads(line[7:]) for line in lines), key=lambda r: r["rank"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=["one", "ddp", "fsdp"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    rows = [row for mode in ("one", "ddp", "fsdp") for row in _launch(mode, args)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    names = {"one": "one process", "ddp": "DDP, 2 ranks", "fsdp": "FSDP2, 2 ranks"}
    float32_mb = sum(row["local_parameters"] for row in rows if row["mode"] == "one") * 4 / 2**20
    print(f"model: {args.blocks} blocks of {args.width}x{args.width}, {float32_mb:.1f} MB float32")
    print("| configuration | rank | params held | status | dtype | J evals | check s | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {names[row['mode']]} | {row['rank']} | {row['local_parameters']:,} | "
            f"{row['status']} | {row['dtype']} | {row['loss_evals']} | {row['seconds']:.2f} | "
            f"{row['peak_mb']:.1f} |"
        )


if __name__ == "__main__":
    main()
