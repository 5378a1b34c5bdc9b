"""Per-model data statistics for the merge methods that need data (``fisher``, ``regmean``):
computed once per expert from a few hundred of its task's examples, saved as a safetensors file
whose tensor names are the checkpoint's weight names, and cached by (model, data, settings).

* :func:`fisher_diagonal`: Ft = (1/N) Σx E_{y∼p(y|x)} (∇θ log p(y|x))², one per-example gradient
  at a time (Matena & Raffel 2022; FusionBench squares the gradient of a batch sum instead, which
  adds cross-example terms). ``fisher_type``: ``expected`` takes the expectation over classes
  exactly (one backward pass per class with p(y|x) > 0: the paper's choice for classification);
  ``sampled`` draws one y ∼ p(y|x) (seeded: the unbiased single-sample estimate, and the only
  affordable one for language models); ``empirical`` uses the data's own label (the "empirical
  Fisher"). A causal LM's log p(y|x) sums the log-probabilities of the next tokens (the text's
  own tokens for ``empirical``; for ``sampled``, each drawn from the model's distribution given
  the text's prefix, the usual teacher-forced approximation).
* :func:`regmean_grams`: for every ``nn.Linear`` named ``m``, Gm = XᵀX / n over the rows of its
  inputs X (every token of every example; tokens masked out by the batch's ``attention_mask``
  are left out), stored as ``m.weight`` with shape (in, in). transformers' ``Conv1D`` (GPT-2) is
  not covered: its weights are (in, out), so its tensors are averaged.

A batch is a dict of tensors for ``model(**batch)`` (``input_ids``, ``attention_mask``...) with
``labels`` optional (read by ``empirical`` Fisher, never passed to the model); the model returns
an object with ``.logits``: (B, C) for classification, (B, T, V) for a causal LM.

Modules: ``estimate`` (the two estimators), ``files`` (statistics files and their cache), ``hf``
(an HF model folder on a JSON-lines file: ``neuromerge statistics``).
"""

from neuromerge.statistics.estimate import (
    KIND_KEY,
    Batch,
    FisherType,
    Kind,
    Statistics,
    fisher_diagonal,
    regmean_grams,
)
from neuromerge.statistics.files import (
    cached_statistics,
    data_hash,
    open_statistics,
    save_statistics,
    statistics_metadata,
)
from neuromerge.statistics.hf import compute_for_folder, load_hf_model, read_jsonl, text_batches

__all__ = ["KIND_KEY", "Batch", "FisherType", "Kind", "Statistics", "cached_statistics",
           "compute_for_folder", "data_hash", "fisher_diagonal", "load_hf_model",
           "open_statistics", "read_jsonl", "regmean_grams", "save_statistics",
           "statistics_metadata", "text_batches"]
