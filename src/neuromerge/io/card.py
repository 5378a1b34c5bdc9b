"""The model card (README.md) written beside a merged model, in the layout of mergekit's (hub
metadata naming the models, the method, the models merged, the YAML as given), then what
neuromerge adds: inputs with sizes and fingerprints, the parameters as resolved (``lambda2:
auto`` as a number, each task's σ), the trim and the tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from neuromerge.method_api import MethodSpec


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000  # type: ignore[assignment]
    return str(nbytes)


def _value(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else f"`{v}`"


def _hub_ids(inp: Mapping[str, Any]) -> list[str]:
    """The hub repos an input names (a ``model+lora`` path names two)."""
    return list((inp.get("hub_commits") or {}).keys())


def _model_md(inp: Mapping[str, Any]) -> str:
    """An input as mergekit's card shows it: hub repos as links, local paths as they are."""
    repos = _hub_ids(inp)
    if not repos:
        return f"`{inp['path']}`"
    return " + ".join(f"[{r}](https://huggingface.co/{r})" for r in repos)


def model_card(*, version: str, method: MethodSpec, config: Mapping[str, Any],
               inputs: Sequence[Mapping[str, Any]], result: Any, name: str = "Merged model",
               text: str | None = None, mergekit_defaults: Sequence[str] = ()) -> str:
    """``inputs``: dicts with role, path, size (bytes), files, fingerprint (may be empty) and
    hub_commits ({repo: commit} of the hub repos the path names); ``text``: the config as
    written (else ``config`` is dumped); ``mergekit_defaults``: parameters that took mergekit's
    defaults."""
    hub = list(dict.fromkeys(r for inp in inputs for r in _hub_ids(inp)))
    meta = {"base_model": hub, "library_name": "transformers",
            "tags": ["merge", "neuromerge", method.name]}
    if not hub:
        del meta["base_model"]
    base, experts = inputs[0], inputs[1:]
    as_read = yaml.safe_dump(dict(config), sort_keys=False).rstrip()
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
        f"# {name}", "",
        f"This is a merge of pre-trained language models created with neuromerge {version}.",
        "", "## Merge Details", "### Merge Method", "",
        f"This model was merged using the [**{method.name}**]({method.reference_url}) merge method "
        f"using {_model_md(base)} as a base: {method.summary}", "",
        "### Models Merged", "", "The following models were included in the merge:",
        *[f"* {_model_md(e)}" for e in experts], "",
        "### Configuration", "",
        "The following YAML configuration was used to produce this model:", "", "```yaml",
        text.rstrip() if text is not None else as_read, "```", "",
        "## Inputs",
        "",
        "| role | path | size | files | fingerprint |",
        "|---|---|---|---|---|",
    ]
    for inp in inputs:
        commits = "".join(f"<br>{repo} @ `{sha}`" for repo, sha in
                          (inp.get("hub_commits") or {}).items())
        lines.append(f"| {inp['role']} | `{inp['path']}`{commits} | {_size(inp['size'])} | "
                     f"{inp['files']} | {inp.get('fingerprint') or '-'} |")
    lines += ["", "Fingerprint: sha256 over each file's size and first and last MiB "
              "(identifies a checkpoint without reading it all again).",
              "", "## Parameters (as resolved)", "", "| parameter | value | given |",
              "|---|---|---|"]
    given = config.get("parameters", {}) or {}
    for k, v in result.params.items():
        how = ("mergekit's default" if k in mergekit_defaults
               else _value(given[k]) if k in given else "default")
        lines.append(f"| {k} | {_value(v)} | {how} |")
    trim = result.trim
    if trim is not None:
        lines += ["", f"## Trimming ({trim.scope} scope, density {trim.density})", "",
                  "σt is the share of task t's L1 mass removed by the trim, over the whole model.",
                  ""]
        if "lambda2" in result.params and given.get("lambda2", "auto") == "auto":
            lines += [f"lambda2 = auto resolved to {result.params['lambda2']:.6g} "
                      f"= 1/(1 - max σt).", ""]
        head = "| task | model | σ | ‖τ‖₁ | ‖trim(τ)‖₁ |"
        sep = "|---|---|---|---|---|"
        if trim.thresholds is not None:
            head, sep = head + " threshold |", sep + "---|"
        lines += [head, sep]
        for t, name in enumerate(result.model_names):
            row = (f"| {t + 1} | `{name}` | {trim.sigma[t]:.6f} | {trim.l1_total[t]:.6g} | "
                   f"{trim.l1_kept[t]:.6g} |")
            if trim.thresholds is not None:
                row += f" {trim.thresholds[t]:.6g} |"
            lines.append(row)
    c = result.counts
    lines += ["", "## Tensors", "",
              f"{c['neuronal']} neuronal (2-D and higher, merged per neuron/row), {c['point']} "
              f"point (1-D/0-D), {c['copy']} copied unchanged from the base.", ""]
    copied = result.extra.get("copied", {})
    reasons: dict[str, int] = {}
    for why in copied.values():
        reasons[why or "copy"] = reasons.get(why or "copy", 0) + 1
    for why, n in reasons.items():
        lines.append(f"- {n} copied: {why}")
    arch = result.extra.get("architecture") or {}
    axes = result.extra.get("neuron_axes") or {}
    if arch.get("config"):
        lines.append(f"- architecture: {'/'.join(arch['model_types']) or 'unknown'} (from the "
                     f"base's config.json)")
    if axes:
        shown = ", ".join(f"`{n}`" for n in list(axes)[:3]) + (", ..." if len(axes) > 3 else "")
        lines.append(f"- {len(axes)} neuronal tensors have their neurons on another axis than "
                     f"rows (GPT-2-style Conv1D columns, broadcast tables): {shown}")
    for copy, kept in (result.extra.get("tied") or {}).items():
        lines.append(f"- `{copy}` is tied to `{kept}`: merged once, left out of the output")
    if text is not None:
        lines += ["", "## Configuration as neuromerge read it", "", "```yaml", as_read, "```"]
    lines += ["", f"Merge time: {result.seconds.get('total', 0):.1f} s.", ""]
    return "\n".join(lines)


def input_record(role: str, path: str, reader: Any, fingerprint: str,
                 hub_commits: dict[str, str] | None = None) -> dict[str, Any]:
    """What the card says of one input; ``hub_commits``: {repo: commit} of the hub repos its
    path names (the revision the merge read, whatever branch or tag was written)."""
    files = reader.files()
    size = sum(Path(f).stat().st_size for f in files)
    rec = {"role": role, "path": path, "size": size, "files": len(files),
           "fingerprint": fingerprint}
    if hub_commits:
        rec["hub_commits"] = dict(hub_commits)
    return rec
