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
)

from neuromerge.config.mergekit import from_mergekit
from neuromerge.errors import ConfigError, InputError
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


class MergeConfig(BaseModel):
    """What to merge and how. Relative paths are looked up from the current directory first,
    then from the folder holding the YAML file."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str = Field(description="a name from `neuromerge methods`")
    base_model: str = Field(description="the pretrained model all experts were fine-tuned from "
                                        "(a local path or a Hugging Face Hub id)")
    models: list[ModelEntry] = Field(min_length=1, description="the fine-tuned experts")
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
        settings, each of their values checked); raises ConfigError."""
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
        new._root, new._source = self._root, self._source
        return new


def config_from_dict(data: Any, *, source: str = "config", root: Path | None = None
                     ) -> MergeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with merge_method, base_model, models")
    try:
        data = from_mergekit(data)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source != "config" else str(exc)) from None
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_config_error(exc, source)) from None
    cfg._root = root
    cfg._source = source if source != "config" else None
    return cfg


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
    return config_from_dict(data, source=str(p), root=p.resolve().parent)
