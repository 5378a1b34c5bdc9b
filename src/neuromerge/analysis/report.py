"""The report folder of ``neuromerge analyze``: ``report.md`` (tables, definitions, plots),
``analysis.json`` (every number of the summary), ``tensors.csv`` (one row per tensor and task),
``groups.csv`` (one row per task and model / module type / layer / layer × module) and PNG plots
(matplotlib, optional: without it the report says so and the numbers are all there)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from neuromerge.analysis.runner import Analysis

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

#: The plots, in the order the report shows them.
PLOTS = {
    "heatmap_orthogonal_share.png": "Orthogonal energy share per task (layer × module type)",
    "heatmap_conflicts.png": "Sign conflicts (layer × module type): rate and lost energy",
    "cosine.png": "Cosine similarity of the task vectors, overall and per layer",
    "c_histogram.png": "Distribution of c (neuron rescaling) per task",
    "sigma.png": "σ per task and λ2 = auto against the trim density",
}


def write_report(analysis: Analysis, folder: Path, *, plots: bool = True) -> list[str]:
    """Write the report files into ``folder``; returns their names."""
    s = analysis.summary
    (folder / "analysis.json").write_text(json.dumps(_finite(s), indent=1, allow_nan=False)
                                          + "\n")
    _write_tensors_csv(analysis, folder / "tensors.csv")
    _write_groups_csv(s, folder / "groups.csv")
    made = _plots(analysis, folder) if plots else None
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


# --- plots -------------------------------------------------------------------------------------


def _grid(s: Mapping[str, Any], value: Any) -> np.ndarray:
    """layers × modules of ``value(group)`` (NaN where a cell is empty or undefined)."""
    out = np.full((len(s["layers"]), len(s["modules"])), np.nan)
    for i, lay in enumerate(s["layers"]):
        for j, m in enumerate(s["modules"]):
            g = s["by_layer_module"].get(lay, {}).get(m)
            v = value(g) if g is not None else None
            out[i, j] = np.nan if v is None else v
    return out


def _heatmap(ax: Any, grid: np.ndarray, s: Mapping[str, Any], title: str, cmap: str) -> Any:
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(s["modules"])), s["modules"], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(s["layers"])), s["layers"], fontsize=7)
    ax.set_title(title, fontsize=9)
    if grid.size <= 300:
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                        color="w" if v < 0.55 else "k")
    return im


def _plots(analysis: Analysis, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: pip install 'neuromerge[bench]'
        return []
    s = analysis.summary
    tasks = analysis.tasks
    n_layers, n_mods = len(s["layers"]), len(s["modules"])
    cell_w, cell_h = max(3.5, 0.45 * n_mods + 2.2), max(2.5, 0.28 * n_layers + 1.8)
    made = []

    if n_layers and n_mods:
        cols = min(4, len(tasks))
        rows = math.ceil(len(tasks) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cell_w * cols + 2, cell_h * rows + 0.6),
                                 squeeze=False, layout="constrained")
        im = None
        for t, task in enumerate(tasks):
            ax = axes[t // cols][t % cols]
            im = _heatmap(ax, _grid(s, lambda g, t=t: g["energy"]["orthogonal_share"][t]), s,
                          task, "viridis")
        for k in range(len(tasks), rows * cols):
            axes[k // cols][k % cols].axis("off")
        fig.suptitle("Orthogonal share of each task's energy (%; blank: no neuronal tensor)",
                     fontsize=10)
        fig.colorbar(im, ax=axes, shrink=0.8)
        fig.savefig(out / "heatmap_orthogonal_share.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        made.append("heatmap_orthogonal_share.png")

        d0 = s["conflict_density"]
        frames = [("element-wise", "elementwise"), (f"element-wise, trim {d0}",
                                                     "elementwise_trimmed"),
                  (f"SVD frame, trim {d0}", "svd_trimmed")]
        fig, axes = plt.subplots(2, 3, figsize=(cell_w * 3 + 2, cell_h * 2 + 0.6),
                                 squeeze=False, layout="constrained")
        for j, (label, key) in enumerate(frames):
            for i, (what, title) in enumerate((("rate", "conflict rate"),
                                               ("lost_energy", "lost energy"))):
                im = _heatmap(axes[i][j], _grid(s, lambda g, k=key, w=what:
                                                g["conflicts"][k][w]), s,
                              f"{title}: {label}", "magma")
        fig.suptitle("Sign conflicts between tasks (%)", fontsize=10)
        fig.colorbar(im, ax=axes, shrink=0.8)
        fig.savefig(out / "heatmap_conflicts.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        made.append("heatmap_conflicts.png")

    if len(tasks) > 1:
        pairs = [(a, b) for a in range(len(tasks)) for b in range(a + 1, len(tasks))]
        fig, axes = plt.subplots(1, 2, figsize=(4 + 0.5 * len(tasks) + 6, 4.5),
                                 gridspec_kw={"width_ratios": [1, 1.6]})
        cos = np.array([[np.nan if v is None else v for v in row]
                        for row in s["overall"]["cosine"]])
        im = axes[0].imshow(cos, cmap="coolwarm", vmin=-1, vmax=1)
        axes[0].set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=7)
        axes[0].set_yticks(range(len(tasks)), tasks, fontsize=7)
        for (i, j), v in np.ndenumerate(cos):
            if not np.isnan(v):
                axes[0].text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        axes[0].set_title("overall", fontsize=9)
        fig.colorbar(im, ax=axes[0], shrink=0.8)
        layers = s["layers"]
        for a, b in pairs[:28]:
            ys = [s["by_layer"][lay]["cosine"][a][b] for lay in layers]
            axes[1].plot(range(len(layers)), [np.nan if y is None else y for y in ys],
                         marker="o", ms=3, label=f"{tasks[a]} · {tasks[b]}")
        axes[1].set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
        axes[1].axhline(0, color="grey", lw=0.5)
        axes[1].set_ylabel("cosine similarity")
        axes[1].set_title("per layer", fontsize=9)
        axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(out / "cosine.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        made.append("cosine.png")

    counts = analysis.hist.histogram()
    if counts is not None:
        h = analysis.hist
        per = h.PER_DECADE // 10  # 10 bins per decade on the plot
        side = h.N_SIDE // per
        fig, ax = plt.subplots(figsize=(9, 4.5))
        q = s["c_quantiles"]["overall"] or {}
        for t, task in enumerate(tasks):
            neg = counts[t][:h.N_SIDE][::-1].reshape(side, per).sum(1)  # ascending |c|
            pos = counts[t][h.N_SIDE + 1:].reshape(side, per).sum(1)
            n = counts[t].sum()
            edges = 10.0 ** (h.LOG_MIN + np.arange(side + 1) / 10)
            mids = np.sqrt(edges[:-1] * edges[1:])
            xs = np.concatenate([-mids[::-1], mids])
            ys = np.concatenate([neg[::-1], pos]) / max(1, n)
            zero = q.get(task, {}).get("zero_share") or 0.0
            ax.plot(xs, ys, label=f"{task} (c = 0: {100 * zero:.1f} %)", lw=1.2)
        nz = np.nonzero(counts.sum(0))[0]
        mags = np.abs(h.bin_values()[nz])
        mags = mags[mags > 0]
        if mags.size:
            top = 10.0 ** math.ceil(math.log10(float(mags.max())))
            ax.set_xscale("symlog", linthresh=max(float(mags.min()), top * 1e-6))
            ax.set_xlim(-top, top)
        ax.set_xlabel("c = ⟨τ, w0⟩ / ‖w0‖² (symmetric log scale)")
        ax.set_ylabel("share of neurons per bin (10 per decade)")
        ax.set_title("How much each task rescales each neuron")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "c_histogram.png", dpi=110)
        plt.close(fig)
        made.append("c_histogram.png")

    trims = s["trim"]
    if trims:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ds = [r["density"] for r in trims]
        for t, task in enumerate(tasks):
            ax.plot(ds, [r["sigma"][t] for r in trims], marker="o", label=f"σ {task}")
        ax.set_xlabel("density (share of entries kept)")
        ax.set_ylabel("σ (share of L1 mass removed)")
        ax.set_ylim(0, 1)
        ax2 = ax.twinx()
        ax2.plot(ds, [r["lambda2_auto"] for r in trims], "k--", marker="s", label="λ2 = auto")
        ax2.set_ylabel("λ2 = 1 / (1 − max σ)")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7)
        ax.set_title("Global trim: σ per task and the λ2 it implies")
        fig.tight_layout()
        fig.savefig(out / "sigma.png", dpi=110)
        plt.close(fig)
        made.append("sigma.png")
    return made
