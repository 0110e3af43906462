"""A plain DDP training loop with gradwatch; run under torchrun (gloo, CPU).

Each rank prints one line ``RESULT {json}``: its checks' statuses, the tensors the
alerts name, the report's files, and a hash of the final weights and optimizer state.
Options plant a gradient bug, a collective in the forward, a failing or dying rank.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from gradwatch.integrations.torch import RngState, after_backward, is_shadow
from torch import nn

import gradwatch


class DoubledBiasGrad(torch.autograd.Function):
    """y = x + b whose backward doubles b's gradient: the planted bug."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return x + b

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, 2 * grad.sum(0)


class CrossRankCentering(nn.Module):
    """Subtracts the feature mean over every rank's batch: a collective in the forward."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        total = dist_fn.all_reduce(h.sum(0, keepdim=True))
        count = h.shape[0] * dist.get_world_size()
        return h - total / count


class Net(nn.Module):
    def __init__(self, bug: bool, collective: bool, expert: bool = False) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 8)
        self.expert = nn.Linear(8, 8)
        self.use_expert = expert
        """Like an MoE expert no token of this rank's batch was routed to, when False."""
        self.centering = CrossRankCentering() if collective else nn.Identity()
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(8, 3, bias=False)
        self.head_bias = nn.Parameter(torch.zeros(3))
        self.bug = bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(torch.tanh(self.centering(self.hidden(x))))
        if self.use_expert:
            h = h + self.expert(h)
        out = self.head(h)
        if self.bug:
            return DoubledBiasGrad.apply(out, self.head_bias)
        return out + self.head_bias


def main() -> None:
    if os.environ.get("GRADWATCH_TEST_DUMP_AFTER"):  # debugging a hang: where is each rank?
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["GRADWATCH_TEST_DUMP_AFTER"]), exit=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--report", default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--bug", action="store_true")
    parser.add_argument("--collective", action="store_true")
    parser.add_argument("--no-watch", action="store_true")
    parser.add_argument("--raise-alert", action="store_true")
    parser.add_argument("--fail-rank", type=int, default=-1, help="its loss_fn raises in checks")
    parser.add_argument("--die-rank", type=int, default=-1, help="it exits during a check")
    parser.add_argument("--sample", default="auto")
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--expert-rank", type=int, default=-1, help="the one rank using it")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = Net(args.bug, args.collective, expert=rank == args.expert_rank)
    model = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # each rank its own data and dropout draws
    data = [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(args.steps)]

    def loss_fn(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if is_shadow(module) and rank == args.fail_rank:
            raise ValueError(f"planted failure on rank {rank}")
        if is_shadow(module) and rank == args.die_rank:
            os._exit(3)
        x, y = batch
        return nn.functional.cross_entropy(module(x), y)

    sample: object = int(args.sample) if args.sample.isdigit() else args.sample
    watch = None
    if not args.no_watch:
        watch = gradwatch.GradWatch(
            every=args.every,
            report_dir=args.report,
            sample=sample,  # type: ignore[arg-type]
            budget=args.budget,
            on_alert="raise" if args.raise_alert else "log",
        )
    stopped = None
    try:
        for step, batch in enumerate(data):
            optimizer.zero_grad()
            rng = RngState.capture()
            loss_fn(model, batch).backward()
            if watch is not None:
                after_backward(watch, step, model, loss_fn, batch, step_check=True, rng=rng)
            optimizer.step()
    except gradwatch.GradientCheckError as error:
        stopped = f"step {step}: {error.result.status}"
    if watch is not None:
        watch.close()
    digest = hashlib.sha256()
    for tensor in model.module.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    for state in optimizer.state_dict()["state"].values():
        for value in state.values():
            digest.update(value.numpy().tobytes())
    results = [] if watch is None else watch.results
    summary = {
        "rank": rank,
        "statuses": [r.status for r in results],
        "ratios": [r.ratio for r in results],
        "errors": [r.error for r in results],
        "step_links": [None if r.step_link is None else r.step_link.ratio for r in results],
        "alerts": [sorted(n for n, t in r.tensors.items() if t.status == "fail") for r in results],
        "worst": [r.worst[0].name if r.worst else None for r in results],
        "writer": None if watch is None else watch.is_writer,
        "stopped": stopped,
        "hash": digest.hexdigest(),
    }
    print("RESULT " + json.dumps(summary), flush=True)
    dist.destroy_process_group()
    sys.stderr.flush()
    # torch can hang tearing down DDP and the autograd engine's threads (about 1 run in
    # 10 here, with or without gradwatch: pytorch/pytorch#190489); leave at once.
    os._exit(0)


if __name__ == "__main__":
    main()
