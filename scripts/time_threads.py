"""Time one expert's Fisher statistics with 1 and 2 torch threads, alone and as two jobs at once.

    python scripts/time_threads.py [--task hedge] [--seed 2] [--n 64]

Needs the full profile's cached experts (``neuromerge bench --profile full``). Shows what thread
oversubscription costs when several jobs share the cores (docs/benchmark.md, "Time").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def one(threads: int, task: str, seed: int, n: int) -> float:
    import torch

    from neuromerge.bench.benchmark import open_bench
    from neuromerge.statistics import fisher_diagonal

    torch.set_num_threads(threads)
    bench = open_bench("full", "bench-results/time-threads", seeds=(seed,), progress=False)
    sd = bench.prepare(seed, train=False)
    # the same model and batches as the benchmark's statistics, on the first n examples
    model, batches, prefix = bench.expert_cache.statistics_inputs(task, sd.experts[task], n)
    start = time.perf_counter()
    fisher_diagonal(model, batches, prefix=prefix)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="hedge")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--n", type=int, default=64, help="training examples")
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)  # child run
    a = p.parse_args()
    if a.threads is not None:
        print(f"{one(a.threads, a.task, a.seed, a.n):.1f}")
        return
    child = [sys.executable, __file__, "--task", a.task, "--seed", str(a.seed), "--n", str(a.n)]
    for threads in (1, 2):
        for jobs in (1, 2):
            procs = [subprocess.Popen([*child, "--threads", str(threads)], text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                     for _ in range(jobs)]
            secs = [float(pr.communicate()[0].strip().splitlines()[-1]) for pr in procs]
            print(f"{threads} thread(s) per job, {jobs} job(s) at once: "
                  + ", ".join(f"{s:.1f} s" for s in secs))


if __name__ == "__main__":
    main()
