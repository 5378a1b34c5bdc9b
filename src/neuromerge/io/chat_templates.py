"""mergekit's ``chat_template`` key: a template by name (``chatml``, ``llama3``, ``mistral``,
``alpaca``, ``exaone``), ``auto`` (the template most of the inputs use), or a Jinja template
given inline; written to the output's ``chat_template.jinja`` (transformers' file for it).

The named templates are written here in each format's usual form (the turns as their
vendors' templates render them, with no stray newlines between turns); mergekit's bundled
files render the same turns, with whitespace of their own."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from neuromerge.errors import ConfigError

NAMED = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
        "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
        "{%- set turns = messages[1:] %}{%- else %}{%- set turns = messages %}{%- endif %}"
        "{{- bos_token }}{%- for message in turns %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('roles must alternate user/assistant after an optional system "
        "message') }}{%- endif %}"
        "{%- if message['role'] == 'user' %}{%- if loop.first and system is defined %}"
        "{{- ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
        "{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"),
    "alpaca": (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}{{- message['content'] | trim + '\\n\\n' }}"
        "{%- elif message['role'] == 'user' %}{{- '### Instruction:\\n' + "
        "message['content'] | trim + '\\n\\n' }}"
        "{%- elif message['role'] == 'user_context' %}{{- '### Input:\\n' + "
        "message['content'] | trim + '\\n\\n' }}"
        "{%- elif message['role'] == 'assistant' %}{{- '### Response:\\n' + "
        "message['content'] | trim + '\\n\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{{- '### Response:\\n' }}{%- endif %}"),
    "exaone": (
        "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
        "{{- '[|system|][|endofturn|]\\n' }}{%- endif %}"
        "{{- '[|' + message['role'] + '|]' + message['content'] }}"
        "{%- if message['role'] == 'user' %}{{- '\\n' }}{%- else %}{{- '[|endofturn|]\\n' }}"
        "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '[|assistant|]' }}"
        "{%- endif %}"),
}


def check_chat_template(value: str) -> str:
    """``value`` if it is a name, ``auto`` or a Jinja template (mergekit's test: a template
    has a ``{`` and at least 20 characters); ConfigError otherwise."""
    if value in NAMED or value == "auto" or ("{" in value and len(value) >= 20):
        return value
    raise ConfigError(f"chat_template: {value!r} is neither a template name "
                      f"({', '.join(NAMED)}, auto) nor a Jinja template")


def read_chat_template(folder: Path) -> str | None:
    """A model folder's chat template: ``chat_template.jinja``, else tokenizer_config.json's
    ``chat_template`` (a string, or the ``default`` of a list of named ones)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        template = json.loads(cfg.read_text()).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def resolve_chat_template(value: str, inputs: Sequence[Path]) -> str | None:
    """The template ``value`` names; ``auto``: the one most input folders hold (compared with
    surrounding whitespace stripped; None when none holds one)."""
    if value in NAMED:
        return NAMED[value]
    if value != "auto":
        return value
    found = [t.strip() for t in (read_chat_template(p) for p in inputs) if t]
    return Counter(found).most_common(1)[0][0] if found else None


def write_chat_template(folder: Path, template: str) -> None:
    """The output tokenizer's chat template: ``chat_template.jinja``, and no other copy in
    tokenizer_config.json to disagree with it."""
    (folder / "chat_template.jinja").write_text(template)
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        if isinstance(data, dict) and "chat_template" in data:
            del data["chat_template"]
            cfg.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
