"""``neuromerge merge``: the models a YAML config names, merged into an HF model folder."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from neuromerge.cli.common import add_device_option, key_value, log
from neuromerge.cli.mergekit_options import add_options as add_mergekit_options
from neuromerge.cli.mergekit_options import apply_options as apply_mergekit_options
from neuromerge.errors import ConfigError, OutputError

EPILOG = """\
example:
  neuromerge merge merge.yaml ./merged
  neuromerge merge merge.yaml ./merged -p density=0.1 -p lambda2=1.5 --force
  neuromerge merge merge.yaml ./merged --memory-limit 8GB --device cuda
  neuromerge merge merge.yaml --dry-run --memory-limit 8GB --plan-json plan.json
  neuromerge merge mergekit.yaml ./merged --cuda --out-shard-size 5B --lazy-unpickle

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


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    m = subparsers.add_parser(
        "merge", help="merge the models a YAML config names into an HF model folder",
        description="Merge fine-tuned checkpoints of one base model into one model folder "
                    "(safetensors, config and tokenizer copied from the base, and a model card).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("config", help="merge configuration (YAML)")
    m.add_argument("out_dir", nargs="?", default=None,
                   help="output folder (must not exist unless --force)")
    m.add_argument("-p", "--param", dest="params", action="append", default=[],
                   type=key_value, metavar="KEY=VALUE",
                   help="override a method parameter, e.g. -p density=0.1 (repeatable; "
                        "VALUE is read as YAML)")
    add_device_option(m)
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
                   help="print the plan and write nothing: each tensor's kind and neuron axis "
                        "(read from the base's config.json and the config), the parameters "
                        "(-p applied), the units of work (row blocks under --memory-limit) and "
                        "the passes that run before the merge; every input is checked")
    m.add_argument("--plan-json", default=None, metavar="FILE",
                   help="with --dry-run: also write the whole plan as JSON to FILE ('-': "
                        "standard output, instead of the table): every output tensor's "
                        "sources, kind, neuron axis, parameters and units")
    m.add_argument("--save-lora", type=int, default=None, metavar="RANK",
                   help="also write the merged delta as a PEFT LoRA adapter of rank RANK to "
                        "OUT_DIR/lora (truncated SVD of each 2-D weight's delta; the relative "
                        "error of each is printed and kept in neuromerge_result.json)")
    m.add_argument("--no-read-ahead", dest="read_ahead", action="store_false",
                   help="do not read the next tensor while merging this one (less memory, "
                        "slower)")
    add_mergekit_options(m)
    return m


def run(args: argparse.Namespace) -> int:
    from neuromerge.config import load_config
    from neuromerge.pipeline import merge, plan_merge

    apply_mergekit_options(args)
    cfg = load_config(args.config)
    if args.plan_json is not None and not args.dry_run:
        raise ConfigError("merge: --plan-json goes with --dry-run (the plan of a merge that "
                          "runs is in OUT_DIR/neuromerge_result.json)")
    overrides = dict(args.params)
    if args.seed is not None:
        if "seed" in cfg.method.param_names:
            overrides["seed"] = args.seed
        else:
            log.info("--seed ignored: %s is deterministic", cfg.merge_method)
    if args.dry_run:
        plan = plan_merge(cfg, overrides=overrides, device=args.device,
                          memory_limit=args.memory_limit)
        if args.plan_json is not None:
            _write_json(plan.to_dict(), args.plan_json)
        if args.plan_json != "-":
            print(plan.table())
        return 0
    if args.out_dir is None:
        raise ConfigError("merge: the output folder is missing (neuromerge merge CONFIG "
                          "OUT_DIR; --dry-run needs none)")
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


def _write_json(data: dict[str, Any], target: str) -> None:
    text = json.dumps(data, indent=1) + "\n"
    if target == "-":
        sys.stdout.write(text)
        return
    try:
        Path(target).write_text(text)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write the plan ({exc.strerror or exc})") from None


def _lora_line(rec: dict[str, Any], out: Any) -> str:
    errs = rec["relative_errors"]
    text = (f"LoRA adapter of rank {rec['rank']} in {out}/{rec['path']}: {len(errs)} tensors, "
            f"relative error of the merged delta max {rec['max_relative_error']:.4g}")
    if rec["not_encoded"]:
        text += (f"; {len(rec['not_encoded'])} changed non-2-D tensors are not in it "
                 f"(see neuromerge_result.json)")
    return text
