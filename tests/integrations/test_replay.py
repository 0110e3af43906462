"""Random draws on the float64 shadow are the training's draws, bit for bit.

Drop path (``torch.rand(shape, dtype=hidden.dtype)``), layerdrop (``torch.rand([])``
under the default dtype) and router jitter (``uniform_`` on the hidden states) draw
other numbers in float64 than in float32 from one generator state; the shadow's
`ShadowMode` draws them in the training's dtype and upcasts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gradwatch.integrations._shadow.draws import SAMPLERS  # noqa: E402
from gradwatch.integrations._shadow.mode import ShadowMode  # noqa: E402
from gradwatch.integrations._shadow.model import RngState  # noqa: E402
from gradwatch.integrations._step import MicroBatch, compare_step  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from benchmarks.hf_setups import SETUPS  # noqa: E402

pytestmark = pytest.mark.torch

_MASKS = frozenset({torch.nn.functional.dropout, torch.nn.functional.scaled_dot_product_attention})


class DrawRecorder(TorchFunctionMode):
    """Keeps every random draw a forward makes (float64 copies), in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[tuple[str, Any]] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        if func in SAMPLERS and func not in _MASKS:
            drawn = args[0] if str(getattr(func, "__name__", "")).endswith("_") else result
            self.draws.append((func.__name__, drawn.detach().to(torch.float64).clone()))
        return result


def training_and_replay(name: str) -> tuple[DrawRecorder, DrawRecorder, float, float]:
    """The draws and loss of a float32 training forward and of its float64 replay."""
    model, data = SETUPS[name].build()
    model.train()
    batch = {key: tensor[:4] for key, tensor in data.tensors.items()}
    shadow = copy.deepcopy(model).double()
    state = torch.get_rng_state()
    with DrawRecorder() as training:
        trained = float(model(**batch).loss)
    torch.set_rng_state(state)
    double = {k: t.double() if t.is_floating_point() else t for k, t in batch.items()}
    with DrawRecorder() as replay, ShadowMode(torch.float64, training_dtype=torch.float32):
        replayed = float(shadow(**double).loss)
    return training, replay, trained, replayed


@pytest.mark.parametrize(
    ("name", "sampler"),
    [
        ("convnext", "rand"),  # drop path
        ("wav2vec2-ctc", "rand"),  # layerdrop
        ("switch-transformers", "uniform_"),  # router jitter
    ],
)
def test_replay_draws_the_training_numbers(name: str, sampler: str) -> None:
    """Every draw of the float64 replay equals the float32 training forward's, and so J."""
    training, replay, trained, replayed = training_and_replay(name)
    assert any(func == sampler for func, _ in training.draws)
    assert [func for func, _ in replay.draws] == [func for func, _ in training.draws]
    for (_, want), (_, got) in zip(training.draws, replay.draws, strict=True):
        assert torch.equal(want, got)
    assert replayed == pytest.approx(trained, rel=1e-5)


def test_dropout_mask_follows_the_memory_layout() -> None:
    """SegFormer's decode head drops channels-last activations: the replayed mask is the
    training's (drawn in memory order), so the float64 loss is the float32 one."""
    _, _, trained, replayed = training_and_replay("segformer")
    assert replayed == pytest.approx(trained, rel=1e-5)


class AlphaNet(nn.Module):
    """A SELU network with alpha dropout, whose affine mask gradwatch does not redraw."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 8), nn.Linear(8, 1)
        self.drop = nn.AlphaDropout(0.3)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.drop(torch.selu(self.first(x))))


def test_a_draw_it_cannot_replay_leaves_the_step_unjudged() -> None:
    """The step link says it could not replay alpha dropout and is not judged (never fail),
    without blaming accumulation."""
    torch.manual_seed(0)
    model, x = AlphaNet(), torch.randn(16, 4)

    def loss_fn(m: nn.Module, batch: Tensor) -> Tensor:
        return m(batch).square().mean()

    state = torch.get_rng_state()
    loss_fn(model, x).backward()
    torch.set_rng_state(state)
    rng = RngState.capture()
    link = compare_step(model, loss_fn, [MicroBatch(x, 1.0, rng)])
    assert link.status == "nondeterministic"
    assert "alpha dropout" in link.explanation
    assert "accumulation" not in link.explanation


SAMPLER_CALLS: dict[str, Callable[[Tensor], Any]] = {
    "rand": lambda x: torch.rand(5),
    "randn dtype=": lambda x: torch.randn(5, dtype=x.dtype),
    "rand_like": lambda x: torch.rand_like(x),
    "randn_like": lambda x: torch.randn_like(x),
    "randint dtype=": lambda x: torch.randint(0, 9, (5,), dtype=x.dtype),
    "normal(float, float, size)": lambda x: torch.normal(0.0, 2.0, (5,)),
    "normal(tensor, tensor)": lambda x: torch.normal(x, x.abs() + 1),
    "bernoulli": lambda x: torch.bernoulli(x.sigmoid()),
    "multinomial": lambda x: torch.multinomial(x.sigmoid(), 3, replacement=True),
    "poisson": lambda x: torch.poisson(x.abs()),
    "uniform_": lambda x: torch.empty_like(x).uniform_(-1, 1),
    "normal_": lambda x: torch.empty_like(x).normal_(),
    "exponential_": lambda x: torch.empty_like(x).exponential_(),
    "bernoulli_(tensor)": lambda x: torch.empty_like(x).bernoulli_(x.sigmoid()),
    "cauchy_": lambda x: torch.empty_like(x).cauchy_(),
    "log_normal_": lambda x: torch.empty_like(x).log_normal_(),
    "geometric_": lambda x: torch.empty_like(x).geometric_(0.3),
    "random_": lambda x: torch.empty_like(x).random_(0, 9),
    "dropout": lambda x: torch.nn.functional.dropout(x, 0.4, True),
    "dropout2d": lambda x: torch.nn.functional.dropout2d(x.reshape(1, 20, 1), 0.4, True),
}


@pytest.mark.parametrize("call", list(SAMPLER_CALLS))
def test_each_sampler_draws_as_in_float32(call: str) -> None:
    """Every sampler called on float64 shadow tensors gives the float32 training's values."""
    x = torch.linspace(-2, 2, 20)
    state = torch.get_rng_state()
    want = SAMPLER_CALLS[call](x)
    want = want.to(torch.float64) if want.is_floating_point() else want
    torch.set_rng_state(state)
    with ShadowMode(torch.float64, training_dtype=torch.float32):
        got = SAMPLER_CALLS[call](x.double())
    assert got.dtype == want.dtype
    assert torch.allclose(got.double(), want.double(), rtol=1e-6, atol=0), (got, want)
