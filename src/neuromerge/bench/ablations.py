"""``neuromerge bench --ablations``: NeuroMerging's design choices tested one at a time on the
benchmark's own experts, splits, heads and evaluation (``neuromerge.bench.runner.Bench``).

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
"""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from neuromerge.bench.evaluate import load_body
from neuromerge.bench.report import lambda_heatmap
from neuromerge.bench.runner import Bench, SeedData, _combine, _key, bench_meta, open_bench
from neuromerge.errors import ConfigError
from neuromerge.registry import get_method

ABLATIONS = ("subspaces", "frame", "density", "trim_compat", "tasks")
#: NeuroMerging's parameters that change a merge non-linearly: one merge per distinct setting.
NONLINEAR = ("density", "trim_scope", "rank_threshold", "orthogonal_merge", "compat")
AUTO = "auto"

Lambda = float | str  # a number or "auto" (λ2 = auto as resolved by the merge)


@dataclass(frozen=True)
class Plan:
    """The grids of every ablation. Sized so that one seed of the full profile takes about an
    hour on 2 shared cores (each scored setting: about 35-50 s for its validation and test
    splits)."""

    lambda1: tuple[float, ...] = (0.0, 1.0, 3.0)
    lambda2: tuple[Lambda, ...] = (0.0, 1.0, AUTO, 2.5)
    rank_thresholds: tuple[float, ...] = (0.9, 0.5)
    densities: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)
    lambda2_grid: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
    task_methods: tuple[str, ...] = ("average", "task_arithmetic", "ties", "neuromerging")
    subsets_per_size: int = 2
    subset_seed: int = 0  # the task subsets are the same for every bench seed (paired)
    task_sizes: tuple[int, ...] | None = None  # T values of the tasks ablation (None: 2 … all)
    splits: tuple[str, ...] = ("val", "test")  # of subspaces, frame, trim_compat settings
    ablations: tuple[str, ...] = ABLATIONS


#: ``--grid``: "full" as designed; "small" takes about half its time (measured: ~30 min per
#: seed with one thread; each setting scored on test only, unless validation chooses; one
#: task subset per T, every T and the four task methods: the decay with T is the question).
PLANS: dict[str, Plan] = {
    "full": Plan(),
    "small": Plan(lambda1=(0.0, 1.0), lambda2=(0.0, AUTO), rank_thresholds=(0.5,),
                  densities=(0.05, 0.2, 1.0), lambda2_grid=(1.0, 1.5, 2.0, 3.0),
                  subsets_per_size=1, splits=("test",)),
}


@dataclass(frozen=True)
class Setting:
    """One NeuroMerging merge: non-linear settings (``fixed``, all of NONLINEAR) and the λ's.
    ``lambda_point`` None follows λ2, as the method's own default."""

    label: str
    fixed: tuple[tuple[str, Any], ...]
    lambda1: float = 0.0
    lambda2: Lambda = AUTO
    lambda_point: Lambda | None = None

    @property
    def linear(self) -> dict[str, Any]:
        lp = None if self.lambda_point == self.lambda2 else self.lambda_point
        return {"lambda1": self.lambda1, "lambda2": self.lambda2, "lambda_point": lp}

    def key(self, ctx: str, split: str) -> str:
        return _key("ablation", ctx, "neuromerging", dict(self.fixed), self.linear, split)


def nm_setting(label: str, lambda1: float = 0.0, lambda2: Lambda = AUTO,
               lambda_point: Lambda | None = None, **fixed: Any) -> Setting:
    """A Setting with every non-linear parameter at NeuroMerging's default unless given."""
    unknown = set(fixed) - set(NONLINEAR)
    if unknown:
        raise ConfigError(f"not a non-linear NeuroMerging parameter: {sorted(unknown)}")
    defaults = get_method("neuromerging").validate({})
    full = {k: fixed.get(k, defaults[k]) for k in NONLINEAR}
    return Setting(label, tuple(full.items()), lambda1, lambda2, lambda_point)


def _lam(x: Lambda) -> str:
    return x if isinstance(x, str) else f"{x:g}"


def subspace_settings(plan: Plan) -> list[Setting]:
    out = []
    for l1, l2 in itertools.product(plan.lambda1, plan.lambda2):
        kind = ("neither (points only)" if l1 == 0 and l2 == 0 else "parallel only" if l2 == 0
                else "orthogonal only" if l1 == 0 else "both")
        out.append(nm_setting(f"{kind}: λ1={_lam(l1)}, λ2={_lam(l2)}", l1, l2, AUTO))
    return out


def frame_settings(plan: Plan) -> list[Setting]:
    return ([nm_setting("SVD frame, ρ=1 (default)"),
             nm_setting("element-wise TIES", orthogonal_merge="ties")]
            + [nm_setting(f"SVD frame, ρ={r:g}", rank_threshold=r) for r in plan.rank_thresholds])


def trim_compat_settings(plan: Plan) -> list[Setting]:
    out = [nm_setting("global trim, spec (default)"),
           nm_setting("per-tensor trim", trim_scope="tensor"),
           nm_setting("compat: official", compat="official")]
    # official's unit-vector parallel part only matters with λ1 ≠ 0: compared where λ1 varies
    for l1 in (x for x in plan.lambda1 if x != 0 and len(plan.lambda1) > 2):
        out += [nm_setting(f"spec, λ1={l1:g}", lambda1=l1),
                nm_setting(f"compat: official, λ1={l1:g}", lambda1=l1, compat="official")]
    return out


def density_settings(plan: Plan, density: float) -> tuple[Setting, list[Setting]]:
    """λ2 = auto, and the λ2 grid tuned on validation, at one density."""
    auto = nm_setting(f"density {density:g}, λ2 auto", density=density)
    grid = [nm_setting(f"density {density:g}, λ2={v:g}", lambda2=v, density=density)
            for v in plan.lambda2_grid]
    return auto, grid


def task_subsets(tasks: Sequence[str], per_size: int, seed: int = 0,
                 sizes: Sequence[int] | None = None) -> list[tuple[str, ...]]:
    """For T in ``sizes`` (default 2 … len(tasks)): every T-subset when there are at most
    ``per_size``, otherwise ``per_size`` distinct ones drawn with a generator seeded by (seed, T)
    (the same on every call)."""
    out: list[tuple[str, ...]] = []
    for size in sizes or range(2, len(tasks) + 1):
        if not 2 <= size <= len(tasks):
            raise ConfigError(f"cannot merge {size} of {len(tasks)} tasks (2 … {len(tasks)})")
        combos = list(itertools.combinations(tasks, size))
        if len(combos) > per_size:
            combos = sorted(random.Random(f"{seed}-{size}").sample(combos, per_size),
                            key=combos.index)
        out += combos
    return out


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
        ck = _key(sd.ctx, fixed, need_l1, separate_points)
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
                    body = load_body(state_dict=_combine(theta0, comps, coeffs),
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
        return max(grid, key=lambda s: _mean(self.record(sd, s, "val")["accuracy"]))

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
        return _key("ablation-tasks", sd.ctx, method, list(subset))

    def run_tasks(self, sd: SeedData) -> None:
        b = self.bench
        subsets = task_subsets(b.profile.tasks, self.plan.subsets_per_size,
                               self.plan.subset_seed, self.plan.task_sizes)
        todo = [(sub, m) for sub in subsets for m in self.plan.task_methods
                if not b.results.get(self.task_key(sd, m, sub))]
        for sub, method in tqdm(todo, desc="number of tasks", disable=not b.progress,
                                leave=False, dynamic_ncols=True):
            theta0, comps, resolved = b.merge_units(method, {}, sd.experts, {"": {}}, sub)
            body = load_body(state_dict=_combine(theta0, comps, {}), config_dir=b.base)
            heads = {t: sd.heads[t] for t in sub}
            b.results.add({"key": self.task_key(sd, method, sub), "seed": sd.seed,
                           "kind": "ablation-tasks", "method": method, "tasks": list(sub),
                           "split": "test", "params": resolved[""],
                           "accuracy": b.score_body(body, sd.splits, heads, "test")})


def _mean(acc: Mapping[str, float]) -> float:
    return sum(acc.values()) / len(acc)


def _ms(xs: Sequence[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(xs) if xs else math.nan,
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": list(xs)}


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
                row[sp] = _ms([_mean(r["accuracy"]) for r in recs])
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
                "val": _ms([_mean(abl.record(sd, s, "val")["accuracy"]) for sd, s in tuned_recs]),
                "test": _ms([_mean(abl.record(sd, s, "test")["accuracy"])
                             for sd, s in tuned_recs]),
                "test_tasks": {t: [abl.record(sd, s, "test")["accuracy"][t]
                                   for sd, s in tuned_recs] for t in b.profile.tasks}}
            dens.append(row)
        out["density"] = dens
    if "tasks" in plan.ablations:
        experts = {sd.seed: {t: r["accuracy"] for t in b.profile.tasks
                             if (r := b.results.get(_key("expert", sd.ctx, t)))} for sd in sds}
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
                    acc.append(statistics.fmean(_mean(r["accuracy"]) for r in recs))
                    norm.append(statistics.fmean(
                        statistics.fmean(r["accuracy"][t] / experts[sd.seed][t]
                                         for t in r["accuracy"]) for r in recs))
                entry["methods"][m] = {"accuracy": _ms(acc), "normalized": _ms(norm)}
            by_size.append(entry)
        out["tasks"] = {"by_size": by_size,
                        "expert": {str(s): e for s, e in experts.items()}}
    return out


def _pct_of(ms: Mapping[str, Any], n_seeds: int = 1) -> str:
    """Mean ± std in %; a cell measured on fewer seeds than the report's says how many, so a
    one-seed number is not read as a mean over all of them."""
    vals = ms["values"]
    if not vals:
        return "–"
    cell = (f"{100 * ms['mean']:.1f}" if len(vals) == 1
            else f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}")
    if len(vals) < n_seeds:
        cell += f" [{len(vals)} seed{'s' if len(vals) > 1 else ''}]"
    return cell


def _auto(row: Mapping[str, Any]) -> str:
    vals = row.get("lambda2_auto") or []
    return ", ".join(f"{v:.3f}" for v in dict.fromkeys(round(v, 3) for v in vals)) or "–"


def markdown(summary: Mapping[str, Any], tasks: Sequence[str], meta: Mapping[str, Any]) -> str:
    seeds = list(meta["profile"]["seeds"])

    def _pct(ms: Mapping[str, Any]) -> str:
        return _pct_of(ms, len(seeds))

    parts = ["# neuromerge bench --ablations: profile "
             f"`{meta['profile']['name']}`", "",
             f"Mean accuracy (%) over the tasks' validation (val) and test splits, mean ± std over "
             f"seeds {seeds} (\"[k seeds]\": a cell measured on fewer); each merged body "
             "is scored with each task's own expert head. NeuroMerging's defaults: density "
             "0.2, global trim, λ1 = 0, λ2 = auto, SVD frame with ρ = 1, compat spec.", ""]

    def table(rows: Sequence[Mapping[str, Any]], per_task: bool) -> list[str]:
        head = ["setting", "val", "test"] + ([f"{t} (test)" for t in tasks] if per_task else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["label"], _pct(r["val"]), _pct(r["test"])]
            if per_task:
                cells += [_pct(_ms(r["test_tasks"].get(t, []))) for t in tasks]
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    if any(r[sp]["values"] for r in summary.get("subspaces", []) for sp in ("val", "test")):
        rows = summary["subspaces"]
        l2s = list(dict.fromkeys(r["lambda2"] for r in rows))
        l1s = list(dict.fromkeys(r["lambda1"] for r in rows))
        parts += ["## Subspaces: λ1 (parallel) × λ2 (orthogonal)", "",
                  "Neuronal tensors θ0 + λ1·P + λ2·O at density 0.2; point tensors (biases, "
                  "LayerNorm) at λ_point = λ2 auto in every cell. Cell: test (val). λ2 auto = "
                  f"{_auto(next(r for r in rows if r['lambda2'] == AUTO))}.", "",
                  "| λ1 \\ λ2 | " + " | ".join(_lam(x) for x in l2s) + " |",
                  "|" + "---|" * (len(l2s) + 1)]
        for l1 in l1s:
            cells = [f"{_lam(l1)}"]
            for l2 in l2s:
                r = next(r for r in rows if r["lambda1"] == l1 and r["lambda2"] == l2)
                cells.append(f"{_pct(r['test'])} ({_pct(r['val'])})")
            parts.append("| " + " | ".join(cells) + " |")
        parts.append("")
        parts += [*table(rows, per_task=True), ""]
    if "frame" in summary:
        parts += ["## Orthogonal merge: SVD frame vs element-wise TIES; rank threshold ρ", "",
                  "All at NeuroMerging's defaults otherwise (λ2 auto is the same: it depends on "
                  "the trim only).", ""]
        parts += [*table(summary["frame"], per_task=True), ""]
    if "trim_compat" in summary:
        parts += ["## Global vs per-tensor trimming; compat official vs spec", ""]
        parts += table(summary["trim_compat"], per_task=True)
        parts += ["", "λ2 auto per row: " + "; ".join(
            f"{r['label']}: {_auto(r)}" for r in summary["trim_compat"]), ""]
    if "density" in summary:
        parts += ["## Density: λ2 = auto vs λ2 tuned on validation", "",
                  "Tuned: the λ2 grid point with the best mean validation accuracy, reported on "
                  "test. Grid points are scored on validation only.", "",
                  "| density | λ2 auto | auto val | auto test | tuned λ2 | tuned val | tuned test "
                  "| tuned − auto (test, points) |", "|---|---|---|---|---|---|---|---|"]
        for r in summary["density"]:
            a, t = r["auto"], r["tuned"]
            n = min(len(a["test"]["values"]), len(t["test"]["values"]))
            gap = _ms([x - y for x, y in zip(t["test"]["values"][:n], a["test"]["values"][:n],
                                             strict=True)])
            parts.append(f"| {r['density']:g} | {_auto(a)} | {_pct(a['val'])} | "
                         f"{_pct(a['test'])} | "
                         f"{', '.join(f'{x:g}' for x in t['lambda2']) or '–'} | "
                         f"{_pct(t['val'])} | {_pct(t['test'])} | {_pct(gap)} |")
        grid = list(summary["density"][0]["grid_val"]) if summary["density"] else []
        parts += ["", "Validation accuracy over the λ2 grid:", "",
                  "| density | auto | " + " | ".join(f"λ2={g}" for g in grid) + " |",
                  "|" + "---|" * (len(grid) + 2)]
        for r in summary["density"]:
            parts.append(f"| {r['density']:g} | {_pct(r['auto']['val'])} | "
                         + " | ".join(_pct(r["grid_val"][g]) for g in grid) + " |")
        parts.append("")
    if "tasks" in summary:
        by = summary["tasks"]["by_size"]
        methods = list(by[0]["methods"]) if by else []
        parts += ["## Number of merged tasks", "",
                  "Mean test accuracy over the merged tasks, averaged over the task subsets of "
                  "each size (listed in summary.json); normalized = merged ÷ expert per task. "
                  "Each method at its defaults.", "",
                  "| T | subsets | " + " | ".join(methods) + " | "
                  + " | ".join(f"{m} (normalized)" for m in methods) + " |",
                  "|" + "---|" * (2 + 2 * len(methods))]
        for e in by:
            parts.append(f"| {e['T']} | {len(e['subsets'])} | "
                         + " | ".join(_pct(e["methods"][m]["accuracy"]) for m in methods) + " | "
                         + " | ".join(_pct(e["methods"][m]["normalized"]) for m in methods)
                         + " |")
        parts.append("")
    secs = meta.get("seconds", {})
    if not secs:  # --report-only: the time went into the runs that made the records
        return "\n".join(parts) + "\n"
    parts += ["## Where the time went", "", "| phase | seconds |", "|---|---|"]
    parts += [f"| {k} | {v:.0f} |" for k, v in secs.items()]
    return "\n".join(parts) + "\n"


def plots(summary: Mapping[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: pip install 'neuromerge[bench]'
        return []
    made = []
    if any(r[sp]["values"] for r in summary.get("subspaces", []) for sp in ("val", "test")):
        rows = summary["subspaces"]
        l2s = list(dict.fromkeys(r["lambda2"] for r in rows))
        l1s = list(dict.fromkeys(r["lambda1"] for r in rows))
        have = [sp for sp in ("val", "test") if any(r[sp]["values"] for r in rows)]
        fig, axes = plt.subplots(1, len(have), figsize=(2.2 * len(l2s) + 3, 0.9 * len(l1s) + 2),
                                 squeeze=False)
        for ax, sp in zip(axes[0], have, strict=True):
            grid = [[100 * next(r for r in rows if r["lambda1"] == a and r["lambda2"] == c)[sp][
                "mean"] for c in l2s] for a in l1s]
            lambda_heatmap(fig, ax, grid, [_lam(x) for x in l1s], [_lam(x) for x in l2s],
                           f"mean {sp} accuracy (%)")
        fig.tight_layout()
        fig.savefig(out / "subspaces.png", dpi=110)
        plt.close(fig)
        made.append("subspaces.png")
    rows = [r for r in summary.get("density", []) if r["auto"]["val"]["values"]]
    if rows:  # a run cut short plots the densities it has
        ds = [r["density"] for r in rows]
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for name, get, style in (("λ2 auto, test", lambda r: r["auto"]["test"], "o-"),
                                 ("λ2 tuned on val, test", lambda r: r["tuned"]["test"], "s-"),
                                 ("λ2 auto, val", lambda r: r["auto"]["val"], "o:"),
                                 ("λ2 tuned, val", lambda r: r["tuned"]["val"], "s:")):
            ax.errorbar(ds, [100 * get(r)["mean"] for r in rows],
                        yerr=[100 * get(r)["std"] for r in rows], fmt=style, capsize=3,
                        label=name)
        ax.set_xscale("log")
        ax.set_xlabel("density (kept share of each task vector)")
        ax.set_ylabel("mean accuracy (%)")
        ax.set_title("NeuroMerging: accuracy against density")
        ax.legend(fontsize=8)
        ax2.plot(ds, [statistics.fmean(r["auto"].get("lambda2_auto") or [math.nan])
                      for r in rows], "o-", label="λ2 auto")
        for i, r in enumerate(rows):
            ax2.scatter([r["density"]] * len(r["tuned"]["lambda2"]), r["tuned"]["lambda2"],
                        marker="s", color="C1", label="λ2 tuned (per seed)" if i == 0 else None)
        ax2.set_xscale("log")
        ax2.set_xlabel("density")
        ax2.set_ylabel("λ2")
        ax2.set_title("λ2 = auto against the validation-tuned λ2")
        ax2.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "density.png", dpi=110)
        plt.close(fig)
        made.append("density.png")
    if any(m["accuracy"]["values"] for e in summary.get("tasks", {}).get("by_size", [])
           for m in e["methods"].values()):
        by = summary["tasks"]["by_size"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, what in zip(axes, ("accuracy", "normalized"), strict=True):
            for m in by[0]["methods"]:
                pts = [(e["T"], e["methods"][m][what]) for e in by
                       if e["methods"][m][what]["values"]]
                ax.errorbar([t for t, _ in pts], [100 * v["mean"] for _, v in pts],
                            yerr=[100 * v["std"] for _, v in pts], fmt="o-", capsize=3, label=m)
            ax.set_xlabel("number of merged tasks T")
            ax.set_ylabel("mean test accuracy (%)" if what == "accuracy"
                          else "merged ÷ expert (%)")
            ax.set_title("absolute" if what == "accuracy" else "normalized by each expert")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "tasks.png", dpi=110)
        plt.close(fig)
        made.append("tasks.png")
    return made


def write_report(abl: Ablations, seeds: Sequence[int], meta: Mapping[str, Any]
                 ) -> dict[str, Any]:
    out = abl.bench.out
    summary = summarize(abl, seeds)
    md = markdown(summary, abl.bench.profile.tasks, meta)
    (out / "report.md").write_text(md)
    (out / "summary.json").write_text(json.dumps(
        {"meta": meta, "plan": asdict(abl.plan), "summary": summary}, indent=2,
        default=str) + "\n")
    made = plots(summary, out)
    return {"summary": summary, "markdown": md, "meta": meta, "plots": made}


def run_ablations(profile: Any, out_dir: str | Path, *, plan: Plan | None = None,
                  seeds: Sequence[int] | None = None, progress: bool = True,
                  compute: bool = True, **bench_kwargs: Any) -> dict[str, Any]:
    """Run (or resume) the ablations on ``profile``'s experts and write the report into
    ``out_dir`` (results.jsonl, summary.json, report.md, PNG plots). ``compute=False`` writes
    the report from the records already there (a run cut short: missing cells show "–").
    ``bench_kwargs`` as ``runner.open_bench`` (cache_dir, base_dir, datasets, make_splits)."""
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
    return write_report(abl, p.seeds, meta)


def ablation_names(text: str | None) -> tuple[str, ...]:
    """``--only`` parsed: comma-separated ablation names (all when empty)."""
    if not text:
        return ABLATIONS
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in ABLATIONS]
    if bad or not names:
        raise ConfigError(f"--only: unknown ablation {bad[0] if bad else text!r} "
                          f"(known: {', '.join(ABLATIONS)})")
    return names


__all__ = ["ABLATIONS", "PLANS", "Ablations", "Plan", "Setting", "ablation_names", "nm_setting",
           "run_ablations", "task_subsets"]

