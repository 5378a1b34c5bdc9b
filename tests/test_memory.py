"""The engine streams: merging models larger than the memory the merge may use.

A subprocess merges a base and three experts of 192 MB each (768 MB of inputs) with
NeuroMerging (global trim: two statistics passes, then the SVD-frame merge) and must stay within
a peak-RSS budget of a few tensors × (T + 1) above its start-up footprint, far below the inputs'
total. Holding even two of the models in memory would break the bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

ROWS, COLS, N_TENSORS, N_EXPERTS = 1024, 2048, 24, 3
TENSOR_MB = ROWS * COLS * 4 / 2**20  # 8 MiB

CHILD = r"""
import json, sys
import torch
import neuromerge
torch.set_num_threads(2)
def status_mb(key):
    # VmHWM (peak RSS) belongs to this address space; ru_maxrss would carry the forking
    # parent's peak across exec.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
# warm up the code paths (allocator, eigh, bincount) on a tiny merge before measuring
base = {"w": torch.randn(8, 8), "b": torch.randn(8)}
neuromerge.merge_state_dicts(base, [{k: v + 1 for k, v in base.items()}] * 2, "neuromerging")
start = status_mb("VmHWM")
result = neuromerge.merge(sys.argv[1], sys.argv[2], progress=False)
peak = status_mb("VmHWM")
print(json.dumps({"start": start, "peak": peak,
                  "lambda2": result.params["lambda2"]}))
"""


def write_model(folder: Path, seed: int, base: dict[str, torch.Tensor] | None) -> None:
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(N_TENSORS):
        name = f"layers.{i}.weight"
        if base is None:
            tensors[name] = torch.randn(ROWS, COLS, generator=gen)
        else:
            tensors[name] = base[name] + 0.01 * torch.randn(ROWS, COLS, generator=gen)
        tensors[f"layers.{i}.bias"] = torch.randn(ROWS, generator=gen)
    save_file(tensors, str(folder / "model.safetensors"))
    if base is None:
        base_cache.update(tensors)


base_cache: dict[str, torch.Tensor] = {}


def test_peak_memory_is_bounded_by_tensors_not_models(tmp_path: Path) -> None:
    base_cache.clear()
    write_model(tmp_path / "base", 0, None)
    for i in range(N_EXPERTS):
        write_model(tmp_path / f"e{i}", i + 1, base_cache)
    base_cache.clear()
    model_mb = (tmp_path / "base" / "model.safetensors").stat().st_size / 2**20
    cfg = {"merge_method": "neuromerging", "base_model": str(tmp_path / "base"),
           "models": [{"model": str(tmp_path / f"e{i}")} for i in range(N_EXPERTS)]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "m.yaml"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["start"]
    inputs_mb = model_mb * (N_EXPERTS + 1)
    budget = 6 * TENSOR_MB * (N_EXPERTS + 1)  # a few tensors of one name per model
    print(f"inputs {inputs_mb:.0f} MiB, RSS grew {grew:.0f} MiB (budget {budget:.0f} MiB)")
    assert inputs_mb > 700
    assert grew < budget, (grew, budget, m)
    assert grew < model_mb  # less than ONE model, let alone four
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 2 * N_TENSORS
        assert f.get_slice("layers.0.weight").get_shape() == [ROWS, COLS]
