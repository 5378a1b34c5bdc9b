"""``neuromerge eval``: lm-evaluation-harness on a tiny local model and a local task file, and
the command's own logic with a stand-in lm_eval (runs where lm_eval is not installed)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml

from neuromerge.errors import ConfigError, InputError, OutputError
from neuromerge.harness_eval import evaluate, parse_limit, results_table
from tests.helpers import tiny_causal_lm

DOCS = [
    {"question": "one plus one is", "choices": ["two", "three", "red"], "label": 0},
    {"question": "the cat sat on the", "choices": ["mat", "dog"], "label": 0},
    {"question": "red blue green", "choices": ["yes", "no"], "label": 1},
    {"question": "is the dog fast ?", "choices": ["yes", "no", "true"], "label": 2},
    {"question": "two plus two is", "choices": ["four", "five"], "label": 0},
]


def write_task(folder: Path, data: Path, name: str = "tiny_mc") -> Path:
    """A multiple-choice task YAML over a local JSON-lines file."""
    folder.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    task = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


def expected_accuracy(model_dir: Path, docs: list[dict[str, Any]]) -> float:
    """Accuracy by the definition: the choice whose continuation ' choice' has the highest
    summed log-likelihood after the question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    right = 0
    for d in docs:
        ctx = tok(d["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for c in d["choices"]:
            ids = tok(d["question"] + " " + c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx), len(ids))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    return right / len(docs)


def test_eval_scores_a_tiny_model_on_a_local_task(tmp_path: Path, run_cli: Any) -> None:
    pytest.importorskip("lm_eval")
    model = tiny_causal_lm(tmp_path / "model", "llama", seed=3)
    write_task(tmp_path / "tasks", tmp_path / "data.jsonl")
    out = tmp_path / "scores.json"
    code, stdout, err = run_cli("eval", model, "--tasks", "tiny_mc", "--include-path",
                                tmp_path / "tasks", "--batch-size", "2", "--out", out)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["n-samples"]["tiny_mc"]["effective"] == len(DOCS)
    acc = res["results"]["tiny_mc"]["acc,none"]
    assert acc == pytest.approx(expected_accuracy(model, DOCS))
    assert res["model"] == str(model)
    assert f"tiny_mc  acc     {acc:.4f}" in stdout and stdout.rstrip().endswith(f"in {out}")

    code, _, err = run_cli("eval", model, "--tasks", "tiny_mc", "--include-path",
                           tmp_path / "tasks", "--limit", "2", "--out", out, "--force",
                           "--dtype", "bfloat16")
    assert code == 0, err
    assert json.loads(out.read_text())["n-samples"]["tiny_mc"]["effective"] == 2


def test_eval_unknown_task_is_one_line(tmp_path: Path, run_cli: Any) -> None:
    pytest.importorskip("lm_eval")
    model = tiny_causal_lm(tmp_path / "model", "gpt2")
    write_task(tmp_path / "tasks", tmp_path / "data.jsonl")
    code, _, err = run_cli("eval", model, "--tasks", "tiny_mc,no_such_task_xyz",
                           "--include-path", tmp_path / "tasks")
    assert code == 1
    assert err.strip().count("\n") == 0
    assert "unknown task 'no_such_task_xyz'" in err and "--include-path" in err


class _FakeTaskManager:
    def __init__(self, include_path: str | None = None, include_defaults: bool = True) -> None:
        self.include_path, self.include_defaults = include_path, include_defaults
        self.all_tasks = ["local_task"] if not include_defaults else ["local_task", "gsm8k"]
        _FakeTaskManager.made.append(self)

    made: ClassVar[list[_FakeTaskManager]] = []


@pytest.fixture
def fake_lm_eval(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """lm_eval replaced by a stand-in that records simple_evaluate's arguments."""
    calls: list[dict[str, Any]] = []

    def simple_evaluate(**kw: Any) -> dict[str, Any]:
        calls.append(kw)
        return {"results": {t: {"alias": t, "acc,none": 0.5, "acc_stderr,none": 0.1,
                                "exact_match,strict-match": 0.25,
                                "exact_match_stderr,strict-match": "N/A"} for t in kw["tasks"]},
                "n-samples": {t: {"original": 10, "effective": 4} for t in kw["tasks"]},
                "samples": {"not": "kept"}, "pretty_env_info": "not kept"}

    lm = types.ModuleType("lm_eval")
    lm.simple_evaluate = simple_evaluate  # type: ignore[attr-defined]
    tasks = types.ModuleType("lm_eval.tasks")
    tasks.TaskManager = _FakeTaskManager  # type: ignore[attr-defined]
    lm.tasks = tasks  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lm_eval", lm)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", tasks)
    _FakeTaskManager.made.clear()
    return calls


def _model_folder(tmp_path: Path) -> Path:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    return tmp_path / "m"


def test_eval_passes_its_arguments_to_lm_eval(tmp_path: Path, run_cli: Any,
                                              fake_lm_eval: list[dict[str, Any]]) -> None:
    model = _model_folder(tmp_path)
    (tmp_path / "tasks").mkdir()
    out = tmp_path / "r" / "scores.json"
    code, stdout, err = run_cli("eval", model, "--tasks", "local_task", "--include-path",
                                tmp_path / "tasks", "--limit", "0.5", "--num-fewshot", "3",
                                "--batch-size", "auto", "--device", "cuda:1", "--dtype",
                                "bfloat16", "--out", out)
    assert code == 0, err
    (call,) = fake_lm_eval
    assert call["model"] == "hf" and call["tasks"] == ["local_task"]
    assert call["model_args"] == {"pretrained": str(model), "dtype": "bfloat16"}
    assert (call["limit"], call["num_fewshot"], call["batch_size"], call["device"]) == (
        0.5, 3, "auto", "cuda:1")
    # every task found locally: lm_eval's own ~15k task files are not indexed
    assert [m.include_defaults for m in _FakeTaskManager.made] == [False]
    assert call["task_manager"] is _FakeTaskManager.made[0]
    saved = json.loads(out.read_text())
    assert "samples" not in saved and "pretty_env_info" not in saved
    assert saved["results"]["local_task"]["acc,none"] == 0.5
    lines = stdout.splitlines()
    assert lines[0].split() == ["task", "metric", "value", "stderr", "n"]
    assert lines[1].split() == ["local_task", "acc", "0.5000", "0.1000", "4"]
    assert lines[2].split() == ["local_task", "exact_match", "(strict-match)", "0.2500", "-",
                                "4"]

    # a built-in task: the full index is built
    code, _, err = run_cli("eval", model, "--tasks", "gsm8k,local_task", "--include-path",
                           tmp_path / "tasks")
    assert code == 0, err
    assert [m.include_defaults for m in _FakeTaskManager.made[1:]] == [False, True]


def test_eval_refusals(tmp_path: Path, run_cli: Any, fake_lm_eval: list[dict[str, Any]]
                       ) -> None:
    model = _model_folder(tmp_path)
    with pytest.raises(ConfigError, match="unknown task 'mmlu_nope': not in lm_eval's tasks"):
        evaluate(model, ["mmlu_nope"])
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    with pytest.raises(InputError, match=r"no config\.json.*LoRA adapter: merge it"):
        evaluate(tmp_path / "ad", ["gsm8k"])
    (tmp_path / "s.json").write_text("{}")
    with pytest.raises(OutputError, match="exists"):
        evaluate(model, ["gsm8k"], out=tmp_path / "s.json")
    with pytest.raises(InputError, match="--include-path is not a folder"):
        evaluate(model, ["gsm8k"], include_path=tmp_path / "nope")
    for bad, msg in ((["--batch-size", "0"], "--batch-size must be at least 1"),
                     (["--num-fewshot", "-1"], "--num-fewshot must be at least 0 (got -1)"),
                     (["--limit", "x"], "--limit: expected a count"),
                     (["--limit", "1.5"], "fraction in (0, 1]")):
        code, _, err = run_cli("eval", model, "--tasks", "gsm8k", *bad)
        assert code == 1 and msg in err, err
    assert fake_lm_eval == []  # nothing was evaluated
    assert parse_limit("7") == 7 and parse_limit("0.25") == 0.25 and parse_limit(None) is None


def test_eval_without_lm_eval_says_how_to_install(tmp_path: Path, run_cli: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    code, _, err = run_cli("eval", _model_folder(tmp_path), "--tasks", "gsm8k")
    assert code == 1
    assert "pip install 'neuromerge[eval]'" in err and err.count("\n") == 1


def test_results_table_skips_non_metrics() -> None:
    table = results_table({"results": {"t": {"alias": "t", "acc,none": 1.0,
                                             "acc_stderr,none": float("nan")}},
                           "n-samples": {}})
    assert table.splitlines()[1].split() == ["t", "acc", "1.0000", "-"]
