"""PyTorch's DDP tutorial pattern: ``torch.multiprocessing.spawn``, no ``RANK`` set (gloo, CPU).

Each rank builds its GradWatch before the process group exists (as a script that
builds everything up front does), checks a small DDP model and prints one line
``RESULT {json}``: its statuses, whether it wrote the report, and its pid.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
from gradwatch.integrations.torch import after_backward
from torch import nn
from torch.multiprocessing.spawn import spawn

import gradwatch


def worker(rank: int, world_size: int, report: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    watch = gradwatch.GradWatch(every=2, report_dir=report)  # no rank known yet
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=30)
    )
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)
    data = [(torch.randn(5, 4), torch.randn(5, 2)) for _ in range(4)]

    def loss_fn(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(module(x), y)

    for step, batch in enumerate(data):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        after_backward(watch, step, model, loss_fn, batch)
        optimizer.step()
    watch.close()
    summary = {
        "rank": rank,
        "pid": os.getpid(),
        "statuses": [result.status for result in watch.results],
        "ratios": [result.ratio for result in watch.results],
        "writer": watch.is_writer,
    }
    print("RESULT " + json.dumps(summary), flush=True)
    dist.destroy_process_group()
    sys.stderr.flush()
    os._exit(0)  # see ddp_loop.py: torch may hang tearing down DDP's threads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--report", required=True)
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spawn(worker, args=(2, args.report, port), nprocs=2, join=True)


if __name__ == "__main__":
    main()
