"""Exact k-th largest magnitude over a whole model, streamed tensor by tensor.

A radix select over the float32 bit patterns: for non-negative floats the IEEE-754 bit pattern,
read as an integer, is ordered like the value. A first pass histograms the top 16 bits (32,768
bins for non-negative values); the bin holding the k-th largest value is then refined in a second
pass over the low 16 bits. Memory is two fixed histograms per task, independent of the model size,
and the result is the exact threshold (verified against a full sort in the tests). Each bin also
carries the L1 mass of its values, so ‖trim(τ)‖₁ comes out of the same passes.

The second pass re-reads every input, so when the caller can guess where the k-th value lies (from
a small sample: ``band_from``), the first pass also keeps the fine histograms of a narrow band of
coarse bins (``set_band``); when the k-th value falls inside it (``needs_refine`` is False) the
answer is exact after one pass, and otherwise the second pass runs as before.
"""

from __future__ import annotations

import torch

_COARSE_BINS = 1 << 15  # sign bit is 0 for magnitudes
_FINE_BINS = 1 << 16
_CHUNK = 1 << 20  # entries histogrammed at a time (bounds the float64 temporaries: 8 MiB)
#: Widest band of coarse bins whose fine histograms the first pass keeps (16 bytes per fine bin:
#: 1 MiB per coarse bin and task).
MAX_BAND = 16
#: Bytes per coarse bin of a band (its fine int64 counts and float64 L1 masses).
BAND_BIN_BYTES = _FINE_BINS * 16


def select_bytes(n_tasks: int, band: int) -> int:
    """Peak bytes of one select per task keeping ``band`` coarse bins at full resolution, with
    the transient histograms of one ``add`` (the memory budget plans for them)."""
    return (n_tasks + 2) * band * BAND_BIN_BYTES + n_tasks * _COARSE_BINS * 16


class MagnitudeSelect:
    """Streaming exact selection of the k-th largest value among non-negative float32 values.

    Usage: ``add`` every chunk (pass 1), ``locate(k)`` (or ``fork(k)`` for each of several k),
    ``refine`` every chunk again (pass 2, skipped where ``needs_refine`` is False), then
    ``result()``: the exact k-th largest value and the L1 mass of the values ≥ it.
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
        self._band: tuple[int, int] | None = None  # [lo, hi] coarse bins kept at full resolution
        self._band_counts: torch.Tensor | None = None
        self._band_sums: torch.Tensor | None = None
        self._from_band = False  # locate found the k-th value's bin inside the band

    def set_band(self, lo: int, hi: int) -> None:
        """Keep the fine histograms of coarse bins lo..hi during ``add`` (call before it)."""
        if self.n:
            raise RuntimeError("set_band must come before the first add")
        lo, hi = max(0, lo), min(_COARSE_BINS - 1, hi, max(0, lo) + MAX_BAND - 1)
        if hi < lo:  # a band wholly outside the bins: keep none
            return
        size = (hi - lo + 1) * _FINE_BINS
        self._band = (lo, hi)
        self._band_counts = torch.zeros(size, dtype=torch.int64, device=self.device)
        self._band_sums = (torch.zeros(size, dtype=torch.float64, device=self.device)
                           if self.track_l1 else None)

    def add(self, mags: torch.Tensor) -> None:
        flat = mags.reshape(-1).to(torch.float32)
        for chunk in flat.split(_CHUNK):  # bounded temporaries whatever the tensor size
            bits = chunk.contiguous().view(torch.int32)
            coarse = bits >> 16
            self.counts += torch.bincount(coarse, minlength=_COARSE_BINS)
            if self.track_l1:
                self.sums += torch.bincount(coarse, weights=chunk.to(torch.float64),
                                            minlength=_COARSE_BINS)
            if self._band is not None:
                self._add_band(bits, coarse, chunk)
        self.n += flat.numel()

    def _add_band(self, bits: torch.Tensor, coarse: torch.Tensor, chunk: torch.Tensor) -> None:
        assert self._band is not None and self._band_counts is not None
        lo, hi = self._band
        # one nonzero, two gathers: boolean indexing would run the nonzero once per tensor
        at = ((coarse >= lo) & (coarse <= hi)).nonzero().squeeze(1)
        if at.numel() == 0:
            return
        idx = bits.index_select(0, at) - (lo << 16)  # (coarse − lo) · 2^16 + low 16 bits
        size = self._band_counts.numel()
        weights = (chunk.index_select(0, at).to(torch.float64)
                   if self._band_sums is not None else None)
        if at.numel() * 8 < size:
            # few entries in the band: scatter them (a bincount would write all 1 MiB per bin)
            self._band_counts.index_add_(0, idx, torch.ones(1, dtype=torch.int64).expand(
                idx.numel()))
            if self._band_sums is not None:
                self._band_sums.index_add_(0, idx, weights)
            return
        self._band_counts += torch.bincount(idx, minlength=size)
        if self._band_sums is not None:
            self._band_sums += torch.bincount(idx, weights=weights, minlength=size)

    @property
    def needs_refine(self) -> bool:
        """After ``locate``: whether the second pass (``refine``) is needed."""
        return not self._from_band

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
        if self._band is not None and self._band[0] <= self._bin <= self._band[1]:
            assert self._band_counts is not None
            at = slice((self._bin - self._band[0]) * _FINE_BINS,
                       (self._bin - self._band[0] + 1) * _FINE_BINS)
            self._fine_counts = self._band_counts[at]
            self._fine_sums = (self._band_sums[at] if self._band_sums is not None
                               else torch.zeros(_FINE_BINS, dtype=torch.float64,
                                                device=self.device))
            self._from_band = True
            return
        self._from_band = False
        self._fine_counts = torch.zeros(_FINE_BINS, dtype=torch.int64, device=self.device)
        self._fine_sums = torch.zeros(_FINE_BINS, dtype=torch.float64, device=self.device)

    def fork(self, k: int) -> MagnitudeSelect:
        """A select located at ``k`` that shares this one's first-pass histograms (read-only from
        here on), so several k are refined in one second pass."""
        f = MagnitudeSelect(self.device, track_l1=self.track_l1)
        f.counts, f.sums, f.n = self.counts, self.sums, self.n
        f._band, f._band_counts, f._band_sums = self._band, self._band_counts, self._band_sums
        f.locate(k)
        return f

    def refine(self, mags: torch.Tensor) -> None:
        assert self._fine_counts is not None and self._fine_sums is not None, "call locate first"
        if self._from_band:
            return  # the first pass already holds this bin at full resolution
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


def band_from(sample: MagnitudeSelect, k: int, n: int, *, margin: float = 0.1,
              max_band: int = MAX_BAND) -> tuple[int, int]:
    """The coarse bins likely to hold the k-th largest of ``n`` values, judged from the coarse
    histogram of a sample of them: the bins between the sample's ranks k·(1 ∓ margin) (scaled to
    the sample's size, widened by three binomial standard deviations), plus one bin each side.
    A guess only: the caller checks ``needs_refine`` and falls back to the second pass.
    ``max_band`` (≤ ``MAX_BAND``) caps the width where memory is tight."""
    m = sample.n
    if m == 0 or n == 0:
        return (0, -1)
    ks = k * m / n
    spread = margin * ks + 3.0 * (ks * max(0.0, 1 - ks / m)) ** 0.5 + 1.0
    from_top = torch.flip(sample.counts, [0]).cumsum(0).to(torch.float64).cpu()

    def bin_at(rank: float) -> int:  # the coarse bin holding the sample's rank-th largest
        idx = int(torch.searchsorted(from_top, torch.tensor([rank], dtype=torch.float64)))
        return _COARSE_BINS - 1 - min(idx, _COARSE_BINS - 1)

    lo = bin_at(min(float(m), ks + spread)) - 1  # more values above: a lower bin
    hi = bin_at(max(1.0, ks - spread)) + 1
    max_band = max(1, min(max_band, MAX_BAND))
    if hi - lo + 1 > max_band:  # too spread to keep: centre on the estimate
        mid = bin_at(max(1.0, ks))
        lo = mid - max_band // 2
        hi = lo + max_band - 1
    return max(0, lo), min(_COARSE_BINS - 1, hi)
