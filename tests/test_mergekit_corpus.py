"""Every config of the mergekit corpus (tests/mergekit_corpus/: 36 published configs, verbatim)
runs unchanged with ``neuromerge merge`` on tiny stand-ins of the models it names (hub ids
served by a local FakeHub, local paths created where the config says; tests/corpus_standins.py)
and gives the tensors mergekit 0.1.5 itself gives from the same config and the same served
models (mergekit in its own venv, all configs in one process: tests/mergekit_batch.py).

- Deterministic methods: the same tensor names, shapes and dtypes, and values equal within
  the output dtype's rounding (mergekit computes half precision in it, neuromerge in float32:
  a few units in the last place of bfloat16 / float16). Where a trim ranks magnitudes (TIES,
  breadcrumbs) in half precision, at most 1 % of the entries may differ: those at the trim
  threshold, which mergekit ranks by the deltas rounded to half precision.
- Random methods (DARE, DELLA): the same names, shapes and dtypes; the fraction of entries that
  differ from the base's equal within sampling error (the same keep rate in distribution) and
  the merged update's norm within 10 %.
- The written config.json has the layer count mergekit writes (slices), and a chat_template
  the output tokenizer holds.

The whole corpus costs about two minutes on 2 cores (mergekit imported once, ~1 s per config
for each tool).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import corpus_standins as standins
from tests.hub_server import FakeHub
from tests.mergekit_ref import read_folder

CONFIGS = standins.corpus()
#: methods whose trim ranks task-vector magnitudes: mergekit ranks the deltas rounded to the
#: config's half dtype, neuromerge the exact float32 ones, so entries at the trim threshold can
#: fall on either side (the same rules match mergekit exactly in float32:
#: tests/methods/test_mergekit_parity_gta.py)
RANKED = {"ties", "breadcrumbs", "breadcrumbs_ties"}
#: the share of entries such rank flips may change (0.23 % at most when measured: 106 of 45880
#: entries, config 36), and the mean change they may make
FLIPS, FLIP_MEAN = 0.005, 5e-3

RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
#: the unit in the last place at 1 of each output dtype
EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -23}


@pytest.fixture(scope="module")
def corpus_runs(mergekit_installed: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[dict[str, dict[str, Any]]]:
    """{config: {"mergekit": "ok" | error, "neuromerge": "ok" | error, "out": {tool: dir}}}."""
    work = tmp_path_factory.mktemp("corpus")
    with FakeHub() as hub, pytest.MonkeyPatch.context() as mp:
        served: set[str] = set()
        for _, data in CONFIGS:
            arch = standins.architecture(data)
            for ref in standins.refs(data):
                if standins.is_local(ref):
                    if not (work / ref).exists():
                        standins.write_standin(work / ref, ref, arch)
                elif ref not in served:
                    repo, _, rev = ref.partition("@")
                    folder = standins.write_standin(work / "hub" / repo, repo, arch)
                    hub.add(repo, folder, revision=rev or "main")
                    served.add(ref)
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "VIRTUAL_ENV", "HF_HUB_CACHE", "HF_TOKEN")}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(work / "mk_hf"), HF_HUB_OFFLINE="0",
                   TRANSFORMERS_OFFLINE="0", HF_HUB_DISABLE_PROGRESS_BARS="1")
        jobs = [{"config": str(standins.CORPUS / f"{name}.yaml"), "out": str(work / "mk" / name),
                 "cwd": str(work)} for name, _ in CONFIGS]
        (work / "jobs.json").write_text(json.dumps(jobs))
        python = mergekit_installed.parent / "python"
        res = subprocess.run([str(python), str(Path(__file__).parent / "mergekit_batch.py"),
                              str(work / "jobs.json"), str(work / "mk.json")],
                             capture_output=True, text=True, env=env, cwd=work, timeout=1200)
        assert res.returncode == 0, res.stderr[-4000:]
        theirs = json.loads((work / "mk.json").read_text())

        from huggingface_hub import constants

        from neuromerge.cli import main

        mp.setenv("HF_ENDPOINT", hub.url)
        mp.setenv("HF_HOME", str(work / "nm_hf"))
        mp.setenv("HF_HUB_OFFLINE", "0")
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.chdir(work)
        runs = {}
        for name, _ in CONFIGS:
            out = work / "nm" / name
            code = main(["merge", str(standins.CORPUS / f"{name}.yaml"), str(out), "--quiet"])
            runs[name] = {"mergekit": theirs[str(work / "mk" / name)],
                          "neuromerge": "ok" if code == 0 else f"exit {code}",
                          "out": {"mergekit": work / "mk" / name, "neuromerge": out}}
        yield runs


@pytest.mark.parametrize("name", [n for n, _ in CONFIGS])
def test_config_runs_unchanged_and_gives_mergekits_tensors(
        name: str, corpus_runs: dict[str, dict[str, Any]]) -> None:
    run = corpus_runs[name]
    assert run["mergekit"] == "ok", f"mergekit failed on {name}: {run['mergekit']}"
    assert run["neuromerge"] == "ok", f"neuromerge failed on {name} (its stderr is above)"
    check_same_output(name, run)


def _expected_dtype(data: dict[str, Any], theirs: torch.Tensor) -> torch.dtype:
    # a float32 / float64 dtype is the compute dtype only: the output keeps the stand-ins'
    # bfloat16 (mergekit writes the dtype it computes in)
    return torch.bfloat16 if data.get("dtype") in ("float32", "float64") else theirs.dtype


def check_same_output(name: str, run: dict[str, Any]) -> None:
    data = dict(CONFIGS)[name]
    ours = read_folder(run["out"]["neuromerge"])
    theirs = read_folder(run["out"]["mergekit"])
    assert sorted(ours) == sorted(theirs), sorted(set(ours) ^ set(theirs))
    for n, b in theirs.items():
        assert ours[n].shape == b.shape, n
        assert ours[n].dtype == _expected_dtype(data, b), (n, ours[n].dtype, b.dtype)
    if data["merge_method"] in RANDOM:
        _same_keep_rate(ours, theirs, data)
    else:
        ranked = data["merge_method"] in RANKED and data.get("dtype") in ("float16", "bfloat16")
        _same_values(ours, theirs, flips=FLIPS if ranked else 0.0)
    _same_config(run["out"], data)


def _same_values(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], *,
                 flips: float = 0.0) -> None:
    """Every entry within rounding, but for at most a share ``flips`` of them (and then a mean
    change of at most FLIP_MEAN of the mean |value|)."""
    bad, off, total, diff_sum, value_sum = [], 0, 0, 0.0, 0.0
    for n, b in sorted(theirs.items()):
        a, b64 = ours[n].double(), b.double()
        eps = max(EPS[ours[n].dtype], EPS[b.dtype])
        # each side rounds to its dtype; mergekit's half-precision arithmetic rounds more often
        tol = 4 * eps * b64.abs() + eps * b64.abs().max()
        diff = (a - b64).abs()
        wrong = int((diff > tol).sum())
        off, total = off + wrong, total + b.numel()
        diff_sum, value_sum = diff_sum + float(diff.sum()), value_sum + float(b64.abs().sum())
        if not flips and (wrong or diff.mean() > eps * b64.abs().mean()):
            bad.append(f"{n}: max |diff| {diff.max().item():.3g} (|value| up to "
                       f"{b64.abs().max().item():.3g})")
    assert not bad, "tensors differ from mergekit's:\n" + "\n".join(bad[:10])
    assert off <= flips * total, f"{off} of {total} entries differ from mergekit's"
    assert diff_sum <= FLIP_MEAN * value_sum + (0 if flips else float("inf"))


def _same_keep_rate(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
                    data: dict[str, Any]) -> None:
    """The share of entries the merge changed from the base, and the size of the change."""
    base_dir = Path.cwd() / data["base_model"].strip() if standins.is_local(
        data["base_model"].strip()) else None
    base = read_folder(base_dir) if base_dir is not None else _hub_base(data)
    changed, total, norms = [0, 0], 0, [0.0, 0.0]
    for n, b in theirs.items():
        if b.dim() < 2:
            continue
        ref = base[n].to(b.dtype).double()
        for i, t in enumerate((ours[n], b)):
            delta = t.double() - ref
            changed[i] += int((delta != 0).sum())
            norms[i] += float((delta ** 2).sum())
        total += b.numel()
    p = changed[1] / total
    sigma = (p * (1 - p) / total) ** 0.5
    assert abs(changed[0] - changed[1]) / total <= 6 * sigma + 2e-3, (changed, total)
    assert abs(norms[0] ** 0.5 / norms[1] ** 0.5 - 1) < 0.1, norms


def _hub_base(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    repo = data["base_model"].strip().partition("@")[0]
    return read_folder(Path.cwd() / "hub" / repo)


def _same_config(out: dict[str, Path], data: dict[str, Any]) -> None:
    cfgs = {tool: json.loads((d / "config.json").read_text()) for tool, d in out.items()}
    key = "n_layer" if "n_layer" in cfgs["mergekit"] else "num_hidden_layers"
    assert cfgs["neuromerge"][key] == cfgs["mergekit"][key]
    if data.get("chat_template"):
        from transformers import AutoTokenizer

        from neuromerge.io.chat_templates import NAMED

        got = AutoTokenizer.from_pretrained(out["neuromerge"]).chat_template
        assert got == NAMED.get(data["chat_template"], data["chat_template"])
        assert AutoTokenizer.from_pretrained(out["mergekit"]).chat_template


def test_the_corpus_is_what_its_readme_says() -> None:
    assert len(CONFIGS) >= 30
    methods = {d["merge_method"] for _, d in CONFIGS}
    assert {"slerp", "ties", "dare_ties", "dare_linear", "task_arithmetic", "linear",
            "model_stock", "della", "breadcrumbs", "passthrough"} <= methods
    assert any("slices" in d for _, d in CONFIGS)
    assert any(d.get("tokenizer_source") == "union" for _, d in CONFIGS)
