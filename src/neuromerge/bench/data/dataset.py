"""A benchmark task's examples as data: parallel lists of texts and integer labels."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Dataset:
    """Parallel lists of texts and integer labels; ``label_names[i]`` names label ``i``.

    ``info`` counts the rows each cleaning rule dropped (``load_task``) and is empty for splits.
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    name: str = ""
    info: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise ValueError(f"label {bad[0]} is outside 0..{len(self.label_names) - 1}")

    def __len__(self) -> int:
        return len(self.texts)

    def label_counts(self) -> dict[str, int]:
        """Examples per label name, in label order (zero counts included)."""
        counts = Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}
