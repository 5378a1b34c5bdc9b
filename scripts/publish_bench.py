"""Copy a benchmark report into docs/bench/<profile>/ (tables, CSV, plots) for docs/benchmark.md.

    .venv/bin/python scripts/publish_bench.py bench-results/quick
    .venv/bin/python scripts/publish_bench.py ~/.cache/neuromerge/bench-full

The report is regenerated from results.jsonl first, so the published files match the raw
records exactly.
"""

import json
import shutil
import sys
from pathlib import Path

from neuromerge.bench.benchmark_report import write_report
from neuromerge.bench.results import Results

if __name__ == "__main__":
    src = Path(sys.argv[1]).expanduser()
    meta = json.loads((src / "summary.json").read_text())["meta"]
    # keyed as the benchmark reads them: a record rewritten later (a re-chosen tuned point)
    # replaces the earlier one
    records = Results(src / "results.jsonl").records.values()
    write_report(records, meta, src)
    dest = Path(__file__).resolve().parent.parent / "docs" / "bench" / meta["profile"]["name"]
    dest.mkdir(parents=True, exist_ok=True)
    for f in ["report.md", "results.csv", *sorted(p.name for p in src.glob("*.png"))]:
        shutil.copy(src / f, dest / f)
    print(f"published {src} to {dest}")
