"""``neuromerge statistics``: a model's data statistics for fisher or regmean merging."""

from __future__ import annotations

import argparse

from neuromerge.cli.common import add_device_option, at_least

DESCRIPTION = (
    "Compute the per-model data statistics that fisher and regmean merges read "
    "(models[i].statistics in a config), for an HF sequence-classification or "
    "causal-LM folder on a JSON-lines file of its task's examples. fisher: the "
    "diagonal Fisher, mean over examples of squared per-example gradients of "
    "log p(y|x); regmean: each linear layer's input Gram matrix XᵀX / n. Tensor "
    "names are the checkpoint's.")

EPILOG = (
    "data: one JSON object per line, {\"text\": \"...\", \"label\": 2} (label: "
    "the class index, needed only by --fisher-type empirical)\nexample:\n"
    "  neuromerge statistics fisher ./expert-a --data a.jsonl --out a.fisher."
    "safetensors")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    st = subparsers.add_parser(
        "statistics", help="compute a model's data statistics for fisher or regmean merging",
        description=DESCRIPTION, epilog=EPILOG,
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
    add_device_option(st)
    st.add_argument("--force", action="store_true", help="replace an existing output file")
    st.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    return st


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neuromerge.errors import OutputError
    from neuromerge.statistics import compute_for_folder

    out = Path(args.out)
    if out.exists() and not args.force:
        raise OutputError(f"{out} exists (use --force to replace it)")
    for flag, value in (("--max-examples", args.max_examples), ("--batch-size", args.batch_size),
                        ("--max-length", args.max_length)):
        at_least(flag, value, 1)
    stats = compute_for_folder(
        args.kind, args.model, args.data, out, text_field=args.text_field,
        label_field=args.label_field, max_examples=args.max_examples,
        batch_size=args.batch_size, max_length=args.max_length, fisher_type=args.fisher_type,
        seed=args.seed, device=args.device, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {args.kind} statistics of {len(stats.tensors)} tensors from "
              f"{stats.n_examples} examples to {out}")
    return 0
