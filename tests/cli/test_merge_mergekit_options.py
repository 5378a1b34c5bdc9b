"""``mergekit-yaml``'s options on ``neuromerge merge``: applied, or accepted with a note."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from neuromerge.cli.mergekit_options import parse_kmb
from neuromerge.errors import ConfigError
from tests.cli.helpers import read_folder


def test_parse_kmb_is_mergekits() -> None:
    assert parse_kmb("5B") == 5 * 10**9 and parse_kmb("500M") == 5 * 10**8
    assert parse_kmb("1000k") == 10**6 and parse_kmb("123") == 123
    with pytest.raises(ConfigError, match="out-shard-size"):
        parse_kmb("5GB")


def test_out_shard_size_and_random_seed_are_neuromerges_options(
        tmp_path: Path, bert_family: Callable[..., Any], write_config: Callable[..., Path],
        run_cli: Callable[..., tuple[int, str, str]]) -> None:
    base, experts = bert_family(n_experts=2)
    cfg = write_config("dare_ties", base, experts)
    code, _, err = run_cli("merge", cfg, tmp_path / "mk", "--quiet", "--out-shard-size", "20K",
                           "--random-seed", "3", "--lazy-unpickle", "--allow-crimes",
                           "--copy-tokenizer", "--no-write-model-card", "-v")
    assert code == 0, err
    code, _, err = run_cli("merge", cfg, tmp_path / "nm", "--quiet", "--max-shard-size",
                           "20000", "--seed", "3")
    assert code == 0, err
    mk, nm = read_folder(tmp_path / "mk"), read_folder(tmp_path / "nm")
    assert sorted(mk) == sorted(nm) and all(torch.equal(mk[k], nm[k]) for k in mk)
    shards = sorted(p.name for p in (tmp_path / "mk").glob("*.safetensors"))
    assert len(shards) > 1
    assert shards == sorted(p.name for p in (tmp_path / "nm").glob("*.safetensors"))
    assert (tmp_path / "mk" / "README.md").exists()  # always written, said in a warning


def test_notes_say_what_neuromerge_does_instead(
        tmp_path: Path, bert_family: Callable[..., Any], write_config: Callable[..., Path],
        run_cli: Callable[..., tuple[int, str, str]]) -> None:
    base, experts = bert_family(n_experts=2)
    cfg = write_config("task_arithmetic", base, experts)
    code, _, err = run_cli("merge", cfg, "--dry-run", "--lazy-unpickle", "--no-copy-tokenizer")
    assert code == 0, err
    assert "--lazy-unpickle: neuromerge always streams checkpoints" in err
    assert "--no-copy-tokenizer: the base's tokenizer files are always written" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--out-shard-size", "1B", "--max-shard-size", "1GB"], "not both"),
    (["--random-seed", "1", "--seed", "2"], "disagree"),
    (["--cuda", "--device", "auto"], "disagree"),
    (["--num-threads", "0"], "at least 1"),
])
def test_conflicting_options_are_one_line_errors(
        args: list[str], message: str, bert_family: Callable[..., Any],
        write_config: Callable[..., Path], run_cli: Callable[..., tuple[int, str, str]]) -> None:
    base, experts = bert_family(n_experts=2)
    code, _, err = run_cli("merge", write_config("ties", base, experts), "--dry-run", *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_is_device_cuda(bert_family: Callable[..., Any], write_config: Callable[..., Path],
                             run_cli: Callable[..., tuple[int, str, str]]) -> None:
    base, experts = bert_family(n_experts=2)
    code, _, err = run_cli("merge", write_config("ties", base, experts), "--dry-run", "--cuda")
    assert code == 1 and "--device cuda: no CUDA device is available" in err
