"""``neuromerge eval``: score a (merged) causal LM with lm-evaluation-harness.

A thin layer over ``lm_eval.simple_evaluate(model="hf", ...)`` so a merged folder is scored with
the standard tool and its standard task definitions (GSM8K, HumanEval, CMMLU, ...) or a user's
own task YAMLs (``--include-path``). lm-evaluation-harness is an optional extra
(``pip install 'neuromerge[eval]'``); datasets of the built-in tasks come from the HF hub.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from neuromerge.errors import ConfigError, InputError, OutputError

#: Keys of lm_eval's result dict written to the JSON (the rest is environment dumps and samples).
_KEEP = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
         "higher_is_better", "n-samples", "config", "lm_eval_version", "transformers_version",
         "date")


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("neuromerge eval needs lm-evaluation-harness, which is not installed: "
                          "pip install 'neuromerge[eval]'") from None
    return lm_eval


def task_manager(tasks: list[str], include_path: str | os.PathLike[str] | None) -> Any:
    """lm_eval's TaskManager for ``tasks``; a unknown name fails here, before the model loads.
    Indexing lm_eval's ~15k built-in task files takes tens of seconds, so when every task is
    found in ``include_path`` alone the built-ins are not indexed."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        folder = Path(include_path)
        if not folder.is_dir():
            raise InputError(f"{folder}: --include-path is not a folder of task YAML files")
        local = TaskManager(include_path=str(folder), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = "lm_eval's tasks" + (f" or {include_path}" if include_path else "")
        raise ConfigError(f"unknown task {unknown[0]!r}: not in {where} (`lm_eval ls tasks` "
                          f"lists them; a task YAML of your own goes in --include-path)")
    return manager


def parse_limit(text: str | None) -> int | float | None:
    """``--limit``: N examples per task, or a fraction of each task when it has a point."""
    if text is None:
        return None
    try:
        value = float(text) if "." in text else int(text)
    except ValueError:
        raise ConfigError(f"--limit: expected a count or a fraction, got {text!r}") from None
    if value <= 0 or (isinstance(value, float) and value > 1):
        raise ConfigError(f"--limit: expected a count >= 1 or a fraction in (0, 1], got {text}")
    return value


def evaluate(model_dir: str | os.PathLike[str], tasks: list[str], *,
             include_path: str | os.PathLike[str] | None = None,
             limit: int | float | None = None, num_fewshot: int | None = None,
             batch_size: int | str = 8, device: str = "cpu", dtype: str = "auto",
             out: str | os.PathLike[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Score the HF causal-LM folder ``model_dir`` on ``tasks`` with lm_eval; returns lm_eval's
    results (the keys in ``_KEEP``) and writes them as JSON to ``out`` when given."""
    model = Path(model_dir)
    if not (model / "config.json").is_file():
        hint = (" (a LoRA adapter: merge it into its base first, e.g. `neuromerge merge` with "
                "the adapter as the one expert and task_arithmetic)"
                if (model / "adapter_config.json").is_file() else "")
        raise InputError(f"{model}: not an HF model folder (no config.json){hint}")
    if not tasks:
        raise ConfigError("--tasks: name at least one task")
    target = None if out is None else Path(out)
    if target is not None and target.exists() and not force:
        raise OutputError(f"{target} exists (use --force to replace it)")
    lm_eval = _lm_eval()
    manager = task_manager(tasks, include_path)
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model), "dtype": dtype}, tasks=tasks,
        num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit,
        task_manager=manager, log_samples=False)
    if results is None:  # lm_eval returns None on non-zero ranks of a distributed run
        return {}
    kept = {k: results[k] for k in _KEEP if k in results}
    kept["model"] = str(model)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(kept, indent=2, default=str) + "\n")
    return kept


def results_table(results: dict[str, Any]) -> str:
    """One row per task and metric: value, standard error, examples scored."""
    rows = [("task", "metric", "value", "stderr", "n")]
    n_samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        n = n_samples.get(task, {}).get("effective", "")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            err = metrics.get(f"{metric}_stderr,{filt}")
            shown = metric if filt == "none" else f"{metric} ({filt})"
            rows.append((task, shown, f"{value:.4f}",
                         f"{err:.4f}" if isinstance(err, int | float) and math.isfinite(err)
                         else "-", str(n)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)
