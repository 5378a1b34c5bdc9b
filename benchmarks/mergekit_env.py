"""mergekit in its own virtual environment: the reference the benchmark (perf.py) and the parity
tests (tests/mergekit_ref.py) run neuromerge against.

The venv is ``$NEUROMERGE_MERGEKIT_VENV``, else ``~/.cache/neuromerge/mergekit-venv``. It is
created on first use: ``pip install torch==2.13.0`` first (the CPU wheel; unpinned, pip would
pull a CUDA build to meet mergekit's ``torch>=2.0``), then ``mergekit==0.1.5``.

    python benchmarks/mergekit_env.py            # install (once) and print the versions
    python benchmarks/mergekit_env.py --venv DIR
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

MERGEKIT_VERSION = "0.1.5"
MERGEKIT_TORCH = "2.13.0"
VENV_ENV = "NEUROMERGE_MERGEKIT_VENV"


def default_venv() -> Path:
    """``$NEUROMERGE_MERGEKIT_VENV``, else ``~/.cache/neuromerge/mergekit-venv``."""
    return Path(os.environ.get(VENV_ENV) or "~/.cache/neuromerge/mergekit-venv").expanduser()


def mergekit_exe(venv: Path | None = None) -> Path:
    """Where ``mergekit-yaml`` lies in ``venv`` (installed or not)."""
    return (venv or default_venv()) / "bin" / "mergekit-yaml"


def ensure_mergekit(venv: Path | None = None, *, quiet: bool = False) -> Path:
    """``mergekit-yaml`` of ``venv`` (default :func:`default_venv`), installing it first if it is
    not there."""
    venv = venv or default_venv()
    exe = mergekit_exe(venv)
    if exe.exists():
        return exe
    if not quiet:
        print(f"installing mergekit {MERGEKIT_VERSION} into {venv} (once; a few minutes)",
              flush=True)
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # torch first and pinned: mergekit asks for torch>=2.0, which pip would meet with a CUDA build.
    subprocess.run([*pip, f"torch=={MERGEKIT_TORCH}"], check=True)
    subprocess.run([*pip, f"mergekit=={MERGEKIT_VERSION}"], check=True)
    return exe


def mergekit_info(venv: Path | None = None) -> dict[str, str]:
    """The versions of mergekit, torch and transformers in ``venv``."""
    venv = venv or default_venv()
    res = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('mergekit')); "
         "print(m.version('torch')); print(m.version('transformers'))"],
        capture_output=True, text=True, check=True)
    mk, torch_v, tf = res.stdout.split()[:3]
    return {"version": mk, "torch": torch_v, "transformers": tf}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=None,
                    help=f"the venv (default ${VENV_ENV} or ~/.cache/neuromerge/mergekit-venv)")
    args = ap.parse_args(argv)
    venv = args.venv.expanduser() if args.venv else default_venv()
    exe = ensure_mergekit(venv)
    info = mergekit_info(venv)
    print(f"{exe}: mergekit {info['version']}, torch {info['torch']}, "
          f"transformers {info['transformers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
