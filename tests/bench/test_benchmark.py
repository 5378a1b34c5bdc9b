"""The benchmark pipeline end to end on a tiny random BERT and synthetic tasks, in seconds:
experts learn their tasks, every method is merged and scored, sweeps choose on validation, the
report is written, and a rerun resumes from the cache."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch.testing import assert_close

from neuromerge import merge_state_dicts
from neuromerge.bench.benchmark import Bench, recombine, run_benchmark
from neuromerge.bench.profiles import SWEEPS, Profile
from neuromerge.bench.train import TrainConfig
from neuromerge.examples import save_tokenizer, tiny_bert

WORDS = "the a of and to in is it that was for on are as with they at be this from".split()


@dataclass
class DS:
    texts: list[str]
    labels: list[int]
    label_names: list[str]


CUES = {"alpha": ["water", "home"], "beta": ["good", "time"], "gamma": ["red", "blue", "green"]}


def synthetic(task: str, n: int = 160) -> DS:
    """'keyword' tasks a tiny model learns in a few steps: the label is which cue word occurs."""
    cues = CUES[task]
    rng = random.Random(task)
    texts, labels = [], []
    for i in range(n):
        y = i % len(cues)
        words = rng.choices(WORDS, k=6)
        words.insert(rng.randrange(7), cues[y])
        texts.append(" ".join(words))
        labels.append(y)
    return DS(texts, labels, cues)


def splits(ds: DS, seed: int, n_train: int, n_val: int, n_test: int) -> dict[str, DS]:
    idx = list(range(len(ds.texts)))
    random.Random(seed).shuffle(idx)
    parts = {"train": idx[:n_train], "val": idx[n_train:n_train + n_val],
             "test": idx[n_train + n_val:n_train + n_val + n_test]}
    return {k: DS([ds.texts[i] for i in v], [ds.labels[i] for i in v], ds.label_names)
            for k, v in parts.items()}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("base")
    tiny_bert(seed=0, hidden=32, layers=2).save_pretrained(str(folder))
    save_tokenizer(folder)
    return folder


PROFILE = Profile("test", ("alpha", "beta"), (0,), n_train=96, n_val=32, n_test=32,
                  train=TrainConfig(epochs=20, batch_size=16, lr=5e-3, max_length=16),
                  tune=True, eval_batch=32,
                  # the sweeps of the other methods are checked by the recombination test below
                  methods=("average", "ties", "neuromerging", "fisher", "regmean"))


def test_benchmark_end_to_end_and_resume(tiny_base: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = dict(cache_dir=tmp_path / "cache", base_dir=tiny_base, datasets=synthetic,
                  make_splits=splits, progress=False)
    rep = run_benchmark(PROFILE, tmp_path / "out", **kwargs)
    s = rep["summary"]
    expert = s["reference/expert (upper bound)"]
    assert min(v[0] for v in expert["tasks"].values()) >= 0.8  # the experts learned
    for mode in ("default", "tuned"):
        assert PROFILE.methods is not None
        for method in PROFILE.methods:
            row = s[f"{mode}/{method}"]
            assert set(row["tasks"]) == {"alpha", "beta"} and len(row["average"]) == 1
            assert 0.0 <= row["normalized"][0] <= 1.5
    tuned = s["tuned/neuromerging"]["params"][0]
    assert tuned["lambda1"] in SWEEPS["neuromerging"]["linear"]["lambda1"]
    recs = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    # the tuned choice is the best validation point of its sweep
    sweep = [r for r in recs if r["kind"] == "sweep" and r["method"] == "ties"]
    best = max(sweep, key=lambda r: sum(r["accuracy"].values()))
    chosen = next(r for r in recs if r.get("mode") == "tuned" and r["method"] == "ties")
    assert chosen["val_accuracy"] == pytest.approx(sum(best["accuracy"].values()) / 2)
    assert len(sweep) == len(SWEEPS["ties"]["grid"]) * len(SWEEPS["ties"]["linear"]["scale"])
    default_nm = next(r for r in recs if r.get("mode") == "default"
                      and r["method"] == "neuromerging")
    assert default_nm["params"]["lambda1"] == 0.0 and default_nm["params"]["lambda2"] > 1.0
    cfg = tmp_path / "out" / "configs" / "seed0" / "neuromerging.yaml"
    assert "merge_method: neuromerging" in cfg.read_text()
    # a mergekit method's defaults mode is the paper's, spelled out in its YAML (unset, a YAML
    # would mean mergekit's density 1 per tensor)
    ties_cfg = yaml.safe_load((tmp_path / "out" / "configs" / "seed0" / "ties.yaml").read_text())
    assert ties_cfg["parameters"] == {"density": 0.2, "trim_scope": "global",
                                      "trim_count": "ceil"}
    default_ties = next(r for r in recs if r.get("mode") == "default" and r["method"] == "ties")
    assert default_ties["params"]["density"] == 0.2
    assert default_ties["params"]["trim_scope"] == "global"
    # fisher / regmean: statistics computed once per expert from its training split, cached
    # next to it, and named in the configs the default merges ran from
    stat_files = sorted((tmp_path / "cache" / "experts").glob("*/statistics/*.safetensors"))
    assert len(stat_files) == 4  # 2 experts × (fisher, regmean)
    fisher_cfg = yaml.safe_load((tmp_path / "out" / "configs" / "seed0" / "fisher.yaml")
                                .read_text())
    assert all(Path(m["statistics"]).is_file() for m in fisher_cfg["models"])
    mtimes = [f.stat().st_mtime_ns for f in stat_files]
    for f in ("report.md", "results.csv", "summary.json", "accuracy_default.png",
              "accuracy_tuned.png", "neuromerging_lambda_heatmap.png"):
        assert (tmp_path / "out" / f).exists(), f

    before = (tmp_path / "out" / "results.jsonl").read_text()
    again = run_benchmark(PROFILE, tmp_path / "out", **kwargs)
    assert (tmp_path / "out" / "results.jsonl").read_text() == before  # nothing recomputed
    assert "fine-tuning" not in again["meta"]["seconds"]
    assert "statistics" not in again["meta"]["seconds"]
    assert [f.stat().st_mtime_ns for f in stat_files] == mtimes
    assert again["summary"]["default/ties"]["average"] == s["default/ties"]["average"]

    # a grid changed after a run: its new points are scored on validation and, when the best
    # point is not the recorded one, the tuned merge is chosen and scored again
    scales = [x for x in SWEEPS["ties"]["linear"]["scale"] if x != chosen["params"]["scale"]]
    monkeypatch.setitem(SWEEPS["ties"], "linear", {"scale": [*scales, 0.25]})
    third = run_benchmark(PROFILE, tmp_path / "out", **kwargs)
    recs = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    new = recs[len(before.splitlines()):]
    assert {(r["kind"], r.get("mode")) for r in new} == {("sweep", None), ("merge", "tuned")}
    assert {r["params"]["scale"] for r in new if r["kind"] == "sweep"} == {0.25}
    rechosen = third["summary"]["tuned/ties"]["params"][0]
    assert rechosen["scale"] in [*scales, 0.25] and rechosen != chosen["params"]
    assert [r["method"] for r in new if r["kind"] == "merge"] == ["ties"]


SWEPT = [("neuromerging", {"density": 0.2}, {"lambda1": 0.5, "lambda2": 1.5}),
         ("dare_neuromerging", {}, {"lambda1": 1.0, "lambda2": 2.0}),
         ("pcb", {"ratio": 0.2}, {"scale": 1.5}),
         ("breadcrumbs", {}, {"scale": 0.7}),
         ("consensus_ta", {"tall_lambda": 0.2}, {"scale": 0.5}),
         ("consensus_ties", {}, {"scale": 1.5}),
         ("tsv_m", {}, {"alpha": 1.5}),
         ("iso_c", {}, {"alpha": 2.0}),
         ("iso_cts", {}, {"alpha": 0.5})]


@pytest.mark.parametrize(("method", "fixed", "coeffs"), SWEPT, ids=[m for m, _, _ in SWEPT])
def test_linear_components_recombine_exactly(tiny_base: Path, tmp_path: Path, method: str,
                                             fixed: dict, coeffs: dict) -> None:
    """Sweeping λ by recombining unit merges equals merging with those λ directly."""
    from safetensors.torch import save_file

    from neuromerge.examples import expert_update
    from neuromerge.io.reader import open_checkpoint

    r = open_checkpoint(tiny_base / "model.safetensors")
    base_sd = {n: r.read(n) for n in r.names()}
    experts = {}
    for i, task in enumerate(("alpha", "beta")):
        folder = tmp_path / task / "body"
        folder.mkdir(parents=True)
        save_file(expert_update(base_sd, i + 1), str(folder / "model.safetensors"))
        experts[task] = folder.parent
    bench = Bench(PROFILE, tmp_path / "o", tmp_path / "c", tiny_base, synthetic, splits,
                  [method], progress=False)
    (tmp_path / "o").mkdir()
    assert set(coeffs) == set(SWEEPS[method]["linear"])
    theta0, comps = bench.components(method, fixed, experts)
    combined = recombine(theta0, comps, coeffs)
    direct = merge_state_dicts(
        base_sd, {str(experts[t] / "body"): expert_update(base_sd, i + 1)
                  for i, t in enumerate(("alpha", "beta"))}, method,
        {**fixed, **coeffs}).state_dict
    for k, v in direct.items():
        if v.is_floating_point():
            assert_close(combined[k], v, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(combined[k], v)
