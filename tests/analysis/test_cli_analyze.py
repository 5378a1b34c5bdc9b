"""``neuromerge analyze`` end to end: checkpoints in, a report folder out whose files agree with
each other; bad input refused with one line, exit 1 and no report folder."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

Family = tuple[Path, list[Path]]
Cli = Callable[..., tuple[int, str, str]]

FILES = ["analysis.json", "c_histogram.png", "cosine.png", "groups.csv",
         "heatmap_conflicts.png", "heatmap_orthogonal_share.png", "report.md", "sigma.png",
         "tensors.csv"]
NUMBERS = ["analysis.json", "groups.csv", "report.md", "tensors.csv"]


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "neuromerge-" in p.name)


def one_error_line(code: int, stdout: str, stderr: str) -> str:
    assert code == 1 and stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("neuromerge: error: ") and "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def tiny_family(tmp_path: Path) -> Family:
    """A base and two experts as bare safetensors files (cheap: no tokenizer, no config)."""
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g),
            "model.layers.0.mlp.up_proj.bias": torch.randn(8, generator=g),
            "model.norm.weight": torch.ones(4)}
    folder = tmp_path / "models"
    folder.mkdir()
    paths = []
    for i in range(3):
        sd = {k: v + (0.1 * i) * torch.randn(v.shape, generator=g) for k, v in base.items()}
        paths.append(folder / ("base.safetensors" if i == 0 else f"expert{i}.safetensors"))
        save_file(sd, str(paths[-1]))
    return paths[0], paths[1:]


def test_report_on_a_tiny_bert(bert_family: Callable[..., Family], run_cli: Cli,
                               tmp_path: Path) -> None:
    base, experts = bert_family()
    inputs = tree_hashes(base.parent)
    out = tmp_path / "reports" / "bert"
    code, stdout, stderr = run_cli("analyze", base, *experts, "--out", out, "--quiet")
    assert (code, stdout) == (0, ""), stderr
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert leftovers(out.parent) == []
    assert tree_hashes(base.parent) == inputs

    s = json.loads((out / "analysis.json").read_text())
    tasks = ["expert_1", "expert_2", "expert_3"]
    assert s["tasks"] == tasks
    assert s["tensor_counts"] == {"neuronal": 16, "point": 23, "copy": 0}
    assert s["layers"] == ["0", "1", "outside layers"]
    assert s["modules"] == ["embed", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.up",
                            "mlp.down", "norm", "head"]
    ov = s["overall"]
    e = ov["energy"]
    for i in range(3):
        # the examples rescale a tenth of the neurons and turn every neuron: mostly orthogonal
        assert 0.5 < e["orthogonal_share"][i] < 1
        assert e["parallel_share"][i] + e["orthogonal_share"][i] == pytest.approx(1.0)
        assert ov["cosine"][i][i] == pytest.approx(1.0)
    assert [r["density"] for r in s["trim"]] == [0.1, 0.2, 0.5]
    lambdas = [r["lambda2_auto"] for r in s["trim"]]
    assert lambdas == sorted(lambdas, reverse=True) and lambdas[-1] > 1

    # groups.csv: the model rows are the JSON's numbers; tensors.csv: one row per tensor × task
    with (out / "groups.csv").open() as f:
        rows = list(csv.DictReader(f))
    model = [r for r in rows if r["level"] == "model"]
    assert [r["task"] for r in model] == tasks
    for i, r in enumerate(model):
        assert float(r["orthogonal_share"]) == pytest.approx(e["orthogonal_share"][i])
        assert float(r["conflict_rate_trimmed"]) == pytest.approx(
            ov["conflicts"]["elementwise_trimmed"]["rate"])
    layer_rows = [r for r in rows if r["level"] == "layer" and r["task"] == "expert_1"]
    assert sum(float(r["energy"]) for r in layer_rows) == pytest.approx(e["total"][0])
    with (out / "tensors.csv").open() as f:
        trows = list(csv.DictReader(f))
    assert len(trows) == 39 * 3
    assert sum(float(r["energy"]) for r in trows if r["task"] == "expert_2") == \
        pytest.approx(e["total"][1])

    md = (out / "report.md").read_text()
    for heading in ("## At a glance", "## Definitions", "## Trim: σ and λ2 = auto",
                    "## Interference", "## By module type", "## By layer", "## Plots"):
        assert heading in md, heading
    for png in (p for p in FILES if p.endswith(".png")):
        assert f"]({png})" in md
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{lambdas[1]:.4g}"[:4] in md


def test_summary_on_stdout_and_names_densities_no_plots(tiny_family: Family, run_cli: Cli,
                                                         tmp_path: Path) -> None:
    base, experts = tiny_family
    out = tmp_path / "r"
    code, stdout, _ = run_cli("analyze", base, *experts, "--out", out, "--names", "math,code",
                              "--densities", "0.05,0.3", "--conflict-density", "0.3",
                              "--no-plots")
    assert code == 0
    assert stdout.splitlines()[1].startswith("math ") and "code" in stdout
    assert "lambda2 = auto:" in stdout and "at density 0.05" in stdout
    assert f"in {out}/" in stdout
    assert sorted(p.name for p in out.iterdir()) == NUMBERS
    s = json.loads((out / "analysis.json").read_text())
    assert s["tasks"] == ["math", "code"]
    assert [r["density"] for r in s["trim"]] == [0.05, 0.3]
    assert s["conflict_density"] == 0.3
    assert "not asked for" in (out / "report.md").read_text()


def test_default_report_folder(tiny_family: Family, run_cli: Cli,
                               monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    base, experts = tiny_family
    monkeypatch.chdir(tmp_path)
    code, _, _ = run_cli("analyze", base, *experts, "--quiet", "--no-plots")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "analysis-report").iterdir()) == NUMBERS
    assert json.loads((tmp_path / "analysis-report" / "analysis.json").read_text())[
        "tasks"] == ["expert1", "expert2"]


def test_existing_report_refused_then_replaced_with_force(tiny_family: Family, run_cli: Cli,
                                                          tmp_path: Path) -> None:
    base, experts = tiny_family
    out = tmp_path / "report"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    line = one_error_line(*run_cli("analyze", base, *experts, "--out", out, "--quiet"))
    assert str(out) in line and "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    code, _, _ = run_cli("analyze", base, *experts, "--out", out, "--quiet", "--force",
                         "--no-plots")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == NUMBERS  # replaced, not merged into
    assert leftovers(tmp_path) == []


def test_a_failure_with_force_keeps_the_old_report(tiny_family: Family, run_cli: Cli,
                                                   tmp_path: Path) -> None:
    base, experts = tiny_family
    out = tmp_path / "report"
    assert run_cli("analyze", base, *experts, "--out", out, "--quiet", "--no-plots")[0] == 0
    old = tree_hashes(out)
    sd = load_file(str(experts[1]))
    sd["model.norm.weight"][1] = float("inf")
    save_file(sd, str(experts[1]))
    line = one_error_line(*run_cli("analyze", base, *experts, "--out", out, "--quiet",
                                   "--force"))
    assert "NaN or Inf" in line and str(experts[1]) in line
    assert tree_hashes(out) == old
    assert leftovers(tmp_path) == []


def _mismatched_shape(base: Path, experts: list[Path], tmp: Path) -> list[str]:
    sd = load_file(str(experts[0]))
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(9, 4)
    save_file(sd, str(experts[0]))
    return ["'model.layers.0.mlp.up_proj.weight'", "[9, 4]", "[8, 4]", str(experts[0])]


def _missing_expert(base: Path, experts: list[Path], tmp: Path) -> list[str]:
    experts[1] = tmp / "nowhere"
    return [f"{experts[1]}: no such file or folder"]


def _missing_tensor(base: Path, experts: list[Path], tmp: Path) -> list[str]:
    sd = load_file(str(experts[1]))
    del sd["model.norm.weight"]
    save_file(sd, str(experts[1]))
    return ["lacks tensor 'model.norm.weight'", str(experts[1])]


def _corrupt_file(base: Path, experts: list[Path], tmp: Path) -> list[str]:
    experts[0].write_bytes(b"\x05\x00")
    return [str(experts[0]), "not a safetensors file"]


def _bad_densities(base: Path, experts: list[Path], tmp: Path) -> list[str]:
    experts.extend(["--densities", "0.1,lots"])
    return ["--densities", "'0.1,lots'"]


def _density_out_of_range(base: Path, experts: list[Path], tmp: Path) -> list[str]:
    experts.extend(["--conflict-density", "1.5"])
    return ["density 1.5", "(0, 1]"]


def _wrong_number_of_names(base: Path, experts: list[Path], tmp: Path) -> list[str]:
    experts.extend(["--names", "a,b,c"])
    return ["--names", "3 names for 2 experts"]


BAD = {f.__name__[1:]: f for f in (_mismatched_shape, _missing_expert, _missing_tensor,
                                   _corrupt_file, _bad_densities, _density_out_of_range,
                                   _wrong_number_of_names)}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_one_line_and_no_report(case: str, tiny_family: Family, run_cli: Cli,
                                                tmp_path: Path) -> None:
    base, experts = tiny_family
    args: list = list(experts)
    fragments = BAD[case](base, args, tmp_path)
    out = tmp_path / "new" / "report"
    line = one_error_line(*run_cli("analyze", base, *args, "--out", out, "--quiet"))
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not out.exists() and not out.parent.exists()


def test_report_overlapping_an_input_is_refused(tiny_family: Family, run_cli: Cli,
                                                tmp_path: Path) -> None:
    base, experts = tiny_family
    before = tree_hashes(base.parent)
    line = one_error_line(*run_cli("analyze", base, *experts, "--out", base.parent,
                                   "--force", "--quiet"))
    assert "overlap" in line
    assert tree_hashes(base.parent) == before


def test_help(run_cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        run_cli("--help")
    assert ei.value.code == 0
    assert "analyze" in capsys.readouterr().out
    with pytest.raises(SystemExit) as ei:
        run_cli("analyze", "--help")
    assert ei.value.code == 0
    text = capsys.readouterr().out
    for word in ("BASE", "EXPERT", "--out DIR", "analysis-report", "--densities",
                 "0.1,0.2,0.5", "--conflict-density", "--force", "--quiet", "--names",
                 "--device", "--memory-limit", "--no-plots", "report.md", "analysis.json",
                 "groups.csv", "tensors.csv", "heat maps", "lambda2 = auto", "SVD frame"):
        assert word in text, word
    with pytest.raises(SystemExit) as ei:
        run_cli("analyze", "only-a-base")
    assert ei.value.code == 2  # argparse: at least one expert
