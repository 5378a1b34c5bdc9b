"""The YAML config: validated keys and values, one-line errors, path resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuromerge.config import MergeConfig, config_from_dict, load_config
from neuromerge.errors import ConfigError, InputError

MINIMAL = "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n  - b\n"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "merge.yaml"
    p.write_text(text)
    return p


def test_minimal_config_and_shorthand_models(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.merge_method == "ties" and [m.model for m in cfg.models] == ["a", "b"]
    assert cfg.dtype == "float32" and cfg.out_dtype is None and cfg.max_shard_size == "5GB"
    # a YAML is mergekit's format: unset TIES settings are mergekit's, and the config says so
    assert cfg.validated_parameters() == {"density": 1.0, "trim_scope": "tensor",
                                          "trim_count": "floor", "scale": 1.0, "weight": 1.0,
                                          "normalize": True}
    assert sorted(cfg.mergekit_defaults) == ["density", "trim_count", "trim_scope"]
    # the same config built in Python (not a mergekit YAML) keeps the TIES paper's defaults
    api = MergeConfig.model_validate({"merge_method": "ties", "base_model": "base",
                                      "models": [{"model": "a"}, {"model": "b"}]})
    assert api.validated_parameters() == {"density": 0.2, "trim_scope": "global",
                                          "trim_count": "ceil", "scale": 1.0, "weight": 1.0,
                                          "normalize": True}
    assert api.mergekit_defaults == ()


@pytest.mark.parametrize(("text", "pattern"), [
    (MINIMAL + "extra_key: 1\n", "unknown key 'extra_key'"),
    ("merge_method: ties\nmodels: [a]\n", "missing required key 'base_model'"),
    (MINIMAL + "dtype: int8\n", "dtype"),
    (MINIMAL.replace("  - b\n", "") + "  - {model: c, weight: 2}\n",
     "unknown key 'models.1.weight'"),
    ("merge_method: ties\nbase_model: base\nmodels: []\n", "models"),
    ("- just\n- a list\n", "expected a mapping"),
    ("merge_method: ties\n  base_model: [\n", "YAML error at line"),
])
def test_bad_configs_give_one_line_errors(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(write(tmp_path, text))
    assert "\n" not in str(err.value)
    assert str(tmp_path / "merge.yaml") in str(err.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_method_parameters_are_validated(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + "parameters: {density: 2}\n"))
    with pytest.raises(ConfigError, match=r"density"):
        cfg.validated_parameters()



def test_an_unknown_parameter_is_ignored_with_a_warning_as_mergekit_does(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # mergekit reads only the parameters a method declares (published configs hold typos:
    # tests/mergekit_corpus/27 has `nomalize`); neuromerge runs them too, but says so
    cfg = load_config(write(tmp_path, MINIMAL + "parameters: {lambda2: 1, nomalize: true}\n"))
    assert "lambda2" not in cfg.validated_parameters()
    assert "parameters.lambda2: not a parameter of ties: ignored, as mergekit does" in caplog.text
    assert "parameters.nomalize: not a parameter of ties (did you mean 'normalize'?)" in \
        caplog.text


def test_per_model_parameters(tmp_path: Path) -> None:
    text = ("merge_method: dare_ties\nbase_model: b\n"
            "models:\n  - {model: a, parameters: {seed: 3}}\n")
    # mergekit's density 1 when unset: nothing dropped
    assert load_config(write(tmp_path, text)).validated_parameters()["drop_rate"] == 0.0
    bad = text.replace("seed: 3", "rescale: false")
    with pytest.raises(ConfigError,
                       match=r"models\[0\].parameters: .*per-model parameter 'rescale'"):
        load_config(write(tmp_path, bad)).validated_parameters()
    bad_seed = text.replace("seed: 3", "seed: -1")
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.seed"):
        load_config(write(tmp_path, bad_seed)).validated_parameters()


def test_overrides_update_parameters(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + "parameters: {density: 0.3}\n"))
    new = cfg.with_overrides({"scale": 0.5})
    filled = {"trim_scope": "tensor", "trim_count": "floor"}  # mergekit's, the YAML left unset
    assert new.parameters == {"density": 0.3, **filled, "scale": 0.5}
    assert cfg.parameters == {"density": 0.3, **filled}
    # an override of a filled parameter is the user's value, no longer mergekit's default
    paper = cfg.with_overrides({"trim_scope": "global"})
    assert paper.parameters["trim_scope"] == "global"
    assert paper.mergekit_defaults == ("trim_count",)


def test_relative_paths_cwd_then_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    (tmp_path / "cfgdir").mkdir()
    (tmp_path / "cfgdir" / "base").mkdir()
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "a").mkdir()
    cfg_path = tmp_path / "cfgdir" / "merge.yaml"
    cfg_path.write_text(MINIMAL)
    monkeypatch.chdir(tmp_path / "cwd")
    cfg = load_config(cfg_path)
    assert cfg.resolve_path("a") == Path("a")  # found in the current directory
    assert cfg.resolve_path("base") == tmp_path / "cfgdir" / "base"  # found beside the config
    with pytest.raises(InputError, match=r"b: no such file or folder"):
        cfg.resolve_path("b")


def test_config_from_dict() -> None:
    cfg = config_from_dict({"merge_method": "average", "base_model": "x", "models": ["y"]})
    assert cfg.method.name == "average"
    with pytest.raises(ConfigError, match=r"unknown merge_method"):
        _ = config_from_dict({"merge_method": "nope", "base_model": "x", "models": ["y"]}).method


def test_parameter_errors_name_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "parameters: {density: 2}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: parameters.density"):
        load_config(path).validated_parameters()
    path = write(tmp_path, MINIMAL.replace("ties", "tie"))
    with pytest.raises(ConfigError, match=rf"^{path}: unknown merge_method 'tie'"):
        _ = load_config(path).method
