"""The report folder of ``neuromerge analyze``: ``report.md`` (tables, definitions, plots),
``analysis.json`` (every number of the summary), ``tensors.csv`` (one row per tensor and task),
``groups.csv`` (one row per task and model / module type / layer / layer × module) and the PNG
plots of ``plots`` (matplotlib, optional: without it the report says so and the numbers are all
there)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from neuromerge.analysis.plots import PLOTS, write_plots
from neuromerge.analysis.result import Analysis

DEFINITIONS = """\
- **Task vector** τt = θt − θ0 of task t, per tensor (float32; the statistics in float64).
  *Trimmed*: each task keeps its largest-magnitude entries over the whole model (global trim at
  density {d}, as `neuromerge merge` with NeuroMerging's and TIES' defaults).
- **Parallel / orthogonal energy** of task t in a neuronal tensor (≥ 2-D; each row k is a neuron
  w0ᵏ): parallel Σk (c_tᵏ)² ‖w0ᵏ‖², orthogonal Σk ‖τ⊥_tᵏ‖², with c_tᵏ = ⟨τtᵏ, w0ᵏ⟩ / ‖w0ᵏ‖²
  and τ⊥ = τtᵏ − c_tᵏ w0ᵏ (a row with ‖w0ᵏ‖ = 0 has c = 0: all orthogonal). They add up to
  ‖τt‖²; the shares are each over their sum. Point tensors (biases, norms: 1-D, 0-D) have no
  neurons: their energy share is n/a, and *point tensors* gives their part of ‖τt‖².
- **c**: how much fine-tuning rescaled each neuron (τ∥ = c · w0: the row became (1 + c) w0 plus
  its orthogonal turn). Quantiles over all neurons, from a histogram with 100 log bins per decade
  (±1.2 %; exact where a bin holds a single value: 0, a constant c).
- **Element-wise sign conflict rate**: among the entries where at least two tasks are non-zero,
  the share whose non-zero values do not all have the same sign (TIES' interference). *Lost
  energy*: the share of Σt τt² on entries against the elected sign(Σt τt), which TIES' disjoint
  mean drops. Pairwise: among entries where both tasks are non-zero, the share of opposite signs.
- **SVD-frame sign conflict rate**: per neuron, the T tasks' orthogonal rows M = U S Vᵀ with
  coordinates A = U S, the frame in which NeuroMerging merges them (null directions dropped);
  among the (neuron, direction) pairs where at least two tasks have non-zero coordinates, the
  share with coordinates of both signs. Columns of U are orthogonal, so in a dense frame every
  direction but the leading one has both signs by construction: the *lost energy* (share of Σ A²
  against the elected sign) says what the conflicts weigh.
- **Cosine similarity** of the flattened task vectors, over all merged tensors (or a layer's),
  point tensors included.
- **σt** = ‖τt − trim(τt)‖₁ / ‖τt‖₁, the share of task t's L1 mass the global trim removes at a
  density; **λ2 = auto** = 1 / (1 − max_t σt), the scale NeuroMerging uses without validation
  data.
- Rates and shares of a group (a layer, a module type, the model) are pooled: total conflicting ÷
  total contested, total energy ÷ total energy; not means of per-tensor ratios.
"""

def write_report(analysis: Analysis, folder: Path, *, plots: bool = True) -> list[str]:
    """Write the report files into ``folder``; returns their names."""
    s = analysis.summary
    (folder / "analysis.json").write_text(json.dumps(_finite(s), indent=1, allow_nan=False)
                                          + "\n")
    _write_tensors_csv(analysis, folder / "tensors.csv")
    _write_groups_csv(s, folder / "groups.csv")
    made = write_plots(analysis, folder) if plots else None
    (folder / "report.md").write_text(markdown(s, made))
    return sorted(p.name for p in folder.iterdir())


def _finite(x: Any) -> Any:
    """NaN / Inf (never expected: inputs are checked finite) become null: valid JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


# --- formatting --------------------------------------------------------------------------------


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f} %"


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(r) + " |" for r in rows)]


def mean_offdiag(m: Sequence[Sequence[float | None]]) -> float | None:
    vals = [m[a][b] for a in range(len(m)) for b in range(len(m)) if a != b
            and m[a][b] is not None]
    return statistics.fmean(vals) if vals else None  # type: ignore[arg-type]


def markdown(s: Mapping[str, Any], plots: Sequence[str] | None) -> str:
    tasks = list(s["tasks"])
    d0 = s["conflict_density"]
    ov = s["overall"]
    counts = s["tensor_counts"]
    plural = "" if len(tasks) == 1 else "s"
    lines = ["# neuromerge analyze", "",
             f"Base `{s['inputs']['base']}`; {len(tasks)} expert{plural}: " +
             ", ".join(f"**{t}** (`{src}`)" for t, src in zip(tasks, s["inputs"]["experts"],
                                                              strict=True)) + ".", "",
             f"{counts['neuronal']} neuronal tensors ({ov['neurons']:,} neurons), "
             f"{counts['point']} point tensors, {counts['copy']} copied (not merged); "
             f"{ov['entries']:,} merged entries. *Trimmed* statistics use the global trim at "
             f"density {d0}. neuromerge {s['neuromerge_version']}.", ""]

    lines += ["## At a glance", ""]
    orth = ov["energy"]["orthogonal_share"]
    lines.append("- Orthogonal share of each task's neuronal energy: " + ", ".join(
        f"{t} {_pct(o)}" for t, o in zip(tasks, orth, strict=True)) + ".")
    c = ov["conflicts"]
    lines.append(f"- Sign conflicts: {_pct(c['elementwise']['rate'])} of contested entries "
                 f"({_pct(c['elementwise_trimmed']['rate'])} after the trim); in the SVD frame "
                 f"after the trim {_pct(c['svd_trimmed']['rate'])} of contested directions, "
                 f"holding {_pct(c['svd_trimmed']['lost_energy'])} of the orthogonal energy "
                 f"on the losing side.")
    cos = mean_offdiag(ov["cosine"])
    if cos is not None:
        lines.append(f"- Mean cosine similarity between task vectors: {_num(cos, 3)}.")
    auto = {r["density"]: r["lambda2_auto"] for r in s["trim"]}
    lines.append("- λ2 = auto: " + ", ".join(f"{_num(v, 4)} at density {d}"
                                             for d, v in auto.items()) + ".")
    worst = _worst_cells(s)
    if worst:
        lines.append("- Most conflicted (layer, module) cells after the trim (element-wise): " +
                     ", ".join(f"{lay} {m} {_pct(r)}" for lay, m, r in worst) + ".")
    lines.append("")

    lines += ["## Definitions", "", DEFINITIONS.format(d=d0)]

    q = s["c_quantiles"]["overall"] or {}
    qkeys = ["p1", "p5", "p25", "p50", "p75", "p95", "p99"]
    rows = []
    for i, t in enumerate(tasks):
        e = ov["energy"]
        cq = q.get(t) or {}
        rows.append([t, _num(math.sqrt(e["total"][i]), 4), _pct(e["parallel_share"][i]),
                     _pct(e["orthogonal_share"][i]), _pct(e["orthogonal_share_trimmed"][i]),
                     _pct(e["point_share"][i], 2)] + [_num(cq.get(k)) for k in qkeys] +
                    [_pct(cq.get("zero_share"))])
    lines += ["## Tasks: energy in the two subspaces, and c", "",
              *_table(["task", "‖τ‖₂", "parallel", "orthogonal", f"orthogonal (trimmed {d0})",
                       "point tensors", *[f"c {k[1:]} %" for k in qkeys], "c = 0"], rows), ""]

    rows = [[str(r["density"])] + [_pct(x, 2) for x in r["sigma"]] +
            [_pct(r["max_sigma"], 2), _num(r["lambda2_auto"], 5)] for r in s["trim"]]
    lines += ["## Trim: σ and λ2 = auto", "",
              *_table(["density", *[f"σ {t}" for t in tasks], "max σ", "λ2 = auto"], rows), ""]

    frames = [("element-wise", "elementwise"), (f"element-wise, trimmed {d0}",
                                                 "elementwise_trimmed"),
              ("SVD frame", "svd"), (f"SVD frame, trimmed {d0}", "svd_trimmed")]
    rows = [[label, _pct(c[k]["rate"]), _pct(c[k]["lost_energy"]), f"{c[k]['contested']:,}"]
            for label, k in frames]
    lines += ["## Interference", "",
              *_table(["frame", "conflict rate", "lost energy", "contested"], rows), ""]
    if len(tasks) > 1:
        for title, key in (("Pairwise sign conflict rate (element-wise)", "pairwise"),
                           (f"Pairwise sign conflict rate (element-wise, trimmed {d0})",
                            "pairwise_trimmed")):
            m = c[key]
            lines += [f"### {title}", "", *_table(
                ["", *tasks], [[t] + [_pct(m[i][j]) if i != j else "·"
                                      for j in range(len(tasks))]
                               for i, t in enumerate(tasks)]), ""]
        lines += ["### Cosine similarity of the task vectors", "", *_table(
            ["", *tasks], [[t] + [_num(ov["cosine"][i][j], 3) for j in range(len(tasks))]
                           for i, t in enumerate(tasks)]), ""]

    for title, key, label in (("By module type", "by_module", "module"),
                              ("By layer", "by_layer", "layer")):
        rows = [[name, str(g["tensors"]), f"{g['entries']:,}"] +
                [_pct(x) for x in g["energy"]["orthogonal_share"]] +
                [_pct(g["conflicts"]["elementwise"]["rate"]),
                 _pct(g["conflicts"]["elementwise_trimmed"]["rate"]),
                 _pct(g["conflicts"]["svd_trimmed"]["rate"]),
                 _pct(g["conflicts"]["svd_trimmed"]["lost_energy"]),
                 _num(mean_offdiag(g["cosine"]), 3)]
                for name, g in s[key].items()]
        lines += [f"## {title}", "",
                  "Orthogonal share per task; conflict rates; mean cosine between tasks.", "",
                  *_table([label, "tensors", "entries", *[f"orth. {t}" for t in tasks],
                           "conflicts", f"conflicts (trim {d0})", f"SVD conflicts (trim {d0})",
                           "SVD lost energy", "mean cos"], rows), ""]

    lines += ["## Plots", ""]
    if plots is None:
        lines += ["Plots were not asked for (`--no-plots`).", ""]
    elif not plots:
        lines += ["No plots: matplotlib is not installed (`pip install 'neuromerge[bench]'`); "
                  "every number is in `analysis.json`, `groups.csv` and `tensors.csv`.", ""]
    for name in plots or []:
        lines += [f"### {PLOTS[name]}", "", f"![{PLOTS[name]}]({name})", ""]
    lines += ["## Files", "",
              "- `analysis.json`: every number above, per task, module type, layer and "
              "layer × module type (c quantiles per module type too), and the trim at each "
              "density.",
              "- `groups.csv`: one row per task and group (model, module, layer, layer × "
              "module).",
              "- `tensors.csv`: one row per merged tensor and task.", ""]
    return "\n".join(lines)


def _worst_cells(s: Mapping[str, Any], n: int = 3) -> list[tuple[str, str, float]]:
    cells = [(lay, m, g["conflicts"]["elementwise_trimmed"]["rate"])
             for lay, row in s["by_layer_module"].items() for m, g in row.items()
             if g["conflicts"]["elementwise_trimmed"]["rate"] is not None
             and g["conflicts"]["elementwise_trimmed"]["contested"] > 0]
    return sorted(cells, key=lambda c: -c[2])[:n] if len(cells) > 1 else []


# --- CSV ---------------------------------------------------------------------------------------

_TASK_COLUMNS = ["energy", "l1", "parallel_share", "orthogonal_share", "parallel_share_trimmed",
                 "orthogonal_share_trimmed", "c_mean", "c_rms", "c_zero_share",
                 "mean_cosine_with_others"]
_GROUP_COLUMNS = ["conflict_rate", "conflict_lost_energy", "conflict_rate_trimmed",
                  "conflict_lost_energy_trimmed", "svd_conflict_rate", "svd_lost_energy",
                  "svd_conflict_rate_trimmed", "svd_lost_energy_trimmed"]


def _task_values(g: Mapping[str, Any], t: int) -> list[Any]:
    e, c = g["energy"], g["c"]
    others = [x for j, x in enumerate(g["cosine"][t]) if j != t and x is not None]
    return [e["total"][t], g["l1"][t], e["parallel_share"][t], e["orthogonal_share"][t],
            e["parallel_share_trimmed"][t], e["orthogonal_share_trimmed"][t], c["mean"][t],
            c["rms"][t], c["zero_share"][t], statistics.fmean(others) if others else None]


def _group_values(g: Mapping[str, Any]) -> list[Any]:
    c = g["conflicts"]
    return [c[k][v] for k in ("elementwise", "elementwise_trimmed", "svd", "svd_trimmed")
            for v in ("rate", "lost_energy")]


def _cell(x: Any) -> Any:
    return "" if x is None else x


def _write_tensors_csv(analysis: Analysis, path: Path) -> None:
    tasks = analysis.tasks
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tensor", "layer", "module", "kind", "shape", "entries", "neurons", "task",
                    *_TASK_COLUMNS, *_GROUP_COLUMNS])
        for row in analysis.tensors:
            shape = "x".join(str(d) for d in row["shape"])
            group = [_cell(x) for x in _group_values(row)]
            for t, task in enumerate(tasks):
                w.writerow([row["name"], row["layer"], row["module"], row["kind"], shape,
                            row["entries"], row["neurons"], task,
                            *[_cell(x) for x in _task_values(row, t)], *group])


def _write_groups_csv(s: Mapping[str, Any], path: Path) -> None:
    tasks = s["tasks"]
    groups: list[tuple[str, str, str, Mapping[str, Any]]] = [("model", "", "", s["overall"])]
    groups += [("module", "", m, g) for m, g in s["by_module"].items()]
    groups += [("layer", lay, "", g) for lay, g in s["by_layer"].items()]
    groups += [("layer_module", lay, m, g) for lay, row in s["by_layer_module"].items()
               for m, g in row.items()]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["level", "layer", "module", "tensors", "entries", "neurons", "task",
                    *_TASK_COLUMNS, *_GROUP_COLUMNS])
        for level, lay, m, g in groups:
            group = [_cell(x) for x in _group_values(g)]
            for t, task in enumerate(tasks):
                w.writerow([level, lay, m, g["tensors"], g["entries"], g["neurons"], task,
                            *[_cell(x) for x in _task_values(g, t)], *group])
