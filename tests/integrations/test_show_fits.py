"""`gradwatch show` fits 80 columns x 40 lines on real reports: the BERT example and a Gemma2."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
import transformers
from gradwatch.integrations.transformers import GradWatch

from examples import hf_trainer
from tests.reports import run_cli

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def shown(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    """`gradwatch show ARGV...`: its exit code and the lines it printed."""
    code, out, _ = run_cli(capsys, "show", *argv)
    return code, out.splitlines()


def assert_fits(lines: list[str]) -> None:
    """At most 40 lines of at most 80 columns; no note cut in the middle of a word."""
    assert len(lines) <= 40, "\n".join(lines)
    assert max(len(line) for line in lines) <= 80
    notes = False
    for line in lines:
        notes = notes or line.startswith("notes that change")
        if line.startswith("next:"):
            break
        if notes:
            assert not re.search(r"\w\.\.\.$", line), line


def test_show_fits_on_the_bert_example_and_after_a_rerun(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 41-tensor BERT example with its bug, then rerun fixed: each view fits 80x40."""
    report = tmp_path / "report"
    assert hf_trainer.main(["--bug", "--report-dir", str(report)]) == 1
    capsys.readouterr()
    code, lines = shown(capsys, str(report))
    assert code == 1 and "  step 0: ratio 1.50e-01, bug in classifier, worst -" in lines
    assert_fits(lines)
    assert hf_trainer.main(["--report-dir", str(report)]) == 0
    capsys.readouterr()
    for argv, expected in (([], 0), (["--run", "1"], 1), (["--run", "all"], 1)):
        code, lines = shown(capsys, str(report), *argv)
        assert code == expected
        assert_fits(lines)


class WrongGELUBackward(torch.autograd.Function):
    """tanh-GELU whose backward forgets the product rule's x * d(tanh) term."""

    @staticmethod
    def forward(ctx: Any, x: Any) -> Any:
        ctx.save_for_backward(x)
        return torch.nn.functional.gelu(x, approximate="tanh")

    @staticmethod
    def backward(ctx: Any, grad: Any) -> Any:
        (x,) = ctx.saved_tensors
        inner = 0.7978845608028654 * (x + 0.044715 * x**3)
        return grad * 0.5 * (1 + torch.tanh(inner))


class BuggyGELU(torch.nn.Module):
    def forward(self, x: Any) -> Any:
        return WrongGELUBackward.apply(x)


def test_show_fits_on_a_gemma2_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny Gemma2 trained by the HF Trainer with a wrong GELU backward: show fits 80x40."""
    from benchmarks.hf_models import causal_lm_examples

    config = transformers.Gemma2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config)
    model.model.layers[0].mlp.act_fn = BuggyGELU()
    trainer = transformers.Trainer(
        model=model,
        args=hf_trainer.training_arguments(str(tmp_path), max_steps=2),
        train_dataset=causal_lm_examples(0, 0),
    )
    trainer.add_callback(GradWatch(every=1))
    trainer.train()
    capsys.readouterr()  # the Trainer's own lines
    code, lines = shown(capsys, str(tmp_path))
    assert code == 1
    assert_fits(lines)
