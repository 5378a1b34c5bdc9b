"""Built-in merge methods. Importing this package registers them; each module is one method
(or one family) written as pure functions of tensors."""

from neuromerge.methods.arcee_fusion import arcee_fusion
from neuromerge.methods.average import average
from neuromerge.methods.breadcrumbs import breadcrumbs, breadcrumbs_ties
from neuromerge.methods.consensus import consensus_ta, consensus_ties
from neuromerge.methods.dare import dare_linear, dare_ties
from neuromerge.methods.della import della, della_linear
from neuromerge.methods.fisher import fisher
from neuromerge.methods.karcher import karcher
from neuromerge.methods.model_stock import model_stock
from neuromerge.methods.multislerp import multislerp
from neuromerge.methods.nearswap import nearswap
from neuromerge.methods.neuromerging import dare_neuromerging, neuromerging
from neuromerge.methods.nuslerp import nuslerp
from neuromerge.methods.passthrough import passthrough
from neuromerge.methods.pcb import pcb
from neuromerge.methods.regmean import regmean
from neuromerge.methods.sce import sce
from neuromerge.methods.slerp import slerp
from neuromerge.methods.svd import iso_c, iso_cts, tsv_m
from neuromerge.methods.task_arithmetic import linear, task_arithmetic
from neuromerge.methods.ties import ties

__all__ = ["average", "breadcrumbs", "consensus_ta", "consensus_ties", "dare_linear",
           "dare_neuromerging", "dare_ties", "fisher", "iso_c", "iso_cts", "linear", "neuromerging",
           "pcb", "regmean", "task_arithmetic", "ties", "tsv_m"]
__all__ += ["breadcrumbs_ties", "della", "della_linear", "model_stock", "sce"]
__all__ += ["arcee_fusion", "karcher", "multislerp", "nearswap", "nuslerp", "passthrough",
            "slerp"]
