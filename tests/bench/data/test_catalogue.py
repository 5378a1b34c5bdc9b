"""The task catalogue: every spec complete, unknown names refused."""

from __future__ import annotations

import pytest

from neuromerge.bench.data import TASKS, load_task
from neuromerge.errors import ConfigError


def test_unknown_task() -> None:
    with pytest.raises(ConfigError, match=r"unknown task 'nope'.*sentiment"):
        load_task("nope")


def test_registry_specs_are_complete() -> None:
    assert {"sentiment", "news_outlet", "health_account", "hedge", "food_review",
            "commons_party", "debate_party", "spam"} <= set(TASKS)
    for name, spec in TASKS.items():
        assert spec.name == name and spec.description and spec.text and spec.label
        assert len(set(spec.label_names)) == len(spec.label_names) >= 2
        assert spec.size > 0 and spec.source.files
