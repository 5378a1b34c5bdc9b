"""chat_template: by name, auto (the inputs' most common one) or inline, written to the output's
chat_template.jinja and read back by transformers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from neuromerge.io.chat_templates import NAMED, read_chat_template, resolve_chat_template
from neuromerge.pipeline import merge

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]


def test_named_templates_render_their_formats() -> None:
    from jinja2 import Environment

    env = Environment(trim_blocks=True, lstrip_blocks=True)  # transformers' settings
    turns = CHAT[1:]
    llama3 = env.from_string(NAMED["llama3"]).render(messages=turns, bos_token="<s>",
                                                      add_generation_prompt=True)
    assert llama3 == ("<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
                      "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")
    chatml = env.from_string(NAMED["chatml"]).render(messages=turns[:1], add_generation_prompt=True)
    assert chatml == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    mistral = env.from_string(NAMED["mistral"]).render(messages=CHAT, bos_token="<s>",
                                                        eos_token="</s>")
    assert mistral == "<s> [INST] Be brief.\n\nHi [/INST] Hello</s> [INST] Bye [/INST]"
    alpaca = env.from_string(NAMED["alpaca"]).render(messages=CHAT[:2],
                                                      add_generation_prompt=True)
    assert alpaca == "Be brief.\n\n### Instruction:\nHi\n\n### Response:\n"


def test_auto_takes_the_most_common(tmp_path: Path) -> None:
    folders = []
    for i, template in enumerate(["{{ a }} one template", "{{ b }} another one", None,
                                  "{{ b }} another one\n"]):
        f = tmp_path / str(i)
        f.mkdir()
        if template is not None:
            (f / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        folders.append(f)
    (folders[0] / "chat_template.jinja").write_text("{{ b }} another one")  # the file wins
    assert read_chat_template(folders[0]) == "{{ b }} another one"
    assert resolve_chat_template("auto", folders) == "{{ b }} another one"
    assert resolve_chat_template("auto", [folders[2]]) is None
    assert resolve_chat_template("chatml", folders) == NAMED["chatml"]


@pytest.mark.parametrize("value", ["chatml", "{% for m in messages %}{{ m['content'] }}"
                                              "{% endfor %}"])
def test_the_merged_tokenizer_has_it(value: str, bert_family: Callable, tmp_path: Path) -> None:
    base, experts = bert_family(n_experts=2)
    out = tmp_path / "out"
    merge({"merge_method": "average", "base_model": str(base), "chat_template": value,
           "models": [str(e) for e in experts]}, out, progress=False)
    expected = NAMED.get(value, value)
    assert AutoTokenizer.from_pretrained(out).chat_template == expected
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert json.loads((out / "neuromerge_result.json").read_text())["chat_template"] == value
