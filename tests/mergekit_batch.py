"""Run many mergekit merges in one process of mergekit's own venv (imported once: a
``mergekit-yaml`` run spends most of its ~7 s importing transformers).

    MERGEKIT_PYTHON tests/mergekit_batch.py JOBS.json RESULTS.json

JOBS.json: ``[{"config": PATH, "out": DIR, "cwd": DIR}, ...]``; each config is run as
``mergekit-yaml CONFIG OUT --random-seed 0`` would run it, from ``cwd``; RESULTS.json:
``{"OUT": "ok" | "error: ..."}``. Not a test module (no tests import it)."""

import json
import os
import sys
import traceback

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions


def main() -> None:
    with open(sys.argv[1]) as fh:
        jobs = json.load(fh)
    results = {}
    for job in jobs:
        os.chdir(job["cwd"])
        with open(job["config"]) as fh:
            text = fh.read()
        try:
            config = MergeConfiguration.model_validate(yaml.safe_load(text))
            options = MergeOptions(random_seed=0, quiet=True, copy_tokenizer=True)
            options.apply_global_options()
            run_merge(config, job["out"], options=options, config_source=text)
            results[job["out"]] = "ok"
        except Exception as exc:  # reported per config
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            results[job["out"]] = f"error: {last[:500]}"
    with open(sys.argv[2], "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
