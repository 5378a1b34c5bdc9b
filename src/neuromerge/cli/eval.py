"""``neuromerge eval``: score a (merged) causal LM with lm-evaluation-harness
(``neuromerge.harness_eval``)."""

from __future__ import annotations

import argparse

from neuromerge.cli.common import at_least
from neuromerge.errors import ConfigError

DESCRIPTION = (
    "Evaluate an HF causal-LM folder (a merged model, or any other) on "
    "lm-evaluation-harness tasks through its Python API (model type hf): the "
    "standard tasks (gsm8k, humaneval, cmmlu, mmlu, ...; datasets come from the "
    "HF hub) or task YAMLs of your own in --include-path. Needs the eval extra: "
    "pip install 'neuromerge[eval]'.")

EPILOG = (
    "example:\n  neuromerge eval ./merged --tasks gsm8k,cmmlu --device cuda "
    "--batch-size auto --out scores.json\n  neuromerge eval ./merged --tasks "
    "my_task --include-path ./tasks --limit 100\n(humaneval runs model-written "
    "code: lm_eval asks for HF_ALLOW_CODE_EVAL=1 and --confirm_run_unsafe_code, "
    "which this command does not pass; use lm_eval itself for it)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ev = subparsers.add_parser(
        "eval", help="score a (merged) causal LM with lm-evaluation-harness",
        description=DESCRIPTION, epilog=EPILOG,
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
    return ev


def run(args: argparse.Namespace) -> int:
    from neuromerge.harness_eval import evaluate, parse_limit, results_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    batch: int | str = args.batch_size
    if batch != "auto":
        try:
            batch = int(batch)
        except ValueError:
            raise ConfigError(f"--batch-size: expected a number or auto, got {batch!r}") from None
        at_least("--batch-size", batch, 1)
    at_least("--num-fewshot", args.num_fewshot, 0)
    results = evaluate(args.model, tasks, include_path=args.include_path,
                       limit=parse_limit(args.limit), num_fewshot=args.num_fewshot,
                       batch_size=batch, device=args.device, dtype=args.dtype, out=args.out,
                       force=args.force)
    print(results_table(results))
    if args.out and not args.quiet:
        print(f"results in {args.out}")
    return 0
