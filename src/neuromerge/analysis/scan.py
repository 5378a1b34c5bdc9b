"""``neuromerge analyze``: stream a base and its experts through the merge engine's plan and
reader, tensor by tensor, and reduce every tensor to a few sums (``measures.Record``).

Three streaming passes over the inputs, each holding the tensors of one name (or one row block
of a tensor too large for the memory budget) across the models, plus the one read ahead:

1. each task's |τ| histogram for the global trim (``MagnitudeSelect``, as ``neuromerge merge``),
2. its refinement at every density: the exact threshold, ‖trim(τt)‖₁, σt and λ2 = auto,
3. the measures (``measures.tensor_measures``), of the raw task vectors and of those trimmed
   at ``conflict_density``.

The plan and its validation are the engine's (``build_plan``): an expert that does not match the
base fails with the same one-line error as a merge.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from neuromerge import __version__
from neuromerge.analysis.analysis_report import write_report
from neuromerge.analysis.layout import NO_LAYER, Layout
from neuromerge.analysis.measures import (
    CHistogram,
    Record,
    add_into,
    derive,
    tensor_measures,
    total,
)
from neuromerge.analysis.result import Analysis
from neuromerge.architectures import UNKNOWN, Architecture, read_architecture
from neuromerge.devices import resolve_device
from neuromerge.engine.inputs import Inputs
from neuromerge.engine.memory import MemoryPolicy, memory_budget
from neuromerge.engine.plan import Kind, Unit, build_plan
from neuromerge.engine.trim_pass import select_over
from neuromerge.engine.units import plan_units
from neuromerge.errors import ConfigError
from neuromerge.io.lora import LoraExpertReader, is_adapter_folder
from neuromerge.io.reader import CheckpointReader, StateDictReader, open_checkpoint
from neuromerge.io.writer import OutputFolder, parse_size, refuse_overlap
from neuromerge.kernels import keep_count, task_vectors, trim
from neuromerge.method_api import TrimSummary
from neuromerge.methods.neuromerging import lambda2_auto

DEFAULT_DENSITIES = (0.1, 0.2, 0.5)
#: The density of the trimmed measures: NeuroMerging's (and TIES') default.
DEFAULT_CONFLICT_DENSITY = 0.2

Source = str | os.PathLike[str] | Mapping[str, torch.Tensor]


def analyze(base: Source, experts: Sequence[Source] | Mapping[str, Source],
            out: str | os.PathLike[str] | None = None, *,
            densities: Sequence[float] = DEFAULT_DENSITIES,
            conflict_density: float = DEFAULT_CONFLICT_DENSITY,
            names: Sequence[str] | None = None, force: bool = False, device: str = "cpu",
            progress: bool = False, memory_limit: str | int | None = None,
            read_ahead: bool = True, tensor_class: Mapping[str, Kind] | None = None,
            missing_tensors: str = "error", plots: bool = True) -> Analysis:
    """Analyse how the experts' task vectors split into NeuroMerging's subspaces and where they
    interfere; with ``out``, write the report folder there (see ``analysis_report.write_report``).

    ``base`` and each expert are a checkpoint path (HF folder or weights file) or an in-memory
    state dict; ``experts`` may be a {name: source} mapping, otherwise tasks are named after the
    experts' folders (or ``names``). ``densities``: the global trim densities at which σ and
    λ2 = auto are computed; ``conflict_density``: the trim of the "trimmed" measures (added to
    ``densities``). The report folder is written atomically; an existing one is replaced only
    with ``force``. ``memory_limit`` (``"8GB"`` or bytes) bounds the process as in a merge."""
    dens = _check_densities(densities, conflict_density)
    if isinstance(experts, Mapping):
        sources, given = list(experts.values()), list(experts)
    else:
        sources, given = list(experts), None
    if not sources:
        raise ConfigError("no expert models to analyse")
    if names is not None:
        if len(names) != len(sources):
            raise ConfigError(f"--names: {len(names)} names for {len(sources)} experts")
        given = [str(n) for n in names]
    limit = None if memory_limit is None else parse_size(memory_limit, what="--memory-limit")
    with contextlib.ExitStack() as stack:
        base_r = _open(base, "base")
        stack.callback(base_r.close)
        readers: list[CheckpointReader] = []
        for i, src in enumerate(sources):
            readers.append(_open(src, f"expert {i + 1}", base))
            stack.callback(readers[-1].close)
        tasks = _task_names(given, sources)
        folder = None
        if out is not None:
            paths = [Path(s) for s in (base, *sources) if not isinstance(s, Mapping)]
            refuse_overlap(Path(out), paths)
            folder = OutputFolder(out, force=force)  # refuses an existing report before any work
        result = analyze_readers(base_r, readers, tasks, densities=dens,
                                 conflict_density=conflict_density, device=device,
                                 progress=progress, memory_limit=limit, read_ahead=read_ahead,
                                 tensor_class=tensor_class, missing_tensors=missing_tensors,
                                 architecture=(UNKNOWN if isinstance(base, Mapping)
                                               else read_architecture(base)))
        if folder is not None:
            with folder as tmp:
                write_report(result, tmp, plots=plots)
            result.output = Path(out)  # type: ignore[arg-type]
    return result


def analyze_readers(base: CheckpointReader, experts: Sequence[CheckpointReader],
                    tasks: Sequence[str], *, densities: Sequence[float] = DEFAULT_DENSITIES,
                    conflict_density: float = DEFAULT_CONFLICT_DENSITY, device: str = "cpu",
                    progress: bool = False, memory_limit: int | None = None,
                    read_ahead: bool = True, tensor_class: Mapping[str, Kind] | None = None,
                    missing_tensors: str = "error", architecture: Architecture = UNKNOWN
                    ) -> Analysis:
    """``analyze`` on open readers, without writing anything. ``architecture`` (the base's
    config.json) gives each tensor's neuron axis, as in a merge (GPT-2's Conv1D: columns)."""
    t0 = time.perf_counter()
    memory = MemoryPolicy(memory_budget(memory_limit))
    memory.tune_heap()
    dens = _check_densities(densities, conflict_density)
    dev = resolve_device(device)
    plan = build_plan(base, experts, tensor_class=tensor_class, missing_tensors=missing_tensors,
                      architecture=architecture)
    # the measures hold a trimmed copy and float64 row blocks beside the engine's working set
    units = plan_units(plan, base, experts, memory.budget // 2, torch.float32)[0]
    merged = [u for u in units if u.plan.kind != "copy"]
    inputs = Inputs(base, experts, dev, torch.float32, read_ahead=read_ahead)
    trims = trim_statistics(merged, inputs, dens, progress=progress)
    t1 = time.perf_counter()

    layout = Layout(p.name for p in plan)
    n_tasks = len(experts)
    hist = CHistogram(n_tasks)
    records: dict[str, Record] = {}
    thresholds = trims[conflict_density].thresholds if conflict_density < 1 else None
    bar = tqdm(inputs.stream(merged), total=len(merged), desc="analyze 3/3: statistics",
               unit="tensor", disable=not progress, leave=False, dynamic_ncols=True)
    for u, b, exs in bar:
        name = u.plan.name
        base_c = inputs.to_compute(b)
        tv = task_vectors(base_c, [e.to(dev) for e in exs], torch.float32)
        tv_trim = trim(tv, conflict_density, thresholds) if thresholds is not None else None
        rec = tensor_measures(base_c, tv, tv_trim, neuronal=u.plan.kind == "neuronal", hist=hist,
                              hist_key=layout.module(name))
        del tv, tv_trim, base_c, b, exs
        if name in records:
            add_into(records[name], rec)
        else:
            rec["tensors"] = rec["tensors"] + 1
            records[name] = rec
    seconds = {"trim": t1 - t0, "statistics": time.perf_counter() - t1}  # keys of analysis.json
    return _assemble(plan, layout, records, hist, trims, list(tasks), base, experts,
                     densities=dens, conflict_density=conflict_density, seconds=seconds)


def trim_statistics(units: Sequence[Unit], inputs: Inputs, densities: Sequence[float], *,
                    progress: bool = False) -> dict[float, TrimSummary]:
    """The global trim at every density in two streaming passes: ``engine.trim_pass.trim_pass``'s
    global scope, with the first pass (each task's coarse |τ| histogram, which does not depend on
    the density) shared by all densities. Gives the same thresholds and L1 masses, exactly."""
    merged = [u for u in units if u.plan.kind != "copy"]
    n = sum(u.numel for u in merged)
    trimmed = [d for d in densities if d < 1 and n > 0]
    totals, results = select_over(merged, inputs, [keep_count(d, n) for d in trimmed],
                                  progress=progress, desc=("analyze 1/3: trim histogram",
                                                           "analyze 2/3: trim thresholds"))
    by_density = dict(zip(trimmed, results, strict=True))
    out = {}
    for d in densities:
        if d in by_density:
            res = by_density[d]
            out[d] = TrimSummary(d, "global", n, keep_count(d, n), tuple(r[0] for r in res),
                               tuple(totals), tuple(r[1] for r in res))
        else:  # nothing trimmed
            out[d] = TrimSummary(d, "global", n, n, None, tuple(totals), tuple(totals))
    return out


def _assemble(plan: Sequence[Any], layout: Layout, records: dict[str, Record], hist: CHistogram,
              trims: Mapping[float, TrimSummary], tasks: list[str], base: CheckpointReader,
              experts: Sequence[CheckpointReader], *, densities: Sequence[float],
              conflict_density: float, seconds: dict[str, float]) -> Analysis:
    n_tasks = len(tasks)
    merged = [p for p in plan if p.kind != "copy"]
    where = {p.name: (layout.layer(p.name), layout.module(p.name)) for p in merged}
    layers = [lay for lay in layout.layers if any(w[0] == lay for w in where.values())]
    modules = [m for m in layout.modules if any(w[1] == m for w in where.values())]
    members: dict[Any, list[str]] = defaultdict(list)
    for name, (lay, mod) in where.items():
        for key in (("layer", lay), ("module", mod), ("cell", lay, mod)):
            members[key].append(name)

    def group(*key: str) -> dict[str, Any]:
        return derive(total((records[n] for n in members[key]), n_tasks))

    by_layer_module = {lay: {m: group("cell", lay, m) for m in modules
                             if ("cell", lay, m) in members} for lay in layers}

    def per_task(rows: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        return None if rows is None else dict(zip(tasks, rows, strict=True))

    trim_rows = []
    for d in densities:
        st = trims[d]
        trim_rows.append({
            "density": d, "n_entries": st.n_entries, "k": st.k,
            "thresholds": list(st.thresholds) if st.thresholds is not None else None,
            "sigma": list(st.sigma), "max_sigma": max(st.sigma, default=0.0),
            "l1_total": list(st.l1_total), "l1_kept": list(st.l1_kept),
            "lambda2_auto": lambda2_auto(st)})
    counts = {k: sum(1 for p in plan if p.kind == k) for k in ("neuronal", "point", "copy")}
    summary: dict[str, Any] = {
        "neuromerge_version": __version__,
        "tasks": tasks,
        "inputs": {"base": base.source, "experts": [e.source for e in experts]},
        "densities": list(densities),
        "conflict_density": conflict_density,
        "tensor_counts": counts,
        "layers": layers,
        "modules": modules,
        "trim": trim_rows,
        "overall": derive(total(records.values(), n_tasks)),
        "by_module": {m: group("module", m) for m in modules},
        "by_layer": {lay: group("layer", lay) for lay in layers},
        "by_layer_module": by_layer_module,
        "c_quantiles": {
            "overall": per_task(hist.summary()),
            "by_module": {m: per_task(hist.summary([m])) for m in modules
                          if hist.histogram([m]) is not None},
        },
        "seconds": seconds,
    }
    tensors = [{"name": p.name, "kind": p.kind, "shape": list(p.meta.shape),
                "layer": where[p.name][0], "module": where[p.name][1], **derive(records[p.name])}
               for p in merged]
    return Analysis(summary, tensors, records, hist)


def _check_densities(densities: Sequence[float], conflict_density: float) -> list[float]:
    values = [*densities, conflict_density]
    for d in values:
        if not isinstance(d, int | float) or isinstance(d, bool) or not 0 < d <= 1:
            raise ConfigError(f"density {d!r}: must be a number in (0, 1]")
    return sorted({float(d) for d in values})


def _open(source: Source, role: str, base: Source | None = None) -> CheckpointReader:
    if isinstance(source, Mapping):
        return StateDictReader(source, role)
    if base is not None and not isinstance(base, Mapping) and is_adapter_folder(source):
        return LoraExpertReader(open_checkpoint(base), source)  # a LoRA expert over the base
    return open_checkpoint(source)


def _task_names(given: Sequence[str] | None, sources: Sequence[Source]) -> list[str]:
    if given is not None:
        names = [str(g) for g in given]
    else:
        names = []
        for i, s in enumerate(sources):
            if isinstance(s, Mapping):
                names.append(f"task{i + 1}")
            else:
                p = Path(s)
                names.append(p.stem if p.is_file() else (p.resolve().name or f"task{i + 1}"))
    seen: dict[str, int] = {}
    out = []
    for n in names:  # duplicate names get -2, -3, ...
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


__all__ = ["DEFAULT_CONFLICT_DENSITY", "DEFAULT_DENSITIES", "NO_LAYER", "Analysis", "analyze",
           "analyze_readers", "trim_statistics"]
