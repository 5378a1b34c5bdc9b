"""``neuromerge demo``: the main job on a built-in default, end to end and offline.

Generates a tiny random BERT and three experts with known updates, merges them with every
registered method through the same config files and engine as ``neuromerge merge``, loads each
merged folder with transformers, runs a forward pass, and prints how much of each expert's
update every method kept. The numbers describe synthetic updates, not task accuracy: the real
benchmark is a separate command (see the README)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
import yaml

from neuromerge.examples import make_bert_family
from neuromerge.io.reader import open_checkpoint
from neuromerge.pipeline import merge
from neuromerge.registry import all_methods

log = logging.getLogger("neuromerge")


def _state(folder: Path) -> dict[str, torch.Tensor]:
    reader = open_checkpoint(folder)
    try:
        return {n: reader.read(n).float() for n in reader.names()
                if reader.meta(n).dtype.is_floating_point}
    finally:
        reader.close()


def _kept(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
          expert: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(cosine, projection ratio) of the merged task vector against one expert's task vector."""
    dm = torch.cat([(merged[k] - base[k]).flatten() for k in base])
    de = torch.cat([(expert[k] - base[k]).flatten() for k in base])
    cos = float(dm @ de / (dm.norm() * de.norm()).clamp(min=1e-30))
    return cos, float(dm @ de / (de @ de).clamp(min=1e-30))


def run_demo(out_dir: str | Path = "neuromerge-demo", *, quiet: bool = False) -> int:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    base_dir, expert_dirs = make_bert_family(out / "models", n_experts=3)
    print(f"neuromerge demo: wrote a tiny random BERT and 3 experts under {out / 'models'}")
    base, experts = _state(base_dir), [_state(e) for e in expert_dirs]
    rows = []
    skipped: list[str] = []
    level = log.level
    if quiet:
        log.setLevel(logging.WARNING)
    try:
        for method in all_methods():
            if method.needs:  # fisher, regmean: per-model data statistics, not in a demo
                skipped.append(method.name)
                continue
            # methods of a fixed number of models (slerp, nuslerp, passthrough, ...): the
            # fewest they take, from the first experts (a listed base would count as one)
            least, most = method.n_models
            used = expert_dirs if most is None else expert_dirs[:least]
            cfg = {"merge_method": method.name, "base_model": str(base_dir.resolve()),
                   "models": [{"model": str(e.resolve())} for e in used]}
            if method.yaml_defaults:  # the method's own defaults, not mergekit's
                cfg["parameters"] = method.yaml_defaults
            cfg_path = out / "configs" / f"{method.name}.yaml"
            cfg_path.parent.mkdir(parents=True, exist_ok=True)
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            target = out / "merged" / method.name
            log.info("--- %s: neuromerge merge %s %s", method.name, cfg_path, target)
            result = merge(cfg_path, target, progress=False)
            model = AutoModel.from_pretrained(str(target)).eval()
            tok = AutoTokenizer.from_pretrained(str(target))
            with torch.no_grad():
                hidden = model(**tok(["the merged model runs"], return_tensors="pt"))[0]
            if not bool(torch.isfinite(hidden).all()):
                raise RuntimeError(f"{method.name}: forward pass gave non-finite values")
            merged = _state(target)
            kept = [_kept(merged, base, e) for e in experts]
            lam = result.params.get("lambda2")
            rows.append((method.name, len(used), kept, result.seconds["total"], lam))
    finally:
        log.setLevel(level)

    print(f"\nEvery merged model loaded with transformers and ran a forward pass "
          f"({time.perf_counter() - t0:.1f} s in all). Configs: {out / 'configs'}; "
          f"outputs: {out / 'merged'}.\n")
    print("How much of each expert's update the merge kept (synthetic updates, not accuracy):")
    print("cos = cosine(merged task vector, expert's); proj = projection on the expert's "
          "task vector (1 = all of it)\n")
    experts_cols = " | ".join(f"expert {i + 1} cos / proj" for i in range(3))
    head = f"| method | experts merged | {experts_cols} | time (s) | note |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, n_used, kept, secs, lam in rows:
        cells = " | ".join(f"{c:.3f} / {p:.3f}" for c, p in kept)
        note = f"lambda2 = auto → {lam:.3f}" if isinstance(lam, float) else ""
        print(f"| {name} | {n_used} | {cells} | {secs:.2f} | {note} |")
    if skipped:
        print(f"\nNot in the demo: {', '.join(skipped)} (they need per-model data statistics: "
              f"`neuromerge statistics`, see the README).")
    print("\nNext: write a YAML like the ones in configs/ for your own checkpoints and run "
          "`neuromerge merge CONFIG OUT_DIR`.")
    return 0
