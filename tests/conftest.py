"""Shared fixtures: tiny checkpoints written to a temp folder, configs, and a CLI runner."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, settings

from neuromerge.cli import main as cli_main
from neuromerge.examples import make_bert_family
from tests.mergekit_ref import mergekit, mergekit_installed  # noqa: F401  (fixtures)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One intra-op thread: the tests' tensors are tiny, and on a shared 2-core machine OpenMP threads
# waiting for a descheduled sibling made the benchmark test 20x slower (measured: 319 vs 17 s).
# Subprocesses (CLI tests) inherit it through OMP_NUM_THREADS.
_THREADS = int(os.environ.get("NEUROMERGE_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
torch.set_num_threads(_THREADS)

settings.register_profile("default", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def bert_family(tmp_path: Path) -> Callable[..., tuple[Path, list[Path]]]:
    """``bert_family(fmt="safetensors"|"sharded"|"bin", n_experts=3, dtype=...)`` writes a tiny
    random BERT base and experts as HF folders under tmp_path and returns their paths."""
    counter = iter(range(1000))

    def make(fmt: str = "safetensors", n_experts: int = 3, **kw: Any) -> tuple[Path, list[Path]]:
        return make_bert_family(tmp_path / f"family{next(counter)}", n_experts, fmt=fmt, **kw)

    return make


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """``write_config(method, base, experts, name="merge.yaml", **top_level)`` → YAML path.
    Keyword ``parameters={...}`` goes under parameters; other keywords are top-level keys."""

    def write(method: str, base: Path, experts: list[Path], name: str = "merge.yaml",
              **top: Any) -> Path:
        cfg: dict[str, Any] = {"merge_method": method, "base_model": str(base),
                               "models": [{"model": str(e)} for e in experts]}
        cfg.update(top)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return write


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``run_cli("merge", cfg, out, "--quiet")`` → (exit code, stdout, stderr)."""

    def run(*args: Any) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli_main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
