"""Tests observe the project through its public names: a test that reads `obj._name` checks an
implementation detail, breaks when it is refactored, and passes when the behaviour it stands for breaks."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PROJECT_PACKAGES = ("app", "lora_methods", "training", "ui")
DOTTED_PRIVATE = re.compile(rf"({'|'.join(PROJECT_PACKAGES)})(\.\w+)*\._[a-z]\w*")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_reads(source: str) -> list[tuple[int, str]]:
    """(line, code) of every private name the source reads: `x._name`, `from project import _name`,
    a "module._name" string (a monkeypatch target) and setattr(x, "_name", ...)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PROJECT_PACKAGES:
            found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and DOTTED_PRIVATE.fullmatch(node.value):
            found.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith("setattr") and len(node.args) > 1:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and _private(name.value):
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_test_reads_a_private_name():
    found = []
    for path in sorted(TESTS.glob("*.py")):
        found += [f"{path.name}:{line}: {code}" for line, code in private_reads(path.read_text())]
    assert found == [], "use or add a public function instead:\n" + "\n".join(found)


def test_each_kind_of_private_read_is_found():
    source = """
from training.core.data import _snippets, load_splits
pool._bases
monkeypatch.setattr(evaluation, "_batch_figures", figures)
monkeypatch.setattr("lora_methods.sparselora.estimator._svd", fake)
run.__class__
monkeypatch.setattr("training.__main__", None)
"""
    assert [line for line, _ in private_reads(source)] == [2, 3, 4, 5]
