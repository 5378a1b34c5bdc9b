"""The typed merge configuration: a YAML file close to mergekit's, validated by pydantic, with
the method's own parameters checked against its registered signature."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from neuromerge.config.mergekit import (
    from_mergekit,
    half_dtype_output,
    refuse_unsupported,
    tokenizer_keys,
)
from neuromerge.config.slices import OutputSlice, SliceGroup, donor, slice_groups
from neuromerge.errors import ConfigError, InputError
from neuromerge.io.chat_templates import check_chat_template
from neuromerge.io.hub import ModelRef, parse_model_ref
from neuromerge.param_settings import varying_keys
from neuromerge.registry import MergeMethod, get_method

log = logging.getLogger("neuromerge")

TensorClass = Literal["neuronal", "point", "copy"]


class ModelEntry(BaseModel):
    """One fine-tuned model: its path and its per-model parameters."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="HF model folder, .safetensors/.bin file, PEFT LoRA "
                                   "adapter folder (over base_model), Hugging Face Hub id "
                                   "(org/name[@revision]) or MODEL+LORA of the expert")
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="per-model parameters: weight, density (TIES-style), drop_rate and seed "
                    "(DARE); see `neuromerge methods`")
    statistics: str | None = Field(
        None, description="the model's data statistics file, for methods that need one "
                          "(fisher, regmean; written by `neuromerge statistics`)")

    @field_validator("model", "statistics", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value


class MergeConfig(BaseModel):
    """What to merge and how. Relative paths are looked up from the current directory first,
    then from the folder holding the YAML file."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str = Field(description="a name from `neuromerge methods`")
    base_model: str = Field(description="the pretrained model all experts were fine-tuned from "
                                        "(a local path or a Hugging Face Hub id)")
    models: list[ModelEntry] = Field(
        default_factory=list, description="the fine-tuned experts (with slices: every model the "
                                          "slices name besides base_model, for reading)")
    slices: list[OutputSlice] | None = Field(
        None, description="mergekit's slices: the output's layers as ranges of the inputs' "
                          "(sources with layer_range), each slice merged on its own "
                          "(docs/mergekit.md#slices)")
    parameters: dict[str, Any] = Field(default_factory=dict,
                                       description="the method's parameters")
    dtype: Literal["float32", "float64", "float16", "bfloat16"] = Field(
        "float32", description="compute dtype; half precision is computed in float32")
    out_dtype: Literal["float16", "bfloat16", "float32", "float64"] | None = Field(
        None, description="dtype of the written floating tensors; null keeps the base's")
    tensor_class: dict[str, TensorClass] = Field(
        default_factory=dict,
        description="glob pattern on tensor names → neuronal | point | copy (from the base); "
                    "first match wins")
    neuron_axis: dict[str, NonNegativeInt] = Field(
        default_factory=dict,
        description="glob pattern on tensor names → the axis of a neuronal tensor that indexes "
                    "its neurons (0: rows; 1: columns, GPT-2's Conv1D); first match wins, "
                    "before the rules read from the base's config.json")
    missing_tensors: Literal["error", "base"] = Field(
        "error", description="a tensor of the base that an expert lacks: error, or copy it "
                             "from the base")
    max_shard_size: str | int = Field("5GB", description="largest output shard, e.g. 5GB")
    vocab: Literal["error", "base", "union"] = Field(
        "error", description="experts whose embeddings / LM head have more rows than the base's "
                             "(added tokens): error; base: keep the base's vocabulary (rows for "
                             "added tokens dropped); union: base tokens then the experts' added "
                             "tokens, rows aligned by token string, the union tokenizer written")
    tokenizer_source: str | None = Field(
        None, description="mergekit's key: base (= vocab: base), union (= vocab: union), or "
                          "model:PATH (that model's tokenizer and vocabulary; PATH the base or an "
                          "expert); null: the base's tokenizer files, vocab as set")

    chat_template: str | None = Field(
        None, description="mergekit's key: the output tokenizer's chat template, by name "
                          "(chatml, llama3, mistral, alpaca, exaone), auto (the one most inputs "
                          "have), or a Jinja template; null: the tokenizer source's")

    @field_validator("base_model", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check_chat_template(value)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("chat_template: ")) from None

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer_source(cls, value: str | None) -> str | None:
        if value is None or value in ("base", "union") or (
                value.startswith("model:") and len(value) > len("model:")):
            return value
        raise ValueError("must be base, union or model:PATH")

    @property
    def vocab_mode(self) -> str:
        """The vocabulary rule in effect: ``vocab``, or what ``tokenizer_source`` implies."""
        if self.tokenizer_source == "union":
            return "union"
        if self.tokenizer_source is not None and self.tokenizer_source.startswith("model:"):
            return "model"
        if self.tokenizer_source == "base" and self.vocab == "error":
            return "base"
        return self.vocab
    save_lora: PositiveInt | None = Field(
        None, description="also write the merged delta as a PEFT LoRA adapter of this rank "
                          "to OUT_DIR/lora (truncated SVD of each 2-D weight's delta)")

    _root: Path | None = PrivateAttr(default=None)
    _source: str | None = PrivateAttr(default=None)
    #: with slices: the merge groups and their flat configs (config/slices.py)
    _groups: list[tuple[SliceGroup, MergeConfig]] = PrivateAttr(default_factory=list)
    _raw: dict[str, Any] | None = PrivateAttr(default=None)
    _text: str | None = PrivateAttr(default=None)
    _mergekit_defaults: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeConfig:
        if self.slices is None and not self.models:
            raise ValueError("models: give the fine-tuned experts (or mergekit's slices)")
        return self

    @property
    def raw(self) -> dict[str, Any]:
        """A sliced config as loaded (mergekit's keys), for the written config."""
        return dict(self._raw or {})

    text = property(lambda self: self._text, doc="The YAML text as loaded (None: a dict).")
    mergekit_defaults = property(lambda self: self._mergekit_defaults,
                                 doc="Parameters left unset that took mergekit's defaults.")

    @property
    def groups(self) -> list[tuple[SliceGroup, MergeConfig]]:
        """With slices: each merge group and its flat config; empty otherwise."""
        return self._groups

    @field_validator("models", mode="before")
    @classmethod
    def _plain_paths(cls, value: Any) -> Any:
        # `- ./expert` is accepted as shorthand for `- model: ./expert`.
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str | os.PathLike) else v for v in value]
        return value

    @property
    def method(self) -> MergeMethod:
        with self._blame():
            return get_method(self.merge_method)

    def validated_parameters(self) -> dict[str, Any]:
        """The method's full parameter set, defaults filled (gradients and filters kept as
        settings, each of their values checked); raises ConfigError. With slices: every
        group's are checked, the first's returned."""
        if self._groups:
            found = [g.validated_parameters() for _, g in self._groups]
            return found[0]
        method = self.method
        with self._blame():
            params = method.validate_settings(self.parameters)
            if method.trims and "trim_scope" not in self.parameters and "density" in \
                    varying_keys([self.parameters, *(e.parameters for e in self.models)]):
                # mergekit trims each tensor on its own; a per-tensor density needs that
                log.info("density varies per tensor (a gradient or filters): trim_scope: tensor")
                params["trim_scope"] = "tensor"
            for i, entry in enumerate(self.models):
                extra = sorted(set(entry.parameters) - set(method.per_model_params))
                if extra:
                    allowed = ", ".join(method.per_model_params) or "none"
                    raise ConfigError(f"models[{i}].parameters: {method.name!r} takes no "
                                      f"per-model parameter {extra[0]!r} (per-model: {allowed})")
                method.validate_settings(entry.parameters, where=f"models[{i}].parameters",
                                         fill=False)
                if method.needs and entry.statistics is None:
                    raise ConfigError(
                        f"models[{i}] ({entry.model}): {method.name} needs the model's "
                        f"{method.needs} statistics: set models[{i}].statistics to a file from "
                        f"`neuromerge statistics {method.needs}`")
                if entry.statistics is not None and not method.needs:
                    raise ConfigError(f"models[{i}].statistics: {method.name} uses no data "
                                      f"statistics (only fisher and regmean do)")
        return params

    @contextlib.contextmanager
    def _blame(self) -> Iterator[None]:
        """Prefix errors with the config file they come from."""
        try:
            yield
        except ConfigError as exc:
            if self._source is None:
                raise
            raise ConfigError(f"{self._source}: {exc}") from None

    def locate(self, value: str) -> Path | None:
        """The local file or folder ``value`` names: from the current directory first, then
        beside the YAML file; None when neither exists."""
        p = Path(os.path.expanduser(value))
        if p.exists():
            return p
        if p.is_absolute() or self._root is None:
            return None
        beside = self._root / p
        return beside if beside.exists() else None

    def resolve_path(self, value: str) -> Path:
        """A local path (statistics files): see :meth:`locate`; InputError when missing."""
        p = self.locate(value)
        if p is not None:
            return p
        p = Path(os.path.expanduser(value))
        if p.is_absolute() or self._root is None:
            return p  # the reader says it is missing
        raise InputError(f"{value}: no such file or folder (looked in {Path.cwd()} and next "
                         f"to the config in {self._root})")

    def resolve_model(self, value: str) -> ModelRef:
        """A model string (base_model, models[i].model, tokenizer_source's model:): a local
        path (wins), a Hugging Face Hub id ``org/name[@revision]``, or ``MODEL+LORA``."""
        ref = parse_model_ref(value, self.locate)
        if ref.on_hub or ref.lora is not None or self.locate(value) is not None:
            return ref
        return ModelRef(value, self.resolve_path(value))  # missing: the usual error

    def with_overrides(self, overrides: dict[str, Any]) -> MergeConfig:
        """A copy whose ``parameters`` are updated with ``overrides`` (command-line -p)."""
        new = self.model_copy(update={"parameters": {**self.parameters, **overrides}})
        new._root, new._source, new._raw, new._text = (self._root, self._source, self._raw,
                                                       self._text)
        new._mergekit_defaults = tuple(k for k in self._mergekit_defaults
                                       if k not in overrides)
        new._groups = [(g, c.with_overrides(overrides)) for g, c in self._groups]
        return new


def config_from_dict(data: Any, *, source: str = "config", root: Path | None = None
                     ) -> MergeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with merge_method, base_model, models")
    if data.get("slices") is not None:
        return _sliced_config(data, source, root)
    filled: list[str] = []
    try:
        data = from_mergekit(data, filled=filled)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source != "config" else str(exc)) from None
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_config_error(exc, source)) from None
    cfg._root, cfg._mergekit_defaults = root, tuple(filled)
    cfg._source = source if source != "config" else None
    return cfg


def _sliced_config(data: dict[str, Any], source: str, root: Path | None) -> MergeConfig:
    """A config with mergekit's ``slices``: each merge group a flat config of its own, the
    top-level config naming the models to open (the donor of config.json as ``base_model``)."""
    where = f"{source}: " if source != "config" else ""
    slices = data.get("slices")
    if not isinstance(slices, list) or not slices:
        raise ConfigError(f"{where}slices: a list of {{sources: [{{model, layer_range}}]}}")
    if data.get("models"):
        raise ConfigError(f"{where}give models or slices, not both")
    try:
        refuse_unsupported(data)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    parsed = []
    for i, s in enumerate(slices):
        try:
            parsed.append(OutputSlice.model_validate(s))
        except ValidationError as exc:
            raise ConfigError(_config_error(exc, source).replace(
                f"{source}: ", f"{where}slices[{i}]: ").replace("key '", f"key 'slices[{i}].")
            ) from None
    try:
        groups = slice_groups(data, parsed)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    if len(groups) > 1 and _trims(data.get("merge_method")) and "trim_scope" not in (
            data.get("parameters") or {}):
        # one threshold over models that differ by layer range is not defined: trim each
        # tensor, as mergekit does
        log.info("slices merge different models in different layers: trim_scope: tensor")
        for g in groups:
            g.flat["parameters"] = {**(g.flat.get("parameters") or {}), "trim_scope": "tensor"}
    flats = [(g, config_from_dict(g.flat, source=source, root=root)) for g in groups]
    base = donor(data, parsed)
    names = dict.fromkeys(m for s in parsed for m in [s.base_model, *(x.model for x in s.sources)]
                          if m is not None and os.path.normpath(m) != os.path.normpath(base))
    top = {k: v for k, v in data.items() if k not in ("slices", "parameters")}
    top.update(base_model=base, models=[{"model": m} for m in names],
               slices=slices)
    try:
        cfg = MergeConfig.model_validate(half_dtype_output(tokenizer_keys(top)))
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    except ValidationError as exc:
        raise ConfigError(_config_error(exc, source)) from None
    cfg._root, cfg._source, cfg._groups, cfg._raw = root, (
        source if source != "config" else None), flats, _plain(data)
    return cfg


def _plain(value: Any) -> Any:
    """``value`` with paths as strings (the config as written back to YAML)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _trims(method: Any) -> bool:
    try:
        return isinstance(method, str) and get_method(method).trims
    except ConfigError:
        return False  # the groups' validation names the unknown method


def _config_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"{source}: unknown key {loc!r}")
        elif err["type"] == "missing":
            parts.append(f"{source}: missing required key {loc!r}")
        else:
            got = err.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            parts.append(f"{source}: {loc}: {err['msg']}{shown}")
    return "; ".join(dict.fromkeys(parts))


def load_config(path: str | os.PathLike[str]) -> MergeConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}: YAML error{where}: {problem}") from None
    cfg = config_from_dict(data, source=str(p), root=p.resolve().parent)
    cfg._text = text
    return cfg
