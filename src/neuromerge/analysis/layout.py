"""Where a tensor sits in the model: its layer and its module type, from its name alone.

Covers the naming of BERT / RoBERTa / DistilBERT / ViT, GPT-2 / GPT-NeoX / Falcon, Llama /
Mistral / Mixtral / Qwen2, OPT, T5 and CLIP / OpenCLIP checkpoints; anything else falls back to
module type ``other`` (and no layer), so every tensor is placed somewhere.

- The layer is the first ``layers.N`` / ``layer.N`` / ``h.N`` / ``block(s).N`` / ``resblocks.N``
  of the name. Models with several stacks of layers (T5's encoder and decoder, CLIP's text and
  vision towers) label layers with what tells the stacks apart: ``encoder.3``, ``decoder.3``,
  ``text_model.3``; a model with one stack labels them ``0``, ``1``, ... Tensors outside every
  layer (embeddings, final norm, heads) have no layer (``None``).
- Module types, in display order: ``MODULES``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

#: Module types in display order.
MODULES = ("embed", "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o",
           "mlp.gate", "mlp.up", "mlp.down", "norm", "head", "other")
#: The label of tensors outside every layer (embeddings, final norm, heads).
NO_LAYER = "outside layers"

_LAYER = re.compile(r"(?:^|\.)(layers|layer|h|blocks|block|resblocks)\.(\d+)(?=\.|$)")
_NORM = re.compile(r"norm|^ln(_|\d|$)")
_EMBED = re.compile(r"embed|^wte$|^wpe$|^shared$|cls_token|^mask_token$|^pos_?emb|"
                    r"^positional_embedding$|^class_embedding$")
_HEAD = re.compile(r"^lm_head$|^classifier$|^cls$|^score$|^pooler$|projection$|^head$|"
                   r"^heads$|^qa_outputs$|^pre_classifier$|^vocab_(transform|projector)$")
_ATTN = re.compile(r"attn|attention")
_QKV = re.compile(r"^(c_attn|qkv|qkv_proj|query_key_value|in_proj|wqkv|w_pack|qkv_lin)$")
_Q = re.compile(r"^(q|q_proj|query|wq|q_lin|q_attn)$")
_K = re.compile(r"^(k|k_proj|key|wk|k_lin)$")
_V = re.compile(r"^(v|v_proj|value|wv|v_lin)$")
_O = re.compile(r"^(o|o_proj|out_proj|c_proj|dense|wo|out_lin|proj|out|output)$")
_MLP = re.compile(r"mlp|ffn|feed_?forward|densereludense|intermediate|^output$|moe|^experts?$|"
                  r"^fc\d$|^c_fc$|^dense_h_to_4h$|^dense_4h_to_h$")
_GATE = re.compile(r"^(gate_proj|w1|wi_0|w_gate)$")
_UP = re.compile(r"^(up_proj|fc1|c_fc|wi|wi_1|dense_h_to_4h|fc_in|w3|lin1|gate_up_proj|w_in)$")
_DOWN = re.compile(r"^(down_proj|fc2|c_proj|wo|dense_4h_to_h|fc_out|w2|lin2|w_out)$")


@dataclass(frozen=True)
class Location:
    """A tensor's place: the layer stack (the name up to the layer container, e.g.
    ``encoder.block``), the layer index in it, and the module type."""

    stack: str | None
    index: int | None
    module: str


def _parts(name: str) -> list[str]:
    parts = [p.lower() for p in name.split(".") if p]
    if len(parts) > 1 and parts[-1] in ("weight", "bias", "scale"):
        parts = parts[:-1]
    if parts:
        parts[-1] = re.sub(r"_(weight|bias)$", "", parts[-1])  # OpenCLIP's in_proj_weight
    return parts


def module_type(name: str) -> str:
    """The module type of a tensor name (one of ``MODULES``)."""
    parts = _parts(name)
    if not parts:
        return "other"
    leaf, context = parts[-1], parts[:-1]
    if any(_NORM.search(p) for p in parts):
        return "norm"
    if leaf == "embed_out":  # GPT-NeoX's LM head
        return "head"
    if any(_EMBED.search(p) for p in parts):
        return "embed"
    if any(_HEAD.search(p) for p in parts):
        return "head"
    if any(_ATTN.search(p) for p in context):
        for pattern, kind in ((_QKV, "attn.qkv"), (_Q, "attn.q"), (_K, "attn.k"),
                              (_V, "attn.v"), (_O, "attn.o")):
            if pattern.search(leaf):
                return kind
        return "other"  # T5's relative_attention_bias, ...
    if any(_MLP.search(p) for p in parts):
        if _GATE.search(leaf):
            return "mlp.gate"
        if _UP.search(leaf) or "intermediate" in context:  # BERT: intermediate.dense
            return "mlp.up"
        if _DOWN.search(leaf) or (leaf == "dense" and "output" in context):  # output.dense
            return "mlp.down"
    return "other"


def locate(name: str) -> Location:
    """Layer stack, layer index and module type of one tensor name."""
    m = _LAYER.search(name)
    if m is None:
        return Location(None, None, module_type(name))
    return Location(name[:m.start(2) - 1], int(m.group(2)), module_type(name))


class Layout:
    """Layer labels and module types of a model's tensor names: ``layout.layer(name)`` (a label,
    or ``NO_LAYER``), ``layout.module(name)``; ``layout.layers`` and ``layout.modules`` list the
    labels and types present, in display order (layers by stack, then index; ``NO_LAYER``
    last)."""

    def __init__(self, names: Iterable[str]) -> None:
        self._loc = {n: locate(n) for n in names}
        stacks = list(dict.fromkeys(loc.stack for loc in self._loc.values()
                                    if loc.stack is not None))
        self._stack_label = _stack_labels(stacks)
        order = {s: i for i, s in enumerate(stacks)}
        keyed = {(order[loc.stack], loc.index) for loc in self._loc.values()
                 if loc.stack is not None and loc.index is not None}
        self.layers = [self._label(stacks[s], i) for s, i in sorted(keyed)]
        if any(loc.stack is None for loc in self._loc.values()):
            self.layers.append(NO_LAYER)
        present = {loc.module for loc in self._loc.values()}
        self.modules = [m for m in MODULES if m in present]

    def _label(self, stack: str, index: int) -> str:
        prefix = self._stack_label[stack]
        return f"{prefix}.{index}" if prefix else str(index)

    def layer(self, name: str) -> str:
        loc = self._loc.get(name) or locate(name)
        if loc.stack is None or loc.index is None:
            return NO_LAYER
        return self._label(loc.stack, loc.index) if loc.stack in self._stack_label \
            else f"{loc.stack}.{loc.index}"

    def module(self, name: str) -> str:
        return (self._loc.get(name) or locate(name)).module


def _stack_labels(stacks: list[str]) -> dict[str, str]:
    """One stack: no prefix. Several: each stack's name without the components all share
    (T5: encoder.block / decoder.block → encoder / decoder)."""
    if len(stacks) <= 1:
        return dict.fromkeys(stacks, "")
    split = [s.split(".") for s in stacks]
    common = set.intersection(*(set(p) for p in split))
    labels = {}
    for s, p in zip(stacks, split, strict=True):
        rest = [c for c in p if c not in common]
        labels[s] = ".".join(rest) if rest else s
    if len(set(labels.values())) < len(stacks):  # not distinct: use the whole stack names
        return {s: s for s in stacks}
    return labels
