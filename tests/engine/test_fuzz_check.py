"""Hostile input to `gradwatch.check`: a GradwatchError or a valid result, theta intact (issue 27).

The fuzz draws shapes (0-d to 2-d, empty ones), dtypes (float16/32/64, and integer,
complex, bool, object arrays), values (NaN, inf, subnormals, 1e308), option values of
every type, broken gradients and losses returning anything. It runs with a small
fixed budget here; ``GRADWATCH_FUZZ_EXAMPLES=3000`` runs a longer one (BENCHMARKS.md,
"Hardening").
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradwatch
from gradwatch.errors import GradwatchError, OptionError
from gradwatch.result import CheckResult

EXAMPLES = int(os.environ.get("GRADWATCH_FUZZ_EXAMPLES", "60"))
OUTCOMES: Counter[str] = Counter()
"""What the fuzz saw, by outcome (printed by the long run)."""

HOSTILE_FLOATS = [0.0, -0.0, 1e-320, -1e-320, 1e-8, 1.0, -2.5, 1e4, 65504.0, 1e38, 1e308]
NON_FINITE = [math.nan, math.inf, -math.inf]
ANYTHING = st.sampled_from(
    [None, True, False, 0, -1, 1, 2**70, 0.5, 1.5, -0.5, math.nan, math.inf, "s", "auto", b"x",
     [1], {}, np.int64(3), np.float32(0.5), np.float64(1e-5), object()]
)  # fmt: skip


def _value(draw: st.DrawFn, finite_only: bool) -> float:
    pool = HOSTILE_FLOATS if finite_only else HOSTILE_FLOATS + NON_FINITE
    return draw(st.one_of(st.sampled_from(pool), st.floats(-10, 10)))


@st.composite
def arrays(draw: st.DrawFn, shape: tuple[int, ...], dtype: Any, finite_only: bool) -> Any:
    size = math.prod(shape)
    if size > 16:  # large enough for the "auto" screen: random values, a few hostile ones
        values = np.random.default_rng(draw(st.integers(0, 2**32))).normal(size=size).tolist()
        for _ in range(draw(st.integers(0, 2))):
            values[draw(st.integers(0, size - 1))] = _value(draw, finite_only)
    else:
        values = [_value(draw, finite_only) for _ in range(size)]
    with np.errstate(all="ignore"):
        if dtype is object:
            return np.array([*values, None], dtype=object)[:size].reshape(shape)
        return np.array(values, dtype=np.float64).astype(dtype).reshape(shape)


SHAPES = st.sampled_from([(), (1,), (3,), (2, 3), (0,), (4, 1), (3, 2), (45, 50)])
GOOD_DTYPES = st.sampled_from([np.float64, np.float32, np.float16])
ANY_DTYPES = st.sampled_from(
    [np.float64, np.float32, np.float16, np.longdouble, np.int64, np.complex128, np.bool_, object]
)


@st.composite
def problems(draw: st.DrawFn) -> tuple[dict[str, Any], Any, Any, dict[str, Any]]:
    """params, grads, loss and options, each hostile some of the time."""
    hostile = draw(st.booleans())
    names = draw(
        st.lists(
            st.sampled_from(["w", "b", "layer.0", "é", ""]), min_size=1, max_size=3, unique=True
        )
    )
    params: dict[str, Any] = {}
    grads: dict[str, Any] = {}
    for name in names:
        shape = draw(SHAPES)
        dtype = draw(ANY_DTYPES if hostile else GOOD_DTYPES)
        params[name] = draw(arrays(shape, dtype, finite_only=not hostile))
        grad_shape = draw(SHAPES) if hostile and draw(st.booleans()) else shape
        grads[name] = draw(arrays(grad_shape, np.float64, finite_only=not hostile))
    if hostile and draw(st.booleans()):
        grads = draw(st.sampled_from([{}, {"other": np.zeros(1)}, [], None, 1.0]))
    elif not hostile and draw(st.booleans()):  # the true gradient of the smooth loss
        with np.errstate(all="ignore"):
            grads = {name: np.cos(value.astype(np.float64)) for name, value in params.items()}
    if hostile and draw(st.booleans()):  # read-only, non-contiguous
        name = names[0]
        params[name] = draw(st.sampled_from([np.asarray(params[name]).T, _read_only(params[name])]))

    kind = draw(st.sampled_from(["smooth", "smooth", "constant", "returns", "not callable"]))
    returned = draw(ANYTHING | st.sampled_from([np.zeros(2), np.array([[1.0]]), math.nan]))

    def smooth() -> float:
        total = 0.0
        for value in params.values():
            if value.dtype.kind == "f":
                total += float(np.sum(np.sin(value.astype(np.float64))))
        return total

    loss: Any = {
        "smooth": smooth,
        "constant": lambda: 1.0,
        "returns": lambda: returned,
        "not callable": returned,
    }[kind]

    options: dict[str, Any] = {}
    for option, good in (
        ("eps", st.sampled_from([None, 1e-7, 1e-3, 1e-12, 0.5])),
        ("sample", st.sampled_from([None, "auto", "directional", 1, 3, 0.5, 1.0, 10**9])),
        ("seed", st.sampled_from([0, 1, 12345])),
        ("top_k", st.sampled_from([0, 1, 10])),
        ("warn", st.sampled_from([1e-5, 1e-3])),
        ("threshold", st.sampled_from([1e-3, 1e-1])),
        ("diagnose", st.booleans()),
        ("localize_evaluations", st.sampled_from([0, 10, 240])),
    ):
        if draw(st.booleans()):
            options[option] = draw(ANYTHING if hostile and draw(st.booleans()) else good)
    if draw(st.booleans()):  # built inside the check's try: a bad L2 is refused too
        options["regularization"] = draw(
            st.sampled_from(
                [
                    lambda: (),
                    lambda: [gradwatch.L2(0.1)],
                    lambda: [gradwatch.L2(0.1, 2, names[:1])],
                    lambda: [gradwatch.L2(-1.0)],
                    lambda: [gradwatch.L2(0.1, 1, ["missing"])],
                    lambda: ["not a term"],
                ]
            )
        )
    if len(params) == 1 and draw(st.booleans()):  # one array instead of a mapping
        (single,) = params.values()
        grads = next(iter(grads.values())) if isinstance(grads, dict) and grads else grads
        return {"theta": single}, grads, loss, {**options, "_single": True}
    return params, grads, loss, options


def _read_only(array: Any) -> Any:
    view = np.asarray(array).view()
    view.flags.writeable = False
    return view


def _bits(params: dict[str, Any]) -> dict[str, bytes]:
    return {name: _value_bits(value) for name, value in params.items()}


def _value_bits(value: Any) -> bytes:
    if not isinstance(value, np.ndarray) or value.dtype == object:
        return b""
    if value.dtype == np.longdouble and np.finfo(np.longdouble).nmant == 63:
        # x87 extended precision: 10 bytes of value, the rest padding numpy leaves as is
        return (
            np.ascontiguousarray(value).view(np.uint8).reshape(-1, value.itemsize)[:, :10].tobytes()
        )
    return value.tobytes()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 60,  # the suite's budget replays the same cases every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(problems())
def test_check_gives_a_gradwatch_error_or_a_result_and_restores_theta(
    problem: tuple[dict[str, Any], Any, Any, dict[str, Any]],
) -> None:
    """Any input: a GradwatchError or a valid CheckResult, and theta bit for bit as given."""
    params, grads, loss, options = problem
    before = _bits(params)
    given_params: Any = params["theta"] if options.pop("_single", False) else params
    with np.errstate(all="ignore"):
        try:
            if "regularization" in options:
                options["regularization"] = options["regularization"]()
            result = gradwatch.check(loss, given_params, grads, **options)
        except GradwatchError as error:
            OUTCOMES[f"refused: {type(error).__name__}"] += 1
        else:
            OUTCOMES[f"result: {result.status}"] += 1
            assert isinstance(result, CheckResult)
            CheckResult.model_validate_json(result.model_dump_json())
            assert math.isnan(result.ratio) or result.ratio >= 0
    assert _bits(params) == before


def test_fuzz_outcomes(request: pytest.FixtureRequest) -> None:
    """The long run's tally, printed for BENCHMARKS.md (at the suite's budget, both kinds occur)."""
    if not OUTCOMES:
        pytest.skip("run with the fuzz test")
    print(f"\nfuzz of gradwatch.check: {sum(OUTCOMES.values())} cases: {dict(OUTCOMES)}")
    assert any(k.startswith("result") for k in OUTCOMES)
    assert any(k.startswith("refused") for k in OUTCOMES)


@pytest.mark.parametrize(("dtype", "eps"), [(np.float16, 1e-7), (np.float32, 1e-12)])
def test_an_eps_too_small_for_the_dtype_is_refused(dtype: Any, eps: float) -> None:
    """theta +- eps rounding to theta is an OptionError naming dtype and step, not a crash."""
    w = np.array([1.0, -2.0], dtype=dtype)
    with pytest.raises(OptionError, match=rf"eps: expected a step .* in {np.dtype(dtype)}.*"):
        gradwatch.check(
            lambda: float(np.sum(w.astype(np.float64) ** 2)), {"w": w}, {"w": 2 * w}, eps=eps
        )


@pytest.mark.parametrize("seed", [1.5, "s", None, -1, True])
def test_a_bad_seed_is_refused_before_the_loss_runs(seed: object) -> None:
    """A seed that is not an int >= 0 is an OptionError raised before J is first evaluated."""
    w = np.array([1.0, -2.0])
    calls = 0

    def loss() -> float:
        nonlocal calls
        calls += 1
        return float(np.sum(w**2))

    with pytest.raises(OptionError, match=r"seed: expected an int >= 0, received"):
        gradwatch.check(loss, {"w": w}, {"w": 2 * w}, seed=seed)  # type: ignore[arg-type]
    assert calls == 0
