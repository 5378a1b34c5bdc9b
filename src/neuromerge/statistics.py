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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from neuromerge.errors import ConfigError, InputError
from neuromerge.io.reader import CheckpointReader, SafetensorsReader

log = logging.getLogger("neuromerge")

Kind = Literal["fisher", "regmean"]
FisherType = Literal["expected", "sampled", "empirical"]
Batch = Mapping[str, torch.Tensor]

#: The safetensors metadata key naming a file's statistic kind.
KIND_KEY = "neuromerge_statistics"


@dataclass
class Statistics:
    """Statistic tensors by weight name, with what they were computed from."""

    kind: Kind
    tensors: dict[str, torch.Tensor]
    n_examples: int
    info: dict[str, Any] = field(default_factory=dict)


def _select(prefix: str) -> Callable[[str], str | None]:
    """Maps a module-tree name to the checkpoint's name: ``prefix`` stripped, None outside it."""
    def rename(name: str) -> str | None:
        if not prefix:
            return name
        return name[len(prefix):] if name.startswith(prefix) else None
    return rename


def _examples(batches: Iterable[Batch], max_examples: int | None) -> Iterator[dict[str, Any]]:
    """Single examples (batch rows), right padding removed where the attention mask allows."""
    seen = 0
    for batch in batches:
        n = next(iter(batch.values())).shape[0]
        for i in range(n):
            if max_examples is not None and seen >= max_examples:
                return
            ex = {k: v[i:i + 1] for k, v in batch.items()}
            mask = ex.get("attention_mask")
            if mask is not None and mask.dim() == 2:
                length = int(mask.sum())
                if bool(mask[0, :length].all()):  # right padding: drop it (same logits, less work)
                    ex = {k: v[:, :length] if v.dim() == 2 and v.shape[1] == mask.shape[1]
                          and k != "labels" else v for k, v in ex.items()}
            seen += 1
            yield ex


def _log_likelihoods(logits: torch.Tensor, ex: Mapping[str, torch.Tensor],
                     fisher_type: FisherType, gen: torch.Generator
                     ) -> list[tuple[float, torch.Tensor]]:
    """(weight, log p(y|x)) pairs whose weighted squared gradients sum to this example's
    Fisher estimate."""
    if logits.dim() == 2:  # classification: (1, C)
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        if fisher_type == "expected":
            probs = logp.detach().exp()
            return [(float(probs[c]), logp[c]) for c in range(logp.shape[0])
                    if float(probs[c]) > 0]
        if fisher_type == "sampled":
            c = int(torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen))
            return [(1.0, logp[c])]
        if "labels" not in ex:
            raise InputError("empirical Fisher needs labels in the data")
        return [(1.0, logp[int(ex["labels"].reshape(-1)[0])])]
    if logits.dim() == 3:  # causal LM: (1, T, V), token t predicts token t + 1
        if fisher_type == "expected":
            raise ConfigError("fisher_type expected sums over every label: for a language "
                              "model use sampled (or empirical)")
        logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
        if fisher_type == "sampled":
            target = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen)[:, 0]
        else:
            target = ex["input_ids"][0, 1:].cpu()
        keep = torch.ones_like(target, dtype=torch.bool)
        if "attention_mask" in ex:
            keep = ex["attention_mask"][0, 1:].bool().cpu()
        picked = logp.gather(1, target.to(logp.device)[:, None])[:, 0]
        return [(1.0, picked[keep.to(logp.device)].sum())]
    raise InputError(f"model logits of shape {list(logits.shape)}: expected (batch, classes) "
                     f"or (batch, tokens, vocabulary)")


def fisher_diagonal(model: torch.nn.Module, batches: Iterable[Batch], *,
                    fisher_type: FisherType = "expected", seed: int = 0, prefix: str = "",
                    max_examples: int | None = None, progress: bool = False
                    ) -> Statistics:
    """The diagonal Fisher of every parameter of ``model`` (see the module docstring), named as
    ``model.named_parameters()`` with ``prefix`` stripped (parameters outside it are skipped).
    A parameter the log-likelihood does not depend on gets an all-zero Fisher. The model is used
    in eval mode and left with no gradients; its parameters are not changed."""
    rename = _select(prefix)
    params = [(rename(n), p) for n, p in model.named_parameters()]
    params = [(n, p) for n, p in params if n is not None and p.is_floating_point()]
    if not params:
        raise InputError(f"the model has no parameters under prefix {prefix!r}")
    acc = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for _, p in params]
    # one example's Σ_c p_c g_c² in float32 (one fused pass per class), added to the float64
    # sums once per example: the squares of a single example need no more than float32
    ex_acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for _, p in params]
    tensors = [p for _, p in params]
    was_training = model.training
    frozen = [p for p in tensors if not p.requires_grad]
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    n = 0
    try:
        for p in frozen:  # gradients are needed even for parameters frozen for training
            p.requires_grad_(True)
        with torch.enable_grad():
            for ex in tqdm(_examples(batches, max_examples), desc="fisher", unit="example",
                           disable=not progress, leave=False, dynamic_ncols=True):
                inputs = {k: v for k, v in ex.items() if k != "labels"}
                terms = _log_likelihoods(model(**inputs).logits, ex, fisher_type, gen)
                for e in ex_acc:
                    e.zero_()
                for j, (weight, logp) in enumerate(terms):
                    grads = torch.autograd.grad(logp, tensors, retain_graph=j < len(terms) - 1,
                                                allow_unused=True)
                    for e, g in zip(ex_acc, grads, strict=True):
                        if g is not None:
                            g = g.detach().float()
                            e.addcmul_(g, g, value=weight)
                for a, e in zip(acc, ex_acc, strict=True):
                    a.add_(e)
                n += 1
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    if n == 0:
        raise InputError("no examples to compute the Fisher on")
    out = {name: (a / n).to(torch.float32).cpu() for (name, _), a in zip(params, acc, strict=True)}
    return Statistics("fisher", out, n, {"fisher_type": fisher_type, "seed": seed})


def regmean_grams(model: torch.nn.Module, batches: Iterable[Batch], *, prefix: str = "",
                  max_examples: int | None = None, progress: bool = False) -> Statistics:
    """Gram matrices XᵀX / n of every ``nn.Linear``'s inputs (see the module docstring), named
    ``<module>.weight`` with ``prefix`` stripped. A layer the data never reaches is left out
    (the merge then averages it)."""
    rename = _select(prefix)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask_now: list[torch.Tensor | None] = [None]

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].detach()
            mask = mask_now[0]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask.to(x.device).bool()]  # the tokens the model attends to
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            gram = x.T @ x
            if name in sums:
                sums[name] += gram
            else:
                sums[name] = gram
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = []
    for mname, module in model.named_modules():
        target = rename(f"{mname}.weight")
        if isinstance(module, torch.nn.Linear) and target is not None:
            handles.append(module.register_forward_hook(hook_for(target)))
    if not handles:
        raise InputError(f"the model has no nn.Linear layers under prefix {prefix!r}")
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.inference_mode():
            for batch in tqdm(_batches_capped(batches, max_examples), desc="regmean",
                              unit="batch", disable=not progress, leave=False,
                              dynamic_ncols=True):
                mask_now[0] = batch.get("attention_mask")
                model(**{k: v for k, v in batch.items() if k != "labels"})
                n += next(iter(batch.values())).shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise InputError("no examples to compute the Gram matrices on")
    out = {k: (sums[k] / max(1, counts[k])).to(torch.float32).cpu() for k in sums}
    return Statistics("regmean", out, n, {"rows": counts})


def _batches_capped(batches: Iterable[Batch], max_examples: int | None) -> Iterator[Batch]:
    seen = 0
    for batch in batches:
        if max_examples is not None and seen >= max_examples:
            return
        n = next(iter(batch.values())).shape[0]
        if max_examples is not None and seen + n > max_examples:
            batch = {k: v[:max_examples - seen] for k, v in batch.items()}
            n = max_examples - seen
        seen += n
        yield batch


# -- files and cache --------------------------------------------------------------------------


def data_hash(texts: Sequence[str], labels: Sequence[int] | None = None) -> str:
    """A short identity of a data set (texts and labels, in order)."""
    payload = json.dumps([list(texts), None if labels is None else [int(y) for y in labels]])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def save_statistics(stats: Statistics, path: str | os.PathLike[str], *,
                    model_fingerprint: str = "", data: str = "") -> Path:
    """Write ``stats`` as safetensors (atomically) with its provenance in the metadata."""
    from safetensors.torch import save_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {KIND_KEY: stats.kind, "n_examples": str(stats.n_examples),
            "model_fingerprint": model_fingerprint, "data_hash": data,
            "info": json.dumps(stats.info, sort_keys=True)}
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in stats.tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(out)
    return out


def open_statistics(path: str | os.PathLike[str], kind: Kind | None, *,
                    model: str = "") -> CheckpointReader:
    """A reader over a statistics file, refused when it holds another kind of statistic."""
    p = Path(path)
    who = f" (statistics of {model})" if model else ""
    if not p.is_file():
        raise InputError(f"{p}: no such statistics file{who}")
    reader = SafetensorsReader(str(p), [p])
    got = reader.metadata().get(KIND_KEY)
    if kind is not None and got != kind:
        reader.close()
        found = f"a {got} file" if got else "not a neuromerge statistics file"
        raise InputError(f"{p}: {found}, but the method needs {kind} statistics{who}")
    return reader


def statistics_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    reader = open_statistics(path, None)
    try:
        return reader.metadata()
    finally:
        reader.close()


def cached_statistics(cache_dir: str | os.PathLike[str], kind: Kind, model_fingerprint: str,
                      data: str, compute: Callable[[], Statistics],
                      settings: Mapping[str, Any] | None = None) -> Path:
    """The statistics file for (model, data, settings) in ``cache_dir``, computed by
    ``compute()`` only when it is not there yet."""
    key = hashlib.sha256(json.dumps([kind, model_fingerprint, data, dict(settings or {})],
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{kind}-{key}.safetensors"
    if path.is_file():
        return path
    stats = compute()
    log.info("%s statistics: %d examples, %d tensors -> %s", kind, stats.n_examples,
             len(stats.tensors), path)
    return save_statistics(stats, path, model_fingerprint=model_fingerprint, data=data)


# -- Hugging Face models and text data ---------------------------------------------------------


def text_batches(tokenizer: Any, texts: Sequence[str], labels: Sequence[int] | None = None, *,
                 batch_size: int = 16, max_length: int = 128) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches (right padding) of ``texts``, with ``labels`` when given."""
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        batch = {k: v for k, v in enc.items()}
        if labels is not None:
            batch["labels"] = torch.tensor([int(y) for y in labels[start:start + batch_size]])
        yield batch


def read_jsonl(path: str | os.PathLike[str], text_field: str = "text",
               label_field: str = "label") -> tuple[list[str], list[int] | None]:
    """Texts (and integer labels, when every line has one) from a JSON-lines file."""
    p = Path(path)
    texts: list[str] = []
    labels: list[int] = []
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{p}:{i}: not a JSON object") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            raise InputError(f"{p}:{i}: no string field {text_field!r}")
        texts.append(rec[text_field])
        if label_field in rec:
            if not isinstance(rec[label_field], int) or isinstance(rec[label_field], bool):
                raise InputError(f"{p}:{i}: {label_field!r} must be an integer class index")
            labels.append(rec[label_field])
    if not texts:
        raise InputError(f"{p}: no examples")
    if labels and len(labels) != len(texts):
        raise InputError(f"{p}: {label_field!r} is on some lines but not all")
    return texts, labels or None


def load_hf_model(model_dir: str | os.PathLike[str]) -> Any:
    """An HF sequence-classification or causal-LM model from a local folder (by its
    ``architectures``), in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not an HF model folder (no config.json)")
    arch = " ".join(AutoConfig.from_pretrained(str(folder)).architectures or [])
    if "ForSequenceClassification" in arch:
        auto: Any = AutoModelForSequenceClassification
    elif "ForCausalLM" in arch or "LMHeadModel" in arch:
        auto = AutoModelForCausalLM
    else:
        raise InputError(f"{folder}: architectures {arch or 'unset'}: statistics need a "
                         f"*ForSequenceClassification or *ForCausalLM model (logits)")
    return auto.from_pretrained(str(folder)).float()


def compute_for_folder(kind: Kind, model_dir: str | os.PathLike[str],
                       data: str | os.PathLike[str], out: str | os.PathLike[str], *,
                       text_field: str = "text", label_field: str = "label",
                       max_examples: int | None = None, batch_size: int = 16,
                       max_length: int = 128, fisher_type: FisherType = "expected",
                       seed: int = 0, device: str = "cpu", progress: bool = True) -> Statistics:
    """``neuromerge statistics``: compute ``kind`` for an HF model folder on a JSONL file and
    write it to ``out``, tensor names as in the folder's checkpoint."""
    from transformers import AutoTokenizer

    from neuromerge.engine import resolve_device
    from neuromerge.io.reader import fingerprint, open_checkpoint

    texts, labels = read_jsonl(data, text_field, label_field)
    if max_examples is not None:
        texts = texts[:max_examples]
        labels = labels[:max_examples] if labels is not None else None
    if kind == "fisher" and fisher_type == "empirical" and labels is None:
        raise InputError(f"{data}: empirical Fisher needs a {label_field!r} on every line")
    model = load_hf_model(model_dir).to(resolve_device(device))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:  # causal LMs often have none; right padding is masked anyway
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    dev = next(model.parameters()).device
    batches = ({k: v.to(dev) for k, v in b.items()} for b in
               text_batches(tok, texts, labels, batch_size=batch_size, max_length=max_length))
    if kind == "fisher":
        stats = fisher_diagonal(model, batches, fisher_type=fisher_type, seed=seed,
                                progress=progress)
    else:
        stats = regmean_grams(model, batches, progress=progress)
    ckpt = open_checkpoint(model_dir)
    try:
        stored = set(ckpt.names())
        # keep the names the checkpoint holds (a tied weight is stored once)
        stats.tensors = {k: v for k, v in stats.tensors.items() if k in stored}
        fp = fingerprint(ckpt)
    finally:
        ckpt.close()
    if not stats.tensors:
        raise InputError(f"{model_dir}: none of the statistics' names are in its checkpoint")
    save_statistics(stats, out, model_fingerprint=fp, data=data_hash(texts, labels))
    return stats
