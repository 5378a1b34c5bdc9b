"""The ``neuromerge`` command line.

One module per command (``neuromerge/cli/<command>.py``), each with ``add_parser(subparsers)``
(its options and help) and ``run(args) -> int``; ``common.py`` holds what several share.
``main`` parses, sets up logging, dispatches through ``COMMANDS`` and turns a
``NeuromergeError`` into one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from neuromerge import __version__
from neuromerge.cli import analyze, bench, demo, merge, methods, statistics
from neuromerge.cli import eval as eval_
from neuromerge.cli.common import setup_logging
from neuromerge.errors import NeuromergeError

#: Command name → its module, in the order ``neuromerge --help`` lists them.
COMMANDS: dict[str, ModuleType] = {
    "merge": merge,
    "analyze": analyze,
    "methods": methods,
    "bench": bench,
    "statistics": statistics,
    "eval": eval_,
    "demo": demo,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuromerge",
        description="Training-free model merging: NeuroMerging (neuron-subspace merging) and "
                    "the standard baselines, streamed tensor by tensor.")
    parser.add_argument("--version", action="version", version=f"neuromerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(quiet=getattr(args, "quiet", False))
    try:
        return COMMANDS[args.command].run(args)
    except NeuromergeError as exc:
        print(f"neuromerge: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `neuromerge methods | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("neuromerge: interrupted; nothing was written", file=sys.stderr)
        return 130

