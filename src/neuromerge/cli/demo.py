"""``neuromerge demo``: generated example checkpoints merged with every method
(``neuromerge.demo``)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = subparsers.add_parser(
        "demo", help="merge generated example checkpoints with every method and report",
        description="Generate a tiny random BERT and three experts fine-tuned from it by known "
                    "updates, merge them with every method through the same engine as "
                    "`neuromerge merge`, load each result with transformers, and print a "
                    "summary. Needs no download.")
    d.add_argument("out_dir", nargs="?", default="neuromerge-demo",
                   help="working folder (default: ./neuromerge-demo; replaced if it exists)")
    d.add_argument("--quiet", "-q", action="store_true", help="only the summary")
    return d


def run(args: argparse.Namespace) -> int:
    from neuromerge.demo import run_demo

    return run_demo(args.out_dir, quiet=args.quiet)
