"""``neuromerge analyze``: where experts' task vectors lie with respect to the pretrained neurons
(parallel vs orthogonal energy, the rescaling coefficients c) and where tasks interfere (sign
conflicts element-wise and in NeuroMerging's per-neuron SVD frame, cosine similarities), per
tensor, layer and module type, plus the global trim's σ and the λ2 = auto it implies.

    >>> from neuromerge.analysis import analyze
    >>> a = analyze("./base", ["./expert-a", "./expert-b"], "analysis-report")
    >>> a.summary["overall"]["energy"]["orthogonal_share"]      # one share per task

Modules: ``measures`` (per-tensor sums and the ratios taken from them: pure tensor functions),
``layout`` (tensor name → layer, module type), ``scan`` (the streaming passes: ``analyze``),
``result`` (``Analysis``, what it returns), ``analysis_report`` (markdown, JSON, CSV) and
``plots`` (PNG).
"""

from neuromerge.analysis.layout import MODULES, NO_LAYER, Layout, locate, module_type
from neuromerge.analysis.result import Analysis
from neuromerge.analysis.scan import (
    DEFAULT_CONFLICT_DENSITY,
    DEFAULT_DENSITIES,
    analyze,
    analyze_readers,
    trim_statistics,
)

__all__ = [
    "DEFAULT_CONFLICT_DENSITY",
    "DEFAULT_DENSITIES",
    "MODULES",
    "NO_LAYER",
    "Analysis",
    "Layout",
    "analyze",
    "analyze_readers",
    "locate",
    "module_type",
    "trim_statistics",
]
