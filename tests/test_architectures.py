"""Tiny random models of ten transformers architectures, built from configs (no download): the
merge runs, the output loads with ``from_pretrained`` and runs a forward pass, and a golden
tensor of each kind shows that the neuron axis is the intended one: an expert whose update is
exactly c·w0 along the true neuron axis (rows of nn.Linear / nn.Embedding / conv weights,
columns of GPT-2's Conv1D, positions of ViT's (1, n, d) tables) is purely "parallel", so
NeuroMerging with λ1 = 0 returns the base and with λ1 = 1 the base scaled by 1 + mean c."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from neuromerge import merge, merge_state_dicts
from neuromerge.architectures import CONV1D_MODEL_TYPES, from_config, read_architecture
from neuromerge.io.reader import open_checkpoint
from neuromerge.pipeline import plan_merge

tf = pytest.importorskip("transformers")

V, H = 64, 16  # vocabulary, hidden size: every model is a few thousand parameters
TEXT = {"vocab_size": V, "hidden_size": H, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 32}
DECODER = {**TEXT, "num_key_value_heads": 1}
VISION = {"image_size": 8, "patch_size": 4, "num_channels": 3, "hidden_size": H,
          "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}


def _ids() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[1, 5, 9, 2, 7]])}


def _pixels() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))}


@dataclass(frozen=True)
class Arch:
    make: Callable[[], Any]  # () -> a PreTrainedModel
    inputs: Callable[[], dict[str, torch.Tensor]]
    #: one tensor of each kind (as saved) → its neuron axis
    golden: dict[str, int]
    points: tuple[str, ...] = ()  # point tensors (1-D, 0-D)


ARCHS: dict[str, Arch] = {
    "bert": Arch(lambda: tf.BertForMaskedLM(tf.BertConfig(**TEXT)), _ids, {
        "bert.encoder.layer.0.intermediate.dense.weight": 0,
        "bert.embeddings.word_embeddings.weight": 0,
        "bert.embeddings.position_embeddings.weight": 0},
        ("bert.embeddings.LayerNorm.weight", "cls.predictions.bias")),
    "roberta": Arch(lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(
        **{**TEXT, "max_position_embeddings": 40})), _ids, {
        "roberta.encoder.layer.0.attention.self.query.weight": 0,
        "roberta.embeddings.word_embeddings.weight": 0}, ("lm_head.bias",)),
    "gpt2": Arch(lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=V, n_embd=H, n_layer=1, n_head=2, n_positions=32)), _ids, {
        "transformer.h.0.attn.c_attn.weight": 1, "transformer.h.0.attn.c_proj.weight": 1,
        "transformer.h.0.mlp.c_fc.weight": 1, "transformer.h.0.mlp.c_proj.weight": 1,
        "transformer.wte.weight": 0, "transformer.wpe.weight": 0},
        ("transformer.h.0.attn.c_attn.bias", "transformer.ln_f.weight")),
    "llama": Arch(lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**DECODER)), _ids, {
        "model.layers.0.mlp.gate_proj.weight": 0, "model.layers.0.self_attn.k_proj.weight": 0,
        "model.embed_tokens.weight": 0, "lm_head.weight": 0}, ("model.norm.weight",)),
    "mistral": Arch(lambda: tf.MistralForCausalLM(tf.MistralConfig(**DECODER)), _ids, {
        "model.layers.0.mlp.down_proj.weight": 0, "model.embed_tokens.weight": 0}),
    "qwen2": Arch(lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**DECODER)), _ids, {
        "model.layers.0.self_attn.q_proj.weight": 0, "lm_head.weight": 0},
        ("model.layers.0.self_attn.q_proj.bias",)),
    "gemma": Arch(lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**DECODER, head_dim=8)), _ids, {
        "model.layers.0.mlp.up_proj.weight": 0, "model.embed_tokens.weight": 0}),
    "t5": Arch(lambda: tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=V, d_model=H, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8)),
        lambda: {**_ids(), "decoder_input_ids": torch.tensor([[0, 3]])}, {
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": 0,
        "decoder.block.0.layer.2.DenseReluDense.wi.weight": 0, "shared.weight": 0},
        ("encoder.final_layer_norm.weight",)),
    "vit": Arch(lambda: tf.ViTForImageClassification(tf.ViTConfig(**VISION)), _pixels, {
        "vit.embeddings.patch_embeddings.projection.weight": 0,
        "vit.embeddings.position_embeddings": 1, "vit.embeddings.cls_token": 1,
        "vit.encoder.layer.0.output.dense.weight": 0}, ("vit.layernorm.weight",)),
    "clip": Arch(lambda: tf.CLIPModel(tf.CLIPConfig(
        text_config={**TEXT, "max_position_embeddings": 16}, vision_config=VISION,
        projection_dim=8)), lambda: {**_ids(), **_pixels()}, {
        "vision_model.embeddings.patch_embedding.weight": 0,
        "vision_model.embeddings.position_embedding.weight": 0,
        "text_model.embeddings.token_embedding.weight": 0, "visual_projection.weight": 0},
        ("vision_model.embeddings.class_embedding", "logit_scale")),
}


def _parallel_along(w0: torch.Tensor, axis: int, c: torch.Tensor) -> torch.Tensor:
    """c·w0 per neuron: neuron k (index k of ``axis``) scaled by c[k]."""
    shape = [1] * w0.dim()
    shape[axis] = w0.shape[axis]
    return c.reshape(shape) * w0


def _family(arch: Arch, folder: Path) -> tuple[Path, list[Path], dict[str, torch.Tensor],
                                                dict[str, list[torch.Tensor]]]:
    """base + 2 experts saved with save_pretrained: golden tensors get a per-neuron c·w0 update
    along their true neuron axis, every other float tensor random noise."""
    torch.manual_seed(0)
    model = arch.make().eval()
    model.save_pretrained(folder / "base")
    base = open_checkpoint(folder / "base")
    saved = {n: base.read(n) for n in base.names()}
    base.close()
    gen = torch.Generator().manual_seed(1)
    cs: dict[str, list[torch.Tensor]] = {n: [] for n in arch.golden}
    experts = []
    for t in range(2):
        sd = {}
        for name, w in saved.items():
            if name in arch.golden:
                axis = arch.golden[name]
                c = 0.05 + 0.25 * torch.rand(w.shape[axis], generator=gen)
                cs[name].append(c)
                sd[name] = w + _parallel_along(w, axis, c)
            elif w.is_floating_point():
                sd[name] = w + 0.02 * torch.randn(w.shape, generator=gen)
            else:
                sd[name] = w
        folder_t = folder / f"expert_{t + 1}"
        folder_t.mkdir()
        save_file(sd, str(folder_t / "model.safetensors"), metadata={"format": "pt"})
        (folder_t / "config.json").write_text((folder / "base" / "config.json").read_text())
        experts.append(folder_t)
    return folder / "base", experts, saved, cs


def _forward(model_dir: Path, arch: Arch) -> None:
    model = type(arch.make()).from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        out = model(**arch.inputs())
    first = out[0] if not hasattr(out, "logits") or out.logits is None else out.logits
    assert torch.isfinite(first).all()


def _cfg(base: Path, experts: list[Path], method: str, **params: Any) -> dict[str, Any]:
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(e)} for e in experts], "parameters": params}


@pytest.mark.parametrize("name", list(ARCHS))
def test_merge_loads_and_the_neuron_axis_is_the_intended_one(name: str, tmp_path: Path) -> None:
    arch = ARCHS[name]
    base, experts, saved, c = _family(arch, tmp_path)

    plan = {p.name: p for p in plan_merge(_cfg(base, experts, "neuromerging")).tensors}
    for tensor, axis in arch.golden.items():
        assert plan[tensor].kind == "neuronal" and plan[tensor].neuron_axis == axis, tensor
    for tensor in arch.points:
        assert plan[tensor].kind == "point", tensor
    columns = {n for n, p in plan.items() if p.neuron_axis != 0}
    assert columns == {n for n, a in arch.golden.items() if a != 0}  # nothing else turned

    for method, params in (("neuromerging", {}), ("task_arithmetic", {})):
        out = tmp_path / method
        result = merge(_cfg(base, experts, method, **params), out, progress=False)
        assert result.extra["neuron_axes"] == {n: a for n, a in arch.golden.items() if a}
        _forward(out, arch)

    # golden: λ1 = 1 keeps exactly the merged parallel part, w0 · (1 + mean c) per neuron
    out = tmp_path / "golden"
    merge(_cfg(base, experts, "neuromerging", density=1.0, lambda1=1.0, lambda2=1.0), out,
          progress=False)
    merged = open_checkpoint(out)
    try:
        for tensor, axis in arch.golden.items():
            w0 = saved[tensor]
            want = w0 + _parallel_along(w0, axis, (c[tensor][0] + c[tensor][1]) / 2)
            torch.testing.assert_close(merged.read(tensor), want, rtol=1e-5, atol=1e-6,
                                       msg=f"{name}: {tensor}")
    finally:
        merged.close()
    _forward(out, arch)


@pytest.mark.parametrize("name", ["gpt2", "vit", "llama"])
def test_the_wrong_axis_is_not_parallel(name: str, tmp_path: Path) -> None:
    """The golden check can fail: with λ1 = 0 the merge returns the base for a purely parallel
    update along the true axis, and not when the same tensors are read along the other axis."""
    arch = ARCHS[name]
    base, experts, saved, _ = _family(arch, tmp_path)
    readers = [open_checkpoint(p) for p in (base, *experts)]
    sds = [{n: r.read(n) for n in r.names()} for r in readers]
    for r in readers:
        r.close()
    assert read_architecture(base).conv1d == (name == "gpt2")
    params = {"density": 1.0, "lambda1": 0.0, "lambda2": 1.0}
    cfg_dict = json.loads((base / "config.json").read_text())
    right = merge_state_dicts(sds[0], sds[1:], "neuromerging", params, config=cfg_dict)
    turned = {n: 1 - a for n, a in arch.golden.items() if saved[n].shape[a] > 1
              and saved[n].shape[1 - a] > 1}
    wrong = merge_state_dicts(sds[0], sds[1:], "neuromerging", params, config=cfg_dict,
                              neuron_axis=turned)
    for tensor in turned:
        torch.testing.assert_close(right.state_dict[tensor], saved[tensor], rtol=1e-5,
                                   atol=1e-6, msg=tensor)
        gap = (wrong.state_dict[tensor] - saved[tensor]).abs().max()
        assert gap > 1e-3 * saved[tensor].abs().max(), tensor


# Every transformers model built on Conv1D: (config class, model class, config kwargs).
CONV1D_MODELS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": H, "n_layer": 1, "n_head": 2,
                                               "add_cross_attention": True}),
    "openai-gpt": ("OpenAIGPTConfig", "OpenAIGPTLMHeadModel",
                   {"n_embd": H, "n_layer": 1, "n_head": 2}),
    "imagegpt": ("ImageGPTConfig", "ImageGPTForCausalImageModeling",
                 {"n_embd": H, "n_layer": 1, "n_head": 2}),
    "decision_transformer": ("DecisionTransformerConfig", "DecisionTransformerModel",
                             {"hidden_size": H, "n_layer": 1, "n_head": 2}),
    "clvp_decoder": ("ClvpDecoderConfig", "ClvpForCausalLM",
                     {"hidden_size": H, "num_hidden_layers": 1, "num_attention_heads": 2}),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM",  # c_attn is an nn.Linear
                    {"n_embd": H, "n_layer": 1, "n_head": 2}),
}


@pytest.mark.parametrize("model_type", list(CONV1D_MODELS))
def test_conv1d_rules_match_the_modules(model_type: str) -> None:
    """The tensors the rules turn are exactly the Conv1D modules' weights of a real instance."""
    from transformers.pytorch_utils import Conv1D

    cfg_name, model_name, kw = CONV1D_MODELS[model_type]
    cfg = getattr(tf, cfg_name)(vocab_size=V, **kw)
    with torch.device("meta"):
        model = getattr(tf, model_name)(cfg)
    want = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert bool(want) == (model_type in CONV1D_MODEL_TYPES)
    arch = from_config(cfg.to_dict())
    from neuromerge.io.reader import TensorMeta

    got = {n for n, p in model.state_dict().items()
           if arch.column_neurons(n, TensorMeta(tuple(p.shape), p.dtype))}
    assert got == want
