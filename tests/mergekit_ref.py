"""The real mergekit (0.1.5, in its own venv: benchmarks/mergekit_env.py) run on the same inputs
as neuromerge, so methods are checked against mergekit itself rather than a transcription.

- :func:`write_llama` writes a tiny Llama-shaped HF folder (``config.json`` for
  ``LlamaForCausalLM``, float32 ``model.safetensors``) holding the tensors you give it; put one
  test case per tensor, so one mergekit run (one method, one parameter set) checks many cases.
- :func:`llama_tensors` draws every tensor of such a model at random (a seed per model).
- :func:`run_mergekit` writes a config as YAML, runs ``mergekit-yaml`` on it and returns the
  output tensors; :func:`run_neuromerge` runs ``neuromerge merge`` on the same YAML.
- the ``mergekit`` fixture returns ``run_mergekit`` once mergekit is installed (installing it on
  first use); it skips only when the install fails and ``NEUROMERGE_REQUIRE_MERGEKIT`` is unset
  (CI sets it: .ci/run installs mergekit first, so there a failed install fails the tests).

One mergekit run takes about 6-8 s on 2 cores (mostly importing transformers).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))
mergekit_env = importlib.import_module("mergekit_env")
perf = importlib.import_module("perf")  # Size: the Llama shapes and config.json of the benchmark

#: hidden 16, intermediate 24, 2 layers, 2 heads, vocabulary 32: 21 tensors, 7 kinds of shape.
TINY = perf.Size("tiny", hidden=16, intermediate=24, layers=2, heads=2, kv_heads=2, vocab=32)


def llama_names(size: Any = TINY) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama model of ``size``."""
    return size.tensors()


def llama_tensors(seed: int, size: Any = TINY, *, std: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of a Llama model of ``size``, N(0, std²) entries from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=g, dtype=torch.float64) * std).to(dtype)
            for name, shape in llama_names(size)}


def write_llama(folder: Path, tensors: Mapping[str, torch.Tensor], size: Any = TINY) -> Path:
    """An HF folder mergekit accepts as ``LlamaForCausalLM``: ``config.json`` (of ``size``) and
    ``model.safetensors`` with ``tensors`` as given (every tensor of ``size`` must be there)."""
    missing = [n for n, _ in llama_names(size) if n not in tensors]
    if missing:
        raise ValueError(f"write_llama: tensors missing: {missing[:3]}")
    folder.mkdir(parents=True, exist_ok=True)
    config = size.hf_config()
    dtypes = {t.dtype for t in tensors.values()}
    config["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.") if len(
        dtypes) == 1 else "float32"
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``folder``."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    if not out:
        raise FileNotFoundError(f"no safetensors in {folder}")
    return out


def _write_config(config: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_plain(config), sort_keys=False))
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def run_mergekit(config: Mapping[str, Any], tmp_path: Path, *, name: str = "mergekit",
                 venv: Path | None = None) -> dict[str, torch.Tensor]:
    """Run ``mergekit-yaml`` on ``config`` (paths may be ``Path``s) and return its output
    tensors. The YAML and the output go under ``tmp_path/name``; mergekit's output is on
    failure put in the error."""
    exe = mergekit_env.mergekit_exe(venv)
    work = tmp_path / name
    cfg = _write_config(config, work / "config.yaml")
    out = work / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(work / "hf"))
    res = subprocess.run([str(exe), str(cfg), str(out), "--no-copy-tokenizer", "--quiet",
                          "--no-lazy-unpickle", "--random-seed", "0"],
                         capture_output=True, text=True, env=env, cwd=work)
    if res.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed ({res.returncode}) on\n{cfg.read_text()}\n"
                           f"{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return read_folder(out)


def run_neuromerge(config: Mapping[str, Any], tmp_path: Path, *, name: str = "neuromerge",
                   args: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Run ``neuromerge merge`` (in this process) on the same YAML; its output tensors."""
    from neuromerge.cli import main

    work = tmp_path / name
    cfg = _write_config(config, work / "config.yaml")
    out = work / "out"
    code = main(["merge", str(cfg), str(out), "--quiet", *args])
    if code != 0:
        raise RuntimeError(f"neuromerge merge failed ({code}) on\n{cfg.read_text()}")
    return read_folder(out)


def assert_same_tensors(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor],
                        *, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same tensor names, and each tensor equal within the tolerance (compared in float64)."""
    assert sorted(ours) == sorted(theirs), (sorted(set(ours) ^ set(theirs)))
    bad = []
    for name in sorted(theirs):
        a, b = ours[name].double(), theirs[name].double()
        if a.shape != b.shape or not torch.allclose(a, b, rtol=rtol, atol=atol):
            err = (a - b).abs().max().item() if a.shape == b.shape else "shape"
            bad.append(f"{name}: max |diff| {err}")
    assert not bad, "tensors differ from mergekit's:\n" + "\n".join(bad)


@pytest.fixture(scope="session")
def mergekit_installed() -> Path:
    """mergekit-yaml of the mergekit venv, installed on first use."""
    try:
        return mergekit_env.ensure_mergekit(quiet=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        if os.environ.get("NEUROMERGE_REQUIRE_MERGEKIT"):
            raise
        pytest.skip(f"mergekit {mergekit_env.MERGEKIT_VERSION} could not be installed into "
                    f"{mergekit_env.default_venv()} ({exc}); run "
                    f"`python benchmarks/mergekit_env.py` with PyPI reachable")


@pytest.fixture
def mergekit(mergekit_installed: Path, tmp_path: Path
             ) -> Callable[..., dict[str, torch.Tensor]]:
    """``mergekit(config, name="mergekit")`` → mergekit's output tensors (see run_mergekit)."""

    def run(config: Mapping[str, Any], name: str = "mergekit") -> dict[str, torch.Tensor]:
        return run_mergekit(config, tmp_path, name=name,
                            venv=mergekit_installed.parent.parent)

    return run
