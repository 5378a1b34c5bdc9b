"""Docs derive from the code: docs/methods.md is what `neuromerge methods --format markdown`
prints, and the README names every method and the commands it promises."""

from pathlib import Path

from neuromerge.cli.methods import methods_markdown
from neuromerge.registry import all_methods

ROOT = Path(__file__).resolve().parent.parent


def test_methods_doc_is_generated_from_signatures() -> None:
    doc = (ROOT / "docs" / "methods.md").read_text()
    assert doc == methods_markdown(all_methods()) + "\n", \
        "docs/methods.md is stale: run .venv/bin/python scripts/gen_docs.py"


def test_readme_opens_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    head = readme[:3000]
    assert "bash scripts/setup.sh && .venv/bin/neuromerge bench " in head
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in head
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh" in ci and "python -m pytest" in ci
    for m in all_methods():
        assert f"`{m.name}`" in readme, m.name
