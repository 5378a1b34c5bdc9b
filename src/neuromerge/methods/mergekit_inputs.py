"""Which of a mergekit config's models a method merges (``Mergekit(inputs=...)``).

mergekit adds ``base_model`` to a merge's inputs when ``models`` does not list it, then each
method takes what it needs: slerp-like methods the base and the other models ("non-base"),
karcher all inputs alike. neuromerge hands a method the base apart and every model under
``models`` as ``tensors``, so these hooks edit the model list to match."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from neuromerge.errors import ConfigError


def _path(entry: Any) -> Any:
    return entry.get("model") if isinstance(entry, dict) else entry


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return os.path.normpath(a) == os.path.normpath(b)
    return a == b


def drop_listed_base(config: dict[str, Any]) -> None:
    """The base's entry under ``models`` (mergekit slerp configs list it) is removed: the method
    gets the non-base models as ``tensors``."""
    base = config.get("base_model")
    if base is not None:
        config["models"] = [m for m in config["models"] if not _same(_path(m), base)]


def include_base(config: dict[str, Any]) -> None:
    """The base is appended to ``models`` where they do not list it (mergekit's order): the
    method gets every input, base included, as ``tensors``."""
    base = config.get("base_model")
    if base is not None and not any(_same(_path(m), base) for m in config["models"]):
        config["models"] = [*config["models"], {"model": base}]


def optional_base(config: dict[str, Any]) -> None:
    """With ``base_model``: as :func:`drop_listed_base`. Without: the first model stands in as
    the base (its shapes and support files only) and ``use_base: false`` tells the method to
    merge the models themselves rather than their task vectors."""
    if config.get("base_model") is not None:
        drop_listed_base(config)
        return
    if config["models"]:
        config["base_model"] = _path(config["models"][0])
        params = config.get("parameters")
        params = dict(params) if isinstance(params, dict) else {}
        params.setdefault("use_base", False)
        config["parameters"] = params


def other_model(method: str, base: torch.Tensor, tensors: Sequence[torch.Tensor]
                ) -> torch.Tensor:
    """The one model other than the base, for methods of two inputs (the base and one other).
    Given two tensors, the first equal to the base (bit for bit) is taken to be the base listed
    among the models (a config's model list is edited so by :func:`drop_listed_base`)."""
    if len(tensors) == 1:
        return tensors[0].to(base.dtype)
    if len(tensors) == 2:
        for i in (0, 1):
            if torch.equal(tensors[i], base):
                return tensors[1 - i].to(base.dtype)
    raise ConfigError(f"{method} merges the base with exactly one other model "
                      f"(got {len(tensors)} models besides the base)")


def copies_of_base(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every model equals the base bit for bit: the spherical methods then return the
    base itself (mergekit's formulas give it up to rounding; its multislerp refuses it)."""
    return all(torch.equal(t.to(base.dtype), base) for t in tensors)


def in_base_dtype(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The models in the compute dtype (the base's), as mergekit computes on its ``dtype``."""
    return [t.to(base.dtype) for t in tensors]
