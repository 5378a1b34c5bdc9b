"""Benchmark report: per-task and average accuracy (absolute and normalised by the expert), mean
± std over seeds, as markdown, CSV and JSON, plus PNG plots."""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def _ms(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: Sequence[float], pct: bool = True) -> str:
    if not values:
        return "–"
    mean, std = _ms(values)
    k = 100 if pct else 1
    return f"{k * mean:.1f} ± {k * std:.1f}" if len(values) > 1 else f"{k * mean:.1f}"


def summarize(records: Iterable[Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Rows keyed by (mode, name): per-task accuracies per seed, their average, and the average
    of merged/expert ratios per seed."""
    recs = list(records)
    expert: dict[tuple[int, str], float] = {}
    rows: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(
        lambda: defaultdict(dict))
    for r in recs:
        if r["kind"] == "expert":
            expert[(r["seed"], r["task"])] = r["accuracy"]
            rows[("reference", "expert (upper bound)")][r["task"]][r["seed"]] = r["accuracy"]
        elif r["kind"] == "probe":
            rows[("reference", "linear probe on base (lower bound)")][r["task"]][r["seed"]] = \
                r["accuracy"]
        elif r["kind"] == "merge":
            for t, acc in r["accuracy"].items():
                rows[(r["mode"], r["method"])][t][r["seed"]] = acc
    out: dict[str, Any] = {}
    for (mode, name), per_task in rows.items():
        seeds = sorted(set.intersection(*(set(per_task[t]) for t in tasks))) \
            if all(t in per_task for t in tasks) else []
        avg = [statistics.fmean(per_task[t][s] for t in tasks) for s in seeds]
        norm = [statistics.fmean(per_task[t][s] / expert[(s, t)] for t in tasks
                                 if expert.get((s, t))) for s in seeds
                if all(expert.get((s, t)) for t in tasks)]
        out[f"{mode}/{name}"] = {
            "mode": mode, "name": name, "seeds": seeds,
            "tasks": {t: [per_task[t][s] for s in sorted(per_task[t])] for t in per_task},
            "average": avg, "normalized": norm,
        }
    for r in recs:
        if r["kind"] == "merge":
            out[f"{r['mode']}/{r['method']}"].setdefault("params", {})[r["seed"]] = r["params"]
    return out


def _seed_list(seeds: Sequence[int]) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def markdown_table(summary: Mapping[str, Any], tasks: Sequence[str], mode: str,
                   seeds: Sequence[int] | None = None) -> str:
    """One row per method of ``mode`` (best average first) under the references; with
    ``seeds`` (the profile's), a row measured on fewer seeds says which."""
    head = ["method", *tasks, "avg", "normalized avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [v for v in summary.values() if v["mode"] == "reference"] + sorted(
        (v for v in summary.values() if v["mode"] == mode),
        key=lambda v: -(statistics.fmean(v["average"]) if v["average"] else 0))
    for v in rows:
        name = v["name"]
        if seeds is not None and v["seeds"] and list(v["seeds"]) != list(seeds):
            name += f" ({_seed_list(v['seeds'])} only)"
        cells = [name] + [_fmt(v["tasks"].get(t, [])) for t in tasks] + [
            _fmt(v["average"]), _fmt(v["normalized"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(summary: Mapping[str, Any], mode: str, reference: str = "neuromerging"
                       ) -> dict[str, list[float]]:
    """``reference``'s average accuracy minus each other method's, seed by seed (same experts,
    same splits), so a gap can be set against its own seed-to-seed spread."""
    ref = summary.get(f"{mode}/{reference}")
    if not ref:
        return {}
    ref_avg = dict(zip(ref["seeds"], ref["average"], strict=True))
    out = {}
    for v in summary.values():
        if v["mode"] != mode or v["name"] == reference:
            continue
        other = dict(zip(v["seeds"], v["average"], strict=True))
        seeds = sorted(set(ref_avg) & set(other))
        if seeds:
            out[v["name"]] = [ref_avg[s] - other[s] for s in seeds]
    return out


def paired_table(summary: Mapping[str, Any], mode: str, reference: str = "neuromerging") -> str:
    diffs = paired_differences(summary, mode, reference)
    lines = [f"| {reference} minus | per seed (points) | mean ± std | seeds ahead |",
             "|---|---|---|---|"]
    for name, d in sorted(diffs.items(), key=lambda kv: -statistics.fmean(kv[1])):
        per = ", ".join(f"{100 * x:+.1f}" for x in d)
        lines.append(f"| {name} | {per} | {_fmt(d)} | "
                     f"{sum(x > 0 for x in d)} of {len(d)} |")
    return "\n".join(lines)


def _common_seeds(summary: Mapping[str, Any], mode: str) -> list[int]:
    """The seeds every method of ``mode`` was measured on."""
    sets = [set(v["seeds"]) for v in summary.values() if v["mode"] == mode]
    return sorted(set.intersection(*sets)) if sets else []


def write_report(records: Iterable[Mapping[str, Any]], meta: Mapping[str, Any], out: Path
                 ) -> dict[str, Any]:
    recs = list(records)
    tasks = list(meta["profile"]["tasks"])
    summary = summarize(recs, tasks)
    modes = [m for m in ("default", "tuned") if any(v["mode"] == m for v in summary.values())]
    # every seed on record (a run resumed with --seeds S adds to the earlier ones)
    seeds = sorted({int(r["seed"]) for r in recs if "seed" in r} | set(meta["profile"]["seeds"]))
    parts = [f"# neuromerge bench: profile `{meta['profile']['name']}`", "",
             f"Accuracy (%) on each task's test split, mean ± std over seeds "
             f"{seeds}; a merged body is scored with each task's own "
             f"expert head. normalized = merged ÷ expert, averaged over tasks.", ""]
    titles = {"default": "Without validation (each method's defaults)",
              "tuned": "With validation (main hyper-parameters chosen on the validation splits)"}
    for mode in modes:
        parts += [f"## {titles[mode]}", "", markdown_table(summary, tasks, mode, seeds), ""]
        if paired_differences(summary, mode):
            parts += ["NeuroMerging's average accuracy minus each method's, paired by seed:", "",
                      paired_table(summary, mode), ""]
        common = _common_seeds(summary, mode)
        if common and common != seeds:  # some methods are not on every seed yet: compare fairly
            only = summarize([r for r in recs if r.get("seed") in common], tasks)
            parts += [f"### {titles[mode]}: every method on {_seed_list(common)}", "",
                      markdown_table(only, tasks, mode), ""]
    secs = meta.get("seconds", {})
    parts += ["## Where the time went", "", "| phase | seconds |", "|---|---|"]
    parts += [f"| {k} | {v:.0f} |" for k, v in secs.items()]
    table_md = "\n".join(parts) + "\n"
    (out / "report.md").write_text(table_md)
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "method", "seed", "task", "accuracy"])
        for r in recs:
            if r["kind"] in ("expert", "probe"):
                w.writerow(["reference", r["kind"], r["seed"], r["task"], r["accuracy"]])
            elif r["kind"] == "merge":
                for t, acc in r["accuracy"].items():
                    w.writerow([r["mode"], r["method"], r["seed"], t, acc])
    (out / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=2,
                                                 default=str) + "\n")
    _plots(summary, recs, tasks, modes, out)
    return {"summary": summary, "markdown": table_md, "meta": meta}


def lambda_heatmap(fig: Any, ax: Any, grid: Sequence[Sequence[float]], l1_labels: Sequence[str],
                   l2_labels: Sequence[str], title: str) -> None:
    """Accuracy (%) over a λ1 (rows) × λ2 (columns) grid, each cell annotated."""
    im = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(l2_labels)), list(l2_labels))
    ax.set_yticks(range(len(l1_labels)), list(l1_labels))
    ax.set_xlabel("λ2 (orthogonal subspace)")
    ax.set_ylabel("λ1 (parallel subspace)")
    for i, row in enumerate(grid):
        for j, val in enumerate(row):
            ax.text(j, i, f"{val:.1f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)


def _plots(summary: Mapping[str, Any], recs: Sequence[Mapping[str, Any]], tasks: Sequence[str],
           modes: Sequence[str], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: pip install 'neuromerge[bench]'
        return
    for mode in modes:
        rows = [v for v in summary.values() if v["mode"] in ("reference", mode)]
        fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(tasks)) + 3, 4.5))
        width = 0.8 / max(1, len(rows))
        for i, v in enumerate(rows):
            means = [100 * statistics.fmean(v["tasks"][t]) if v["tasks"].get(t) else 0
                     for t in tasks]
            stds = [100 * _ms(v["tasks"][t])[1] if v["tasks"].get(t) else 0 for t in tasks]
            xs = [j + i * width for j in range(len(tasks))]
            ax.bar(xs, means, width, yerr=stds if len(v["average"]) > 1 else None,
                   label=v["name"], capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=20)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Per-task accuracy, {mode} hyper-parameters")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(out / f"accuracy_{mode}.png", dpi=120)
        plt.close(fig)
    sweeps = [r for r in recs if r["kind"] == "sweep" and r["method"] == "neuromerging"]
    if sweeps:
        # the λ1 × λ2 grid at the density with the best mean validation accuracy
        by_density: dict[Any, list[Mapping[str, Any]]] = defaultdict(list)
        for r in sweeps:
            by_density[r["fixed"].get("density")].append(r)
        score = {d: max(statistics.fmean(r["accuracy"].values()) for r in rs)
                 for d, rs in by_density.items()}
        best = max(score, key=lambda d: score[d])
        cells: dict[tuple[float, float], list[float]] = defaultdict(list)
        for r in by_density[best]:
            cells[(r["linear"]["lambda1"], r["linear"]["lambda2"])].append(
                statistics.fmean(r["accuracy"].values()))
        l1s = sorted({k[0] for k in cells})
        l2s = sorted({k[1] for k in cells})
        grid = [[100 * statistics.fmean(cells[(a, b)]) if (a, b) in cells else float("nan")
                 for b in l2s] for a in l1s]
        fig, ax = plt.subplots(figsize=(1.1 * len(l2s) + 2, 0.8 * len(l1s) + 1.5))
        lambda_heatmap(fig, ax, grid, [str(a) for a in l1s], [str(b) for b in l2s],
                       f"NeuroMerging mean validation accuracy (%), density {best}")
        fig.tight_layout()
        fig.savefig(out / "neuromerging_lambda_heatmap.png", dpi=120)
        plt.close(fig)
