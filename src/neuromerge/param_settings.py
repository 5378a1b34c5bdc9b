"""Parameter settings as mergekit writes them: a value, a gradient (a list interpolated over the
layers), or filters (``[{filter: S, value: V}, ...]``: the first entry whose ``S`` is in the
tensor's name wins; an entry without ``filter``, or ``filter: "*"``, matches every tensor), and
their resolution for one tensor at its position ``t`` in the layer stack (mergekit 0.1.5's
``evaluate_setting``).

Positions: the tensors of layer i of n have t = i / (n − 1) (t = 1 for a one-layer stack);
tensors outside the layers (embeddings, final norm, heads) have t = 0, as in mergekit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from neuromerge.errors import ConfigError

Scalar = bool | int | float | str
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?=\.|$)")


def is_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float | str) or value is None


def is_uniform(setting: Any) -> bool:
    """A plain value: the same for every tensor."""
    return is_scalar(setting)


def varying_keys(blocks: Iterable[Mapping[str, Any] | None]) -> tuple[str, ...]:
    """The parameters some block (global, per model) gives as a gradient or filters."""
    return tuple(dict.fromkeys(k for block in blocks for k, v in (block or {}).items()
                               if not is_uniform(v)))


def leaves(setting: Any) -> list[Any]:
    """Every value a setting can take (gradient endpoints, filter values)."""
    if is_scalar(setting):
        return [setting]
    if isinstance(setting, Mapping):
        return leaves(setting.get("value"))
    if isinstance(setting, list):
        return [v for item in setting for v in leaves(item)]
    return [setting]


def map_leaves(setting: Any, fn: Callable[[Any], Any]) -> Any:
    """The setting with ``fn`` applied to each of its values (filters and gradients kept)."""
    if is_scalar(setting):
        return fn(setting)
    if isinstance(setting, Mapping):
        return {**setting, "value": map_leaves(setting.get("value"), fn)}
    if isinstance(setting, list):
        return [map_leaves(item, fn) for item in setting]
    return setting


def check_setting(setting: Any, where: str) -> None:
    """Refuse what mergekit's schema refuses: filters with keys other than filter / value, nested
    lists, empty gradients."""
    if is_scalar(setting):
        return
    if isinstance(setting, Mapping):
        extra = sorted(set(setting) - {"filter", "value"})
        if extra or "value" not in setting:
            raise ConfigError(f"{where}: a filter entry is {{filter: NAME, value: V}} "
                              f"(got keys {sorted(setting)})")
        if setting.get("filter") is not None and not isinstance(setting["filter"], str):
            raise ConfigError(f"{where}.filter: must be a string (got {setting['filter']!r})")
        check_setting(setting["value"], f"{where}.value")
        return
    if isinstance(setting, list):
        if not setting:
            raise ConfigError(f"{where}: an empty list (give a value, a gradient or filters)")
        if all(is_scalar(v) for v in setting):
            return
        for i, item in enumerate(setting):
            if not isinstance(item, Mapping):
                raise ConfigError(f"{where}[{i}]: a list is either a gradient of values or a "
                                  f"list of {{filter, value}} entries, not a mix")
            check_setting(item, f"{where}[{i}]")
        return
    raise ConfigError(f"{where}: expected a value, a gradient or filters (got {setting!r})")


def evaluate(setting: Any, tensor: str, t: float) -> Any:
    """The setting's value for ``tensor`` at layer position ``t``; None where no filter matches
    (the next scope then decides). A numeric gradient interpolates linearly between its
    neighbouring points; a gradient of other values takes the point at or below t."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if is_scalar(setting):
        return setting
    if all(is_scalar(v) for v in setting):
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        pattern = cond.get("filter")
        if pattern is None or pattern == "*" or (tensor and pattern in tensor):
            return evaluate(cond["value"], tensor, t)
    return None


def resolve(scopes: Sequence[Mapping[str, Any] | None], key: str, tensor: str, t: float
            ) -> tuple[bool, Any]:
    """(found, value) of ``key`` for ``tensor``: the first scope (highest precedence first)
    whose setting gives a value."""
    for scope in scopes:
        if scope is not None and key in scope:
            value = evaluate(scope[key], tensor, t)
            if value is not None:
                return True, value
    return False, None


def layer_index(name: str) -> int | None:
    """The layer a tensor belongs to (``model.layers.3.mlp...`` → 3), None outside the layers."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def with_layer_index(name: str, index: int) -> str:
    """``name`` with its layer number replaced (a layer moved in a slices merge)."""
    m = _LAYER.search(name)
    if m is None:
        raise ValueError(f"{name!r} is not a layer's tensor")
    return f"{name[:m.start(1)]}{index}{name[m.end(1):]}"


def layer_positions(names: Sequence[str], n_layers: int | None = None) -> dict[str, float]:
    """Each tensor's t: its layer index i over the stack's n layers (``n_layers``, else the
    largest index seen + 1), t = i / (n − 1); 0 outside the layers."""
    index = {n: int(m.group(1)) for n in names if (m := _LAYER.search(n))}
    n = n_layers or (max(index.values()) + 1 if index else 1)
    return {name: (index[name] / (n - 1) if n > 1 else 1.0) if name in index else 0.0
            for name in names}


def fallback(first: Any, then: Any) -> Any:
    """One setting that reads ``first`` and, for a tensor no filter of ``first`` matches,
    ``then`` (mergekit's chain of scopes, e.g. a slice's parameters over the global ones)."""
    if then is None:
        return first
    entries = [first] if isinstance(first, Mapping) else first
    if is_scalar(first) or all(is_scalar(v) for v in entries) or any(
            e.get("filter") in (None, "*") for e in entries):
        return first  # a value, a gradient, or filters with a default: nothing falls through
    rest = [then] if isinstance(then, Mapping) else then
    if is_scalar(then) or all(is_scalar(v) for v in rest):
        rest = [{"value": then}]
    return [*entries, *rest]
