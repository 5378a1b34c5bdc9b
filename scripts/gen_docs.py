"""Regenerate docs/methods.md from the registered methods' signatures.

    .venv/bin/python scripts/gen_docs.py
"""

from pathlib import Path

from neuromerge.cli.methods import methods_markdown
from neuromerge.registry import all_methods

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "docs" / "methods.md"
    out.write_text(methods_markdown(all_methods()) + "\n")
    print(f"wrote {out}")
