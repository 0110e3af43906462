"""The Hugging Face Trainer with gradwatch's callback; run under torchrun or accelerate launch.

The Trainer wraps the model in DDP (gloo, CPU). Each rank prints one line
``RESULT {json}``: its checks' statuses, ratios, step links, the tensors the alerts
name, whether it writes the report, and a hash of the final weights and optimizer
state. Tiny models from configs in code (`benchmarks.hf_models`), random data, no
downloads; ``--bug`` plants a wrong backward from `benchmarks.hf_bugs`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))  # benchmarks/, when run as a script

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from gradwatch.integrations.transformers import GradWatch  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from benchmarks.hf_bugs import BUGS  # noqa: E402
from benchmarks.hf_models import ARCHITECTURES  # noqa: E402

MODELS = {"gpt2": ("gpt2", "gpt2-gelu"), "bert": ("bert-cls", "bert-layernorm")}
"""--model: (the architecture of `hf_models`, the bug of `hf_bugs` --bug plants)."""


def _hash(trainer: Trainer) -> str:
    digest = hashlib.sha256()
    for tensor in trainer.model.state_dict().values():  # type: ignore[union-attr]
        digest.update(tensor.detach().numpy().tobytes())
    for state in trainer.optimizer.state_dict()["state"].values():  # type: ignore[union-attr]
        for value in state.values():
            digest.update(torch.as_tensor(value).numpy().tobytes())
    return digest.hexdigest()


def _losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _train(
    options: argparse.Namespace, output: str, watched: bool
) -> tuple[Trainer, GradWatch | None]:
    """Train the tiny model (seeded: the same run each time), with gradwatch if ``watched``."""
    architecture, bug = MODELS[options.model]
    model, data = ARCHITECTURES[architecture].build(0)
    if options.bug:
        BUGS[bug].plant(model)
    args = TrainingArguments(
        output_dir=output,
        max_steps=options.steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=options.accumulation,
        max_grad_norm=options.max_grad_norm,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    watch = GradWatch(every=options.every, trainer=trainer) if watched else None
    if watch is not None:
        trainer.add_callback(watch)
    trainer.train()
    return trainer, watch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True, help="the Trainer's output_dir")
    parser.add_argument("--model", choices=sorted(MODELS), default="gpt2")
    parser.add_argument("--bug", action="store_true")
    parser.add_argument("--no-watch", action="store_true")
    parser.add_argument("--also-plain", action="store_true", help="then train without gradwatch")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--accumulation", type=int, default=1)
    options = parser.parse_args()
    trainer, watch = _train(options, options.output, not options.no_watch)
    results = [] if watch is None else watch.results
    summary: dict[str, Any] = {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "ddp": type(trainer.model_wrapped).__name__,
        "steps": [r.step for r in results],
        "statuses": [r.status for r in results],
        "ratios": [r.ratio for r in results],
        "errors": [r.error for r in results],
        "step_links": [None if r.step_link is None else r.step_link.ratio for r in results],
        "step_scales": [None if r.step_link is None else r.step_link.scale for r in results],
        "clip_factors": [None if r.step_link is None else r.step_link.clip_factor for r in results],
        "alerts": [sorted(n for n, t in r.tensors.items() if t.status == "fail") for r in results],
        "worst": [r.worst[0].name if r.worst else None for r in results],
        "writer": None if watch is None else watch.watch.is_writer,
        "losses": _losses(trainer),
        "hash": _hash(trainer),
    }
    if options.also_plain:  # the same training again in this process, without gradwatch
        plain, _ = _train(options, str(Path(options.output) / "plain"), False)
        summary["plain_losses"], summary["plain_hash"] = _losses(plain), _hash(plain)
    if dist.is_initialized():
        dist.barrier()  # every rank's training logs printed: RESULT lines are not cut into
    sys.stdout.write("RESULT " + json.dumps(summary) + "\n")  # one write, one line
    sys.stdout.flush()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stderr.flush()
    # torch can hang tearing down DDP and the autograd engine's threads
    # (pytorch/pytorch#190489); leave at once, as ddp_loop.py does.
    os._exit(0)


if __name__ == "__main__":
    main()
