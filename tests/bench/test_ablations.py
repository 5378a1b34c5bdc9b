"""``neuromerge bench --ablations`` on a tiny random BERT and synthetic keyword tasks: every
ablation produces the settings it claims, tuned λ2 is chosen on validation, recombined settings
equal direct merges, and a rerun recomputes nothing."""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from neuromerge import merge_state_dicts
from neuromerge.bench.ablation_plans import (
    ABLATIONS,
    AUTO,
    frame_settings,
    nm_setting,
    subspace_settings,
    trim_compat_settings,
)
from neuromerge.bench.ablations import Ablations, run_ablations
from neuromerge.bench.accuracy import load_body
from neuromerge.bench.benchmark import open_bench
from neuromerge.bench.profiles import Profile
from neuromerge.bench.train import TrainConfig
from neuromerge.errors import ConfigError
from tests.bench.test_ablation_plans import PLAN
from tests.bench.test_benchmark import splits, tiny_base  # noqa: F401 (fixture)
from tests.bench.test_benchmark import synthetic as runner_synthetic

synthetic = functools.partial(runner_synthetic, n=150)


PROFILE = Profile("test", ("alpha", "beta", "gamma"), (0,), n_train=90, n_val=30, n_test=30,
                  train=TrainConfig(epochs=12, batch_size=16, lr=5e-3, max_length=16),
                  tune=True, eval_batch=32)


@pytest.fixture(scope="module")
def report(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
           ) -> tuple[dict, Path, dict]:
    tmp = tmp_path_factory.mktemp("abl")
    kwargs = dict(cache_dir=tmp / "cache", base_dir=tiny_base, datasets=synthetic,
                  make_splits=splits)
    rep = run_ablations(PROFILE, tmp / "out", plan=PLAN, progress=False, **kwargs)
    return rep, tmp / "out", kwargs


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


def test_every_ablation_reports_its_settings(report: tuple[dict, Path, dict]) -> None:
    rep, out, _ = report
    s = rep["summary"]
    assert set(s) == set(ABLATIONS)
    for name, settings in (("subspaces", subspace_settings(PLAN)),
                           ("frame", frame_settings(PLAN)),
                           ("trim_compat", trim_compat_settings(PLAN))):
        assert [r["label"] for r in s[name]] == [x.label for x in settings]
        for r in s[name]:
            for sp in ("val", "test"):
                assert len(r[sp]["values"]) == 1 and 0.0 <= r[sp]["mean"] <= 1.0
                assert set(r[f"{sp}_tasks"]) == set(PROFILE.tasks)
    assert [r["density"] for r in s["density"]] == [0.2, 1.0]
    for r in s["density"]:
        assert set(r["grid_val"]) == {"0.5", "2", "4"}
        assert r["tuned"]["lambda2"][0] in (0.5, 2.0, 4.0)
    by = s["tasks"]["by_size"]
    assert [e["T"] for e in by] == [2, 3] and [len(e["subsets"]) for e in by] == [2, 1]
    for e in by:
        for m in PLAN.task_methods:
            assert len(e["methods"][m]["accuracy"]["values"]) == 1
    # λ2 = auto is resolved from the trim: > 1 at density 0.2, exactly 1 without a trim
    auto02 = s["density"][0]["auto"]["lambda2_auto"][0]
    assert auto02 > 1.0 and s["density"][1]["auto"]["lambda2_auto"][0] == pytest.approx(1.0)
    for f in ("report.md", "summary.json", "results.jsonl", "subspaces.png", "density.png",
              "tasks.png"):
        assert (out / f).exists(), f
    md = (out / "report.md").read_text()
    for title in ("## Subspaces", "## Orthogonal merge", "## Density", "## Global vs per-tensor",
                  "## Number of merged tasks"):
        assert title in md
    assert "seed]" not in md  # every cell covers the report's one seed
    # task-count records score only the merged tasks
    recs = [r for r in _records(out) if r["kind"] == "ablation-tasks"]
    assert len(recs) == 3 * len(PLAN.task_methods)
    assert all(set(r["accuracy"]) == set(r["tasks"]) for r in recs)


def test_tuned_lambda2_is_chosen_on_validation(report: tuple[dict, Path, dict]) -> None:
    rep, out, _ = report
    recs = _records(out)
    for r in rep["summary"]["density"]:
        fixed = dict(nm_setting("x", density=r["density"]).fixed)

        def mine(rec: dict, split: str, fixed: dict = fixed) -> bool:  # λ1 0, λ_point = λ2
            return (rec["kind"] == "ablation" and rec["split"] == split
                    and rec["fixed"] == fixed and rec["linear"]["lambda1"] == 0
                    and rec["linear"]["lambda_point"] is None)

        val = {rec["linear"]["lambda2"]: sum(rec["accuracy"].values()) / 3 for rec in recs
               if mine(rec, "val") and rec["linear"]["lambda2"] != AUTO}
        assert set(val) == {0.5, 2.0, 4.0}
        best = max(val, key=lambda k: val[k])
        assert r["tuned"]["lambda2"] == [best]
        assert r["tuned"]["val"]["mean"] == pytest.approx(val[best])
        # only the chosen grid point (and auto) is scored on test
        tests = {rec["linear"]["lambda2"] for rec in recs if mine(rec, "test")}
        assert tests == {best, AUTO}


def test_recombined_setting_equals_a_direct_merge(report: tuple[dict, Path, dict],
                                                  tiny_base: Path) -> None:  # noqa: F811
    """λ1 = 2, λ2 = 2 with points at λ2 auto, from unit merges, equals merging it directly."""
    _, out, kwargs = report
    bench = open_bench(PROFILE, out, progress=False, **kwargs)
    abl = Ablations(bench, PLAN)
    sd = bench.prepare(0)
    s = next(x for x in subspace_settings(PLAN) if x.lambda1 == 2.0 and x.lambda2 == 2.0)
    rec = abl.record(sd, s, "val")
    auto = rec["lambda2_auto"]
    assert rec["coeffs"] == {"lambda1": 2.0, "lambda2": 2.0, "lambda_point": auto}
    from neuromerge.io.reader import open_checkpoint

    def sd_of(path: Path) -> dict[str, torch.Tensor]:
        r = open_checkpoint(path)
        try:
            return {n: r.read(n) for n in r.names()}
        finally:
            r.close()

    direct = merge_state_dicts(
        sd_of(tiny_base), {str(sd.experts[t] / "body"): sd_of(sd.experts[t] / "body")
                           for t in PROFILE.tasks}, "neuromerging",
        {"lambda1": 2.0, "lambda2": 2.0, "lambda_point": auto}).state_dict
    body = load_body(state_dict=direct, config_dir=tiny_base)
    assert bench.score_body(body, sd.splits, sd.heads, "val") == rec["accuracy"]
    # and λ2 = auto from the unit merge is what a default merge resolves to
    res = merge_state_dicts(sd_of(tiny_base), {str(sd.experts[t] / "body"):
                                                sd_of(sd.experts[t] / "body")
                                                for t in PROFILE.tasks}, "neuromerging", {})
    assert res.params["lambda2"] == pytest.approx(auto, rel=1e-12)


def test_rerun_skips_cached_records(report: tuple[dict, Path, dict]) -> None:
    rep, out, kwargs = report
    before = (out / "results.jsonl").read_text()
    again = run_ablations(PROFILE, out, plan=PLAN, progress=False, **kwargs)
    assert (out / "results.jsonl").read_text() == before  # nothing recomputed
    assert "merging" not in again["meta"]["seconds"] and "fine-tuning" not in \
        again["meta"]["seconds"]
    assert again["summary"] == rep["summary"]
    # --report-only in a fresh folder over the same experts: every cell empty, nothing scored
    fresh = run_ablations(PROFILE, out.parent / "fresh", plan=PLAN, progress=False,
                          compute=False, **kwargs)
    assert not (out.parent / "fresh" / "results.jsonl").exists()
    assert all(not r["test"]["values"] for r in fresh["summary"]["frame"])
    assert "| 2 | 2 | – | – |" in fresh["markdown"]


def test_profile_without_validation_is_refused(tiny_base: Path,  # noqa: F811
                                               tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has none: use --profile full"):
        run_ablations(replace(PROFILE, n_val=0), tmp_path / "o", plan=PLAN, progress=False,
                      cache_dir=tmp_path / "c", base_dir=tiny_base, datasets=synthetic,
                      make_splits=splits)
    with pytest.raises(ConfigError, match="no cached expert for task 'alpha'"):
        run_ablations(PROFILE, tmp_path / "o", plan=PLAN, progress=False, compute=False,
                      cache_dir=tmp_path / "c", base_dir=tiny_base, datasets=synthetic,
                      make_splits=splits)
    with pytest.raises(ConfigError, match="unknown ablation"):
        run_ablations(PROFILE, tmp_path / "o", plan=replace(PLAN, ablations=("nope",)),
                      progress=False)
