"""The streaming engine: plan, then execute.

:func:`prepare` reads the checkpoints' headers and builds a :class:`MergeJob` whose
:class:`MergePlan` says, for every output tensor, its sources, kind, neuron axis, parameters and
units of work, and which merge-wide passes run first; ``job.execute(sink)`` runs it on this
machine, tensor by tensor, handing each result to a sink (a sharded safetensors writer, or a
:class:`DictSink`). Peak memory is the tensors of one name across the base and the experts plus
the method's working copies, never the models' total size.

Rooms: ``plan`` (the plan value, tensor classification and neuron layout), ``units`` (row
blocks), ``memory`` (the memory policy), ``inputs`` (reading and read-ahead, data statistics),
``trim_pass`` (thresholds and sums before the merge), ``prepare`` (planning), ``execute`` (the
local executor), ``result`` (results and sinks), ``in_memory`` (state dicts in memory).
"""

from neuromerge.engine.execute import MergeJob
from neuromerge.engine.in_memory import merge_state_dicts
from neuromerge.engine.plan import Kind, MergePlan, Source, TensorPlan, Unit, build_plan
from neuromerge.engine.prepare import prepare
from neuromerge.engine.result import DictSink, MergeResult, TensorSink

__all__ = ["DictSink", "Kind", "MergeJob", "MergePlan", "MergeResult", "Source", "TensorPlan",
           "TensorSink", "Unit", "build_plan", "merge_state_dicts", "prepare"]
