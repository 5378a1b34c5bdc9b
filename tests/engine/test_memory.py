"""The engine streams: merging models larger than the memory the merge may use.

A subprocess merges a base and three experts of 256 MiB each (1 GiB of inputs) with
NeuroMerging (global trim: statistics passes, then the SVD-frame merge) and must stay within a
peak-RSS budget of a few tensors × (T + 1), plus the trim selects' fixed-size histograms, above
its start-up footprint: less than one model, far below the inputs' total."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from neuromerge.thresholds import MAX_BAND, select_bytes

ROWS, COLS, N_TENSORS, N_EXPERTS = 1024, 2048, 32, 3
TENSOR_MB = ROWS * COLS * 4 / 2**20  # 8 MiB

# Shared head of the child scripts: VmHWM (peak RSS) belongs to this address space; ru_maxrss
# would carry the forking parent's peak across exec.
STATUS_MB = r"""
import json, sys
import torch
torch.set_num_threads(2)
def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
"""

CHILD = STATUS_MB + r"""
import neuromerge
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
    # a few tensors of one name per model, and the histograms of one trim select per task
    budget = 6 * TENSOR_MB * (N_EXPERTS + 1) + select_bytes(N_EXPERTS, MAX_BAND) / 2**20
    print(f"inputs {inputs_mb:.0f} MiB, RSS grew {grew:.0f} MiB (budget {budget:.0f} MiB)")
    assert inputs_mb > 1000
    assert grew < budget, (grew, budget, m)
    assert grew < model_mb  # less than ONE model, let alone four
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 2 * N_TENSORS
        assert f.get_slice("layers.0.weight").get_shape() == [ROWS, COLS]


LIMIT_CHILD = STATUS_MB + r"""
from neuromerge.cli import main
rc = main(["merge", sys.argv[1], sys.argv[2], "--memory-limit", sys.argv[3], "-q"])
print(json.dumps({"rc": rc, "peak": status_mb("VmHWM")}))
"""

EMB_ROWS = 16384  # a 128 MiB float32 embedding, larger than the budget the limit leaves


def test_memory_limit_holds_below_the_models_total_size(tmp_path: Path) -> None:
    """`--memory-limit 400MB` on 4 × 160 MiB of inputs, one tensor alone 128 MiB per model (×4
    inputs): the peak RSS of the whole process stays under the limit, and the result is the
    merge without a limit."""
    gen = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(EMB_ROWS, COLS, generator=gen)}
    for i in range(4):
        base[f"layers.{i}.weight"] = torch.randn(ROWS, COLS, generator=gen)
        base[f"layers.{i}.bias"] = torch.randn(ROWS, generator=gen)
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    for e in range(N_EXPERTS):
        (tmp_path / f"e{e}").mkdir()
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()},
                  str(tmp_path / f"e{e}" / "model.safetensors"))
    del base
    inputs_mb = sum((tmp_path / d / "model.safetensors").stat().st_size
                    for d in ("base", "e0", "e1", "e2")) / 2**20
    cfg = {"merge_method": "neuromerging", "base_model": str(tmp_path / "base"),
           "models": [{"model": str(tmp_path / f"e{i}")} for i in range(N_EXPERTS)],
           "parameters": {"lambda1": 0.5}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-c", LIMIT_CHILD, str(tmp_path / "m.yaml"),
                           str(tmp_path / "out"), "400MB"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"inputs {inputs_mb:.0f} MiB, peak RSS {m['peak']:.0f} MiB under --memory-limit 400MB")
    assert m["rc"] == 0
    assert inputs_mb > 600
    assert m["peak"] * 2**20 <= 400e6, m

    from neuromerge import merge

    result = merge(tmp_path / "m.yaml", tmp_path / "whole", progress=False)
    assert result.extra["row_blocks"] == {}
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as lim, \
            safe_open(str(tmp_path / "whole" / "model.safetensors"), "pt") as whole:
        for name in whole.keys():  # noqa: SIM118 (safe_open is not a mapping)
            torch.testing.assert_close(lim.get_tensor(name), whole.get_tensor(name),
                                       rtol=1e-6, atol=1e-7)
    record = json.loads((tmp_path / "out" / "neuromerge_result.json").read_text())
    assert record["row_blocks"]["model.embed_tokens.weight"] > 1
