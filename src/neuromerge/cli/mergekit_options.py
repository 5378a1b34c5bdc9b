"""``mergekit-yaml``'s options on ``neuromerge merge``, so a mergekit command line runs as it is:
each is either applied (``--cuda``, ``--out-shard-size``, ``--random-seed``, ``--num-threads``,
``--transformers-cache``) or accepted with a one-line note saying what neuromerge does instead."""

from __future__ import annotations

import argparse
import os
import re

from neuromerge.cli.common import log
from neuromerge.errors import ConfigError

#: Flags that change nothing here, and why (shown once as a note when given).
NOTES = {
    "lazy_unpickle": "neuromerge always streams checkpoints tensor by tensor",
    "allow_crimes": "neuromerge checks tensor names and shapes, not architecture names",
    "low_cpu_memory": "peak memory is bounded by the tensors in flight (see --memory-limit)",
    "clone_tensors": "every output tensor is written from its own buffer",
    "async_write": "output shards are written as the merge streams",
    "multi_gpu": "one device per merge (--device)",
    "trust_remote_code": "neuromerge reads weights and config.json only, and runs no model code",
    "verbose": "log lines are on unless --quiet",
}
#: On/off flags whose off form is not offered, and why.
ALWAYS_ON = {
    "copy_tokenizer": "the base's tokenizer files are always written (a ready-to-load folder); "
                      "tokenizer_source chooses another",
    "write_model_card": "the model card (README.md) and neuromerge_result.json are always "
                        "written",
    "safe_serialization": "output is always safetensors",
}


def add_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "mergekit-yaml's options", "accepted so that a mergekit command line runs unchanged")
    g.add_argument("--cuda", action="store_true", help="= --device cuda")
    g.add_argument("--gpu-rich", "--read-to-gpu", dest="gpu_rich", action="store_true",
                   help="= --device cuda (tensors are read to the device as merged)")
    g.add_argument("--out-shard-size", default=None, metavar="N[K|M|B]",
                   help="mergekit's largest output shard in bytes, e.g. 5B (5·10⁹), 500M; "
                        "= --max-shard-size")
    g.add_argument("--random-seed", type=int, default=None, metavar="N", help="= --seed N")
    g.add_argument("--num-threads", type=int, default=None, metavar="N",
                   help="torch threads for the merge")
    g.add_argument("--transformers-cache", default=None, metavar="DIR",
                   help="where hub models are cached (= HF_HUB_CACHE=DIR)")
    g.add_argument("--write-threads", type=int, default=None, metavar="N",
                   help="accepted; shards are written as the merge streams")
    for name in NOTES:
        g.add_argument("--" + name.replace("_", "-"), action="store_true",
                       help=f"accepted; {NOTES[name]}")
    g.add_argument("-v", dest="verbose", action="count", default=0, help=argparse.SUPPRESS)
    for name, why in ALWAYS_ON.items():
        g.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                       default=None, help=f"accepted; {why}")


def apply_options(args: argparse.Namespace) -> None:
    """Fold mergekit's options into neuromerge's (``args.device``, ``args.max_shard_size``,
    ``args.seed``), set what they set, and note the ones that change nothing."""
    if args.cuda or args.gpu_rich:
        if args.device not in ("cpu", "cuda"):
            raise ConfigError(f"merge: --cuda and --device {args.device} disagree")
        args.device = "cuda"
    if args.out_shard_size is not None:
        if args.max_shard_size is not None:
            raise ConfigError("merge: give --out-shard-size or --max-shard-size, not both")
        args.max_shard_size = parse_kmb(args.out_shard_size)
    if args.random_seed is not None:
        if args.seed is not None and args.seed != args.random_seed:
            raise ConfigError("merge: --seed and --random-seed disagree")
        args.seed = args.random_seed
    if args.num_threads is not None:
        if args.num_threads < 1:
            raise ConfigError(f"--num-threads must be at least 1 (got {args.num_threads})")
        import torch

        torch.set_num_threads(args.num_threads)
    if args.transformers_cache is not None:
        os.environ["HF_HUB_CACHE"] = os.path.expanduser(args.transformers_cache)
    for name, note in NOTES.items():
        if getattr(args, name):
            log.info("--%s: %s", name.replace("_", "-"), note)
    if args.write_threads is not None:
        log.info("--write-threads: shards are written as the merge streams")
    for name, why in ALWAYS_ON.items():
        if getattr(args, name) is False:
            log.warning("--no-%s: %s", name.replace("_", "-"), why)


def parse_kmb(text: str) -> int:
    """mergekit's sizes: a count with an optional K / M / B (10³, 10⁶, 10⁹) suffix."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMbB]?)\s*", text)
    if not m:
        raise ConfigError(f"--out-shard-size: cannot read {text!r} (mergekit's sizes: 5B, "
                          f"500M, 1000K or a byte count)")
    return int(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[m.group(2).lower()]
