"""mergekit's YAML in neuromerge's terms (docs/mergekit.md). What is generic lives here; what a
method's mergekit parameters mean is declared with the method (``MethodSpec.mergekit``)."""

from __future__ import annotations

from typing import Any

from neuromerge.errors import ConfigError
from neuromerge.method_api import Mergekit, get_method
from neuromerge.param_settings import check_setting


def from_mergekit(data: dict[str, Any]) -> dict[str, Any]:
    """A mergekit config rewritten in neuromerge's terms; a neuromerge config passes unchanged.
    The input is not modified.

    Every method: ``lambda`` → ``scale``; ``int8_mask`` (a memory option of mergekit's) is
    dropped; gradients (lists) and filters (``{filter, value}`` entries) are kept, checked
    (``neuromerge.param_settings``), and resolved per tensor by the engine. Then what the
    method declares: DARE's ``density`` (keep probability) → ``drop_rate = 1 − density``;
    NeuroMerging's ``normalize`` / ``lambda``; λ = 1 for task_arithmetic / dare_linear when
    weights are given; ``linear`` without ``base_model`` takes the first model as the base (only
    its shapes and support files are used); the method's ``inputs`` hook says which models it
    merges (slerp's kind: the models other than the base; karcher: the base with them)."""
    _refuse_unsupported(data)
    out = dict(data)
    method = out.get("merge_method")
    compat = _compat(method)
    models = out.get("models")
    entries = [dict(m) if isinstance(m, dict) else m for m in models] if isinstance(
        models, list) else models
    where = ["parameters"] + [f"models[{i}].parameters" for i in range(len(entries or []))]
    blocks = [out.get("parameters")] + [e.get("parameters") if isinstance(e, dict) else None
                                        for e in (entries or [])]
    new_blocks = [_block(block, loc, compat) if isinstance(block, dict) else block
                  for loc, block in zip(where, blocks, strict=True)]
    if isinstance(out.get("parameters"), dict):
        out["parameters"] = new_blocks[0]
    if isinstance(entries, list):
        for e, block in zip(entries, new_blocks[1:], strict=True):
            if isinstance(e, dict) and isinstance(block, dict):
                e["parameters"] = block
        out["models"] = entries
    params = out.get("parameters") if isinstance(out.get("parameters"), dict) else {}
    weighted = "weight" in params or any(
        isinstance(b, dict) and "weight" in b for b in new_blocks[1:])
    if compat.weighted_scale is not None and weighted and "scale" not in params:
        out["parameters"] = {**params, "scale": compat.weighted_scale}
    if compat.inputs is not None and isinstance(out.get("models"), list):
        compat.inputs(out)
    if compat.first_model_is_base and out.get("base_model") is None \
            and isinstance(entries, list) and entries:
        first = entries[0]
        out["base_model"] = first.get("model") if isinstance(first, dict) else first
    return out


#: mergekit keys and methods not supported yet, with what to do instead (docs/mergekit.md).
UNSUPPORTED = {
    "slices": "slices / layer_range (layer-range merges and frankenmerges) are not supported "
              "yet: list whole models under models:",
    "modules": "modules: (per-module merges) is not supported yet: list whole models under "
               "models:",
    "tokenizer": "the tokenizer: block is not supported yet: use tokenizer_source: base, union "
                 "or model:ID",
    "chat_template": "chat_template is not supported yet: the chat template of the tokenizer's "
                     "source is kept; remove the key",
}


def _refuse_unsupported(data: dict[str, Any]) -> None:
    for key, why in UNSUPPORTED.items():
        if key in data:
            raise ConfigError(f"{key}: {why}")
    if data.get("merge_method") == "passthrough":
        raise ConfigError("merge_method: passthrough (stacking layer ranges) is not supported "
                          "yet")


def _compat(method: Any) -> Mergekit:
    # an unknown method is reported by the config's validation, with the list of known ones
    try:
        return get_method(method).mergekit if isinstance(method, str) else Mergekit()
    except ConfigError:
        return Mergekit()


def _block(block: dict[str, Any], loc: str, compat: Mergekit) -> dict[str, Any]:
    block = dict(block)
    for key, value in block.items():
        check_setting(value, f"{loc}.{key}")
    block.pop("int8_mask", None)  # mergekit's mask dtype: a memory option, no effect on values
    if compat.rewrite is not None:
        compat.rewrite(block, loc)
    if "lambda" in block:
        if "scale" in block:
            raise ConfigError(f"{loc}: give lambda or scale, not both (they are the same λ)")
        block["scale"] = block.pop("lambda")
    return block
