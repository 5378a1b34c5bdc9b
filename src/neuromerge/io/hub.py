"""Hugging Face Hub model ids wherever a model path is accepted, as mergekit takes them:
``org/name``, ``org/name@revision`` and ``model+lora`` (a LoRA adapter applied over a model;
either side a local path or a hub id). A local file or folder of the same name wins.

A merge reads the hub in two steps, so that every check runs before any weight is downloaded:

1. :meth:`Hub.fetch` downloads the small files (config.json, the weights' index, tokenizer and
   chat template files, generation_config.json, adapter_config.json) into the standard cache
   and decides which weight files a merge reads (those :func:`~neuromerge.io.reader.
   open_checkpoint` would open); :meth:`Hub.headers` gives a :class:`HubHeaderReader` for them:
   tensor names, shapes and dtypes from the safetensors headers (HTTP range requests), no values.
2. Once the merge is planned from those headers, :meth:`Hub.download` fetches the weight files
   (``snapshot_download`` with exactly those names, huggingface_hub's progress bars) and the
   merge opens the cached snapshot folder as a local checkpoint.

The environment is read when each call is made: ``HF_ENDPOINT``, ``HF_HOME`` /
``HF_HUB_CACHE``, ``HF_TOKEN``, ``HF_HUB_OFFLINE`` (the cache only). Hub errors become one-line
:class:`~neuromerge.errors.InputError` messages naming the id.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuromerge.errors import InputError
from neuromerge.io.hub_reader import HubHeaderReader
from neuromerge.io.reader import load_index

log = logging.getLogger("neuromerge")

#: The files besides the weights a merge reads: config, index, tokenizer, chat template,
#: generation config, LoRA adapter config (root of the repo only).
SMALL_FILES = (
    "config.json", "generation_config.json", "model.safetensors.index.json",
    "pytorch_model.bin.index.json", "adapter_config.json", "preprocessor_config.json",
    "processor_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json",
    "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt",
    "spiece.model", "sentencepiece.bpe.model", "*.tiktoken", "chat_template.jinja",
    "chat_template.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
_REPO_ID = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]{1,96}\b$")  # huggingface_hub's rule
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".yaml", ".yml", ".json")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubRef:
    """A model repository on the hub, at a revision (branch, tag or commit; None: main)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


Side = Path | HubRef


@dataclass(frozen=True)
class ModelRef:
    """What a model string names: a model (local path or hub repo) and, for mergekit's
    ``model+lora``, the LoRA adapter applied over it."""

    text: str
    model: Side
    lora: Side | None = None

    @property
    def on_hub(self) -> bool:
        return isinstance(self.model, HubRef) or isinstance(self.lora, HubRef)


def _local_default(text: str) -> Path | None:
    p = Path(os.path.expanduser(text))
    return p if p.exists() else None


def _hub_syntax(text: str) -> HubRef | None:
    repo, _, rev = text.partition("@")
    if "@" in text and (not rev or rev != rev.strip() or " " in rev):
        return None
    if (not _REPO_ID.match(repo) or "--" in repo or ".." in repo or repo.endswith(".git")
            or repo.lower().endswith(_FILE_SUFFIXES)):
        return None
    return HubRef(repo, rev or None)


def is_hub_id(text: str, locate: Callable[[str], Path | None] = _local_default) -> bool:
    """Whether ``text`` is read as a hub id: it has the form ``name``, ``org/name`` or
    ``org/name@revision`` and no local file or folder of that name exists (local wins)."""
    return locate(text) is None and _hub_syntax(text) is not None


def parse_model_ref(text: str, locate: Callable[[str], Path | None] = _local_default
                    ) -> ModelRef:
    """``text`` as a local path, a hub id or ``model+lora`` (each side local or hub). ``locate``
    finds a local path (None when there is none). A string that is neither comes back as a local
    path that does not exist, for the reader's "no such file or folder"."""
    local = locate(text)
    if local is not None:
        return ModelRef(text, local)
    if "+" in text:
        model, lora = text.split("+", 1)
        if model and lora:
            return ModelRef(text, _side(model, locate), _side(lora, locate))
    return ModelRef(text, _side(text, locate))


def _side(text: str, locate: Callable[[str], Path | None]) -> Side:
    local = locate(text)
    if local is not None:
        return local
    ref = _hub_syntax(text)
    return ref if ref is not None else Path(os.path.expanduser(text))


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class HubSettings:
    """The hub settings in effect now (the environment, else huggingface_hub's defaults)."""

    endpoint: str
    cache_dir: Path
    offline: bool
    token: str | None

    @classmethod
    def now(cls) -> HubSettings:
        from huggingface_hub import constants

        env = os.environ
        endpoint = (env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        home = env.get("HF_HOME")
        cache = (env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
                 or (os.path.join(home, "hub") if home else constants.HF_HUB_CACHE))
        offline = _is_true(env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE"))
        token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None
        return cls(endpoint, Path(os.path.expanduser(os.path.expandvars(cache))), offline,
                   token)


@dataclass
class HubModel:
    """A hub repo resolved to a commit: its snapshot folder in the cache (small files in it)
    and the weight files a merge reads (repo paths)."""

    ref: HubRef
    commit: str
    folder: Path
    weights: tuple[str, ...]
    adapter: bool

    def cached(self) -> bool:
        return all((self.folder / w).is_file() for w in self.weights)

    @property
    def safetensors(self) -> bool:
        return all(w.endswith(".safetensors") for w in self.weights)


class Hub:
    """The hub as one merge sees it: each repo fetched once (small files), its weights read
    from headers or downloaded on demand. ``progress``: huggingface_hub's progress bars for
    the weights' downloads."""

    def __init__(self, *, progress: bool = True) -> None:
        self.progress = progress
        self.settings = HubSettings.now()
        self._models: dict[HubRef, HubModel] = {}

    def fetch(self, ref: HubRef) -> HubModel:
        """The repo at ``ref``: its small files in the cache and the weights it holds."""
        if ref not in self._models:
            with self._calls(ref, bars=False):  # small files: no progress bars
                self._models[ref] = self._fetch(ref)
        return self._models[ref]

    def _fetch(self, ref: HubRef) -> HubModel:
        from huggingface_hub import HfApi, snapshot_download

        s = self.settings
        folder = Path(snapshot_download(
            ref.repo_id, revision=ref.revision, allow_patterns=list(SMALL_FILES),
            cache_dir=s.cache_dir, endpoint=s.endpoint, token=s.token,
            local_files_only=s.offline))
        commit = folder.name
        if s.offline:
            files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        else:
            info = HfApi(endpoint=s.endpoint, token=s.token).model_info(
                ref.repo_id, revision=commit)
            files = [f.rfilename for f in info.siblings or []]
        adapter = "adapter_config.json" in files
        weights = _weights(set(files), folder, adapter)
        model = HubModel(ref, commit, folder, weights, adapter)
        if not weights and s.offline:
            raise InputError(f"{ref}: its weights are not in the Hugging Face cache "
                             f"({s.cache_dir}) and HF_HUB_OFFLINE is set")
        if not weights:
            raise InputError(f"{ref}: no weights found in the repo (expected "
                             + ("adapter_model.safetensors or adapter_model.bin" if adapter else
                                "model.safetensors, model.safetensors.index.json or "
                                "pytorch_model.bin") + ")")
        return model

    def headers(self, model: HubModel) -> HubHeaderReader:
        """A reader of ``model``'s weight files from their safetensors headers only."""
        from huggingface_hub import HfApi

        if not model.safetensors:
            raise InputError(f"{model.ref}: stores PyTorch .bin weights, whose tensor names and "
                             f"shapes are known only once downloaded")
        s = self.settings
        api = HfApi(endpoint=s.endpoint, token=s.token)
        files: dict[str, Any] = {}
        with self._calls(model.ref, bars=False):
            for w in model.weights:
                files[w] = api.parse_safetensors_file_metadata(
                    model.ref.repo_id, w, revision=model.commit)
        index = model.folder / "model.safetensors.index.json"
        weight_map = (load_index(index) if len(model.weights) > 1 and index.is_file()
                      else None)
        return HubHeaderReader(str(model.ref), files, weight_map)

    def download(self, model: HubModel) -> Path:
        """Download ``model``'s weight files (a no-op when cached); its snapshot folder."""
        if model.cached():
            return model.folder
        s = self.settings
        if s.offline:
            missing = next(w for w in model.weights if not (model.folder / w).is_file())
            raise InputError(f"{model.ref}: {missing} not in the Hugging Face cache "
                             f"({s.cache_dir}) and HF_HUB_OFFLINE is set")
        from huggingface_hub import snapshot_download

        log.info("downloading %s (%s)", model.ref, ", ".join(model.weights))
        with self._calls(model.ref):
            snapshot_download(model.ref.repo_id, revision=model.commit,
                              allow_patterns=[glob.escape(w) for w in model.weights],
                              cache_dir=s.cache_dir, endpoint=s.endpoint, token=s.token)
        if not model.cached():
            raise InputError(f"{model.ref}: the download left {model.folder} without "
                             f"{', '.join(model.weights)}")
        return model.folder

    @contextlib.contextmanager
    def _calls(self, ref: HubRef, *, bars: bool = True) -> Iterator[None]:
        with _progress_bars(bars and self.progress), hub_errors(ref, self.settings):
            yield


def _weights(files: set[str], folder: Path, adapter: bool) -> tuple[str, ...]:
    """The weight files a merge reads, in :func:`open_checkpoint`'s order of preference."""
    root = {f for f in files if "/" not in f}
    if adapter:
        return next(((n,) for n in ("adapter_model.safetensors", "adapter_model.bin")
                     if n in root), ())
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if index in root and (folder / index).is_file():
            return tuple(dict.fromkeys(load_index(folder / index).values()))
        if single in root:
            return (single,)
    lone = sorted(f for f in root if f.endswith(".safetensors"))
    return tuple(lone) if len(lone) == 1 else ()


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    if show or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


@contextlib.contextmanager
def hub_errors(ref: HubRef, settings: HubSettings) -> Iterator[None]:
    """huggingface_hub's exceptions as one-line InputErrors naming ``ref``."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        SafetensorsParsingError,
    )

    said = ""
    try:
        yield
        return
    except GatedRepoError as exc:
        said = (f"a gated model: accept its conditions on the Hub and set HF_TOKEN to a token "
                f"with access ({_hub_said(exc)})")
    except RevisionNotFoundError as exc:
        said = f"revision {ref.revision or 'main'!r} not found on the Hub ({_hub_said(exc)})"
    except RepositoryNotFoundError as exc:
        said = (f"no such model on the Hub at {settings.endpoint}, or a private one HF_TOKEN "
                f"gives no access to ({_hub_said(exc)})")
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        if settings.offline:
            said = (f"not in the Hugging Face cache ({settings.cache_dir}) and HF_HUB_OFFLINE "
                    f"is set")
        else:
            said = (f"cannot reach the Hub at {settings.endpoint} and not in the Hugging Face "
                    f"cache ({settings.cache_dir}) ({_first_line(exc)})")
    except EntryNotFoundError as exc:
        said = f"a file is missing on the Hub ({_hub_said(exc)})"
    except HfHubHTTPError as exc:
        said = f"the Hub answered {_hub_said(exc)}"
    except SafetensorsParsingError as exc:
        said = f"unreadable safetensors header ({_first_line(exc)})"
    except Exception as exc:  # connection errors: httpx or requests, by huggingface_hub version
        if type(exc).__module__.split(".")[0] not in ("httpx", "requests", "urllib3"):
            raise
        said = (f"cannot reach the Hub at {settings.endpoint} ({type(exc).__name__}: "
                f"{_first_line(exc)}); HF_HUB_OFFLINE=1 reads the cache only")
    raise InputError(f"{ref}: {said}")


def _first_line(exc: BaseException) -> str:
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)


def _hub_said(exc: Any) -> str:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    message = getattr(exc, "server_message", None) or _first_line(exc)
    message = " ".join(str(message).split())
    return f"{status}: {message}" if status is not None and str(status) not in message else message


def download(ref: HubRef, *, progress: bool = True) -> Path:
    """The local snapshot folder of ``ref`` with the files a merge reads (weights included)."""
    hub = Hub(progress=progress)
    return hub.download(hub.fetch(ref))
