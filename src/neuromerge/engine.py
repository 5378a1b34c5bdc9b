"""The streaming engine: plan every tensor from the checkpoints' headers, compute model-wide trim
statistics in a streaming pass when the method needs them, then merge tensor by tensor and hand
each result to a sink (a sharded safetensors writer, or a dict for in-memory merges).

Peak memory is the tensors of one name across the base and the experts plus the method's
working copies, never the models' total size.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import functools
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch
from tqdm.auto import tqdm

from neuromerge.architectures import (
    UNKNOWN,
    Architecture,
    from_config,
    neuron_axis,
    suspicious_without_config,
    tied_copies,
)
from neuromerge.errors import ConfigError, InputError
from neuromerge.io.dtypes import NAME_TO_TORCH, dtype_name
from neuromerge.io.reader import CheckpointReader, StateDictReader, TensorMeta
from neuromerge.kernels import derive_seed, each_task_vector, keep_count, kth_largest, per_task
from neuromerge.registry import (
    MergeMethod,
    StatisticsKind,
    SumCollector,
    SumsCollected,
    TensorContext,
    TrimStats,
    get_method,
)
from neuromerge.thresholds import MAX_BAND, MagnitudeSelect, band_from, select_bytes

log = logging.getLogger("neuromerge")

Kind = Literal["neuronal", "point", "copy"]


@dataclass(frozen=True)
class TensorPlan:
    name: str
    meta: TensorMeta
    kind: Kind
    out_dtype: torch.dtype
    reason: str = ""  # why a tensor is copied from the base
    #: The axis indexing the neurons of a neuronal tensor (1: a Conv1D (in, out) weight); the
    #: engine hands methods every tensor with this axis first, and writes it back as stored.
    neuron_axis: int = 0
    axis_reason: str = ""  # why neuron_axis is not 0


def to_neurons(t: torch.Tensor, axis: int) -> torch.Tensor:
    """A tensor as stored → (neurons, ...): the neuron axis first (contiguous)."""
    return t if axis == 0 else t.movedim(axis, 0).contiguous()


def from_neurons(t: torch.Tensor, axis: int) -> torch.Tensor:
    """The inverse of :func:`to_neurons`: back to the stored layout."""
    return t if axis == 0 else t.movedim(0, axis).contiguous()


@dataclass
class MergeResult:
    """What a merge did: resolved parameters (``lambda2`` as a number), trim statistics
    (each task's σ), tensor counts, timings; the state dict for in-memory merges."""

    method: str
    params: dict[str, Any]
    stats: TrimStats | None
    counts: dict[str, int]
    seconds: dict[str, float]
    model_names: list[str]
    output: Any = None
    state_dict: dict[str, torch.Tensor] | None = None
    bytes_read: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class TensorSink(Protocol):
    def write(self, name: str, tensor: torch.Tensor, row_start: int | None = None,
              axis: int = 0) -> None:
        """Take a merged tensor, or (``row_start`` given) the next block of one along ``axis``
        (in the stored layout)."""


class DictSink:
    def __init__(self, plan: Sequence[TensorPlan] = ()) -> None:
        self.state_dict: dict[str, torch.Tensor] = {}
        self._shapes = {p.name: p.meta.shape for p in plan}

    def write(self, name: str, tensor: torch.Tensor, row_start: int | None = None,
              axis: int = 0) -> None:
        if row_start is None:
            self.state_dict[name] = tensor
            return
        if name not in self.state_dict:
            self.state_dict[name] = tensor.new_empty(self._shapes[name])
        self.state_dict[name].narrow(axis, row_start, tensor.shape[axis]).copy_(tensor)


def _return_freed_tensors_to_the_os(threshold: int = 32 << 20) -> None:
    """glibc raises its mmap threshold (up to 32 MB) after each large free; tensor-sized blocks
    then come from the heap, and freed ones stay in the process. A fixed threshold stops that
    drift: buffers up to 32 MB (row blocks' working copies) come from the heap and are reused
    from block to block without page faults (measured: 4x less CPU on 2M-entry blocks than with
    a 1 MiB threshold), larger ones are mmapped and returned when freed, and ``_trim_heap`` after
    each tensor gives the heap's free pages back, so peak RSS tracks the tensors in flight.
    Under a memory limit the threshold is lower (a fraction of the budget): every block's buffers
    are then returned the moment they are freed, at the cost of page faults. Set by every run:
    the setting is the process's, and the previous run may have had another limit."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            _libc().mallopt(-3, threshold)  # M_MMAP_THRESHOLD


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")  # once: _trim_heap runs after every tensor


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


#: Free heap left in place for the next tensor's buffers: reused without page faults, where
#: trimming after every tensor cost ~10% of a TIES merge's CPU time (measured: 21.0-23.4 s vs
#: 17.6-20.0 s of CPU on the 117M perf model). Beyond it, or under a memory limit, it is trimmed.
HEAP_SLACK = 128 << 20


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    info = getattr(_libc(), "mallinfo2", None)  # glibc >= 2.33
    if info is not None:
        info.restype = _MallInfo2
    return info


def _trim_heap(always: bool = False) -> None:
    """Return the heap's free pages to the OS (glibc ``malloc_trim``) once more than
    ``HEAP_SLACK`` of it is free (``always``: whatever is free): buffers under the mmap
    threshold are reused within a tensor's row blocks and across tensors, and do not pile up."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            info = None if always else _mallinfo2()
            if info is not None and info().fordblks < HEAP_SLACK:
                return
            _libc().malloc_trim(0)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``. A float32 sum is finite exactly when every entry is (NaN and Inf
    propagate through it), and is ~10× faster than ``isfinite().all()`` on bf16 (measured: 13 vs
    162 ms for 32 M entries); only a non-finite sum, which a sum of huge finite values can also
    give, is checked entry by entry."""
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64
                                 else torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return dev


def compute_dtype(name: str | torch.dtype) -> torch.dtype:
    dtype = NAME_TO_TORCH[name] if isinstance(name, str) else name
    # Half-precision subtraction loses the small θt − θ0 differences a merge is made of.
    return torch.float64 if dtype == torch.float64 else torch.float32


def build_plan(base: CheckpointReader, experts: Sequence[CheckpointReader], *,
               tensor_class: Mapping[str, Kind] | None = None,
               missing_tensors: str = "error",
               out_dtype: torch.dtype | None = None,
               architecture: Architecture = UNKNOWN,
               neuron_axes: Mapping[str, int] | None = None,
               omit: Mapping[str, str] | None = None) -> list[TensorPlan]:
    """Check that the experts match the base (names, shapes, float-ness), classify tensors and
    resolve each neuronal tensor's neuron axis (``architecture``'s rules, ``neuron_axes`` glob
    overrides first).

    Only tensors that are merged must be in every expert: a ``copy`` tensor (non-float buffers
    such as ``position_ids``, or a ``tensor_class`` override) comes from the base whatever the
    experts hold, so an expert saved without it (newer transformers drop such buffers) is fine.
    ``omit`` ({tied copy: kept tensor}, ``architectures.tied_copies``) are left out of the plan.
    """
    omit = omit or {}
    base_set = set(base.names())
    for ex in experts:
        extra = [n for n in ex.names() if n not in base_set]
        if extra:
            raise InputError(f"{ex.source}: tensor {extra[0]!r} is not in the base model "
                             f"{base.source} ({len(extra)} such tensors; different architecture?)")
    have = [set(ex.names()) for ex in experts]
    plan = []
    for name in base.names():
        if name in omit:
            continue
        meta = base.meta(name)
        is_float = meta.dtype.is_floating_point
        kind, reason = _classify(name, meta, tensor_class or {})
        if kind != "copy" and (why := architecture.copy_reason(name, meta)) and not any(
                fnmatch.fnmatchcase(name, pat) for pat in (tensor_class or {})):
            kind, reason = "copy", why
        lacking = [ex.source for ex, names in zip(experts, have, strict=True)
                   if name not in names]
        if lacking and kind != "copy":
            if missing_tensors != "base":
                raise InputError(f"{lacking[0]}: lacks tensor {name!r} of the base model "
                                 f"(set missing_tensors: base to copy such tensors from the base)")
            kind, reason = "copy", f"missing in {lacking[0]}"
        for ex, names in zip(experts, have, strict=True):
            if name not in names:
                continue
            em = ex.meta(name)
            if em.shape != meta.shape:
                raise InputError(
                    f"tensor {name!r}: shape {list(em.shape)} in {ex.source} differs from "
                    f"{list(meta.shape)} in the base {base.source}" + _shape_hint(name, meta, em))
            if is_float and not em.dtype.is_floating_point:
                raise InputError(f"tensor {name!r}: {dtype_name(em.dtype)} in {ex.source} but "
                                 f"{dtype_name(meta.dtype)} in the base")
        out = out_dtype if (out_dtype is not None and is_float) else meta.dtype
        axis, why_axis = (neuron_axis(name, meta, architecture, neuron_axes or {})
                          if kind == "neuronal" else (0, ""))
        plan.append(TensorPlan(name, meta, kind, out, reason, axis, why_axis))
    return plan


_VOCAB_NAMES = re.compile(r"embed|(^|\.)emb(\.|$)|wte|lm_head|word|shared|tok")


def _shape_hint(name: str, a: TensorMeta, b: TensorMeta) -> str:
    if len(a.shape) == len(b.shape) == 2 and a.shape[1:] == b.shape[1:]:
        if _VOCAB_NAMES.search(name):
            return (" (vocabulary sizes differ: set vocab: base to keep the base's tokens, or "
                    "vocab: union to merge the experts' added tokens too)")
        return " (row counts differ)"
    return " (different architecture?)"


def _classify(name: str, meta: TensorMeta, overrides: Mapping[str, Kind]) -> tuple[Kind, str]:
    is_float = meta.dtype.is_floating_point
    for pattern, kind in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            if kind != "copy" and not is_float:
                raise ConfigError(f"tensor_class: {pattern!r} makes {name!r} {kind}, but it is "
                                  f"{dtype_name(meta.dtype)}; only float tensors are merged")
            if kind == "neuronal" and len(meta.shape) < 2:
                raise ConfigError(f"tensor_class: {pattern!r} makes {name!r} neuronal, but it is "
                                  f"{len(meta.shape)}-D; neurons are rows of a ≥2-D tensor")
            return kind, f"tensor_class {pattern!r}" if kind == "copy" else ""
    if not is_float:
        return "copy", "not a float tensor"
    return ("neuronal" if len(meta.shape) >= 2 else "point"), ""


Rows = tuple[int, int] | None  # a block [start, stop) of a tensor's neurons, or None: all of it


@dataclass(frozen=True)
class Unit:
    """One piece of work: a tensor, or a block of its neurons (rows in the (neurons, ...) view
    methods see; columns of a Conv1D weight as stored) when it is too large for the budget."""

    plan: TensorPlan
    rows: Rows = None


def bytes_per_entry(n_experts: int, in_itemsize: int, cdtype: torch.dtype) -> int:
    """Peak bytes the engine holds per tensor entry in flight: the inputs as stored for the
    tensor being merged and the one being read ahead, the task vectors in the compute dtype, and
    the methods' working copies (NeuroMerging's float64 per-neuron parts are the largest: about
    six float64 values per entry). Measured peaks stay below this (tests/test_memory.py)."""
    c = 8 if cdtype == torch.float64 else 4
    return 2 * (n_experts + 1) * in_itemsize + (n_experts + 1) * c + 48


def split_rows(meta: TensorMeta, max_entries: int, axis: int = 0) -> list[Rows]:
    """Blocks along ``axis`` (the neuron axis) of at most ``max_entries`` entries (at least one
    neuron each); ``[None]`` when the tensor fits whole."""
    if meta.numel <= max_entries or len(meta.shape) == 0 or meta.shape[axis] <= 1:
        return [None]
    n = meta.shape[axis]
    row = max(1, meta.numel // n)
    step = max(1, max_entries // row)
    return [(i, min(n, i + step)) for i in range(0, n, step)]


class _Inputs:
    """Reads one tensor (or row block) across the base and the experts, checking values are
    finite, and reads the next one ahead on a background thread while this one is merged."""

    def __init__(self, base: CheckpointReader, experts: Sequence[CheckpointReader],
                 device: torch.device, dtype: torch.dtype, *, read_ahead: bool = True) -> None:
        self.base, self.experts, self.device, self.dtype = base, experts, device, dtype
        self.read_ahead = read_ahead
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._checked: set[tuple[int, str, Rows]] = set()
        #: Tensors merged in row blocks for compute only (their inputs fit the budget as stored):
        #: read whole once and sliced, so the passes over their blocks do not read them again.
        self.held: set[str] = set()
        # at most two: the one being merged and the next one, read ahead
        self._held: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        #: Coarse bins the trim selects keep at full resolution per task (narrower under a
        #: tight memory limit: the run's budget plans for them).
        self.band = MAX_BAND

    def _read(self, reader: CheckpointReader, name: str, rows: Rows, axis: int = 0
              ) -> torch.Tensor:
        if rows is None:
            t = reader.read(name)
        else:  # readers written before neuron axes take (name, start, stop)
            t = reader.read_rows(name, *rows) if axis == 0 else reader.read_rows(name, *rows,
                                                                                  axis=axis)
        key = (id(reader), name, rows)  # each input is checked once, not once per pass
        with self._lock:
            self.bytes_read += t.numel() * t.element_size()
            check = t.dtype.is_floating_point and key not in self._checked
        if check:
            if not all_finite(t):
                raise InputError(f"{reader.source}: tensor {name!r} contains NaN or Inf")
            with self._lock:
                self._checked.add(key)
        return to_neurons(t, axis)

    def load(self, unit: Unit, hold: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The base's and every expert's values on the CPU, in their stored dtype, as
        (neurons, ...): a column-neuron tensor arrives transposed (``TensorPlan.neuron_axis``).
        Row blocks of a held tensor are sliced from its inputs, read whole once."""
        name, rows, axis = unit.plan.name, unit.rows, unit.plan.neuron_axis
        if unit.plan.kind == "copy":
            return self._read(self.base, name, rows, axis), []
        if rows is not None and hold and name in self.held:
            with self._lock:
                held = self._held.get(name)
            if held is None:
                held = (self._read(self.base, name, None, axis),
                        [self._read(ex, name, None, axis) for ex in self.experts])
                with self._lock:
                    self._held[name] = held
                    while len(self._held) > 2:
                        del self._held[next(iter(self._held))]
            return held[0][rows[0]:rows[1]], [e[rows[0]:rows[1]] for e in held[1]]
        return (self._read(self.base, name, rows, axis),
                [self._read(ex, name, rows, axis) for ex in self.experts])

    def release(self, name: str | None = None) -> None:
        """Drop the held inputs of ``name`` (of every tensor when None)."""
        with self._lock:
            if name is None:
                self._held.clear()
            else:
                self._held.pop(name, None)

    def stream(self, units: Sequence[Unit], hold: bool = True
               ) -> Iterator[tuple[Unit, torch.Tensor, list[torch.Tensor]]]:
        """(unit, base, experts) for each unit in turn, the next one read while this one is used:
        reading (I/O, and the finite check) overlaps merging, and uses the other core.
        ``hold=False`` reads row blocks of held tensors from the files (a sample of rows)."""
        if not self.read_ahead or len(units) < 2:
            for u in units:
                yield (u, *self.load(u, hold))
            return
        with ThreadPoolExecutor(1, thread_name_prefix="neuromerge-read") as pool:
            pending = pool.submit(self.load, units[0], hold)
            for i, u in enumerate(units):
                base, experts = pending.result()
                if i + 1 < len(units):
                    pending = pool.submit(self.load, units[i + 1], hold)
                yield u, base, experts
                del base, experts

    def to_compute(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True).to(self.dtype)

    def task_magnitudes(self, base: torch.Tensor, experts: Sequence[torch.Tensor]
                        ) -> Iterator[tuple[int, torch.Tensor]]:
        """|τt| for each task in turn, holding two tensors at a time (same arithmetic as
        ``kernels.task_vectors`` so thresholds match the merge pass bit for bit)."""
        taus = each_task_vector(self.to_compute(base), experts, self.dtype)
        for t, tau in enumerate(taus):
            mags = tau.abs_()  # = kernels.magnitudes(θt − θ0), without temporaries
            yield t, mags if mags.dtype == torch.float32 else mags.to(torch.float32)


class _Statistics:
    """Each expert's per-tensor data statistic (methods declared with ``needs``), checked
    against the plan before any work and read one tensor at a time alongside the weights.

    A Fisher has the shape of its tensor and is read in the same row blocks; a RegMean Gram of
    a 2-D ``(out, in)`` weight is ``(in, in)`` and is read whole for every block (each output
    row is solved with the whole Gram)."""

    def __init__(self, kind: StatisticsKind, readers: Sequence[CheckpointReader],
                 plan: Sequence[TensorPlan], method: str, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.kind, self.readers, self.device, self.dtype = kind, readers, device, dtype
        self.present: set[str] = set()
        names = [set(r.names()) for r in readers]
        for p in plan:
            if p.kind == "copy":
                continue
            have = [r for r, ns in zip(readers, names, strict=True) if p.name in ns]
            if not have:
                if kind == "fisher":
                    raise InputError(f"{readers[0].source}: no Fisher statistic for tensor "
                                     f"{p.name!r} ({method} weights every merged tensor; "
                                     f"exclude it with tensor_class: copy)")
                continue  # RegMean: a tensor without a Gram is averaged
            if len(have) < len(readers):
                lacking = next(r for r, ns in zip(readers, names, strict=True)
                               if p.name not in ns)
                raise InputError(f"{lacking.source}: no {kind} statistic for tensor {p.name!r}, "
                                 f"which other models' statistics have")
            want = p.meta.shape if kind == "fisher" else self._gram_shape(p)
            if want is None:
                raise InputError(f"{readers[0].source}: regmean statistic for {p.name!r}, a "
                                 f"{len(p.meta.shape)}-D tensor: Grams are for 2-D (out, in) "
                                 f"linear weights")
            for r in readers:
                got = r.meta(p.name).shape
                if got != want:
                    raise InputError(f"{r.source}: {kind} statistic {p.name!r} has shape "
                                     f"{list(got)}, expected {list(want)} for the tensor "
                                     f"of shape {list(p.meta.shape)}")
            self.present.add(p.name)

    @staticmethod
    def _gram_shape(p: TensorPlan) -> tuple[int, ...] | None:
        if len(p.meta.shape) != 2:
            return None
        fan_in = p.meta.shape[1 - p.neuron_axis]  # a Conv1D (in, out) weight: in is axis 0
        return (fan_in, fan_in)

    def read(self, unit: Unit) -> tuple[torch.Tensor, ...] | None:
        name = unit.plan.name
        if name not in self.present:
            return None
        out = []
        for r in self.readers:
            axis = unit.plan.neuron_axis
            if self.kind == "regmean" or unit.rows is None:
                t = r.read(name)
            elif axis == 0:
                t = r.read_rows(name, *unit.rows)
            else:
                t = r.read_rows(name, *unit.rows, axis=axis)
            if self.kind == "fisher":
                t = to_neurons(t, axis)  # laid out like the weights the method receives
            if not all_finite(t) or (self.kind == "fisher" and bool((t < 0).any())):
                raise InputError(f"{r.source}: {self.kind} statistic {name!r} is not finite"
                                 + (" and non-negative" if self.kind == "fisher" else ""))
            out.append(t.to(self.device).to(self.dtype))
        return tuple(out)


def compute_trim_stats(units: Sequence[Unit], inputs: _Inputs, *,
                       density: float | Sequence[float], scope: str, progress: bool = False,
                       block_thresholds: dict[str, tuple[float, ...]] | None = None
                       ) -> TrimStats:
    """Each task's trim threshold (global scope) and L1 mass before/after the trim, streamed
    (``density``: one for every task, or one per task where models set their own).

    With the per-tensor scope, the thresholds of tensors merged in row blocks are stored in
    ``block_thresholds`` for the merge pass."""
    merged = [u for u in units if u.plan.kind != "copy"]
    n_tasks = len(inputs.experts)
    densities = per_task(density, n_tasks)
    density = densities[0] if len(set(densities)) == 1 else min(densities)
    n = sum(_numel(u) for u in merged)
    total = [0.0] * n_tasks
    kept = [0.0] * n_tasks
    if scope == "global" and density < 1 and n > 0:
        # one select pass serves every distinct k; each task reads its own k's result
        task_ks = [keep_count(d, n) for d in densities]
        ks = sorted(set(task_ks))
        l1, per_k = select_over(merged, inputs, ks, progress=progress,
                                desc=("trim stats 1/2", "trim stats 2/2"))
        results = [per_k[ks.index(k)][t] for t, k in enumerate(task_ks)]
        # a task kept whole (density 1) has threshold 0: every entry is kept
        results = [(0.0, l1[t]) if densities[t] >= 1 else r for t, r in enumerate(results)]
        return TrimStats(density, scope, n, task_ks[0] if len(ks) == 1 else None,
                         tuple(r[0] for r in results), tuple(l1), tuple(r[1] for r in results))
    # Per-tensor trim: a tensor's threshold needs all of it, so blocked tensors use the
    # streaming select over their blocks (thresholds kept for the merge), the others a k-th value.
    whole = [u for u in merged if u.rows is None]
    for u, base, experts in _bar(inputs.stream(whole), progress, "trim stats", whole):
        for t, mags in inputs.task_magnitudes(base, experts):
            l1 = float(mags.sum(dtype=torch.float64))
            total[t] += l1
            if densities[t] >= 1 or mags.numel() == 0:
                kept[t] += l1
            else:
                h = kth_largest(mags, keep_count(densities[t], u.plan.meta.numel))
                kept[t] += float(mags[mags >= h].sum(dtype=torch.float64))
    for name, group in _by_tensor([u for u in merged if u.rows is not None]):
        hs, tot, kep = _blocked_tensor_trim(group, inputs, densities)
        if hs is not None and block_thresholds is not None:
            block_thresholds[name] = hs
        for t in range(n_tasks):
            total[t] += tot[t]
            kept[t] += kep[t]
    return TrimStats(density, scope, n, None, None, tuple(total), tuple(kept))


def select_over(units: Sequence[Unit], inputs: _Inputs, ks: Sequence[int], *,
                progress: bool = False, desc: tuple[str, str] = ("", "")
                ) -> tuple[list[float], list[list[tuple[float, float]]]]:
    """Each task's ‖τt‖₁ over ``units`` and, for every k in ``ks``, its exact k-th largest |τt|
    and the L1 mass at or above it: one histogram pass, then one pass refining every k.

    A sample of about 1/32 of the rows, read first, tells which coarse bins the k-th values are
    likely in; the histogram pass keeps those at full resolution, so the refining pass (a second
    read of every input) only runs for a task whose k-th value fell outside them."""
    coarse = [MagnitudeSelect(inputs.device) for _ in inputs.experts]
    if ks:
        for select, band in zip(coarse, _sample_bands(units, inputs, ks), strict=True):
            if band is not None:
                select.set_band(*band)
    for _, base, experts in _bar(inputs.stream(units), progress and bool(desc[0]), desc[0],
                                 units):
        for t, mags in inputs.task_magnitudes(base, experts):
            coarse[t].add(mags)
    forks = [[s.fork(k) for s in coarse] for k in ks]
    pending = [t for t in range(len(coarse)) if any(per_k[t].needs_refine for per_k in forks)]
    if pending:
        log.debug("trim stats: a second pass for tasks %s (k-th value outside the sampled band)",
                  pending)
        for _, base, experts in _bar(inputs.stream(units), progress and bool(desc[1]), desc[1],
                                     units):
            for t, mags in inputs.task_magnitudes(base, experts):
                for per_k in forks:
                    per_k[t].refine(mags)
    return [s.total_l1 for s in coarse], [[f.result() for f in per_k] for per_k in forks]


#: Rows sampled to guess the trim thresholds' coarse bins: 1/_SAMPLE_EVERY of each tensor's rows,
#: in _SAMPLE_BLOCKS evenly spaced runs (whole tensors below _SAMPLE_MIN entries).
_SAMPLE_EVERY, _SAMPLE_BLOCKS, _SAMPLE_MIN = 32, 4, 1 << 16


def _sample_units(units: Sequence[Unit]) -> list[Unit]:
    out = []
    for u in units:
        numel = _numel(u)
        if numel < _SAMPLE_MIN or len(u.plan.meta.shape) < 2:
            out.append(u)
            continue
        start, stop = u.rows if u.rows is not None else (0, u.plan.meta.shape[u.plan.neuron_axis])
        run = max(1, (stop - start) // (_SAMPLE_EVERY * _SAMPLE_BLOCKS))
        step = (stop - start) // _SAMPLE_BLOCKS
        out.extend(replace(u, rows=(start + i * step, start + i * step + run))
                   for i in range(_SAMPLE_BLOCKS))
    return out


def _sample_bands(units: Sequence[Unit], inputs: _Inputs, ks: Sequence[int]
                  ) -> list[tuple[int, int] | None]:
    """Per task, the coarse bins (lo, hi) that likely hold every k-th largest |τt|."""
    samples = [MagnitudeSelect(inputs.device, track_l1=False) for _ in inputs.experts]
    # Over one held tensor (its own trim) the sample is sliced from the inputs in memory; over
    # the whole model it is read from the files, so held tensors are not read in full for it.
    one_tensor = len({u.plan.name for u in units}) == 1
    for _, base, experts in inputs.stream(_sample_units(units), hold=one_tensor):
        for t, mags in inputs.task_magnitudes(base, experts):
            samples[t].add(mags)
    n = sum(_numel(u) for u in units)
    bands: list[tuple[int, int] | None] = []
    for sample in samples:
        per_k = [band_from(sample, k, n, max_band=inputs.band) for k in ks]
        lo, hi = min(b[0] for b in per_k), max(b[1] for b in per_k)
        bands.append((lo, hi) if hi - lo < inputs.band else per_k[0])
    return bands


def _blocked_tensor_trim(group: Sequence[Unit], inputs: _Inputs,
                         density: float | Sequence[float]
                         ) -> tuple[tuple[float, ...] | None, list[float], list[float]]:
    """Per-task threshold and L1 masses of one tensor's own trim, over its row blocks."""
    densities = per_task(density, len(inputs.experts))
    if all(d >= 1 for d in densities):
        totals = select_over(group, inputs, [])[0]
        return None, totals, list(totals)
    task_ks = [keep_count(d, group[0].plan.meta.numel) for d in densities]
    ks = sorted(set(task_ks))
    totals, per_k = select_over(group, inputs, ks)
    results = [(0.0, totals[t]) if densities[t] >= 1 else per_k[ks.index(k)][t]
               for t, k in enumerate(task_ks)]
    return tuple(r[0] for r in results), totals, [r[1] for r in results]


def _numel(u: Unit) -> int:
    if u.rows is None:
        return u.plan.meta.numel
    return (u.rows[1] - u.rows[0]) * (u.plan.meta.numel // u.plan.meta.shape[u.plan.neuron_axis])


def _by_tensor(units: Sequence[Unit]) -> Iterator[tuple[str, list[Unit]]]:
    group: list[Unit] = []
    for u in units:
        if group and u.plan.name != group[0].plan.name:
            yield group[0].plan.name, group
            group = []
        group.append(u)
    if group:
        yield group[0].plan.name, group


def _bar(items: Any, progress: bool, desc: str, sized: Sequence[Any] | None = None) -> Any:
    return tqdm(items, desc=desc, unit="tensor", disable=not progress, leave=False,
                dynamic_ncols=True, total=len(sized) if sized is not None else None)


def model_seeds(params: Mapping[str, Any], keys: Sequence[str],
                per_model: Sequence[Mapping[str, Any]] | None = None) -> tuple[int, ...] | None:
    """Per-model seeds: an explicit per-model ``seed`` or one derived from the global seed and
    the model's identity (its path), so listing models in another order changes nothing."""
    if "seed" not in params:
        return None
    per_model = per_model or [{} for _ in keys]
    return tuple(int(pm["seed"]) if "seed" in pm else derive_seed(params["seed"], key)
                 for key, pm in zip(keys, per_model, strict=True))


def model_values(method: MergeMethod, params: Mapping[str, Any], n_models: int,
                 per_model: Sequence[Mapping[str, Any]] | None = None
                 ) -> dict[str, tuple[Any, ...]]:
    """{parameter: one value per model} for the method's per-model parameters that some model
    sets (the global value for the others); ``seed`` is handled by :func:`model_seeds`."""
    per_model = per_model or [{} for _ in range(n_models)]
    if len(per_model) != n_models:
        raise ConfigError(f"{len(per_model)} per-model parameter sets for {n_models} models")
    out: dict[str, tuple[Any, ...]] = {}
    for key in method.per_model_params:
        if key == "seed" or not any(key in pm for pm in per_model):
            continue
        checked = [method.validate({key: pm[key]}, where=f"models[{i}].parameters")[key]
                   if key in pm else params[key] for i, pm in enumerate(per_model)]
        out[key] = tuple(checked)
    return out


def run(base: CheckpointReader, experts: Sequence[CheckpointReader], method: MergeMethod,
        params: Mapping[str, Any], sink_factory: Callable[[list[TensorPlan]], TensorSink], *,
        model_keys: Sequence[str], per_model: Sequence[Mapping[str, Any]] | None = None,
        tensor_class: Mapping[str, Kind] | None = None, missing_tensors: str = "error",
        dtype: str | torch.dtype = "float32", out_dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu", progress: bool = True,
        memory_limit: int | None = None, read_ahead: bool = True,
        architecture: Architecture = UNKNOWN,
        neuron_axes: Mapping[str, int] | None = None,
        statistics: Sequence[CheckpointReader] | None = None) -> MergeResult:
    """Merge ``experts`` into ``base`` with ``method`` (``params`` already validated).

    ``statistics``: one reader per expert of the data statistics a method declared with
    ``needs`` reads (``neuromerge.statistics``), tensor names as in the checkpoints.

    ``model_keys`` name the experts in logs and results and identify them for per-model
    random streams (DARE), so the order of the experts does not matter. ``memory_limit`` (bytes,
    the whole process) bounds the tensors in flight: a tensor that does not fit is merged in row
    blocks, with the same result. Without it, tensors are split only beyond half the memory
    available at the start. ``architecture`` (the base's config) and ``neuron_axes`` (glob →
    axis overrides) decide each tensor's neuron axis and which tensors are tied copies."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    cdtype = compute_dtype(dtype)
    odtype = NAME_TO_TORCH[out_dtype] if isinstance(out_dtype, str) else out_dtype
    tied = tied_copies(base, experts, architecture)
    plan = build_plan(base, experts, tensor_class=tensor_class, missing_tensors=missing_tensors,
                      out_dtype=odtype, architecture=architecture, neuron_axes=neuron_axes,
                      omit=tied)
    _log_layout(plan, architecture, tied, neuron_axes or {})
    if method.needs is not None and statistics is None:
        raise ConfigError(f"{method.name} needs per-model {method.needs} statistics "
                          f"(models[i].statistics; see `neuromerge statistics --help`)")
    if statistics is not None and len(statistics) != len(experts):
        raise ConfigError(f"{len(statistics)} statistics files for {len(experts)} models")
    budget = memory_budget(memory_limit)
    band = MAX_BAND
    limited = memory_limit is not None  # memory first: trim the heap after every tensor
    if not limited:
        _return_freed_tensors_to_the_os()
    else:
        if method.trims:
            # the trim selects' histograms sit beside the tensors in flight: a quarter of the
            # budget at most (a narrower band: a second statistics pass where it misses)
            band = max(1, min(MAX_BAND, budget // (4 * select_bytes(len(experts), 1))))
            budget = max(budget - select_bytes(len(experts), band), 1 << 20)
        _return_freed_tensors_to_the_os(min(32 << 20, max(128 << 10, budget // 32)))
    # a Fisher adds one value per entry and model, as stored and in the compute dtype
    stat_bytes = (len(experts) * (4 + cdtype.itemsize) if method.needs == "fisher" else 0)
    units, held = plan_units(plan, base, experts, budget, cdtype,
                             COMPUTE_BLOCK_ENTRIES if method.row_local else None,
                             extra_per_entry=stat_bytes)
    blocked = {name: len(g) for name, g in _by_tensor(units)
               if g[0].rows is not None and name not in held}
    if blocked and not method.row_local:
        name = next(iter(blocked))
        raise ConfigError(f"tensor {name!r} does not fit the memory budget "
                          f"({_gb(budget)} for tensors in flight) and {method.name} needs whole "
                          f"tensors (it is not row-local): raise --memory-limit")
    if blocked:
        log.info("%d tensor%s too large for the memory budget (%s) merged in row blocks: %s",
                 len(blocked), "" if len(blocked) == 1 else "s", _gb(budget),
                 ", ".join(f"{n} ({k} blocks)" for n, k in list(blocked.items())[:3]))
    inputs = _Inputs(base, experts, dev, cdtype, read_ahead=read_ahead)
    inputs.held, inputs.band = held, band
    data_stats = (None if method.needs is None or statistics is None else
                  _Statistics(method.needs, statistics, plan, method.name, dev, cdtype))
    stats = None
    seconds: dict[str, float] = {}
    block_thresholds: dict[str, tuple[float, ...]] = {}
    values = model_values(method, params, len(experts), per_model)
    density = values.get("density", params.get("density", 1.0))
    if method.wants_stats(params, values.get("density")):
        t1 = time.perf_counter()
        stats = compute_trim_stats(units, inputs, density=density,
                                   scope=params["trim_scope"], progress=progress,
                                   block_thresholds=block_thresholds)
        seconds["stats"] = time.perf_counter() - t1
        _trim_heap(limited)  # the selects' histograms
    resolved = method.resolved(dict(params), stats)
    seeds = model_seeds(resolved, model_keys, per_model)
    thresholds = stats.thresholds if (stats and params.get("trim_scope") == "global") else None
    _log_resolved(method, resolved, stats, plan)

    def merge_unit(u: Unit, b: torch.Tensor, exs: list[torch.Tensor],
                   **ctx_fields: Any) -> torch.Tensor:
        ctx = TensorContext(name=u.plan.name, kind=u.plan.kind, model_seeds=seeds,  # type: ignore[arg-type]
                            row_offset=u.rows[0] if u.rows else 0, model_params=values or None,
                            statistics=data_stats.read(u) if data_stats else None,
                            **ctx_fields)
        return method.merge_tensor(inputs.to_compute(b), [e.to(dev) for e in exs], ctx,
                                   resolved)

    sink = sink_factory(plan)
    t2 = time.perf_counter()
    bar = tqdm(total=sum(p.meta.nbytes for p in plan), desc=f"merge ({method.name})", unit="B",
               unit_scale=True, disable=not progress, dynamic_ncols=True)
    groups = {name: g for name, g in _by_tensor(units) if g[0].rows is not None}
    inputs.release()  # what the statistics passes held
    fields: dict[str, Any] = {}
    with bar:
        # one stream over every unit, so the next tensor is read while this one is merged even
        # across tensors merged in row blocks
        for u, b, exs in inputs.stream(units):
            p = u.plan
            bar.set_postfix_str(p.name[-40:], refresh=False)
            if p.kind == "copy":
                out = b
            else:
                group = groups.get(p.name)
                if group is None:
                    fields = {"thresholds": thresholds}
                elif u is group[0]:
                    fields = _prepare_blocks(group, inputs, method, density, thresholds,
                                             block_thresholds, merge_unit)
                    _trim_heap(limited)
                out = merge_unit(u, b, exs, **fields).to(p.out_dtype)
                if not all_finite(out):
                    raise InputError(f"tensor {p.name!r}: the merged values are not finite "
                                     f"in {dtype_name(p.out_dtype)} (overflow? lower the "
                                     f"scale or use a wider out_dtype)")
            if p.meta.dtype.is_floating_point and out.dtype != p.out_dtype:
                out = out.to(p.out_dtype)
            out = from_neurons(out.cpu(), p.neuron_axis)
            if u.rows is None:
                sink.write(p.name, out)
            elif p.neuron_axis == 0:  # sinks written before neuron axes take no axis
                sink.write(p.name, out, u.rows[0])
            else:
                sink.write(p.name, out, u.rows[0], axis=p.neuron_axis)
            bar.update(_numel(u) * p.meta.dtype.itemsize)
            last_block = p.name in groups and u is groups[p.name][-1]
            if last_block:
                inputs.release(p.name)
            del out, b, exs
            if u.rows is None or last_block:
                _trim_heap(limited)
    seconds["merge"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - t0
    counts = {k: sum(1 for p in plan if p.kind == k) for k in ("neuronal", "point", "copy")}
    return MergeResult(method=method.name, params=resolved, stats=stats, counts=counts,
                       seconds=seconds, model_names=list(model_keys),
                       bytes_read=inputs.bytes_read,
                       extra={"copied": {p.name: p.reason for p in plan if p.kind == "copy"},
                              "row_blocks": blocked, "memory_budget": budget,
                              "compute_blocks": {name: len(g) for name, g in _by_tensor(units)
                                                 if name in held},
                              "architecture": architecture.record(),
                              "neuron_axes": {p.name: p.neuron_axis for p in plan
                                              if p.neuron_axis != 0},
                              "tied": tied})


def _prepare_blocks(segment: Sequence[Unit], inputs: _Inputs, method: MergeMethod,
                    density: float | Sequence[float], thresholds: tuple[float, ...] | None,
                    block_thresholds: dict[str, tuple[float, ...]],
                    merge_unit: Callable[..., torch.Tensor]) -> dict[str, Any]:
    """What a tensor merged in row blocks needs from all of it: its own trim thresholds (per-
    tensor trim) and the tensor-wide sums the method's tie-breaks read, collected by running the
    method over the blocks, each run stopped once it has given its sums (no pass at all when the
    first block asks for none)."""
    name = segment[0].plan.name
    if thresholds is None and method.trims and min(per_task(density, len(inputs.experts))) < 1:
        if name not in block_thresholds:
            hs = _blocked_tensor_trim(segment, inputs, density)[0]
            if hs is not None:
                block_thresholds[name] = hs
        thresholds = block_thresholds.get(name)
    collector = SumCollector()
    for i, (u, b, exs) in enumerate(inputs.stream(segment)):
        collector.calls = 0
        try:
            merge_unit(u, b, exs, thresholds=thresholds, collect=collector)
        except SumsCollected:
            continue
        if i == 0:
            if collector.calls == 0:
                break
            collector.stop_after = collector.calls
    return {"thresholds": thresholds, "sums": collector.values or None}


#: Memory held outside the tensors in flight: the writer, headers, allocator slack, threads.
RESERVE_BYTES = 96 << 20


def memory_budget(limit: int | None) -> int:
    """Bytes the tensors in flight may use: ``limit`` minus what the process already holds and a
    reserve; without a limit, half the memory available now (no bound where that is unknown)."""
    rss = _proc_kib("/proc/self/status", "VmRSS") * 1024
    if limit is None:
        avail = _proc_kib("/proc/meminfo", "MemAvailable") * 1024
        return max(avail // 2, 1 << 28) if avail else sys.maxsize
    budget = limit - rss - RESERVE_BYTES
    if budget < 16 << 20:
        raise ConfigError(f"--memory-limit {_gb(limit)} is too low: the process already uses "
                          f"{_gb(rss)} and needs about {_gb(rss + RESERVE_BYTES + (16 << 20))} "
                          f"at least")
    return budget


#: Entries of a tensor merged at a time when its inputs fit the budget but the methods' working
#: copies (task vectors, masks, per-neuron parts: tens of bytes per entry) would dwarf them: an
#: embedding or LM head is then merged in row blocks from inputs read once and held as stored.
COMPUTE_BLOCK_ENTRIES = 1 << 21


def plan_units(plan: Sequence[TensorPlan], base: CheckpointReader,
               experts: Sequence[CheckpointReader], budget: int,
               cdtype: torch.dtype, compute_block: int | None = None,
               extra_per_entry: int = 0) -> tuple[list[Unit], set[str]]:
    """Each tensor whole, or in row blocks where its working set exceeds ``budget``; with
    ``compute_block`` (row-local methods), tensors of more entries are also merged in row blocks,
    read whole once (the returned names: held as stored while their blocks are merged).
    ``extra_per_entry``: bytes per entry a method's statistics add to merged tensors."""
    units: list[Unit] = []
    held: set[str] = set()
    for p in plan:
        if p.kind == "copy":
            itemsize, n_exp = p.meta.dtype.itemsize, 0
        else:
            itemsize = max([p.meta.dtype.itemsize] +
                           [ex.meta(p.name).dtype.itemsize for ex in experts])
            n_exp = len(experts)
        per_entry = bytes_per_entry(n_exp, itemsize, cdtype) + (extra_per_entry if n_exp else 0)
        rows = split_rows(p.meta, max(1, budget // per_entry), p.neuron_axis)
        # inputs as stored (this tensor's and the next one's) plus one block's working set
        stored = 2 * (n_exp + 1) * itemsize * p.meta.numel
        if (rows == [None] and compute_block and p.kind != "copy"
                and stored + per_entry * compute_block <= budget):
            rows = split_rows(p.meta, compute_block, p.neuron_axis)
            if rows != [None]:
                held.add(p.name)
        units.extend(Unit(p, r) for r in rows)
    return units, held


def _proc_kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def _log_resolved(method: MergeMethod, params: Mapping[str, Any], stats: TrimStats | None,
                  plan: Sequence[TensorPlan]) -> None:
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
    counts = {k: sum(1 for p in plan if p.kind == k) for k in ("neuronal", "point", "copy")}
    log.info("method %s: %s", method.name, shown)
    log.info("tensors: %d neuronal, %d point, %d copied from the base",
             counts["neuronal"], counts["point"], counts["copy"])
    if stats is not None:
        sig = ", ".join(f"{s:.4f}" for s in stats.sigma)
        log.info("trim (%s, density %s): σ per task = [%s]", stats.scope, stats.density, sig)
        if "lambda2" in params:
            log.info("lambda2 resolved to %.6g (= 1/(1 - max σ))", params["lambda2"])


def _log_layout(plan: Sequence[TensorPlan], arch: Architecture, tied: Mapping[str, str],
                overrides: Mapping[str, int]) -> None:
    """The architecture, the tensors whose neurons are not rows, and the tied copies left out;
    a warning where a GPT-2-style Conv1D name is merged row-wise for lack of a config.json."""
    cols = [p for p in plan if p.neuron_axis != 0]
    log.info("architecture: %s; %d tensor%s with another neuron axis than rows%s",
             arch.describe(), len(cols), "" if len(cols) == 1 else "s",
             "".join(f"{', ' if i else ': '}{p.name} (axis {p.neuron_axis}, {p.axis_reason})"
                     for i, p in enumerate(cols[:2])) + (", ..." if len(cols) > 2 else ""))
    for copy, kept in tied.items():
        log.info("%s is tied to %s (equal in every model): merged once, left out of the output "
                 "as save_pretrained does", copy, kept)
    if not arch.source and not overrides:
        name = suspicious_without_config([p.name for p in plan if p.kind == "neuronal"])
        if name:
            log.warning("no config.json: %r is merged with its rows as neurons; if it is a "
                        "GPT-2-style Conv1D weight (in, out), its neurons are columns: set "
                        "neuron_axis: {'*.c_fc.weight': 1, ...} in the config", name)


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def merge_state_dicts(
    base: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]] | Mapping[str, Mapping[str, torch.Tensor]],
    method: str | MergeMethod = "neuromerging",
    params: Mapping[str, Any] | None = None, *,
    tensor_class: Mapping[str, Kind] | None = None, missing_tensors: str = "error",
    dtype: str = "float32", out_dtype: str | None = None, device: str = "cpu",
    progress: bool = False, per_model: Sequence[Mapping[str, Any]] | None = None,
    memory_limit: int | None = None, config: Mapping[str, Any] | None = None,
    neuron_axis: Mapping[str, int] | None = None,
    statistics: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> MergeResult:
    """Merge in-memory state dicts with the same engine as ``neuromerge merge`` (global trim and
    ``lambda2: auto`` included). ``experts`` may be a list or a {name: state_dict} mapping (the
    names identify models for per-model seeds). The merged tensors are in ``.state_dict``.
    ``config`` (``model.config.to_dict()`` or a config.json's content) gives the architecture
    (GPT-2's Conv1D weights have their neurons as columns); ``neuron_axis`` maps name globs to
    axes, as the YAML key of that name. ``statistics``: per expert (same order), the
    {tensor name: statistic} a method declared with ``needs`` reads (Fisher, RegMean Grams)."""
    m = method if isinstance(method, MergeMethod) else get_method(method)
    full = m.validate(params)
    if isinstance(experts, Mapping):
        keys, sds = list(experts), list(experts.values())
    else:
        keys, sds = [str(i) for i in range(len(experts))], list(experts)
    if not sds:
        raise ConfigError("no expert models to merge")
    if statistics is not None and len(statistics) != len(sds):
        raise ConfigError(f"{len(statistics)} statistics for {len(sds)} models")
    sinks: list[DictSink] = []

    def sink_factory(plan: list[TensorPlan]) -> DictSink:
        sinks.append(DictSink(plan))
        return sinks[0]

    result = run(StateDictReader(base, "base"), [StateDictReader(sd, k) for k, sd in
                                                 zip(keys, sds, strict=True)],
                 m, full, sink_factory, model_keys=keys, per_model=per_model,
                 tensor_class=tensor_class, missing_tensors=missing_tensors, dtype=dtype,
                 out_dtype=out_dtype, device=device, progress=progress,
                 memory_limit=memory_limit, architecture=from_config(config),
                 neuron_axes=neuron_axis,
                 statistics=None if statistics is None else
                 [StateDictReader(sd, f"statistics of {k}") for k, sd in
                  zip(keys, statistics, strict=True)])
    result.state_dict = sinks[0].state_dict
    return result
