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

import itertools
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
from neuromerge.bench import data as bench_data
from neuromerge.bench.accuracy import accuracy, load_body, pooled_features
from neuromerge.bench.benchmark_report import write_report
from neuromerge.bench.experts import ExpertCache
from neuromerge.bench.models import fetch_base_model
from neuromerge.bench.profiles import PROFILES, SWEEPS, Profile
from neuromerge.bench.results import Results, dataset_key, mean_accuracy, record_key
from neuromerge.bench.train import TextDataset, linear_probe, load_head
from neuromerge.engine import DictSink, prepare
from neuromerge.errors import ConfigError
from neuromerge.io.reader import fingerprint, open_checkpoint
from neuromerge.pipeline import merge
from neuromerge.registry import all_methods, get_method

log = logging.getLogger("neuromerge")

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
    """One benchmark run on a profile: its experts (``expert_cache``), their evaluation, and the
    default and tuned merges of every method, each evaluation a record of ``results``."""

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
        self.expert_cache = ExpertCache(profile, cache_dir, base_dir, self.base_id,
                                        self.tokenizer, self.timer, progress)

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
                folder = self.expert_cache.folder(t, seed, splits[t]["train"])
                if not (folder / "train.json").exists():
                    raise ConfigError(f"no cached expert for task {t!r}, seed {seed} in "
                                      f"{self.cache}: run the benchmark first")
        experts = {t: self.expert_cache.get(t, seed, splits[t]["train"]) for t in p.tasks}
        self.expert_cache.train = {t: splits[t]["train"] for t in p.tasks}
        heads = {t: load_head(experts[t] / "head.safetensors") for t in p.tasks}
        ctx = record_key(seed, self.base_id, [(t, str(experts[t].name)) for t in p.tasks],
                         [dataset_key(splits[t]["test"]) for t in p.tasks])
        return SeedData(seed, splits, experts, heads, ctx)

    def expert_scores(self, sd: SeedData) -> dict[str, float]:
        """Each expert on its own task's test split (the upper bound), cached."""
        for t in self.profile.tasks:
            key = record_key("expert", sd.ctx, t)
            if not self.results.get(key):
                body = load_body(sd.experts[t] / "body")
                acc = accuracy(self.features(body, sd.splits[t]["test"], f"expert {t}"),
                               sd.heads[t], sd.splits[t]["test"].labels)
                self.results.add({"key": key, "seed": sd.seed, "kind": "expert", "task": t,
                                  "split": "test", "accuracy": acc})
        return {t: self.results.records[record_key("expert", sd.ctx, t)]["accuracy"]
                for t in self.profile.tasks}

    def run_seed(self, seed: int) -> None:
        p = self.profile
        sd = self.prepare(seed)
        splits, experts, heads, ctx = sd.splits, sd.experts, sd.heads, sd.ctx

        # reference points: each expert on its own task, and a linear probe on the base
        self.expert_scores(sd)
        if any(not self.results.get(record_key("probe", ctx, t)) for t in p.tasks):
            base_body = load_body(self.base)
            for t in p.tasks:
                key = record_key("probe", ctx, t)
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
        key = record_key("default", ctx, method)
        if self.results.get(key):
            return
        cfg: dict[str, Any] = {
            "merge_method": method, "base_model": str(self.base.resolve()),
            "models": [{"model": str((experts[t] / "body").resolve())}
                       for t in self.profile.tasks]}
        if own := get_method(method).yaml_defaults:  # the paper's defaults, not mergekit's
            cfg["parameters"] = own
        stat_paths = self.expert_cache.statistics_for(method, experts)
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
                          "sigma": result.trim.sigma if result.trim else None,
                          "accuracy": acc, "merge_seconds": result.seconds["total"]})

    def components(self, method: str, fixed: Mapping[str, Any], experts: Mapping[str, Path]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        """θ0 and the linear components of a merge with these non-linear settings."""
        linear, spec = SWEEPS[method]["linear"], get_method(method).linear_in
        if not set(linear) <= set(spec):
            raise ConfigError(f"bench: the {method} sweep scales {sorted(set(linear) - set(spec))}"
                              f", which the method does not declare linear_in")
        # one merge per component the method is linear in (θ0 alone: nothing to scale)
        units = {name: dict(values) for name, values in spec.items()} if linear else {"": {}}
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
        stat_paths = self.expert_cache.statistics_for(method, experts, tasks)
        base = open_checkpoint(self.base)
        readers = [open_checkpoint(experts[t] / "body") for t in tasks]
        stats = ([open_statistics(p, m.needs) for p in stat_paths]
                 if stat_paths is not None else None)
        try:
            theta0 = {n: base.read(n) for n in base.names()}
            comps, resolved = {}, {}
            for name, unit in units.items():
                params = m.validate({**fixed, **unit})
                with self.timer("merging"):
                    job = prepare(base, readers, m, params,
                                  model_keys=[str(experts[t] / "body") for t in tasks],
                                  statistics=stats)
                    sink = DictSink(job.plan.tensors)
                    resolved[name] = job.execute(sink, progress=False).params
                comps[name] = {k: v.float() - theta0[k].float() if v.is_floating_point()
                               else v for k, v in sink.state_dict.items()}
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
        keys = [record_key("val", ctx, method, fixed, g) for fixed, g in points]
        for fixed in sweep["grid"]:
            todo = [(g, k) for (f, g), k in zip(points, keys, strict=True)
                    if f == fixed and not self.results.get(k)]
            if not todo:
                continue
            theta0, comps = self.components(method, fixed, experts)
            for g, k in tqdm(todo, desc=f"sweep {method} {fixed}", disable=not self.progress,
                             leave=False, dynamic_ncols=True):
                body = load_body(state_dict=recombine(theta0, comps, g), config_dir=self.base)
                self.results.add({"key": k, "seed": seed, "kind": "sweep", "method": method,
                                  "split": "val", "params": {**fixed, **g}, "fixed": fixed,
                                  "linear": g, "accuracy": self.score_body(body, splits, heads,
                                                                           "val")})
        key = record_key("tuned", ctx, method)
        best = max((self.results.records[k] for k in keys),
                   key=lambda r: mean_accuracy(r["accuracy"]))
        done = self.results.get(key)
        # a grid changed since the record was written may choose another point: re-score then
        if done and done["params"] == best["params"]:
            return
        theta0, comps = self.components(method, best["fixed"], experts)
        body = load_body(state_dict=recombine(theta0, comps, best["linear"]), config_dir=self.base)
        self.results.add({"key": key, "seed": seed, "kind": "merge", "mode": "tuned",
                          "method": method, "split": "test", "params": best["params"],
                          "val_accuracy": mean_accuracy(best["accuracy"]),
                          "accuracy": self.score_body(body, splits, heads, "test")})


def recombine(theta0: Mapping[str, torch.Tensor],
              comps: Mapping[str, Mapping[str, torch.Tensor]],
              coeffs: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """θ0 + Σ coeffs[name] · comps[name] (1 for a name not in ``coeffs`` and for the unnamed
    unit ""), in θ0's dtypes: a merge from the linear components ``Bench.merge_units`` made."""
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
    t0 = time.perf_counter()
    bench = open_bench(profile, out_dir, cache_dir=cache_dir, base_dir=base_dir,
                       datasets=datasets, make_splits=make_splits, methods=methods, seeds=seeds,
                       progress=progress)
    for seed in bench.profile.seeds:
        bench.run_seed(seed)
    bench.timer.seconds["total"] = time.perf_counter() - t0
    return write_report(bench.results.records.values(), bench_meta(bench), bench.out)
