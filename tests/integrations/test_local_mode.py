"""The module-local mode (issue 25): float64 work one block at a time, no whole-model copy.

Oracles: the planted bug's module (`benchmarks.local_bugs`), correct models of the
architecture sweep (every block passes), the training run without gradwatch (bit-identical
weights), a gradient hook on a known tensor (the step link names it).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch
from gradwatch.integrations._local import blocks
from gradwatch.integrations._local.blocks import (
    check_blocks,
    chosen_blocks,
    model_blocks,
    per_check,
    resolve_mode,
)
from gradwatch.integrations.torch import RngState, after_backward
from torch import nn

import gradwatch
from benchmarks.hf_models import build
from benchmarks.local_bugs import LOCAL_BUGS, batch_of, model_loss
from gradwatch.errors import OptionError

pytestmark = pytest.mark.torch


def rotate(model: nn.Module, batch: Any) -> tuple[list[str], list[str], set[str]]:
    """One full rotation of local checks: statuses, suspects named, blocks covered."""
    statuses: list[str] = []
    suspects: list[str] = []
    covered: set[str] = set()
    checks = math.ceil(len(model_blocks(model)) / per_check(model_blocks(model)))
    for done in range(checks):
        result, _ = check_blocks(model, model_loss, batch, done=done)
        assert result.mode == "local" and result.coverage is not None
        assert result.localization is not None
        statuses.append(result.status)
        suspects += [s.module for s in result.localization.suspects]
        covered |= set(result.coverage.modules)
    return statuses, suspects, covered


@pytest.mark.parametrize(
    "name", ["gpt2-gelu", "gemma2-gelu", "resnet-batchnorm", "llama-detached-attention"]
)
def test_a_rotation_names_the_planted_module(name: str) -> None:
    """Over one rotation the local mode fails where the bug is and names exactly its module
    (a parameter-free activation, sandwich norms, a BatchNorm, glue in a layer's forward)."""
    bug = LOCAL_BUGS[name]
    model, batch = bug.build()
    statuses, suspects, covered = rotate(model, batch)
    assert covered == set(model_blocks(model))
    assert "fail" in statuses
    assert set(suspects) == {bug.expected}


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert-mlm", "t5", "vit", "mixtral"])
def test_every_block_of_a_correct_model_passes(name: str) -> None:
    """No false alarm: every block of a correct swept architecture passes (train mode,
    dropout replayed), over a whole rotation."""
    model, data = build(name)
    statuses, suspects, covered = rotate(model.train(), batch_of(data))
    assert covered == set(model_blocks(model))
    assert statuses == ["ok"] * len(statuses) and suspects == []


def test_blocks_are_the_layers_and_the_modules_around_them() -> None:
    """A GPT-2 divides into its embeddings, each layer, the final norm and the head, and
    the rotation covers every block once per ceil(blocks / per_check) checks."""
    model, _ = build("gpt2")
    found = model_blocks(model)
    layers = [
        f"transformer.h.{n}" for n, _ in model.get_submodule("transformer.h").named_children()
    ]
    assert set(layers) <= set(found) and "lm_head" in found and "transformer.wte" in found
    count = per_check(found)
    turns = math.ceil(len(found) / count)
    assert {b for done in range(turns) for b in chosen_blocks(found, done, count)} == set(found)


class Net(nn.Module):
    """Dropout and train-mode BatchNorm: draws to replay, running statistics to leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.2)),
            nn.Sequential(nn.Linear(12, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.2)),
        )
        self.head = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def train(watch: gradwatch.GradWatch | None, hook: bool = False) -> tuple[Net, list[Any]]:
    """Six SGD steps; with a watch, a local check (and step link) after each backward."""
    torch.manual_seed(0)
    model = Net()
    if hook:  # a gradient hook scaling one weight's gradient: the optimizer's .grad is wrong
        model.head.weight.register_hook(lambda g: g * 1.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    results = []
    for step in range(6):
        optimizer.zero_grad()
        rng = RngState.capture()
        loss_fn(model, (x, y)).backward()
        if watch is not None:
            before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            result = after_backward(
                watch, step, model, loss_fn, (x, y), step_check=True, rng=rng, mode="local"
            )
            results.append(result)
            after = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            assert all(torch.equal(before[n], after[n]) for n in before)  # .grad untouched
        optimizer.step()
    return model, results


def test_training_is_bit_identical_and_the_step_link_agrees() -> None:
    """With a local check at every step the weights and running statistics end bit for bit
    as without gradwatch; every check and step link passes, the rotation covers all."""
    plain, _ = train(None)
    watched, results = train(gradwatch.GradWatch(every=1, report_dir=None))
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [r.status for r in results] == ["ok"] * 6
    assert all(r.step_link is not None and r.step_link.status == "ok" for r in results)
    covered = {m for r in results if r.coverage is not None for m in r.coverage.modules}
    assert covered == set(model_blocks(plain)) == {"layers.0", "layers.1", "head"}


def test_the_step_link_names_a_hooked_gradient() -> None:
    """A hook scaling head.weight's gradient by 1.1 fails the step link of the check that
    covers the head, and names that tensor (the capture pass runs no parameter hook)."""
    _, results = train(gradwatch.GradWatch(every=1, report_dir=None), hook=True)
    covering = [r for r in results if r.coverage is not None and "head" in r.coverage.modules]
    assert covering and all(r.status == "fail" for r in covering)
    links = [r.step_link for r in covering]
    assert all(link is not None and link.worst_tensor == "head.weight" for link in links)
    others = [r for r in results if r not in covering]
    assert all(r.status == "ok" for r in others)


def test_auto_picks_by_size_and_bad_modes_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """'auto' checks the whole model below AUTO_LOCAL_MIN_PARAMETERS and module by module
    from it, unless penalties are in J; an unknown mode is an OptionError saying what is
    expected."""
    model = Net()
    assert resolve_mode(model, "auto") == "whole"
    monkeypatch.setattr(blocks, "AUTO_LOCAL_MIN_PARAMETERS", 10)
    assert resolve_mode(model, "auto") == "local"
    assert resolve_mode(model, "auto", precision="native") == "whole"
    assert resolve_mode(model, "auto", penalties=True) == "whole"  # outside every block
    assert resolve_mode(model, "whole") == "whole"
    with pytest.raises(OptionError, match="mode: expected one of 'auto', 'whole', 'local'"):
        resolve_mode(model, "fast")  # type: ignore[arg-type]


class _WrongLookup(torch.autograd.Function):
    """An embedding lookup whose backward scales the rows' gradient by 1.1."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.rows = weight.shape[0]
        return weight[ids]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (ids,) = ctx.saved_tensors
        grad = torch.zeros(ctx.rows, g.shape[-1], dtype=g.dtype)
        grad.index_add_(0, ids.reshape(-1), 1.1 * g.reshape(-1, g.shape[-1]))
        return grad, None


class WrongEmbedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _WrongLookup.apply(self.weight, ids)


class LanguageModel(nn.Module):
    """A 5000-token vocabulary: its embedding and head are checked on a few rows."""

    def __init__(self, embedding: type[nn.Embedding]) -> None:
        super().__init__()
        self.embed = embedding(5000, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5000)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.mix(self.embed(ids))))
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


@pytest.mark.parametrize("embedding", [nn.Embedding, WrongEmbedding])
def test_vocabulary_sized_blocks_are_checked_on_a_few_rows(embedding: type[nn.Embedding]) -> None:
    """The embedding (rows its ids use) and the head (1024 random output rows) are checked
    on compact copies: a wrong embedding backward is still named, a correct one passes."""
    torch.manual_seed(0)
    model = LanguageModel(embedding)
    ids = torch.randint(0, 5000, (4, 12))
    statuses, suspects, notes = [], [], []
    for done in range(math.ceil(len(model_blocks(model)) / per_check(model_blocks(model)))):
        result, _ = check_blocks(model, lambda m, b: m(b), ids, done=done)
        assert result.localization is not None
        statuses.append(result.status)
        suspects += [s.module for s in result.localization.suspects]
        notes += result.localization.notes
    assert any(n.startswith("embed: checked on the") and "(of 5000)" in n for n in notes)
    assert "head: checked on 1024 random output rows (of 5000)" in notes
    assert suspects == (["embed"] if embedding is WrongEmbedding else [])


def test_the_trainer_callback_takes_mode(tmp_path: Any) -> None:
    """GradWatch(mode="local") under the HF Trainer runs module-local checks (coverage
    rotating over the blocks) and training ends bit-identical to the run without it."""
    pytest.importorskip("accelerate")
    from gradwatch.integrations.transformers import GradWatch

    from benchmarks.architectures import train as hf_train

    plain = hf_train(*build("gpt2"), steps=3, seed=0)
    callback = GradWatch(every=1, mode="local", report_dir=tmp_path)
    watched = hf_train(*build("gpt2"), steps=3, seed=0, callback=callback)
    assert plain.crash is None and watched.crash is None
    assert all(torch.equal(a, watched.weights[k]) for k, a in plain.weights.items())
    results = callback.results
    assert [r.mode for r in results] == ["local"] * 3 and all(r.status == "ok" for r in results)
    assert all(r.step_link is not None and r.step_link.status == "ok" for r in results)
    assert len({tuple(r.coverage.modules) for r in results if r.coverage is not None}) == 3
    with pytest.raises(OptionError, match="mode: expected one of"):
        GradWatch(every=1, mode="everything")
