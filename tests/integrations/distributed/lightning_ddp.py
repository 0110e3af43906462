"""A Lightning ``strategy="ddp"`` run with the GradWatch callback (2 CPU processes, gloo).

Run it with plain ``python`` (Lightning re-launches the script for rank 1) or under
``torchrun --nproc_per_node 2``. Each rank prints one line ``RESULT {json}``: its
checks' statuses, ratios, step links, the tensors the alerts name, whether it writes
the report, and a hash of the final weights and optimizer state. ``--bug`` plants a
custom autograd.Function whose backward doubles the head bias's gradient.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from gradwatch.integrations.lightning import GradWatch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DoubledBiasGrad(torch.autograd.Function):
    """y = x + b whose backward doubles b's gradient: the planted bug."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return x + b

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, 2 * grad.sum(0)


class Net(pl.LightningModule):
    def __init__(self, bug: bool) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 8)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(8, 3, bias=False)
        self.head_bias = nn.Parameter(torch.zeros(3))
        self.bug = bug
        self.wrapper = ""
        """The class of the module Lightning trains (its DDP wrapper) during fit."""
        self.grad_norms: list[float] = []
        """||.grad|| before Lightning clips it, at every update."""

    def on_train_start(self) -> None:
        self.wrapper = type(self.trainer.strategy.model).__name__

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        norms = [p.grad.norm() for p in self.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.stack(norms).norm()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.dropout(torch.tanh(self.hidden(x))))
        if self.bug:
            return DoubledBiasGrad.apply(out, self.head_bias)
        return out + self.head_bias

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        # a collective in self.log: the check's copy must drop it (or it would hang)
        self.log("train_loss", loss, sync_dist=True, batch_size=len(x))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fit(args: argparse.Namespace, watch: GradWatch | None) -> tuple[Net, pl.Trainer]:
    """One ``trainer.fit`` from the same seed and data, with or without the callback."""
    pl.seed_everything(0, verbose=False)
    module = Net(args.bug)
    samples = 2 * 5 * args.steps * args.accumulate  # 5 a batch, each rank its own half
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(samples, 6, generator=generator),
        torch.randint(0, 3, (samples,), generator=generator),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip,
        callbacks=[] if watch is None else [watch],
        default_root_dir=args.root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=5))
    return module, trainer


def fingerprint(module: Net, trainer: pl.Trainer) -> str:
    """A hash of the final weights and optimizer state."""
    digest = hashlib.sha256()
    for tensor in module.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    for state in trainer.optimizers[0].state_dict()["state"].values():
        for value in state.values():
            digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True, help="the trainer's default_root_dir")
    parser.add_argument("--report", default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--bug", action="store_true")
    parser.add_argument(
        "--plain-first",
        action="store_true",
        help="fit once without the callback first (under torchrun only: a second fit of a "
        "script Lightning launched would launch rank 1 again)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    plain_hash = fingerprint(*fit(args, None)) if args.plain_first else None
    watch = GradWatch(every=args.every, report_dir=args.report)
    module, trainer = fit(args, watch)
    results = watch.results
    summary = {
        "rank": trainer.global_rank,
        "launched_by": "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "lightning",
        "wrapper": module.wrapper,
        "grad_norms": module.grad_norms,
        "steps": [r.step for r in results],
        "statuses": [r.status for r in results],
        "ratios": [r.ratio for r in results],
        "errors": [r.error for r in results],
        "step_links": [None if r.step_link is None else r.step_link.ratio for r in results],
        "clip_factors": [None if r.step_link is None else r.step_link.clip_factor for r in results],
        "alerts": [sorted(n for n, t in r.tensors.items() if t.status == "fail") for r in results],
        "worst": [r.worst[0].name if r.worst else None for r in results],
        "writer": watch.watch.is_writer,
        "global_step": trainer.global_step,
        "hash": fingerprint(module, trainer),
        "plain_hash": plain_hash,
    }
    print("RESULT " + json.dumps(summary), flush=True)
    dist.barrier()  # both ranks printed before either leaves
    dist.destroy_process_group()
    sys.stderr.flush()
    # torch can hang tearing down DDP and the autograd engine's threads
    # (pytorch/pytorch#190489); leave at once.
    os._exit(0)


if __name__ == "__main__":
    main()
