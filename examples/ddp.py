"""A DDP training loop on 2 CPU processes, with a gradient bug only a collective check sees.

The model centers its hidden features over the whole global batch: each rank
subtracts the mean over every rank's rows (an ``all_reduce`` in the forward, like
SyncBatchNorm). Its backward must reduce across ranks too. ``--bug`` plants the
mistake people make writing such a layer by hand: the backward subtracts the mean of
this rank's gradient only. Each rank's gradient is then wrong, DDP averages the wrong
gradients, and training goes on quietly.

A check of each rank's own loss cannot judge this layer: even the correct backward
carries the other ranks' gradients, so it would be flagged too. gradwatch's check is
collective: every rank perturbs the same component, J is the mean of the ranks'
losses (whose gradient is what DDP averages), and every rank reaches the same
verdict, naming the same tensor. Only rank 0 writes the report.

    torchrun --nproc_per_node 2 examples/ddp.py --bug
    gradwatch show runs/ddp/gradwatch

Exit status: 0 without alert, 1 when a check alerted (on every rank).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from gradwatch.integrations.torch import RngState, after_backward
from torch import nn

import gradwatch


class GlobalCentering(torch.autograd.Function):
    """h - mean of h over every rank's rows; ``correct=False`` forgets the ranks in backward."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, correct: bool) -> torch.Tensor:
        total = h.sum(0, keepdim=True)
        dist.all_reduce(total)
        ctx.rows = h.shape[0] * dist.get_world_size()
        ctx.correct = correct
        return h - total / ctx.rows

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        total = grad.sum(0, keepdim=True)
        if ctx.correct:
            dist.all_reduce(total)  # the mean in forward mixed every rank's rows
            return grad - total / ctx.rows, None
        return grad - total / grad.shape[0], None  # the bug: this rank's rows only


class Net(nn.Module):
    def __init__(self, bug: bool) -> None:
        super().__init__()
        self.hidden = nn.Linear(10, 16)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(16, 3)
        self.bug = bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = GlobalCentering.apply(self.hidden(x), not self.bug)
        return self.head(self.dropout(torch.tanh(h)))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bug", action="store_true", help="forget the ranks in backward")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--report-dir", default="runs/ddp/gradwatch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    rank = dist.get_rank()

    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.parallel.DistributedDataParallel(Net(args.bug))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    watch = gradwatch.GradWatch(every=args.every, report_dir=args.report_dir)
    for step in range(args.steps):
        x = torch.randn(16, 10, generator=generator)
        batch = (x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long())
        optimizer.zero_grad()
        rng = RngState.capture()  # the dropout draws the step check replays
        loss = loss_fn(model, batch)
        loss.backward()
        after_backward(watch, step, model, loss_fn, batch, step_check=True, rng=rng)
        optimizer.step()
    watch.close()
    if rank == 0:
        verdict = f"{len(watch.alerts)} alert(s)" if watch.alerts else "no alert"
        print(f"{verdict}; report: {watch.report_dir} (gradwatch show {args.report_dir})")
    dist.destroy_process_group()
    return 1 if watch.alerts else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # torch can hang tearing down the autograd engine's threads after a process group
    # (about 1 run in 10 on CPU, with or without gradwatch: pytorch/pytorch#190489).
    os._exit(code)
