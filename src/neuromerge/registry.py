"""Declaring merge methods: a method is a plain function of tensors whose typed, defaulted
keyword signature *is* its parameter list. Config validation, ``neuromerge methods`` and
docs/methods.md all derive from that one declaration (the pattern of mergekit's
``@merge_method``). What the engine reads of a method is :class:`neuromerge.method_api.MethodSpec`.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from pydantic import ConfigDict, create_model
from pydantic.fields import FieldInfo

from neuromerge import method_api
from neuromerge.engine import merge_state_dicts
from neuromerge.errors import ConfigError
from neuromerge.method_api import (
    Mergekit,
    MethodSpec,
    ParamSpec,
    StatisticsKind,
    SumCollector,
    SumsCollected,
    TensorContext,
    TensorKind,
    TrimSummary,
    default_working_set,
    describe_type,
    format_validation_error,
    unregister,
)

__all__ = ["MergeMethod", "Mergekit", "ParamSpec", "StatisticsKind", "SumCollector",
           "SumsCollected", "TensorContext", "TensorKind", "TrimSummary", "all_methods",
           "describe_type", "format_validation_error", "get_method", "merge_method",
           "unregister"]

#: The arguments every method receives that are not user parameters.
_RESERVED = ("base", "tensors", "ctx")


@dataclass(frozen=True)
class MergeMethod(MethodSpec):
    """A registered merge method. Call it like the function it wraps: ``ties(base, [a, b])``."""

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
        stats = None if statistics is None else [{"tensor": s} for s in statistics]
        out = merge_state_dicts(
            {"tensor": base}, [{"tensor": t} for t in tensors], self, params, progress=False,
            statistics=stats)
        return out.state_dict["tensor"]


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name`` (the built-in ones are registered on import)."""
    return cast(MergeMethod, method_api.get_method(name))


def all_methods() -> list[MergeMethod]:
    return cast(list[MergeMethod], method_api.all_methods())


def merge_method(
    *,
    name: str,
    reference_url: str,
    trims: bool = False,
    needs_base: bool = True,
    per_model_params: Sequence[str] = (),
    resolve: Callable[[dict[str, Any], TrimSummary | None], dict[str, Any]] | None = None,
    trim_pass_if: Callable[[dict[str, Any]], bool] | None = None,
    row_local: bool = True,
    needs: StatisticsKind | None = None,
    linear_in: Sequence[str] | Mapping[str, Mapping[str, float]] = (),
    working_set: Callable[[int, int], int] = default_working_set,
    mergekit: Mergekit = Mergekit(),  # noqa: B008  (frozen: a shared default is safe)
    n_models: tuple[int, int | None] = (1, None),
) -> Callable[[Callable[..., torch.Tensor]], MergeMethod]:
    """Register ``fn(base, tensors, *, <params>, ctx)`` as a merge method called ``name``.

    Every keyword-only parameter other than ``ctx`` must have a type annotation (``Annotated``
    with a pydantic ``Field`` carries bounds and the description) and a default.
    ``trims=True`` declares that the method uses the shared trim (``density``, ``trim_scope``);
    ``trim_pass_if(params)`` that it needs the merge-wide trim pass for other reasons
    (``lambda2: auto``), ``resolve(params, trim)`` then turns such values into numbers.
    ``row_local=False`` declares that a tensor's merged rows depend on more than the same rows of
    the inputs (and :meth:`TensorContext.tensor_sum`), so it cannot be merged in row blocks.
    ``needs`` declares per-model data statistics (``models[i].statistics`` in a config), which
    the engine streams with the weights into :attr:`TensorContext.statistics`.
    ``linear_in``: the parameters the merged delta is linear in (names, or name → the values that
    isolate that component); ``working_set``: bytes per entry of the method's working copies;
    ``mergekit``: how mergekit's YAML for it maps onto its parameters; ``n_models``: how many
    models besides the base it merges (at least, at most), checked when the merge is planned.
    """

    def register(fn: Callable[..., torch.Tensor]) -> MergeMethod:
        specs = _param_specs(fn)
        names = {p.name for p in specs}
        if trims and not {"density", "trim_scope"} <= names:
            raise TypeError(f"{name}: trims=True needs 'density' and 'trim_scope' parameters")
        undeclared = set(per_model_params) - names
        if undeclared:  # a per-model value is validated against the global parameter's type
            raise TypeError(f"{name}: per-model parameter {sorted(undeclared)[0]!r} is not a "
                            f"parameter of the method")
        linear = (dict(linear_in) if isinstance(linear_in, Mapping)
                  else {p: {p: 1.0} for p in linear_in})
        unknown = {k for unit in linear.values() for k in unit} - names
        if unknown:
            raise TypeError(f"{name}: linear_in names {sorted(unknown)[0]!r}, which is not a "
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
            per_model_params=tuple(per_model_params), resolve=resolve, trim_pass_if=trim_pass_if,
            row_local=row_local, needs=needs, linear_in=linear, working_set=working_set,
            mergekit=mergekit, n_models=n_models, _model=model,
        )
        method_api.register(method)
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
