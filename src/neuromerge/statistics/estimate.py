"""Estimating the statistics: a model's diagonal Fisher and its linear layers' input Grams, over
batches of examples (see the package docstring for the definitions)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from neuromerge.errors import ConfigError, InputError

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
