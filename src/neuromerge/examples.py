"""Generated example checkpoints: a tiny random BERT and experts "fine-tuned" from it by known,
structured updates. Used by ``neuromerge demo`` and by the tests; no download needed."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from neuromerge.errors import NeuromergeError

_WORDS = """the a of and to in is it that was for on are as with they at be this from have or
by one not but what all were when we there can an your which their said if do will each about how
up out them then she many some so these would other into has more her two like him see time could
no make than first been its who now people my made over did down only way find use may water long
little very after words called just where most know get through back much before go good new write
our used me man too any day same right look think also around another came come work three word
must because does part even place well such here take why things help put years different away
again off went old number great tell men say small every found still between name should home big
merged model runs merge neuron task""".split()
_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(_WORDS)]


def _require_transformers():  # type: ignore[no-untyped-def]
    try:
        import transformers
    except ImportError:
        raise NeuromergeError("the example checkpoints need transformers: "
                              "pip install 'neuromerge[hf]'") from None
    return transformers


def tiny_bert(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4,
              intermediate: int = 64):  # type: ignore[no-untyped-def]
    """A randomly initialised BertModel small enough for tests (about 40k parameters)."""
    tf = _require_transformers()
    torch.manual_seed(seed)
    config = tf.BertConfig(vocab_size=len(_VOCAB), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=intermediate,
                           max_position_embeddings=64)
    return tf.BertModel(config).eval()


def save_tokenizer(folder: Path) -> None:
    """A WordPiece tokenizer over the example vocabulary, saved as HF tokenizer files."""
    import inspect

    tf = _require_transformers()
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(_VOCAB) + "\n")
    if "vocab" in inspect.signature(tf.BertTokenizerFast.__init__).parameters:  # transformers 5
        tok = tf.BertTokenizerFast(vocab={w: i for i, w in enumerate(_VOCAB)})
    else:
        tok = tf.BertTokenizerFast(vocab_file=str(vocab))
    tok.save_pretrained(str(folder))


def expert_update(base: dict[str, torch.Tensor], index: int, *, strength: float = 0.05,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """A structured, reproducible "fine-tuning" update of a state dict.

    Each expert rescales a random tenth of the neurons of every 2-D tensor (the parallel part),
    turns every neuron towards a random rank-2 subspace of its own (the orthogonal part), and
    shifts biases and norms; the experts' subspaces differ, so they interfere when merged."""
    gen = torch.Generator().manual_seed(1000 * seed + index + 1)
    out = {}
    for name, w in base.items():
        if not w.dtype.is_floating_point:
            out[name] = w.clone()
            continue
        w32 = w.to(torch.float32)
        scale = strength * float(w32.std()) if w32.numel() > 1 else strength
        if w32.dim() >= 2:
            rows = w32.reshape(w32.shape[0], -1)
            rescale = (torch.rand(rows.shape[0], generator=gen) < 0.1).float()
            rescale *= torch.randn(rows.shape[0], generator=gen)
            basis = torch.randn(2, rows.shape[1], generator=gen)
            turn = torch.randn(rows.shape[0], 2, generator=gen) @ basis
            noise = torch.randn(rows.shape, generator=gen) * 0.2
            delta = strength * rescale[:, None] * rows + scale * (turn + noise)
            new = rows + delta
            out[name] = new.reshape(w.shape).to(w.dtype)
        else:
            out[name] = (w32 + scale * torch.randn(w32.shape, generator=gen)).to(w.dtype)
    return out


Format = Literal["safetensors", "sharded", "bin"]


def make_bert_family(folder: str | Path, n_experts: int = 3, *, fmt: Format = "safetensors",
                     seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 32,
                     layers: int = 2, strength: float = 0.05) -> tuple[Path, list[Path]]:
    """Write ``base/`` and ``expert_1/`` … as HF model folders; return their paths."""
    from safetensors.torch import save_file

    folder = Path(folder)
    model = tiny_bert(seed=seed, hidden=hidden, layers=layers).to(dtype)
    base_sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    paths = []
    for i in range(n_experts + 1):
        target = folder / ("base" if i == 0 else f"expert_{i}")
        sd = base_sd if i == 0 else expert_update(base_sd, i, strength=strength, seed=seed)
        target.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(str(target))
        save_tokenizer(target)
        if fmt == "bin":
            torch.save(sd, target / "pytorch_model.bin")
        elif fmt == "sharded":
            model.load_state_dict(sd)
            model.save_pretrained(str(target), max_shard_size="20KB")
            model.load_state_dict(base_sd)
        else:
            save_file(sd, str(target / "model.safetensors"), metadata={"format": "pt"})
        paths.append(target)
    return paths[0], paths[1:]
