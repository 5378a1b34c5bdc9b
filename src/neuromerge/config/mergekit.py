"""mergekit's YAML in neuromerge's terms (docs/mergekit.md). What is generic lives here; what a
method's mergekit parameters mean is declared with the method (``MethodSpec.mergekit``)."""

from __future__ import annotations

import difflib
import logging
from typing import Any

from neuromerge.errors import ConfigError
from neuromerge.method_api import Mergekit, get_method
from neuromerge.param_settings import check_setting

log = logging.getLogger("neuromerge")


def from_mergekit(data: dict[str, Any], *, filled: list[str] | None = None) -> dict[str, Any]:
    """A mergekit config rewritten in neuromerge's terms; a neuromerge config passes unchanged.
    The input is not modified; ``filled`` (if given) receives the names of the global
    parameters set to mergekit's defaults because the config left them unset.

    Every method: ``lambda`` → ``scale``; ``int8_mask`` (a memory option of mergekit's) is
    dropped; gradients (lists) and filters (``{filter, value}`` entries) are kept, checked
    (``neuromerge.param_settings``), and resolved per tensor by the engine. Then what the
    method declares: DARE's ``density`` (keep probability) → ``drop_rate = 1 − density``;
    NeuroMerging's ``normalize`` / ``lambda``; λ = 1 for task_arithmetic / dare_linear when
    weights are given; ``linear`` without ``base_model`` takes the first model as the base (only
    its shapes and support files are used); the method's ``inputs`` hook says which models it
    merges (slerp's kind: the models other than the base; karcher: the base with them)."""
    refuse_unsupported(data)
    out = half_dtype_output(tokenizer_keys(dict(data)))
    method = out.get("merge_method")
    compat, names = _compat(method)
    models = out.get("models")
    entries = [dict(m) if isinstance(m, dict) else m for m in models] if isinstance(
        models, list) else models
    where = ["parameters"] + [f"models[{i}].parameters" for i in range(len(entries or []))]
    blocks = [out.get("parameters")] + [e.get("parameters") if isinstance(e, dict) else None
                                        for e in (entries or [])]
    new_blocks = [_block(block, loc, compat, names, str(method)) if isinstance(block, dict)
                  else block for loc, block in zip(where, blocks, strict=True)]
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
        out["parameters"] = params = {**params, "scale": compat.weighted_scale}
        if filled is not None:
            filled.append("scale")
    unset = {k: v for k, v in compat.defaults.items() if k not in params}
    if filled is not None:
        filled.extend(unset)
    if unset:
        log.info("%s: unset parameters take mergekit's defaults: %s", method,
                 ", ".join(f"{k}={v}" for k, v in unset.items()))
        out["parameters"] = {**params, **unset}
    if compat.inputs is not None and isinstance(out.get("models"), list):
        compat.inputs(out)
    if compat.first_model_is_base and out.get("base_model") is None \
            and isinstance(entries, list) and entries:
        first = entries[0]
        out["base_model"] = first.get("model") if isinstance(first, dict) else first
    return out


#: mergekit keys and methods not supported yet, with what to do instead (docs/mergekit.md).
UNSUPPORTED = {
    "modules": "modules: (per-module merges) is not supported yet: list whole models under "
               "models:",
}


def half_dtype_output(data: dict[str, Any]) -> dict[str, Any]:
    """``dtype: bfloat16`` / ``float16`` without ``out_dtype`` writes that dtype, as mergekit
    (which computes in it too; neuromerge computes half precision in float32). A float32 or
    float64 ``dtype`` stays the compute dtype only: the output keeps the base's dtype."""
    if data.get("dtype") in ("float16", "bfloat16") and data.get("out_dtype") is None:
        data["out_dtype"] = data["dtype"]
    return data


def tokenizer_keys(data: dict[str, Any]) -> dict[str, Any]:
    """mergekit's ``tokenizer: {source: ...}`` block as ``tokenizer_source`` (its default
    source is ``union``), and a model given as ``tokenizer_source: ID`` (mergekit's form) as
    ``model:ID``."""
    if "tokenizer" in data:
        block = data.pop("tokenizer")
        if not isinstance(block, dict):
            raise ConfigError("tokenizer: a mapping {source: base | union | MODEL, ...}")
        if "tokenizer_source" in data:
            raise ConfigError("give tokenizer_source or tokenizer, not both (as mergekit)")
        extra = sorted(set(block) - {"source", "tokens", "pad_to_multiple_of"})
        if extra:
            raise ConfigError(f"tokenizer: unknown key {extra[0]!r} (source, tokens, "
                              f"pad_to_multiple_of)")
        for key, why in TOKENIZER_UNSUPPORTED.items():
            if block.get(key):
                raise ConfigError(f"tokenizer.{key}: {why}")
        data["tokenizer_source"] = block.get("source", "union")
    source = data.get("tokenizer_source")
    if isinstance(source, str) and source not in ("base", "union") and \
            not source.startswith("model:"):
        data["tokenizer_source"] = f"model:{source}"
    return data


#: parts of mergekit's tokenizer: block not supported yet (docs/mergekit.md#not-supported-yet)
TOKENIZER_UNSUPPORTED = {
    "tokens": "per-token embedding sources are not supported yet: a token one model lacks "
              "takes the row of the models that have it (docs/mergekit.md#vocabularies-that-"
              "differ); remove the key",
    "pad_to_multiple_of": "padding the vocabulary is not supported yet: remove the key (the "
                          "output has the union's rows)",
}


def refuse_unsupported(data: dict[str, Any]) -> None:
    """One line for each mergekit key not supported (docs/mergekit.md#not-supported)."""
    for key, why in UNSUPPORTED.items():
        if key in data:
            raise ConfigError(f"{key}: {why}")


def _compat(method: Any) -> tuple[Mergekit, frozenset[str] | None]:
    """The method's mergekit declaration and parameter names (None: unknown method, reported
    by the config's validation with the list of known ones)."""
    try:
        spec = get_method(method) if isinstance(method, str) else None
    except ConfigError:
        spec = None
    if spec is None:
        return Mergekit(), None
    return spec.mergekit, frozenset(p.name for p in spec.params)


def _block(block: dict[str, Any], loc: str, compat: Mergekit,
           names: frozenset[str] | None, method: str = "") -> dict[str, Any]:
    block = {k: ignore_extra_keys(v, f"{loc}.{k}") for k, v in block.items()}
    for key, value in block.items():
        check_setting(value, f"{loc}.{key}")
    block.pop("int8_mask", None)  # mergekit's mask dtype: a memory option, no effect on values
    if compat.rewrite is not None:
        compat.rewrite(block, loc)
    if "lambda" in block:
        if "scale" in block:
            raise ConfigError(f"{loc}: give lambda or scale, not both (they are the same λ)")
        block["scale"] = block.pop("lambda")
    for key in [k for k in block if names is not None and k not in names]:
        # mergekit reads only the parameters a method declares: a published config with a
        # misspelt key runs there, with the default; here too, but not silently
        near = difflib.get_close_matches(key, sorted(names), n=1)
        log.warning("%s.%s: not a parameter of %s%s: ignored, as mergekit does", loc, key,
                    method, f" (did you mean {near[0]!r}?)" if near else "")
        del block[key]
    return block


def ignore_extra_keys(setting: Any, where: str) -> Any:
    """A setting whose filter entries' keys other than filter / value are dropped with a
    warning: mergekit's schema ignores them (an old example's ``pattern:`` is not a filter
    there, so the entry matches every tensor, here too)."""
    if isinstance(setting, dict) and "value" in setting and set(setting) - {"filter", "value"}:
        extra = sorted(set(setting) - {"filter", "value"})
        log.warning("%s: %s ignored, as mergekit 0.1.5 does (write filter: to match tensor "
                    "names); this entry %s", where, ", ".join(repr(k) for k in extra),
                    "matches every tensor" if "filter" not in setting else "keeps its filter")
        return {k: v for k, v in setting.items() if k in ("filter", "value")}
    if isinstance(setting, list):
        return [ignore_extra_keys(v, f"{where}[{i}]") for i, v in enumerate(setting)]
    return setting
