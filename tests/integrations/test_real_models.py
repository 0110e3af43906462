"""Real `transformers` model code on gradwatch's float64 copy (issue 11's four causes).

Each test builds an architecture shipped inside `transformers` from a tiny config
(`benchmarks.hf_models`) and checks it as the Trainer callback does: the model's own
``loss`` output on a padded batch, dropout on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gradwatch.integrations._shadow.mode import ShadowMode, grouped_mm_by_groups
from gradwatch.integrations.torch import check_due, check_module, is_shadow
from gradwatch.integrations.transformers import model_loss

import gradwatch
from benchmarks.hf_models import ARCHITECTURES

pytestmark = pytest.mark.torch


def _model_and_batch(name: str, rows: int = 4) -> tuple[Any, dict[str, Any]]:
    model, data = ARCHITECTURES[name].build()
    model.train()
    batch = {key: torch.stack([data[i][key] for i in range(rows)]) for key in data[0]}
    return model, batch


# -- 1. the model's own float32 casts -------------------------------------------------------


def test_requests_for_float32_yield_the_shadow_dtype() -> None:
    """Inside the mode every way model code asks for float32 gets float64; views keep theirs."""
    x = torch.randn(3, dtype=torch.float64)
    with ShadowMode(torch.float64) as mode:
        made = {
            ".float()": x.float(),
            ".half()": x.half(),
            ".to(float32)": x.to(torch.float32),
            ".to(device, float32)": x.to("cpu", torch.float32),
            ".to(dtype=bfloat16)": x.to(dtype=torch.bfloat16),
            ".type(float32)": x.type(torch.float32),
            ".type('torch.FloatTensor')": x.type("torch.FloatTensor"),
            "softmax(dtype=float32)": torch.softmax(x, -1, dtype=torch.float32),
            "zeros(dtype=float32)": torch.zeros(2, dtype=torch.float32),
            "ones() default dtype": torch.ones(2),
            "int.float()": torch.arange(3).float(),
        }
        view = x.view(torch.int64)
    assert {name: t.dtype for name, t in made.items()} == dict.fromkeys(made, torch.float64)
    assert view.dtype == torch.int64
    assert mode.coarse_ops == []
    assert torch.get_default_dtype() == torch.float32


def test_float32_values_pass_through_exactly() -> None:
    """An upcast answered in float64 computes the same numbers as float64 would."""
    x = torch.randn(5, dtype=torch.float64)
    with ShadowMode(torch.float64):
        y = torch.softmax(x.float(), -1)
    assert torch.equal(y, torch.softmax(x, -1))


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5", "deberta-v2-mlm"])
def test_models_that_upcast_are_clean_and_resolve_float64(name: str) -> None:
    """GPT-2 (`logits.float()` in the loss), Llama (RMSNorm `.to(float32)`), T5 (its
    LayerNorm's float32 variance) and DeBERTa-v2 pass the default check; before the mode
    their J was rounded to float32 and every check failed."""
    model, batch = _model_and_batch(name)
    result = check_module(model, model_loss, batch, sample="auto")
    assert result.status == "ok", (result.ratio, result.notes)
    assert result.ratio < 1e-6
    assert result.dtype == "float64"
    assert not any("coarser" in note or "rounded" in note for note in result.notes)


def test_a_loss_computed_outside_torch_in_float32_is_said_not_failed() -> None:
    """A cross-entropy evaluated by numpy in float32 (invisible to the mode) is detected from
    J's value, checked in float32 instead, and the result says so."""

    class Float32CrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            z = logits.detach().numpy().astype(np.float32)
            z = z - z.max(-1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
            picked = p[np.arange(len(p)), labels.numpy()]
            ctx.save_for_backward(torch.from_numpy(p), labels)
            return torch.tensor(float(-np.log(picked).mean()), dtype=logits.dtype)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            p, labels = ctx.saved_tensors
            d = p.clone().double()
            d[torch.arange(len(d)), labels] -= 1
            return (grad * d / len(d)).to(grad.dtype), None

    def loss_fn(model: Any, batch: dict[str, Any]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        logits = logits.reshape(-1, logits.shape[-1])
        return Float32CrossEntropy.apply(logits, batch["input_ids"][:, 1:].reshape(-1))

    model, batch = _model_and_batch("gpt2")
    result = check_module(model, loss_fn, batch, sample="auto")
    assert result.status != "fail", result.ratio
    assert result.dtype == "float32"
    assert any("rounded to float32" in note for note in result.notes), result.notes


# -- 2. tied embeddings with padding_idx ------------------------------------------------------


@pytest.mark.parametrize("name", ["bert-mlm", "opt"])
def test_padding_row_of_a_tied_embedding_is_checked_as_torch_trains_it(name: str) -> None:
    """Every component of a tied word embedding, the padding row included, matches: the
    lookup holds that row, the tied LM head still trains it (numeric and autograd agree).
    Without an attention mask J reads the padding row in the lookup too."""
    model, batch = _model_and_batch(name)
    batch.pop("attention_mask", None)
    embedding = model.get_input_embeddings()
    assert embedding.padding_idx is not None
    assert model.get_output_embeddings().weight is embedding.weight
    assert (batch["input_ids"] == embedding.padding_idx).any()
    for p in model.parameters():
        p.requires_grad_(p is embedding.weight)
    result = check_module(model, model_loss, batch)  # every component of the embedding
    (verdict,) = result.tensors.values()
    assert result.checked == embedding.weight.numel()
    assert verdict.status == "ok" and result.status == "ok", (result.ratio, result.worst[:3])
    grad = torch.autograd.grad(model_loss(model, batch), embedding.weight)[0]
    assert grad[embedding.padding_idx].abs().max() > 0  # the head trains the padding row


# -- 3. kernels without float64 ------------------------------------------------------------


def test_grouped_mm_reference_matches_torch() -> None:
    """The float64 stand-in for torch._grouped_mm gives torch's float32 numbers."""
    a, b = torch.randn(6, 8), torch.randn(3, 8, 4)
    offs = torch.tensor([2, 2, 5], dtype=torch.int32)
    expected = torch._grouped_mm(a, b, offs=offs)[:5]
    got = grouped_mm_by_groups(a.double(), b.double(), offs=offs)[:5]
    assert torch.allclose(got.float(), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe"])
def test_mixture_of_experts_is_checked_in_float64(name: str) -> None:
    """MoE experts run `grouped_mm`, which has no float64 kernel: the check runs gradwatch's
    reference implementation in float64, passes, and says so."""
    model, batch = _model_and_batch(name)
    result = check_module(model, model_loss, batch, sample="auto")
    assert result.status == "ok", (result.ratio, result.notes)
    assert result.dtype == "float64"
    assert any("grouped_mm" in note and "reference" in note for note in result.notes)


# -- 4. a check never kills training ---------------------------------------------------------


def test_a_float64_failure_falls_back_to_the_models_precision() -> None:
    """J that raises only on the float64 copy (a kernel without float64, a dtype assertion)
    is checked in the model's float32 instead, with a note quoting the error."""

    def float32_only(model: Any, batch: dict[str, Any]) -> torch.Tensor:
        if next(model.parameters()).dtype == torch.float64:
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
        return model_loss(model, batch)

    model, batch = _model_and_batch("llama")
    result = check_module(model, float32_only, batch, sample="auto")
    assert result.status == "ok", (result.ratio, result.notes)
    assert result.dtype == "float32"
    assert any("float64 copy raised RuntimeError: mixed dtype" in note for note in result.notes)


def test_an_exception_inside_a_check_is_recorded_and_training_goes_on(tmp_path: Any) -> None:
    """A loss that raises on gradwatch's copy in every precision gives an `error` check that
    names the copy, and the next due check still runs."""
    broken = {"on": True}

    def flaky(model: Any, batch: dict[str, Any]) -> torch.Tensor:
        if broken["on"] and is_shadow(model):
            raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
        return model_loss(model, batch)

    model, batch = _model_and_batch("gpt2")
    watch = gradwatch.GradWatch(every=1, report_dir=tmp_path)
    first = check_due(watch, 0, model, flaky, batch)
    broken["on"] = False
    second = check_due(watch, 1, model, flaky, batch)
    watch.close()
    assert first.status == "error"
    assert first.error is not None and "mixed dtype" in first.error
    assert first.error_source is not None and "copy of the model" in first.error_source
    assert second.status == "ok"
    assert [c.status for c in gradwatch.load_report(tmp_path).checks] == ["error", "ok"]


def test_a_check_that_cannot_run_does_not_stop_the_trainer() -> None:
    """Under the real Trainer, a J that raises on gradwatch's copy in every precision gives
    `error` checks while all training steps complete with the weights of a plain run."""
    from gradwatch.integrations.transformers import GradWatch

    from benchmarks.architectures import train

    def broken(model: Any, batch: dict[str, Any]) -> torch.Tensor:
        if is_shadow(model):
            raise RuntimeError("no kernel for this dtype")
        return model_loss(model, batch)

    model, data = ARCHITECTURES["gpt2"].build()
    plain_model, _ = ARCHITECTURES["gpt2"].build()
    watch = GradWatch(every=2, loss_fn=broken)
    run = train(model, data, steps=3, seed=0, callback=watch)
    plain = train(plain_model, data, steps=3, seed=0)
    assert run.crash is None and run.steps_done == 3
    assert [(r.step, r.status) for r in watch.results] == [(0, "error"), (2, "error")]
    assert all("no kernel for this dtype" in (r.error or "") for r in watch.results)
    assert all(torch.equal(w, plain.weights[k]) for k, w in run.weights.items())


def test_a_classic_autograd_function_says_readably_why_the_fast_path_is_off() -> None:
    """A forward(ctx, ...) Function that vmap refuses is checked one by one, and the note says
    why in a sentence with no truncated URL."""

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x, w)
            return x * w

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x, w = ctx.saved_tensors
            return grad * w, (grad * x).sum(0)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(40))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return Scale.apply(x, self.w)

    x = torch.randn(3, 40)
    result = check_module(Net(), lambda m, b: m(b).square().mean(), x)
    assert result.status == "ok"
    (note,) = [n for n in result.notes if n.startswith("batched evaluation unavailable")]
    assert "classic style" in note and "setup_context" in note and "http" not in note
