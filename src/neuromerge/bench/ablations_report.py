"""The report of ``neuromerge bench --ablations``: ``report.md`` (one table per ablation, mean ±
std over seeds), ``summary.json`` (the plan and every number) and PNG plots (matplotlib,
optional). The numbers come from ``ablations.summarize``; nothing here reads records or merges.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from neuromerge.bench.ablation_plans import AUTO, lambda_label
from neuromerge.bench.benchmark_report import lambda_heatmap


def mean_std(xs: Sequence[float]) -> dict[str, Any]:
    """Mean and standard deviation over seeds (NaN and 0 when empty or one), with the values."""
    return {"mean": statistics.fmean(xs) if xs else math.nan,
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": list(xs)}


def percent_cell(ms: Mapping[str, Any], n_seeds: int = 1) -> str:
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
        return percent_cell(ms, len(seeds))

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
                cells += [_pct(mean_std(r["test_tasks"].get(t, []))) for t in tasks]
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
                  "| λ1 \\ λ2 | " + " | ".join(lambda_label(x) for x in l2s) + " |",
                  "|" + "---|" * (len(l2s) + 1)]
        for l1 in l1s:
            cells = [f"{lambda_label(l1)}"]
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
            gap = mean_std([x - y for x, y in zip(t["test"]["values"][:n],
                                                  a["test"]["values"][:n], strict=True)])
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
            lambda_heatmap(fig, ax, grid, [lambda_label(x) for x in l1s],
                           [lambda_label(x) for x in l2s], f"mean {sp} accuracy (%)")
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


def write_report(summary: Mapping[str, Any], plan: Mapping[str, Any], tasks: Sequence[str],
                 meta: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """Write report.md, summary.json (``plan``: the ``Plan`` as a dict) and the plots into
    ``out``; returns the summary, the markdown, ``meta`` and the plots' names."""
    md = markdown(summary, tasks, meta)
    (out / "report.md").write_text(md)
    (out / "summary.json").write_text(json.dumps(
        {"meta": meta, "plan": plan, "summary": summary}, indent=2,
        default=str) + "\n")
    made = plots(summary, out)
    return {"summary": summary, "markdown": md, "meta": meta, "plots": made}


__all__ = ["markdown", "mean_std", "percent_cell", "plots", "write_report"]
