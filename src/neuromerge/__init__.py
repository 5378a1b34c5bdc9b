"""neuromerge: training-free model merging with NeuroMerging and the standard baselines.

    >>> import neuromerge
    >>> neuromerge.merge("merge.yaml", "./merged")            # files in, HF folder out
    >>> neuromerge.merge_state_dicts(base, [sd1, sd2], "ties", {"density": 0.2})
    >>> neuromerge.methods.neuromerging(w0, [w1, w2])          # one tensor
"""

__version__ = "0.1.0"

from neuromerge import methods
from neuromerge.config import MergeConfig, load_config
from neuromerge.engine import MergeResult, merge_state_dicts
from neuromerge.errors import NeuromergeError
from neuromerge.pipeline import merge
from neuromerge.registry import TensorContext, all_methods, get_method, merge_method

__all__ = [
    "MergeConfig",
    "MergeResult",
    "NeuromergeError",
    "TensorContext",
    "__version__",
    "all_methods",
    "get_method",
    "load_config",
    "merge",
    "merge_method",
    "merge_state_dicts",
    "methods",
]
