"""``neuromerge bench``: real text-classification tasks from data in registry packages, experts
fine-tuned on them, merged and scored.

Modules: ``data/`` (the tasks: catalogue, readers, download cache, cleaning, splits), ``models``
(the pretrained base), ``train`` (fine-tuning, probes), ``experts`` (the cached experts and their
data statistics), ``accuracy`` (scoring a body with task heads), ``profiles`` (what a run covers,
the tuned grids), ``results`` (the evaluation records), ``benchmark`` (the main run) and
``benchmark_report``, ``ablation_plans`` (the ablations' grids and settings), ``ablations`` (their
run) and ``ablations_report``.

The entry points are exported here and imported on first use, so that importing the data layer
(``neuromerge.bench.data``) does not import the whole benchmark::

    >>> from neuromerge.bench import run_benchmark, run_ablations, PLANS, ablation_names
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neuromerge.bench.ablation_plans import PLANS, ablation_names
    from neuromerge.bench.ablations import run_ablations
    from neuromerge.bench.benchmark import run_benchmark

__all__ = ["PLANS", "ablation_names", "run_ablations", "run_benchmark"]


def __getattr__(name: str) -> Any:
    if name == "run_benchmark":
        from neuromerge.bench.benchmark import run_benchmark

        return run_benchmark
    if name == "run_ablations":
        from neuromerge.bench.ablations import run_ablations

        return run_ablations
    if name in ("PLANS", "ablation_names"):
        from neuromerge.bench import ablation_plans

        return getattr(ablation_plans, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
