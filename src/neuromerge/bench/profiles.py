"""What a benchmark run covers: its profiles (tasks, seeds, split sizes, training settings,
methods) and, for "tuned" mode, each method's grid of hyper-parameters (``SWEEPS``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from neuromerge.bench.train import TrainConfig

#: Grids for "tuned" mode: non-linear settings × linear scales (see ``benchmark``). Sized so
#: the full profile fits a 2-core afternoon: each point costs one evaluation of every task's
#: validation split (measured: about 12 s for 7 tasks × 100 examples).
SWEEPS: dict[str, dict[str, Any]] = {
    "average": {"grid": [{}], "linear": {}},
    "task_arithmetic": {"grid": [{}], "linear": {"scale": [0.1, 0.3, 0.5, 0.7, 1.0]}},
    "ties": {"grid": [{"density": d} for d in (0.1, 0.2)],
             "linear": {"scale": [0.5, 1.0, 1.5, 2.0]}},
    "dare_linear": {"grid": [{"drop_rate": p} for p in (0.5, 0.9)],
                    "linear": {"scale": [0.3, 0.5, 1.0]}},
    "dare_ties": {"grid": [{"drop_rate": p} for p in (0.5, 0.9)],
                  "linear": {"scale": [0.5, 1.0, 1.5]}},
    "neuromerging": {"grid": [{"density": d} for d in (0.1, 0.2)],
                     "linear": {"lambda1": [0.0, 1.0], "lambda2": [1.0, 1.5, 2.0, 3.0]}},
    # every method below is θ0 + (its scale) · D with D independent of the scale, checked in
    # each method's code (tests/bench/test_benchmark.py recombines them against direct merges)
    "dare_neuromerging": {"grid": [{}],
                          "linear": {"lambda1": [0.0, 1.0], "lambda2": [1.0, 2.0, 3.0]}},
    "pcb": {"grid": [{"ratio": r} for r in (0.1, 0.2)], "linear": {"scale": [0.5, 1.0, 1.5]}},
    "breadcrumbs": {"grid": [{}], "linear": {"scale": [0.3, 0.5, 0.7, 1.0]}},
    "consensus_ta": {"grid": [{"tall_lambda": v} for v in (0.2, 0.4)],
                     "linear": {"scale": [0.3, 0.5, 1.0]}},
    "consensus_ties": {"grid": [{}], "linear": {"scale": [0.3, 0.5, 1.0, 1.5]}},
    "tsv_m": {"grid": [{}], "linear": {"alpha": [0.5, 1.0, 1.5, 2.0]}},
    # Iso: the full profile chose the top of a 0.5-2 grid on every seed, then mostly 3 of 0.5-3
    "iso_c": {"grid": [{}], "linear": {"alpha": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0]}},
    "iso_cts": {"grid": [{}], "linear": {"alpha": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0]}},
    # fisher and regmean average the experts (like `average`): scales above 1 are the
    # task-arithmetic-like extrapolations worth trying (fisher chose 3, the top of 1-3, on seed 1)
    "fisher": {"grid": [{}], "linear": {"scale": [1.0, 1.5, 2.0, 3.0, 4.0, 5.0]}},
    "regmean": {"grid": [{"offdiag_scale": a} for a in (0.5, 0.9)],
                "linear": {"scale": [1.0, 1.5, 2.0]}},
}


@dataclass(frozen=True)
class Profile:
    name: str
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    n_train: int
    n_val: int
    n_test: int
    train: TrainConfig
    tune: bool
    eval_batch: int = 64
    methods: tuple[str, ...] | None = None  # None: every registered method
    n_stats: int = 256  # training examples per expert for fisher / regmean statistics


DEFAULT_TASKS = ("sentiment", "news_outlet", "health_account", "hedge", "food_review",
                 "commons_party", "debate_party")

#: The quick profile (the README's main command, ~10 minutes) merges the paper's comparison set;
#: the full profile merges every registered method.
CORE_METHODS = ("average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "neuromerging")

# Training settings measured here (2 cores): at 320 examples × 3 epochs, lr 2e-4 beat 1e-4 on
# sentiment (0.715 vs 0.68 test accuracy) and health_account (0.32 vs 0.24; chance 0.06).
PROFILES: dict[str, Profile] = {
    "quick": Profile("quick", DEFAULT_TASKS[:6], (0,), n_train=320, n_val=0, n_test=200,
                     train=TrainConfig(epochs=3, batch_size=16, lr=2e-4, max_length=64),
                     tune=False, methods=CORE_METHODS),
    "full": Profile("full", DEFAULT_TASKS, (0, 1, 2), n_train=1000, n_val=100, n_test=300,
                    train=TrainConfig(epochs=3, batch_size=32, lr=1e-4, max_length=96),
                    tune=True),
}
