"""What ``neuromerge analyze`` returns: the ``Analysis`` (its summary, per-tensor rows and the
underlying sums), which the scan builds and the report writes out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuromerge.analysis.measures import CHistogram, Record


@dataclass
class Analysis:
    """What ``analyze`` found. ``summary`` is the content of ``analysis.json`` (per task, layer,
    module type and their combinations: energies, c quantiles, conflicts, cosines, σ and λ2);
    ``tensors`` one entry per merged tensor (name, kind, shape, layer, module and the same
    derived numbers); ``records`` the underlying sums per tensor; ``hist`` the c histogram."""

    summary: dict[str, Any]
    tensors: list[dict[str, Any]]
    records: dict[str, Record] = field(repr=False)
    hist: CHistogram = field(repr=False)
    output: Path | None = None

    @property
    def tasks(self) -> list[str]:
        return list(self.summary["tasks"])
