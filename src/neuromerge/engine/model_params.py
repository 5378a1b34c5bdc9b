"""Parameter values per model and per tensor: ``models[i].parameters`` (and seeds) resolved
against the method's declaration, one value per expert; gradients and filters resolved at each
tensor's name and layer position."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from neuromerge.errors import ConfigError
from neuromerge.kernels import derive_seed
from neuromerge.method_api import MethodSpec
from neuromerge.param_settings import layer_positions, resolve


def model_seeds(params: Mapping[str, Any], keys: Sequence[str],
                per_model: Sequence[Mapping[str, Any]] | None = None) -> tuple[int, ...] | None:
    """Per-model seeds: an explicit per-model ``seed`` or one derived from the global seed and
    the model's identity (its path), so listing models in another order changes nothing."""
    if "seed" not in params:
        return None
    per_model = per_model or [{} for _ in keys]
    return tuple(int(pm["seed"]) if "seed" in pm else derive_seed(params["seed"], key)
                 for key, pm in zip(keys, per_model, strict=True))


def model_values(method: MethodSpec, params: Mapping[str, Any], n_models: int,
                 per_model: Sequence[Mapping[str, Any]] | None = None
                 ) -> dict[str, tuple[Any, ...]]:
    """{parameter: one value per model} for the method's per-model parameters that some model
    sets (the global value for the others); ``seed`` is handled by :func:`model_seeds`."""
    per_model = per_model or [{} for _ in range(n_models)]
    if len(per_model) != n_models:
        raise ConfigError(f"{len(per_model)} per-model parameter sets for {n_models} models")
    out: dict[str, tuple[Any, ...]] = {}
    for key in method.per_model_params:
        if key == "seed" or not any(key in pm for pm in per_model):
            continue
        checked = [method.validate({key: pm[key]}, where=f"models[{i}].parameters")[key]
                   if key in pm else params[key] for i, pm in enumerate(per_model)]
        out[key] = tuple(checked)
    return out


def tensor_parameters(method: MethodSpec, params: Mapping[str, Any],
                      per_model: Sequence[Mapping[str, Any]] | None, names: Sequence[str],
                      n_layers: int | None, positions: Mapping[str, float] | None = None
                      ) -> dict[str, tuple[dict[str, Any], dict[str, tuple[Any, ...]]]]:
    """{tensor: (its parameters, its per-model values)} with every gradient and filter
    resolved at the tensor's name and layer position (mergekit's precedence: a model's own
    setting, then the global one, then the method's default). ``positions`` (t per tensor)
    replace those read from the layer numbers."""
    n = len(per_model) if per_model is not None else 0
    positions = positions if positions is not None else layer_positions(names, n_layers)
    out = {}
    for name in names:
        t = positions[name]
        shared = {}
        for key in params:
            found, value = resolve([params], key, name, t)
            if found:
                shared[key] = value
        resolved = method.validate(shared, where=f"parameters (tensor {name!r})")
        models = []
        for block in per_model or []:
            models.append({key: value for key in block
                           for found, value in [resolve([block], key, name, t)] if found})
        out[name] = (resolved, model_values(method, resolved, n, models) if n else {})
    return out
