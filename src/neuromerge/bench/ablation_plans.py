"""What ``neuromerge bench --ablations`` tests: the ablations, their grids (``Plan``, ``PLANS``)
and the NeuroMerging settings each one scores (``Setting``), the task subsets of the ``tasks``
ablation, and ``--only`` parsed. Running them: ``ablations``; their report: ``ablations_report``.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from neuromerge.bench.results import record_key
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
        return record_key("ablation", ctx, "neuromerging", dict(self.fixed), self.linear, split)


def nm_setting(label: str, lambda1: float = 0.0, lambda2: Lambda = AUTO,
               lambda_point: Lambda | None = None, **fixed: Any) -> Setting:
    """A Setting with every non-linear parameter at NeuroMerging's default unless given."""
    unknown = set(fixed) - set(NONLINEAR)
    if unknown:
        raise ConfigError(f"not a non-linear NeuroMerging parameter: {sorted(unknown)}")
    defaults = get_method("neuromerging").validate({})
    full = {k: fixed.get(k, defaults[k]) for k in NONLINEAR}
    return Setting(label, tuple(full.items()), lambda1, lambda2, lambda_point)


def lambda_label(x: Lambda) -> str:
    """A λ as labels and tables print it: "auto" or the number (``:g``)."""
    return x if isinstance(x, str) else f"{x:g}"


def subspace_settings(plan: Plan) -> list[Setting]:
    out = []
    for l1, l2 in itertools.product(plan.lambda1, plan.lambda2):
        kind = ("neither (points only)" if l1 == 0 and l2 == 0 else "parallel only" if l2 == 0
                else "orthogonal only" if l1 == 0 else "both")
        label = f"{kind}: λ1={lambda_label(l1)}, λ2={lambda_label(l2)}"
        out.append(nm_setting(label, l1, l2, AUTO))
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


__all__ = ["ABLATIONS", "AUTO", "NONLINEAR", "PLANS", "Lambda", "Plan", "Setting", "ablation_names",
           "density_settings", "frame_settings", "lambda_label", "nm_setting",
           "subspace_settings", "task_subsets", "trim_compat_settings"]
