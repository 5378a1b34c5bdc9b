"""The PNG plots of the ``neuromerge analyze`` report (matplotlib, optional: without it none is
drawn and the report says so): heat maps (layer × module type) of each task's orthogonal share
and of the sign conflicts, the cosine similarities, the distribution of c and σ per density."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from neuromerge.analysis.result import Analysis

#: The plots, in the order the report shows them.
PLOTS = {
    "heatmap_orthogonal_share.png": "Orthogonal energy share per task (layer × module type)",
    "heatmap_conflicts.png": "Sign conflicts (layer × module type): rate and lost energy",
    "cosine.png": "Cosine similarity of the task vectors, overall and per layer",
    "c_histogram.png": "Distribution of c (neuron rescaling) per task",
    "sigma.png": "σ per task and λ2 = auto against the trim density",
}


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


def write_plots(analysis: Analysis, out: Path) -> list[str]:
    """Draw the plots of ``PLOTS`` that the analysis has data for into ``out``; returns their
    names (none without matplotlib)."""
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
