"""The streaming radix select gives the exact k-th largest magnitude, checked by a full sort."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from neuromerge.kernels import kth_largest
from neuromerge.thresholds import (
    BAND_BIN_BYTES,
    MAX_BAND,
    MagnitudeSelect,
    band_from,
    select_bytes,
)


def select(chunks: list[torch.Tensor], k: int) -> tuple[float, float, float]:
    s = MagnitudeSelect()
    for c in chunks:
        s.add(c)
    s.locate(k)
    for c in chunks:
        s.refine(c)
    h, kept = s.result()
    return h, kept, s.total_l1


def reference(chunks: list[torch.Tensor], k: int) -> tuple[float, float, float]:
    allv = np.concatenate([c.numpy().ravel() for c in chunks]).astype(np.float64)
    h = float(np.sort(allv)[::-1][k - 1])
    return h, float(allv[allv >= h].sum()), float(allv.sum())


@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=5),
    seed=st.integers(0, 2**31 - 1),
    frac=st.floats(0.0, 1.0),
    repeats=st.booleans(),
)
def test_matches_full_sort(sizes: list[int], seed: int, frac: float, repeats: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(n, generator=gen).abs() * 10 ** float(torch.randn(1, generator=gen))
              for n in sizes]
    if repeats:  # many exact ties and zeros
        chunks = [torch.round(c * 4) / 4 for c in chunks]
    n = sum(sizes)
    if n == 0:
        return
    k = max(1, min(n, int(frac * n) + 1))
    h, kept, total = select(chunks, k)
    rh, rkept, rtotal = reference(chunks, k)
    assert h == rh
    assert kept == pytest.approx(rkept, rel=1e-12, abs=1e-300)
    assert total == pytest.approx(rtotal, rel=1e-12, abs=1e-300)


def test_extreme_values_and_subnormals() -> None:
    c = torch.tensor([0.0, 1e-45, 1e-40, 3.4e38, 1.0, 1.0000001, 0.0], dtype=torch.float32)
    for k in range(1, c.numel() + 1):
        assert select([c], k)[0] == reference([c], k)[0]


def test_values_in_one_coarse_bin_are_refined_exactly() -> None:
    # 1.0 + i ulps share the top 16 bits: only the fine pass separates them
    base = torch.tensor([1.0], dtype=torch.float32).view(torch.int32)
    c = (base + torch.arange(100, dtype=torch.int32)).view(torch.float32)
    for k in (1, 17, 100):
        assert select([c[torch.randperm(100)]], k)[0] == float(c[100 - k])


def test_bad_k() -> None:
    s = MagnitudeSelect()
    s.add(torch.ones(3))
    with pytest.raises(ValueError):
        s.locate(4)
    with pytest.raises(ValueError):
        s.locate(0)


def banded(chunks: list[torch.Tensor], k: int, band: tuple[int, int]
           ) -> tuple[float, float, bool]:
    s = MagnitudeSelect()
    s.set_band(*band)
    for c in chunks:
        s.add(c)
    s.locate(k)
    used_band = not s.needs_refine
    for c in chunks:
        s.refine(c)  # a no-op when the band held the k-th value
    h, kept = s.result()
    return h, kept, used_band


@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
    frac=st.floats(0.0, 1.0),
    shift=st.integers(-20, 20),
    repeats=st.booleans(),
)
def test_band_hit_or_miss_gives_the_full_sort_answer(sizes: list[int], seed: int, frac: float,
                                                     shift: int, repeats: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(n, generator=gen).abs() for n in sizes]
    if repeats:
        chunks = [torch.round(c * 4) / 4 for c in chunks]
    n = sum(sizes)
    k = max(1, min(n, int(frac * n) + 1))
    rh, rkept, _ = reference(chunks, k)
    true_bin = int(torch.tensor([rh], dtype=torch.float32).view(torch.int32)) >> 16
    lo = true_bin + shift  # a band that may or may not hold the k-th value
    h, kept, used_band = banded(chunks, k, (lo, lo + 3))
    assert used_band == (lo <= true_bin <= lo + 3)
    assert h == rh
    assert kept == pytest.approx(rkept, rel=1e-12, abs=1e-300)


def test_band_from_a_sample_holds_the_threshold() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(1_000_000, generator=gen).abs() * torch.rand(1_000_000, generator=gen)
    sample = MagnitudeSelect(track_l1=False)
    sample.add(values[::61])
    for density in (0.01, 0.2, 0.5):
        k = int(density * values.numel())
        lo, hi = band_from(sample, k, values.numel())
        assert 0 <= hi - lo < MAX_BAND
        h = float(values.sort(descending=True).values[k - 1])
        assert lo <= int(torch.tensor([h]).view(torch.int32)) >> 16 <= hi


@pytest.mark.parametrize("max_band", [1, 2, 5])
def test_a_capped_band_is_no_wider_than_the_cap_and_centred_on_the_estimate(max_band: int
                                                                            ) -> None:
    """Under a tight memory limit the band is narrower: at most ``max_band`` bins, around the
    sample's k-th value, and the select stays exact (a miss costs a second pass only)."""
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(400_000, generator=gen).abs() * torch.rand(400_000, generator=gen)
    sample = MagnitudeSelect(track_l1=False)
    sample.add(values[::61])
    k = 80_000
    wide = band_from(sample, k, values.numel())
    lo, hi = band_from(sample, k, values.numel(), max_band=max_band)
    assert 0 <= hi - lo < max_band
    assert wide[0] - 1 <= lo and hi <= wide[1] + 1  # inside the uncapped guess
    h, kept, _ = banded([values], k, (lo, hi))
    rh, rkept, _ = reference([values], k)
    assert h == rh and kept == pytest.approx(rkept, rel=1e-12)


def test_select_bytes_covers_what_a_banded_select_allocates() -> None:
    s = MagnitudeSelect()
    s.set_band(100, 100 + 3)
    held = sum(t.numel() * t.element_size()
               for t in (s.counts, s.sums, s._band_counts, s._band_sums) if t is not None)
    assert held == 4 * BAND_BIN_BYTES + s.counts.numel() * 16
    # one select per task plus the transient histograms of one add
    assert select_bytes(3, 4) == 5 * 4 * BAND_BIN_BYTES + 3 * s.counts.numel() * 16
    assert select_bytes(3, 4) >= 3 * held


def test_kth_largest_matches_a_sort_on_large_tensors() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300_000, generator=gen).abs()
    x[:1000] = 0.5  # a heavy tie
    for k in (1, 999, 150_000, 299_000, 300_000):
        assert kth_largest(x, k) == float(x.sort(descending=True).values[k - 1])
