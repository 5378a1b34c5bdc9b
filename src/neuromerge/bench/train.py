"""Experts and probes for the benchmark: full fine-tuning of the base per task, and a linear probe
on the frozen base. An expert is saved as a ``body/`` HF folder (the shared encoder, what gets
merged) plus ``head.safetensors`` (its own classifier)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from neuromerge.bench.accuracy import load_body


class TextDataset(Protocol):
    texts: list[str]
    labels: list[int]
    label_names: list[str]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    max_length: int = 128
    seed: int = 0


HEAD_KEYS = ("classifier.weight", "classifier.bias")


def _batches(n: int, batch_size: int, gen: torch.Generator | None) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    return list(order.split(batch_size))


def finetune(base_dir: Path, train: TextDataset, out_dir: Path, cfg: TrainConfig, *,
             progress: bool = True, desc: str = "fine-tune") -> dict[str, Any]:
    """Fine-tune all weights of ``base_dir`` with a fresh classification head on ``train``;
    write ``out_dir/body`` (BertModel-style folder), ``out_dir/head.safetensors`` and
    ``out_dir/train.json``. Returns the training record."""
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base_dir), num_labels=len(train.label_names))
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
         "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
         "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    steps = cfg.epochs * math.ceil(len(train.texts) / cfg.batch_size)
    warm = max(1, int(cfg.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    labels = torch.tensor(train.labels)
    model.train()
    t0 = time.perf_counter()
    losses = []
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False,
              dynamic_ncols=True) as bar:
        for _ in range(cfg.epochs):
            for idx in _batches(len(train.texts), cfg.batch_size, gen):
                enc = tok([train.texts[i] for i in idx], padding=True, truncation=True,
                          max_length=cfg.max_length, return_tensors="pt")
                out = model(**enc, labels=labels[idx])
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(out.loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}",
                                refresh=False)
    model.eval()
    body = _body(model)
    (out_dir / "body").mkdir(parents=True, exist_ok=True)
    body.save_pretrained(str(out_dir / "body"))
    tok.save_pretrained(str(out_dir / "body"))
    sd = model.state_dict()
    save_file({k: sd[k].detach().contiguous() for k in HEAD_KEYS},
              str(out_dir / "head.safetensors"))
    record = {"config": asdict(cfg), "n_train": len(train.texts), "steps": steps,
              "seconds": time.perf_counter() - t0, "final_loss": sum(losses[-20:]) /
              max(1, len(losses[-20:])), "label_names": list(train.label_names)}
    (out_dir / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _body(model: Any) -> Any:
    """The encoder under a *ForSequenceClassification model (``model.bert`` for BERT)."""
    return getattr(model, model.base_model_prefix)


def expert_classifier(expert: Path, num_labels: int) -> Any:
    """An expert as the classifier it was trained as: its body with its own head (what its
    data statistics are computed through)."""
    from transformers import AutoModelForSequenceClassification

    body = load_body(expert / "body")
    cfg = body.config
    cfg.num_labels = num_labels
    model = AutoModelForSequenceClassification.from_config(cfg)
    setattr(model, model.base_model_prefix, body)
    weight, bias = load_head(expert / "head.safetensors")
    with torch.no_grad():
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(bias)
    return model.eval()


def load_head(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    return sd["classifier.weight"], sd["classifier.bias"]


def linear_probe(features: torch.Tensor, labels: Sequence[int], num_labels: int, *,
                 seed: int = 0, weight_decay: float = 1e-3, steps: int = 300
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on frozen features (full-batch L-BFGS, L2-regularised):
    the lower reference point, a classifier head on the untouched base."""
    torch.manual_seed(seed)
    x = features.to(torch.float32)
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp(min=1e-6)
    xs = (x - mean) / std
    y = torch.tensor(list(labels))
    w = torch.zeros(num_labels, x.shape[1], requires_grad=True)
    b = torch.zeros(num_labels, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w.T + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    # fold the standardisation into the head so it applies to raw features
    weight = (w / std).detach()
    bias = (b - (w * mean / std).sum(-1)).detach()
    return weight, bias
