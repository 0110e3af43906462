"""One options model: the core watch, the framework callbacks and the report read one list."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from gradwatch import GradWatch, OptionError
from gradwatch.options import WatchOptions
from gradwatch.store.models import RunConfiguration

# Every option set away from its default, so a callback that drops one is seen.
CHANGED = {
    "every": 7,
    "sample": 0.5,
    "eps": 1e-6,
    "threshold": 1e-2,
    "warn": 1e-4,
    "top_k": 3,
    "seed": 11,
    "on_alert": "raise",
    "on_error": "raise",
    "budget": 0.25,
}


def test_changed_covers_every_option() -> None:
    """The table above names every option (a new option must be tested here too)."""
    assert set(CHANGED) == set(WatchOptions.names())
    assert all(CHANGED[name] != getattr(WatchOptions(), name) for name in CHANGED)


def test_the_core_signature_mirrors_the_options_model() -> None:
    """GradWatch's keyword arguments are the model's options with the same defaults."""
    parameters = inspect.signature(GradWatch).parameters
    own = {"report_dir", "write", "clock"}
    assert [name for name in parameters if name not in own] == list(WatchOptions.names())
    defaults = WatchOptions()
    for name in WatchOptions.names():
        assert parameters[name].default == getattr(defaults, name), name


def test_the_report_configuration_records_every_option(tmp_path: object) -> None:
    """report.json's configuration holds each option as the watch was given it."""
    assert set(WatchOptions.names()) <= set(RunConfiguration.model_fields)
    watch = GradWatch(report_dir=None, **CHANGED)  # type: ignore[arg-type]
    recorded = watch._summary.configuration.model_dump()
    assert {name: recorded[name] for name in CHANGED} == CHANGED
    assert watch.options == WatchOptions(**CHANGED)  # type: ignore[arg-type]


def test_a_callable_on_alert_is_recorded_by_name() -> None:
    """A callable on_alert cannot go to JSON: the configuration names it."""

    def page_me(result: object) -> None:
        """Stands in for a user's alert hook."""

    recorded = WatchOptions(on_alert=page_me).recorded()
    assert recorded["on_alert"].startswith("callable ") and "page_me" in recorded["on_alert"]


def test_numpy_integers_and_the_messages_are_the_models() -> None:
    """numpy integers are taken as ints; a bad option names argument, expected, received."""
    given: dict[str, object] = {"every": np.int64(5), "seed": np.int32(3), "top_k": np.int64(2)}
    options = WatchOptions(**given)  # type: ignore[arg-type]
    assert (type(options.every), type(options.seed), type(options.top_k)) == (int, int, int)
    with pytest.raises(OptionError, match=r"every: expected an int >= 1 .* received 0"):
        WatchOptions(every=0)
    with pytest.raises(OptionError, match="budget: expected None or a share"):
        GradWatch(report_dir=None, budget=2.0)


@pytest.mark.torch
@pytest.mark.parametrize("framework", ["transformers", "lightning"])
def test_framework_callbacks_pass_every_option_to_the_core(framework: str) -> None:
    """The HF and Lightning callbacks take every option and their watch holds it."""
    pytest.importorskip(framework)
    module = __import__(f"gradwatch.integrations.{framework}", fromlist=["GradWatch"])
    callback = module.GradWatch(**CHANGED)
    assert callback.options == WatchOptions(**CHANGED)  # type: ignore[arg-type]
    assert callback.watch.options == callback.options
    with pytest.raises(OptionError, match="top_k: expected an int >= 0"):
        module.GradWatch(top_k=-1)
