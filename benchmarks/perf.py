"""Speed and memory of ``neuromerge merge`` against mergekit, same inputs, same machine, same run.

What it does, per grid point (a model size and a number of experts):

1. Generates synthetic Llama-shaped checkpoints (a base and N experts) into the cache folder
   (``--work``, default ``~/.cache/neuromerge/perf``), reused when present: each an HF-style folder
   with sharded bf16 safetensors (``model-0000i-of-0000K.safetensors`` + index) and a
   ``config.json`` that mergekit accepts as ``LlamaForCausalLM``. Base weights are N(0, 0.02²)
   (norms 1); each expert is the base plus a seeded, expert-specific delta made of a dense
   Gaussian (std 1e-3, i.e. 5 % of the weights' std: large enough to survive bf16 rounding, whose
   step at |w| ≈ 0.02 is 1.2e-4), a sparse component (1 % of the entries, std 1e-2) and a
   per-neuron rescaling (5 % of the rows scaled by 1 + c, c ~ N(0, 0.1²)). Norm vectors get a
   dense delta of std 0.02 (about 2.5 bf16 steps at 1.0). Every tensor has its own generator,
   seeded from (seed, model, tensor name), so an expert does not depend on how many are generated.
2. Times ``cat`` of every input shard to /dev/null: once after dropping the page cache (root only;
   skipped with ``--no-drop-caches``, then reported as a warm read) and once warm. The merges then
   run with the inputs in the page cache (the warm cat just read them).
3. Runs each merge in its own subprocess, measuring wall time and the peak resident memory of the
   whole process tree (``/proc/PID/statm`` of the process and its descendants, polled every 20 ms;
   descendants are looked up every 100 ms), plus the kernel's ``ru_maxrss`` from ``wait4`` as a
   cross-check (the largest single process, not the sum). RSS counts the pages of the inputs that
   a process has mapped (safetensors are read through mmap), so "anon" (resident − shared: the
   memory the process allocated itself) is reported beside it. Outputs are deleted after each run.

The merges (same maths on both sides, ``dtype: float32`` compute, bf16 output):

- ``neuromerge task_arithmetic`` (scale 0.3): θ0 + 0.3 Σt τt, τt = θt − θ0.
  mergekit ``task_arithmetic`` with ``weight: 0.3`` per model and ``normalize: false`` (its
  default for this method), ``lambda`` 1: θ0 + Σt 0.3 τt — the same sum.
- ``neuromerge ties`` (density 0.2, scale 1.0) with ``trim_scope: tensor`` and ``global``.
  mergekit ``ties`` with ``density: 0.2`` and ``weight: 1.0`` per model, ``normalize: true`` (its
  default), ``lambda`` 1: per tensor it keeps the top int(0.2·N) |τt| entries (a full argsort),
  elects the sign of Σt τ̂t (ties go to +) and divides the agreeing sum by the count of agreeing
  non-zero entries (the weights being 1) — the TIES disjoint mean. That is our ``trim_scope:
  tensor`` up to rounding of k (ours: ceil) and ties at exactly zero; our ``global`` scope (one
  threshold per expert over the whole model, as in the TIES paper) reads the inputs twice and has
  no mergekit counterpart, so it is compared with mergekit's ties too.
- ``neuromerge neuromerging`` (density 0.2, defaults): no mergekit counterpart; compared with
  mergekit's ties, the closest in work done.

Throughput is the input bytes (the safetensors of the base and the experts) over the wall time;
a method that reads the inputs twice (a global trim) still counts them once. Wall time includes
interpreter start-up and imports (mergekit imports transformers: several seconds).

Results are appended to ``<work>/results.jsonl`` as they come, so an interrupted run resumes
where it stopped (``--fresh`` ignores earlier results). A stored result is reused only for the same
checkpoints, run, repeat, neuromerge commit (mergekit version) and extra arguments; uncommitted
edits of neuromerge are not told apart ("-dirty"), so use ``--fresh`` after changing them.
The report goes between the markers ``<!-- perf:begin -->`` and ``<!-- perf:end -->`` of
``--out`` (default docs/performance.md; with ``--quick``, ``<work>/quick/performance.md`` so a
smoke test does not touch the docs), with the plot and the raw results beside it (.png, .json).

mergekit is installed on first use into its own virtual environment (``--mergekit-venv``, default
``$NEUROMERGE_MERGEKIT_VENV`` or ``~/.cache/neuromerge/mergekit-venv``, shared with the parity
tests): benchmarks/mergekit_env.py, ``pip install torch==2.13.0`` first (the CPU wheel; unpinned,
pip would pull a CUDA build), then ``mergekit==0.1.5``.

    python benchmarks/perf.py                      # both tables, sizes 100m,300m,1b, experts 2,4,8
    python benchmarks/perf.py --quick --check      # tiny models, seconds; agreement check
    python benchmarks/perf.py --sizes 100m --grid experts --neuromerge-args "--memory-limit 2GB"
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mergekit_env import default_venv, ensure_mergekit, mergekit_info

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
GB = 1e9
DEFAULT_WORK = Path("~/.cache/neuromerge/perf").expanduser()

BASE_STD = 0.02
DENSE_STD = 1e-3        # dense part of a delta (5 % of BASE_STD)
SPARSE_FRAC, SPARSE_STD = 0.01, 1e-2
ROW_FRAC, ROW_STD = 0.05, 0.1
NORM_DELTA_STD = 0.02


# ---------------------------------------------------------------------------------------------
# Model shapes


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    @property
    def key(self) -> str:
        return (f"h{self.hidden}-i{self.intermediate}-l{self.layers}-a{self.heads}"
                f"-kv{self.kv_heads}-v{self.vocab}")

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def params(self) -> int:
        return sum(_numel(shape) for _, shape in self.tensors())

    def hf_config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden // self.heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "initializer_range": BASE_STD,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "use_cache": True,
            "torch_dtype": "bfloat16",
        }


PRESETS = {
    "quick": Size("quick", 256, 688, 2, 4, 4, 4000),
    "100m": Size("100m", 1024, 2816, 4, 16, 16),   # ~117M: the issue's reference point
    "300m": Size("300m", 1536, 4096, 8, 12, 12),   # ~325M
    "1b": Size("1b", 2048, 5632, 16, 32, 32),      # ~0.95B
}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------------------------------------
# Checkpoint generation


def _seed(seed: int, *parts: object) -> int:
    return zlib.crc32("/".join(map(str, (seed, *parts))).encode())


def _base_tensor(name: str, shape: tuple[int, ...], seed: int):
    import torch

    if len(shape) == 1:
        return torch.ones(shape)
    g = torch.Generator().manual_seed(_seed(seed, "base", name))
    return torch.randn(shape, generator=g).mul_(BASE_STD)


def _expert_tensor(name: str, shape: tuple[int, ...], seed: int, expert: int):
    import torch

    g = torch.Generator().manual_seed(_seed(seed, "expert", expert, name))
    t = _base_tensor(name, shape, seed)
    if len(shape) == 1:
        return t.add_(torch.randn(shape, generator=g).mul_(NORM_DELTA_STD))
    t.add_(torch.randn(shape, generator=g).mul_(DENSE_STD))
    flat = t.view(-1)
    n = max(1, int(SPARSE_FRAC * flat.numel()))
    idx = torch.randint(flat.numel(), (n,), generator=g)
    flat.index_add_(0, idx, torch.randn(n, generator=g).mul_(SPARSE_STD))
    rows = torch.randperm(shape[0], generator=g)[: max(1, int(ROW_FRAC * shape[0]))]
    t[rows] *= (1 + ROW_STD * torch.randn(len(rows), generator=g)).unsqueeze(1)
    return t


def _shard_plan(size: Size, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    current = 0
    for name, shape in size.tensors():
        nbytes = 2 * _numel(shape)
        if shards[-1] and current + nbytes > shard_bytes:
            shards.append([])
            current = 0
        shards[-1].append((name, shape))
        current += nbytes
    return shards


def write_model(folder: Path, size: Size, seed: int, expert: int | None, shard_bytes: int) -> None:
    """One HF-style folder, written shard by shard (memory: one shard plus one fp32 tensor)."""
    import torch
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plan = _shard_plan(size, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(plan, 1):
        fname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for name, shape in group:
            t = (_base_tensor(name, shape, seed) if expert is None
                 else _expert_tensor(name, shape, seed, expert))
            shard[name] = t.to(torch.bfloat16).contiguous()
            weight_map[name] = fname
            total += 2 * t.numel()
            del t
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        del shard
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(size.hf_config(), indent=2) + "\n")
    (tmp / ".complete").write_text(json.dumps(
        {"size": asdict(size), "seed": seed, "expert": expert, "shard_bytes": shard_bytes}) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def ensure_models(work: Path, size: Size, seed: int, n_experts: int, shard_bytes: int
                  ) -> tuple[Path, list[Path]]:
    root = work / "models" / f"{size.key}-seed{seed}-shard{shard_bytes}"
    folders = [root / "base"] + [root / f"expert{i}" for i in range(n_experts)]
    for i, folder in enumerate(folders):
        if (folder / ".complete").exists():
            continue
        what = "base" if i == 0 else f"expert {i - 1}"
        t0 = time.perf_counter()
        write_model(folder, size, seed, None if i == 0 else i - 1, shard_bytes)
        say(f"  generated {size.name} {what}: {_dir_bytes(folder) / GB:.2f} GB in "
            f"{time.perf_counter() - t0:.1f} s -> {folder}")
    return folders[0], folders[1:]


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in _shards(folder))


# ---------------------------------------------------------------------------------------------
# Measuring a process tree


@dataclass
class Measure:
    rc: int
    wall_s: float
    peak_rss_bytes: int
    peak_anon_bytes: int
    ru_maxrss_bytes: int
    max_procs: int


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [root], [root]
    while todo:
        for c in children.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out


def _tree_rss(pids: list[int]) -> tuple[int, int]:
    rss = anon = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                fields = f.read().split()
        except OSError:
            continue
        resident, shared = int(fields[1]), int(fields[2])
        rss += resident
        anon += resident - shared
    return rss * _PAGE, anon * _PAGE


def measure(cmd: list[str], log: Path, env: dict[str, str] | None = None,
            interval: float = 0.02) -> Measure:
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
        pids, peak, peak_anon, max_procs, i = [proc.pid], 0, 0, 1, 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if i % 5 == 0:
                pids = _descendants(proc.pid)
                max_procs = max(max_procs, len(pids))
            rss, anon = _tree_rss(pids)
            peak, peak_anon = max(peak, rss), max(peak_anon, anon)
            i += 1
            time.sleep(interval)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measure(proc.returncode, wall, peak, peak_anon, usage.ru_maxrss * 1024, max_procs)


def drop_caches() -> bool:
    """Empty the page cache (root only); False where not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def time_cat(files: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The runs


@dataclass(frozen=True)
class Run:
    tool: str      # neuromerge | mergekit
    label: str     # what the tables show
    method: str    # merge_method in the config
    parameters: tuple[tuple[str, Any], ...] = ()
    model_parameters: tuple[tuple[str, Any], ...] = ()
    experts: int | None = None     # merge only the first N experts (slerp: 1)
    base_in_models: bool = False   # list the base under models too (mergekit's slerp habit)

    @property
    def id(self) -> str:
        return f"{self.tool}:{self.label}"

    def matches(self, item: str) -> bool:
        return item in (self.id, self.label, self.method, self.tool)


RUNS = [
    Run("mergekit", "task_arithmetic", "task_arithmetic", (("normalize", False),),
        (("weight", 0.3),)),
    Run("neuromerge", "task_arithmetic", "task_arithmetic", (("scale", 0.3),)),
    Run("mergekit", "ties", "ties", (("normalize", True),), (("weight", 1.0), ("density", 0.2))),
    Run("neuromerge", "ties-tensor", "ties",
        (("density", 0.2), ("trim_scope", "tensor"), ("scale", 1.0))),
    Run("neuromerge", "ties-global", "ties",
        (("density", 0.2), ("trim_scope", "global"), ("scale", 1.0))),
    Run("neuromerge", "neuromerging", "neuromerging", (("density", 0.2),)),
    # mergekit's own methods, both tools from the same YAML (issue 15)
    *[Run(tool, "slerp", "slerp", (("t", 0.5),), experts=1, base_in_models=True)
      for tool in ("mergekit", "neuromerge")],
    *[Run(tool, "model_stock", "model_stock") for tool in ("mergekit", "neuromerge")],
    *[Run(tool, "della", "della", (("lambda", 1.0), ("epsilon", 0.1)),
          (("weight", 1.0), ("density", 0.5))) for tool in ("mergekit", "neuromerge")],
]
#: the labels measured by both tools with the same config: compared with each other
SAME_CONFIG = ("slerp", "model_stock", "della")


def config_yaml(run: Run, base: Path, experts: list[Path]) -> str:
    import yaml

    models = [{"model": str(base)}] if run.base_in_models else []
    for e in experts[:run.experts]:
        entry: dict[str, Any] = {"model": str(e)}
        if run.model_parameters:
            entry["parameters"] = dict(run.model_parameters)
        models.append(entry)
    cfg: dict[str, Any] = {"merge_method": run.method, "base_model": str(base), "models": models,
                           "parameters": dict(run.parameters), "dtype": "float32"}
    if run.tool == "mergekit":
        cfg["out_dtype"] = "bfloat16"
    if run.label in SAME_CONFIG:   # one YAML for both tools: mergekit's, as users have it
        cfg["out_dtype"] = "bfloat16"
    return yaml.safe_dump(cfg, sort_keys=False)


@dataclass
class Ctx:
    args: argparse.Namespace
    work: Path
    mergekit_bin: Path | None
    nm_args: list[str]
    mk_args: list[str]
    tags: dict[str, str]   # tool -> version string, part of the resume key


def command(ctx: Ctx, run: Run, config: Path, out: Path) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    shard = str(ctx.args.out_shard_bytes)
    if run.tool == "neuromerge":
        cmd = [sys.executable, "-m", "neuromerge", "merge", str(config), str(out), "--force",
               "--quiet", "--max-shard-size", shard, *ctx.nm_args]
    else:
        assert ctx.mergekit_bin is not None
        env.pop("PYTHONPATH", None)
        env["HF_HUB_OFFLINE"] = "1"
        cmd = [str(ctx.mergekit_bin), str(config), str(out), "--no-copy-tokenizer", "--quiet",
               "--out-shard-size", shard, *ctx.mk_args]
    return cmd, env


def do_run(ctx: Ctx, run: Run, base: Path, experts: list[Path], out: Path, log: Path
           ) -> tuple[Measure, list[str]]:
    cfg = ctx.work / "configs" / f"{out.name}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(config_yaml(run, base, experts))
    shutil.rmtree(out, ignore_errors=True)
    cmd, env = command(ctx, run, cfg, out)
    return measure(cmd, log, env), cmd


# ---------------------------------------------------------------------------------------------
# Environment


def say(msg: str) -> None:
    print(msg, flush=True)


def _git(*args: str, cwd: Path) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def neuromerge_info() -> dict[str, str]:
    """Where the `python -m neuromerge` of the runs comes from, and its git commit."""
    res = subprocess.run(
        [sys.executable, "-c", "import neuromerge; print(neuromerge.__file__); "
                               "print(getattr(neuromerge, '__version__', '?'))"],
        capture_output=True, text=True, check=True)
    path, version = res.stdout.split("\n")[:2]
    pkg = Path(path).parent
    commit = _git("rev-parse", "--short=10", "HEAD", cwd=pkg)
    if commit and _git("status", "--porcelain", "--", ".", cwd=pkg):
        commit += "-dirty"
    return {"path": str(pkg), "version": version, "commit": commit or "unknown"}


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(line.split()[1]) * 1024 for line in
                   Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem = 0
    return {"cpu": cpu, "machine": platform.machine(), "cores": os.cpu_count(),
            "ram_bytes": mem, "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "kernel": platform.release()}


def parse_bytes(text: str) -> int:
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30,
             "b": 1}
    s = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * units[unit])
    return int(s)


# ---------------------------------------------------------------------------------------------
# Results store


def result_key(rec: dict[str, Any]) -> str:
    return "|".join(str(rec[k]) for k in
                    ("size_key", "seed", "shard_bytes", "experts", "run", "repeat", "tag"))


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run
            out[result_key(rec)] = rec
    return out


def append_result(path: Path, rec: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


# ---------------------------------------------------------------------------------------------
# One grid point


def bench_point(ctx: Ctx, size: Size, n_experts: int, runs: list[Run],
                results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    args = ctx.args
    say(f"\n== {size.name} ({size.params / 1e6:.1f}M params), {n_experts} experts ==")
    base, experts = ensure_models(ctx.work, size, args.seed, n_experts, args.shard_bytes)
    experts = experts[:n_experts]
    files = [f for folder in (base, *experts) for f in _shards(folder)]
    input_bytes = sum(f.stat().st_size for f in files)
    common = {"size": size.name, "size_key": size.key, "params": size.params, "seed": args.seed,
              "shard_bytes": args.shard_bytes, "experts": n_experts, "input_bytes": input_bytes}
    say(f"  inputs: {len(files)} shards, {input_bytes / GB:.3f} GB")
    records = []

    def stored(run_id: str, repeat: int, tag: str) -> dict[str, Any] | None:
        rec = results.get(result_key({**common, "run": run_id, "repeat": repeat, "tag": tag}))
        return rec if rec and rec.get("rc", 1) == 0 else None

    for r in range(args.repeat):
        cat_tag = "cat-drop" if args.drop_caches else "cat"
        rec = stored("cat", r, cat_tag)
        if rec is None:
            cold = args.drop_caches and drop_caches()
            first = time_cat(files)
            warm = time_cat(files)
            rec = {**common, "run": "cat", "tool": "cat", "label": "read", "repeat": r,
                   "tag": cat_tag, "rc": 0, "cold": cold, "cold_s": first if cold else None,
                   "warm_s": warm, "time": _now()}
            append_result(ctx.work / "results.jsonl", rec)
        records.append(rec)
        cold_txt = (f"cold {input_bytes / GB / rec['cold_s']:.2f} GB/s, " if rec["cold"]
                    else "page cache not dropped, ")
        say(f"  cat: {cold_txt}warm {input_bytes / GB / rec['warm_s']:.2f} GB/s")

        for run in runs:
            tag = ctx.tags[run.tool]
            rec = stored(run.id, r, tag)
            if rec is None:
                out = ctx.work / "out" / f"{size.name}-e{n_experts}-{run.tool}-{run.label}"
                log = ctx.work / "logs" / f"{out.name}-r{r}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                m, cmd = do_run(ctx, run, base, experts, out, log)
                shutil.rmtree(out, ignore_errors=True)
                rec = {**common, "run": run.id, "tool": run.tool, "label": run.label,
                       "method": run.method, "parameters": dict(run.parameters),
                       "model_parameters": dict(run.model_parameters), "repeat": r, "tag": tag,
                       **asdict(m), "cmd": shlex.join(cmd), "log": str(log), "time": _now()}
                append_result(ctx.work / "results.jsonl", rec)
                if m.rc != 0:
                    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
                    say(f"  {run.id}: FAILED (exit {m.rc}), log {log}:\n    "
                        + "\n    ".join(tail))
                    continue
                note = ""
            else:
                note = " (stored)"
            records.append(rec)
            say(f"  {run.id:28s} {rec['wall_s']:8.2f} s  RSS {rec['peak_rss_bytes'] / GB:6.3f} GB"
                f"  anon {rec['peak_anon_bytes'] / GB:6.3f} GB"
                f"  {input_bytes / GB / rec['wall_s']:6.3f} GB/s{note}")
    return records


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Agreement check


def _load_tensor(folder: Path, name: str):
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        fname = json.loads(index.read_text())["weight_map"][name]
    else:
        fname = "model.safetensors"
    with safe_open(str(folder / fname), "pt") as f:
        return f.get_tensor(name)


def check(ctx: Ctx, size: Size, n_experts: int) -> list[dict[str, Any]]:
    """Merge again (untimed), keep the outputs, compare a few tensors; print and return rows."""
    import torch

    say(f"\n== check: {size.name}, {n_experts} experts (outputs kept, untimed) ==")
    base, experts = ensure_models(ctx.work, size, ctx.args.seed, n_experts, ctx.args.shard_bytes)
    experts = experts[:n_experts]
    by_id = {r.id: r for r in RUNS}
    pairs = [("mergekit:task_arithmetic", "neuromerge:task_arithmetic"),
             ("mergekit:ties", "neuromerge:ties-tensor")]
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
             "model.norm.weight"]
    rows = []
    for mk_id, nm_id in pairs:
        outs = {}
        for rid in (mk_id, nm_id):
            run = by_id[rid]
            if run.tool == "mergekit" and ctx.mergekit_bin is None:
                break
            out = ctx.work / "check" / f"{size.name}-e{n_experts}-{run.tool}-{run.label}"
            log = ctx.work / "logs" / f"{out.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            m, _ = do_run(ctx, run, base, experts, out, log)
            if m.rc != 0:
                say(f"  {rid}: FAILED (exit {m.rc}), see {log}")
                break
            outs[rid] = out
        if len(outs) < 2:
            continue
        for name in names:
            a = _load_tensor(outs[mk_id], name).float()
            b = _load_tensor(outs[nm_id], name).float()
            row = {"mergekit": mk_id, "neuromerge": nm_id, "tensor": name,
                   "dtype": str(_load_tensor(outs[nm_id], name).dtype),
                   "max_abs_diff": (a - b).abs().max().item(),
                   "max_abs": b.abs().max().item(),
                   "frac_differing": (a != b).float().mean().item()}
            if nm_id.endswith("task_arithmetic"):
                # The exact result from the inputs, in float64, rounded to bf16 once.
                t0 = _load_tensor(base, name).double()
                ref = t0 + 0.3 * sum(_load_tensor(e, name).double() - t0 for e in experts)
                ref = ref.to(torch.bfloat16).float()
                row["mergekit_vs_exact"] = (a - ref).abs().max().item()
                row["neuromerge_vs_exact"] = (b - ref).abs().max().item()
            rows.append(row)
            extra = ""
            if "neuromerge_vs_exact" in row:
                extra = (f"; vs exact-then-bf16: mergekit {row['mergekit_vs_exact']:.3g}, "
                         f"neuromerge {row['neuromerge_vs_exact']:.3g}")
            say(f"  {mk_id} vs {nm_id} {name} ({row['dtype']}): max |diff| "
                f"{row['max_abs_diff']:.3g} (max |w| {row['max_abs']:.3g}), "
                f"{100 * row['frac_differing']:.3f} % of entries differ{extra}")
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def _agg(recs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"wall_s": statistics.median(r["wall_s"] for r in recs),
            "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in recs),
            "peak_anon_bytes": statistics.median(r["peak_anon_bytes"] for r in recs),
            "ru_maxrss_bytes": statistics.median(r["ru_maxrss_bytes"] for r in recs),
            "n": len(recs), "times": sorted(r["time"] for r in recs if r.get("time"))}


def _when(times: list[str]) -> str:
    """When a row's runs were measured (UTC): stored results reused from an earlier run show
    their own time, not this run's."""
    if not times:
        return "–"
    first, last = times[0].replace("T", " ")[:16], times[-1][11:16]
    return first if last == first[11:16] else f"{first}–{last}"


def summarise(records: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """(size, experts) -> {"input_bytes", "params", "cat": {...}, "runs": {run id: agg}}."""
    points: dict[tuple[str, int], dict[str, Any]] = {}
    for rec in records:
        p = points.setdefault((rec["size"], rec["experts"]), {
            "size": rec["size"], "experts": rec["experts"], "params": rec["params"],
            "input_bytes": rec["input_bytes"], "cat": [], "runs": {}})
        if rec["run"] == "cat":
            p["cat"].append(rec)
        else:
            p["runs"].setdefault(rec["run"], []).append(rec)
    for p in points.values():
        p["runs"] = {rid: _agg(recs) for rid, recs in p["runs"].items()}
        cold = [r["cold_s"] for r in p["cat"] if r["cold"]]
        p["cat"] = {"cold_s": statistics.median(cold) if cold else None,
                    "warm_s": statistics.median(r["warm_s"] for r in p["cat"])}
    return points


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}×" if b else "–"


def table(points: list[dict[str, Any]]) -> str:
    lines = ["| size | params | experts | input GB | tool | method | wall s | peak RSS GB | "
             "peak anon GB | input GB/s | time ÷ mk ties | RSS ÷ mk ties | "
             "÷ mk same method (time / RSS) | "
             "measured (UTC) |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in points:
        runs = p["runs"]
        mk_ties = runs.get("mergekit:ties")
        for run in RUNS:
            a = runs.get(run.id)
            if a is None:
                continue
            vs_same = "–"
            peer = runs.get(f"mergekit:{run.label}")
            if run.tool == "neuromerge" and peer and (
                    run.label in SAME_CONFIG or run.method == "task_arithmetic"):
                vs_same = (f"{_ratio(a['wall_s'], peer['wall_s'])} / "
                           f"{_ratio(a['peak_rss_bytes'], peer['peak_rss_bytes'])}")
            lines.append(
                f"| {p['size']} | {p['params'] / 1e6:.0f}M | {p['experts']} | "
                f"{p['input_bytes'] / GB:.2f} | {run.tool} | {run.label} | {a['wall_s']:.2f} | "
                f"{a['peak_rss_bytes'] / GB:.3f} | {a['peak_anon_bytes'] / GB:.3f} | "
                f"{p['input_bytes'] / GB / a['wall_s']:.3f} | "
                f"{_ratio(a['wall_s'], mk_ties and mk_ties['wall_s'])} | "
                f"{_ratio(a['peak_rss_bytes'], mk_ties and mk_ties['peak_rss_bytes'])} | "
                f"{vs_same} | {_when(a.get('times', []))} |")
    return "\n".join(lines)


def cat_table(points: list[dict[str, Any]]) -> str:
    lines = ["| size | experts | input GB | cold read GB/s | warm read GB/s |",
             "|---|---:|---:|---:|---:|"]
    for p in points:
        c, gb = p["cat"], p["input_bytes"] / GB
        cold = f"{gb / c['cold_s']:.2f}" if c["cold_s"] else "not measured (warm page cache)"
        lines.append(f"| {p['size']} | {p['experts']} | {gb:.2f} | {cold} | "
                     f"{gb / c['warm_s']:.2f} |")
    return "\n".join(lines)


def check_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| pair | tensor | max abs diff | max abs value | entries differing | "
             "vs exact (mergekit / neuromerge) |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        exact = (f"{r['mergekit_vs_exact']:.3g} / {r['neuromerge_vs_exact']:.3g}"
                 if "neuromerge_vs_exact" in r else "–")
        lines.append(f"| {r['mergekit']} vs {r['neuromerge']} | `{r['tensor']}` | "
                     f"{r['max_abs_diff']:.3g} | {r['max_abs']:.3g} | "
                     f"{100 * r['frac_differing']:.3f} % | {exact} |")
    return "\n".join(lines)


def plot(path: Path, size_pts: list[dict[str, Any]], exp_pts: list[dict[str, Any]],
         size_experts: int, exp_size: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("params", size_pts, f"parameters ({size_experts} experts)")]
    if exp_pts and exp_pts != size_pts:
        panels.append(("experts", exp_pts, f"number of experts ({exp_size})"))
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4.2 * len(panels)), squeeze=False)
    for row, (xkey, pts, xlabel) in enumerate(panels):
        for col, (ykey, ylabel, scale) in enumerate(
                [("wall_s", "wall time (s)", 1.0), ("peak_rss_bytes", "peak RSS (GB)", 1 / GB)]):
            ax = axes[row][col]
            for run in RUNS:
                xs = [p[xkey] for p in pts if run.id in p["runs"]]
                ys = [p["runs"][run.id][ykey] * scale for p in pts if run.id in p["runs"]]
                if xs:
                    mk = run.tool == "mergekit"
                    ax.plot(xs, ys, "--" if mk else "-", marker="s" if mk else "o",
                            label=f"{run.tool} {run.label}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if xkey == "params":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
            if row == 0 and col == 0 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle("neuromerge merge vs mergekit (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(ctx: Ctx, info: dict[str, Any], points: dict[tuple[str, int], dict[str, Any]],
                 grid: list[tuple[Size, int]], check_rows: list[dict[str, Any]]) -> str:
    args = ctx.args
    sizes, experts = args.size_list, args.expert_list
    size_pts = [points[(s.name, args.size_experts)] for s in sizes
                if args.grid in ("both", "size") and (s.name, args.size_experts) in points]
    exp_pts = [points[(sizes[0].name, e)] for e in experts
               if args.grid in ("both", "experts") and (sizes[0].name, e) in points]
    all_pts = [points[(s.name, e)] for s, e in grid if (s.name, e) in points]
    m, nm, mk = info["machine"], info["neuromerge"], info.get("mergekit")
    mk_txt = (f"mergekit {mk['version']} (its own venv: torch {mk['torch']}, transformers "
              f"{mk['transformers']})" if mk else "mergekit not run")
    extra = ""
    given = [f"{tool} `{shlex.join(a)}`" for tool, a in
             (("neuromerge", ctx.nm_args), ("mergekit", ctx.mk_args)) if a]
    if given:
        extra = f" Extra arguments: {', '.join(given)}."
    parts = [
        f"_Generated by `benchmarks/perf.py` on {info['date']}; the text between the perf "
        f"markers is rewritten by each run._",
        "",
        f"Command: `{info['command']}`",
        "",
        f"Machine: {m['cpu']} ({m['machine']}), {m['cores']} cores, "
        f"{m['ram_bytes'] / 2**30:.1f} GiB RAM, Linux {m['kernel']}; Python {m['python']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads); neuromerge {nm['version']} at "
        f"commit `{nm['commit']}`; {mk_txt}. Seed {args.seed}, input shards of "
        f"{args.shard_bytes / GB:g} GB, output shards up to {args.out_shard_bytes / GB:g} GB, "
        f"{args.repeat} repeat(s) (medians shown).{extra}",
        "",
        "Inputs: synthetic Llama-shaped bf16 checkpoints (a base and N experts; see the "
        "docstring of `benchmarks/perf.py`). Merges: `dtype: float32`, bf16 output; "
        "task_arithmetic λ = 0.3 (mergekit: weight 0.3, normalize false); ties density 0.2, "
        "λ = 1 (mergekit: weight 1, density 0.2, normalize true: the disjoint mean, trimmed per "
        "tensor, like our `trim_scope: tensor`); neuromerging density 0.2, defaults; slerp, "
        "model_stock and della: one mergekit YAML given to both tools (slerp t = 0.5 between "
        "the base and the first expert; model_stock over the experts; della density 0.5, "
        "epsilon 0.1, λ = 1, out_dtype bfloat16). "
        "Wall time includes start-up (mergekit imports transformers). Peak RSS: the whole process "
        "tree, polled every 20 ms, including the input pages a process maps; anon = resident − "
        "shared (allocated memory). Input GB/s: bytes of all input safetensors ÷ wall time, the "
        "inputs counted once even where a method reads them twice (ties-global and neuromerging "
        "trim with one threshold over the whole model). Merges run with a warm page cache.",
        "",
        "Read speed of the same inputs (`cat` to /dev/null; cold = after dropping the page cache):",
        "",
        cat_table(all_pts),
        "",
    ]
    if size_pts:
        title = (f"### Scaling with model size ({args.size_experts} experts)" if len(size_pts) > 1
                 else f"### {size_pts[0]['size']}, {args.size_experts} experts")
        parts += [title, "", table(size_pts), ""]
    if exp_pts and exp_pts != size_pts:
        parts += [f"### Scaling with the number of experts ({sizes[0].name})", "",
                  table(exp_pts), ""]
    if check_rows:
        parts += ["### Agreement check (same inputs, untimed runs)", "",
                  check_table(check_rows), "",
                  "Exact: θ0 + 0.3 Σt τt computed in float64 from the inputs and rounded to bf16 "
                  "once. TIES differs where the trims keep different entries: mergekit keeps "
                  "exactly int(0.2·N) entries per tensor in argsort order, neuromerge every entry "
                  "whose magnitude reaches the k-th largest (k = ceil(0.2·N)); deltas of bf16 "
                  "checkpoints take few distinct values, so many magnitudes tie at the threshold.",
                  ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    if size_pts or exp_pts:
        plot(png, size_pts, exp_pts, args.size_experts, sizes[0].name)
        parts += [f"![time and peak RSS]({png.name})", ""]
    body = "\n".join(parts)
    text = (out.read_text() if out.exists() else
            "# Performance: neuromerge merge vs mergekit\n\n"
            "Measured with `benchmarks/perf.py` (`make perf`). Hand-written notes go outside "
            "the markers.\n\n" + BEGIN + "\n" + END + "\n")
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + BEGIN + "\n" + body + "\n" + END + tail
    else:
        text = text.rstrip("\n") + "\n\n" + BEGIN + "\n" + body + "\n" + END + "\n"
    out.write_text(text)
    raw = {"info": info, "points": list(points.values()), "check": check_rows}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2, default=str) + "\n")
    return body


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100m,300m,1b",
                    help=f"size presets, smallest first ({', '.join(PRESETS)})")
    ap.add_argument("--experts", default="2,4,8",
                    help="expert counts of the scaling-with-experts table (at the first size)")
    ap.add_argument("--size-experts", type=int, default=3,
                    help="expert count of the scaling-with-size table (default 3)")
    ap.add_argument("--grid", choices=["both", "size", "experts"], default="both",
                    help="which tables to measure (default both)")
    ap.add_argument("--methods", default="all",
                    help="comma list of run ids (" + ", ".join(r.id for r in RUNS)
                    + "), labels, merge methods or tools; default all")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each merge (median shown)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic checkpoints")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK,
                    help=f"cache of checkpoints, results and outputs (default {DEFAULT_WORK})")
    ap.add_argument("--out", default=None,
                    help="markdown report (default docs/performance.md; with --quick, "
                         "<work>/quick/performance.md); .png and .json go beside it")
    ap.add_argument("--shard-size", default=None,
                    help="input shard size (default 1GB; 4MB with --quick)")
    ap.add_argument("--out-shard-size", default="5GB",
                    help="output shard size given to both tools (default 5GB, both defaults)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny preset (hidden 256, 2 layers, vocab 4000), 2 experts: a smoke test")
    ap.add_argument("--fresh", action="store_true", help="ignore stored results")
    ap.add_argument("--check", action="store_true",
                    help="also merge the first grid point again with outputs kept and compare "
                         "tensors of mergekit and neuromerge (task_arithmetic, ties)")
    ap.add_argument("--no-mergekit", action="store_true", help="run neuromerge only")
    ap.add_argument("--mergekit-venv", type=Path, default=None,
                    help="mergekit's virtual environment (default $NEUROMERGE_MERGEKIT_VENV or "
                         "~/.cache/neuromerge/mergekit-venv)")
    ap.add_argument("--neuromerge-args", default="",
                    help='extra arguments of `neuromerge merge`, e.g. "--memory-limit 2GB"')
    ap.add_argument("--mergekit-args", default="", help="extra arguments of mergekit-yaml")
    ap.add_argument("--drop-caches", action=argparse.BooleanOptionalAction, default=None,
                    help="drop the page cache before the cold cat (root; default on, off with "
                         "--quick)")
    ap.add_argument("--generate-only", action="store_true",
                    help="only generate the checkpoints of the grid")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.experts, args.size_experts = "quick", "2", 2
        args.shard_size = args.shard_size or "4MB"
        args.out = args.out or str(args.work.expanduser() / "quick" / "performance.md")
    args.out = args.out or str(REPO / "docs" / "performance.md")
    if args.drop_caches is None:
        args.drop_caches = not args.quick
    args.work = args.work.expanduser().resolve()
    args.shard_bytes = parse_bytes(args.shard_size or "1GB")
    args.out_shard_bytes = parse_bytes(args.out_shard_size)
    try:
        args.size_list = [PRESETS[s.strip()] for s in args.sizes.split(",") if s.strip()]
    except KeyError as exc:
        ap.error(f"unknown size {exc}; presets: {', '.join(PRESETS)}")
    args.expert_list = [int(e) for e in args.experts.split(",") if e.strip()]
    if args.methods == "all":
        args.runs = list(RUNS)
    else:
        items = [m.strip() for m in args.methods.split(",") if m.strip()]
        args.runs = [r for r in RUNS if any(r.matches(i) for i in items)]
        if not args.runs:
            ap.error(f"--methods matches no run; runs: {', '.join(r.id for r in RUNS)}")
    if args.no_mergekit:
        args.runs = [r for r in args.runs if r.tool != "mergekit"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    grid: list[tuple[Size, int]] = []
    if args.grid in ("both", "size"):
        grid += [(s, args.size_experts) for s in args.size_list]
    if args.grid in ("both", "experts"):
        grid += [(args.size_list[0], e) for e in args.expert_list]
    grid = list(dict.fromkeys(grid))

    say(f"perf: {len(grid)} grid point(s): "
        + ", ".join(f"{s.name} ({s.params / 1e6:.1f}M params) × {e} experts" for s, e in grid))
    if args.generate_only:
        for s, e in grid:
            ensure_models(work, s, args.seed, e, args.shard_bytes)
        return 0

    use_mk = any(r.tool == "mergekit" for r in args.runs) or (args.check and not args.no_mergekit)
    venv = (args.mergekit_venv or default_venv()).expanduser()
    mk_bin = ensure_mergekit(venv) if use_mk else None
    info: dict[str, Any] = {
        "command": shlex.join(["python", *sys.argv]) if argv is None
        else shlex.join(["python", "benchmarks/perf.py", *argv]),
        "date": _now(), "machine": machine_info(), "neuromerge": neuromerge_info()}
    if use_mk:
        info["mergekit"] = mergekit_info(venv)
    nm_args, mk_args = shlex.split(args.neuromerge_args), shlex.split(args.mergekit_args)
    tags = {"neuromerge": f"nm-{info['neuromerge']['commit']} {shlex.join(nm_args)}".strip(),
            "mergekit": f"mk-{info.get('mergekit', {}).get('version')} "
                        f"{shlex.join(mk_args)}".strip()}
    ctx = Ctx(args, work, mk_bin, nm_args, mk_args, tags)
    m = info["machine"]
    say(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.1f} GiB; neuromerge "
        f"{info['neuromerge']['commit']} ({info['neuromerge']['path']})"
        + (f"; mergekit {info['mergekit']['version']}" if use_mk else ""))

    results = {} if args.fresh else load_results(work / "results.jsonl")
    records = []
    for size, n in grid:
        records += bench_point(ctx, size, n, args.runs, results)
    check_rows = check(ctx, *grid[0]) if args.check else []

    points = summarise(records)
    body = write_report(ctx, info, points, grid, check_rows)
    say("\n" + body)
    say(f"\nwrote {args.out} (+ .png, .json); raw results in {work / 'results.jsonl'}")
    failed = [r for r in args.runs for s, e in grid if r.id not in
              points.get((s.name, e), {}).get("runs", {})]
    if failed:
        say(f"{len(failed)} run(s) failed or missing: " + ", ".join(sorted({r.id for r in failed})))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
