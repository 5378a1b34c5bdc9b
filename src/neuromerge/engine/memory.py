"""How much memory a merge may use, and keeping the process's footprint to it: one
:class:`MemoryPolicy` per run (budget for the tensors in flight, the trim selects' band, glibc
heap tuning)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

from neuromerge.errors import ConfigError
from neuromerge.thresholds import MAX_BAND, select_bytes

#: Memory held outside the tensors in flight: the writer, headers, allocator slack, threads.
RESERVE_BYTES = 96 << 20

#: Free heap left in place for the next tensor's buffers: reused without page faults, where
#: trimming after every tensor cost ~10% of a TIES merge's CPU time (measured: 21.0-23.4 s vs
#: 17.6-20.0 s of CPU on the 117M perf model). Beyond it, or under a memory limit, it is trimmed.
HEAP_SLACK = 128 << 20


@dataclass(frozen=True)
class MemoryPolicy:
    """``budget``: bytes the tensors in flight may use; ``band``: coarse bins the trim selects
    keep at full resolution per task (narrower under a tight limit); ``limited``: the run is under
    a memory limit, so memory comes first (the heap is trimmed after every tensor, and freed
    buffers go back to the OS at once)."""

    budget: int
    band: int = MAX_BAND
    limited: bool = False
    mmap_threshold: int = 32 << 20

    @classmethod
    def decide(cls, limit: int | None, *, trims: bool, n_experts: int) -> MemoryPolicy:
        """The policy for a run under ``limit`` (bytes, the whole process; None: no limit) of a
        method that trims (``trims``: its selects' histograms sit beside the tensors)."""
        budget = memory_budget(limit)
        if limit is None:
            return cls(budget)
        band = MAX_BAND
        if trims:
            # a quarter of the budget at most (a narrower band: a second pass where it misses)
            band = max(1, min(MAX_BAND, budget // (4 * select_bytes(n_experts, 1))))
            budget = max(budget - select_bytes(n_experts, band), 1 << 20)
        return cls(budget, band, True, min(32 << 20, max(128 << 10, budget // 32)))

    def tune_heap(self) -> None:
        """glibc raises its mmap threshold (up to 32 MB) after each large free; tensor-sized
        blocks then come from the heap, and freed ones stay in the process. A fixed threshold
        stops that drift: buffers up to 32 MB (row blocks' working copies) come from the heap and
        are reused from block to block without page faults (measured: 4x less CPU on 2M-entry
        blocks than with a 1 MiB threshold), larger ones are mmapped and returned when freed, and
        :meth:`trim_heap` after each tensor gives the heap's free pages back, so peak RSS tracks
        the tensors in flight. Under a memory limit the threshold is lower (a fraction of the
        budget): every block's buffers are then returned the moment they are freed, at the cost
        of page faults. Set by every run: the setting is the process's, and the previous run may
        have had another limit."""
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                _libc().mallopt(-3, self.mmap_threshold)  # M_MMAP_THRESHOLD

    def trim_heap(self) -> None:
        """Return the heap's free pages to the OS (glibc ``malloc_trim``) once more than
        ``HEAP_SLACK`` of it is free (under a limit: whatever is free): buffers under the mmap
        threshold are reused within a tensor's row blocks and across tensors, and do not pile
        up."""
        trim_heap(always=self.limited)


def trim_heap(always: bool = False) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            info = None if always else _mallinfo2()
            if info is not None and info().fordblks < HEAP_SLACK:
                return
            _libc().malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6")  # once: the heap is trimmed after every tensor


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    info = getattr(_libc(), "mallinfo2", None)  # glibc >= 2.33
    if info is not None:
        info.restype = _MallInfo2
    return info


def memory_budget(limit: int | None) -> int:
    """Bytes the tensors in flight may use: ``limit`` minus what the process already holds and a
    reserve; without a limit, half the memory available now (no bound where that is unknown)."""
    rss = _proc_kib("/proc/self/status", "VmRSS") * 1024
    if limit is None:
        avail = _proc_kib("/proc/meminfo", "MemAvailable") * 1024
        return max(avail // 2, 1 << 28) if avail else sys.maxsize
    budget = limit - rss - RESERVE_BYTES
    if budget < 16 << 20:
        raise ConfigError(f"--memory-limit {format_bytes(limit)} is too low: the process already "
                          f"uses {format_bytes(rss)} and needs about "
                          f"{format_bytes(rss + RESERVE_BYTES + (16 << 20))} at least")
    return budget


def _proc_kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def format_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"
