"""Tensor names of real Hugging Face checkpoints → (layer, module type)."""

from __future__ import annotations

import pytest

from neuromerge.analysis.layout import MODULES, NO_LAYER, Layout, locate, module_type

# (name, layer index or None, module type), as the real checkpoints spell them
NAMES = {
    "bert": [
        ("bert.embeddings.word_embeddings.weight", None, "embed"),
        ("bert.embeddings.position_embeddings.weight", None, "embed"),
        ("bert.embeddings.token_type_embeddings.weight", None, "embed"),
        ("bert.embeddings.LayerNorm.weight", None, "norm"),
        ("bert.encoder.layer.3.attention.self.query.weight", 3, "attn.q"),
        ("bert.encoder.layer.3.attention.self.key.bias", 3, "attn.k"),
        ("bert.encoder.layer.3.attention.self.value.weight", 3, "attn.v"),
        ("bert.encoder.layer.3.attention.output.dense.weight", 3, "attn.o"),
        ("bert.encoder.layer.3.attention.output.LayerNorm.bias", 3, "norm"),
        ("bert.encoder.layer.3.intermediate.dense.weight", 3, "mlp.up"),
        ("bert.encoder.layer.3.output.dense.weight", 3, "mlp.down"),
        ("bert.encoder.layer.3.output.LayerNorm.weight", 3, "norm"),
        ("bert.pooler.dense.weight", None, "head"),
        ("classifier.weight", None, "head"),
        ("cls.predictions.transform.dense.weight", None, "head"),
        ("bert.embeddings.position_ids", None, "embed"),
    ],
    "roberta": [
        ("roberta.encoder.layer.11.attention.self.query.weight", 11, "attn.q"),
        ("roberta.encoder.layer.11.output.dense.bias", 11, "mlp.down"),
        ("lm_head.dense.weight", None, "head"),
        ("lm_head.layer_norm.weight", None, "norm"),
        ("classifier.out_proj.weight", None, "head"),
    ],
    "distilbert": [
        ("distilbert.transformer.layer.2.attention.q_lin.weight", 2, "attn.q"),
        ("distilbert.transformer.layer.2.attention.out_lin.weight", 2, "attn.o"),
        ("distilbert.transformer.layer.2.ffn.lin1.weight", 2, "mlp.up"),
        ("distilbert.transformer.layer.2.ffn.lin2.weight", 2, "mlp.down"),
        ("distilbert.transformer.layer.2.sa_layer_norm.weight", 2, "norm"),
        ("vocab_projector.weight", None, "head"),
    ],
    "gpt2": [
        ("transformer.wte.weight", None, "embed"),
        ("transformer.wpe.weight", None, "embed"),
        ("transformer.h.7.ln_1.weight", 7, "norm"),
        ("transformer.h.7.attn.c_attn.weight", 7, "attn.qkv"),
        ("transformer.h.7.attn.c_proj.bias", 7, "attn.o"),
        ("transformer.h.7.mlp.c_fc.weight", 7, "mlp.up"),
        ("transformer.h.7.mlp.c_proj.weight", 7, "mlp.down"),
        ("transformer.ln_f.bias", None, "norm"),
        ("lm_head.weight", None, "head"),
        ("h.0.attn.c_attn.weight", 0, "attn.qkv"),  # saved without the transformer. prefix
    ],
    "gpt_neox": [
        ("gpt_neox.embed_in.weight", None, "embed"),
        ("gpt_neox.layers.5.attention.query_key_value.weight", 5, "attn.qkv"),
        ("gpt_neox.layers.5.attention.dense.weight", 5, "attn.o"),
        ("gpt_neox.layers.5.mlp.dense_h_to_4h.weight", 5, "mlp.up"),
        ("gpt_neox.layers.5.mlp.dense_4h_to_h.weight", 5, "mlp.down"),
        ("embed_out.weight", None, "head"),
    ],
    "falcon": [
        ("transformer.word_embeddings.weight", None, "embed"),
        ("transformer.h.2.self_attention.query_key_value.weight", 2, "attn.qkv"),
        ("transformer.h.2.self_attention.dense.weight", 2, "attn.o"),
        ("transformer.h.2.mlp.dense_h_to_4h.weight", 2, "mlp.up"),
        ("transformer.h.2.input_layernorm.weight", 2, "norm"),
    ],
    "llama": [
        ("model.embed_tokens.weight", None, "embed"),
        ("model.layers.31.self_attn.q_proj.weight", 31, "attn.q"),
        ("model.layers.31.self_attn.k_proj.weight", 31, "attn.k"),
        ("model.layers.31.self_attn.v_proj.weight", 31, "attn.v"),
        ("model.layers.31.self_attn.o_proj.weight", 31, "attn.o"),
        ("model.layers.31.mlp.gate_proj.weight", 31, "mlp.gate"),
        ("model.layers.31.mlp.up_proj.weight", 31, "mlp.up"),
        ("model.layers.31.mlp.down_proj.weight", 31, "mlp.down"),
        ("model.layers.31.input_layernorm.weight", 31, "norm"),
        ("model.layers.31.post_attention_layernorm.weight", 31, "norm"),
        ("model.layers.31.self_attn.rotary_emb.inv_freq", 31, "other"),
        ("model.norm.weight", None, "norm"),
        ("lm_head.weight", None, "head"),
        ("score.weight", None, "head"),
    ],
    "qwen2": [
        ("model.layers.0.self_attn.q_proj.bias", 0, "attn.q"),
        ("model.layers.0.self_attn.k_proj.bias", 0, "attn.k"),
        ("model.layers.0.self_attn.q_norm.weight", 0, "norm"),  # Qwen3
    ],
    "mixtral": [
        ("model.layers.1.block_sparse_moe.gate.weight", 1, "other"),  # the router
        ("model.layers.1.block_sparse_moe.experts.5.w1.weight", 1, "mlp.gate"),
        ("model.layers.1.block_sparse_moe.experts.5.w3.weight", 1, "mlp.up"),
        ("model.layers.1.block_sparse_moe.experts.5.w2.weight", 1, "mlp.down"),
    ],
    "opt": [
        ("model.decoder.embed_positions.weight", None, "embed"),
        ("model.decoder.layers.4.self_attn.out_proj.weight", 4, "attn.o"),
        ("model.decoder.layers.4.fc1.weight", 4, "mlp.up"),
        ("model.decoder.layers.4.fc2.weight", 4, "mlp.down"),
        ("model.decoder.layers.4.self_attn_layer_norm.weight", 4, "norm"),
        ("model.decoder.final_layer_norm.weight", None, "norm"),
    ],
    "vit": [
        ("vit.embeddings.cls_token", None, "embed"),
        ("vit.embeddings.patch_embeddings.projection.weight", None, "embed"),
        ("vit.encoder.layer.9.attention.attention.query.weight", 9, "attn.q"),
        ("vit.encoder.layer.9.attention.output.dense.weight", 9, "attn.o"),
        ("vit.encoder.layer.9.intermediate.dense.weight", 9, "mlp.up"),
        ("vit.encoder.layer.9.output.dense.weight", 9, "mlp.down"),
        ("vit.encoder.layer.9.layernorm_before.weight", 9, "norm"),
        ("vit.layernorm.weight", None, "norm"),
        ("layers.9.attention.q_proj.weight", 9, "attn.q"),  # transformers 5 naming
        ("layers.9.attention.o_proj.bias", 9, "attn.o"),
    ],
    "openclip": [
        ("visual.class_embedding", None, "embed"),
        ("visual.positional_embedding", None, "embed"),
        ("visual.transformer.resblocks.11.attn.in_proj_weight", 11, "attn.qkv"),
        ("visual.transformer.resblocks.11.attn.in_proj_bias", 11, "attn.qkv"),
        ("visual.transformer.resblocks.11.attn.out_proj.weight", 11, "attn.o"),
        ("visual.transformer.resblocks.11.mlp.c_fc.weight", 11, "mlp.up"),
        ("visual.transformer.resblocks.11.mlp.c_proj.weight", 11, "mlp.down"),
        ("visual.transformer.resblocks.11.ln_1.weight", 11, "norm"),
        ("visual.ln_post.weight", None, "norm"),
        ("token_embedding.weight", None, "embed"),
        ("ln_final.weight", None, "norm"),
        ("text_projection", None, "head"),
        ("logit_scale", None, "other"),
    ],
}


@pytest.mark.parametrize("arch", sorted(NAMES))
def test_real_names_map_to_layer_and_module(arch: str) -> None:
    for name, index, module in NAMES[arch]:
        loc = locate(name)
        assert (loc.index, loc.module) == (index, module), name
        assert loc.module in MODULES


def test_single_stack_layers_are_plain_indices_in_order() -> None:
    names = [n for n, _, _ in NAMES["llama"]] + ["model.layers.2.mlp.up_proj.weight",
                                                  "model.layers.10.mlp.up_proj.weight"]
    layout = Layout(names)
    assert layout.layers == ["2", "10", "31", NO_LAYER]  # numeric order, outside last
    assert layout.layer("model.layers.31.mlp.up_proj.weight") == "31"
    assert layout.layer("lm_head.weight") == NO_LAYER
    assert layout.modules == [m for m in MODULES if m not in ("attn.qkv",)]


def test_t5_encoder_and_decoder_layers_are_told_apart() -> None:
    names = ["shared.weight",
             "encoder.block.0.layer.0.SelfAttention.q.weight",
             "encoder.block.0.layer.1.DenseReluDense.wi.weight",
             "encoder.block.1.layer.1.DenseReluDense.wo.weight",
             "decoder.block.0.layer.1.EncDecAttention.k.weight",
             "decoder.block.0.layer.2.DenseReluDense.wi_0.weight",
             "decoder.block.0.layer.2.DenseReluDense.wi_1.weight",
             "encoder.final_layer_norm.weight"]
    layout = Layout(names)
    assert layout.layers == ["encoder.0", "encoder.1", "decoder.0", NO_LAYER]
    assert layout.layer(names[4]) == "decoder.0"
    assert [layout.module(n) for n in names] == [
        "embed", "attn.q", "mlp.up", "mlp.down", "attn.k", "mlp.gate", "mlp.up", "norm"]


def test_clip_towers_are_told_apart() -> None:
    names = ["text_model.encoder.layers.0.self_attn.q_proj.weight",
             "text_model.encoder.layers.0.mlp.fc1.weight",
             "vision_model.encoder.layers.0.self_attn.out_proj.weight",
             "vision_model.encoder.layers.1.layer_norm1.weight",
             "vision_model.pre_layrnorm.weight",
             "visual_projection.weight"]
    layout = Layout(names)
    assert layout.layers == ["text_model.0", "vision_model.0", "vision_model.1", NO_LAYER]
    assert [layout.module(n) for n in names] == [
        "attn.q", "mlp.up", "attn.o", "norm", "norm", "head"]


def test_unknown_names_fall_back_to_other() -> None:
    assert module_type("foo.bar.weight") == "other"
    assert module_type("") == "other"
    assert locate("mystery_tensor") == locate("mystery_tensor")
    assert Layout(["mystery_tensor"]).layers == [NO_LAYER]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_every_tensor_of_a_real_tiny_model_is_placed(arch: str) -> None:
    tf = pytest.importorskip("transformers")
    if arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=16,
                                                 n_positions=8))
    elif arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=16))
    else:
        model = tf.T5ForConditionalGeneration(tf.T5Config(
            d_model=8, d_ff=16, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=4,
            vocab_size=16))
    names = list(model.state_dict())
    layout = Layout(names)
    others = [n for n in names if layout.module(n) == "other"]
    assert all("relative_attention_bias" in n for n in others), others
    in_layers = [n for n in names if layout.layer(n) != NO_LAYER]
    assert len(in_layers) > len(names) / 2
    assert len([lay for lay in layout.layers if lay != NO_LAYER]) == (4 if arch == "t5" else 2)
