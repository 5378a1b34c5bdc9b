"""Exact k-th largest magnitude over a whole model, streamed tensor by tensor.

A radix select over the float32 bit patterns: for non-negative floats the IEEE-754 bit pattern,
read as an integer, is ordered like the value. A first pass histograms the top 16 bits (32,768
bins for non-negative values); the bin holding the k-th largest value is then refined in a second
pass over the low 16 bits. Memory is two fixed histograms per task, independent of the model size,
and the result is the exact threshold (verified against a full sort in the tests). Each bin also
carries the L1 mass of its values, so ‖trim(τ)‖₁ comes out of the same passes.
"""

from __future__ import annotations

import torch

_COARSE_BINS = 1 << 15  # sign bit is 0 for magnitudes
_FINE_BINS = 1 << 16
_CHUNK = 1 << 22  # entries histogrammed at a time


class MagnitudeSelect:
    """Streaming exact selection of the k-th largest value among non-negative float32 values.

    Usage: ``add`` every chunk (pass 1), ``locate(k)``, ``refine`` every chunk again (pass 2),
    then read ``threshold`` and ``kept_l1`` (sum of the values ≥ threshold).
    """

    def __init__(self, device: torch.device | str = "cpu", *, track_l1: bool = True) -> None:
        self.device = torch.device(device)
        self.track_l1 = track_l1  # the L1 masses cost a float64 pass; a bare threshold skips it
        self.counts = torch.zeros(_COARSE_BINS, dtype=torch.int64, device=self.device)
        self.sums = torch.zeros(_COARSE_BINS, dtype=torch.float64, device=self.device)
        self.n = 0
        self._bin: int | None = None
        self._rank_in_bin = 0
        self._fine_counts: torch.Tensor | None = None
        self._fine_sums: torch.Tensor | None = None
        self._above_l1 = 0.0

    def add(self, mags: torch.Tensor) -> None:
        flat = mags.reshape(-1).to(torch.float32)
        for chunk in flat.split(_CHUNK):  # bounded temporaries whatever the tensor size
            coarse = chunk.contiguous().view(torch.int32) >> 16
            self.counts += torch.bincount(coarse, minlength=_COARSE_BINS)
            if self.track_l1:
                self.sums += torch.bincount(coarse, weights=chunk.to(torch.float64),
                                            minlength=_COARSE_BINS)
        self.n += flat.numel()

    @property
    def total_l1(self) -> float:
        return float(self.sums.sum())

    def locate(self, k: int) -> None:
        """Find the coarse bin that holds the k-th largest value (1 ≤ k ≤ n)."""
        if not 1 <= k <= self.n:
            raise ValueError(f"k={k} outside 1..{self.n}")
        from_top = torch.flip(self.counts, [0]).cumsum(0)
        idx = int(torch.searchsorted(from_top, torch.tensor([k], device=self.device)))
        self._bin = _COARSE_BINS - 1 - idx
        above = int(from_top[idx - 1]) if idx > 0 else 0
        self._rank_in_bin = k - above  # rank of the target inside its bin, from the top
        self._above_l1 = float(self.sums[self._bin + 1:].sum())
        self._fine_counts = torch.zeros(_FINE_BINS, dtype=torch.int64, device=self.device)
        self._fine_sums = torch.zeros(_FINE_BINS, dtype=torch.float64, device=self.device)

    def fork(self, k: int) -> MagnitudeSelect:
        """A select located at ``k`` that shares this one's first-pass histograms (read-only from
        here on), so several k are refined in one second pass."""
        f = MagnitudeSelect(self.device, track_l1=self.track_l1)
        f.counts, f.sums, f.n = self.counts, self.sums, self.n
        f.locate(k)
        return f

    def refine(self, mags: torch.Tensor) -> None:
        assert self._fine_counts is not None and self._fine_sums is not None, "call locate first"
        flat = mags.reshape(-1).to(torch.float32)
        for chunk in flat.split(_CHUNK):
            bits = chunk.contiguous().view(torch.int32)
            sel = (bits >> 16) == self._bin
            if not bool(sel.any()):
                continue
            low = bits[sel] & 0xFFFF
            self._fine_counts += torch.bincount(low, minlength=_FINE_BINS)
            if self.track_l1:
                self._fine_sums += torch.bincount(low, weights=chunk[sel].to(torch.float64),
                                                  minlength=_FINE_BINS)

    def result(self) -> tuple[float, float]:
        """(threshold, kept_l1): the exact k-th largest value and the sum of all values ≥ it."""
        assert self._fine_counts is not None and self._fine_sums is not None, "call locate first"
        from_top = torch.flip(self._fine_counts, [0]).cumsum(0)
        idx = int(torch.searchsorted(from_top, torch.tensor([self._rank_in_bin],
                                                            device=self.device)))
        low = _FINE_BINS - 1 - idx
        bits = torch.tensor([(self._bin << 16) | low], dtype=torch.int32)
        threshold = float(bits.view(torch.float32))
        kept = self._above_l1 + float(self._fine_sums[low:].sum())
        return threshold, kept
