"""The ``neuromerge`` top level: help, version, no command, and the real console script in a
subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from neuromerge import __version__
from tests.cli.helpers import Family, leftovers, load_and_run, tree_hashes


def test_help(run_cli: Callable[..., tuple[int, str, str]],
              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        run_cli("--help")
    assert ei.value.code == 0
    top = capsys.readouterr().out
    for word in ("merge", "methods", "--version"):
        assert word in top
    with pytest.raises(SystemExit) as ei:
        run_cli("merge", "--help")
    assert ei.value.code == 0
    sub = capsys.readouterr().out
    for word in ("config", "out_dir", "--force", "--quiet", "--device", "{cpu,cuda,auto}",
                 "--max-shard-size", "--seed", "KEY=VALUE", "merge_method:", "base_model:",
                 "neuromerge methods"):
        assert word in sub, word
    code, stdout, _ = run_cli()
    assert code == 2 and "merge" in stdout
    with pytest.raises(SystemExit) as ei:
        run_cli("--version")
    assert ei.value.code == 0
    assert capsys.readouterr().out.strip() == f"neuromerge {__version__}"


# --- the real console script ------------------------------------------------------------------


def test_console_script_in_a_subprocess(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("neuromerge")
    assert exe.exists(), "the neuromerge console script is not installed in this environment"
    base, experts = bert_family(fmt="sharded")
    cfg = write_config("neuromerging", base, experts)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    inputs = tree_hashes(base.parent)
    ok = subprocess.run([str(exe), "merge", str(cfg), str(out), "--quiet", "--max-shard-size",
                         "30KB", "-p", "density=0.3"],
                        capture_output=True, text=True, timeout=180, env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "" and ok.stderr == ""
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert tree_hashes(base.parent) == inputs
    load_and_run(out)
    first = tree_hashes(out)

    again = subprocess.run([str(exe), "merge", str(cfg), str(out)],
                           capture_output=True, text=True, timeout=180, env=env, check=False)
    assert again.returncode == 1
    assert again.stdout == ""
    assert again.stderr.splitlines() == [
        f"neuromerge: error: {out}: output folder exists (use --force to replace it)"]
    assert tree_hashes(out) == first
    assert leftovers(tmp_path) == []
