"""A plain FSDP2 (``fully_shard``) training loop with gradwatch; run under torchrun (gloo, CPU).

Each rank prints one line ``RESULT {json}`` (as ``ddp_loop.py``), plus the peak bytes
the check allocated beyond the model (numpy and torch, measured by tracemalloc-free
accounting: the shard views are not copies).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from gradwatch.integrations.torch import after_backward, is_shadow
from torch import nn
from torch.distributed.fsdp import fully_shard

import gradwatch


class DoubledGrad(torch.autograd.Function):
    """Identity whose backward doubles the gradient: the planted bug."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return 2 * grad


class Block(nn.Module):
    def __init__(self, width: int, bug: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.bug = bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = DoubledGrad.apply(self.linear.weight) if self.bug else self.linear.weight
        return torch.tanh(nn.functional.linear(x, weight, self.linear.bias))


class Net(nn.Module):
    def __init__(self, bug: bool, width: int) -> None:
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.blocks = nn.ModuleList([Block(width, False), Block(width, bug)])
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--report", default=None)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--bug", action="store_true")
    parser.add_argument("--no-watch", action="store_true")
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--sample", default="auto")
    parser.add_argument("--dict-batch", action="store_true", help="loss_fn pops the labels")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Net(args.bug, args.width)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)
    data = [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(args.steps)]

    def loss_fn(module: nn.Module, batch: Any) -> torch.Tensor:
        if args.dict_batch:  # as HF models do: the labels popped from the inputs
            y = batch.pop("labels")
            x = batch["x"]
        else:
            x, y = batch
        logits = module(x)  # the forward's all-gathers: every rank joins them
        if rank == args.fail_rank and not torch.is_grad_enabled():
            raise ValueError(f"planted failure on rank {rank}")
        return nn.functional.cross_entropy(logits, y)

    sample: object = int(args.sample) if args.sample.isdigit() else args.sample
    watch = None
    if not args.no_watch:
        watch = gradwatch.GradWatch(every=args.every, report_dir=args.report, sample=sample)  # type: ignore[arg-type]
    for step, (x, y) in enumerate(data):
        optimizer.zero_grad()
        batch: Any = {"x": x, "labels": y} if args.dict_batch else (x, y)
        loss_fn(model, dict(batch) if args.dict_batch else batch).backward()
        if watch is not None:
            after_backward(watch, step, model, loss_fn, batch)
        optimizer.step()
    if watch is not None:
        watch.close()
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.to_local().numpy().tobytes())
    for state in optimizer.state_dict()["state"].values():
        for value in state.values():
            local = value.to_local() if hasattr(value, "to_local") else value
            digest.update(local.numpy().tobytes())
    results = [] if watch is None else watch.results
    summary = {
        "rank": rank,
        "statuses": [r.status for r in results],
        "ratios": [r.ratio for r in results],
        "errors": [r.error for r in results],
        "alerts": [sorted(n for n, t in r.tensors.items() if t.status == "fail") for r in results],
        "worst": [r.worst[0].name if r.worst else None for r in results],
        "sizes": [r.size for r in results],
        "checked": [r.checked for r in results],
        "dtype": [r.dtype for r in results],
        "writer": None if watch is None else watch.is_writer,
        "hash": digest.hexdigest(),
        "shadow": is_shadow(model),
    }
    print("RESULT " + json.dumps(summary), flush=True)
    dist.destroy_process_group()
    sys.stderr.flush()
    os._exit(0)  # see ddp_loop.py: torch can hang tearing down (pytorch/pytorch#190489)


if __name__ == "__main__":
    main()
