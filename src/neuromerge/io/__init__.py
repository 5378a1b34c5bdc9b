"""Checkpoint I/O: lazy tensor-by-tensor readers and a streaming safetensors writer."""

from neuromerge.io.reader import CheckpointReader, StateDictReader, TensorMeta, open_checkpoint
from neuromerge.io.writer import OutputFolder, ShardedSafetensorsWriter, parse_size

__all__ = [
    "CheckpointReader",
    "OutputFolder",
    "ShardedSafetensorsWriter",
    "StateDictReader",
    "TensorMeta",
    "open_checkpoint",
    "parse_size",
]
