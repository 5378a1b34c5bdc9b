"""``neuromerge merge`` on bad input: every kind refused with one line, no output and
untouched inputs."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from neuromerge.examples import make_bert_family
from tests.cli.helpers import Family, leftovers, tree_hashes

# --- bad input: one line, non-zero exit, nothing written, nothing changed ---------------------


class Ctx:
    """What a bad-input case may change before the merge runs."""

    def __init__(self, base: Path, experts: list[Path], tmp: Path) -> None:
        self.base, self.experts, self.tmp = base, experts, tmp
        self.method = "average"
        self.config: dict[str, Any] = {}
        self.args: list[str] = []
        self.raw_config: str | None = None
        self.config_path: Path | None = None

    def st(self, i: int) -> Path:
        return self.experts[i] / "model.safetensors"

    def edit(self, path: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
        sd = load_file(str(path))
        fn(sd)
        save_file(sd, str(path))


def _set(sd: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    sd[name] = value


def _poison(sd: dict[str, torch.Tensor], name: str, value: float) -> None:
    sd[name].view(-1)[3] = value


def case_missing_base(c: Ctx) -> list[str]:
    (c.tmp / "elsewhere").mkdir()
    c.base = c.tmp / "elsewhere" / "no_such_base"
    return [str(c.base), "no such file"]


def case_missing_expert(c: Ctx) -> list[str]:
    c.experts[1] = c.tmp / "no_such_dir" / "expert"
    return [str(c.experts[1]), "no such file"]


def case_missing_bare_file(c: Ctx) -> list[str]:
    c.experts[1] = c.tmp / "gone" / "expert.safetensors"
    return [str(c.experts[1]), "no such file"]


def case_garbage_bytes(c: Ctx) -> list[str]:
    c.st(1).write_bytes(os.urandom(4096))
    return [str(c.st(1))]


def case_truncated_safetensors(c: Ctx) -> list[str]:
    c.st(2).write_bytes(c.st(2).read_bytes()[:-100])
    return [str(c.st(2)), "truncated"]


def case_truncated_in_header(c: Ctx) -> list[str]:
    c.st(0).write_bytes(c.st(0).read_bytes()[:500])
    return [str(c.st(0))]


def case_bad_header_json(c: Ctx) -> list[str]:
    raw = c.st(0).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    c.st(0).write_bytes(raw[:8] + b"{" + b"x" * (n - 1) + raw[8 + n:])
    return [str(c.st(0)), "header"]


def case_empty_file(c: Ctx) -> list[str]:
    (c.base / "model.safetensors").write_bytes(b"")
    return [str(c.base / "model.safetensors")]


def case_corrupt_bin(c: Ctx) -> list[str]:
    c.experts[0] = c.tmp / "bin_expert"
    c.experts[0].mkdir()
    f = c.experts[0] / "pytorch_model.bin"
    f.write_bytes(os.urandom(3000))
    return [str(f)]


def case_truncated_bin(c: Ctx) -> list[str]:
    folder = c.tmp / "bin_expert"
    folder.mkdir()
    f = folder / "pytorch_model.bin"
    torch.save(load_file(str(c.st(0))), f)
    f.write_bytes(f.read_bytes()[:-2000])
    c.experts[0] = folder
    return [str(f)]


def case_missing_shard(c: Ctx) -> list[str]:
    folder = c.tmp / "sharded"
    base, experts = make_bert_family(folder, 3, fmt="sharded")
    c.base, c.experts = base, experts
    victim = sorted(experts[2].glob("model-*.safetensors"))[3]
    victim.unlink()
    return [str(experts[2] / "model.safetensors.index.json"), victim.name]


def case_vocab_mismatch(c: Ctx) -> list[str]:
    name = "embeddings.word_embeddings.weight"
    c.edit(c.st(1), lambda sd: _set(sd, name, torch.cat([sd[name], sd[name][:1]])))
    return [repr(name), "[170, 32]", "[169, 32]", str(c.experts[1]), "vocabulary"]


def case_hidden_size_mismatch(c: Ctx) -> list[str]:
    _, (wide,) = make_bert_family(c.tmp / "wide", 1, hidden=48)
    c.experts[2] = wide
    return [str(wide), "[48", "[32"]


def case_renamed_tensor(c: Ctx) -> list[str]:
    c.edit(c.st(0), lambda sd: _set(sd, "pooler.dense.kernel", sd.pop("pooler.dense.weight")))
    return [str(c.experts[0]), "'pooler.dense.kernel'", "not in the base"]


def case_expert_lacks_tensor(c: Ctx) -> list[str]:
    c.edit(c.st(2), lambda sd: sd.pop("encoder.layer.1.output.dense.bias"))
    return [str(c.experts[2]), "'encoder.layer.1.output.dense.bias'", "missing_tensors"]


def case_int_instead_of_float(c: Ctx) -> list[str]:
    name = "pooler.dense.bias"
    c.edit(c.st(0), lambda sd: _set(sd, name, sd[name].to(torch.int64)))
    return [repr(name), "int64", "float32", str(c.experts[0])]


def case_nan_in_expert_stats_pass(c: Ctx) -> list[str]:
    c.method = "neuromerging"
    name = "encoder.layer.0.intermediate.dense.weight"
    c.edit(c.st(2), lambda sd: _poison(sd, name, float("nan")))
    return [str(c.experts[2]), repr(name), "NaN"]


def case_inf_in_base(c: Ctx) -> list[str]:
    name = "encoder.layer.1.attention.self.key.weight"
    c.edit(c.base / "model.safetensors", lambda sd: _poison(sd, name, float("-inf")))
    return [str(c.base), repr(name), "Inf"]


def case_nan_in_point_tensor(c: Ctx) -> list[str]:
    c.method = "dare_ties"
    name = "embeddings.LayerNorm.bias"
    c.edit(c.st(0), lambda sd: _poison(sd, name, float("nan")))
    return [str(c.experts[0]), repr(name)]


def case_fp16_overflow(c: Ctx) -> list[str]:
    c.method = "task_arithmetic"
    c.config = {"out_dtype": "float16", "parameters": {"scale": 1.0e9}}
    return ["not finite", "float16", "tensor '"]


def case_unknown_method(c: Ctx) -> list[str]:
    c.method = "frankenmerge"
    return ["'frankenmerge'", "neuromerging"]


def case_unknown_parameter_flag(c: Ctx) -> list[str]:
    c.args = ["-p", "lambda9=2"]
    return ["'lambda9'", "'average'"]


def case_bad_parameter_value(c: Ctx) -> list[str]:
    c.method = "ties"
    c.config = {"parameters": {"density": 1.5}}
    return ["density", "1.5"]


def case_bad_parameter_value_flag(c: Ctx) -> list[str]:
    c.method = "neuromerging"
    c.args = ["-p", "lambda2=lots"]
    return ["lambda2", "'lots'"]


def case_bad_choice(c: Ctx) -> list[str]:
    c.method = "ties"
    c.config = {"parameters": {"trim_scope": "planet"}}
    return ["trim_scope", "'planet'"]


def case_bad_per_model_parameter(c: Ctx) -> list[str]:
    c.method = "ties"
    # a parameter of the method that is one for the whole merge (an unknown one is ignored
    # with a warning, as mergekit does: tests/test_config.py)
    c.config = {"models": [{"model": str(e), "parameters": {"scale": 3}} for e in c.experts]}
    return ["models[0].parameters", "'scale'"]


def case_negative_seed(c: Ctx) -> list[str]:
    c.method = "dare_linear"
    c.args = ["--seed", "-1"]
    return ["seed", "-1"]


def case_unknown_config_key(c: Ctx) -> list[str]:
    c.config = {"colour": "blue"}
    return ["'colour'", "merge.yaml"]


def case_bad_config_value(c: Ctx) -> list[str]:
    c.config = {"out_dtype": "float8"}
    return ["out_dtype", "'float8'"]


def case_no_models(c: Ctx) -> list[str]:
    c.config = {"models": []}
    return ["models"]


def case_missing_key(c: Ctx) -> list[str]:
    c.raw_config = yaml.safe_dump({"merge_method": "average", "models": ["x"]})
    return ["'base_model'", "merge.yaml"]


def case_malformed_yaml(c: Ctx) -> list[str]:
    c.raw_config = "merge_method: average\nbase_model: [unclosed\nmodels:\n  - x\n"
    return ["merge.yaml", "YAML", "line"]


def case_yaml_not_a_mapping(c: Ctx) -> list[str]:
    c.raw_config = "- just\n- a list\n"
    return ["merge.yaml", "mapping"]


def case_missing_config(c: Ctx) -> list[str]:
    c.config_path = c.tmp / "nowhere.yaml"
    return [str(c.config_path), "not found"]


def case_bad_shard_size(c: Ctx) -> list[str]:
    c.args = ["--max-shard-size", "huge"]
    return ["max_shard_size", "'huge'"]


def case_cuda_unavailable(c: Ctx) -> list[str]:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available")
    c.args = ["--device", "cuda"]
    return ["--device cuda", "no CUDA device"]


BAD_INPUTS = {name.removeprefix("case_"): fn for name, fn in globals().copy().items()
              if name.startswith("case_")}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input(case: str, bert_family: Callable[..., Family],
                   run_cli: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    base, experts = bert_family()
    c = Ctx(base, list(experts), tmp_path)
    fragments = BAD_INPUTS[case](c)
    cfg_path = c.config_path or tmp_path / "merge.yaml"
    if c.config_path is None:
        if c.raw_config is not None:
            cfg_path.write_text(c.raw_config)
        else:
            cfg = {"merge_method": c.method, "base_model": str(c.base),
                   "models": [{"model": str(e)} for e in c.experts], **c.config}
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    before = tree_hashes(tmp_path)
    out = tmp_path / "out" / "merged"
    code, stdout, stderr = run_cli("merge", cfg_path, out, "--quiet", *c.args)
    assert code != 0
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("neuromerge: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not out.parent.exists() or leftovers(out.parent) == []
    assert tree_hashes(tmp_path) == before  # inputs (and the config) untouched


@pytest.mark.parametrize("which", ["base", "expert"])
def test_missing_input_beside_the_output_says_missing(
        which: str, bert_family: Callable[..., Family], write_config: Callable[..., Path],
        run_cli: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    base, experts = bert_family()
    typo = base.parent / "bsae"
    cfg = (write_config("average", typo, experts) if which == "base"
           else write_config("average", base, [experts[0], typo]))
    code, _, stderr = run_cli("merge", cfg, base.parent / "merged", "--quiet")
    assert code != 0
    assert stderr.startswith("neuromerge: error: ") and stderr.count("\n") == 1
    assert f"{typo}: no such file or folder" in stderr, stderr


def test_error_is_the_last_line_without_quiet(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        run_cli: Callable[..., tuple[int, str, str]], tmp_path: Path) -> None:
    base, experts = bert_family()
    f = experts[0] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    code, stdout, stderr = run_cli("merge", write_config("ties", base, experts),
                                   tmp_path / "out")
    assert code == 1 and stdout == ""
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert errors == [stderr.splitlines()[-1]]
    assert errors[0].startswith("neuromerge: error: ") and str(f) in errors[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_malformed_param_flag_is_a_usage_error(
        bert_family: Callable[..., Family], write_config: Callable[..., Path],
        run_cli: Callable[..., tuple[int, str, str]], capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    base, experts = bert_family()
    with pytest.raises(SystemExit) as ei:
        run_cli("merge", write_config("ties", base, experts), tmp_path / "out", "-p", "density")
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "KEY=VALUE" in err and "'density'" in err
    assert not (tmp_path / "out").exists()


def test_a_misspelt_parameter_runs_as_in_mergekit_but_says_so(
        bert_family: Callable[..., Family], run_cli: Callable[..., tuple[int, str, str]],
        tmp_path: Path) -> None:
    base, experts = bert_family()
    cfg = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(e)} for e in experts], "parameters": {"densty": 0.3}}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, _, stderr = run_cli("merge", path, tmp_path / "out", "--quiet")
    assert code == 0
    assert ("parameters.densty: not a parameter of ties (did you mean 'density'?): ignored, "
            "as mergekit does") in stderr
    record = json.loads((tmp_path / "out" / "neuromerge_result.json").read_text())
    assert record["parameters"]["density"] == 1.0  # mergekit's default, as mergekit would take
