"""Helpers shared by several test modules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from neuromerge.registry import get_method


def toy_statistics(method: str, experts: Sequence[Mapping[str, torch.Tensor]]
                   ) -> list[dict[str, torch.Tensor]] | None:
    """Statistics tied to each model's own values (so they follow it when models are
    reordered), for the methods that need them: a Fisher of θt² (zero where θt is), and for
    every 2-D float tensor a Gram θtᵀθt (singular when it has fewer rows than columns); other
    tensors get no Gram (RegMean averages them). None for the other methods."""
    needs = get_method(method).needs
    if needs == "fisher":
        return [{k: v.float() ** 2 for k, v in e.items() if v.is_floating_point()}
                for e in experts]
    if needs == "regmean":
        return [{k: v.float().T @ v.float() for k, v in e.items()
                 if v.is_floating_point() and v.dim() == 2} for e in experts]
    return None


def tiny_causal_lm(folder: Path, kind: str = "llama", dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> Path:
    """A random tiny Llama or GPT-2 (HF folder, safetensors) with a local tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=64, tie_word_embeddings=False,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=2, n_positions=64,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    model = model.to(dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


_WORDS = ("the a cat dog sat on mat ran fast slow red blue green one two three four five six "
          "seven eight nine ten plus minus is answer question yes no true false").split()


def tiny_tokenizer() -> Any:
    """A word-level tokenizer built locally (no hub): a few words, digits, punctuation."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *_WORDS,
                                         *"0123456789", *".,:?!=+-"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def lora_adapter(base: Path, out: Path, seed: int, **config: Any) -> Any:
    """Save a PEFT LoRA adapter over ``base`` with random non-zero factors (and modules_to_save
    copies perturbed) to ``out``; returns the model ``merge_and_unload`` gives (the reference)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    peft_model = get_peft_model(model, LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g).to(p.dtype))
    peft_model.save_pretrained(out)
    return peft_model.merge_and_unload()
