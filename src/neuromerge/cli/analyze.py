"""``neuromerge analyze``: a report on experts' task vectors (subspaces, interference, trim)."""

from __future__ import annotations

import argparse
from typing import Any

from neuromerge.cli.common import add_device_option, floats

EPILOG = """\
example:
  neuromerge analyze ./bert-base ./bert-sentiment ./bert-topic --out report/
  neuromerge analyze base.safetensors a.safetensors b.safetensors --names math,code \\
      --densities 0.05,0.1,0.2 --force

the report folder holds:
  report.md        tables, definitions and the plots, for reading
  analysis.json    every number: per task, module type, layer and layer x module type
  groups.csv       one row per task and group (model, module, layer, layer x module)
  tensors.csv      one row per merged tensor and task
  *.png            heat maps (layer x module type) of each task's orthogonal energy share
                   and of sign conflicts, cosine similarities, c histogram, sigma / lambda2

what it measures (tau = expert - base, per tensor; each row of a >=2-D tensor is a neuron w0):
  parallel / orthogonal energy  sum_k c^2 |w0_k|^2 and sum_k |tau_k - c w0_k|^2, c = <tau_k, w0_k>
                                / |w0_k|^2: how much of the update rescales neurons vs turns them
  c distribution                quantiles of every neuron's c (its rescaling) per task / module
  sign conflicts                element-wise (TIES' interference) and in NeuroMerging's per-neuron
                                SVD frame, raw and after the global trim (--conflict-density)
  cosine similarity             of the task vectors, overall and per layer
  sigma, lambda2 = auto         the L1 share the global trim removes at each of --densities, and
                                the lambda2 = 1 / (1 - max sigma) NeuroMerging then uses
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    a = subparsers.add_parser(
        "analyze", help="analyse experts' task vectors: subspaces, interference, trim",
        description="Stream a base model and its experts (bounded memory, like a merge) and "
                    "write a report folder: per task, layer and module type, the share of each "
                    "task vector's energy parallel and orthogonal to the pretrained neurons, the "
                    "distribution of the rescaling coefficients c, sign conflicts between tasks "
                    "element-wise and in NeuroMerging's per-neuron SVD frame, cosine "
                    "similarities, and the global trim's sigma and lambda2 = auto at several "
                    "densities.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("base", metavar="BASE", help="the pretrained model (HF folder or weights file)")
    a.add_argument("experts", metavar="EXPERT", nargs="+",
                   help="fine-tuned models of the same architecture (HF folders or files)")
    a.add_argument("--out", default="analysis-report", metavar="DIR",
                   help="report folder (default: ./analysis-report; must not exist unless "
                        "--force)")
    a.add_argument("--names", default=None, metavar="N1,N2",
                   help="task names, one per expert (default: the experts' folder names)")
    a.add_argument("--densities", default="0.1,0.2,0.5", metavar="D1,D2",
                   help="global trim densities for sigma and lambda2 = auto (default: "
                        "0.1,0.2,0.5)")
    a.add_argument("--conflict-density", type=float, default=0.2, metavar="D",
                   help="trim density of the 'trimmed' statistics (default: 0.2, "
                        "NeuroMerging's and TIES' default)")
    add_device_option(a)
    a.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="peak memory of the whole run, e.g. 4GB (tensors that do not fit are "
                        "read in row blocks)")
    a.add_argument("--force", action="store_true", help="replace an existing report folder")
    a.add_argument("--no-plots", dest="plots", action="store_false",
                   help="numbers only (no PNG plots)")
    a.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")
    return a


def run(args: argparse.Namespace) -> int:
    from neuromerge.analysis import analyze

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    result = analyze(args.base, args.experts, args.out,
                     densities=floats(args.densities, "--densities"),
                     conflict_density=args.conflict_density, names=names, force=args.force,
                     device=args.device, progress=not args.quiet,
                     memory_limit=args.memory_limit, plots=args.plots)
    if not args.quiet:
        print(analysis_summary(result.summary))
        print(f"report, JSON, CSV and plots in {result.output}/")
    return 0


def analysis_summary(s: dict[str, Any]) -> str:
    """A few lines for the terminal: each task's subspace shares, the conflicts, λ2 = auto."""
    ov = s["overall"]
    e, c = ov["energy"], ov["conflicts"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    width = max(len(t) for t in s["tasks"])
    lines = [f"{'task':<{width}}  parallel  orthogonal  (neuronal energy; trimmed "
             f"{s['conflict_density']}: orthogonal)"]
    for i, t in enumerate(s["tasks"]):
        trimmed = pct(e["orthogonal_share_trimmed"][i])
        lines.append(f"{t:<{width}}  {pct(e['parallel_share'][i]):>8}  "
                     f"{pct(e['orthogonal_share'][i]):>10}  ({trimmed})")
    lines.append(f"sign conflicts: element-wise {pct(c['elementwise']['rate'])} "
                 f"(trimmed {pct(c['elementwise_trimmed']['rate'])}), SVD frame "
                 f"{pct(c['svd']['rate'])} (trimmed {pct(c['svd_trimmed']['rate'])})")
    lines.append("lambda2 = auto: " + ", ".join(
        f"{r['lambda2_auto']:.4g} at density {r['density']}" for r in s["trim"]))
    return "\n".join(lines)
