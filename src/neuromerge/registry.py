"""Method registry: a merge method is a plain function of tensors whose typed, defaulted keyword
signature *is* its parameter list. Config validation, ``neuromerge methods`` and docs/methods.md
all derive from that one declaration (the pattern of mergekit's ``@merge_method``)."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic.fields import FieldInfo

from neuromerge.errors import ConfigError

TensorKind = Literal["neuronal", "point"]

#: Per-model data statistics a method may need (``@merge_method(needs=...)``): a diagonal Fisher
#: (same shape as each tensor) or RegMean's Gram matrices of linear layers' inputs ((in, in)).
StatisticsKind = Literal["fisher", "regmean"]

#: The arguments every method receives that are not user parameters.
_RESERVED = ("base", "tensors", "ctx")


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
class TrimStats:
    """Model-wide trimming statistics, computed by the engine in a streaming pass.

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


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method. Call it like the function it wraps: ``ties(base, [a, b])``."""

    name: str
    fn: Callable[..., torch.Tensor]
    reference_url: str
    summary: str
    doc: str
    params: tuple[ParamSpec, ...]
    trims: bool
    needs_base: bool
    per_model_params: tuple[str, ...]
    resolve: Callable[[dict[str, Any], TrimStats | None], dict[str, Any]] | None = None
    needs_stats: Callable[[dict[str, Any]], bool] | None = None
    row_local: bool = True
    needs: StatisticsKind | None = None
    _model: type[BaseModel] | None = field(default=None, repr=False, compare=False)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

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

    def wants_stats(self, params: Mapping[str, Any],
                    densities: Sequence[float] | None = None) -> bool:
        """Whether the engine must stream the whole model once before merging (``densities``:
        the per-model densities, where models set their own)."""
        lowest = min(densities) if densities else params.get("density", 1)
        if self.trims and params.get("trim_scope") == "global" and lowest < 1:
            return True
        return bool(self.needs_stats and self.needs_stats(dict(params)))

    def resolved(self, params: dict[str, Any], stats: TrimStats | None) -> dict[str, Any]:
        """Replace data-dependent values (``lambda2: auto``) with numbers."""
        return self.resolve(dict(params), stats) if self.resolve else dict(params)

    def merge_tensor(self, base: torch.Tensor, tensors: Sequence[torch.Tensor],
                     ctx: TensorContext, params: Mapping[str, Any]) -> torch.Tensor:
        """Engine entry point: params already validated and resolved, tensors in compute dtype."""
        return self.fn(base, list(tensors), ctx=ctx, **params)

    def __call__(self, base: torch.Tensor, tensors: Sequence[torch.Tensor], *,
                 ctx: TensorContext | None = None,
                 statistics: Sequence[torch.Tensor] | None = None,
                 **params: Any) -> torch.Tensor:
        """Merge one tensor. Without ``ctx`` this is the engine run on a one-tensor model, so a
        global trim and ``lambda2: auto`` are taken over this tensor alone; ``statistics`` are
        then each model's statistic for the tensor (methods declared with ``needs``)."""
        if ctx is not None:
            full = self.validate(params)
            if any(v == "auto" for v in full.values()):
                raise ConfigError(f"{self.name}: 'auto' parameters need the whole model; "
                                  f"call without ctx")
            return self.fn(base, list(tensors), ctx=ctx, **self.resolved(full, None))
        from neuromerge.engine import merge_state_dicts

        stats = None if statistics is None else [{"tensor": s} for s in statistics]
        out = merge_state_dicts(
            {"tensor": base}, [{"tensor": t} for t in tensors], self.name, params, progress=False,
            statistics=stats)
        return out.state_dict["tensor"]


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(
    *,
    name: str,
    reference_url: str,
    trims: bool = False,
    needs_base: bool = True,
    per_model_params: Sequence[str] = (),
    resolve: Callable[[dict[str, Any], TrimStats | None], dict[str, Any]] | None = None,
    needs_stats: Callable[[dict[str, Any]], bool] | None = None,
    row_local: bool = True,
    needs: StatisticsKind | None = None,
) -> Callable[[Callable[..., torch.Tensor]], MergeMethod]:
    """Register ``fn(base, tensors, *, <params>, ctx)`` as a merge method called ``name``.

    Every keyword-only parameter other than ``ctx`` must have a type annotation (``Annotated``
    with a pydantic ``Field`` carries bounds and the description) and a default.
    ``trims=True`` declares that the method uses the shared trim (``density``, ``trim_scope``).
    ``row_local=False`` declares that a tensor's merged rows depend on more than the same rows of
    the inputs (and :meth:`TensorContext.tensor_sum`), so it cannot be merged in row blocks.
    ``needs`` declares per-model data statistics (``models[i].statistics`` in a config), which
    the engine streams with the weights into :attr:`TensorContext.statistics`.
    """

    def register(fn: Callable[..., torch.Tensor]) -> MergeMethod:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        specs = _param_specs(fn)
        if trims and not {"density", "trim_scope"} <= {p.name for p in specs}:
            raise TypeError(f"{name}: trims=True needs 'density' and 'trim_scope' parameters")
        undeclared = set(per_model_params) - {p.name for p in specs}
        if undeclared:  # a per-model value is validated against the global parameter's type
            raise TypeError(f"{name}: per-model parameter {sorted(undeclared)[0]!r} is not a "
                            f"parameter of the method")
        model = create_model(  # type: ignore[call-overload]
            f"{name}_parameters",
            __config__=ConfigDict(extra="forbid", strict=False),
            **{p.name: (p.annotation, p.default) for p in specs},
        )
        doc = inspect.getdoc(fn) or ""
        method = MergeMethod(
            name=name, fn=fn, reference_url=reference_url,
            summary=doc.split("\n\n")[0].replace("\n", " ").strip(), doc=doc,
            params=specs, trims=trims, needs_base=needs_base,
            per_model_params=tuple(per_model_params), resolve=resolve, needs_stats=needs_stats,
            row_local=row_local, needs=needs, _model=model,
        )
        _REGISTRY[name] = method
        return method

    return register


def _param_specs(fn: Callable[..., Any]) -> tuple[ParamSpec, ...]:
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    names = list(sig.parameters)
    if names[:2] != ["base", "tensors"] or "ctx" not in names:
        raise TypeError(f"{fn.__name__}: signature must be (base, tensors, *, <params>..., ctx)")
    specs = []
    for pname, p in sig.parameters.items():
        if pname in _RESERVED:
            continue
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
            raise TypeError(f"{fn.__name__}: parameter {pname!r} must be keyword-only "
                            f"with a default")
        annotation = hints[pname]
        specs.append(ParamSpec(pname, annotation, p.default, _description(annotation)))
    return tuple(specs)


def _description(annotation: Any) -> str:
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, FieldInfo) and meta.description:
            return meta.description
    return ""


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


def get_method(name: str) -> MergeMethod:
    import neuromerge.methods  # noqa: F401  (registers the built-in methods)

    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown merge_method {name!r} (available: {', '.join(sorted(_REGISTRY))})"
        ) from None


def all_methods() -> list[MergeMethod]:
    import neuromerge.methods  # noqa: F401

    return [_REGISTRY[k] for k in _REGISTRY]
