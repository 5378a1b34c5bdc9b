"""``neuromerge bench --ablations``: NeuroMerging's design choices tested one at a time on the
benchmark's own experts, splits, heads and evaluation (``neuromerge.bench.benchmark.Bench``).

Ablations (each setting is scored on the validation and test splits of every task unless said):

- ``subspaces``: λ1 × λ2 over the neuronal tensors (parallel only, orthogonal only, both, neither),
  point tensors at λ_point = λ2 auto throughout so that only the two subspaces vary;
- ``frame``: the orthogonal merge in each neuron's SVD frame against element-wise TIES, and the
  rank threshold ρ = 1 against lower;
- ``density``: the trim density swept with λ2 = auto against λ2 tuned on validation (the grid
  points are scored on validation only; auto and the tuned choice on test);
- ``trim_compat``: global against per-tensor trimming, ``compat: official`` against the spec;
- ``tasks``: the number of merged tasks T = 2 … all, a few fixed task subsets per T, several
  methods at their defaults, scored on the test splits of the merged tasks.

Every evaluation is a record of the bench's ``Results`` file keyed by what determines it (seed
context, method, settings, split), so a setting shared by two ablations is scored once and a rerun
skips finished work. NeuroMerging's λ's enter linearly (θ0 + λ1·P + λ2·O + λ_point·points): one
merge per unit and per non-linear setting, recombined exactly for every λ (``Bench.merge_units``).

Here: running the ablations (``Ablations``, ``run_ablations``) and collecting their numbers
(``summarize``); the grids and settings are in ``ablation_plans``, the report in
``ablations_report``.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from neuromerge.bench.ablation_plans import (
    ABLATIONS,
    AUTO,
    Plan,
    Setting,
    density_settings,
    frame_settings,
    subspace_settings,
    task_subsets,
    trim_compat_settings,
)
from neuromerge.bench.ablations_report import mean_std, write_report
from neuromerge.bench.accuracy import load_body
from neuromerge.bench.benchmark import Bench, SeedData, bench_meta, open_bench, recombine
from neuromerge.bench.results import mean_accuracy, record_key
from neuromerge.errors import ConfigError
from neuromerge.registry import get_method


class Ablations:
    """Runs the ablations of ``plan`` on a Bench (its experts, splits, heads and Results)."""

    def __init__(self, bench: Bench, plan: Plan) -> None:
        self.bench, self.plan = bench, plan
        self._cached: tuple[str, Any] | None = None  # the last group's components

    # -- NeuroMerging settings ----------------------------------------------------------------
    def _components(self, sd: SeedData, fixed: Mapping[str, Any], need_l1: bool,
                    separate_points: bool) -> tuple[dict[str, torch.Tensor],
                                                    dict[str, dict[str, torch.Tensor]], float]:
        """θ0, the unit components of NeuroMerging at ``fixed`` and λ2 = auto's value there."""
        ck = record_key(sd.ctx, fixed, need_l1, separate_points)
        if self._cached and self._cached[0] == ck:
            return self._cached[1]
        units: dict[str, dict[str, Any]] = {
            # λ2 unit merged at λ2 = auto and divided by it below: exact, and gives auto's value
            "lambda2": {"lambda1": 0.0, "lambda2": AUTO,
                        "lambda_point": 0.0 if separate_points else None}}
        if need_l1:
            units["lambda1"] = {"lambda1": 1.0, "lambda2": 0.0, "lambda_point": 0.0}
        if separate_points:
            units["lambda_point"] = {"lambda1": 0.0, "lambda2": 0.0, "lambda_point": 1.0}
        self._cached = None  # free the previous group's tensors before merging the next
        theta0, comps, resolved = self.bench.merge_units("neuromerging", fixed, sd.experts,
                                                         units)
        auto = float(resolved["lambda2"]["lambda2"])
        comps["lambda2"] = {k: v / auto if v.is_floating_point() else v
                            for k, v in comps["lambda2"].items()}
        self._cached = (ck, (theta0, comps, auto))
        return theta0, comps, auto

    def score_settings(self, sd: SeedData, settings: Sequence[Setting],
                       splits: Sequence[str] = ("val", "test"), desc: str = "") -> None:
        """Score every setting on ``splits`` unless its records exist; one merge per unit and
        per distinct ``fixed`` (groups in the order first met, so shared components are reused)."""
        groups: dict[tuple[tuple[str, Any], ...], list[Setting]] = defaultdict(list)
        for s in settings:
            groups[s.fixed].append(s)
        todo = [(s, sp) for s in settings for sp in splits
                if not self.bench.results.get(s.key(sd.ctx, sp))]
        bar = tqdm(total=len(todo), desc=desc or "ablation", disable=not self.bench.progress,
                   leave=False, dynamic_ncols=True)
        with bar:
            for fixed, members in groups.items():
                mine = [(s, sp) for s, sp in todo if s.fixed == fixed]
                if not mine:
                    continue
                official = dict(fixed)["compat"] == "official"
                need_l1 = any(s.lambda1 != 0 for s in members)
                # official mode scales points by (λ1 + λ2)/2 whatever λ_point: no points unit
                separate = not official and any(s.linear["lambda_point"] is not None
                                                for s in members)
                theta0, comps, auto = self._components(sd, dict(fixed), need_l1, separate)
                for s in dict.fromkeys(s for s, _ in mine):
                    coeffs = {"lambda1": s.lambda1,
                              "lambda2": auto if s.lambda2 == AUTO else float(s.lambda2)}
                    lp = s.linear["lambda_point"]
                    coeffs["lambda_point"] = (coeffs["lambda2"] if lp is None else
                                              auto if lp == AUTO else float(lp))
                    body = load_body(state_dict=recombine(theta0, comps, coeffs),
                                     config_dir=self.bench.base)
                    for sp in (sp for s2, sp in mine if s2 == s):
                        acc = self.bench.score_body(body, sd.splits, sd.heads, sp)
                        self.bench.results.add({
                            "key": s.key(sd.ctx, sp), "seed": sd.seed, "kind": "ablation",
                            "method": "neuromerging", "label": s.label, "split": sp,
                            "fixed": dict(s.fixed), "linear": s.linear, "coeffs": coeffs,
                            "lambda2_auto": auto, "accuracy": acc})
                        bar.update()

    def record(self, sd: SeedData, s: Setting, split: str) -> dict[str, Any]:
        return self.bench.results.records[s.key(sd.ctx, split)]

    def tuned(self, sd: SeedData, grid: Sequence[Setting]) -> Setting:
        """The grid setting with the best mean validation accuracy (first on ties)."""
        return max(grid, key=lambda s: mean_accuracy(self.record(sd, s, "val")["accuracy"]))

    # -- the ablations ----------------------------------------------------------------------
    def run_seed(self, seed: int) -> None:
        b, plan = self.bench, self.plan
        sd = b.prepare(seed)
        b.expert_scores(sd)
        for name in plan.ablations:
            with b.timer(f"ablation {name}"):
                if name == "subspaces":
                    self.score_settings(sd, subspace_settings(plan), plan.splits, "subspaces")
                elif name == "frame":
                    self.score_settings(sd, frame_settings(plan), plan.splits, "frame")
                elif name == "trim_compat":
                    self.score_settings(sd, trim_compat_settings(plan), plan.splits,
                                        "trim/compat")
                elif name == "density":
                    for d in plan.densities:
                        auto, grid = density_settings(plan, d)
                        self.score_settings(sd, [auto, *grid], ("val",), desc=f"density {d:g}")
                        self.score_settings(sd, [auto, self.tuned(sd, grid)], ("test",),
                                            desc=f"density {d:g} test")
                elif name == "tasks":
                    self.run_tasks(sd)

    def task_key(self, sd: SeedData, method: str, subset: Sequence[str]) -> str:
        return record_key("ablation-tasks", sd.ctx, method, list(subset))

    def run_tasks(self, sd: SeedData) -> None:
        b = self.bench
        subsets = task_subsets(b.profile.tasks, self.plan.subsets_per_size,
                               self.plan.subset_seed, self.plan.task_sizes)
        todo = [(sub, m) for sub in subsets for m in self.plan.task_methods
                if not b.results.get(self.task_key(sd, m, sub))]
        for sub, method in tqdm(todo, desc="number of tasks", disable=not b.progress,
                                leave=False, dynamic_ncols=True):
            theta0, comps, resolved = b.merge_units(method, {}, sd.experts, {"": {}}, sub)
            body = load_body(state_dict=recombine(theta0, comps, {}), config_dir=b.base)
            heads = {t: sd.heads[t] for t in sub}
            b.results.add({"key": self.task_key(sd, method, sub), "seed": sd.seed,
                           "kind": "ablation-tasks", "method": method, "tasks": list(sub),
                           "split": "test", "params": resolved[""],
                           "accuracy": b.score_body(body, sd.splits, heads, "test")})


# -- summary ----------------------------------------------------------------------------------
def summarize(abl: Ablations, seeds: Sequence[int]) -> dict[str, Any]:
    """Per ablation, per setting: mean accuracy over tasks for each split and seed (mean ± std
    over seeds), per-task accuracies per seed, and the λ2 = auto value; nothing is recomputed."""
    b, plan = abl.bench, abl.plan
    sds = [b.prepare(s, train=False) for s in seeds]  # reads the caches, computes nothing
    out: dict[str, Any] = {}

    def rows(settings: Sequence[Setting], splits: Sequence[str] = ("val", "test")
             ) -> list[dict[str, Any]]:
        res = []
        for s in settings:
            row: dict[str, Any] = {"label": s.label, "fixed": dict(s.fixed), **s.linear}
            for sp in splits:
                recs = [b.results.get(s.key(sd.ctx, sp)) for sd in sds]
                recs = [r for r in recs if r]
                row[sp] = mean_std([mean_accuracy(r["accuracy"]) for r in recs])
                row[f"{sp}_tasks"] = {t: [r["accuracy"][t] for r in recs]
                                      for t in b.profile.tasks}
                if recs:
                    row["lambda2_auto"] = [r["lambda2_auto"] for r in recs]
            res.append(row)
        return res

    if "subspaces" in plan.ablations:
        out["subspaces"] = rows(subspace_settings(plan))
    if "frame" in plan.ablations:
        out["frame"] = rows(frame_settings(plan))
    if "trim_compat" in plan.ablations:
        out["trim_compat"] = rows(trim_compat_settings(plan))
    if "density" in plan.ablations:
        dens = []
        for d in plan.densities:
            auto, grid = density_settings(plan, d)
            row: dict[str, Any] = {"density": d, "auto": rows([auto])[0],
                                   "grid_val": {f"{s.lambda2:g}": rows([s], ("val",))[0]["val"]
                                                for s in grid}}
            chosen = [abl.tuned(sd, grid) for sd in sds
                      if all(b.results.get(s.key(sd.ctx, "val")) for s in grid)]
            tuned_recs = [(sd, s) for sd, s in zip(sds, chosen, strict=False)
                          if b.results.get(s.key(sd.ctx, "test"))]
            row["tuned"] = {
                "lambda2": [s.lambda2 for s in chosen],
                "val": mean_std([mean_accuracy(abl.record(sd, s, "val")["accuracy"])
                                 for sd, s in tuned_recs]),
                "test": mean_std([mean_accuracy(abl.record(sd, s, "test")["accuracy"])
                                  for sd, s in tuned_recs]),
                "test_tasks": {t: [abl.record(sd, s, "test")["accuracy"][t]
                                   for sd, s in tuned_recs] for t in b.profile.tasks}}
            dens.append(row)
        out["density"] = dens
    if "tasks" in plan.ablations:
        experts = {sd.seed: {t: r["accuracy"] for t in b.profile.tasks
                             if (r := b.results.get(record_key("expert", sd.ctx, t)))}
                   for sd in sds}
        subsets = task_subsets(b.profile.tasks, plan.subsets_per_size, plan.subset_seed,
                               plan.task_sizes)
        by_size = []
        for size in sorted({len(s) for s in subsets}):
            entry: dict[str, Any] = {"T": size, "subsets": [list(s) for s in subsets
                                                            if len(s) == size], "methods": {}}
            for m in plan.task_methods:
                # per seed: mean over this size's subsets of the mean over the merged tasks
                acc, norm = [], []
                for sd in sds:
                    recs = [b.results.get(abl.task_key(sd, m, s)) for s in subsets
                            if len(s) == size]
                    if not recs or not all(recs) or len(experts[sd.seed]) < len(b.profile.tasks):
                        continue
                    acc.append(statistics.fmean(mean_accuracy(r["accuracy"]) for r in recs))
                    norm.append(statistics.fmean(
                        statistics.fmean(r["accuracy"][t] / experts[sd.seed][t]
                                         for t in r["accuracy"]) for r in recs))
                entry["methods"][m] = {"accuracy": mean_std(acc), "normalized": mean_std(norm)}
            by_size.append(entry)
        out["tasks"] = {"by_size": by_size,
                        "expert": {str(s): e for s, e in experts.items()}}
    return out


def run_ablations(profile: Any, out_dir: str | Path, *, plan: Plan | None = None,
                  seeds: Sequence[int] | None = None, progress: bool = True,
                  compute: bool = True, **bench_kwargs: Any) -> dict[str, Any]:
    """Run (or resume) the ablations on ``profile``'s experts and write the report into
    ``out_dir`` (results.jsonl, summary.json, report.md, PNG plots). ``compute=False`` writes
    the report from the records already there (a run cut short: missing cells show "–").
    ``bench_kwargs`` as ``benchmark.open_bench`` (cache_dir, base_dir, datasets, make_splits)."""
    plan = plan or Plan()
    unknown = [a for a in plan.ablations if a not in ABLATIONS]
    if unknown:
        raise ConfigError(f"unknown ablation {unknown[0]!r} (known: {', '.join(ABLATIONS)})")
    for m in plan.task_methods:
        get_method(m)  # an unknown name fails before any work
    t0 = time.perf_counter()
    bench = open_bench(profile, out_dir, seeds=seeds, progress=progress, **bench_kwargs)
    p = bench.profile
    if p.n_val <= 0:
        raise ConfigError(f"the ablations tune λ2 on validation splits and profile {p.name!r} "
                          f"has none: use --profile full")
    abl = Ablations(bench, plan)
    for seed in p.seeds if compute else ():
        abl.run_seed(seed)
    meta = bench_meta(bench)
    meta["seconds"] = {**bench.timer.seconds, "total": time.perf_counter() - t0} if compute else {}
    return write_report(summarize(abl, p.seeds), asdict(plan), p.tasks, meta, bench.out)


__all__ = ["Ablations", "run_ablations", "summarize"]
