"""The contract between the engine and a merge method: what a method declares about itself
(:class:`MethodSpec`), what the engine hands it with each tensor (:class:`TensorContext`), what
the merge-wide trim pass measured (:class:`TrimSummary`), and the table of registered methods.

Methods are declared with :func:`neuromerge.registry.merge_method`; the built-in ones are
registered when the ``neuromerge`` package is imported. This module imports no method and no
engine code, so both can depend on it.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ValidationError

from neuromerge.errors import ConfigError
from neuromerge.param_settings import is_uniform, leaves

TensorKind = Literal["neuronal", "point"]

#: Per-model data statistics a method may need (``@merge_method(needs=...)``): a diagonal Fisher
#: (same shape as each tensor) or RegMean's Gram matrices of linear layers' inputs ((in, in)).
StatisticsKind = Literal["fisher", "regmean"]


@dataclass(frozen=True)
class TensorContext:
    """What the engine knows about the tensor being merged, beyond its values.

    ``thresholds`` are the per-task magnitude thresholds of a model-wide (global) trim, or of this
    tensor's own trim when it is merged in row blocks; ``None`` means "trim this tensor on its
    own". ``model_seeds`` seed per-model randomness (DARE) so the result does not depend on the
    order in which the models are listed. ``statistics`` holds, for a method declared with
    ``needs``, each model's statistic for this tensor (the rows at hand of a Fisher; a whole
    Gram matrix), in the compute dtype, or ``None`` where the tensor has none.

    A tensor too large for the memory budget is merged in row blocks (every built-in method is
    row-local): ``row_offset`` is the block's first row, and ``sums`` holds the whole tensor's
    value of each quantity a method reads through :meth:`tensor_sum` (the engine collects them
    in a first pass over the blocks, running the method with ``collect`` set).
    """

    name: str = "tensor"
    kind: TensorKind | None = None
    thresholds: tuple[float, ...] | None = None
    model_seeds: tuple[int, ...] | None = None
    row_offset: int = 0
    sums: Mapping[str, float] | None = None
    collect: SumCollector | None = None
    statistics: tuple[torch.Tensor, ...] | None = None
    #: Per-model values of the method's ``per_model_params`` (``models[i].parameters``, the
    #: global value where a model sets none), one per tensor in ``tensors`` order.
    model_params: Mapping[str, tuple[Any, ...]] | None = None

    def per_model(self, key: str, value: Any, n: int) -> tuple[Any, ...]:
        """Model t's value of parameter ``key``: from :attr:`model_params`, else the method's
        own (global) ``value`` for every model."""
        if self.model_params is not None and key in self.model_params:
            values = self.model_params[key]
            if len(values) != n:
                raise ValueError(f"{len(values)} per-model {key!r} values for {n} models")
            return tuple(values)
        return (value,) * n

    def resolved_kind(self, base: torch.Tensor) -> TensorKind:
        if self.kind is not None:
            return self.kind
        return "neuronal" if base.dim() >= 2 else "point"

    def tensor_sum(self, key: str, local: Callable[[], float]) -> float:
        """A sum over the whole tensor (``local()`` computes it over the rows at hand).

        Methods use it for tensor-wide tie-breaks, so that a tensor merged in row blocks gives
        the same result as merged whole."""
        if self.sums is not None:
            return self.sums[key]
        value = float(local())
        if self.collect is not None:
            self.collect.add(key, value)
        return value


class SumsCollected(Exception):
    """Raised by :meth:`TensorContext.tensor_sum` once a block has given every sum the method
    asks for: the rest of the method's work on that block is not needed."""


@dataclass
class SumCollector:
    """Accumulates a method's :meth:`TensorContext.tensor_sum` values over a tensor's row blocks.
    ``stop_after``: the number of sums the method asks for (learnt on the first block)."""

    values: dict[str, float] = field(default_factory=dict)
    calls: int = 0
    stop_after: int | None = None

    def add(self, key: str, value: float) -> None:
        self.values[key] = self.values.get(key, 0.0) + value
        self.calls += 1
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise SumsCollected


@dataclass(frozen=True)
class TrimSummary:
    """What the engine's merge-wide trim pass measured, before the merge.

    ``l1_total[t]`` is ‖τt‖₁ over all merged entries and ``l1_kept[t]`` ‖trim(τt)‖₁, so that
    σt = 1 − kept/total is the share of task t's L1 mass the trim removed.
    """

    density: float
    scope: str
    n_entries: int
    k: int | None
    thresholds: tuple[float, ...] | None
    l1_total: tuple[float, ...]
    l1_kept: tuple[float, ...]

    @property
    def sigma(self) -> tuple[float, ...]:
        # A task whose task vector is all zero lost nothing: σ = 0.
        return tuple(
            0.0 if tot <= 0.0 else max(0.0, 1.0 - kept / tot)
            for tot, kept in zip(self.l1_total, self.l1_kept, strict=True)
        )


@dataclass(frozen=True)
class ParamSpec:
    name: str
    annotation: Any
    default: Any
    description: str

    @property
    def type_name(self) -> str:
        return describe_type(self.annotation)


def default_working_set(n_models: int, compute_itemsize: int) -> int:
    """Bytes per tensor entry a method's working copies take (beyond the inputs as stored): the
    task vectors in the compute dtype and up to six float64 per entry (NeuroMerging's per-neuron
    parts, the largest of the built-in methods). Measured peaks stay below the engine's
    estimate built on it (tests/test_memory.py)."""
    return (n_models + 1) * compute_itemsize + 48


@dataclass(frozen=True)
class Mergekit:
    """How a mergekit YAML for this method maps onto its parameters (``neuromerge.config``
    applies it; docs/mergekit.md). ``rewrite(block, where)`` edits one parameter block (the
    global one, then each model's) in place, before mergekit's ``lambda`` becomes ``scale``;
    ``weighted_scale``: λ's default when the models set weights (mergekit sums weighted task
    vectors); ``first_model_is_base``: without ``base_model`` the first model is the base;
    ``inputs(config)`` edits the whole config in place (after the parameter blocks, before
    ``first_model_is_base``): which of mergekit's inputs the method gets as its ``tensors``
    (mergekit adds the base to the inputs when ``models`` does not list it); ``defaults``:
    mergekit's values of parameters whose neuromerge default differs (a YAML config that leaves
    them unset means mergekit's)."""

    rewrite: Callable[[dict[str, Any], str], None] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    weighted_scale: float | None = None
    first_model_is_base: bool = False
    inputs: Callable[[dict[str, Any]], None] | None = None


@dataclass(frozen=True)
class MethodSpec:
    """What a merge method declares about itself: its parameters (from its signature) and what
    the engine must know to plan and run it. Built by :func:`neuromerge.registry.merge_method`.

    ``linear_in`` maps each parameter the merged delta is linear in to the parameter values that
    give that component alone (``{"scale": {"scale": 1.0}}``; NeuroMerging's λ1 and λ2 each set
    the other to 0): a merge at other values is θ0 + Σ value · component, which the benchmark's
    tuned mode uses to score a grid from a few merges. ``working_set(n_models, itemsize)``: bytes
    per entry of the method's working copies, which size the engine's row blocks.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    reference_url: str
    summary: str
    doc: str
    params: tuple[ParamSpec, ...]
    trims: bool
    needs_base: bool
    per_model_params: tuple[str, ...]
    resolve: Callable[[dict[str, Any], TrimSummary | None], dict[str, Any]] | None = None
    trim_pass_if: Callable[[dict[str, Any]], bool] | None = None
    row_local: bool = True
    needs: StatisticsKind | None = None
    linear_in: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    working_set: Callable[[int, int], int] = default_working_set
    mergekit: Mergekit = Mergekit()
    #: How many models besides the base it merges: (at least, at most; None: no limit).
    n_models: tuple[int, int | None] = (1, None)
    _model: type[BaseModel] | None = field(default=None, repr=False, compare=False)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    @property
    def yaml_defaults(self) -> dict[str, Any]:
        """The method's own defaults that a YAML config must spell out to get them (a YAML
        leaving them unset means mergekit's): what the bench and the demo write."""
        own = self.defaults
        return {k: own[k] for k in self.mergekit.defaults}

    def validate(self, params: Mapping[str, Any] | None = None, *, where: str = "parameters"
                 ) -> dict[str, Any]:
        """Check ``params`` against the signature; return all parameters with defaults filled."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.param_names))
        if unknown:
            known = ", ".join(self.param_names) or "none"
            raise ConfigError(
                f"{where}: unknown parameter {unknown[0]!r} for method {self.name!r} "
                f"(it takes: {known})"
            )
        assert self._model is not None
        try:
            model = self._model.model_validate(params)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, where)) from None
        return {name: getattr(model, name) for name in self.param_names}

    def validate_settings(self, params: Mapping[str, Any] | None = None, *,
                          where: str = "parameters", fill: bool = True) -> dict[str, Any]:
        """:meth:`validate` for settings that may vary per tensor (mergekit's gradients and
        filters, ``neuromerge.param_settings``): plain values are validated (and, with
        ``fill``, defaults added), each value a gradient or filter can take is validated, and
        the setting itself is kept for the engine to resolve per tensor."""
        params = dict(params or {})
        varying = {k: v for k, v in params.items() if not is_uniform(v)}
        plain = {k: v for k, v in params.items() if k not in varying}
        out = self.validate(plain, where=where) if fill else (
            {k: self.validate({k: v}, where=where)[k] for k, v in plain.items()})
        for key, setting in varying.items():
            if key in MERGE_WIDE:
                raise ConfigError(f"{where}.{key}: one value for the whole model (it is not a "
                                  f"per-tensor parameter)")
            for leaf in leaves(setting):
                value = self.validate({key: leaf}, where=where)[key]
                if value == "auto":
                    raise ConfigError(f"{where}.{key}: 'auto' is resolved over the whole "
                                      f"model; it cannot vary per tensor")
            out[key] = setting
        return out

    def needs_trim_pass(self, params: Mapping[str, Any],
                        densities: Sequence[float] | None = None) -> bool:
        """Whether the engine must stream the whole model once before merging (``densities``:
        the per-model densities, where models set their own)."""
        lowest = min(densities) if densities else params.get("density", 1)
        if self.trims and params.get("trim_scope") == "global" and lowest < 1:
            return True
        return bool(self.trim_pass_if and self.trim_pass_if(dict(params)))

    def resolved(self, params: dict[str, Any], trim: TrimSummary | None) -> dict[str, Any]:
        """Replace data-dependent values (``lambda2: auto``) with numbers."""
        return self.resolve(dict(params), trim) if self.resolve else dict(params)

    def check_models(self, n: int) -> None:
        """Refuse a merge of ``n`` models besides the base that the method does not take."""
        least, most = self.n_models
        if least <= n and (most is None or n <= most):
            return
        want = (f"at least {least}" if most is None else
                f"exactly {least}" if least == most else f"{least} to {most}")
        raise ConfigError(f"{self.name} merges {want} model{'' if want.endswith(' 1') else 's'} "
                          f"besides the base (got {n})")

    def merge_tensor(self, base: torch.Tensor, tensors: Sequence[torch.Tensor],
                     ctx: TensorContext, params: Mapping[str, Any]) -> torch.Tensor:
        """Engine entry point: params already validated and resolved; the base in the compute
        dtype, the models as stored (``kernels.task_vectors`` converts each as it subtracts)."""
        return self.fn(base, list(tensors), ctx=ctx, **params)


#: Parameters the merge-wide passes or the random streams depend on: one value per merge.
MERGE_WIDE = ("trim_scope", "seed")

_REGISTRY: dict[str, MethodSpec] = {}


def register(method: MethodSpec) -> None:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} registered twice")
    _REGISTRY[method.name] = method


def unregister(name: str) -> None:
    """Remove a method (a test's or a plugin's); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name`` (a :class:`neuromerge.registry.MergeMethod`)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge_method {name!r} (available: {', '.join(sorted(_REGISTRY))})"
        ) from None


def all_methods() -> list[MethodSpec]:
    return list(_REGISTRY.values())


def describe_type(annotation: Any) -> str:
    """A short human name for a parameter type: ``float``, ``global | tensor``, ``float | auto``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return describe_type(typing.get_args(annotation)[0])
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [describe_type(a) for a in typing.get_args(annotation)]
        return " | ".join("null" if p == "NoneType" else p for p in parts)
    return getattr(annotation, "__name__", str(annotation))


def format_validation_error(exc: ValidationError, where: str) -> str:
    """Fold a pydantic error into one line: ``where.field: message (got value)``.

    A union type reports one error per member; those are joined under the field's name."""
    by_field: dict[str, list[str]] = {}
    got: dict[str, Any] = {}
    for err in exc.errors():
        loc = str(err["loc"][0]) if err["loc"] else ""
        by_field.setdefault(loc, []).append(err["msg"])
        got.setdefault(loc, err.get("input"))
    parts = []
    for loc, msgs in by_field.items():
        prefix = f"{where}.{loc}" if loc else where
        value = got[loc]
        shown = f" (got {value!r})" if loc and not isinstance(value, dict) else ""
        parts.append(f"{prefix}: {' or '.join(dict.fromkeys(msgs))}{shown}")
    return "; ".join(parts)
