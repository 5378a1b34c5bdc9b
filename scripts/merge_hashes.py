"""Hashes of merged outputs, to show that a refactor leaves them byte-identical.

Builds (or reuses) the synthetic checkpoints of ``benchmarks/perf.py`` (default: the "100m"
preset, ~117M parameters, Llama-shaped bf16, a base and 3 experts, seed 0, 1 GB input shards;
cached under perf.py's ``~/.cache/neuromerge/perf``), merges them with the Python API
``neuromerge.merge(config, out, force=True, progress=False)`` for each method, one at a time, and
prints one line per method:

- ``tensors``: sha256 over every output tensor, sorted by name, of name, dtype, shape and raw
  bytes (read with safetensors), so shard layout and header metadata do not matter; the JSON
  (``--out``) also holds each tensor's own sha256;
- ``files``: the sha256 of each ``*.safetensors`` file as written (layout and metadata included).

The configs are perf.py's ``config_yaml`` (``dtype: float32``, the base's bf16 kept for the output,
``--max-shard-size`` 5 GB as perf.py passes it), plus ``dare_ties`` (drop_rate 0.5, seed 0,
weight 1), which perf.py does not run. DARE derives each model's stream from the seed and the
model's path as written in the config, so its hashes hold for one ``--work`` folder only.

``--src DIR`` puts DIR first on sys.path before neuromerge is imported (to hash another tree's
code with this venv); the script checks that neuromerge was imported from there.

    python scripts/merge_hashes.py --out /tmp/hashes.json
    python scripts/merge_hashes.py --src /tmp/nm-baseline/src --out /tmp/hashes-baseline.json
    python scripts/merge_hashes.py --methods ties-tensor,dare_ties --compare /tmp/hashes.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHUNK = 1 << 24


def load_perf() -> ModuleType:
    """benchmarks/perf.py of this script's repo, as a module (it imports no neuromerge)."""
    path = REPO / "benchmarks" / "perf.py"
    spec = importlib.util.spec_from_file_location("neuromerge_perf_bench", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up here
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # perf.py imports its sibling mergekit_env
    spec.loader.exec_module(mod)
    return mod


def runs(perf: ModuleType) -> dict[str, Any]:
    """Method label -> perf.Run: perf.py's neuromerge runs, plus dare_ties."""
    out = {r.label: r for r in perf.RUNS if r.tool == "neuromerge"}
    out["dare_ties"] = perf.Run("neuromerge", "dare_ties", "dare_ties",
                                (("drop_rate", 0.5), ("seed", 0), ("weight", 1.0)))
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def hash_folder(folder: Path) -> dict[str, Any]:
    """Tensor digests (canonical: sorted by name; name, dtype, shape, raw bytes), file digests."""
    import torch
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if name in where:
                    raise SystemExit(f"tensor {name} is in both {where[name]} and {f}")
                where[name] = f
    total = hashlib.sha256()
    per_tensor: dict[str, str] = {}
    handles: dict[Path, Any] = {}
    try:
        for f in files:
            handles[f] = safe_open(str(f), framework="pt").__enter__()
        for name in sorted(where):
            t = handles[where[name]].get_tensor(name).contiguous()
            head = f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode()
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            one = hashlib.sha256(head)
            one.update(raw)
            per_tensor[name] = one.hexdigest()
            total.update(head)
            total.update(raw)
            del t, raw
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return {"tensors_sha256": total.hexdigest(), "n_tensors": len(per_tensor),
            "files": {f.name: sha256_file(f) for f in files},
            "tensor_sha256": per_tensor}


def parse_args(argv: list[str] | None, perf: ModuleType) -> argparse.Namespace:
    known = runs(perf)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=perf.DEFAULT_WORK,
                    help=f"checkpoint cache, as perf.py's --work (default {perf.DEFAULT_WORK}); "
                         "merges are written under <work>/hashes and deleted after hashing")
    ap.add_argument("--methods", default="all",
                    help=f"comma list of {', '.join(known)} (default all)")
    ap.add_argument("--size", default="100m", help=f"perf.py preset ({', '.join(perf.PRESETS)})")
    ap.add_argument("--experts", type=int, default=3, help="number of experts (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the checkpoints (default 0)")
    ap.add_argument("--shard-size", default="1GB", help="input shard size (perf.py: 1GB)")
    ap.add_argument("--out-shard-size", default="5GB", help="output shard size (perf.py: 5GB)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the same reductions whatever the machine)")
    ap.add_argument("--src", type=Path, default=None,
                    help="import neuromerge from this folder (put first on sys.path)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--compare", type=Path, default=None,
                    help="a JSON written by --out: report per method whether the hashes match "
                         "(exit 1 if any differs)")
    ap.add_argument("--keep", action="store_true", help="keep the merged folders")
    args = ap.parse_args(argv)
    args.work = args.work.expanduser().resolve()
    if args.methods == "all":
        args.method_list = list(known)
    else:
        args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in args.method_list if m not in known]
        if bad:
            ap.error(f"unknown method(s) {', '.join(bad)}; known: {', '.join(known)}")
    if args.size not in perf.PRESETS:
        ap.error(f"unknown size {args.size}; presets: {', '.join(perf.PRESETS)}")
    if args.threads < 1:
        ap.error("--threads must be at least 1")
    return args


def import_neuromerge(src: Path | None) -> ModuleType:
    if src is not None:
        src = src.expanduser().resolve()
        sys.path.insert(0, str(src))
    import neuromerge

    where = Path(neuromerge.__file__).resolve()
    if src is not None and src not in where.parents:
        raise SystemExit(f"--src {src}: neuromerge was imported from {where} instead")
    return neuromerge


def compare(rows: dict[str, dict[str, Any]], path: Path) -> bool:
    other = json.loads(path.read_text())["methods"]
    same = True
    for m, r in rows.items():
        o = other.get(m)
        if o is None:
            print(f"compare {m}: not in {path}")
            continue
        t_ok = r["tensors_sha256"] == o["tensors_sha256"]
        f_ok = r["files"] == o["files"]
        diff = sorted(n for n in set(r["tensor_sha256"]) | set(o["tensor_sha256"])
                      if r["tensor_sha256"].get(n) != o["tensor_sha256"].get(n))
        print(f"compare {m}: tensors {'same' if t_ok else 'DIFFER'}, files "
              f"{'same' if f_ok else 'DIFFER'}"
              + (f" ({len(diff)} tensor(s) differ, e.g. {', '.join(diff[:3])})" if diff else ""))
        same &= t_ok and f_ok
    return same


def main(argv: list[str] | None = None) -> int:
    perf = load_perf()
    args = parse_args(argv, perf)
    nm = import_neuromerge(args.src)
    import torch
    import yaml

    torch.set_num_threads(args.threads)
    size = perf.PRESETS[args.size]
    print(f"neuromerge {getattr(nm, '__version__', '?')} from {Path(nm.__file__).parent}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    t0 = time.perf_counter()
    base, experts = perf.ensure_models(args.work, size, args.seed, args.experts,
                                       perf.parse_bytes(args.shard_size))
    print(f"inputs: {size.name} ({size.params / 1e6:.1f}M params), base + {len(experts)} "
          f"experts under {base.parent} ({time.perf_counter() - t0:.1f} s)", flush=True)
    known = runs(perf)
    out_root = args.work / "hashes"
    rows: dict[str, dict[str, Any]] = {}
    for label in args.method_list:
        run = known[label]
        cfg = yaml.safe_load(perf.config_yaml(run, base, experts))
        out = out_root / label
        t1 = time.perf_counter()
        nm.merge(cfg, out, force=True, progress=False,
                 max_shard_size=perf.parse_bytes(args.out_shard_size))
        merge_s = time.perf_counter() - t1
        row = {"config": cfg, "merge_s": round(merge_s, 2), **hash_folder(out)}
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        rows[label] = row
        files = " ".join(f"{n}={h}" for n, h in row["files"].items())
        print(f"{label}: tensors={row['tensors_sha256']} n={row['n_tensors']} files: {files} "
              f"({merge_s:.1f} s merge, {time.perf_counter() - t1 - merge_s:.1f} s hash)",
              flush=True)
    if not args.keep and out_root.exists() and not any(out_root.iterdir()):
        out_root.rmdir()
    total_s = time.perf_counter() - t0
    print(f"total {total_s:.1f} s", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"neuromerge": str(Path(nm.__file__).parent), "torch": torch.__version__,
               "threads": args.threads, "size": size.name, "size_key": size.key,
               "params": size.params, "experts": len(experts), "seed": args.seed,
               "inputs": [str(base), *map(str, experts)], "argv": sys.argv,
               "cwd": os.getcwd(), "total_s": round(total_s, 1), "methods": rows}
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.out}", flush=True)
    if args.compare is not None and not compare(rows, args.compare):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
