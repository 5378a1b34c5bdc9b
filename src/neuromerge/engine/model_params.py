"""Per-model parameter values: ``models[i].parameters`` (and seeds) resolved against the
method's declaration, one value per expert."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from neuromerge.errors import ConfigError
from neuromerge.kernels import derive_seed
from neuromerge.method_api import MethodSpec


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
