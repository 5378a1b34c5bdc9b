"""`--device cuda` against the CPU on a Llama-shaped checkpoint set: same results, and how long.

Generates perf.py's synthetic checkpoints (a base and N bf16 experts), merges them with each
method on the CPU and on the GPU through ``neuromerge.merge`` (the CLI's code path), compares the
two outputs tensor by tensor and prints one JSON line per method plus a summary table.

    python benchmarks/device_check.py --size 100m --experts 3 --work /tmp/nm-device

Run it on a machine with a GPU (the result goes into docs/performance.md with the machine named).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import PRESETS, ensure_models

from neuromerge import merge
from neuromerge.errors import ConfigError

METHODS = {
    "task_arithmetic": {"scale": 0.3},
    "ties-tensor": {"density": 0.2, "trim_scope": "tensor"},
    "ties-global": {"density": 0.2, "trim_scope": "global"},
    "dare_ties": {"drop_rate": 0.5, "seed": 0},
    "neuromerging": {"density": 0.2},
    "dare_neuromerging": {"seed": 0},
    "consensus_ties": {},
    "breadcrumbs": {},
    "pcb": {},
    "tsv_m": {},
    "iso_cts": {},
}


def outputs(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[k] = fh.get_tensor(k)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="100m", choices=sorted(PRESETS))
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--work", default="/tmp/nm-device")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--memory-limit", default=None,
                    help="also run the GPU merges under this limit (row blocks)")
    args = ap.parse_args()
    work = Path(args.work)
    size = PRESETS[args.size]
    base, experts = ensure_models(work, size, 0, args.experts, 1_000_000_000)
    info = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "size": size.name, "params": size.params, "experts": args.experts}
    print(json.dumps(info), flush=True)
    rows = []
    for name in args.methods.split(","):
        params = dict(METHODS[name])
        method = name.split("-")[0]  # ties-tensor -> ties
        cfg = {"merge_method": method, "base_model": str(base),
               "models": [{"model": str(e)} for e in experts], "parameters": params}
        times, folders = {}, {}
        for device in ("cpu", "cuda"):
            out = work / f"out-{name}-{device}"
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            merge(cfg, out, force=True, device=device, progress=False)
            times[device] = time.perf_counter() - t0
            folders[device] = out
        a, b = outputs(folders["cpu"]), outputs(folders["cuda"])
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        differ = sum(int((a[k] != b[k]).sum()) for k in a) / sum(v.numel() for v in a.values())
        row = {"method": name, "cpu_s": round(times["cpu"], 2), "cuda_s": round(times["cuda"], 2),
               "speedup": round(times["cpu"] / times["cuda"], 2), "max_abs_diff": diff,
               "share_differing": differ}
        if args.memory_limit:
            t0 = time.perf_counter()
            try:
                r = merge(cfg, work / f"out-{name}-cuda-limited", force=True, device="cuda",
                          progress=False, memory_limit=args.memory_limit)
            except ConfigError as exc:  # a whole-tensor method refuses to split a tensor
                row["cuda_limited"] = f"refused: {exc}"
            else:
                row["cuda_limited_s"] = round(time.perf_counter() - t0, 2)
                row["row_blocks"] = len(r.extra["row_blocks"])
                c = outputs(work / f"out-{name}-cuda-limited")
                row["limited_max_abs_diff"] = max(
                    float((b[k].float() - c[k].float()).abs().max()) for k in b)
                shutil.rmtree(work / f"out-{name}-cuda-limited")
        for f in folders.values():
            shutil.rmtree(f)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| method | CPU s | CUDA s | speed-up | max abs diff (bf16 out) | entries differing |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['cpu_s']} | {r['cuda_s']} | {r['speedup']}x | "
              f"{r['max_abs_diff']:.3g} | {100 * r['share_differing']:.4f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
